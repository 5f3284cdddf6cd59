"""The spatial cross-attention transformer of the Stable Diffusion / LDM U-Net (Flax NNX, NHWC).

diffusers' `Transformer2DModel` on continuous (feature-map) inputs and its
`BasicTransformerBlock`, as `UNet2DConditionModel` builds them:

    Transformer2D:  x + proj_out(blocks(proj_in(GN(x))))      over the H*W positions
    BasicTransformerBlock, on tokens h (B, HW, C):
        h = h + attn1(LN(h))                  self-attention
        h = h + attn2(LN(h), context)         cross-attention over the context tokens
        h = h + ff(LN(h))                     GEGLU feed-forward, inner width 4C

`proj_in` / `proj_out` are 1x1 convolutions, or linear layers with `use_linear_projection`
(the same maths; the checkpoints store them differently). Attention has no q/k/v biases and a
biased output projection; heads of `head_dim` channels each, softmax(q k^T / sqrt(head_dim)) v.
Parameter names mirror diffusers' (`transformer_blocks.0.attn2.to_k`, `ff.net.0.proj`, ...),
up to `to_out` (diffusers' `to_out.0`) and `ff.net_0` / `ff.net_2` (`ff.net.0` / `ff.net.2`).

diffusers never enables dropout inside these blocks in a UNet2DConditionModel (its
Transformer2DModel is built with dropout 0), so there is none here.

`proj_out` starts at zero (DDPM-style init, see `layers`): a fresh Transformer2D is the
identity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from diffusax.models.layers import Dtype, attention, default_init, dense, group_norm, zeros_init

__all__ = ["Attention", "BasicTransformerBlock", "FeedForward", "Transformer2D", "key_mask"]


def key_mask(context_mask: jax.Array | None) -> jax.Array | None:
    """(B, L) key mask (True = attend) -> (B, 1, 1, L) for `layers.attention`.

    A row with no key to attend falls back to attending to every key. That is what diffusers
    does (its mask becomes an additive bias of -10000 on the masked keys, and a constant bias on
    a whole row leaves the softmax unchanged), and it keeps an all-False row finite.
    """
    if context_mask is None:
        return None
    mask = context_mask.astype(bool)
    mask = mask | ~jnp.any(mask, axis=-1, keepdims=True)  # (B, L)
    return mask[:, None, None, :]  # (B, heads=1, queries=1, L)


class Attention(nnx.Module):
    """Multi-head attention of queries x (B, T, query_dim) over keys/values from `context`
    (B, S, context_dim), or from x itself when `context_dim` is None (self-attention)."""

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        dtype: Dtype = None,
        rngs: nnx.Rngs,
    ):
        self.heads, self.head_dim = heads, head_dim
        self.self_attention = context_dim is None
        inner, kv_dim = heads * head_dim, query_dim if context_dim is None else context_dim

        def proj(c_in: int) -> nnx.Linear:
            return nnx.Linear(
                c_in, inner, use_bias=False, kernel_init=default_init, dtype=dtype, rngs=rngs
            )

        self.to_q = proj(query_dim)
        self.to_k = proj(kv_dim)
        self.to_v = proj(kv_dim)
        self.to_out = dense(inner, query_dim, dtype=dtype, rngs=rngs)

    def __call__(
        self, x: jax.Array, context: jax.Array | None = None, mask: jax.Array | None = None
    ) -> jax.Array:
        """x (B, T, query_dim), context (B, S, context_dim), mask broadcastable to
        (B, heads, T, S) bool (True = attend; see `key_mask`) -> (B, T, query_dim)."""
        if self.self_attention:
            context = x
        elif context is None:
            raise ValueError("cross-attention needs a context (B, L, context_dim)")
        b, t, s = x.shape[0], x.shape[1], context.shape[1]
        q = self.to_q(x).reshape(b, t, self.heads, self.head_dim)  # (B, T, heads, d)
        k = self.to_k(context).reshape(b, s, self.heads, self.head_dim)  # (B, S, heads, d)
        v = self.to_v(context).reshape(b, s, self.heads, self.head_dim)
        out = attention(q, k, v, mask=mask)  # (B, T, heads, d)
        return self.to_out(out.reshape(b, t, self.heads * self.head_dim))  # (B, T, query_dim)


class GEGLU(nnx.Module):
    """proj(x) split in halves (h, g) -> h * gelu(g), with the exact (erf) gelu."""

    def __init__(self, dim: int, inner: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.proj = dense(dim, 2 * inner, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(self.proj(x), 2, axis=-1)  # 2 x (B, T, inner)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """net_0 (GEGLU, dim -> inner) then net_2 (linear, inner -> dim); diffusers' net.1 is a
    dropout without parameters."""

    def __init__(self, dim: int, *, mult: int = 4, dtype: Dtype = None, rngs: nnx.Rngs):
        inner = mult * dim
        self.net_0 = GEGLU(dim, inner, dtype=dtype, rngs=rngs)
        self.net_2 = dense(inner, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net_2(self.net_0(x))  # (B, T, dim)


class BasicTransformerBlock(nnx.Module):
    """LN -> self-attention, LN -> cross-attention over the context, LN -> GEGLU MLP; each
    added to its input. LayerNorm eps is diffusers' 1e-5 by default."""

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        head_dim: int,
        cross_attention_dim: int,
        norm_eps: float = 1e-5,
        dtype: Dtype = None,
        rngs: nnx.Rngs,
    ):
        def layer_norm() -> nnx.LayerNorm:
            # Two-pass variance: exact also where |mean| >> std.
            return nnx.LayerNorm(
                dim, epsilon=norm_eps, use_fast_variance=False, dtype=dtype, rngs=rngs
            )

        attn = dict(heads=heads, head_dim=head_dim, dtype=dtype, rngs=rngs)
        self.norm1 = layer_norm()
        self.attn1 = Attention(dim, **attn)
        self.norm2 = layer_norm()
        self.attn2 = Attention(dim, context_dim=cross_attention_dim, **attn)
        self.norm3 = layer_norm()
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)

    def __call__(
        self, h: jax.Array, context: jax.Array, mask: jax.Array | None = None
    ) -> jax.Array:
        """h (B, T, dim), context (B, L, cross_attention_dim), mask from `key_mask` or None."""
        h = h + self.attn1(self.norm1(h))
        h = h + self.attn2(self.norm2(h), context, mask)
        return h + self.ff(self.norm3(h))  # (B, T, dim)


