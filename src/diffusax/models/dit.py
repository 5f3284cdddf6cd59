"""Diffusion Transformers (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

A DiT cuts the (latent) image into p x p patches, embeds each as a token, adds fixed 2-D
sin-cos position embeddings and runs a stack of adaLN-Zero transformer blocks conditioned on
c = embed(t) + embed(y) (+ embed(pooled), see below). A final adaLN layer maps every token back
to a p x p patch; with a learned sigma the output has 2C channels: ε and the variance
interpolation v of Improved DDPM (`diffusion.p_mean_variance(var_type="learned_range")`),
trained with the hybrid loss.

One table, `VARIANTS`, gives the paper's twelve models, S/B/L/XL at patch 2/4/8:

    model = DiT(variant="XL/2", rngs=nnx.Rngs(0))       # 32x32x4 latents, 1000 classes
    out = model(x, t, y)                                 # x (B, 32, 32, 4) -> (B, 32, 32, 8)
    out = model(x, t, y, dropout_key=key)                # training: label dropout on

Pooled conditioning. With `pooled_dim` set, a vector per example (e.g. a text encoder's pooled
output, (B, pooled_dim)) passes through an MLP like the timestep embedder's (Linear -> SiLU ->
Linear, normal(0.02) init) and is added to c, beside the class label:

    model = DiT(variant="B/2", num_classes=None, pooled_dim=768, rngs=nnx.Rngs(0))
    out = model(x, t, pooled=text_pooled)                # text_pooled (B, 768)

The pooled embedder is built after every other module, so a DiT with pooled_dim draws the
same weights as one without for the same Rngs; without pooled_dim nothing changes.

Label dropout. The paper trains one network for classifier-free guidance by replacing each label
with the null class (row `num_classes` of the label table) with probability 0.1 inside the
model. `class_dropout_prob` (default 0.1, as the paper) does this whenever a `dropout_key` is
passed, which the training loss always does. `losses.make_diffusion_loss(label_drop_prob=...)`
can drop labels too, before the model sees them; the two compound (a label survives with
probability (1 - p_loss)(1 - p_model)), so use one of them: DiT configs keep the loss's
`label_drop_prob=0`. Sampling passes no key, and y=None means the null label.

Scale switches: `dtype=jnp.bfloat16` computes matmuls in bf16 with float32 parameters (layer
norms and the residual stream stay float32); `fused_attention` asks for cuDNN's flash attention
through `jax.nn.dot_product_attention` on GPU; `remat` recomputes each block's activations in
the backward pass; `scan_blocks` stores the blocks stacked (leading axis = depth) and runs them
with `jax.lax.scan`, so XLA compiles one block instead of `depth`.

Initialisation follows the reference code: xavier-uniform linears (the patch embedding too,
as a linear on flattened patches), normal(0.02) label table and timestep MLP, and zeros for
every adaLN modulation and the final projection, so a fresh model outputs exactly zero.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusax.models.layers import (
    Dtype,
    batch_timesteps,
    check_labels,
    check_nhwc,
    count_params,
    default_init,
    drop_labels,
    embed_labels,
    timestep_embedding,
)

__all__ = [
    "VARIANTS",
    "DiT",
    "count_params",
    "dit_flops",
    "patchify",
    "resolve_variant",
    "sincos_pos_embed_2d",
    "unpatchify",
]

# Model sizes of Table 1 (depth, hidden width, heads), each at patch size 2, 4 and 8.
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
VARIANTS: dict[str, dict[str, int]] = {
    f"{name}/{patch}": dict(depth=depth, hidden=hidden, heads=heads, patch=patch)
    for name, (depth, hidden, heads) in _SIZES.items()
    for patch in (2, 4, 8)
}

FREQUENCY_EMBEDDING_SIZE = 256  # sinusoidal timestep features fed to the timestep MLP
embed_init = nnx.initializers.normal(stddev=0.02)
zeros_init = nnx.initializers.zeros_init()


def resolve_variant(variant: str | None = None, **sizes: int | None) -> dict[str, int]:
    """depth / hidden / heads / patch from a variant name ("XL/2"), explicit values overriding.

    Raises ValueError for an unknown name (suggesting the closest) or a missing size.
    """
    resolved: dict[str, int | None] = dict.fromkeys(("depth", "hidden", "heads", "patch"))
    if variant is not None:
        if variant not in VARIANTS:
            close = difflib.get_close_matches(str(variant).removeprefix("DiT-"), VARIANTS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown DiT variant {variant!r}{hint} Known: {sorted(VARIANTS)}")
        resolved.update(VARIANTS[variant])
    unknown = set(sizes) - set(resolved)
    if unknown:
        raise ValueError(f"unknown DiT size fields {sorted(unknown)}")
    resolved.update({k: v for k, v in sizes.items() if v is not None})
    missing = [k for k, v in resolved.items() if v is None]
    if missing:
        raise ValueError(f"DiT needs a variant or explicit {missing}")
    for name, value in resolved.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if resolved["hidden"] % resolved["heads"]:
        raise ValueError(f"heads={resolved['heads']} must divide hidden={resolved['hidden']}")
    if resolved["hidden"] % 4:
        raise ValueError(f"hidden={resolved['hidden']} must be a multiple of 4 (2-D sin-cos)")
    return resolved  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Pure pieces: patches, position embeddings, normalisation


def patchify(x: jax.Array, patch: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/p * W/p, p*p*C): row-major patches, each flattened as (p, p, C)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // patch, patch, w // patch, patch, c)  # (B, h, p, w, p, C)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, h, w, p, p, C)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)  # (B, T, p*p*C)


def unpatchify(tokens: jax.Array, patch: int, height: int, width: int) -> jax.Array:
    """Inverse of `patchify`: (B, T, p*p*C) -> (B, H, W, C) for an H x W image."""
    b, _, d = tokens.shape
    c = d // (patch * patch)
    h, w = height // patch, width // patch
    x = tokens.reshape(b, h, w, patch, patch, c)  # (B, h, w, p, p, C)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, h, p, w, p, C)
    return x.reshape(b, height, width, c)  # (B, H, W, C)


@functools.lru_cache(maxsize=32)
def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embeddings of a grid x grid token map, shape (grid², dim).

    With ω_k = 10000^(-k / (dim/4)), k = 0 .. dim/4 - 1, a coordinate u is embedded as
    e(u) = [sin(u ω), cos(u ω)] (dim/2 values); the token in row i, column j gets
    [e(j), e(i)] (MAE / DiT convention: the column comes first). Tokens are row-major.
    Computed in float64 and returned as float32, as the reference code does.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embeddings need dim divisible by 4, got {dim}")
    omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))  # (dim/4,)
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")  # (grid, grid)

    def embed(u):
        angles = u.reshape(-1)[:, None] * omega[None, :]  # (grid², dim/4)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)  # (grid², dim/2)

    return np.concatenate([embed(cols), embed(rows)], axis=1).astype(np.float32)  # (grid², dim)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """(x - mean) / sqrt(var + eps) over the last axis, no affine; computed in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)  # two-pass, as PyTorch
    return (x32 - mean) * jax.lax.rsqrt(var + eps)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN: x * (1 + scale) + shift, with per-example (B, D) shift/scale over (B, T, D) x."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


