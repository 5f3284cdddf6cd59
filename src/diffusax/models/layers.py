"""Building blocks shared by the U-Net, the DiT and the autoencoder (Flax NNX, NHWC).

Every block is a plain `nnx.Module` whose call is a pure function of its inputs: randomness
(dropout) comes in as an explicit PRNG key, never from state held by the module, so a model can
be `nnx.split` once and `nnx.merge`d inside a jitted loss.

Initialisation follows DDPM (Ho et al. 2020): "fan_avg" uniform variance scaling, and the last
layer of every residual branch (second conv of a residual block, attention output projection)
starts at zero, so each block starts as the identity.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = jnp.dtype | type | None

# DDPM's `default_init(scale)`: variance_scaling(scale, "fan_avg", "uniform").
default_init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zeros_init = nnx.initializers.zeros_init()


def timestep_embedding(
    t: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool,
    freq_shift: float,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, shape (B,) -> (B, dim).

    With half = dim // 2 and k = 0 .. half - 1,

        f_k = exp(-ln(max_period) * k / (half - freq_shift)),
        emb(t) = [sin(t f_0), ..., sin(t f_{half-1}), cos(t f_0), ..., cos(t f_{half-1})],

    or [cos, sin] when `flip_sin_to_cos`; an odd `dim` gets one trailing zero. DDPM and
    diffusers' DDPM checkpoints use freq_shift=1, flip_sin_to_cos=False; the Transformer
    convention (and DiT) is freq_shift=0, flip_sin_to_cos=True. Computed in float32.
    """
    t = jnp.asarray(t, jnp.float32)
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding: t must have shape (B,), got {t.shape}")
    half = dim // 2
    if half - freq_shift <= 0:
        raise ValueError(f"timestep_embedding: dim={dim} too small for freq_shift={freq_shift}")
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = t[:, None] * jnp.exp(exponent)[None, :]  # (B, half)
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)  # (B, 2*half)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))  # (B, dim)
    return emb


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout: x * m / (1 - rate) with m ~ Bernoulli(1 - rate); identity if key is None."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def group_norm(
    channels: int,
    *,
    groups: int,
    eps: float,
    dtype: Dtype,
    rngs: nnx.Rngs,
    fast_variance: bool = False,
) -> nnx.GroupNorm:
    """GroupNorm over the last (channel) axis of NHWC or (B, T, C) inputs.

    ``fast_variance`` computes Var = E[x²] - E[x]² in one pass over x (about 9% off the digits
    U-Net's CPU train step) instead of E[(x - E[x])²] in two; the two-pass form is exact where
    |E[x]| >> std (the SD autoencoder's activations on real images), so autoencoders keep it.
    """
    if channels % groups:
        raise ValueError(f"norm_groups={groups} does not divide the {channels} channels")
    return nnx.GroupNorm(
        channels,
        num_groups=groups,
        epsilon=eps,
        use_fast_variance=fast_variance,
        dtype=dtype,
        rngs=rngs,
    )


def conv3x3(
    c_in: int, c_out: int, *, dtype: Dtype, rngs: nnx.Rngs, zero: bool = False, stride: int = 1
) -> nnx.Conv:
    """3x3 convolution; stride 1 pads one pixel each side (size-preserving)."""
    return nnx.Conv(
        c_in,
        c_out,
        (3, 3),
        strides=stride,
        padding=((1, 1), (1, 1)),
        kernel_init=zeros_init if zero else default_init,
        dtype=dtype,
        rngs=rngs,
    )


def dense(c_in: int, c_out: int, *, dtype: Dtype, rngs: nnx.Rngs, zero: bool = False):
    """Linear layer on the last axis with DDPM initialisation."""
    return nnx.Linear(
        c_in, c_out, kernel_init=zeros_init if zero else default_init, dtype=dtype, rngs=rngs
    )


