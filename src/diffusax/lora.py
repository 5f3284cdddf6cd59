"""LoRA adapters as pure functions over parameter trees, and their diffusers/PEFT and kohya files.

The maths. A LoRA adapter replaces a frozen kernel W by W + s·A·B with a rank-r pair of factors
and a scale s = alpha / r. In our layouts:

- dense kernel W (in, out):          A (in, r),          B (r, out),  ΔW = A @ B;
- conv kernel W (kh, kw, in, out):   A (kh, kw, in, r),  B (r, out),  ΔW = einsum('hwir,ro->hwio');
- a scanned stack of L dense kernels W (L, in, out) (a DiT's blocks under ``model.scan_blocks``):
  one pair per block, A (L, in, r), B (L, r, out), ΔW = einsum('lir,lro->lio').

The conv factorisation is a conv to r channels (A, same window, stride and padding as W) followed
by a 1x1 conv (B); the two compose into one conv with kernel ΔW, so merging is exact in real
arithmetic. A starts like PEFT's default (kaiming-uniform, a = √5: U(±1/√fan_in), fan_in =
in·kh·kw) and B at zero, so a fresh adapter leaves the network unchanged and training starts from
the base model. With B = 0 the gradient w.r.t. A is zero too (dL/dA = dL/dΔW · Bᵀ): only B moves
on the first step.

Nothing here wraps a module: ``merge(base, adapters, scale)`` returns the parameter tree a pure
apply function takes, so a train step differentiates w.r.t. the adapter tree alone and the base is
a constant argument, never updated.

Trees. An adapter tree is ``{adapter_key(path): {"A": a, "B": b}}``, the pure dict of an
:class:`Adapters` module (``train.state.split_params``); its keys join the module path with
``SEP`` = "__" (why: at ``SEP``). Targets are chosen by regular expressions over the module path
joined with "." (``"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"``).

Files (safetensors, read and written with ``safetensors.numpy``: no torch needed):

- ours (``save_adapters``): keys ``{adapter_key}.A`` / ``.B`` in our layout; rank, alpha and the
  target patterns in the header metadata; scale = alpha / rank.
- diffusers/PEFT (``export_peft``, ``import_lora``): ``unet.<module>.lora_A.weight`` (torch linear
  (r, in), conv (r, in, kh, kw)) and ``.lora_B.weight`` ((out, r), conv (out, r, 1, 1)); PEFT's
  scale lora_alpha / r (or lora_alpha / √r with ``use_rslora``). diffusers saves lora_alpha only
  in the header's JSON ``lora_adapter_metadata`` (``{"unet.lora_alpha": ..., "unet.r": ...}``)
  and only when the caller passes ``unet_lora_adapter_metadata``; without it it loads alpha = r.
- kohya (sd-scripts, SD 1.x naming; ``import_lora``): ``lora_unet_<module with "." -> "_">``
  ``.lora_down.weight`` (= lora_A), ``.lora_up.weight`` (= lora_B) and a scalar ``.alpha``; scale
  alpha / r per module (alpha absent: 1). SDXL files use the original (sgm) module names, which
  our networks do not have: they are refused as unknown modules.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Adapter keys join the module path with "__", not ".": Orbax names every array by its tree path
# joined with "." so, with "." inside keys, {"a.b": {"A": x}} and {"a": {"b": {"A": y}}} save to
# the same name and one silently overwrites the other (seen with orbax 0.12). "/" avoids that
# under OCDBT but fails without it; "__" works in both and occurs in none of our module names.
SEP = "__"
FORMAT = "diffusax-lora"  # the "format" field of our own files' metadata
_KOHYA = "lora_unet_"
_TEXT_ENCODER = ("lora_te", "text_encoder")  # kohya lora_te_/te1_/te2_; diffusers text_encoder(_2).


# ---------------------------------------------------------------------------------------------
# Targets and the adapter module


def _kernels(params) -> dict[tuple, jax.Array]:
    """{path: leaf} of every leaf named 'kernel', with the tree's own keys (ints stay ints)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = {tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p): x for p, x in flat}
    return {p: x for p, x in paths.items() if p[-1] == "kernel"}


