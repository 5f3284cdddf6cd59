"""Contrastive language-image pre-training (CLIP, Radford et al. 2021): the symmetric InfoNCE
loss with a learnable temperature.

For a batch of B matched pairs, image features f(x_i) and text features g(y_i),

    u_i = f(x_i) / ‖f(x_i)‖,   v_j = g(y_j) / ‖g(y_j)‖                  (unit vectors)
    s   = exp(min(t, t_max))                                            (t learnable)
    L_ij = s · u_i · v_j                                                (B, B) logits
    loss = ½ [ CE(L, arange(B)) + CE(Lᵀ, arange(B)) ]
    CE(M, arange(B)) = -(1/B) Σ_i log softmax(M_i)_i

so each image must pick its own caption out of the batch's captions (rows of L) and each
caption its own image (columns). The paper initialises t = log(1/0.07) (a temperature of
0.07) and clips s at 100 (t_max = log 100) "to prevent scaling the logits by more than 100,
which we found necessary to prevent training instability". Clipping t in the forward pass
gives the logits of the paper's in-place clamp, as a pure function (above t_max t gets no
gradient).

Pure functions of arrays: no config, no model.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

INIT_LOGIT_SCALE = math.log(1.0 / 0.07)  # t at initialisation: temperature 0.07
MAX_LOGIT_SCALE = math.log(100.0)  # s = exp(t) is at most 100
NORM_EPS = 1e-12  # as torch.nn.functional.normalize: a zero vector stays zero


def l2_normalize(x: jax.Array, eps: float = NORM_EPS) -> jax.Array:
    """x / max(‖x‖₂, eps) along the last axis, in float32."""
    x = jnp.asarray(x, jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def logit_scale(t: jax.Array, max_logit_scale: float = MAX_LOGIT_SCALE) -> jax.Array:
    """s = exp(min(t, t_max)): the inverse temperature the logits are multiplied by."""
    return jnp.exp(jnp.minimum(jnp.asarray(t, jnp.float32), max_logit_scale))


def similarity_logits(
    image_features: jax.Array,
    text_features: jax.Array,
    t: jax.Array,
    max_logit_scale: float = MAX_LOGIT_SCALE,
) -> jax.Array:
    """L_ij = s · u_i · v_j, shape (B_images, B_texts), from unnormalised (B, D) features."""
    u = l2_normalize(image_features)  # (B, D)
    v = l2_normalize(text_features)  # (B, D)
    return logit_scale(t, max_logit_scale) * (u @ v.T)  # (B, B)


def cross_entropy_diagonal(logits: jax.Array) -> jax.Array:
    """CE(M, arange(B)) = -(1/B) Σ_i log softmax(M_i)_i: row i's target is column i."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)  # (B, B)
    return -jnp.mean(jnp.diagonal(log_probs))


def info_nce_loss(
    image_features: jax.Array,
    text_features: jax.Array,
    t: jax.Array,
    max_logit_scale: float = MAX_LOGIT_SCALE,
) -> tuple[jax.Array, dict]:
    """(½ [CE(L, arange) + CE(Lᵀ, arange)], metrics) for B matched (image, text) pairs.

    Symmetric: swapping the image and text features transposes L and gives the same loss.
    Metrics: ``loss``, ``logit_scale`` (s), and the in-batch retrieval accuracies
    ``image_to_text_acc`` (row i's largest logit is column i) and ``text_to_image_acc``.
    """
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise ValueError(
            f"info_nce_loss: image features {image_features.shape} and text features "
            f"{text_features.shape} must both be (B, D) of one shape"
        )
    logits = similarity_logits(image_features, text_features, t, max_logit_scale)  # (B, B)
    image_to_text = cross_entropy_diagonal(logits)
    text_to_image = cross_entropy_diagonal(logits.T)
    loss = 0.5 * (image_to_text + text_to_image)
    targets = jnp.arange(logits.shape[0])
    metrics = {
        "loss": loss,
        "logit_scale": logit_scale(t, max_logit_scale),
        "image_to_text_acc": jnp.mean(jnp.argmax(logits, axis=1) == targets),
        "text_to_image_acc": jnp.mean(jnp.argmax(logits, axis=0) == targets),
    }
    return loss, metrics