class Transformer2D(nnx.Module):
    """x + proj_out(transformer_blocks(proj_in(GN(x)))) on a feature map x (B, H, W, C).

    Args:
      channels: C, also the transformer width (diffusers' inner_dim = heads * head_dim = C).
      num_heads: attention heads; head_dim = channels // num_heads.
      num_layers: BasicTransformerBlocks.
      cross_attention_dim: width of the context tokens.
      use_linear_projection: proj_in / proj_out as linear layers instead of 1x1 convolutions.
      norm_groups, norm_eps: the GroupNorm (diffusers: eps 1e-6 always).
      layer_norm_eps: the blocks' LayerNorms (diffusers: 1e-5).
      dtype: computation dtype; parameters stay float32.
    """

    def __init__(
        self,
        channels: int,
        *,
        num_heads: int,
        num_layers: int = 1,
        cross_attention_dim: int,
        use_linear_projection: bool = False,
        norm_groups: int = 32,
        norm_eps: float = 1e-6,
        layer_norm_eps: float = 1e-5,
        dtype: Dtype = None,
        rngs: nnx.Rngs,
    ):
        if not isinstance(num_heads, int) or num_heads < 1 or channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the {channels} channels")
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        self.channels = channels
        self.cross_attention_dim = cross_attention_dim
        self.norm = group_norm(channels, groups=norm_groups, eps=norm_eps, dtype=dtype, rngs=rngs)
        if use_linear_projection:
            self.proj_in = dense(channels, channels, dtype=dtype, rngs=rngs)
            self.proj_out = dense(channels, channels, dtype=dtype, rngs=rngs, zero=True)
        else:
            conv = dict(kernel_size=(1, 1), dtype=dtype, rngs=rngs)
            self.proj_in = nnx.Conv(channels, channels, kernel_init=default_init, **conv)
            self.proj_out = nnx.Conv(channels, channels, kernel_init=zeros_init, **conv)
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(
                    channels,
                    heads=num_heads,
                    head_dim=channels // num_heads,
                    cross_attention_dim=cross_attention_dim,
                    norm_eps=layer_norm_eps,
                    dtype=dtype,
                    rngs=rngs,
                )
                for _ in range(num_layers)
            ]
        )

    def __call__(
        self, x: jax.Array, context: jax.Array, context_mask: jax.Array | None = None
    ) -> jax.Array:
        """x (B, H, W, C), context (B, L, cross_attention_dim), context_mask (B, L) bool
        (True = attend) or None -> (B, H, W, C).

        A 1x1 convolution and a linear layer act alike on NHWC (both on the last axis), so the
        two projection kinds share one code path.
        """
        b, height, width, c = x.shape
        if context is None or context.ndim != 3 or context.shape[-1] != self.cross_attention_dim:
            shape = None if context is None else context.shape
            raise ValueError(
                f"context must be (B, L, cross_attention_dim={self.cross_attention_dim}), "
                f"got {shape}"
            )
        h = self.proj_in(self.norm(x)).reshape(b, height * width, c)  # (B, HW, C)
        mask = key_mask(context_mask)
        for block in self.transformer_blocks:
            h = block(h, context, mask)  # (B, HW, C)
        return x + self.proj_out(h.reshape(b, height, width, c))  # (B, H, W, C)