def _dotted(path: tuple) -> str:
    return ".".join(str(k) for k in (path[:-1] if path[-1] == "kernel" else path))


def target_paths(params, patterns: str | Sequence[str]) -> list[tuple]:
    """The kernel paths whose module path ("."-joined) ``re.search``-matches any pattern.

    Only dense (2-D), stacked dense (3-D: scanned blocks) and conv (4-D) kernels can take an
    adapter; a pattern that reaches another kernel is an error rather than a silent skip, so a
    typo in the patterns never trains less than asked.
    """
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    compiled = [re.compile(p) for p in patterns]
    chosen, wrong = [], []
    for path, leaf in _kernels(params).items():
        if any(c.search(_dotted(path)) for c in compiled):
            (chosen if len(leaf.shape) in (2, 3, 4) else wrong).append(path)
    if wrong:
        shapes = {_dotted(p): tuple(_kernels(params)[p].shape) for p in wrong}
        raise ValueError(
            f"LoRA patterns {patterns} match kernels that are not 2-D, 3-D or 4-D: {shapes}"
        )
    if not chosen:
        raise ValueError(f"LoRA patterns {patterns} match no dense or conv kernel")
    return chosen


def adapter_key(path: tuple) -> str:
    """The adapter tree's key of a kernel (or module) path: the module path joined with SEP."""
    parts = [str(k) for k in (path[:-1] if path[-1] == "kernel" else path)]
    if any(SEP in p for p in parts):
        raise ValueError(f"module path {path} contains {SEP!r}, the adapter key separator")
    return SEP.join(parts)


def _path_of(key: str) -> tuple:
    """adapter_key's inverse for converters' name functions (nnx.List indices are ints)."""
    return (*(int(p) if p.isdigit() else p for p in key.split(SEP)), "kernel")


class Adapters(nnx.Dict):
    """{adapter key: {"A": Param, "B": Param}} for kernels of the given shapes, at one rank.

    An nnx.Dict so that string keys (with no attribute-name restrictions) become plain keys of
    the pure dict that ``split_params`` returns, which Orbax checkpoints as it is.
    """

    def __init__(self, shapes: Mapping[str, tuple], rank: int, *, rngs: nnx.Rngs):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        for key in sorted(shapes):  # sorted: the same keys give the same draws, in any order
            shape = tuple(shapes[key])
            if len(shape) not in (2, 3, 4):
                raise ValueError(f"adapter {key!r}: kernel shape {shape} is neither dense nor conv")
            stacked = len(shape) == 3  # (L, in, out): L blocks, each its own pair
            fan_in = shape[1] if stacked else math.prod(shape[:-1])
            bound = 1.0 / math.sqrt(fan_in)  # kaiming-uniform, a = sqrt(5)
            a = jax.random.uniform(rngs.params(), (*shape[:-1], rank), jnp.float32, -bound, bound)
            b_shape = (shape[0], rank, shape[-1]) if stacked else (rank, shape[-1])
            b = jnp.zeros(b_shape, jnp.float32)
            self[key] = nnx.Dict(A=nnx.Param(a), B=nnx.Param(b))


def adapters_for(params, patterns, rank: int, key: jax.Array) -> Adapters:
    """Fresh adapters at ``rank`` for the kernels of ``params`` that ``patterns`` select."""
    kernels = _kernels(params)
    shapes = {adapter_key(p): tuple(kernels[p].shape) for p in target_paths(params, patterns)}
    return Adapters(shapes, rank, rngs=nnx.Rngs(params=key))


# ---------------------------------------------------------------------------------------------
# Merging


