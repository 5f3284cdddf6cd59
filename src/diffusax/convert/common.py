"""What every converter shares: reading a `save_pretrained` folder, naming our parameters as the
checkpoint does, copying arrays into an nnx model, one error that lists everything that does
not fit, and building a model abstractly from a folder."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"

# find(path, target_ndim) -> (the checkpoint's name for the parameter, its array in our layout,
# or None when the checkpoint has no such tensor).
Finder = Callable[[tuple, int], tuple[str, np.ndarray | None]]


def read_folder(
    path: str | os.PathLike,
    class_name: str,
    *,
    weights_name: str = WEIGHTS_NAME,
    index_name: str | None = None,
    legacy_bin: tuple[str, str] = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin"),
) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json as a dict, the state dict as numpy) of a model folder: the ``weights_name``
    safetensors file, the shards an ``index_name`` file lists, or else the PyTorch ``legacy_bin``
    = (the file, its name in messages).

    safetensors are read with `safetensors.numpy`: no PyTorch needed. A PyTorch .bin is a
    pickle that only torch can read: it is loaded with ``torch.load(weights_only=True)`` when
    torch is installed, and otherwise a FileNotFoundError says how to re-save it. A
    FileNotFoundError names any missing file.
    """
    from safetensors.numpy import load_file  # lazy: only the converters need safetensors

    config_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path!s}")
    weights_file = os.path.join(path, weights_name)
    load = load_file
    if os.path.isfile(weights_file):
        shards = [weights_file]
    elif index_name is not None and os.path.isfile(os.path.join(path, index_name)):
        with open(os.path.join(path, index_name)) as f:
            shards = [
                os.path.join(path, s) for s in sorted(set(json.load(f)["weight_map"].values()))
            ]
    elif os.path.isfile(os.path.join(path, legacy_bin[0])):
        shards, load = [os.path.join(path, legacy_bin[0])], _torch_bin_loader(class_name)
    else:
        raise FileNotFoundError(f"no {weights_name} (nor {legacy_bin[1]}) in {path!s}")
    with open(config_file) as f:
        config = json.load(f)
    state: dict[str, np.ndarray] = {}
    for shard in shards:
        state.update(load(shard))
    return config, state


def _torch_bin_loader(class_name: str):
    """A reader of PyTorch .bin state dicts as numpy (float32 for bfloat16, which numpy lacks)."""
    try:
        import torch
    except ImportError:

        def refuse(file):
            raise FileNotFoundError(
                f"{file} is a PyTorch pickle, which only torch can read: install torch, or "
                f"re-save the folder with safetensors, e.g. "
                f"{class_name}.from_pretrained(path).save_pretrained(path)"
            )

        return refuse

    def read(file):
        state = torch.load(file, map_location="cpu", weights_only=True)
        return {
            k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()
        }

    return read


def diffusers_config(config: Mapping, class_name: str, defaults: dict, required: dict) -> dict:
    """config.json's fields over diffusers' ``defaults`` for ``class_name``; a ValueError names
    another class, a field not in ``defaults``, or a value outside those ``required`` allows."""
    if config.get("_class_name", class_name) != class_name:
        raise ValueError(f"_class_name must be {class_name}, got {config['_class_name']!r}")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in defaults)
    if unknown:
        raise ValueError(f"unsupported {class_name} config fields: {unknown}")
    cfg = {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for field, allowed in required.items():
        if cfg[field] not in allowed:
            raise ValueError(f"unsupported {field}={cfg[field]!r}; supported: {list(allowed)}")
    return cfg


def copy_params(model: nnx.Module, find: Finder) -> tuple[set[str], list[str], list[str]]:
    """Set every parameter of ``model`` (concrete or `nnx.eval_shape`-abstract) from ``find``.

    Returns (names set, names missing from the checkpoint, shape mismatches as messages); a
    parameter with a mismatched shape is left as it is and its tensor counts as unused.
    """
    used: set[str] = set()
    missing, mismatched = [], []
    for path, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Variable):
            continue
        if not isinstance(var, nnx.Param):
            raise TypeError(f"unexpected non-parameter variable at {path}")
        target = var.get_value()
        name, array = find(path, len(target.shape))
        if array is None:
            missing.append(name)
        elif tuple(array.shape) != tuple(target.shape):
            mismatched.append(f"{name}: checkpoint {array.shape}, model {tuple(target.shape)}")
        else:
            var.set_value(jnp.asarray(array, dtype=target.dtype))
            used.add(name)
    return used, missing, mismatched


