"""DiT with a pooled condition vector (pooled_dim): it reaches the output through adaLN, a zero
pooled embedding leaves the unpooled model's output, the unpooled model is untouched, and bad
input names `pooled`; with scanned and unrolled blocks."""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusax.models import make_apply_fn
from diffusax.models.dit import DiT, dit_flops

POOLED = 16
TINY = dict(depth=2, hidden=32, heads=2, patch=2, input_size=8, in_channels=4, num_classes=10)


def build(pooled_dim=POOLED, **kwargs) -> DiT:
    return DiT(**(TINY | kwargs), pooled_dim=pooled_dim, rngs=nnx.Rngs(0))


def randomise(model: DiT) -> DiT:
    """Every parameter random (the adaLN modulations and the output start at zero, which would
    hide the condition), seeded by its path so that models sharing paths get equal values."""
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            key = jax.random.key(zlib.crc32("/".join(map(str, path)).encode()))
            value = var.get_value()
            var.set_value(0.3 * jax.random.normal(key, value.shape, value.dtype))
    return model


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, x, t, y, pooled):
    return nnx.merge(graphdef, state)(x, t, y, pooled=pooled)


def apply(model, x, t, y, pooled=None):
    return _apply(*nnx.split(model), x, t, y, pooled)


def inputs(batch: int = 3, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 8, 8, 4), dtype=np.float32)
    t = np.array([0, 500, 999][:batch])
    y = np.array([1, 10, 4][:batch])  # 10: the null label
    pooled = rng.standard_normal((batch, POOLED), dtype=np.float32)
    return x, t, y, pooled


@pytest.mark.parametrize("scan_blocks", [True, False], ids=["scan", "unrolled"])
def test_output_depends_on_pooled(scan_blocks):
    model = randomise(build(scan_blocks=scan_blocks))
    x, t, y, pooled = inputs()
    out = apply(model, x, t, y, pooled)
    assert out.shape == (3, 8, 8, 8) and out.dtype == jnp.float32
    other = apply(model, x, t, y, inputs(seed=2)[3])
    assert np.all(np.abs(np.asarray(out - other)).max(axis=(1, 2, 3)) > 1e-2)  # every example
    np.testing.assert_array_equal(out, apply(model, x, t, y, pooled))  # deterministic


@pytest.mark.parametrize("scan_blocks", [True, False], ids=["scan", "unrolled"])
def test_zero_pooled_embedding_is_the_unpooled_model(scan_blocks):
    pooled_model = build(scan_blocks=scan_blocks)
    plain = build(pooled_dim=None, scan_blocks=scan_blocks)
    # The same Rngs draw the same weights for every shared parameter: the pooled embedder is
    # built last.
    shared = nnx.to_flat_state(nnx.state(plain, nnx.Param))
    ours = dict(nnx.to_flat_state(nnx.state(pooled_model, nnx.Param)))
    assert {p for p in ours if p[0] == "pooled_embedder"} and not any(
        p[0] == "pooled_embedder" for p, _ in shared
    )
    for path, value in shared:
        np.testing.assert_array_equal(value[...], ours[path][...], err_msg=str(path))
    randomise(pooled_model)
    randomise(plain)
    x, t, y, pooled = inputs()
    assert np.abs(np.asarray(apply(pooled_model, x, t, y, pooled) - apply(plain, x, t, y))).max()
    embedder = pooled_model.pooled_embedder
    for var in (embedder.mlp_2.kernel, embedder.mlp_2.bias):
        var.set_value(jnp.zeros_like(var.get_value()))
    # c + 0 is c: bitwise the unpooled output.
    np.testing.assert_array_equal(apply(pooled_model, x, t, y, pooled), apply(plain, x, t, y))


def test_scan_and_unrolled_agree_and_existing_calls_still_work():
    scanned = randomise(build(scan_blocks=True))
    unrolled = build(scan_blocks=False)
    stacked = {p: v[...] for p, v in nnx.to_flat_state(nnx.state(scanned, nnx.Param))}
    for path, var in nnx.iter_graph(unrolled):  # block i of the unrolled model: stack row i
        if isinstance(var, nnx.Param):
            if path[0] == "blocks":
                var.set_value(stacked[(path[0], *path[2:])][path[1]])
            else:
                var.set_value(stacked[path])
    x, t, y, pooled = inputs()
    np.testing.assert_allclose(
        apply(scanned, x, t, y, pooled), apply(unrolled, x, t, y, pooled), atol=1e-5, rtol=0
    )
    # Unconditional on labels, conditioned on pooled only; keyword use of y.
    model = randomise(build(num_classes=None))
    out = model(jnp.asarray(x), jnp.asarray(t), pooled=jnp.asarray(pooled))
    assert out.shape == (3, 8, 8, 8)
    # The functional apply the losses use still calls model(x, t, y, dropout_key=...).
    plain = randomise(build(pooled_dim=None))
    gd, params = nnx.split(plain, nnx.Param)
    np.testing.assert_allclose(
        make_apply_fn(gd)(params, x, t, y, jax.random.key(0)),
        plain(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y), dropout_key=jax.random.key(0)),
        atol=1e-5,
    )


def test_bad_pooled_input_names_it():
    model = build()
    x, t, y, pooled = inputs()
    x, t, y = jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)
    with pytest.raises(ValueError, match=r"pooled_dim=16: pass pooled"):
        model(x, t, y)
    with pytest.raises(ValueError, match=r"pooled must be \(B, pooled_dim\)=\(3, 16\).*\(3, 8\)"):
        model(x, t, y, pooled=jnp.zeros((3, 8)))
    with pytest.raises(ValueError, match=r"pooled must be .*\(2, 16\)"):
        model(x, t, y, pooled=jnp.zeros((2, 16)))
    with pytest.raises(ValueError, match=r"pooled must be .*int32"):
        model(x, t, y, pooled=jnp.zeros((3, 16), jnp.int32))
    with pytest.raises(ValueError, match=r"pooled given but .*pooled_dim=None"):
        build(pooled_dim=None)(x, t, y, pooled=jnp.asarray(pooled))
    with pytest.raises(ValueError, match="pooled must be"):  # raised while tracing, too
        jax.jit(lambda p: model(x, t, y, pooled=p))(jnp.zeros((3, 15)))
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="pooled_dim must be"):
            build(pooled_dim=bad)


def test_flops_count_the_pooled_mlp():
    sizes = {k: TINY[k] for k in ("depth", "hidden", "heads", "patch")}
    extra = dit_flops(sizes, 8, 4, pooled_dim=POOLED) - dit_flops(sizes, 8, 4)
    assert extra == POOLED * 32 + 32 * 32
