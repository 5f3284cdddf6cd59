"""ADD's discriminator (Sauer et al. 2023, after StyleGAN-T): a frozen feature network and
trainable heads, one per feature level, each conditioned on the class by a projection
(Miyato & Koyama 2018).

    features  [φ_1(x), ..., φ_K(x)]   = ``unet_encoder_features``: the frozen U-Net's down path,
                                        one map per level (its last block, before the
                                        downsample), and its middle
    head k    h    = LeakyReLU_0.2(GN(conv3x3(φ_k)))            (B, h_k, w_k, width)
              D_k  = conv1x1(h) + ⟨e(y), h⟩ / √width             (B, h_k, w_k) logits

e(y) is a learned class embedding (none for an unconditional discriminator). The heads see the
features only, so the R1 penalty can be taken with respect to them (``methods.add``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from diffusax.models.layers import group_norm

__all__ = ["FeatureHeads", "ProjectionHead", "unet_encoder_features", "unet_feature_channels"]

LEAKY_SLOPE = 0.2


def unet_encoder_features(unet, x, t, y=None) -> list[jax.Array]:
    """[level 0, ..., level L-1, middle] activations of ``diffusax.models.unet.UNet``'s encoder
    at ``x`` (B, H, W, C), timestep ``t`` and label ``y`` (None: the null label): its
    ``encoder_features``, the very activations its ``__call__`` computes."""
    return unet.encoder_features(x, t, y)


def unet_feature_channels(ch: int, ch_mult) -> tuple[int, ...]:
    """The channels of ``unet_encoder_features``' maps: ch·m per level, then the middle's."""
    per_level = tuple(ch * m for m in ch_mult)
    return (*per_level, per_level[-1])


class ProjectionHead(nnx.Module):
    """One feature map (B, h, w, C) and labels (B,) -> logits (B, h, w)."""

    def __init__(self, c_in: int, width: int, num_classes, *, norm_groups: int, rngs: nnx.Rngs):
        self.conv = nnx.Conv(c_in, width, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.norm = group_norm(width, groups=norm_groups, eps=1e-5, dtype=None, rngs=rngs)
        self.out = nnx.Conv(width, 1, (1, 1), rngs=rngs)
        self.width = width
        self.embed = nnx.Embed(num_classes, width, rngs=rngs) if num_classes else None

    def __call__(self, f: jax.Array, y: jax.Array | None) -> jax.Array:
        h = nnx.leaky_relu(self.norm(self.conv(f)), LEAKY_SLOPE)  # (B, h, w, width)
        logits = self.out(h)[..., 0]  # (B, h, w)
        if self.embed is not None:
            e = self.embed(y)  # (B, width)
            logits = logits + jnp.einsum("bhwc,bc->bhw", h, e) / math.sqrt(self.width)
        return logits.astype(jnp.float32)


class FeatureHeads(nnx.Module):
    """The trainable part of ADD's discriminator: one ``ProjectionHead`` per feature map.

    Args:
      feature_channels: the channels of each feature map, in order.
      width: each head's hidden channels (GroupNorm over ``norm_groups`` groups).
      num_classes: labels 0..num_classes-1 are projected (None or 0: unconditional heads).
    """

    def __init__(
        self,
        feature_channels,
        *,
        width: int = 64,
        num_classes=None,
        norm_groups: int = 8,
        rngs: nnx.Rngs,
    ):
        if width % norm_groups:
            raise ValueError(f"add heads: norm_groups={norm_groups} must divide width={width}")
        self.heads = nnx.List(
            [
                ProjectionHead(c, width, num_classes, norm_groups=norm_groups, rngs=rngs)
                for c in feature_channels
            ]
        )

    def __call__(self, features, y=None) -> list[jax.Array]:
        if len(features) != len(self.heads):
            raise ValueError(f"add heads: {len(self.heads)} heads but {len(features)} feature maps")
        return [head(f, y) for head, f in zip(self.heads, features, strict=True)]
