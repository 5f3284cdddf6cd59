"""diffusers `UNet2DConditionModel` checkpoints -> `diffusax.models.unet_cond.UNetCondition`.

Reads a local `save_pretrained` directory (config.json + diffusion_pytorch_model.safetensors)
with `safetensors.numpy`, so PyTorch is not needed. For a Stable Diffusion v1.x pipeline:

    model = load_diffusers_unet_cond("stable-diffusion-v1-5/unet")

and `load_unet_cond_params(model, state_dict)` fills a model from an in-memory state dict.

What maps to what:
- diffusers' `attention_head_dim` is, for this class, the number of heads per level (its
  `num_attention_heads`, which it refuses to take directly): our `num_heads`.
- `transformer_layers_per_block` (int or one per level) is our `transformer_layers`; the mid
  block takes the last level's, the up blocks mirror the down blocks, as diffusers does.
- `class_embed_type=None` with `num_class_embeds=N` is our `num_class_embeds=N` (the same
  N-row table); `class_embed_type="projection"` with `projection_class_embeddings_input_dim=D`
  is our `pooled_dim=D` (`class_embedding.linear_1/2` are our `pooled_embedding.linear_1/2`).
- `upcast_attention` is accepted either way: it asks for the attention softmax in float32,
  which `jax.nn.dot_product_attention` always does (and in float32 it changes nothing).
- Tensors: torch convolutions (O, I, kh, kw) become (kh, kw, I, O), linears (O, I) become
  (I, O). Every checkpoint tensor must be used exactly once and every model parameter set, with
  matching shapes, or one ValueError lists what is wrong.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from diffusax.convert import common
from diffusax.models.unet_cond import UNetCondition

# diffusers' UNet2DConditionModel defaults (0.42), used for fields an older config.json leaves
# out.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,  # used only with an addition_embed_type
}

# Fields whose value must be one of these for the SD / LDM architecture.
_REQUIRED_VALUES: dict[str, tuple] = {
    "center_input_sample": (False,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "act_fn": ("silu", "swish"),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),  # diffusers itself refuses it for this class
    "dual_cross_attention": (False,),
    "use_linear_projection": (False, True),
    "class_embed_type": (None, "projection"),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "upcast_attention": (False, True),  # see the module docstring
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
}

# Stable Diffusion v1.x's unet/config.json (stable-diffusion-v1-5): diffusers' defaults with
# cross_attention_dim=768 and sample_size=64 (64x64 latents, 512x512 images); 859,520,964
# parameters. The benchmarks build the SD U-Net from it without any download.
SD_V1_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}

_DOWN_TYPES = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}
_UP_TYPES = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}


def _uniform(value, num_levels: int, field: str) -> int:
    """An int, or a list of one equal int per level, as that int."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    values = list(value) if isinstance(value, list | tuple) else [value]
    if len(values) != num_levels or len(set(values)) != 1 or not isinstance(values[0], int):
        raise ValueError(
            f"unsupported {field}={value!r}; need an int or one equal int per level ({num_levels})"
        )
    return values[0]


