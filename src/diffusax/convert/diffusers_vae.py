"""diffusers `AutoencoderKL` checkpoints -> `diffusax.models.autoencoder.AutoencoderKL`.

Reads a local `save_pretrained` directory (config.json + diffusion_pytorch_model.safetensors)
with `safetensors.numpy`, so PyTorch is not needed. For the VAE that DiT uses:

    huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir sd-vae-ft-ema
    vae = load_diffusers_vae("sd-vae-ft-ema")        # or sd-vae-ft-mse, or a pipeline's vae/

Checkpoints saved before diffusers 0.14 (the sd-vae-ft-* repositories among them) name the
mid-block attention query/key/value/proj_attn; newer ones to_q/to_k/to_v/to_out.0. Both load.
Every checkpoint tensor must be used exactly once and every model parameter must be set, with
matching shapes, or one ValueError lists everything that is wrong.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from diffusax.convert import common
from diffusax.models.autoencoder import AutoencoderKL

# diffusers' AutoencoderKL defaults (0.42), used for fields an older config.json leaves out.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,  # a pipeline's runtime hint (run the VAE in float32); no weights
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}

# Fields whose value must be one of these for our architecture.
_REQUIRED_VALUES: dict[str, tuple] = {
    "act_fn": ("silu", "swish"),
    "latents_mean": (None,),  # per-channel latent statistics (other VAEs): not supported
    "latents_std": (None,),
}


def vae_kwargs_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """Map a diffusers AutoencoderKL config (config.json as a dict) to `AutoencoderKL(**kwargs)`.

    Raises ValueError naming any field or value that our autoencoder cannot represent.
    """
    cfg = common.diffusers_config(config, "AutoencoderKL", _DIFFUSERS_DEFAULTS, _REQUIRED_VALUES)

    channels = tuple(cfg["block_out_channels"])
    for field, kind in [
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ]:
        types = list(cfg[field])
        if len(types) != len(channels):
            raise ValueError(
                f"{field} has {len(types)} entries but block_out_channels has {len(channels)}"
            )
        bad = {i: t for i, t in enumerate(types) if t != kind}
        if bad:
            raise ValueError(f"unsupported {field} entries {bad}; only {kind!r} is supported")

    size = cfg["sample_size"]
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise ValueError(f"unsupported non-square sample_size={size}")
        size = size[0]
    shift = cfg["shift_factor"]

    return {
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["out_channels"],
        "block_out_channels": channels,
        "layers_per_block": cfg["layers_per_block"],
        "latent_channels": cfg["latent_channels"],
        "norm_num_groups": cfg["norm_num_groups"],
        "scaling_factor": cfg["scaling_factor"],
        "shift_factor": 0.0 if shift is None else shift,
        "sample_size": size,
        "use_quant_conv": bool(cfg["use_quant_conv"]),
        "use_post_quant_conv": bool(cfg["use_post_quant_conv"]),
        "mid_block_add_attention": bool(cfg["mid_block_add_attention"]),
    }


# Our module names -> diffusers module names, per path component ("resample" is handled in
# `_SPECIAL`: its diffusers name depends on the direction).
_RENAME = {
    "mid": "mid_block",
    "res_1": "resnets.0",
    "attn": "attentions.0",
    "res_2": "resnets.1",
    "shortcut": "conv_shortcut",
    "norm": "group_norm",
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "proj_out": "to_out.0",
    "norm_out": "conv_norm_out",
    "kernel": "weight",
    "scale": "weight",
}


_SPECIAL = {"resample": lambda path: "downsamplers.0" if "down_blocks" in path else "upsamplers.0"}


def diffusers_name(path: tuple) -> str:
    """The diffusers state-dict key of one of our parameters, e.g.
    ('encoder', 'mid', 'attn', 'query', 'kernel') -> 'encoder.mid_block.attentions.0.to_q.weight'.
    """
    return common.dotted_name(path, _RENAME, _SPECIAL)


def load_vae_params(model: AutoencoderKL, state_dict: Mapping[str, np.ndarray]) -> None:
    """Copy a diffusers AutoencoderKL state dict into `model` in place.

    Works on a concrete or an abstract (`nnx.eval_shape`) model. Raises one ValueError listing
    every checkpoint tensor left unused, model parameter without a tensor, and shape mismatch.
    """
    common.load_named_params(model, state_dict, diffusers_name, "diffusers AutoencoderKL")


def load_diffusers_vae(
    path: str | os.PathLike, *, dtype=None, rngs: nnx.Rngs | None = None
) -> AutoencoderKL:
    """Build an AutoencoderKL from a local diffusers `save_pretrained` directory with its weights.

    `path` holds config.json and diffusion_pytorch_model.safetensors (for a pipeline download,
    pass its `vae/` folder). The model is built abstractly and every parameter is then set from
    the checkpoint, so no random initialisation runs; `rngs` is accepted for symmetry with the
    constructors and not needed. `dtype` is the computation dtype; parameters stay float32.
    """
    del rngs  # every parameter comes from the checkpoint
    folder = common.read_folder(path, "AutoencoderKL")
    return common.load_folder(
        folder, vae_kwargs_from_diffusers, AutoencoderKL, load_vae_params, dtype=dtype
    )