def check_fit(what: str, missing: list, mismatched: list, unused: list) -> None:
    """One ValueError listing every problem of a conversion, or nothing when it fits exactly."""
    problems = []
    if missing:
        problems.append(f"model parameters missing from the checkpoint: {missing}")
    if mismatched:
        problems.append(f"shape mismatches: {mismatched}")
    if unused:
        problems.append(f"checkpoint tensors not used by the model: {unused}")
    if problems:
        raise ValueError(f"{what} checkpoint does not match the model; " + "; ".join(problems))


def load_folder(folder, kwargs_from_config, model_class, load_params, /, **overrides):
    """``model_class(**kwargs_from_config(config), **overrides)``, built abstractly (no random
    initialisation) and filled by ``load_params`` from ``folder`` = (config, state dict)."""
    config, state_dict = folder
    kwargs = kwargs_from_config(config)
    clash = sorted(set(overrides) & set(kwargs))
    if clash:
        raise ValueError(f"overrides {clash} would change the checkpoint's architecture")
    model = nnx.eval_shape(lambda: model_class(**kwargs, **overrides, rngs=nnx.Rngs(0)))
    load_params(model, state_dict)
    return model


def dotted_name(path: tuple, rename: Mapping[str, str], special: Mapping | None = None) -> str:
    """The checkpoint's key of one of our parameter paths: string components through ``rename``
    (or as they are), indices as numbers, a component in ``special`` as ``special[part](path)``
    (for a name that depends on where in the model it sits), joined with dots."""
    special = special or {}
    return ".".join(
        special[p](path) if p in special else rename.get(p, p) if isinstance(p, str) else str(p)
        for p in path
    )


# Attention names of diffusers checkpoints saved before 0.14 (e.g. google/ddpm-*, sd-vae-ft-*).
_LEGACY_ATTENTION = {
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "proj_attn": "to_out.0",
}


def _modernise_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename legacy attention keys (`...attentions.N.query.weight`) to the current names."""
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if len(parts) >= 4 and parts[-4] == "attentions" and parts[-2] in _LEGACY_ATTENTION:
            key = ".".join([*parts[:-2], _LEGACY_ATTENTION[parts[-2]], parts[-1]])
        if key in out:
            raise ValueError(f"checkpoint holds both the legacy and current name of {key!r}")
        out[key] = value
    return out


def to_flax_layout(array: np.ndarray, leaf: str, target_ndim: int) -> np.ndarray:
    """torch (O, I, kh, kw) conv -> (kh, kw, I, O); torch (O, I) linear -> (I, O).

    Norm scales/biases and embedding tables have the same layout in both frameworks.
    """
    if leaf != "kernel":
        return array
    if target_ndim == 4 and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if target_ndim == 2 and array.ndim == 4 and array.shape[2:] == (1, 1):
        array = array[:, :, 0, 0]  # a 1x1 conv used as a linear layer (old checkpoints)
    if target_ndim == 2 and array.ndim == 2:
        return array.T
    return array


def load_tensors(model, tensors, name_of, layout, what: str, extra_unused=()) -> None:
    """Set every parameter of ``model`` to ``layout(tensors[name_of(path)], leaf, ndim)`` (our
    layout); one ValueError lists what does not fit, ``extra_unused`` after the unused tensors."""

    def find(path, ndim):
        name = name_of(path)
        if name not in tensors:
            return name, None
        return name, layout(np.asarray(tensors[name]), path[-1], ndim)

    used, missing, mismatched = copy_params(model, find)
    check_fit(what, missing, mismatched, sorted(set(tensors) - used) + list(extra_unused))


def load_named_params(model, state_dict, name_of, what: str) -> None:
    """Copy tensors named ``name_of(path)`` (diffusers' names, legacy attention names accepted)
    into ``model``, in our layout."""
    load_tensors(model, _modernise_keys(state_dict), name_of, to_flax_layout, what)
