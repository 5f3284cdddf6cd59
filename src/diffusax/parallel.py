"""Device mesh, shardings and multi-host start-up.

One mesh with two axes serves every model:

- ``data``: data parallelism; parameters are replicated along it.
- ``fsdp``: fully sharded data parallelism; parameters, optimizer state and EMA are split along
  it (``fsdp_shardings``), and the batch is split along it too, so every device sees its own rows.
  XLA's sharding propagation gathers each parameter where a layer needs it and sums its
  gradient back onto the shards, so the maths is that of the replicated model.

The batch is therefore sharded over both axes, ``P(('data', 'fsdp'))``: a global batch of B rows
puts B / (data * fsdp) rows on each device. Each process loads only the rows its own devices
hold (``process_rows``) and ``host_to_global`` stitches the per-process pieces into one global
``jax.Array`` without moving data between hosts.

Mesh axes are ``AxisType.Auto`` (the classic ``jax.jit`` sharding propagation), set explicitly
because ``jax.make_mesh`` defaults to explicit axes in recent jax releases.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both mesh axes
# Arrays with fewer elements stay replicated under fsdp: biases and norms save little memory and
# would each cost a collective.
FSDP_MIN_SIZE = 1024


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A ``('data', 'fsdp')`` mesh of ``data * fsdp`` devices.

    Args:
      data: size of the data axis; -1 takes all devices left after ``fsdp``.
      fsdp: size of the fsdp axis (1 = plain data parallelism).
      devices: the devices to use (default ``jax.devices()``, all processes' devices).

    Raises:
      ValueError: when the sizes are not positive or do not multiply to the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if n == 0:
        raise ValueError("make_mesh: no devices given")
    if not isinstance(fsdp, int) or fsdp < 1:
        raise ValueError(f"make_mesh: fsdp must be a positive int, got {fsdp!r}")
    if not isinstance(data, int) or (data < 1 and data != -1):
        raise ValueError(f"make_mesh: data must be a positive int or -1, got {data!r}")
    if data == -1:
        if n % fsdp:
            raise ValueError(
                f"make_mesh: fsdp={fsdp} does not divide the device count {n}; "
                f"choose fsdp among the divisors of {n}"
            )
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(
            f"make_mesh: data={data} x fsdp={fsdp} = {data * fsdp} devices, but {n} devices "
            f"are available; use data=-1 to take all remaining devices"
        )
    # create_device_mesh orders devices for fast collectives (TPU torus, GPU ids); on CPU it
    # keeps jax.devices() order, which lists each process's devices together.
    grid = mesh_utils.create_device_mesh((data, fsdp), devices)  # (data, fsdp)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``('data', 'fsdp')``; other dimensions whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def fsdp_spec(shape, fsdp_size: int, min_size: int = FSDP_MIN_SIZE) -> PartitionSpec:
    """How to split an array of ``shape`` over an ``fsdp`` axis of ``fsdp_size`` devices.

    Its largest dimension divisible by ``fsdp_size`` (the last of equal ones: a kernel's output
    features) is split; an array with fewer than ``min_size`` elements, or with no such dimension,
    is replicated (``PartitionSpec()``), as is everything when ``fsdp_size`` is 1.
    """
    shape = tuple(shape)
    if fsdp_size == 1 or math.prod(shape) < min_size:
        return PartitionSpec()
    divisible = [i for i, n in enumerate(shape) if n % fsdp_size == 0]
    if not divisible:
        return PartitionSpec()
    dim = max(divisible, key=lambda i: (shape[i], i))
    return PartitionSpec(*(("fsdp" if i == dim else None) for i in range(len(shape))))


def fsdp_shardings(abstract_tree, mesh: Mesh, min_size: int = FSDP_MIN_SIZE):
    """A ``NamedSharding`` for each array leaf of ``abstract_tree`` (arrays or ShapeDtypeStructs).

    Each leaf is split over the mesh's ``fsdp`` axis by ``fsdp_spec`` and replicated over
    ``data``. Applied to a whole train state it shards the parameters, the optimizer moments
    (which have the parameters' shapes) and the EMA alike, and replicates scalars such as the
    step counter. With ``fsdp`` = 1 everything is replicated: plain data parallelism.
    """
    if "fsdp" not in mesh.shape:
        raise ValueError(f"fsdp_shardings: the mesh has no 'fsdp' axis: {dict(mesh.shape)}")
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp_size, min_size)), abstract_tree
    )


def check_global_batch(mesh: Mesh, global_batch: int) -> None:
    """Raise ValueError unless ``global_batch`` splits evenly over the mesh's devices."""
    if not isinstance(global_batch, (int, np.integer)) or global_batch < 1:
        raise ValueError(f"global_batch must be a positive int, got {global_batch!r}")
    if global_batch % mesh.size:
        raise ValueError(
            f"global_batch={global_batch} is not divisible by the {mesh.size} devices of the "
            f"mesh {dict(mesh.shape)}; each device must get the same number of rows"
        )


def process_rows(mesh: Mesh, global_batch: int) -> np.ndarray:
    """Global batch positions this process's devices hold, in increasing order, shape (rows,).

    This is the order ``jax.make_array_from_process_local_data`` expects local data in. With the
    meshes of ``make_mesh`` it is the contiguous block ``[p * B / P, (p + 1) * B / P)``.
    """
    check_global_batch(mesh, global_batch)
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
    rows = set()
    for (row_slice,) in index_map.values():
        rows.update(range(*row_slice.indices(global_batch)))
    return np.array(sorted(rows), dtype=np.int64)


def host_to_global(mesh: Mesh, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assemble each process's rows into global arrays sharded by ``batch_sharding(mesh)``.

    Every process calls this with its own rows (those of ``process_rows``), all with the same
    leading size; the global batch has ``rows * process_count`` rows (``make_mesh`` meshes use
    every device, so each process holds the same share).
    """
    sharding = batch_sharding(mesh)
    local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    out = {}
    for key, value in host_batch.items():
        value = np.asarray(value)
        if value.ndim == 0:
            raise ValueError(f"host_to_global: '{key}' is a scalar; batch fields need a row axis")
        if value.shape[0] % local_devices:
            raise ValueError(
                f"host_to_global: '{key}' has {value.shape[0]} rows, not divisible by this "
                f"process's {local_devices} devices"
            )
        global_rows = value.shape[0] // local_devices * mesh.size
        global_shape = (global_rows, *value.shape[1:])
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def to_host(x) -> np.ndarray:
    """The whole array as numpy on every process (multi-host: gathered from all of them)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool | None = None,
) -> bool:
    """Start multi-host JAX when asked to; otherwise do nothing. Returns whether it is running.

    Call it first thing, before any other JAX call. It calls ``jax.distributed.initialize``:

    - with the given arguments, when any is given or ``JAX_COORDINATOR_ADDRESS`` is set (jax
      reads ``JAX_COORDINATOR_ADDRESS``; the process count and id come from the arguments,
      ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, or jax's cluster detection);
    - with no arguments (jax detects SLURM, Open MPI, Kubernetes, Cloud TPU ...), when
      ``auto=True`` or the environment variable ``DIFFUSAX_DISTRIBUTED`` is ``1``/``true``;
    - not at all otherwise: a single process, which needs no set-up.

    Calling it again after a successful start is harmless.
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    explicit = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if auto is None:
        auto = env.get("DIFFUSAX_DISTRIBUTED", "").strip().lower() in ("1", "true", "yes")
    if not (explicit or num_processes is not None or process_id is not None or auto):
        return False
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    return True


def use_cpu_cores(global_batch: int, num_devices: int = 0) -> int:
    """Expose one JAX CPU device per core (or ``num_devices``); call before JAX starts.

    XLA's CPU backend spreads one small network's ops over threads poorly (the digits U-Net's
    forward gains 1.25x from 1 to 2 threads), whereas splitting the batch over one device per
    core scales about 2x (benchmarks/README.md). So on a CPU host the ``data`` axis gets a
    device per core: the most devices, up to the core count, that ``global_batch`` divides
    evenly over. Accelerator devices are not affected. Leaves the setting alone when the user
    chose one (``JAX_NUM_CPU_DEVICES`` or ``--xla_force_host_platform_device_count`` in
    ``XLA_FLAGS``) or when JAX has already started. Returns the CPU device count set (0 when
    left alone).
    """
    if jax.config.jax_num_cpu_devices != -1 or "device_count" in os.environ.get("XLA_FLAGS", ""):
        return 0
    if not num_devices:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        num_devices = max(d for d in range(1, (cores or 1) + 1) if global_batch % d == 0)
    try:
        jax.config.update("jax_num_cpu_devices", num_devices)
    except RuntimeError:  # JAX already started (an embedding program ran JAX code first)
        return 0
    return num_devices
