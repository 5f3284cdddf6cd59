"""The KL autoencoder of latent diffusion (Rombach et al. 2022) in Flax NNX, NHWC.

The architecture of Stable Diffusion's `AutoencoderKL` (diffusers), whose public weights
(stabilityai/sd-vae-ft-ema, sd-vae-ft-mse) DiT uses; see `diffusax.convert.diffusers_vae`.

    encoder: conv_in -> per level: ResBlocks [-> stride-2 conv] -> mid (res, attention, res)
             -> GN -> SiLU -> conv_out (2 * latent_channels) -> quant_conv (1x1)
             = the moments (mean, log-variance) of q(z | x), a diagonal Gaussian
    decoder: post_quant_conv (1x1) -> conv_in -> mid -> per level, deepest first:
             ResBlocks (one more than the encoder) [-> upsample x2] -> GN -> SiLU -> conv_out

Images are in [-1, 1]; an 8x smaller latent for the SD config (f = 2**(levels - 1)). The
diffusion model sees *scaled* latents z_s = scaling_factor * (z - shift_factor), which have
roughly unit variance (Rombach et al. 2022, sec. 4.3.2 and D.1):

    vae = AutoencoderKL(rngs=nnx.Rngs(0))                 # the SD VAE, or load_diffusers_vae(...)
    z_s = vae.encode_latents(x, key)                       # x: (B, H, W, 3) -> (B, H/8, W/8, 4)
    x = vae.decode_latents(z_s)                            # (B, H, W, 3)

For latent datasets, store the moments of the scaled latents once and sample each step:

    q = vae.latent_distribution(x)                         # DiagonalGaussian over z_s
    store(q.mean, q.std)                                   # per example, (H/8, W/8, 4) each
    z_s = DiagonalGaussian.from_mean_std(mean, std).sample(key)   # at training time

Used functionally (frozen), like every model here:

    graphdef, state = nnx.split(vae)
    encode = jax.jit(lambda state, x, key: nnx.merge(graphdef, state).encode_latents(x, key))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from diffusax.models.layers import (
    AttentionBlock,
    Downsample,
    Dtype,
    ResBlock,
    Upsample,
    check_nhwc,
    check_positive_int_seq,
    check_positive_ints,
    check_spatial_multiple,
    conv3x3,
    count_params,
    default_init,
    group_norm,
)

__all__ = [
    "AutoencoderKL",
    "DiagonalGaussian",
    "count_params",
    "scale_latents",
    "unscale_latents",
]

# The log-variance range of LDM's DiagonalGaussianDistribution: std in [e^-15, e^10].
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
# GroupNorm epsilon of every norm in the SD autoencoder (fixed in diffusers, not a config field).
NORM_EPS = 1e-6


def _sum_per_example(x: jax.Array) -> jax.Array:
    """Sum over every axis but the first: (B, ...) -> (B,)."""
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


class DiagonalGaussian(NamedTuple):
    """N(mean, exp(logvar)) per element; a pytree, so it can leave a jitted function.

    `kl`, `nll` sum over every axis but the batch axis, as LDM does.
    """

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        """Split (..., 2C) moments into mean and log-variance (..., C) on the channel axis, with

        logvar = clip(logvar, -30, 20)   (LDM's range: keeps exp(logvar) finite in float32).
        """
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

    @classmethod
    def from_mean_std(cls, mean: jax.Array, std: jax.Array) -> DiagonalGaussian:
        """The Gaussian with this mean and standard deviation: logvar = 2 log(std).

        Not clipped: a std of 0 (e.g. underflow in a float16 shard) is a point mass at the mean.
        """
        return cls(jnp.asarray(mean), 2.0 * jnp.log(jnp.asarray(std)))

    @property
    def std(self) -> jax.Array:
        """σ = exp(logvar / 2)."""
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        """σ² = exp(logvar)."""
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """z = mean + σ ε with ε ~ N(0, I) drawn from `key` (the reparametrisation)."""
        eps = jax.random.normal(key, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> jax.Array:
        """The most likely value: the mean."""
        return self.mean

    def affine(self, scale: float, shift: float = 0.0) -> DiagonalGaussian:
        """The distribution of scale * (z - shift):

        mean' = scale (mean - shift),   logvar' = logvar + 2 log|scale|.
        """
        logvar = self.logvar + 2.0 * jnp.log(jnp.abs(scale))
        return DiagonalGaussian(scale_latents(self.mean, scale, shift), logvar)

    def kl(self, other: DiagonalGaussian | None = None) -> jax.Array:
        """KL(self || other) per example, (B,); `other=None` is the standard normal:

        KL = 1/2 Σ [ (μ - μ')² / σ'² + σ² / σ'² - 1 - log σ² + log σ'² ].
        """
        if other is None:
            other = DiagonalGaussian(jnp.zeros_like(self.mean), jnp.zeros_like(self.logvar))
        terms = (
            (self.mean - other.mean) ** 2 / other.var
            + self.var / other.var
            - 1.0
            - self.logvar
            + other.logvar
        )
        return 0.5 * _sum_per_example(terms)

    def nll(self, x: jax.Array) -> jax.Array:
        """Negative log-likelihood of x per example, (B,):

        -log p(x) = 1/2 Σ [ log 2π + log σ² + (x - μ)² / σ² ].
        """
        terms = jnp.log(2.0 * jnp.pi) + self.logvar + (x - self.mean) ** 2 / self.var
        return 0.5 * _sum_per_example(terms)


def scale_latents(z: jax.Array, scaling_factor: float, shift_factor: float = 0.0) -> jax.Array:
    """Latents as the diffusion model sees them: z_s = scaling_factor * (z - shift_factor)."""
    return scaling_factor * (z - shift_factor)


def unscale_latents(z_s: jax.Array, scaling_factor: float, shift_factor: float = 0.0) -> jax.Array:
    """The inverse of `scale_latents`: z = z_s / scaling_factor + shift_factor."""
    return z_s / scaling_factor + shift_factor


class MidBlock(nnx.Module):
    """ResBlock -> self-attention (one head, optional) -> ResBlock, at constant width."""

    def __init__(self, channels: int, *, attention: bool, norm_groups: int, dtype, rngs):
        norm = {"norm_groups": norm_groups, "norm_eps": NORM_EPS, "dtype": dtype, "rngs": rngs}
        self.res_1 = ResBlock(channels, channels, temb_dim=None, **norm)
        self.attn = AttentionBlock(channels, num_heads=1, **norm) if attention else None
        self.res_2 = ResBlock(channels, channels, temb_dim=None, **norm)

    def __call__(self, h: jax.Array) -> jax.Array:
        h = self.res_1(h)
        if self.attn is not None:
            h = self.attn(h)
        return self.res_2(h)


class Stage(nnx.Module):
    """One resolution level: unconditioned ResBlocks, then an optional resampler."""

    def __init__(self, resnets: list[ResBlock], resample: nnx.Module | None):
        self.resnets = nnx.List(resnets)
        self.resample = resample

    def __call__(self, h: jax.Array) -> jax.Array:
        for block in self.resnets:
            h = block(h)
        return h if self.resample is None else self.resample(h)


def _res_stage(c_in: int, c_out: int, num: int, *, norm_groups: int, dtype, rngs):
    """`num` ResBlocks, the first taking c_in channels to c_out."""
    norm = {"norm_groups": norm_groups, "norm_eps": NORM_EPS, "dtype": dtype, "rngs": rngs}
    return [ResBlock(c_in if i == 0 else c_out, c_out, temb_dim=None, **norm) for i in range(num)]


class Encoder(nnx.Module):
    """x (B, H, W, in) -> moments (B, H/f, W/f, 2 * latent) before quant_conv."""

    def __init__(
        self,
        *,
        in_channels: int,
        latent_channels: int,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        norm_groups: int,
        mid_attention: bool,
        dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        chans = block_out_channels
        kw = {"norm_groups": norm_groups, "dtype": dtype, "rngs": rngs}
        self.conv_in = conv3x3(in_channels, chans[0], dtype=dtype, rngs=rngs)
        stages, c_cur = [], chans[0]
        for level, c_out in enumerate(chans):
            resnets = _res_stage(c_cur, c_out, layers_per_block, **kw)
            last = level == len(chans) - 1
            # diffusers' VAE pads (0, 1) on each spatial axis before its stride-2 conv.
            down = None if last else Downsample(c_out, padding="asymmetric", dtype=dtype, rngs=rngs)
            stages.append(Stage(resnets, down))
            c_cur = c_out
        self.down_blocks = nnx.List(stages)
        self.mid = MidBlock(c_cur, attention=mid_attention, **kw)
        self.norm_out = group_norm(c_cur, groups=norm_groups, eps=NORM_EPS, dtype=dtype, rngs=rngs)
        self.conv_out = conv3x3(c_cur, 2 * latent_channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_in(x)  # (B, H, W, c0)
        for stage in self.down_blocks:
            h = stage(h)  # (B, H / 2^(level+1), W / 2^(level+1), c_level); no halving at the last
        h = self.mid(h)  # (B, H/f, W/f, c_last)
        return self.conv_out(nnx.silu(self.norm_out(h)))  # (B, H/f, W/f, 2 * latent)


class Decoder(nnx.Module):
    """z (B, h, w, latent) after post_quant_conv -> image (B, f h, f w, out)."""

    def __init__(
        self,
        *,
        out_channels: int,
        latent_channels: int,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        norm_groups: int,
        mid_attention: bool,
        dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        chans = tuple(reversed(block_out_channels))  # deepest level first
        kw = {"norm_groups": norm_groups, "dtype": dtype, "rngs": rngs}
        self.conv_in = conv3x3(latent_channels, chans[0], dtype=dtype, rngs=rngs)
        self.mid = MidBlock(chans[0], attention=mid_attention, **kw)
        stages, c_cur = [], chans[0]
        for i, c_out in enumerate(chans):
            resnets = _res_stage(c_cur, c_out, layers_per_block + 1, **kw)
            last = i == len(chans) - 1
            up = None if last else Upsample(c_out, dtype=dtype, rngs=rngs)
            stages.append(Stage(resnets, up))
            c_cur = c_out
        self.up_blocks = nnx.List(stages)
        self.norm_out = group_norm(c_cur, groups=norm_groups, eps=NORM_EPS, dtype=dtype, rngs=rngs)
        self.conv_out = conv3x3(c_cur, out_channels, dtype=dtype, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        h = self.conv_in(z)  # (B, h, w, c_last)
        h = self.mid(h)
        for stage in self.up_blocks:
            h = stage(h)  # (B, 2h, 2w, c) per stage but the last
        return self.conv_out(nnx.silu(self.norm_out(h)))  # (B, f h, f w, out)


def _conv1x1(channels: int, *, dtype, rngs) -> nnx.Conv:
    return nnx.Conv(channels, channels, (1, 1), kernel_init=default_init, dtype=dtype, rngs=rngs)


class AutoencoderKL(nnx.Module):
    """KL-regularised autoencoder; the defaults are Stable Diffusion's VAE (83.65M parameters).

    Args (named as in diffusers' AutoencoderKL config):
      in_channels, out_channels: image channels.
      block_out_channels: width of each level; there are len - 1 downsamplings, so latents
        are f = 2**(len - 1) times smaller than images on each side.
      layers_per_block: ResBlocks per level in the encoder (the decoder has one more).
      latent_channels: channels of z.
      norm_num_groups: GroupNorm groups; must divide every width.
      scaling_factor, shift_factor: z_s = scaling_factor * (z - shift_factor) is what the
        diffusion model sees (0.18215 and 0 for SD 1.x/2.x and the sd-vae-ft-* weights).
      sample_size: the nominal image size (recorded only; any multiple of f works).
      use_quant_conv, use_post_quant_conv: the 1x1 convs around the latent (SD: both on).
      mid_block_add_attention: self-attention in the middle blocks (SD: on).
      dtype: computation dtype (e.g. jnp.bfloat16); parameters stay float32, outputs are float32.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        out_channels: int = 3,
        block_out_channels: Sequence[int] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        scaling_factor: float = 0.18215,
        shift_factor: float = 0.0,
        sample_size: int = 256,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
        dtype: Dtype = None,
        rngs: nnx.Rngs,
    ):
        block_out_channels = tuple(block_out_channels)
        _check_config(
            in_channels=in_channels,
            out_channels=out_channels,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            sample_size=sample_size,
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.latent_channels = latent_channels
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor)
        self.sample_size = sample_size
        self.downsampling_factor = 2 ** (len(block_out_channels) - 1)
        common = {
            "latent_channels": latent_channels,
            "block_out_channels": block_out_channels,
            "layers_per_block": layers_per_block,
            "norm_groups": norm_num_groups,
            "mid_attention": mid_block_add_attention,
            "dtype": dtype,
            "rngs": rngs,
        }
        self.encoder = Encoder(in_channels=in_channels, **common)
        self.quant_conv = (
            _conv1x1(2 * latent_channels, dtype=dtype, rngs=rngs) if use_quant_conv else None
        )
        self.post_quant_conv = (
            _conv1x1(latent_channels, dtype=dtype, rngs=rngs) if use_post_quant_conv else None
        )
        self.decoder = Decoder(out_channels=out_channels, **common)

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int]:
        """(H, W, C) of an image -> (H/f, W/f, latent_channels) of its latent."""
        height, width, _ = image_shape
        f = self.downsampling_factor
        return height // f, width // f, self.latent_channels

    # ------------------------------------------------------------------ unscaled z

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """q(z | x) for images x (B, H, W, in_channels) in [-1, 1]; float32 moments."""
        self._check_image(x)
        moments = self.encoder(x)  # (B, H/f, W/f, 2 * latent)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

    def decode(self, z: jax.Array) -> jax.Array:
        """Images (B, f h, f w, out_channels), float32, from unscaled latents z (B, h, w, C)."""
        self._check_latent(z)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)  # (B, f h, f w, out)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Reconstruction decode(z): z sampled from q(z | x) with `key`, else its mean."""
        posterior = self.encode(x)
        return self.decode(posterior.mode() if key is None else posterior.sample(key))

    # ------------------------------------------------------------------ scaled latents

    def latent_distribution(self, x: jax.Array) -> DiagonalGaussian:
        """q(z_s | x) for the scaled latents z_s = scaling_factor * (z - shift_factor)."""
        return self.encode(x).affine(self.scaling_factor, self.shift_factor)

    def encode_latents(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Scaled latents of images x: a sample of q(z_s | x) with `key`, else its mean."""
        q = self.latent_distribution(x)
        return q.mode() if key is None else q.sample(key)  # (B, H/f, W/f, latent)

    def decode_latents(self, z_s: jax.Array) -> jax.Array:
        """Images from scaled latents: decode(z_s / scaling_factor + shift_factor)."""
        return self.decode(unscale_latents(z_s, self.scaling_factor, self.shift_factor))

    # ------------------------------------------------------------------ checks

    def _check_image(self, x: jax.Array) -> None:
        """Shape checks at trace time, so a wrong input fails before compilation."""
        _, h, w, _ = check_nhwc(x, self.in_channels, "autoencoder")
        check_spatial_multiple(
            h,
            w,
            self.downsampling_factor,
            "2**(len(block_out_channels)-1)",
            factor_name="the downsampling factor ",
        )

    def _check_latent(self, z: jax.Array) -> None:
        if z.ndim != 4 or z.shape[-1] != self.latent_channels or 0 in z.shape[1:3]:
            raise ValueError(
                f"latents must be NHWC (B, h, w, latent_channels={self.latent_channels}), "
                f"got shape {z.shape}"
            )


def _check_config(
    *,
    in_channels,
    out_channels,
    block_out_channels,
    layers_per_block,
    latent_channels,
    norm_num_groups,
    scaling_factor,
    shift_factor,
    sample_size,
):
    """Reject a configuration that cannot build the autoencoder, naming the argument."""
    check_positive_ints(
        in_channels=in_channels,
        out_channels=out_channels,
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
    )
    check_positive_int_seq("block_out_channels", block_out_channels)
    bad = [c for c in block_out_channels if c % norm_num_groups]
    if bad:
        raise ValueError(
            f"norm_num_groups={norm_num_groups} must divide every block_out_channels entry; "
            f"it does not divide {bad}"
        )
    if not (isinstance(scaling_factor, int | float) and 0 < scaling_factor < float("inf")):
        raise ValueError(f"scaling_factor must be a positive finite number, got {scaling_factor!r}")
    if not isinstance(shift_factor, int | float) or shift_factor != shift_factor:
        raise ValueError(f"shift_factor must be a number, got {shift_factor!r}")
    factor = 2 ** (len(block_out_channels) - 1)
    if sample_size % factor:
        raise ValueError(
            f"sample_size={sample_size} must be a multiple of 2**(len(block_out_channels)-1)="
            f"{factor}"
        )
