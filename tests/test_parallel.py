"""Mesh, shardings and multi-host assembly (8 fake CPU devices; a real 2-process run)."""

import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from diffusax import parallel


@pytest.mark.parametrize("data,fsdp", [(8, 1), (4, 2), (1, 8), (-1, 2), (-1, 1)])
def test_make_mesh_shapes(data, fsdp):
    mesh = parallel.make_mesh(data, fsdp)
    expect_data = 8 // fsdp if data == -1 else data
    assert mesh.axis_names == ("data", "fsdp")
    assert dict(mesh.shape) == {"data": expect_data, "fsdp": fsdp}
    assert set(mesh.devices.flat) == set(jax.devices())
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)


def test_make_mesh_on_given_devices():
    mesh = parallel.make_mesh(devices=jax.devices()[:4])
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1}
    assert list(mesh.devices.flat) == jax.devices()[:4]


@pytest.mark.parametrize(
    "data,fsdp,match",
    [
        (3, 1, "3 devices, but 8"),
        (4, 4, "16 devices, but 8"),
        (-1, 3, "fsdp=3 does not divide"),
        (0, 1, "data must be"),
        (2, 0, "fsdp must be"),
        (-2, 1, "data must be"),
    ],
)
def test_make_mesh_bad_counts(data, fsdp, match):
    with pytest.raises(ValueError, match=match):
        parallel.make_mesh(data, fsdp)


def test_shardings():
    mesh = parallel.make_mesh(4, 2)
    assert parallel.batch_sharding(mesh).spec == PartitionSpec(("data", "fsdp"))
    assert parallel.replicated(mesh).spec == PartitionSpec()
    x = jax.device_put(np.arange(3.0), parallel.replicated(mesh))
    assert all(np.array_equal(s.data, np.arange(3.0)) for s in x.addressable_shards)


@pytest.mark.parametrize("data,fsdp", [(8, 1), (4, 2), (1, 8)])
def test_host_to_global_single_process(data, fsdp):
    """Each device holds its own B/8 rows, and fsdp ranks hold different rows."""
    mesh = parallel.make_mesh(data, fsdp)
    batch = {
        "image": np.arange(16 * 2 * 2 * 1, dtype=np.float32).reshape(16, 2, 2, 1),
        "label": np.arange(16, dtype=np.int32),
    }
    np.testing.assert_array_equal(parallel.process_rows(mesh, 16), np.arange(16))
    out = parallel.host_to_global(mesh, batch)
    for key, value in out.items():
        assert value.shape == batch[key].shape and value.dtype == batch[key].dtype
        assert value.sharding == parallel.batch_sharding(mesh)
        np.testing.assert_array_equal(np.asarray(value), batch[key])
        row_starts = set()
        for shard in value.addressable_shards:
            assert shard.data.shape[0] == 2
            np.testing.assert_array_equal(np.asarray(shard.data), batch[key][shard.index])
            row_starts.add(shard.index[0].start)
        assert len(row_starts) == 8  # no two devices hold the same rows
    # A jitted reduction over the sharded batch sees the whole batch.
    assert float(jax.jit(jnp.sum)(out["label"])) == float(batch["label"].sum())


def test_global_batch_must_split_over_devices():
    mesh = parallel.make_mesh(4, 2)
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        parallel.process_rows(mesh, 12)
    with pytest.raises(ValueError, match="positive"):
        parallel.check_global_batch(mesh, 0)
    with pytest.raises(ValueError, match="not divisible by this process's 8 devices"):
        parallel.host_to_global(mesh, {"image": np.zeros((12, 2, 2, 1), np.float32)})


def test_initialize_distributed_does_nothing_unless_asked(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DIFFUSAX_DISTRIBUTED", "0")
    assert parallel.initialize_distributed() is False
    assert not jax.distributed.is_initialized()


# Each of two processes owns 2 CPU devices of a (data=2, fsdp=2) mesh, loads only its 4 rows of
# an 8-row batch, and checks the assembled global batch against a single-process read.
_WORKER = r"""
import sys
import jax
import numpy as np
from jax.experimental import multihost_utils

jax.config.update("jax_num_cpu_devices", 2)
from diffusax import data, parallel

port, pid = sys.argv[1], int(sys.argv[2])
assert parallel.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
mesh = parallel.make_mesh(data=-1, fsdp=2)
assert parallel.process_rows(mesh, 8).tolist() == list(range(4 * pid, 4 * pid + 4))
source = data.load_source("digits")
loader = data.Loader(source, mesh, global_batch=8, seed=5, random_flip=True, step=7)
batch = next(loader)
assert batch["image"].shape == (8, 8, 8, 1) and len(batch["image"].addressable_shards) == 2
expect = data.host_batch(source, step=7, seed=5, global_batch=8, random_flip=True)
sums = jax.jit(lambda x: x.sum(axis=(1, 2, 3)))(batch["image"])  # (8,) sharded
np.testing.assert_allclose(
    multihost_utils.process_allgather(sums, tiled=True), expect["image"].sum(axis=(1, 2, 3)),
    rtol=1e-5,
)
images = multihost_utils.process_allgather(batch["image"], tiled=True)
np.testing.assert_array_equal(images, expect["image"])
labels = multihost_utils.process_allgather(batch["label"], tiled=True)
np.testing.assert_array_equal(labels, expect["label"])
jax.distributed.shutdown()
print("worker ok", pid)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_assemble_the_global_batch():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(port), str(pid)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in (0, 1)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=150)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for pid, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"process {pid} failed:\n{out[-3000:]}"
        assert f"worker ok {pid}" in out