class ResBlock(nnx.Module):
    """Residual block: GN -> SiLU -> conv3x3 -> (+ dense(SiLU(temb))) -> GN -> SiLU -> dropout ->
    conv3x3, added to the input (through a 1x1 conv when the channel count changes).

    `temb_dim=None` builds the unconditioned variant (used by autoencoders).
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        *,
        temb_dim: int | None,
        dropout: float = 0.0,
        norm_groups: int = 32,
        norm_eps: float = 1e-6,
        norm_fast_variance: bool = False,
        dtype: Dtype = None,
        rngs: nnx.Rngs,
    ):
        self.dropout_rate = dropout
        norm = dict(eps=norm_eps, fast_variance=norm_fast_variance, dtype=dtype, rngs=rngs)
        self.norm1 = group_norm(c_in, groups=norm_groups, **norm)
        self.conv1 = conv3x3(c_in, c_out, dtype=dtype, rngs=rngs)
        self.temb_proj = (
            dense(temb_dim, c_out, dtype=dtype, rngs=rngs) if temb_dim is not None else None
        )
        self.norm2 = group_norm(c_out, groups=norm_groups, **norm)
        self.conv2 = conv3x3(c_out, c_out, dtype=dtype, rngs=rngs, zero=True)
        self.shortcut = (
            nnx.Conv(c_in, c_out, (1, 1), kernel_init=default_init, dtype=dtype, rngs=rngs)
            if c_in != c_out
            else None
        )

    def __call__(
        self, x: jax.Array, temb: jax.Array | None = None, dropout_key: jax.Array | None = None
    ) -> jax.Array:
        h = self.conv1(nnx.silu(self.norm1(x)))  # (B, H, W, c_out)
        if self.temb_proj is not None:
            if temb is None:
                raise ValueError("ResBlock built with temb_dim needs a timestep embedding")
            h = h + self.temb_proj(nnx.silu(temb))[:, None, None, :]
        h = nnx.silu(self.norm2(h))
        h = self.conv2(dropout(h, self.dropout_rate, dropout_key))
        skip = self.shortcut(x) if self.shortcut is not None else x
        return skip + h


def _apply_res_block(block: ResBlock, h: jax.Array, temb: jax.Array, key: jax.Array | None):
    return block(h, temb, key)


# Rematerialised variant: activations inside the block are recomputed in the backward pass.
_apply_res_block_remat = nnx.remat(_apply_res_block)


def res_block_caller(temb: jax.Array, dropout_key: jax.Array | None, *, remat: bool):
    """``res(block, h)``: a U-Net's ResBlock applied with ``temb``, rematerialised if ``remat``.

    The n-th call (from 0) drops out with ``fold_in(dropout_key, n)``, so each block's key
    follows the order the forward pass calls the blocks in.
    """
    apply = _apply_res_block_remat if remat else _apply_res_block
    calls = itertools.count()

    def res(block: ResBlock, h: jax.Array) -> jax.Array:
        n = next(calls)
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, n)
        return apply(block, h, temb, key)

    return res


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None):
    """softmax(q kᵀ / √d) v: q (B, T, heads, d), k and v (B, S, heads, d), ``mask``
    broadcastable to (B, heads, T, S), True = attend (every row must attend somewhere).

    ``jax.nn.dot_product_attention`` on accelerators. On the CPU backend it is two einsums with
    the softmax's normalisation moved after the second one, exp(s - max) v / Σ exp(s - max):
    XLA's CPU attention takes 2.1 s where this takes 1.1 s at Stable Diffusion's 4096 tokens
    (batch 2, 8 heads of 40; benchmarks/README.md, bench_sd_unet.py). Scores, softmax and the
    normalisation are float32 in both; the result has q's dtype.
    """
    if jax.default_backend() != "cpu":
        return jax.nn.dot_product_attention(q, k, v, mask=mask)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = scores * (q.shape[-1] ** -0.5)  # (B, heads, T, S)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jnp.exp(scores - scores.max(axis=-1, keepdims=True))
    out = jnp.einsum(
        "bhqk,bkhd->bqhd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32
    )  # (B, T, heads, d)
    total = weights.sum(axis=-1).transpose(0, 2, 1)[..., None]  # (B, T, heads, 1)
    return (out / total).astype(q.dtype)


class AttentionBlock(nnx.Module):
    """Spatial self-attention with a residual connection:

        x + proj_out(softmax(q k^T / sqrt(d)) v),  q, k, v = dense(GN(x))

    over the H*W positions, with `num_heads` heads of d = C / num_heads channels each.
    """

    def __init__(
        self,
        channels: int,
        *,
        num_heads: int = 1,
        norm_groups: int = 32,
        norm_eps: float = 1e-6,
        norm_fast_variance: bool = False,
        dtype: Dtype = None,
        rngs: nnx.Rngs,
    ):
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the {channels} channels")
        self.num_heads = num_heads
        self.norm = group_norm(
            channels,
            groups=norm_groups,
            eps=norm_eps,
            fast_variance=norm_fast_variance,
            dtype=dtype,
            rngs=rngs,
        )
        self.query = dense(channels, channels, dtype=dtype, rngs=rngs)
        self.key = dense(channels, channels, dtype=dtype, rngs=rngs)
        self.value = dense(channels, channels, dtype=dtype, rngs=rngs)
        self.proj_out = dense(channels, channels, dtype=dtype, rngs=rngs, zero=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        heads = (b, h * w, self.num_heads, c // self.num_heads)
        y = self.norm(x)
        q = self.query(y).reshape(heads)  # (B, HW, heads, d)
        k = self.key(y).reshape(heads)
        v = self.value(y).reshape(heads)
        out = attention(q, k, v)  # (B, HW, heads, d)
        return x + self.proj_out(out.reshape(b, h, w, c))  # (B, H, W, C)


DOWNSAMPLE_PADDINGS = {"symmetric": ((1, 1), (1, 1)), "asymmetric": ((0, 1), (0, 1))}


class Downsample(nnx.Module):
    """Stride-2 3x3 convolution, (B, H, W, C) -> (B, H/2, W/2, C).

    padding="symmetric" pads one pixel on every side (diffusers' `downsample_padding=1`);
    padding="asymmetric" pads one pixel only after each spatial axis, which is what TensorFlow's
    "SAME" does for even sizes: the original DDPM code and the google/ddpm-* checkpoints
    (`downsample_padding=0`).
    """

    def __init__(
        self, channels: int, *, padding: str = "symmetric", dtype: Dtype = None, rngs: nnx.Rngs
    ):
        if padding not in DOWNSAMPLE_PADDINGS:
            raise ValueError(
                f"downsample padding must be one of {list(DOWNSAMPLE_PADDINGS)}: {padding!r}"
            )
        self.conv = nnx.Conv(
            channels,
            channels,
            (3, 3),
            strides=2,
            padding=DOWNSAMPLE_PADDINGS[padding],
            kernel_init=default_init,
            dtype=dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)  # (B, H/2, W/2, C)


def upsample_nearest(x: jax.Array, factor: int = 2) -> jax.Array:
    """Nearest-neighbour upsampling, (B, H, W, C) -> (B, factor*H, factor*W, C)."""
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, factor, w, factor, c))
    return x.reshape(b, h * factor, w * factor, c)


class Upsample(nnx.Module):
    """Nearest-neighbour x2 then a 3x3 convolution, (B, H, W, C) -> (B, 2H, 2W, C)."""

    def __init__(self, channels: int, *, dtype: Dtype = None, rngs: nnx.Rngs):
        self.conv = conv3x3(channels, channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(upsample_nearest(x))  # (B, 2H, 2W, C)


def check_nhwc(x: jax.Array, in_channels: int, model: str) -> tuple[int, ...]:
    """x.shape, (B, H, W, C); ValueError unless x is NHWC with ``in_channels`` channels."""
    if x.ndim != 4:
        raise ValueError(f"x must be NHWC (B, H, W, C), got shape {x.shape}")
    c = x.shape[-1]
    if c != in_channels:
        raise ValueError(
            f"x has {c} channels (last axis, NHWC) but the {model} takes in_channels="
            f"{in_channels}; x.shape={x.shape}"
        )
    return x.shape


def check_spatial_multiple(h: int, w: int, factor: int, why: str, *, factor_name: str = ""):
    """ValueError unless the spatial size h x w is a positive multiple of ``factor``."""
    if h % factor or w % factor or h == 0 or w == 0:
        raise ValueError(
            f"x spatial size {h}x{w} must be a positive multiple of {factor_name}{factor} ({why})"
        )


def batch_timesteps(t, batch: int) -> jax.Array:
    """``t`` as a (B,) array, a scalar broadcast to the batch; ValueError for another shape."""
    t = jnp.asarray(t)
    if t.ndim == 0:
        t = jnp.broadcast_to(t, (batch,))
    if t.shape != (batch,):
        raise ValueError(f"t must have shape (B,)=({batch},) or be a scalar, got {t.shape}")
    return t


def check_positive_ints(**named) -> None:
    """ValueError naming the first argument, in the order given, that is not a positive int.

    A bool is rejected although ``isinstance(True, int)``.
    """
    for name, value in named.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_positive_int_seq(name: str, values) -> None:
    """ValueError unless ``values`` is a non-empty sequence of positive ints (bools pass)."""
    if not values or any(not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {values}")


def check_labels(y, batch: int, num_classes: int, model: str) -> jax.Array:
    """``y`` as (B,) int labels or (B, num_classes + 1) label weights; ValueError otherwise."""
    y = jnp.asarray(y)
    if jnp.issubdtype(y.dtype, jnp.integer) and y.shape == (batch,):
        return y
    if jnp.issubdtype(y.dtype, jnp.floating) and y.shape == (batch, num_classes + 1):
        return y
    raise ValueError(
        f"y must be (B,)=({batch},) integer labels or ({batch}, {num_classes + 1}) float label "
        f"weights (the last column is the null label) for the {model}, got {y.shape} {y.dtype}"
    )


def embed_labels(embed: nnx.Embed, y: jax.Array) -> jax.Array:
    """Label embeddings (B, D) from int labels y (B,), or from label weights w (B, K + 1):

        e = E[y]    or    e = Σ_k w_k E[k]  =  w E,

    with E the (K + 1, D) table (row K: the null label). A one-hot w gives the row exactly, and
    w = (1 - λ) onehot(a) + λ onehot(b) the straight line (1 - λ) E[a] + λ E[b] between two
    classes' embeddings (label interpolation). The product is taken at full float32 precision
    (GPUs would otherwise round it to TF32) and cast to the layer's dtype, as the lookup is.
    """
    if jnp.issubdtype(y.dtype, jnp.integer):
        return embed(y)  # (B, D)
    table = embed.embedding[...].astype(jnp.float32)  # (K + 1, D)
    out = jnp.matmul(y.astype(jnp.float32), table, precision=jax.lax.Precision.HIGHEST)
    return out.astype(embed.dtype)  # (B, D)


def count_params(model: nnx.Module) -> int:
    """Number of scalar parameters (nnx.Param leaves) in a model, abstract (eval_shape) or not."""
    params = nnx.state(model, nnx.Param)
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def drop_labels(labels, key, drop_prob: float, null_label: int):
    """Replace each label by ``null_label`` with probability ``drop_prob`` (training for CFG)."""
    drop = jax.random.bernoulli(key, drop_prob, labels.shape)
    return jnp.where(drop, null_label, labels)