def _per_level(value, num_levels: int, field: str):
    """An int, or a tuple of one int per level (not nested), as given."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    values = tuple(value) if isinstance(value, list | tuple) else (value,)
    if len(values) != num_levels or any(
        not isinstance(v, int) or isinstance(v, bool) for v in values
    ):
        raise ValueError(
            f"unsupported {field}={value!r}; need an int or one int per level ({num_levels})"
        )
    return values


def unet_cond_kwargs_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """Map a diffusers UNet2DConditionModel config (config.json as a dict) to
    `UNetCondition(**kwargs)`.

    Raises ValueError naming any field or value that UNetCondition cannot represent.
    """
    cfg = common.diffusers_config(
        config, "UNet2DConditionModel", _DIFFUSERS_DEFAULTS, _REQUIRED_VALUES
    )

    channels = tuple(cfg["block_out_channels"])
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    if not channels or len(down) != len(channels) or len(up) != len(channels):
        raise ValueError(
            "block_out_channels, down_block_types and up_block_types must have the same "
            f"non-zero length, got {list(channels)}, {down}, {up}"
        )
    num_levels = len(channels)
    attention_levels = []
    for level, kind in enumerate(down):
        if kind not in _DOWN_TYPES:
            raise ValueError(
                f"unsupported down_block_types[{level}]={kind!r}; supported: {list(_DOWN_TYPES)}"
            )
        mirror_index = num_levels - 1 - level
        mirror = up[mirror_index]
        if mirror not in _UP_TYPES:
            raise ValueError(
                f"unsupported up_block_types[{mirror_index}]={mirror!r}; supported: "
                f"{list(_UP_TYPES)}"
            )
        if _DOWN_TYPES[kind] != _UP_TYPES[mirror]:
            raise ValueError(
                f"cross-attention must be mirrored: down_block_types[{level}]={kind!r} but "
                f"up_block_types[{mirror_index}]={mirror!r}"
            )
        attention_levels.append(_DOWN_TYPES[kind])

    only_cross = cfg["only_cross_attention"]
    if any(only_cross) if isinstance(only_cross, list | tuple) else only_cross:
        raise ValueError(f"unsupported only_cross_attention={only_cross!r}; need False")
    if not isinstance(cfg["norm_num_groups"], int):
        raise ValueError(f"unsupported norm_num_groups={cfg['norm_num_groups']!r}; need an int")
    if cfg["time_embedding_dim"] not in (None, 4 * channels[0]):
        raise ValueError(
            f"unsupported time_embedding_dim={cfg['time_embedding_dim']}; need None or "
            f"4 * block_out_channels[0] = {4 * channels[0]}"
        )
    if cfg["attention_head_dim"] is None:
        raise ValueError("unsupported attention_head_dim=None; need the heads per level")

    pooled_dim = None
    num_class_embeds = cfg["num_class_embeds"]
    projection_dim = cfg["projection_class_embeddings_input_dim"]
    if cfg["class_embed_type"] == "projection":
        if projection_dim is None:
            raise ValueError(
                "class_embed_type='projection' needs projection_class_embeddings_input_dim"
            )
        if num_class_embeds is not None:
            raise ValueError(
                f"num_class_embeds={num_class_embeds} is ignored by diffusers with "
                "class_embed_type='projection'; drop one of them"
            )
        pooled_dim = projection_dim
    elif projection_dim is not None:
        raise ValueError(
            f"projection_class_embeddings_input_dim={projection_dim} is unused with "
            f"class_embed_type={cfg['class_embed_type']!r} (and no addition_embed_type)"
        )

    return {
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["out_channels"],
        "block_out_channels": channels,
        "layers_per_block": _uniform(cfg["layers_per_block"], num_levels, "layers_per_block"),
        "attention_levels": tuple(attention_levels),
        "transformer_layers": _per_level(
            cfg["transformer_layers_per_block"], num_levels, "transformer_layers_per_block"
        ),
        "num_heads": _per_level(cfg["attention_head_dim"], num_levels, "attention_head_dim"),
        "cross_attention_dim": _uniform(
            cfg["cross_attention_dim"], num_levels, "cross_attention_dim"
        ),
        "use_linear_projection": bool(cfg["use_linear_projection"]),
        "num_class_embeds": num_class_embeds,
        "pooled_dim": pooled_dim,
        "norm_num_groups": cfg["norm_num_groups"],
        "norm_eps": cfg["norm_eps"],
        "flip_sin_to_cos": bool(cfg["flip_sin_to_cos"]),
        "freq_shift": cfg["freq_shift"],
        "dropout": float(cfg["dropout"]),
    }


# Our module names -> diffusers module names, per path component ("samplers" is handled in
# `_SPECIAL`: its diffusers name depends on the direction).
_RENAME = {
    "pooled_embedding": "class_embedding",
    "temb_proj": "time_emb_proj",
    "shortcut": "conv_shortcut",
    "to_out": "to_out.0",
    "net_0": "net.0",
    "net_2": "net.2",
    "kernel": "weight",
    "scale": "weight",
    "embedding": "weight",
}


_SPECIAL = {"samplers": lambda path: "downsamplers" if path[0] == "down_blocks" else "upsamplers"}


def diffusers_name(path: tuple) -> str:
    """The diffusers state-dict key of one of our parameters, e.g.
    ('down_blocks', 0, 'attentions', 1, 'transformer_blocks', 0, 'attn2', 'to_k', 'kernel')
    -> 'down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight'.
    """
    return common.dotted_name(path, _RENAME, _SPECIAL)


def load_unet_cond_params(model: UNetCondition, state_dict: Mapping[str, np.ndarray]) -> None:
    """Copy a diffusers UNet2DConditionModel state dict (numpy arrays) into `model` in place.

    Works on a concrete or an abstract (`nnx.eval_shape`) model. Raises one ValueError listing
    every checkpoint tensor left unused, model parameter without a tensor, and shape mismatch.
    """
    common.load_named_params(model, state_dict, diffusers_name, "diffusers UNet2DConditionModel")


def load_diffusers_unet_cond(
    path: str | os.PathLike, *, dtype=None, rngs: nnx.Rngs | None = None
) -> UNetCondition:
    """Build a UNetCondition from a local diffusers `save_pretrained` directory with its weights.

    `path` holds config.json and diffusion_pytorch_model.safetensors (for a pipeline download,
    pass its `unet/` folder). The model is built abstractly and every parameter is then set from
    the checkpoint, so no random initialisation runs; `rngs` is accepted for symmetry with the
    constructors and not needed. `dtype` is the computation dtype; parameters stay float32.
    """
    del rngs  # every parameter comes from the checkpoint
    folder = common.read_folder(path, "UNet2DConditionModel")
    return common.load_folder(
        folder, unet_cond_kwargs_from_diffusers, UNetCondition, load_unet_cond_params, dtype=dtype
    )
