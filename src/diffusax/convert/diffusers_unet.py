"""diffusers `UNet2DModel` checkpoints -> `diffusax.models.unet.UNet`.

Reads a local `save_pretrained` directory (config.json + diffusion_pytorch_model.safetensors)
with `safetensors.numpy`, so PyTorch is not needed. For the official DDPM weights:

    huggingface-cli download google/ddpm-cifar10-32 --local-dir ddpm-cifar10-32
    model = load_diffusers_unet("ddpm-cifar10-32")          # (the UNet is at the repo root)

Layouts: torch convolutions are (O, I, kh, kw) and become (kh, kw, I, O); torch linears are
(O, I) and become (I, O). Every checkpoint tensor must be used exactly once and every model
parameter must be set, with matching shapes, or a ValueError lists what is wrong.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from diffusax.convert import common
from diffusax.models.unet import UNet

# diffusers' UNet2DModel defaults (0.42), used for fields an older config.json leaves out.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,  # only used by time_embedding_type="learned"
}

# Fields whose value must be exactly this for the DDPM architecture.
_REQUIRED_VALUES: dict[str, tuple] = {
    "center_input_sample": (False,),
    "time_embedding_type": ("positional",),
    "mid_block_type": ("UNetMidBlock2D",),
    "mid_block_scale_factor": (1,),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "act_fn": ("silu", "swish"),
    "resnet_time_scale_shift": ("default",),
    "add_attention": (True,),
    "class_embed_type": (None,),
}

_DOWNSAMPLE_PADDING = {0: "asymmetric", 1: "symmetric"}


def unet_kwargs_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """Map a diffusers UNet2DModel config (config.json as a dict) to `UNet(**kwargs)`.

    `num_class_embeds=N` maps to `num_classes=N-1`: our table has num_classes + 1 rows, the last
    being the null label, so the tables line up row for row (label N-1 is our null label).
    Raises ValueError naming any field or value that the DDPM U-Net cannot represent.
    """
    cfg = common.diffusers_config(config, "UNet2DModel", _DIFFUSERS_DEFAULTS, _REQUIRED_VALUES)

    channels = list(cfg["block_out_channels"])
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    if not channels or len(down) != len(channels) or len(up) != len(channels):
        raise ValueError(
            "block_out_channels, down_block_types and up_block_types must have the same "
            f"non-zero length, got {channels}, {down}, {up}"
        )
    ch = channels[0]
    if any(c % ch for c in channels):
        raise ValueError(f"block_out_channels {channels} must be multiples of the first entry")
    if cfg["time_embedding_dim"] not in (None, 4 * ch):
        raise ValueError(f"unsupported time_embedding_dim={cfg['time_embedding_dim']}")
    if not isinstance(cfg["norm_num_groups"], int):
        raise ValueError(f"unsupported norm_num_groups={cfg['norm_num_groups']!r}; need an int")
    if cfg["attn_norm_num_groups"] not in (None, cfg["norm_num_groups"]):
        raise ValueError(
            f"unsupported attn_norm_num_groups={cfg['attn_norm_num_groups']}; must be None or "
            f"norm_num_groups={cfg['norm_num_groups']}"
        )
    if cfg["downsample_padding"] not in _DOWNSAMPLE_PADDING:
        raise ValueError(f"unsupported downsample_padding={cfg['downsample_padding']}; use 0 or 1")

    num_levels = len(channels)
    attn_levels = []
    for level, kind in enumerate(down):
        if kind not in ("DownBlock2D", "AttnDownBlock2D"):
            raise ValueError(f"unsupported down_block_types[{level}]={kind!r}")
        mirror = up[num_levels - 1 - level]
        if mirror not in ("UpBlock2D", "AttnUpBlock2D"):
            raise ValueError(f"unsupported up_block_types[{num_levels - 1 - level}]={mirror!r}")
        if (kind == "AttnDownBlock2D") != (mirror == "AttnUpBlock2D"):
            raise ValueError(
                f"attention must be mirrored: down_block_types[{level}]={kind!r} but "
                f"up_block_types[{num_levels - 1 - level}]={mirror!r}"
            )
        if kind == "AttnDownBlock2D":
            attn_levels.append(level)

    # `resolution` only places the attention levels; any multiple of 2**(levels-1) does.
    factor = 2 ** (num_levels - 1)
    size = cfg["sample_size"]
    if isinstance(size, list | tuple):
        size = size[0]
    if size is None:
        size = factor
    if not isinstance(size, int) or size % factor:
        raise ValueError(f"sample_size={cfg['sample_size']} must be a multiple of {factor}")

    num_class_embeds = cfg["num_class_embeds"]
    if num_class_embeds is not None and num_class_embeds < 2:
        raise ValueError(f"unsupported num_class_embeds={num_class_embeds}; need >= 2")
    head_dim = cfg["attention_head_dim"]

    return {
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["out_channels"],
        "ch": ch,
        "ch_mult": tuple(c // ch for c in channels),
        "num_res_blocks": cfg["layers_per_block"],
        "attn_resolutions": tuple(size // 2**level for level in attn_levels),
        "resolution": size,
        "dropout": float(cfg["dropout"]),
        "num_classes": None if num_class_embeds is None else num_class_embeds - 1,
        "num_heads": 1,
        "head_dim": head_dim,  # None: one head of all channels, as diffusers does
        "norm_groups": cfg["norm_num_groups"],
        "norm_eps": cfg["norm_eps"],
        "flip_sin_to_cos": bool(cfg["flip_sin_to_cos"]),
        "freq_shift": cfg["freq_shift"],
        "downsample_padding": _DOWNSAMPLE_PADDING[cfg["downsample_padding"]],
    }


# Our module names -> diffusers module names, per path component ("resample" is handled
# in `_SPECIAL`: its diffusers name depends on the direction).
_RENAME = {
    "down_levels": "down_blocks",
    "up_levels": "up_blocks",
    "res_blocks": "resnets",
    "attn_blocks": "attentions",
    "mid_res_1": "mid_block.resnets.0",
    "mid_attn": "mid_block.attentions.0",
    "mid_res_2": "mid_block.resnets.1",
    "time_embed_1": "time_embedding.linear_1",
    "time_embed_2": "time_embedding.linear_2",
    "class_embed": "class_embedding",
    "temb_proj": "time_emb_proj",
    "shortcut": "conv_shortcut",
    "norm": "group_norm",
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "proj_out": "to_out.0",
    "norm_out": "conv_norm_out",
    "kernel": "weight",
    "scale": "weight",
    "embedding": "weight",
}

_SPECIAL = {  # same attribute name, different diffusers name
    "resample": lambda path: "downsamplers.0" if path[0] == "down_levels" else "upsamplers.0"
}


def diffusers_name(path: tuple) -> str:
    """The diffusers state-dict key of one of our parameters, e.g.
    ('down_levels', 1, 'attn_blocks', 0, 'query', 'kernel') -> 'down_blocks.1.attentions.0.to_q.weight'.
    """
    return common.dotted_name(path, _RENAME, _SPECIAL)


def load_unet_params(model: UNet, state_dict: Mapping[str, np.ndarray]) -> None:
    """Copy a diffusers UNet2DModel state dict into `model` in place.

    Works on a concrete or an abstract (`nnx.eval_shape`) model. Raises ValueError if a
    checkpoint tensor is unused, a model parameter has no tensor, or a shape differs.
    """
    common.load_named_params(model, state_dict, diffusers_name, "diffusers UNet")


def load_diffusers_unet(path: str | os.PathLike, *, rngs: nnx.Rngs | None = None) -> UNet:
    """Build a UNet from a local diffusers `save_pretrained` directory and load its weights.

    `path` holds config.json and diffusion_pytorch_model.safetensors (for a pipeline download,
    pass its `unet/` folder, or the repo root of google/ddpm-*). The model is built abstractly
    and every parameter is then set from the checkpoint, so no random initialisation runs;
    `rngs` is accepted for symmetry with the constructors and not needed.
    """
    del rngs  # every parameter comes from the checkpoint
    folder = common.read_folder(path, "UNet2DModel")
    return common.load_folder(folder, unet_kwargs_from_diffusers, UNet, load_unet_params)
