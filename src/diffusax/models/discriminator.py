"""The PatchGAN discriminator of taming-transformers / latent diffusion, in Flax NNX, NHWC.

`NLayerDiscriminator` (Isola et al. 2017's PatchGAN, as Esser et al. 2021 and Rombach et al.
2022 use it to train their autoencoders): every output logit judges one receptive-field patch
of the image as real or generated.

    conv 4x4 s2 (ndf)                       -> LeakyReLU(0.2)
    n_layers - 1 x: conv 4x4 s2 (ndf·m_n)   -> norm -> LeakyReLU(0.2),  m_n = min(2^n, 8)
    conv 4x4 s1 (ndf·min(2^n_layers, 8))    -> norm -> LeakyReLU(0.2)
    conv 4x4 s1 (1)                         =  patch logits

Every convolution pads one pixel each side, so a stride-2 conv halves an even side and a
stride-1 conv shrinks it by one: an (H, W) image gives (H/2^n_layers - 2, W/2^n_layers - 2)
logits (LDM's 256x256 inputs with n_layers=3: 30x30 logits; 8x8 digits with n_layers=1: 2x2).

Normalisation. taming / LDM use BatchNorm. Here the norm is GroupNorm (or none): BatchNorm's
running mean and variance are `nnx.BatchStat` state updated by every training forward pass,
but the train state of this project carries parameters (`nnx.Param`) only and every module is
used as a pure function of them, so running statistics would never be stored or updated (and
evaluation would use their initial values). BatchNorm in training mode also mixes the examples
of a batch, and LDM feeds real and reconstructed batches separately, so each is normalised by
its own statistics. GroupNorm normalises each example on its own and has no state.

Initialisation as taming's `weights_init`: conv kernels ~ N(0, 0.02²), biases 0; the norms'
scales start at 1 (taming: N(1, 0.02²) for BatchNorm), offsets at 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from diffusax.models.layers import Dtype, group_norm

__all__ = ["NLayerDiscriminator", "logits_shape"]

LEAKY_SLOPE = 0.2
KERNEL_SIZE = 4
MAX_CHANNEL_MULT = 8
NORMS = ("group", "none")
conv_init = nnx.initializers.normal(stddev=0.02)


def logits_shape(image_hw: tuple[int, int], n_layers: int) -> tuple[int, int]:
    """The (h, w) of the patch-logit map for an (H, W) image: (H/2^n - 2, W/2^n - 2).

    Raises ValueError when the image is too small (each side must be a multiple of 2^n_layers
    and at least 3 · 2^n_layers, so that the map has at least one logit) for n_layers.
    """
    f = 2**n_layers
    out = []
    for side in image_hw:
        if side % f or side // f < 3:
            raise ValueError(
                f"the discriminator with n_layers={n_layers} needs image sides that are "
                f"multiples of {f} and at least {3 * f}; got {tuple(image_hw)}"
            )
        out.append(side // f - 2)
    return tuple(out)


def _conv(c_in: int, c_out: int, stride: int, *, bias: bool, dtype: Dtype, rngs) -> nnx.Conv:
    """4x4 convolution padded by one pixel each side, N(0, 0.02²) kernel."""
    return nnx.Conv(
        c_in,
        c_out,
        (KERNEL_SIZE, KERNEL_SIZE),
        strides=stride,
        padding=((1, 1), (1, 1)),
        use_bias=bias,
        kernel_init=conv_init,
        dtype=dtype,
        rngs=rngs,
    )


class NormConvBlock(nnx.Module):
    """conv 4x4 (stride 2 or 1) -> norm -> LeakyReLU(0.2)."""

    def __init__(self, c_in, c_out, stride, *, norm, norm_groups, dtype, rngs):
        # As taming: no conv bias in front of a norm; a bias where there is no norm.
        self.conv = _conv(c_in, c_out, stride, bias=norm == "none", dtype=dtype, rngs=rngs)
        self.norm = (
            group_norm(c_out, groups=norm_groups, eps=1e-5, dtype=dtype, rngs=rngs)
            if norm == "group"
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv(x)
        if self.norm is not None:
            h = self.norm(h)
        return nnx.leaky_relu(h, LEAKY_SLOPE)


class NLayerDiscriminator(nnx.Module):
    """PatchGAN discriminator: images (B, H, W, in_channels) -> logits (B, h, w, 1).

    Args:
      in_channels: image channels.
      ndf: channels of the first convolution; each further stride-2 layer doubles them, up
        to 8 · ndf.
      n_layers: stride-2 convolutions (taming / LDM: 3); the patch (receptive field) of one
        logit is 70x70 pixels for 3, 34x34 for 2, 16x16 for 1.
      norm: "group" (GroupNorm, the default; see the module docstring for why not BatchNorm)
        or "none".
      norm_groups: GroupNorm groups; must divide every normalised width ndf · min(2^n, 8),
        n = 1 .. n_layers.
      dtype: computation dtype; parameters are float32 and the logits are returned as float32.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        ndf: int = 64,
        n_layers: int = 3,
        norm: str = "group",
        norm_groups: int = 32,
        dtype: Dtype = None,
        rngs: nnx.Rngs,
    ):
        for name, value in [("in_channels", in_channels), ("ndf", ndf), ("n_layers", n_layers)]:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"discriminator: {name} must be a positive int, got {value!r}")
        if norm not in NORMS:
            raise ValueError(f"discriminator: norm must be one of {NORMS}, got {norm!r}")
        mults = [min(2**n, MAX_CHANNEL_MULT) for n in range(n_layers + 1)]  # m_0 = 1 .. m_n
        if norm == "group":
            bad = [ndf * m for m in mults[1:] if (ndf * m) % norm_groups]
            if not isinstance(norm_groups, int) or norm_groups < 1 or bad:
                raise ValueError(
                    f"discriminator: norm_groups={norm_groups!r} must be a positive int dividing "
                    f"every normalised width {[ndf * m for m in mults[1:]]}; it does not divide "
                    f"{bad}"
                )
        self.in_channels = in_channels
        self.n_layers = n_layers
        kw = {"norm": norm, "norm_groups": norm_groups, "dtype": dtype, "rngs": rngs}
        self.conv_in = _conv(in_channels, ndf, 2, bias=True, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List(
            [NormConvBlock(ndf * mults[n - 1], ndf * mults[n], 2, **kw) for n in range(1, n_layers)]
        )
        self.block_out = NormConvBlock(ndf * mults[n_layers - 1], ndf * mults[n_layers], 1, **kw)
        self.conv_out = _conv(ndf * mults[n_layers], 1, 1, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"discriminator: x must be NHWC (B, H, W, {self.in_channels}), got {x.shape}"
            )
        logits_shape(x.shape[1:3], self.n_layers)  # a clear error for too small an image
        h = nnx.leaky_relu(self.conv_in(x), LEAKY_SLOPE)  # (B, H/2, W/2, ndf)
        for block in self.blocks:
            h = block(h)  # (B, H/2^(n+1), W/2^(n+1), ndf·m_n)
        h = self.block_out(h)  # (B, H/2^n_layers - 1, ..., ndf·m_{n_layers})
        return self.conv_out(h).astype(jnp.float32)  # (B, H/2^n_layers - 2, ..., 1)