def delta(A, B, scale) -> jax.Array:
    """scale · A·B in our kernel layout (see the module docstring)."""
    if A.ndim == 2:
        product = A @ B
    elif A.ndim == 3:  # a scanned stack of dense kernels, one pair per block
        product = jnp.einsum("lir,lro->lio", A, B)
    else:
        product = jnp.einsum("hwir,ro->hwio", A, B)
    return scale * product


def merge(base_params, adapter_tree: Mapping, scale) -> dict:
    """base_params with W + delta(A, B, scale) at every adapted kernel; the rest as it is.

    Pure and jittable. A zero delta (B = 0) adds exact zeros, so the merged tree equals the base
    bit for bit: the sum is formed in float32 (or the kernel's wider dtype) and cast back to the
    kernel's dtype, which is exact for W + 0.
    """
    kernels = _kernels(base_params)
    by_key = {adapter_key(p): p for p in kernels}
    unknown = sorted(set(adapter_tree) - set(by_key))
    if unknown:
        raise ValueError(f"adapters for kernels the parameters do not have: {unknown[:5]}")
    updates = {}
    for key, ab in adapter_tree.items():
        w = kernels[by_key[key]]
        d = delta(ab["A"], ab["B"], scale)
        if d.shape != w.shape:
            raise ValueError(f"adapter {key!r} makes a {d.shape} delta for a {w.shape} kernel")
        updates[by_key[key]] = (w + d).astype(w.dtype)
    return _replace(base_params, updates)


def unmerge(merged_params, adapter_tree: Mapping, scale) -> dict:
    """merge's inverse up to float32 rounding: W' − delta(A, B, scale)."""
    return merge(merged_params, adapter_tree, -scale)  # -(s·AB) is exactly (-s)·AB


def _replace(tree, updates: dict[tuple, object], prefix: tuple = ()):
    """A copy of the nested dict ``tree`` with the leaves at ``updates``' paths replaced."""
    if not isinstance(tree, Mapping):
        return updates.get(prefix, tree)
    return {k: _replace(v, updates, (*prefix, k)) for k, v in tree.items()}


# ---------------------------------------------------------------------------------------------
# Our own file


