"""Checkpointer against real Orbax checkpoints on disk, with states sharded on 8 fake CPU devices."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffusax.checkpoint import (
    CheckpointDamagedWarning,
    Checkpointer,
    CheckpointMismatchError,
    DamagedCheckpointError,
    nonfinite_leaves,
    param_name,
)


def mesh_of(n: int) -> jax.sharding.Mesh:
    return jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])


def place(state, mesh):
    """Shard every array's leading axis over `data` when it divides, else replicate."""

    def put(x):
        size = mesh.shape["data"]
        spec = P("data") if x.ndim and x.shape[0] % size == 0 else P()
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree.map(put, state)


def make_state(seed: int, mesh, dense_out: int = 8):
    """A small train state: NNX params, EMA, an optax Adam state, a step and a PRNG key."""
    model = nnx.Sequential(
        nnx.Conv(2, 8, (3, 3), rngs=nnx.Rngs(seed)),
        nnx.Linear(8, dense_out, rngs=nnx.Rngs(seed + 1)),
    )
    params = nnx.state(model, nnx.Param)
    ema = jax.tree.map(lambda x: (0.5 * x).astype(jnp.bfloat16), params)
    opt_state = optax.adam(1e-3).init(params)
    opt_state = jax.tree.map(lambda x: x + 0.25 if x.dtype == jnp.float32 else x + 3, opt_state)
    state = {
        "params": params,
        "ema": ema,
        "opt_state": opt_state,
        "step": jnp.array(seed, jnp.int32),
        "rng": jax.random.key(seed),
    }
    return place(state, mesh)


