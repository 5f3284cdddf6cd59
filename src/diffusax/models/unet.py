"""The DDPM U-Net (Ho et al. 2020, appendix B) in Flax NNX, NHWC.

A PixelCNN++-style U-Net: `num_res_blocks` residual blocks per resolution level, self-attention
after each residual block at the resolutions in `attn_resolutions`, a middle of
res -> attention -> res, and a decoder that concatenates one skip connection per residual block.
The timestep enters every residual block through a sinusoidal embedding and a two-layer MLP;
an optional class label is added to that embedding.

The defaults are the DDPM CIFAR-10 model (35.7M parameters), which is also the architecture of
the google/ddpm-cifar10-32 diffusers checkpoint (see `diffusax.convert.diffusers_unet`).
The parameter names mirror that checkpoint's layout one to one.

    model = UNet(in_channels=3, out_channels=3, rngs=nnx.Rngs(0))
    eps = model(x, t)                      # x: (B, 32, 32, 3), t: (B,)
    eps = model(x, t, dropout_key=key)     # training: dropout on
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from diffusax.models.layers import (
    AttentionBlock,
    Downsample,
    Dtype,
    ResBlock,
    Upsample,
    batch_timesteps,
    check_labels,
    check_nhwc,
    check_positive_int_seq,
    check_spatial_multiple,
    conv3x3,
    count_params,
    dense,
    embed_labels,
    group_norm,
    res_block_caller,
    timestep_embedding,
)

__all__ = ["UNet", "count_params"]


class Level(nnx.Module):
    """One resolution level: residual blocks, optional attention after each, optional resampler."""

    def __init__(self, res_blocks: list, attn_blocks: list, resample: nnx.Module | None):
        self.res_blocks = nnx.List(res_blocks)
        self.attn_blocks = nnx.List(attn_blocks)  # empty, or one per residual block
        self.resample = resample


class UNet(nnx.Module):
    """DDPM U-Net: eps_theta(x_t, t[, y]).

    Args:
      in_channels, out_channels: image channels in and out.
      ch: base channel count; level i has ch * ch_mult[i] channels.
      ch_mult: channel multiplier per level; there are len(ch_mult) - 1 downsamplings.
      num_res_blocks: residual blocks per level in the encoder (the decoder has one more).
      attn_resolutions: feature-map sizes (at input size `resolution`) that get self-attention.
      resolution: the nominal input size, used only to place attention levels.
      dropout: dropout rate inside residual blocks (active only when a dropout_key is passed).
      num_classes: if set, a label embedding of num_classes + 1 rows is added to the timestep
        embedding; row `num_classes` is the null label used for classifier-free guidance.
      num_heads: attention heads; `head_dim`, when given, overrides it with
        heads = channels // head_dim at every attention layer.
      norm_groups, norm_eps: GroupNorm settings.
      flip_sin_to_cos, freq_shift: sinusoidal timestep embedding convention
        (see `layers.timestep_embedding`).
      downsample_padding: "asymmetric" (DDPM / TF "SAME", the google/ddpm-* checkpoints) or
        "symmetric" (diffusers' default).
      guidance_embed_dim: if > 0, the network also takes a guidance scale w (B,): the
        sin/cos features of 1000·w (this width) pass through a bias-free linear layer into the
        timestep features, before the timestep MLP (LCM's w-conditioned student; diffusers'
        `time_cond_proj_dim`). The layer starts at zero, so a student built from a teacher
        begins as the teacher.
      remat: rematerialise residual blocks in the backward pass (saves activation memory).
      dtype: computation dtype (e.g. jnp.bfloat16); parameters stay float32. Output is float32.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        resolution: int = 32,
        dropout: float = 0.1,
        num_classes: int | None = None,
        num_heads: int = 1,
        head_dim: int | None = None,
        norm_groups: int = 32,
        norm_eps: float = 1e-6,
        flip_sin_to_cos: bool = False,
        freq_shift: float = 1,
        downsample_padding: str = "asymmetric",
        guidance_embed_dim: int = 0,
        remat: bool = False,
        dtype: Dtype = None,
        rngs: nnx.Rngs,
    ):
        ch_mult = tuple(ch_mult)
        attn_resolutions = tuple(attn_resolutions)
        _check_config(
            in_channels=in_channels,
            out_channels=out_channels,
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=num_res_blocks,
            attn_resolutions=attn_resolutions,
            resolution=resolution,
            dropout=dropout,
            num_classes=num_classes,
            num_heads=num_heads,
            head_dim=head_dim,
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.ch = ch
        self.num_levels = len(ch_mult)
        self.num_classes = num_classes
        self.flip_sin_to_cos = flip_sin_to_cos
        self.freq_shift = freq_shift
        self.remat = remat
        temb_dim = 4 * ch

        def heads(channels: int) -> int:
            return channels // head_dim if head_dim is not None else num_heads

        # One-pass GroupNorm statistics: faster, and exact enough for a denoiser's activations.
        norm = {
            "norm_groups": norm_groups,
            "norm_eps": norm_eps,
            "norm_fast_variance": True,
            "dtype": dtype,
            "rngs": rngs,
        }

        def res_block(c_in: int, c_out: int) -> ResBlock:
            return ResBlock(c_in, c_out, temb_dim=temb_dim, dropout=dropout, **norm)

        def attn_block(c: int) -> AttentionBlock:
            return AttentionBlock(c, num_heads=heads(c), **norm)

        self.conv_in = conv3x3(in_channels, ch, dtype=dtype, rngs=rngs)
        self.time_embed_1 = dense(ch, temb_dim, dtype=dtype, rngs=rngs)
        self.time_embed_2 = dense(temb_dim, temb_dim, dtype=dtype, rngs=rngs)
        self.class_embed = (
            nnx.Embed(num_classes + 1, temb_dim, dtype=dtype, rngs=rngs)
            if num_classes is not None
            else None
        )
        self.guidance_embed_dim = guidance_embed_dim
        self.guidance_proj = (
            nnx.Linear(
                guidance_embed_dim,
                ch,
                use_bias=False,
                kernel_init=nnx.initializers.zeros_init(),
                dtype=dtype,
                rngs=rngs,
            )
            if guidance_embed_dim
            else None
        )

        # Encoder. `skip_channels` records the channels of each activation pushed on the skip
        # stack, so the decoder's concatenations get the right input widths.
        c_cur, skip_channels, down = ch, [ch], []
        for level, mult in enumerate(ch_mult):
            c_out = ch * mult
            use_attn = resolution // 2**level in attn_resolutions
            res_blocks, attn_blocks = [], []
            for _ in range(num_res_blocks):
                res_blocks.append(res_block(c_cur, c_out))
                c_cur = c_out
                if use_attn:
                    attn_blocks.append(attn_block(c_cur))
                skip_channels.append(c_cur)
            resample = None
            if level != self.num_levels - 1:
                resample = Downsample(c_cur, padding=downsample_padding, dtype=dtype, rngs=rngs)
                skip_channels.append(c_cur)
            down.append(Level(res_blocks, attn_blocks, resample))
        self.down_levels = nnx.List(down)

        self.mid_res_1 = res_block(c_cur, c_cur)
        self.mid_attn = attn_block(c_cur)
        self.mid_res_2 = res_block(c_cur, c_cur)

        # Decoder, deepest level first.
        up = []
        for level in reversed(range(self.num_levels)):
            c_out = ch * ch_mult[level]
            use_attn = resolution // 2**level in attn_resolutions
            res_blocks, attn_blocks = [], []
            for _ in range(num_res_blocks + 1):
                res_blocks.append(res_block(c_cur + skip_channels.pop(), c_out))
                c_cur = c_out
                if use_attn:
                    attn_blocks.append(attn_block(c_cur))
            resample = Upsample(c_cur, dtype=dtype, rngs=rngs) if level != 0 else None
            up.append(Level(res_blocks, attn_blocks, resample))
        self.up_levels = nnx.List(up)
        assert not skip_channels, "every skip connection is consumed"

        self.norm_out = group_norm(
            c_cur, groups=norm_groups, eps=norm_eps, fast_variance=True, dtype=dtype, rngs=rngs
        )
        self.conv_out = conv3x3(c_cur, out_channels, dtype=dtype, rngs=rngs, zero=True)

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        y: jax.Array | None = None,
        *,
        guidance: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """x: (B, H, W, in_channels), t: (B,) or scalar, y: (B,) int labels or None, or
        (B, num_classes + 1) float label weights (`layers.embed_labels`). guidance: (B,) or
        scalar w, for a U-Net built with `guidance_embed_dim` (None: no guidance term, as
        diffusers' `timestep_cond=None`).

        Returns (B, H, W, out_channels) float32. Dropout is applied only when `dropout_key` is
        given. With `num_classes` set, y=None means the null label for every example.
        """
        h, skips, res, _ = self._encode(x, t, y, guidance, dropout_key)
        for level in self.up_levels:
            for i, block in enumerate(level.res_blocks):
                h = jnp.concatenate([h, skips.pop()], axis=-1)  # (B, h, w, c + c_skip)
                h = res(block, h)
                if len(level.attn_blocks):
                    h = level.attn_blocks[i](h)
            if level.resample is not None:
                h = level.resample(h)  # (B, 2h, 2w, c)

        h = self.conv_out(nnx.silu(self.norm_out(h)))  # (B, H, W, out_channels)
        return h.astype(jnp.float32)

    def _encode(self, x, t, y, guidance, dropout_key):
        """The down path and the middle: (h after the middle, the skips, the residual-block
        caller with the time embedding, each level's output before its downsample)."""
        t, y = self._check_inputs(x, t, y)
        temb = timestep_embedding(
            t, self.ch, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift
        )  # (B, ch)
        if guidance is not None:
            temb = temb + self._guidance_features(guidance, x.shape[0])  # (B, ch)
        temb = self.time_embed_2(nnx.silu(self.time_embed_1(temb)))  # (B, 4ch)
        if self.class_embed is not None:
            temb = temb + embed_labels(self.class_embed, y)  # (B, 4ch)

        res = res_block_caller(temb, dropout_key, remat=self.remat)
        h = self.conv_in(x)  # (B, H, W, ch)
        skips, level_outputs = [h], []
        for level in self.down_levels:
            for i, block in enumerate(level.res_blocks):
                h = res(block, h)  # (B, H / 2^level, W / 2^level, ch * mult)
                if len(level.attn_blocks):
                    h = level.attn_blocks[i](h)
                skips.append(h)
            level_outputs.append(h)
            if level.resample is not None:
                h = level.resample(h)  # (B, H / 2^(level+1), W / 2^(level+1), ch * mult)
                skips.append(h)

        h = res(self.mid_res_1, h)
        h = self.mid_attn(h)
        h = res(self.mid_res_2, h)
        return h, skips, res, level_outputs

    def encoder_features(self, x, t, y=None) -> list[jax.Array]:
        """[level 0, ..., level L-1, middle] float32 activations of the down path (each level's
        last block, before its downsample) and of the middle, as ``__call__`` computes them
        (no dropout): level l is (B, H/2^l, W/2^l, ch·ch_mult[l]), the middle as the last level.
        y=None is the null label. ADD's discriminator reads these (``models.add_discriminator``)."""
        h, _, _, level_outputs = self._encode(x, t, y, None, None)
        return [f.astype(jnp.float32) for f in (*level_outputs, h)]

    def _guidance_features(self, w, batch: int) -> jax.Array:
        if self.guidance_proj is None:
            raise ValueError("guidance given but the U-Net was built with guidance_embed_dim=0")
        w = batch_timesteps(jnp.asarray(w, jnp.float32), batch)
        # LCM's embedding of w: the sinusoidal features of 1000·w, sin first, freq_shift 1.
        emb = timestep_embedding(
            1000.0 * w, self.guidance_embed_dim, flip_sin_to_cos=False, freq_shift=1
        )
        return self.guidance_proj(emb)  # (B, ch)

    def _check_inputs(self, x, t, y):
        """Shape checks at trace time, so a wrong input fails before compilation."""
        b, h, w, _ = check_nhwc(x, self.in_channels, "U-Net")
        levels = self.num_levels
        check_spatial_multiple(h, w, 2 ** (levels - 1), f"2**(len(ch_mult)-1) for {levels} levels")
        t = batch_timesteps(t, b)
        if self.num_classes is None:
            if y is not None:
                raise ValueError("labels y given but the U-Net was built with num_classes=None")
            return t, None
        if y is None:
            return t, jnp.full((b,), self.num_classes, jnp.int32)  # the null label
        return t, check_labels(y, b, self.num_classes, "U-Net")


def _check_config(
    *,
    in_channels,
    out_channels,
    ch,
    ch_mult,
    num_res_blocks,
    attn_resolutions,
    resolution,
    dropout,
    num_classes,
    num_heads,
    head_dim,
):
    """Reject a configuration that cannot build a DDPM U-Net, naming the argument."""
    for name, value in [
        ("in_channels", in_channels),
        ("out_channels", out_channels),
        ("ch", ch),
        ("num_res_blocks", num_res_blocks),
        ("resolution", resolution),
        ("num_heads", num_heads),
    ]:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    check_positive_int_seq("ch_mult", ch_mult)
    factor = 2 ** (len(ch_mult) - 1)
    if resolution % factor:
        raise ValueError(
            f"resolution={resolution} must be a multiple of 2**(len(ch_mult)-1)={factor}"
        )
    level_sizes = [resolution // 2**i for i in range(len(ch_mult))]
    unknown = [r for r in attn_resolutions if r not in level_sizes]
    if unknown:
        raise ValueError(
            f"attn_resolutions {unknown} match no level; at resolution={resolution} the levels "
            f"are {level_sizes}"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be None or a positive int, got {num_classes!r}")
    if head_dim is not None:
        for c in {ch * m for m in ch_mult}:
            if c % head_dim:
                raise ValueError(f"head_dim={head_dim} does not divide level width {c}")
