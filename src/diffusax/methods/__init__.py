"""Methods, found through a registry: a method is one module of this package.

    method = methods.get(cfg.method)          # ConfigError naming 'method' if unknown
    method.networks(cfg, data), method.groups(cfg), method.updates(cfg, ctx), ...

Each module registers one ``base.Method`` instance with ``register`` when imported; ``get``
imports ``diffusax.methods.<name>`` on first use (big_vision's registry), so adding a method is
adding a module. `diffusax.methods.base` documents what a method declares.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil

# The denoising helpers every diffusion method and inference share.
from diffusax.conditions import sample_labels
from diffusax.methods.base import (
    Ema,
    GradUpdate,
    Group,
    Method,
    Network,
    register,
    registered,
    registered_names,
)
from diffusax.methods.ddpm import (
    generate_many,
    make_generate,
    make_loss,
    make_schedule,
    padded_batch_size,
)


def names() -> list[str]:
    """Every method: the modules of this package (imported or not) and any registered."""
    here = __path__  # type: ignore[name-defined]
    modules = {m.name for m in pkgutil.iter_modules(here) if m.name != "base"}
    return sorted(modules | set(registered_names()))


def get(name: str) -> Method:
    """The registered method ``name``; ConfigError naming the field for an unknown one."""
    if registered(name) is None and name in names():
        importlib.import_module(f"diffusax.methods.{name}")
    method = registered(name)
    if method is None:
        from diffusax.config import ConfigError

        close = difflib.get_close_matches(str(name), names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"config field 'method' is {name!r}; choose one of {names()}{hint}")
    return method


__all__ = [
    "Ema",
    "GradUpdate",
    "Group",
    "Method",
    "Network",
    "generate_many",
    "get",
    "make_generate",
    "make_loss",
    "make_schedule",
    "names",
    "padded_batch_size",
    "register",
    "sample_labels",
]
