"""The Stable Diffusion / LDM cross-attention U-Net (diffusers' `UNet2DConditionModel`), Flax NNX,
NHWC.

The layout of the SD v1 U-Net (Rombach et al. 2022): conv_in; a sinusoidal timestep embedding
and a two-layer MLP; per level `layers_per_block` residual blocks, each followed by a spatial
cross-attention transformer (`transformer2d.Transformer2D`) on the levels in
`attention_levels`, then a stride-2 convolution except at the last level; a middle of
res -> transformer -> res; a decoder of `layers_per_block + 1` residual blocks per level, each
taking one concatenated skip connection (and followed by a transformer where the mirrored
encoder level has one), then nearest x2 + conv except at the last level; GN -> SiLU -> conv_out.

Conditioning: the context tokens (B, L, cross_attention_dim) enter every transformer through
cross-attention, optionally with a key mask; an optional class label (`num_class_embeds`) and
an optional float vector (`pooled_dim`, diffusers' class_embed_type="projection": e.g. a pooled
text embedding, GLIDE-style) are embedded and added to the timestep embedding.

Parameter names mirror diffusers' UNet2DConditionModel (`down_blocks.0.attentions.1.
transformer_blocks.0.attn2.to_k`, `mid_block.resnets.1`, `up_blocks.2.upsamplers.0.conv`, ...);
`diffusax.convert.diffusers_unet_cond` maps them. The SD v1.x U-Net is the default:

    model = UNetCondition(in_channels=4, out_channels=4, rngs=nnx.Rngs(0))
    eps = model(z, t, context=text_tokens)     # z: (B, 64, 64, 4), text_tokens: (B, 77, 768)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from diffusax.models.layers import (
    Downsample,
    Dtype,
    ResBlock,
    Upsample,
    batch_timesteps,
    check_nhwc,
    check_positive_int_seq,
    check_positive_ints,
    check_spatial_multiple,
    conv3x3,
    count_params,
    dense,
    embed_labels,
    group_norm,
    res_block_caller,
    timestep_embedding,
)
from diffusax.models.transformer2d import Transformer2D

__all__ = ["UNetCondition", "count_params"]


def _apply_transformer(block: Transformer2D, h: jax.Array, context: jax.Array, mask):
    return block(h, context, mask)


# Rematerialised variant: activations inside the block are recomputed in the backward pass.
_apply_transformer_remat = nnx.remat(_apply_transformer)


class TimestepEmbedding(nnx.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers' TimestepEmbedding), (B, c_in) -> (B, c_out)."""

    def __init__(self, c_in: int, c_out: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.linear_1 = dense(c_in, c_out, dtype=dtype, rngs=rngs)
        self.linear_2 = dense(c_out, c_out, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(nnx.silu(self.linear_1(x)))


class Block(nnx.Module):
    """One U-Net block: diffusers' (CrossAttn)DownBlock2D, (CrossAttn)UpBlock2D or the mid block.

    `attentions` is empty or holds one transformer per residual block (the mid block: one after
    the first of its two residual blocks); `samplers` is empty or holds the down/up-sampler.
    """

    def __init__(self, resnets: list, attentions: list, samplers: list):
        self.resnets = nnx.List(resnets)
        self.attentions = nnx.List(attentions)
        self.samplers = nnx.List(samplers)


def _per_level(value, num_levels: int, name: str) -> tuple:
    """An int, or one int per level, as a tuple of one int per level."""
    values = (value,) * num_levels if isinstance(value, int) else tuple(value)
    if len(values) != num_levels or any(
        not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values
    ):
        raise ValueError(
            f"{name} must be a positive int or one per level ({num_levels}), got {value!r}"
        )
    return values


class UNetCondition(nnx.Module):
    """Cross-attention U-Net: eps_theta(x_t, t, context[, class_labels][, pooled]).

    Args:
      in_channels, out_channels: channels in and out.
      block_out_channels: channels per level; there are len(block_out_channels) - 1
        downsamplings.
      layers_per_block: residual blocks per level in the encoder (the decoder has one more).
      attention_levels: one bool per level: CrossAttn blocks there (the mid block always has a
        transformer).
      transformer_layers: BasicTransformerBlocks per transformer, an int or one per level (the
        mid block takes the last level's).
      num_heads: attention heads, an int or one per level (the mid block takes the last level's);
        head_dim = channels // heads. (diffusers' `attention_head_dim` is this number.)
      cross_attention_dim: width of the context tokens.
      use_linear_projection: the transformers' proj_in / proj_out as linear layers instead of
        1x1 convolutions (SD 2.x).
      num_class_embeds: if set, a table of that many label embeddings added to the timestep
        embedding (no null row: a CFG null label is one of the labels, as in diffusers).
      pooled_dim: if set, a float vector (B, pooled_dim) is embedded by a second
        linear -> SiLU -> linear and added to the timestep embedding.
      norm_num_groups, norm_eps: GroupNorm of the residual blocks and the output (the
        transformers' GroupNorm uses eps 1e-6 and their LayerNorms 1e-5, as diffusers).
      flip_sin_to_cos, freq_shift: sinusoidal timestep embedding convention
        (see `layers.timestep_embedding`).
      dropout: dropout rate inside residual blocks (active only when a dropout_key is passed).
      remat: rematerialise residual blocks and transformers in the backward pass.
      dtype: computation dtype (e.g. jnp.bfloat16); parameters stay float32. Output is float32.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        block_out_channels: Sequence[int] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        attention_levels: Sequence[bool] = (True, True, True, False),
        transformer_layers: int | Sequence[int] = 1,
        num_heads: int | Sequence[int] = 8,
        cross_attention_dim: int = 768,
        use_linear_projection: bool = False,
        num_class_embeds: int | None = None,
        pooled_dim: int | None = None,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        flip_sin_to_cos: bool = True,
        freq_shift: float = 0,
        dropout: float = 0.0,
        remat: bool = False,
        dtype: Dtype = None,
        rngs: nnx.Rngs,
    ):
        channels = tuple(block_out_channels)
        attention_levels = tuple(attention_levels)
        num_levels = len(channels)
        _check_config(
            in_channels=in_channels,
            out_channels=out_channels,
            block_out_channels=channels,
            layers_per_block=layers_per_block,
            attention_levels=attention_levels,
            cross_attention_dim=cross_attention_dim,
            num_class_embeds=num_class_embeds,
            pooled_dim=pooled_dim,
            norm_num_groups=norm_num_groups,
            dropout=dropout,
        )
        layers = _per_level(transformer_layers, num_levels, "transformer_layers")
        heads = _per_level(num_heads, num_levels, "num_heads")
        for level, (c, n) in enumerate(zip(channels, heads, strict=True)):
            if c % n:
                raise ValueError(
                    f"num_heads={n} (level {level}) does not divide block_out_channels[{level}]={c}"
                )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_levels = num_levels
        self.cross_attention_dim = cross_attention_dim
        self.num_class_embeds = num_class_embeds
        self.pooled_dim = pooled_dim
        self.flip_sin_to_cos = flip_sin_to_cos
        self.freq_shift = freq_shift
        self.remat = remat
        c0 = channels[0]
        self.base_channels = c0
        temb_dim = 4 * c0

        # Two-pass GroupNorm statistics (exact where |mean| >> std), as diffusers computes them.
        def res_block(c_in: int, c_out: int) -> ResBlock:
            return ResBlock(
                c_in,
                c_out,
                temb_dim=temb_dim,
                dropout=dropout,
                norm_groups=norm_num_groups,
                norm_eps=norm_eps,
                dtype=dtype,
                rngs=rngs,
            )

        def transformer(c: int, level: int) -> Transformer2D:
            return Transformer2D(
                c,
                num_heads=heads[level],
                num_layers=layers[level],
                cross_attention_dim=cross_attention_dim,
                use_linear_projection=use_linear_projection,
                norm_groups=norm_num_groups,
                dtype=dtype,
                rngs=rngs,
            )

        self.conv_in = conv3x3(in_channels, c0, dtype=dtype, rngs=rngs)
        self.time_embedding = TimestepEmbedding(c0, temb_dim, dtype=dtype, rngs=rngs)
        self.class_embedding = (
            nnx.Embed(num_class_embeds, temb_dim, dtype=dtype, rngs=rngs)
            if num_class_embeds is not None
            else None
        )
        self.pooled_embedding = (
            TimestepEmbedding(pooled_dim, temb_dim, dtype=dtype, rngs=rngs)
            if pooled_dim is not None
            else None
        )

        # Encoder. `skip_channels` records the channels of each activation pushed on the skip
        # stack, so the decoder's concatenations get the right input widths.
        c_cur, skip_channels, down = c0, [c0], []
        for level, c_out in enumerate(channels):
            resnets, attentions = [], []
            for _ in range(layers_per_block):
                resnets.append(res_block(c_cur, c_out))
                c_cur = c_out
                if attention_levels[level]:
                    attentions.append(transformer(c_cur, level))
                skip_channels.append(c_cur)
            samplers = []
            if level != num_levels - 1:
                samplers.append(Downsample(c_cur, padding="symmetric", dtype=dtype, rngs=rngs))
                skip_channels.append(c_cur)
            down.append(Block(resnets, attentions, samplers))
        self.down_blocks = nnx.List(down)

        self.mid_block = Block(
            [res_block(c_cur, c_cur), res_block(c_cur, c_cur)],
            [transformer(c_cur, num_levels - 1)],
            [],
        )

        # Decoder, deepest level first.
        up = []
        for level in reversed(range(num_levels)):
            c_out = channels[level]
            resnets, attentions = [], []
            for _ in range(layers_per_block + 1):
                resnets.append(res_block(c_cur + skip_channels.pop(), c_out))
                c_cur = c_out
                if attention_levels[level]:
                    attentions.append(transformer(c_cur, level))
            samplers = [Upsample(c_cur, dtype=dtype, rngs=rngs)] if level != 0 else []
            up.append(Block(resnets, attentions, samplers))
        self.up_blocks = nnx.List(up)
        assert not skip_channels, "every skip connection is consumed"

        self.conv_norm_out = group_norm(
            c_cur, groups=norm_num_groups, eps=norm_eps, dtype=dtype, rngs=rngs
        )
        self.conv_out = conv3x3(c_cur, out_channels, dtype=dtype, rngs=rngs, zero=True)

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        *,
        context: jax.Array | None = None,
        context_mask: jax.Array | None = None,
        class_labels: jax.Array | None = None,
        pooled: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """x: (B, H, W, in_channels), t: (B,) or scalar, context: (B, L, cross_attention_dim)
        (required), context_mask: (B, L) bool or int, True / nonzero = attend (diffusers'
        encoder_attention_mask; a row with nothing to attend attends to every key, as in
        diffusers), class_labels: (B,) int labels or (B, num_class_embeds) float label weights
        (`layers.embed_labels`), required iff num_class_embeds is set, pooled: (B, pooled_dim),
        required iff pooled_dim is set.

        Returns (B, H, W, out_channels) float32. Dropout is applied only when `dropout_key` is
        given.
        """
        t = self._check_inputs(x, t, context, context_mask, class_labels, pooled)
        temb = timestep_embedding(
            t, self.base_channels, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift
        )  # (B, c0)
        temb = self.time_embedding(temb)  # (B, 4 c0)
        if self.class_embedding is not None:
            temb = temb + embed_labels(self.class_embedding, jnp.asarray(class_labels))
        if self.pooled_embedding is not None:
            temb = temb + self.pooled_embedding(jnp.asarray(pooled))  # (B, 4 c0)

        res = res_block_caller(temb, dropout_key, remat=self.remat)
        apply_attn = _apply_transformer_remat if self.remat else _apply_transformer

        def attn(block: Transformer2D, h: jax.Array) -> jax.Array:
            return apply_attn(block, h, context, context_mask)

        h = self.conv_in(x)  # (B, H, W, c0)
        skips = [h]
        for block in self.down_blocks:
            for i, resnet in enumerate(block.resnets):
                h = res(resnet, h)  # (B, H / 2^level, W / 2^level, c_level)
                if len(block.attentions):
                    h = attn(block.attentions[i], h)
                skips.append(h)
            for sampler in block.samplers:
                h = sampler(h)  # (B, H / 2^(level+1), W / 2^(level+1), c_level)
                skips.append(h)

        mid = self.mid_block
        h = res(mid.resnets[0], h)
        h = attn(mid.attentions[0], h)
        h = res(mid.resnets[1], h)

        for block in self.up_blocks:
            for i, resnet in enumerate(block.resnets):
                h = jnp.concatenate([h, skips.pop()], axis=-1)  # (B, h, w, c + c_skip)
                h = res(resnet, h)  # (B, h, w, c_level)
                if len(block.attentions):
                    h = attn(block.attentions[i], h)
            for sampler in block.samplers:
                h = sampler(h)  # (B, 2h, 2w, c_level)

        h = self.conv_out(nnx.silu(self.conv_norm_out(h)))  # (B, H, W, out_channels)
        return h.astype(jnp.float32)

    def _check_inputs(self, x, t, context, context_mask, class_labels, pooled):
        """Shape checks at trace time, so a wrong input fails before compilation."""
        b, h, w, _ = check_nhwc(x, self.in_channels, "U-Net")
        levels = self.num_levels
        why = f"2**(len(block_out_channels)-1) for {levels} levels"
        check_spatial_multiple(h, w, 2 ** (levels - 1), why)
        t = batch_timesteps(t, b)

        if context is None:
            raise ValueError(
                f"context (B, L, cross_attention_dim={self.cross_attention_dim}) is required: "
                "every transformer cross-attends to it"
            )
        if context.ndim != 3 or context.shape[0] != b:
            raise ValueError(
                f"context must have shape (B, L, cross_attention_dim)=({b}, L, "
                f"{self.cross_attention_dim}), got {context.shape}"
            )
        if context.shape[-1] != self.cross_attention_dim:
            raise ValueError(
                f"cross_attention_dim={self.cross_attention_dim} but context has width "
                f"{context.shape[-1]}; context.shape={context.shape}"
            )
        if context_mask is not None:
            mask = jnp.asarray(context_mask)
            if mask.shape != context.shape[:2]:
                raise ValueError(
                    f"context_mask must have shape (B, L)={context.shape[:2]} like context, "
                    f"got {mask.shape}"
                )
            if not (mask.dtype == jnp.bool_ or jnp.issubdtype(mask.dtype, jnp.integer)):
                raise ValueError(
                    f"context_mask must be bool (True = attend) or 0/1 integers, got {mask.dtype}"
                    " (an additive float bias is not accepted)"
                )

        if self.num_class_embeds is None:
            if class_labels is not None:
                raise ValueError("class_labels given but the U-Net has num_class_embeds=None")
        else:
            if class_labels is None:
                raise ValueError(
                    f"class_labels (B,)=({b},) are required: num_class_embeds="
                    f"{self.num_class_embeds}"
                )
            y = jnp.asarray(class_labels)
            n = self.num_class_embeds
            ok = (jnp.issubdtype(y.dtype, jnp.integer) and y.shape == (b,)) or (
                jnp.issubdtype(y.dtype, jnp.floating) and y.shape == (b, n)
            )
            if not ok:
                raise ValueError(
                    f"class_labels must be (B,)=({b},) integer labels or ({b}, {n}) float label "
                    f"weights (num_class_embeds={n}), got {y.shape} {y.dtype}"
                )

        if self.pooled_dim is None:
            if pooled is not None:
                raise ValueError("pooled given but the U-Net has pooled_dim=None")
        else:
            if pooled is None:
                raise ValueError(
                    f"pooled (B, pooled_dim)=({b}, {self.pooled_dim}) is required: "
                    f"pooled_dim={self.pooled_dim}"
                )
            p = jnp.asarray(pooled)
            if p.shape != (b, self.pooled_dim) or not jnp.issubdtype(p.dtype, jnp.floating):
                raise ValueError(
                    f"pooled must be a float array (B, pooled_dim)=({b}, {self.pooled_dim}), got "
                    f"{p.shape} {p.dtype}"
                )
        return t


def _check_config(
    *,
    in_channels,
    out_channels,
    block_out_channels,
    layers_per_block,
    attention_levels,
    cross_attention_dim,
    num_class_embeds,
    pooled_dim,
    norm_num_groups,
    dropout,
):
    """Reject a configuration that cannot build the U-Net, naming the argument."""
    check_positive_ints(
        in_channels=in_channels,
        out_channels=out_channels,
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=norm_num_groups,
    )
    check_positive_int_seq("block_out_channels", block_out_channels)
    for level, c in enumerate(block_out_channels):
        if c % norm_num_groups:
            raise ValueError(
                f"norm_num_groups={norm_num_groups} does not divide block_out_channels[{level}]={c}"
            )
    if len(attention_levels) != len(block_out_channels) or any(
        not isinstance(a, bool) for a in attention_levels
    ):
        raise ValueError(
            f"attention_levels must hold one bool per level ({len(block_out_channels)}), got "
            f"{attention_levels}"
        )
    for name, value in [("num_class_embeds", num_class_embeds), ("pooled_dim", pooled_dim)]:
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be None or a positive int, got {value!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
