"""The unCLIP decoder (DALL·E 2, Ramesh et al. 2022, §2.1): a GLIDE-style text-conditional
U-Net that also reads a CLIP image embedding.

The paper modifies GLIDE "by projecting and adding CLIP embeddings into the existing timestep
embedding, and by projecting CLIP embeddings into four extra tokens of context that are
concatenated to the sequence of outputs from the GLIDE text encoder". Here:

    text       a CLIP-architecture text encoder (``models.text``), trained with the U-Net as
               GLIDE's: token states h (B, L, W) and its first end-of-text state h_eos (B, W)
    image      z = √D · e, e the unit CLIP image embedding (B, D), or a learned null embedding
               (diffusers' UnCLIPTextProjModel keeps one) where ``image_null`` is set
    context    [h ; reshape(W_c z, (B, 4, W))]: the caption's tokens and 4 image tokens, with
               the caption's key mask and the 4 tokens always visible
    temb       + MLP([h_eos ; z]) (``unet_cond``'s pooled input: one projection of both)

The condition is one dict (``methods.unclip`` builds and drops it):
``{"tokens": (B, L) int, "mask": (B, L) bool, "image": (B, D) float, "image_null": (B,) bool}``.
The empty caption is the text's null (GLIDE's); y=None is the null of both.

√D: a unit vector of D coordinates has coordinates of size 1/√D; scaled, they have mean square
1, as the inputs the projections are initialised for (the prior's embedding scale).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusax.models.layers import Dtype, dense

NUM_IMAGE_TOKENS = 4  # the paper's "four extra tokens of context"


class UnclipDecoder(nnx.Module):
    """``model(x, t, y, dropout_key=...) -> ε̂`` (or the configured prediction)."""

    def __init__(
        self,
        *,
        embed_dim: int,
        unet_kwargs: dict,
        text_kwargs: dict,
        bos_id: int,
        dtype: Dtype = None,
        rngs: nnx.Rngs,
    ):
        from diffusax.models.text import TextEncoder
        from diffusax.models.unet_cond import UNetCondition

        width = int(text_kwargs["width"])
        self.embed_dim = embed_dim
        self.width = width
        self.context_length = int(text_kwargs["context_length"])
        self.eos_id = int(text_kwargs["eos_token_id"])
        self.bos_id = bos_id
        self.text = TextEncoder(**text_kwargs, dtype=dtype, rngs=rngs)
        # Initialised as a unit vector's √D-scaled coordinates would be: N(0, 1).
        self.null_image = nnx.Param(jax.random.normal(rngs.params(), (embed_dim,), jnp.float32))
        self.image_tokens = dense(embed_dim, NUM_IMAGE_TOKENS * width, dtype=dtype, rngs=rngs)
        self.unet = UNetCondition(
            **unet_kwargs,
            cross_attention_dim=width,
            pooled_dim=width + embed_dim,
            dtype=dtype,
            rngs=rngs,
        )

    def null_condition(self, batch: int) -> dict:
        """The empty caption [bos, eos, pad...] and the learned null image embedding."""
        tokens = np.zeros((batch, self.context_length), np.int32)
        tokens[:, :2] = (self.bos_id, self.eos_id)
        return {
            "tokens": jnp.asarray(tokens),
            "mask": jnp.asarray(np.arange(self.context_length)[None] < 2).repeat(batch, 0),
            "image": jnp.zeros((batch, self.embed_dim), jnp.float32),
            "image_null": jnp.ones((batch,), bool),
        }

    def __call__(self, x, t, y=None, *, dropout_key=None):
        b = x.shape[0]
        if y is None:
            y = self.null_condition(b)
        if y["image"].shape != (b, self.embed_dim):
            raise ValueError(
                f"the decoder's image embedding must be (B, D)=({b}, {self.embed_dim}), got "
                f"{y['image'].shape}"
            )
        tokens, mask = y["tokens"], jnp.asarray(y["mask"], bool)
        hidden, _ = self.text(tokens, mask=mask)  # (B, L, W)
        eos = jnp.argmax(tokens == self.eos_id, axis=-1)  # (B,) the first end-of-text
        pooled_text = hidden[jnp.arange(b), eos]  # (B, W)

        scale = math.sqrt(self.embed_dim)
        z = scale * y["image"].astype(jnp.float32)  # (B, D)
        null = jnp.asarray(y["image_null"], bool)[:, None]
        z = jnp.where(null, self.null_image[...][None], z)
        image_tokens = self.image_tokens(z).reshape(b, NUM_IMAGE_TOKENS, self.width)
        context = jnp.concatenate([hidden, image_tokens.astype(hidden.dtype)], axis=1)
        context_mask = jnp.concatenate([mask, jnp.ones((b, NUM_IMAGE_TOKENS), bool)], axis=1)
        pooled = jnp.concatenate([pooled_text, z], axis=-1)  # (B, W + D)
        return self.unet(
            x, t, context=context, context_mask=context_mask, pooled=pooled, dropout_key=dropout_key
        )