def _write_atomically(path, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """safetensors to a temp file beside ``path``, then os.replace: a failed write (disk full,
    a bad array, a kill) leaves any earlier file at ``path`` as it was."""
    from safetensors.numpy import save_file

    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _read(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def save_adapters(
    path, tree: Mapping, *, rank: int, alpha: float, patterns: str | Sequence[str]
) -> None:
    """The adapter tree alone, in our layout, with what rebuilds and scales it in the header."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    arrays = {f"{k}.{n}": np.asarray(ab[n]) for k, ab in tree.items() for n in ("A", "B")}
    meta = {"format": FORMAT, "rank": str(int(rank)), "alpha": repr(float(alpha))}
    _write_atomically(path, arrays, {**meta, "patterns": json.dumps(patterns)})


def load_adapters(path) -> tuple[dict, dict]:
    """(adapter tree, {"rank", "alpha", "patterns"}) of a ``save_adapters`` file."""
    arrays, header = _read(path)
    if header.get("format") != FORMAT:
        raise ValueError(f"{path!s} is not a diffusax LoRA file (format {header.get('format')!r})")
    tree: dict = {}
    for name, value in arrays.items():
        key, part = name.rsplit(".", 1)
        tree.setdefault(key, {})[part] = jnp.asarray(value)
    meta = {
        "rank": int(header["rank"]),
        "alpha": float(header["alpha"]),
        "patterns": json.loads(header["patterns"]),
    }
    return tree, meta


# ---------------------------------------------------------------------------------------------
# diffusers / PEFT and kohya files


def _module_name(name_of: Callable[[tuple], str], path: tuple) -> str:
    name = name_of(path)
    if not name.endswith(".weight"):
        raise ValueError(f"{path}: the converter names it {name!r}, not a '<module>.weight'")
    return name.removesuffix(".weight")


def _to_torch(A, B) -> tuple[np.ndarray, np.ndarray]:
    """Our (A, B) as PEFT's (lora_A.weight, lora_B.weight)."""
    A, B = np.asarray(A, np.float32), np.asarray(B, np.float32)
    if A.ndim == 2:
        return A.T, B.T
    return A.transpose(3, 2, 0, 1), B.T[:, :, None, None]


def export_peft(
    path, adapter_tree: Mapping, scale, name_of: Callable[[tuple], str], prefix: str = "unet"
) -> None:
    """A diffusers/PEFT LoRA file of the adapters, loadable by ``pipe.load_lora_weights(path)``
    and ``unet.load_lora_adapter(path, prefix="unet")``.

    The scale is baked into lora_B and no lora_alpha is written: diffusers then takes alpha = r
    per module (scale 1), which every one of its loading paths does alike; a lora_alpha in the
    ``lora_adapter_metadata`` header would be read by some paths and silently dropped by others
    (``unet.load_lora_adapter(file)`` without ``use_safetensors=True`` reads no header).
    """
    lead = f"{prefix}." if prefix else ""
    stacked = sorted(k for k, ab in adapter_tree.items() if np.ndim(ab["A"]) == 3)
    if stacked:
        raise ValueError(
            f"adapters on scanned blocks {stacked[:3]} have no per-module PEFT names: train with "
            "model.scan_blocks=False to export them"
        )
    arrays = {}
    for key, ab in adapter_tree.items():
        module = _module_name(name_of, _path_of(key))
        arrays[f"{lead}{module}.lora_A.weight"], arrays[f"{lead}{module}.lora_B.weight"] = (
            _to_torch(ab["A"], scale * np.asarray(ab["B"], np.float32))
        )
    _write_atomically(path, arrays, {"format": "pt"})


def _peft_alpha(metadata: dict[str, str], prefix: str) -> Callable[[str, int], float]:
    """module, rank -> the scale diffusers gives the module, from its ``lora_adapter_metadata``
    (none: alpha = rank). The rank is the tensors' own, which PEFT's rank_pattern restates."""
    raw = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    lead = f"{prefix}."
    config = {k.removeprefix(lead): v for k, v in raw.items() if k.startswith(lead)} or raw
    if config.get("use_dora"):
        raise ValueError("the file is a DoRA adapter, which import_lora does not apply")
    alpha, pattern = config.get("lora_alpha"), config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))

    def scale(module: str, rank: int) -> float:
        # PEFT's pattern rule: a key matches a module whose name ends in ".<key>" or is <key>.
        hit = next((k for k in pattern if re.match(rf"(.*\.)?({k})$", module)), None)
        a = pattern[hit] if hit is not None else (alpha if alpha is not None else rank)
        return a / math.sqrt(rank) if rslora else a / rank

    return scale