# ---------------------------------------------------------------------------------------------
# Modules


def _linear(c_in, c_out, *, dtype, rngs, init=default_init):
    """Linear layer; the default init is xavier-uniform (= variance_scaling(1, fan_avg))."""
    return nnx.Linear(c_in, c_out, kernel_init=init, dtype=dtype, rngs=rngs)


class TimestepEmbedder(nnx.Module):
    """t -> MLP(sinusoidal(t)): 256 frequencies, Linear -> SiLU -> Linear, normal(0.02) init."""

    def __init__(self, hidden: int, *, freq_shift: float, dtype: Dtype, rngs: nnx.Rngs):
        self.freq_shift = freq_shift
        self.mlp_1 = _linear(
            FREQUENCY_EMBEDDING_SIZE, hidden, dtype=dtype, rngs=rngs, init=embed_init
        )
        self.mlp_2 = _linear(hidden, hidden, dtype=dtype, rngs=rngs, init=embed_init)

    def __call__(self, t: jax.Array) -> jax.Array:
        freqs = timestep_embedding(
            t, FREQUENCY_EMBEDDING_SIZE, flip_sin_to_cos=True, freq_shift=self.freq_shift
        )  # (B, 256)
        return self.mlp_2(nnx.silu(self.mlp_1(freqs))).astype(jnp.float32)  # (B, D)


