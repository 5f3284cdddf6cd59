"""ε_θ(z_t, t, τ_θ(y)): a condition encoder τ_θ feeding the cross-attention U-Net.

Latent diffusion (Rombach et al. 2022) maps a condition y through a domain-specific encoder
τ_θ(y) ∈ R^{M×d_τ} that enters the U-Net by cross-attention,
Attention(Q, K, V) = softmax(Q K^T / √d) V with Q = W_Q φ(z_t), K = W_K τ_θ(y), V = W_V τ_θ(y).
GLIDE (Nichol et al. 2022) also adds a pooled text vector to the timestep embedding. Here τ_θ
returns both: ``(context (B, M, d), context_mask (B, M) or None, pooled (B, d))``, and
``pooled_to_temb`` chooses whether the pooled vector is added.

    condition "label"      τ_θ = a class embedding (num_classes + 1 rows, the last the null):
                           context of one token, pooled = that token
    condition "text"       τ_θ = a CLIP-architecture text encoder (``models.text``), trained with
                           the U-Net: context = its token states, pooled = its final (eos) state
    condition "embedding"  τ_θ = identity on precomputed embeddings (B, D) -> one token, or
                           (B, L, D) -> L tokens, pooled = their mean

The whole module is one network (one optimizer, one EMA), so the encoder trains jointly with
the denoiser, as LDM's class and text encoders do. ``y`` is in ``conditions``' form; y=None is
the null condition.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from diffusax.conditions import Condition
from diffusax.models.layers import Dtype


class ClassEmbedder(nnx.Module):
    def __init__(self, num_classes: int, dim: int, *, dtype: Dtype = None, rngs: nnx.Rngs):
        self.embedding = nnx.Embed(num_classes + 1, dim, dtype=dtype, rngs=rngs)

    def __call__(self, labels):
        e = self.embedding(labels)  # (B, d)
        return e[:, None, :], None, e  # context (B, 1, d)


class TextConditioner(nnx.Module):
    def __init__(self, encoder):
        self.encoder = encoder

    def __call__(self, y):
        hidden, pooled = self.encoder(y["tokens"], y["mask"])  # (B, L, d), (B, d)
        return hidden, y["mask"], pooled


class EmbeddingConditioner(nnx.Module):
    def __call__(self, e):
        e = e.astype(jnp.float32)
        if e.ndim == 2:
            return e[:, None, :], None, e  # (B, 1, D)
        return e, None, jnp.mean(e, axis=1)  # (B, L, D), (B, D)


class ConditionedUNet(nnx.Module):
    """``model(x, t, y, dropout_key=...)``: τ_θ(y) then ``unet_cond.UNetCondition``."""

    def __init__(
        self,
        condition: Condition,
        *,
        unet_kwargs: dict,
        class_dim: int = 64,
        text_kwargs: dict | None = None,
        pooled_to_temb: bool = True,
        dtype: Dtype = None,
        rngs: nnx.Rngs,
    ):
        from diffusax.models.unet_cond import UNetCondition

        self.condition = condition
        if condition.kind == "label":
            self.encoder = ClassEmbedder(condition.num_classes, class_dim, dtype=dtype, rngs=rngs)
            width = class_dim
        elif condition.kind == "text":
            from diffusax.models.text import TextEncoder

            kwargs = dict(text_kwargs or {})
            self.encoder = TextConditioner(TextEncoder(**kwargs, dtype=dtype, rngs=rngs))
            width = kwargs["width"]
        else:
            self.encoder = EmbeddingConditioner()
            width = condition.width
        self.pooled_to_temb = pooled_to_temb
        self.unet = UNetCondition(
            **unet_kwargs,
            cross_attention_dim=width,
            pooled_dim=width if pooled_to_temb else None,
            dtype=dtype,
            rngs=rngs,
        )

    def __call__(self, x, t, y=None, *, dropout_key=None):
        if y is None:  # the null condition for every example
            y = jax.tree.map(jnp.asarray, self.condition.null(x.shape[0]))
        context, mask, pooled = self.encoder(y)
        return self.unet(
            x,
            t,
            context=context,
            context_mask=mask,
            pooled=pooled if self.pooled_to_temb else None,
            dropout_key=dropout_key,
        )
