"""What every diffusers converter shares: reading a `save_pretrained` folder, copying arrays into
an nnx model, and one error that lists everything that does not fit."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"

# find(path, target_ndim) -> (the checkpoint's name for the parameter, its array in our layout,
# or None when the checkpoint has no such tensor).
Finder = Callable[[tuple, int], tuple[str, np.ndarray | None]]


def read_folder(path: str | os.PathLike, class_name: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json as a dict, the safetensors state dict as numpy) of a diffusers model folder.

    Read with `safetensors.numpy`: no PyTorch needed. A FileNotFoundError names the missing
    file; a folder holding only the legacy .bin says how to re-save it.
    """
    from safetensors.numpy import load_file  # lazy: only the converters need safetensors

    config_file = os.path.join(path, CONFIG_NAME)
    weights_file = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path!s}")
    if not os.path.isfile(weights_file):
        hint = ""
        if os.path.isfile(os.path.join(path, "diffusion_pytorch_model.bin")):
            hint = (
                f" (only the .bin is there: re-save it with safetensors, e.g. "
                f"{class_name}.from_pretrained(path).save_pretrained(path))"
            )
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path!s}{hint}")
    with open(config_file) as f:
        config = json.load(f)
    return config, load_file(weights_file)


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