class Attention(nnx.Module):
    """Multi-head self-attention: softmax(q k^T / sqrt(d)) v over the tokens, fused qkv."""

    def __init__(self, hidden: int, heads: int, *, fused: bool, dtype: Dtype, rngs: nnx.Rngs):
        self.heads = heads
        self.fused = fused
        self.qkv = _linear(hidden, 3 * hidden, dtype=dtype, rngs=rngs)
        self.proj = _linear(hidden, hidden, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads)  # (B, T, 3, N, d/N)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, T, N, d/N) each
        out = jax.nn.dot_product_attention(
            q, k, v, implementation=_attention_implementation(self.fused, q.dtype)
        )  # (B, T, N, d/N)
        return self.proj(out.reshape(b, n, d))  # (B, T, D)


def _attention_implementation(fused: bool, dtype) -> str | None:
    """cuDNN flash attention when asked for and available (GPU, 16-bit inputs), else XLA."""
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if fused and half and jax.default_backend() == "gpu" else None


class Mlp(nnx.Module):
    """Linear -> GELU (tanh approximation) -> Linear."""

    def __init__(self, hidden: int, inner: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.fc1 = _linear(hidden, inner, dtype=dtype, rngs=rngs)
        self.fc2 = _linear(inner, hidden, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))  # (B, T, D)