def import_lora(
    path_or_state_dict, base_params, name_of: Callable[[tuple], str], prefix: str = "unet"
) -> tuple[dict, float]:
    """(adapter tree, 1.0) from a diffusers/PEFT or kohya LoRA file (or its state dict).

    Each module's own scale (kohya's alpha / r, or PEFT's from the header) is folded into its B
    and the returned scale is 1.0, because modules of one file may differ in alpha and rank and
    ``merge`` takes one scale. Modules are matched by naming every kernel of ``base_params`` the
    way each format does (kohya's "_" for "." is ambiguous to parse, unambiguous to build). One
    ValueError names every key that does not fit: modules the base lacks, text-encoder keys
    (this applies U-Net adapters only), a factor without its partner, shape mismatches, keys of
    neither format.
    """
    if isinstance(path_or_state_dict, Mapping):
        state, header = {k: np.asarray(v) for k, v in path_or_state_dict.items()}, {}
    else:
        state, header = _read(path_or_state_dict)
    kernels = {p: w for p, w in _kernels(base_params).items() if len(w.shape) in (2, 4)}
    peft_names = {_module_name(name_of, p): p for p in kernels}
    kohya_names: dict[str, tuple | None] = {}
    for module, p in peft_names.items():
        name = _KOHYA + module.replace(".", "_")
        kohya_names[name] = None if name in kohya_names else p  # None: two modules, one name

    found: dict[tuple, dict] = {}  # path -> {"down", "up", and "alpha" (kohya) or "peft"}
    problems: dict[str, list[str]] = {}
    lead = f"{prefix}." if prefix else ""
    peft_scale = _peft_alpha(header, prefix)
    for key, value in state.items():
        bare = key.removeprefix(lead) if lead else key
        if key.startswith(_TEXT_ENCODER):
            problems.setdefault("text-encoder keys, which this does not apply", []).append(key)
        elif key.startswith(_KOHYA):
            module, _, part = key.partition(".")
            role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(part)
            path = kohya_names.get(module)
            if role is None:
                problems.setdefault("keys of neither format", []).append(key)
            elif path is None:
                why = "ambiguous kohya names" if module in kohya_names else "unknown modules"
                problems.setdefault(f"{why} for this base", []).append(key)
            else:
                found.setdefault(path, {"name": module})[role] = value
        elif bare.endswith((".lora_A.weight", ".lora_B.weight")):
            module, role, _ = bare.rsplit(".", 2)
            path = peft_names.get(module)
            if path is None:
                problems.setdefault("unknown modules for this base", []).append(key)
            else:
                entry = found.setdefault(path, {"name": key.rsplit(".", 2)[0], "peft": module})
                entry["down" if role == "lora_A" else "up"] = value
        else:
            problems.setdefault("keys of neither format", []).append(key)

    tree = {}
    for path, entry in found.items():
        w = kernels[path]
        name = entry["name"]
        if "down" not in entry or "up" not in entry:
            problems.setdefault("factors without their partner", []).append(name)
            continue
        A, B = _from_torch(entry["down"], entry["up"], w.shape)
        if A is None:
            shapes = f"{np.shape(entry['down'])}, {np.shape(entry['up'])} for kernel {w.shape}"
            problems.setdefault("shape mismatches", []).append(f"{name}: {shapes}")
            continue
        rank = A.shape[-1]
        if "peft" in entry:
            scale = peft_scale(entry["peft"], rank)
        else:
            scale = float(np.asarray(entry["alpha"])) / rank if "alpha" in entry else 1.0
        tree[adapter_key(path)] = {"A": jnp.asarray(A), "B": jnp.asarray(scale * B)}
    if not state:
        problems["an empty file"] = []
    if problems:
        lines = [f"{why}: {', '.join(keys[:8])}" for why, keys in problems.items()]
        raise ValueError("cannot import the LoRA file:\n  " + "\n  ".join(lines))
    return tree, 1.0


def _from_torch(down, up, shape: tuple):
    """PEFT's (lora_A.weight, lora_B.weight) in our layout for a kernel of ``shape``, or
    (None, None) when they do not fit it."""
    down, up = np.asarray(down, np.float32), np.asarray(up, np.float32)
    if len(shape) == 2 and down.ndim == up.ndim == 2:
        A, B = down.T, up.T
    elif len(shape) == 4 and down.ndim == up.ndim == 4 and up.shape[2:] == (1, 1):
        A, B = down.transpose(2, 3, 1, 0), up[:, :, 0, 0].T
    else:
        return None, None
    rank = A.shape[-1]
    if A.shape != (*shape[:-1], rank) or B.shape != (rank, shape[-1]):
        return None, None
    return A, B


__all__ = [
    "SEP",
    "Adapters",
    "adapter_key",
    "adapters_for",
    "delta",
    "export_peft",
    "import_lora",
    "load_adapters",
    "merge",
    "save_adapters",
    "target_paths",
    "unmerge",
]
