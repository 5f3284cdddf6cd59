"""The layers of src/diffusax import only downwards, and no module uses another's private names.

Every module under src/diffusax is parsed with ``ast`` (nothing is imported), including the
imports inside functions, which the code uses to keep heavy dependencies lazy:

- models (the networks) import nothing from losses, train, methods or config;
- data imports nothing from config, train or methods (it raises its own
  ``data.DataConfigError``, a ``ValueError``, instead of ``config.ConfigError``);
- no module imports a private name (``from X import _name``: one leading underscore, not a
  dunder) or uses one as an attribute of a module (``module._name``), from any package.

A failure names the file, the line and the offending import or attribute.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "diffusax"

# layer (a package prefix) -> the packages/modules it must not import
FORBIDDEN = {
    "diffusax.models": ("diffusax.losses", "diffusax.train", "diffusax.methods", "diffusax.config"),
    "diffusax.data": ("diffusax.config", "diffusax.train", "diffusax.methods"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULE_FILES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
# Importable module names, packages without an __init__.py (namespace packages) included.
KNOWN_MODULES = set(MODULE_FILES) | {
    module_name(d / "__init__.py") for d in PACKAGE.rglob("*") if d.is_dir() and d.name[0] != "_"
}


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@dataclass(frozen=True)
class Import:
    line: int
    target: str  # the module imported from, or the submodule imported by `from pkg import mod`
    name: str | None  # the name taken by `from X import name`; None for `import X`


def resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module of ``from <node.module> import ...`` written in ``module``."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, source: str, is_package: bool = False) -> list[Import]:
    """Every import in ``source`` (module level and inside functions/classes)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [Import(node.lineno, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            origin = resolve_from(module, is_package, node)
            for alias in node.names:
                sub = f"{origin}.{alias.name}"
                found.append(
                    Import(node.lineno, sub if sub in KNOWN_MODULES else origin, alias.name)
                )
    return found


def module_bindings(module: str, source: str, is_package: bool = False) -> dict[str, str]:
    """Local names bound to modules: ``import a.b`` binds a, ``import a.b as m`` and
    ``from a import b`` (b a diffusax module) bind m / b. Third-party ``from X import Y`` is
    not resolved (that would need importing X)."""
    names = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom):
            origin = resolve_from(module, is_package, node)
            for alias in node.names:
                sub = f"{origin}.{alias.name}"
                if sub in KNOWN_MODULES:
                    names[alias.asname or alias.name] = sub
    return names


def dotted(node: ast.expr, bindings: dict[str, str]) -> str | None:
    """``a.b.c`` as a dotted module path when ``a`` is bound to a module, else None."""
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in bindings:
        return None
    return ".".join([bindings[node.id], *reversed(attrs)])


def layer_violations(module: str, source: str, is_package: bool = False) -> list[tuple[int, str]]:
    bad = []
    for layer, forbidden in FORBIDDEN.items():
        if not within(module, layer):
            continue
        for imp in imports_of(module, source, is_package):
            for target in forbidden:
                if within(imp.target, target):
                    what = f"from {imp.target} import {imp.name}" if imp.name else imp.target
                    bad.append((imp.line, f"{module} ({layer}) imports {what}"))
    return sorted(bad)


def private_violations(module: str, source: str, is_package: bool = False) -> list[tuple[int, str]]:
    bad = []
    for imp in imports_of(module, source, is_package):
        if imp.name and is_private(imp.name):
            bad.append((imp.line, f"from {imp.target} import {imp.name}"))
    bindings = module_bindings(module, source, is_package)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            owner = dotted(node.value, bindings)
            if owner is not None and owner != module:
                bad.append((node.lineno, f"uses {owner}.{node.attr}"))
    return sorted(set(bad))


def read(module: str) -> tuple[str, bool]:
    path = MODULE_FILES[module]
    return path.read_text(encoding="utf-8"), path.name == "__init__.py"


def report(module: str, bad: list[tuple[int, str]]) -> str:
    """``src/diffusax/x.py:LINE: what`` per violation."""
    path = MODULE_FILES[module].relative_to(SRC.parent)
    return "\n".join(f"{path}:{line}: {what}" for line, what in bad)


LAYERED = [m for m in MODULE_FILES if any(within(m, layer) for layer in FORBIDDEN)]


def test_every_module_is_found():
    assert {"diffusax.main", "diffusax.data.latents", "diffusax.models.dit"} <= set(MODULE_FILES)
    assert any(m.startswith("diffusax.models.") for m in LAYERED)
    assert any(m.startswith("diffusax.data.") for m in LAYERED)


@pytest.mark.parametrize("module", LAYERED)
def test_lower_layers_do_not_import_upper_ones(module):
    source, is_package = read(module)
    bad = layer_violations(module, source, is_package)
    assert not bad, "an upper layer imported:\n" + report(module, bad)


@pytest.mark.parametrize("module", list(MODULE_FILES))
def test_no_private_names_across_modules(module):
    source, is_package = read(module)
    bad = private_violations(module, source, is_package)
    assert not bad, "another module's private name used:\n" + report(module, bad)


def test_the_checks_catch_what_they_should():
    # A synthetic models module and data module with every kind of violation.
    source = (
        "import numpy as np\n"
        "from diffusax import config\n"
        "from diffusax.train.loop import train\n"
        "def f():\n"
        "    from ..losses import eps_prediction_loss\n"
        "    import diffusax.methods.ddpm as ddpm\n"
        "    from diffusax.data.tfds_source import _hidden\n"
        "    from diffusax.train import loop\n"
        "    loop._shardings(1)\n"
        "    np._private_helper()\n"
        "    return self_like._fine(), loop.__name__, config.__file__\n"
    )
    layers = layer_violations("diffusax.models.fake", source)
    assert [line for line, _ in layers] == [2, 3, 5, 6, 8], layers
    assert "imports from diffusax.losses import eps_prediction_loss" in layers[2][1]
    data_layers = layer_violations("diffusax.data.fake", source)
    assert [line for line, _ in data_layers] == [2, 3, 6, 8], data_layers
    private = private_violations("diffusax.models.fake", source)
    assert private == [
        (7, "from diffusax.data.tfds_source import _hidden"),
        (9, "uses diffusax.train.loop._shardings"),
        (10, "uses numpy._private_helper"),
    ], private
    assert not layer_violations("diffusax.sampling", source)  # the rules bind only their layer