def abstract(state):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def to_host(x) -> np.ndarray:
    """Host copy of an array; typed PRNG keys as their key data."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def assert_bitwise_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(to_host(a), to_host(b))


def assert_shardings(got, target):
    for a, t in zip(jax.tree.leaves(got), jax.tree.leaves(target), strict=True):
        assert a.sharding.is_equivalent_to(t.sharding, len(t.shape)), (a.sharding, t.sharding)


@pytest.fixture(scope="module")
def mesh8():
    return mesh_of(8)


@pytest.fixture(scope="module")
def states(mesh8):
    """Three distinct states on the 8-device mesh, built once for the module."""
    return {seed: make_state(seed, mesh8) for seed in (1, 2, 3)}


def test_round_trip_bitwise_with_extra_after_reopen(tmp_path, states):
    extra = {"data_position": 1234, "digest": "ab12", "lr": 1e-4, "nested": {"epochs": [1, 2]}}
    with Checkpointer(tmp_path, save_every=10, keep=3) as ckpt:
        assert ckpt.save(10, states[1], extra)
        extra["data_position"] = -1  # mutating after an async save must not change the file
    # A new Checkpointer on the same directory: what a restarted trainer sees.
    with Checkpointer(tmp_path, save_every=10, keep=3) as ckpt:
        assert ckpt.latest_step() == 10
        target = abstract(states[1])
        step, state, got_extra = ckpt.restore(target)
    assert step == 10
    assert got_extra == {**extra, "data_position": 1234}
    assert isinstance(state["params"], nnx.State)
    assert_bitwise_equal(state, states[1])
    assert_shardings(state, target)


def test_save_every_force_and_step_order(tmp_path, states):
    with Checkpointer(tmp_path, save_every=5, keep=10, async_save=False) as ckpt:
        assert not ckpt.save(3, states[1], {})  # not due: nothing written
        assert ckpt.all_steps() == []
        assert ckpt.save(5, states[1], {})
        assert not ckpt.save(6, states[1], {})
        assert ckpt.save(7, states[2], {}, force=True)  # e.g. the last step of a run
        assert not ckpt.save(7, states[2], {}, force=True)  # already the latest: no-op
        with pytest.raises(ValueError, match="older than the latest"):
            ckpt.save(6, states[1], {}, force=True)
        assert ckpt.all_steps() == [5, 7]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["5", "7"]


def test_keep_last_k_and_resume_from_latest(tmp_path, states):
    with Checkpointer(tmp_path, save_every=2, keep=2) as ckpt:
        for step in (2, 4, 6):
            ckpt.save(step, states[step // 2], {"at": step})
        ckpt.wait()
        assert ckpt.all_steps() == [4, 6]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["4", "6"]
    with Checkpointer(tmp_path, save_every=2, keep=2) as ckpt:
        step, state, extra = ckpt.restore(abstract(states[1]))
        assert (step, extra) == (6, {"at": 6})
        assert_bitwise_equal(state, states[3])
        step, state, extra = ckpt.restore(abstract(states[1]), step=4)
        assert (step, extra) == (4, {"at": 4})
        assert_bitwise_equal(state, states[2])
        with pytest.raises(FileNotFoundError, match="2"):
            ckpt.restore(abstract(states[1]), step=2)


def test_async_save_is_safe_to_donate_and_completes_on_wait(tmp_path, mesh8, states):
    state = make_state(7, mesh8)
    expected = jax.tree.map(to_host, state)
    with Checkpointer(tmp_path, save_every=1, keep=2, async_save=True) as ckpt:
        assert ckpt.save(1, state, {})
        # The train step donates its input buffers: the save must already hold its own copy.
        for leaf in jax.tree.leaves(state):
            leaf.delete()
        ckpt.wait()
        assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]
        _, restored, _ = ckpt.restore(abstract(states[1]))
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(to_host(got), want)


@pytest.mark.parametrize("save_on, restore_on", [(8, 4), (8, 1), (1, 8), (4, 8)])
def test_restore_onto_another_mesh(tmp_path, states, save_on, restore_on):
    written = place(states[1], mesh_of(save_on))
    with Checkpointer(tmp_path, save_every=1, keep=1, async_save=False) as ckpt:
        ckpt.save(1, written, {})
        target = abstract(place(states[1], mesh_of(restore_on)))
        _, state, _ = ckpt.restore(target)
    assert_bitwise_equal(state, states[1])
    assert_shardings(state, target)
    devices = {d for leaf in jax.tree.leaves(state) for d in leaf.sharding.device_set}
    assert len(devices) == restore_on


def test_non_finite_leaf_is_refused_and_nothing_is_written(tmp_path, states):
    with Checkpointer(tmp_path, save_every=1, keep=1, async_save=False) as ckpt:
        ckpt.save(1, states[1], {"a": 1})

        def poison(path, x):
            if param_name(path) != "ema.layers.1.kernel.value":
                return x
            host = to_host(x).copy()
            host[0, 0] = np.nan
            return jax.device_put(host, x.sharding)

        bad = jax.tree_util.tree_map_with_path(poison, states[2])
        with pytest.raises(FloatingPointError, match=r"ema\.layers\.1\.kernel"):
            ckpt.save(2, bad, {})
        with pytest.raises(FloatingPointError, match=r"extra\['loss'\]"):
            ckpt.save(2, states[2], {"loss": float("inf")})
        assert ckpt.all_steps() == [1]
        assert sorted(p.name for p in tmp_path.iterdir() if p.name[0].isdigit()) == ["1"]
        step, state, extra = ckpt.restore(abstract(states[1]))
    assert (step, extra) == (1, {"a": 1})
    assert_bitwise_equal(state, states[1])


def test_nonfinite_leaves_across_meshes_and_host_values(mesh8):
    on_mesh = jax.device_put(jnp.ones((8, 2)), NamedSharding(mesh8, P("data")))
    on_device = jax.device_put(jnp.array([1.0, jnp.inf]), jax.devices()[3])
    other = jax.device_put(jnp.array([0.0, jnp.nan, 1.0, 2.0]), NamedSharding(mesh_of(4), P()))
    tree = {
        "a": on_mesh,
        "b": on_device,
        "c": other,
        "d": np.float32(np.nan),
        "e": 2.0,
        "f": jnp.array([7], jnp.int32),
        "k": jax.random.key(0),
    }
    assert nonfinite_leaves(tree) == ["b", "c", "d"]
    assert nonfinite_leaves({"a": on_mesh, "e": 2.0}) == []


def _truncate_data_file(step_dir: Path) -> Path:
    """Halve the largest array-data file of the state item."""
    data = [p for p in (step_dir / "state" / "d").iterdir() if p.is_file()]
    victim = max(data, key=lambda p: p.stat().st_size)
    os.truncate(victim, victim.stat().st_size // 2)
    return victim


def _truncate_metadata(step_dir: Path) -> Path:
    victim = step_dir / "state" / "_METADATA"
    os.truncate(victim, victim.stat().st_size // 2)
    return victim


def _empty_step_dir(step_dir: Path) -> Path:
    for p in sorted(step_dir.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    return step_dir


# A failed tensorstore read can leave a callback that fires after Orbax closed its event loop
# ("Event loop is closed", printed by asyncio); harmless, and outside this module's reach.
unraisable_ok = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@unraisable_ok
@pytest.mark.parametrize("damage", [_truncate_data_file, _truncate_metadata, _empty_step_dir])
def test_damaged_latest_falls_back_with_warning(tmp_path, states, damage):
    with Checkpointer(tmp_path, save_every=1, keep=5, async_save=False) as ckpt:
        ckpt.save(1, states[1], {"at": 1})
        ckpt.save(2, states[2], {"at": 2})
    damage(tmp_path / "2")
    with Checkpointer(tmp_path, save_every=1, keep=5, async_save=False) as ckpt:
        with pytest.warns(CheckpointDamagedWarning, match=str(tmp_path / "2")):
            step, state, extra = ckpt.restore(abstract(states[1]))
        assert (step, extra) == (1, {"at": 1})
        assert_bitwise_equal(state, states[1])
        # The good checkpoint stays; the damaged one is set aside, not deleted.
        assert (tmp_path / "1").is_dir() and not (tmp_path / "2").exists()
        assert [p.name.split("-")[0] for p in (tmp_path / "damaged").iterdir()] == ["2"]
        # Training goes on from step 1 and may write step 2 again.
        assert ckpt.save(2, states[3], {"at": 2})
        step, state, _ = ckpt.restore(abstract(states[1]))
    assert step == 2
    assert_bitwise_equal(state, states[3])


@unraisable_ok
def test_all_damaged_raises_instead_of_starting_over(tmp_path, states):
    with Checkpointer(tmp_path, save_every=1, keep=5, async_save=False) as ckpt:
        ckpt.save(1, states[1], {})
    _truncate_metadata(tmp_path / "1")
    (tmp_path / "2").mkdir()
    with (
        Checkpointer(tmp_path, save_every=1, keep=5, async_save=False) as ckpt,
        pytest.raises(DamagedCheckpointError, match=str(tmp_path / "1")),
    ):
        ckpt.restore(abstract(states[1]))
    with (
        Checkpointer(tmp_path, save_every=1, keep=5, async_save=False) as ckpt,
        pytest.raises(DamagedCheckpointError, match=str(tmp_path / "1")),
    ):
        ckpt.restore(abstract(states[1]), step=1)  # a requested step: no fallback
    assert (tmp_path / "1").is_dir() and (tmp_path / "2").is_dir()  # nothing moved


def test_other_model_shape_raises_naming_path_and_parameter(tmp_path, mesh8, states):
    with Checkpointer(tmp_path, save_every=1, keep=5, async_save=False) as ckpt:
        ckpt.save(1, states[1], {})
        wider = abstract(make_state(1, mesh8, dense_out=16))
        pattern = (
            r"(?s)" + str(tmp_path / "1") + r".*params\.layers\.1\.kernel.*\(8, 8\).*\(8, 16\)"
        )
        with pytest.raises(CheckpointMismatchError, match=pattern) as info:
            ckpt.restore(wider)
        assert isinstance(info.value, ValueError)
        fewer = abstract(states[1])
        del fewer["ema"]
        with pytest.raises(ValueError, match=r"ema\.layers\.0\.kernel.*not in the model"):
            ckpt.restore(fewer)
    assert (tmp_path / "1").is_dir() and not (tmp_path / "damaged").exists()


def test_empty_or_missing_directory_gives_none(tmp_path, states):
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.restore(abstract(states[1])) is None
    with Checkpointer(tmp_path / "new" / "ckpt", save_every=1, keep=1) as ckpt:
        assert ckpt.restore(abstract(states[1])) is None


def test_bad_arguments(tmp_path, states):
    with pytest.raises(ValueError, match="save_every"):
        Checkpointer(tmp_path, save_every=0, keep=1)
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(tmp_path, save_every=1, keep=0)
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        no_sharding = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), states[1])
        with pytest.raises(ValueError, match=r"ema\.layers\.0\.bias.*no sharding"):
            ckpt.restore(no_sharding)
        with pytest.raises(TypeError, match=r"extra\['arr'\]"):
            ckpt.save(1, states[1], {"arr": object()})


_KILLED_TRAINER = """
import os, sys
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, jax.numpy as jnp
from diffusax.checkpoint import Checkpointer
ckpt = Checkpointer(sys.argv[1], save_every=1, keep=3)
big = jnp.arange(16 * 2**20, dtype=jnp.float32)  # 64 MiB: a save takes a while
ckpt.save(1, {"w": big}, {"at": 1})
ckpt.wait()
print("saved 1", flush=True)
ckpt.save(2, {"w": big + 1}, {"at": 2})
ckpt.wait()
print("saved 2", flush=True)
"""


def test_sigkill_mid_save_resumes_from_last_complete_step(tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(textwrap.dedent(_KILLED_TRAINER))
    workdir = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(workdir)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "saved 1"
        deadline = time.monotonic() + 60
        while not any("tmp" in p.name for p in workdir.iterdir()):  # step 2 being written
            assert time.monotonic() < deadline and proc.poll() is None, "save 2 never started"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert any("tmp" in p.name for p in workdir.iterdir()), "the kill did not land mid-save"
    assert not (workdir / "2").exists()

    target = {"w": jax.ShapeDtypeStruct((16 * 2**20,), jnp.float32, sharding=_one_device())}
    with Checkpointer(workdir, save_every=1, keep=3) as ckpt:
        assert not any("tmp" in p.name for p in workdir.iterdir())
        step, state, extra = ckpt.restore(target)
    assert (step, extra) == (1, {"at": 1})
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(16 * 2**20, dtype=np.float32))


def _one_device():
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])
