"""diffusers `DiTTransformer2DModel` checkpoints -> `diffusax.models.dit.DiT`.

This is the format of the public DiT-XL/2 checkpoints (facebook/DiT-XL-2-256, -512): a
DiTPipeline whose `transformer/` folder holds config.json and
diffusion_pytorch_model.safetensors, read here with `safetensors.numpy` (no PyTorch needed):

    huggingface-cli download facebook/DiT-XL-2-256 --local-dir DiT-XL-2-256
    model = load_diffusers_dit("DiT-XL-2-256/transformer")
    # (older snapshots hold only a .bin: read with torch, when it is installed)

How diffusers lays a DiT out, and what becomes of it:
- `pos_embed.proj` is a p x p stride-p convolution (O, I, p, p); on flattened (p, p, C)
  patches it is our linear `x_embedder` with kernel (p·p·C, D).
- Every block holds its own copy of the timestep and label embedder
  (`transformer_blocks.N.norm1.emb`), and the final layer is conditioned through block 0's
  copy. The reference model has one shared embedder and the public checkpoints were converted
  from it, so the copies are equal: we take block 0's and require the others to match exactly.
- `num_embeds_ada_norm` = N classes gives a label table of N + 1 rows, the last the null
  label, exactly our `num_classes=N` table.
- `attn1.to_q / to_k / to_v` are concatenated into our fused `attn.qkv`; `to_out.0` is
  `attn.proj`; `ff.net.0.proj` / `ff.net.2` are `mlp.fc1` / `mlp.fc2`.
- `norm1.linear` is the adaLN modulation, chunked shift/scale/gate (attention) then
  shift/scale/gate (MLP), as ours; `proj_out_1` is the final modulation, chunked shift then
  scale, as ours; `proj_out_2` is the final projection, its outputs ordered (p, p, C) as ours.
- diffusers' port differs from the reference code in two small ways that we reproduce with
  DiT arguments: timestep frequencies use downscale_freq_shift=1 (`freq_shift=1`) and the
  pre-MLP layer norm uses the config's norm_eps (`mlp_norm_eps`), the others 1e-6.
- The model returns NCHW; ours returns NHWC with the same channels (ε, then the variance
  interpolation when out_channels = 2 · in_channels).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from diffusax.convert import common
from diffusax.models.dit import DiT

# diffusers' DiTTransformer2DModel defaults (0.42), for fields an older config.json leaves out.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": None,
    "num_layers": 28,
    "dropout": 0.0,
    "norm_num_groups": 32,  # unused by adaLN-Zero blocks
    "attention_bias": True,
    "sample_size": 32,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "upcast_attention": False,  # a float16 detail; no effect on the maths
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-5,
}

# Fields whose value must be exactly this for the DiT architecture.
_REQUIRED_VALUES: dict[str, tuple] = {
    "dropout": (0.0, 0),
    "attention_bias": (True,),
    "activation_fn": ("gelu-approximate",),
    "norm_type": ("ada_norm_zero",),
    "norm_elementwise_affine": (False,),
}

# Every key of one block's copy of the conditioning embedder, relative to the block.
_EMBEDDER_KEYS = (
    "norm1.emb.timestep_embedder.linear_1.weight",
    "norm1.emb.timestep_embedder.linear_1.bias",
    "norm1.emb.timestep_embedder.linear_2.weight",
    "norm1.emb.timestep_embedder.linear_2.bias",
    "norm1.emb.class_embedder.embedding_table.weight",
)


# Fields of the older, generic `Transformer2DModel` class, under which the public DiT checkpoints
# were saved (diffusers now loads such a config as a DiTTransformer2DModel), with the values that
# describe a DiT. interpolation_scale is checked separately.
_LEGACY_VALUES: dict[str, tuple] = {
    "cross_attention_dim": (None,),
    "num_vector_embeds": (None,),
    "only_cross_attention": (False,),
    "double_self_attention": (False,),
    "attention_type": ("default",),
    "caption_channels": (None,),
    "use_additional_conditions": (None, False),
    "use_linear_projection": (False, True),  # unused with patch inputs
}
_CLASS_NAMES = ("DiTTransformer2DModel", "Transformer2DModel")


def dit_kwargs_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """Map a diffusers DiTTransformer2DModel config (config.json as a dict) to `DiT(**kwargs)`.

    Also takes the legacy `Transformer2DModel` configs of the public DiT checkpoints. Raises
    ValueError naming any field or value that our DiT cannot represent.
    """
    name = config.get("_class_name", _CLASS_NAMES[0])
    if name not in _CLASS_NAMES:
        raise ValueError(f"_class_name must be one of {list(_CLASS_NAMES)}, got {name!r}")
    known = set(_DIFFUSERS_DEFAULTS)
    if name == "Transformer2DModel":
        known |= {*_LEGACY_VALUES, "interpolation_scale"}
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        raise ValueError(f"unsupported {name} config fields: {unknown}")
    cfg = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    required = {**_REQUIRED_VALUES, **(_LEGACY_VALUES if name == "Transformer2DModel" else {})}
    for field, allowed in required.items():
        value = cfg.get(field, allowed[0])  # a legacy field left out has its benign default
        if value not in allowed:
            raise ValueError(f"unsupported {field}={value!r}; supported: {list(allowed)}")
    if cfg.get("patch_size") is None:
        raise ValueError("patch_size=None: not a patch-based (DiT) transformer")
    in_channels = cfg["in_channels"]
    out_channels = in_channels if cfg["out_channels"] is None else cfg["out_channels"]
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(
            f"unsupported out_channels={out_channels}: need in_channels={in_channels} "
            f"(fixed variance) or 2 * in_channels (learned sigma)"
        )
    if cfg["num_embeds_ada_norm"] is None:
        raise ValueError("num_embeds_ada_norm=None: a DiT needs a label table")
    size = cfg["sample_size"]
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise ValueError(f"sample_size={size}: only square inputs are supported")
        size = size[0]
    # Transformer2DModel rescales positions by interpolation_scale, None meaning
    # max(sample_size // 64, 1); DiTTransformer2DModel always uses 1, as the reference.
    scale = cfg.get("interpolation_scale")
    if scale is None:
        scale = max(size // 64, 1) if name == "Transformer2DModel" else 1
    if scale != 1:
        raise ValueError(f"unsupported interpolation_scale={scale} (effective); need 1")
    heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    return {
        "depth": cfg["num_layers"],
        "hidden": heads * head_dim,
        "heads": heads,
        "patch": cfg["patch_size"],
        "input_size": size,
        "in_channels": in_channels,
        "num_classes": cfg["num_embeds_ada_norm"],
        "learn_sigma": out_channels == 2 * in_channels,
        "mlp_ratio": 4.0,
        "freq_shift": 1.0,
        "norm_eps": 1e-6,
        "mlp_norm_eps": float(cfg["norm_eps"]),
    }


def _check_embedder_copies(tensors: Mapping[str, np.ndarray], depth: int) -> None:
    """Every block's copy of the timestep/label embedder must equal block 0's, exactly."""
    differing = []
    for i in range(1, depth):
        for key in _EMBEDDER_KEYS:
            ours, first = f"transformer_blocks.{i}.{key}", f"transformer_blocks.0.{key}"
            if ours not in tensors or first not in tensors:
                continue  # a missing block-0 tensor is reported as a missing parameter
            a, b = np.asarray(tensors[ours]), np.asarray(tensors[first])
            if a.shape != b.shape or not np.array_equal(a, b):
                diff = float(np.max(np.abs(a - b))) if a.shape == b.shape else float("nan")
                differing.append(f"{ours} (max |diff| {diff:.3g})")
    if differing:
        raise ValueError(
            "the per-block copies of the timestep/label embedder differ from block 0's, which "
            "our DiT (one shared embedder, as the reference model) cannot represent: "
            + ", ".join(differing[:5])
            + (f" and {len(differing) - 5} more" if len(differing) > 5 else "")
        )


def diffusers_to_dit_tensors(
    state_dict: Mapping[str, np.ndarray], depth: int
) -> tuple[dict[tuple, np.ndarray], set[str]]:
    """Our unrolled parameter paths -> arrays in our layout, and the diffusers keys used.

    Keys the model lacks are simply absent from the result (the caller reports them).
    """
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    out: dict[tuple, np.ndarray] = {}
    used: set[str] = set()

    def put(path: tuple, name: str, convert=lambda a: a):
        if name in sd:
            out[path] = convert(sd[name])
            used.add(name)

    def put_linear(path: tuple, name: str):
        put((*path, "kernel"), name + ".weight", lambda w: w.T)
        put((*path, "bias"), name + ".bias")

    # Patch embedding: conv (D, C, p, p) -> (p, p, C, D) -> (p·p·C, D) on (p, p, C) patches.
    put(
        ("x_embedder", "kernel"),
        "pos_embed.proj.weight",
        lambda w: w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0]),
    )
    put(("x_embedder", "bias"), "pos_embed.proj.bias")

    _check_embedder_copies(sd, depth)
    emb = "transformer_blocks.0.norm1.emb."
    put_linear(("t_embedder", "mlp_1"), emb + "timestep_embedder.linear_1")
    put_linear(("t_embedder", "mlp_2"), emb + "timestep_embedder.linear_2")
    put(("y_embedder", "embedding"), emb + "class_embedder.embedding_table.weight")
    for i in range(1, depth):  # the copies: checked equal above
        used.update(f"transformer_blocks.{i}.{key}" for key in _EMBEDDER_KEYS)

    for i in range(depth):
        src, dst = f"transformer_blocks.{i}.", ("blocks", i)
        put_linear((*dst, "modulation"), src + "norm1.linear")
        qkv = [src + f"attn1.to_{n}" for n in "qkv"]
        if all(n + ".weight" in sd and n + ".bias" in sd for n in qkv):
            out[(*dst, "attn", "qkv", "kernel")] = np.concatenate(
                [sd[n + ".weight"].T for n in qkv], axis=1
            )  # (D, 3D): q | k | v
            out[(*dst, "attn", "qkv", "bias")] = np.concatenate([sd[n + ".bias"] for n in qkv])
            used.update(n + s for n in qkv for s in (".weight", ".bias"))
        put_linear((*dst, "attn", "proj"), src + "attn1.to_out.0")
        put_linear((*dst, "mlp", "fc1"), src + "ff.net.0.proj")
        put_linear((*dst, "mlp", "fc2"), src + "ff.net.2")

    put_linear(("final_layer", "modulation"), "proj_out_1")
    put_linear(("final_layer", "linear"), "proj_out_2")
    return out, used


def load_dit_params(model: DiT, state_dict: Mapping[str, np.ndarray]) -> None:
    """Copy a diffusers DiTTransformer2DModel state dict into `model` in place.

    Works on a concrete or an abstract (`nnx.eval_shape`) model, with unrolled or scanned
    (stacked) blocks. Raises ValueError if a checkpoint tensor is unused, a model parameter has
    no tensor, a shape differs, or the per-block embedder copies differ.
    """
    tensors, used = diffusers_to_dit_tensors(state_dict, model.depth)

    def find(path, ndim):
        name = "/".join(map(str, path))
        if model.scan_blocks and path[0] == "blocks":  # stacked: one array per leaf
            per_block = [(path[0], i, *path[1:]) for i in range(model.depth)]
            if any(p not in tensors for p in per_block):
                return name, None
            return name, np.stack([tensors[p] for p in per_block])
        return name, tensors.get(path)

    _, missing, mismatched = common.copy_params(model, find)
    common.check_fit("diffusers DiT", missing, mismatched, sorted(set(state_dict) - used))


def load_diffusers_dit(path: str | os.PathLike, **overrides: Any) -> DiT:
    """Build a DiT from a local diffusers `save_pretrained` directory and load its weights.

    `path` holds config.json and diffusion_pytorch_model.safetensors (a DiTPipeline's
    `transformer/` folder). `overrides` are passed to `DiT` on top of the converted config:
    scan_blocks, remat, dtype, fused_attention, class_dropout_prob. The model is built
    abstractly and every parameter then set from the checkpoint (no random initialisation).
    """
    folder = common.read_folder(path, "DiTTransformer2DModel")
    return common.load_folder(folder, dit_kwargs_from_diffusers, DiT, load_dit_params, **overrides)
