"""The diffusion prior of unCLIP (DALL·E 2, Ramesh et al. 2022, §2.2): a decoder-only
transformer that predicts a clean CLIP image embedding from a noised one and the caption.

    prior = PriorTransformer(embed_dim=64, text_width=64, context_length=16, width=128,
                             layers=4, heads=4, rngs=nnx.Rngs(0))
    x0 = prior(z_t, t, token_states, token_mask, text_embedding, null)   # (B, D) -> (B, D)

The paper: "a decoder-only Transformer with a causal attention mask on a sequence consisting
of, in order: the encoded text, the CLIP text embedding, an embedding for the diffusion
timestep, the noised CLIP image embedding, and a final embedding whose output from the
Transformer is used to predict the unnoised CLIP image embedding." Here that sequence is

    position  0 .. L-1   token_proj(token_states)     the frozen CLIP text tower's final states
              L          text_proj(text_embedding)    (B, D), the caption's CLIP embedding
              L + 1      time_mlp(sinusoid(t))
              L + 2      x_proj(z_t)                  the noised image embedding
              L + 3      query                        learned; its output is x̂_0

plus a learned position embedding, then pre-LN blocks (``text.EncoderLayer``: the same block
as CLIP's text transformer), a final layer norm and ``out`` at the query. The attention is
causal (``causal=False``: every position sees every other), and padding tokens are masked out
as keys. Token 0 is the caption's bos, always real, so every query sees at least one key.

Classifier-free guidance: where ``null`` (B,) is True the caption is replaced by learned null
conditions: ``null_tokens`` (L, text_width) for the token states, all of them visible, and
``null_text`` (D,) for the text embedding. They are parameters of the prior, trained at the
rate the loss drops captions; nothing outside the prior needs to know their values.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from diffusax.models.layers import check_positive_ints, default_init, timestep_embedding
from diffusax.models.text import Encoder

__all__ = ["NUM_EXTRA", "PriorTransformer"]

NUM_EXTRA = 4  # positions after the tokens: text embedding, time, noised embedding, query


class PriorTransformer(nnx.Module):
    """(z_t (B, D), t (B,), token states (B, L, text_width), token mask (B, L), text embedding
    (B, D), null (B,) bool or None) -> x̂_0 (B, D).

    Args:
      embed_dim: D, the CLIP embedding width (image and text).
      text_width: width of the CLIP text tower's token states.
      context_length: L, tokens per caption.
      width, layers, heads, mlp_dim: the transformer (mlp_dim 0 = 4 · width).
      causal: the paper's causal mask (True) or full attention.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        text_width: int,
        context_length: int,
        width: int = 128,
        layers: int = 4,
        heads: int = 4,
        mlp_dim: int = 0,
        causal: bool = True,
        rngs: nnx.Rngs,
    ):
        mlp_dim = mlp_dim or 4 * width
        check_positive_ints(
            embed_dim=embed_dim,
            text_width=text_width,
            context_length=context_length,
            width=width,
            layers=layers,
            heads=heads,
            mlp_dim=mlp_dim,
        )
        if width % heads:
            raise ValueError(f"heads={heads} must divide width={width}")
        self.embed_dim, self.text_width = embed_dim, text_width
        self.context_length, self.width, self.causal = context_length, width, causal
        linear = lambda a, b: nnx.Linear(a, b, kernel_init=default_init, rngs=rngs)
        self.token_proj = linear(text_width, width)
        self.text_proj = linear(embed_dim, width)
        self.time_mlp_1 = linear(width, width)
        self.time_mlp_2 = linear(width, width)
        self.x_proj = linear(embed_dim, width)
        small = nnx.initializers.normal(stddev=0.02)
        self.query = nnx.Param(small(rngs.params(), (width,), jnp.float32))
        self.position = nnx.Param(
            small(rngs.params(), (context_length + NUM_EXTRA, width), jnp.float32)
        )
        # Zero at the start: the caption's absence is one fixed input until training moves it.
        self.null_tokens = nnx.Param(jnp.zeros((context_length, text_width), jnp.float32))
        self.null_text = nnx.Param(jnp.zeros((embed_dim,), jnp.float32))
        self.blocks = Encoder(
            layers, width, heads, mlp_dim, activation="gelu", eps=1e-5, dtype=None, rngs=rngs
        )
        self.final_norm = nnx.LayerNorm(width, rngs=rngs)
        self.out = linear(width, embed_dim)

    def __call__(self, z_t, t, token_states, token_mask, text_embedding, null=None):
        b, length = token_mask.shape
        if z_t.shape != (b, self.embed_dim) or text_embedding.shape != (b, self.embed_dim):
            raise ValueError(
                f"prior: z_t {z_t.shape} and text_embedding {text_embedding.shape} must be "
                f"(B, embed_dim={self.embed_dim}) with B = {b}"
            )
        if token_states.shape != (b, length, self.text_width) or length != self.context_length:
            raise ValueError(
                f"prior: token_states {token_states.shape} must be (B, context_length="
                f"{self.context_length}, text_width={self.text_width}) beside the mask "
                f"{token_mask.shape}"
            )
        token_mask = jnp.asarray(token_mask, bool)
        if null is not None:  # the learned null caption where null is True
            null = jnp.asarray(null, bool)
            token_states = jnp.where(null[:, None, None], self.null_tokens[...], token_states)
            token_mask = token_mask | null[:, None]  # every null token is visible
            text_embedding = jnp.where(null[:, None], self.null_text[...], text_embedding)
        freqs = timestep_embedding(t, self.width, flip_sin_to_cos=True, freq_shift=0)  # (B, W)
        time = self.time_mlp_2(nnx.silu(self.time_mlp_1(freqs)))  # (B, W)
        query = jnp.broadcast_to(self.query[...], (b, self.width))  # (B, W)
        extra = jnp.stack(
            [self.text_proj(text_embedding), time, self.x_proj(z_t), query], axis=1
        )  # (B, 4, W)
        h = jnp.concatenate([self.token_proj(token_states), extra], axis=1)  # (B, L + 4, W)
        h = h + self.position[...][None]  # (B, L + 4, W)
        n = length + NUM_EXTRA
        keys = jnp.concatenate([token_mask, jnp.ones((b, NUM_EXTRA), bool)], axis=1)  # (B, n)
        visible = keys[:, None, None, :]  # (B, 1, 1, n): padding is no key
        if self.causal:
            visible = visible & jnp.tril(jnp.ones((n, n), bool))[None, None]  # (B, 1, n, n)
        h = self.blocks(h, visible)  # (B, n, W)
        return self.out(self.final_norm(h[:, -1])).astype(jnp.float32)  # (B, D) at the query