class PooledEmbedder(nnx.Module):
    """pooled (B, P) -> MLP(pooled): Linear(P, D) -> SiLU -> Linear(D, D), normal(0.02) init,
    as the timestep embedder's MLP."""

    def __init__(self, pooled_dim: int, hidden: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.mlp_1 = _linear(pooled_dim, hidden, dtype=dtype, rngs=rngs, init=embed_init)
        self.mlp_2 = _linear(hidden, hidden, dtype=dtype, rngs=rngs, init=embed_init)

    def __call__(self, pooled: jax.Array) -> jax.Array:
        return self.mlp_2(nnx.silu(self.mlp_1(pooled))).astype(jnp.float32)  # (B, D)


class DiTBlock(nnx.Module):
    """adaLN-Zero block (DiT Fig. 3), c = embed(t) + embed(y):

    shift₁, scale₁, gate₁, shift₂, scale₂, gate₂ = Linear(SiLU(c))      (zero-initialised)
    x ← x + gate₁ · Attention(LN(x) · (1 + scale₁) + shift₁)
    x ← x + gate₂ · MLP(LN(x) · (1 + scale₂) + shift₂)
    """

    def __init__(
        self,
        hidden: int,
        heads: int,
        *,
        mlp_ratio: float,
        norm_eps: float,
        mlp_norm_eps: float,
        fused_attention: bool,
        dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        self.norm_eps = norm_eps
        self.mlp_norm_eps = mlp_norm_eps
        self.modulation = _linear(hidden, 6 * hidden, dtype=dtype, rngs=rngs, init=zeros_init)
        self.attn = Attention(hidden, heads, fused=fused_attention, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        mod = self.modulation(nnx.silu(c)).astype(jnp.float32)  # (B, 6D)
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)  # (B, D) each
        h = self.attn(modulate(layer_norm(x, self.norm_eps), shift1, scale1))  # (B, T, D)
        x = x + gate1[:, None, :] * h
        h = self.mlp(modulate(layer_norm(x, self.mlp_norm_eps), shift2, scale2))  # (B, T, D)
        return x + gate2[:, None, :] * h  # (B, T, D) float32 residual stream


class FinalLayer(nnx.Module):
    """shift, scale = Linear(SiLU(c)); tokens -> Linear(LN(x) · (1 + scale) + shift), zero init."""

    def __init__(self, hidden: int, out_dim: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.modulation = _linear(hidden, 2 * hidden, dtype=dtype, rngs=rngs, init=zeros_init)
        self.linear = _linear(hidden, out_dim, dtype=dtype, rngs=rngs, init=zeros_init)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.modulation(nnx.silu(c)).astype(jnp.float32), 2, axis=-1)
        return self.linear(modulate(layer_norm(x, 1e-6), shift, scale))  # (B, T, p*p*out)


def _make_block_stack(depth: int, hidden: int, heads: int, *, rngs: nnx.Rngs, **kwargs):
    """`depth` independently initialised DiTBlocks as one module with stacked parameters."""

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs: nnx.Rngs) -> DiTBlock:
        return DiTBlock(hidden, heads, rngs=rngs, **kwargs)

    return make(rngs)


def _apply_block(graphdef, params, h, c):
    """One block as a pure function of its parameters (for scan and remat)."""
    return nnx.merge(graphdef, params)(h, c)


class DiT(nnx.Module):
    """Diffusion Transformer: ε_θ(x_t, t, y) (and the variance interpolation if learn_sigma).

    Args:
      variant: a key of `VARIANTS` ("S/8" ... "XL/2"); `depth`, `hidden`, `heads`, `patch`
        given explicitly override it (or replace it when variant is None).
      input_size: side of the square input (latent) image; must be a multiple of `patch`.
      in_channels: channels of the input (4 for Stable Diffusion latents).
      num_classes: size of the label set; the label table has num_classes + 1 rows, the last
        being the null label used for classifier-free guidance. None: no labels.
      pooled_dim: width of a pooled condition vector `pooled` (B, pooled_dim) whose MLP
        embedding is added to the conditioning vector c (see the module docstring). None: no
        pooled input.
      learn_sigma: output 2C channels, ε then the variance interpolation (var_type
        "learned_range"); otherwise C.
      mlp_ratio: MLP width / hidden width.
      class_dropout_prob: training-time probability of replacing a label with the null label,
        applied only when `dropout_key` is passed (see the module docstring).
      freq_shift: timestep-frequency convention of `layers.timestep_embedding`; the reference
        code uses 0, diffusers' port 1.
      norm_eps, mlp_norm_eps: epsilon of the pre-attention and pre-MLP layer norms (the
        reference uses 1e-6 for both; diffusers' port uses its config's norm_eps before the
        MLP). mlp_norm_eps=None means norm_eps.
      fused_attention: use cuDNN flash attention on GPU with 16-bit compute; XLA otherwise.
      scan_blocks: run the blocks with `jax.lax.scan` over stacked parameters.
      remat: rematerialise each block in the backward pass.
      dtype: computation dtype (e.g. jnp.bfloat16); parameters stay float32. Output is float32.
    """

    def __init__(
        self,
        *,
        variant: str | None = None,
        depth: int | None = None,
        hidden: int | None = None,
        heads: int | None = None,
        patch: int | None = None,
        input_size: int = 32,
        in_channels: int = 4,
        num_classes: int | None = 1000,
        pooled_dim: int | None = None,
        learn_sigma: bool = True,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        freq_shift: float = 0.0,
        norm_eps: float = 1e-6,
        mlp_norm_eps: float | None = None,
        fused_attention: bool = False,
        scan_blocks: bool = True,
        remat: bool = False,
        dtype: Dtype = None,
        rngs: nnx.Rngs,
    ):
        sizes = resolve_variant(variant, depth=depth, hidden=hidden, heads=heads, patch=patch)
        _check_config(
            sizes["patch"], input_size, in_channels, num_classes, mlp_ratio, class_dropout_prob
        )
        if pooled_dim is not None and (
            not isinstance(pooled_dim, int) or isinstance(pooled_dim, bool) or pooled_dim < 1
        ):
            raise ValueError(f"pooled_dim must be None or a positive int, got {pooled_dim!r}")
        self.depth, self.hidden, self.heads, self.patch = (
            sizes["depth"],
            sizes["hidden"],
            sizes["heads"],
            sizes["patch"],
        )
        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.num_classes = num_classes
        self.pooled_dim = pooled_dim
        self.class_dropout_prob = class_dropout_prob
        self.scan_blocks = scan_blocks
        self.remat = remat
        d, p = self.hidden, self.patch

        self.x_embedder = _linear(p * p * in_channels, d, dtype=dtype, rngs=rngs)
        self.t_embedder = TimestepEmbedder(d, freq_shift=freq_shift, dtype=dtype, rngs=rngs)
        self.y_embedder = (
            nnx.Embed(num_classes + 1, d, embedding_init=embed_init, dtype=dtype, rngs=rngs)
            if num_classes is not None
            else None
        )
        block_kwargs = dict(
            mlp_ratio=mlp_ratio,
            norm_eps=norm_eps,
            mlp_norm_eps=norm_eps if mlp_norm_eps is None else mlp_norm_eps,
            fused_attention=fused_attention,
            dtype=dtype,
        )
        # The blocks are always drawn as one stack (leading axis = depth, one vmapped init that
        # traces a single block), so the same Rngs give the same weights in either layout.
        stacked = _make_block_stack(self.depth, d, self.heads, rngs=rngs, **block_kwargs)
        if scan_blocks:
            self.blocks = stacked
        else:
            graphdef, state = nnx.split(stacked)
            self.blocks = nnx.List(
                [
                    nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
                    for i in range(self.depth)
                ]
            )
        self.final_layer = FinalLayer(d, p * p * self.out_channels, dtype=dtype, rngs=rngs)
        # Last, so the other modules draw the same weights with or without it.
        self.pooled_embedder = (
            PooledEmbedder(pooled_dim, d, dtype=dtype, rngs=rngs)
            if pooled_dim is not None
            else None
        )

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        y: jax.Array | None = None,
        *,
        pooled: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """x: (B, H, W, in_channels) with H = W = input_size, t: (B,) or scalar, y: (B,) labels,
        pooled: (B, pooled_dim) float, required when the DiT has pooled_dim and refused otherwise.

        Returns (B, H, W, out_channels) float32. With `dropout_key`, labels are replaced by the
        null label with probability `class_dropout_prob`; y=None means the null label. y may also
        be (B, num_classes + 1) float label weights w: the label embedding is then w E, the
        weighted sum of the table's rows (`layers.embed_labels`; label interpolation).
        """
        t, y = self._check_inputs(x, t, y)
        pooled = self._check_pooled(pooled, x.shape[0])
        _, height, width, _ = x.shape
        pos = sincos_pos_embed_2d(self.hidden, height // self.patch)  # (T, D)
        h = self.x_embedder(patchify(x, self.patch))  # (B, T, D)
        h = h.astype(jnp.float32) + pos[None]  # (B, T, D)
        c = self.t_embedder(t)  # (B, D)
        if self.y_embedder is not None:
            if dropout_key is not None and self.class_dropout_prob > 0:
                if not jnp.issubdtype(y.dtype, jnp.integer):
                    raise ValueError("label dropout (a dropout_key) needs integer labels y")
                y = drop_labels(y, dropout_key, self.class_dropout_prob, self.num_classes)
            c = c + embed_labels(self.y_embedder, y).astype(jnp.float32)  # (B, D)
        if self.pooled_embedder is not None:
            c = c + self.pooled_embedder(pooled)  # (B, D)
        h = self._run_blocks(h, c)  # (B, T, D)
        h = self.final_layer(h, c)  # (B, T, p*p*out_channels)
        return unpatchify(h, self.patch, height, width).astype(jnp.float32)  # (B, H, W, out)

    def _run_blocks(self, h: jax.Array, c: jax.Array) -> jax.Array:
        apply = _apply_block
        if self.remat:  # inside scan, CSE cannot undo the recomputation (JAX's advice)
            apply = jax.checkpoint(apply, static_argnums=(0,), prevent_cse=not self.scan_blocks)
        if self.scan_blocks:
            graphdef, params = nnx.split(self.blocks)

            def body(h, block_params):
                return apply(graphdef, block_params, h, c), None

            h, _ = jax.lax.scan(body, h, params)  # (B, T, D)
            return h
        for block in self.blocks:
            graphdef, params = nnx.split(block)
            h = apply(graphdef, params, h, c)  # (B, T, D)
        return h

    def _check_inputs(self, x, t, y):
        """Shape checks at trace time, so a wrong input fails before compilation."""
        b, h, w, _ = check_nhwc(x, self.in_channels, "DiT")
        if (h, w) != (self.input_size, self.input_size):
            raise ValueError(
                f"x is {h}x{w} but the DiT was built for input_size={self.input_size} "
                f"({self.input_size}x{self.input_size})"
            )
        t = batch_timesteps(t, b)
        if self.num_classes is None:
            if y is not None:
                raise ValueError("labels y given but the DiT was built with num_classes=None")
            return t, None
        if y is None:
            return t, jnp.full((b,), self.num_classes, jnp.int32)  # the null label
        return t, check_labels(y, b, self.num_classes, "DiT")

    def _check_pooled(self, pooled, batch: int):
        """``pooled`` as a (B, pooled_dim) float array, or None without pooled_dim."""
        if self.pooled_dim is None:
            if pooled is not None:
                raise ValueError("pooled given but the DiT was built with pooled_dim=None")
            return None
        if pooled is None:
            raise ValueError(
                f"the DiT was built with pooled_dim={self.pooled_dim}: pass pooled, "
                f"shape (B, {self.pooled_dim})"
            )
        pooled = jnp.asarray(pooled)
        if pooled.shape != (batch, self.pooled_dim) or not jnp.issubdtype(
            pooled.dtype, jnp.floating
        ):
            raise ValueError(
                f"pooled must be (B, pooled_dim)=({batch}, {self.pooled_dim}) float, got "
                f"{pooled.shape} {pooled.dtype}"
            )
        return pooled


def _check_config(patch, input_size, in_channels, num_classes, mlp_ratio, class_dropout_prob):
    """Reject a configuration that cannot build a DiT, naming the argument."""
    for name, value in [("input_size", input_size), ("in_channels", in_channels)]:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if input_size % patch:
        raise ValueError(f"input_size={input_size} is not divisible by the patch size {patch}")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be None or a positive int, got {num_classes!r}")
    if not mlp_ratio > 0:
        raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}")
    if not 0.0 <= class_dropout_prob < 1.0:
        raise ValueError(f"class_dropout_prob must be in [0, 1), got {class_dropout_prob}")


# ---------------------------------------------------------------------------------------------
# Forward cost


def dit_flops(
    variant: str | Mapping[str, int],
    input_size: int = 32,
    in_channels: int = 4,
    *,
    learn_sigma: bool = True,
    mlp_ratio: float = 4.0,
    pooled_dim: int | None = None,
) -> int:
    """Multiply-adds of one forward pass on one example: the DiT paper's "Gflops" × 1e9.

    The paper counts a multiply-add as one flop. With T = (input_size / p)² tokens, width D,
    MLP width M = mlp_ratio·D, depth L, C_in / C_out channels:

        L · (T·(4D² + 2MD) + 2T²D + 6D²)     blocks: qkv + proj, MLP, q kᵀ and a·v, adaLN
      + T·p²·C_in·D + T·D·p²·C_out + 2D²     patch embedding, final projection, final adaLN
      + 256·D + D²                           timestep MLP
      + P·D + D²                             pooled MLP (only with pooled_dim = P)

    Normalisation, activations, softmax and the label lookup are not multiply-adds of
    matrices and are left out. For 256x256 images (32x32x4 latents) this reproduces the
    paper's Table 4 to within its rounding plus 0.02% (its counting tool is unpublished).
    """
    sizes = resolve_variant(variant) if isinstance(variant, str) else resolve_variant(**variant)
    depth, d, p = sizes["depth"], sizes["hidden"], sizes["patch"]
    if input_size % p:
        raise ValueError(f"input_size={input_size} is not divisible by the patch size {p}")
    tokens = (input_size // p) ** 2
    inner = int(d * mlp_ratio)
    c_out = 2 * in_channels if learn_sigma else in_channels
    block = tokens * (4 * d * d + 2 * inner * d) + 2 * tokens * tokens * d + 6 * d * d
    embed = tokens * p * p * in_channels * d + FREQUENCY_EMBEDDING_SIZE * d + d * d
    final = tokens * d * p * p * c_out + 2 * d * d
    if pooled_dim is not None:
        embed += pooled_dim * d + d * d
    return depth * block + embed + final
