"""Checkpoints: asynchronous Orbax saves every N steps, keep the last K, resume from the latest
good one.

One Orbax `CheckpointManager` per directory; each step holds two items:

    <directory>/<step>/state/   the train-state pytree (params, opt_state, ema, step, rng ...)
    <directory>/<step>/extra/   a JSON dict (data position, config digest ...)
    <directory>/damaged/<step>-<time>/   steps found unreadable, moved aside, never deleted

What this module guarantees, and how:
- No checkpoint holds a non-finite value: `save` runs one jitted finiteness reduction over the
  state (one bool per leaf comes back to the host, nothing else) and refuses to write, naming the
  leaf; `extra` floats are checked too, and `restore` re-checks what it read.
- A bit flipped on disk is caught: `save` records a checksum of every leaf (the sum of its bits
  as unsigned words, one jitted reduction) in the step's JSON item, and `restore` recomputes it;
  a mismatch makes the step damaged (Orbax's array chunks carry no checksum of their own).
- A step directory appears only when complete: Orbax writes `<step>.orbax-checkpoint-tmp*` and
  renames it last. Temporary directories left by a killed save are removed when a `Checkpointer`
  is opened, so a run killed mid-save resumes from the last complete step.
- A damaged step (unreadable metadata or data, missing files) is skipped with a warning naming
  it; resume falls back to the newest good step, and the damaged newer ones are moved to
  `damaged/` (so the next saves can reuse their step numbers) only once an older step has been
  restored with the same target - an error on the caller's side never moves a good checkpoint.
  If steps exist and none restores, `restore` raises: it never silently starts from step 0.
- A checkpoint of another model (a shape, dtype or parameter-name mismatch) stops `restore` with
  a `CheckpointMismatchError` (a ValueError) naming the step path and the parameters.
- `restore` takes an abstract state whose leaves carry the target shardings, so a checkpoint
  written on one mesh (8 devices) lands directly on another (4 or 1 devices) and back.
- A save that cannot be written (a full disk, a read-only directory) raises
  `CheckpointWriteError` naming the directory and the cause, from `save` or `wait`; the steps
  already on disk are left as they are. The step directory is created in the caller's thread,
  so an unwritable directory fails at once (Orbax's asynchronous creation would leave its
  writer threads waiting minutes for a directory that never appears).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
import warnings
from typing import Any, NamedTuple, Self

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

STATE_ITEM = "state"
EXTRA_ITEM = "extra"
CHECKSUMS_KEY = "_checksums"  # in the saved `extra` JSON: {leaf name: checksum}
DAMAGED_DIR = "damaged"
_MAX_LISTED = 8  # problems listed in one error message


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk does not fit the requested state (another model or config)."""


class DamagedCheckpointError(RuntimeError):
    """Checkpoints exist but none of the candidate steps could be read."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, directory read-only ...); names the path."""


class CheckpointDamagedWarning(UserWarning):
    """A step was unreadable and was skipped (and moved to `damaged/`)."""


class Restored(NamedTuple):
    step: int
    state: Any
    extra: dict


def param_name(path) -> str:
    """Dotted name of a pytree key path, as Orbax names parameters ("opt.0.mu.kernel.value")."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts)


@jax.jit
def _finite_per_leaf(leaves):
    """[all(isfinite(leaf)) for leaf in leaves] as one bool vector (one small device->host copy)."""
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def _is_inexact(x) -> bool:
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return isinstance(x, float | complex)
    return jnp.issubdtype(dtype, jnp.inexact)  # False for integer, bool and PRNG-key dtypes


def _per_leaf(reduce_on_device, reduce_on_host, leaves) -> list:
    """One value per leaf: device arrays by one jitted call per mesh, host values on the host."""
    out = [None] * len(leaves)
    by_mesh: dict[Any, list[int]] = {}  # one jit cannot take arrays from different meshes
    for i, x in enumerate(leaves):
        if isinstance(x, jax.Array):
            sharding = x.sharding
            mesh = getattr(sharding, "mesh", None)
            key = mesh if mesh is not None else frozenset(sharding.device_set)
            by_mesh.setdefault(key, []).append(i)
        else:
            out[i] = reduce_on_host(x)
    for indices in by_mesh.values():
        values = np.asarray(reduce_on_device([leaves[i] for i in indices]))
        for i, value in zip(indices, values, strict=True):
            out[i] = value.item()
    return out


def nonfinite_leaves(tree) -> list[str]:
    """Names of the floating leaves of `tree` holding a NaN or an infinity (empty when all finite).

    Device arrays are reduced on their devices by one jitted call per mesh (usually one): only a
    bool per leaf comes back to the host. Host values (numpy, Python floats) are checked on host.
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    floating = [(path, x) for path, x in flat if _is_inexact(x)]
    finite = _per_leaf(
        _finite_per_leaf, lambda x: bool(np.all(np.isfinite(x))), [x for _, x in floating]
    )
    return [param_name(path) for (path, _), ok in zip(floating, finite, strict=True) if not ok]


def _words(x):
    """The bits of an array as unsigned integers (typed PRNG keys: their key data)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, unsigned)  # 8-byte items: a trailing axis of 2


@jax.jit
def _checksum_per_leaf(leaves):
    """Per leaf, sum(bits as unsigned words) mod 2**32: uint32 (n_leaves,).

    One flipped bit changes a word by 2**k, hence the sum. An integer sum does not depend on the
    order of the additions, so the value is the same on every mesh and device count.
    """
    return jnp.stack([jnp.sum(_words(x).astype(jnp.uint32), dtype=jnp.uint32) for x in leaves])


def _host_checksum(x) -> int:
    x = np.asarray(x)
    unsigned = {1: np.uint8, 2: np.uint16}.get(x.dtype.itemsize, np.uint32)
    return int(np.sum(x.view(unsigned), dtype=np.uint64) % 2**32)


def checksums(tree) -> dict[str, int]:
    """{leaf name: sum of its bits as unsigned words mod 2**32}, computed where the leaves are."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums = _per_leaf(_checksum_per_leaf, _host_checksum, [x for _, x in flat])
    return {param_name(path): int(v) for (path, _), v in zip(flat, sums, strict=True)}


def _json_copy(value, where: str):
    """A JSON-only deep copy of `value`; TypeError / FloatingPointError naming the bad entry."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise FloatingPointError(f"refusing to save a checkpoint: {where} = {value}")
        return value
    if isinstance(value, list | tuple):
        return [_json_copy(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: JSON keys must be strings, got {k!r}")
            out[k] = _json_copy(v, f"{where}[{k!r}]")
        return out
    raise TypeError(f"{where} is not JSON-serializable (type {type(value).__name__})")


def _abstract_leaf(path, x):
    """The restore target of one leaf: shape, dtype and the sharding to place it with."""
    if isinstance(x, jax.Array | jax.ShapeDtypeStruct):
        sharding = getattr(x, "sharding", None)
        if sharding is None:
            raise ValueError(
                f"abstract_state leaf {param_name(path)!r} has no sharding: restore needs the "
                "target sharding of every array (e.g. ShapeDtypeStruct(..., sharding=...))"
            )
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    if isinstance(x, np.ndarray):
        return x  # restored as a host numpy array
    raise ValueError(
        f"abstract_state leaf {param_name(path)!r} is a {type(x).__name__}; expected a "
        "jax.ShapeDtypeStruct with a sharding, a jax.Array or a numpy array"
    )


def _stored_shape_dtype(x) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype a target leaf has on disk (typed PRNG keys are stored as their key data)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    return tuple(x.shape), np.dtype(x.dtype)


def _check_matches(step_path, saved_tree, target) -> None:
    """Raise CheckpointMismatchError unless the saved arrays have the target's names, shapes, dtypes."""
    saved = {
        param_name(path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(saved_tree)[0]
        if hasattr(leaf, "shape")
    }
    wanted = {
        param_name(path): _stored_shape_dtype(x)
        for path, x in jax.tree_util.tree_flatten_with_path(target)[0]
    }
    problems = [
        f"{name}: in the model, missing from the checkpoint"
        for name in wanted.keys() - saved.keys()
    ]
    problems += [
        f"{name}: in the checkpoint, not in the model" for name in saved.keys() - wanted.keys()
    ]
    for name in sorted(wanted.keys() & saved.keys()):
        shape, dtype = wanted[name]
        leaf = saved[name]
        disk = (tuple(leaf.shape), np.dtype(leaf.dtype) if leaf.dtype is not None else None)
        if disk[0] != shape or (disk[1] is not None and disk[1] != dtype):
            problems.append(
                f"{name}: checkpoint has shape {disk[0]} {disk[1]}, model has {shape} {dtype}"
            )
    if problems:
        listed = "\n  ".join(sorted(problems)[:_MAX_LISTED])
        more = len(problems) - _MAX_LISTED
        raise CheckpointMismatchError(
            f"checkpoint {step_path} does not match the model ({len(problems)} parameter(s)):\n  "
            + listed
            + (f"\n  ... and {more} more" if more > 0 else "")
        )


def _short(err: BaseException) -> str:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first_line[:300]}"


class Checkpointer:
    """Saves a train state every `save_every` steps, keeps the last `keep`, resumes from the latest.

    Typical use by a train loop:

        ckpt = Checkpointer(workdir / "checkpoints", save_every=1000, keep=3)
        restored = ckpt.restore(abstract_state)  # None: nothing saved yet
        ...
        ckpt.save(step, state, {"data_position": pos})  # every step; writes every 1000th
        ckpt.close()  # waits for the last asynchronous save
    """

    _barrier_ids = itertools.count()

    def __init__(self, directory, *, save_every: int, keep: int, async_save: bool = True):
        if int(save_every) < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        if int(keep) < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        directory = os.fspath(directory)
        if "://" not in directory:
            directory = os.path.abspath(directory)
        self.directory = epath.Path(directory)
        self.save_every = int(save_every)
        self.keep = int(keep)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1,  # the save decision is ours: step % save_every, or force
            preservation_policy=ocp.checkpoint_managers.LatestN(n=self.keep),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # a save killed midway leaves no temporary directory
            create=True,
            # The step directory is made in save(): an unwritable directory raises there.
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                STATE_ITEM: ocp.StandardCheckpointHandler(),
                EXTRA_ITEM: ocp.JsonCheckpointHandler(),
            },
        )
        self._in_flight = None  # the step of the last save started (named by a failed write)
        # Orbax removes the temporary directories in the background and awaits that only at the
        # first save; wait now, so that no one (a restore-only run, a test) sees them after init.
        await_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()

    def step_path(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def all_steps(self) -> list[int]:
        """Complete (renamed) steps on disk, oldest first; a damaged one is listed until restore."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, extra: dict | None = None, *, force: bool = False) -> bool:
        """Save `state` (a pytree of arrays) and `extra` (a JSON dict) as `step` if it is due.

        Due means `step % save_every == 0`, or `force`. Returns True when a save was started
        (it completes in the background when asynchronous; see `wait`), False when not due or
        when `step` is already the latest checkpoint. Raises FloatingPointError naming the leaf
        if any value is NaN or infinite: nothing is written then. Raises ValueError for a step
        older than the latest checkpoint (checkpoints are written in step order).
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if not force and step % self.save_every:
            return False
        latest = self._manager.latest_step()
        if latest is not None and step <= latest:
            if step == latest:
                return False  # already saved, e.g. a final forced save on an interval step
            raise ValueError(
                f"step {step} is older than the latest checkpoint {self.step_path(latest)}; "
                "checkpoints are written in step order"
            )
        extra = _json_copy({} if extra is None else extra, "extra")  # copied: saved async
        if CHECKSUMS_KEY in extra:
            raise ValueError(f"extra[{CHECKSUMS_KEY!r}] is reserved for the checkpoint's checksums")
        bad = nonfinite_leaves(state)
        if bad:
            raise FloatingPointError(
                f"refusing to save step {step}: non-finite values in " + ", ".join(bad)
            )
        extra[CHECKSUMS_KEY] = checksums(state)
        args = ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardSave(state), EXTRA_ITEM: ocp.args.JsonSave(extra)}
        )
        with self._write_errors():  # the previous asynchronous save: its failure surfaces here
            self._manager.wait_until_finished()
        # force: skip Orbax's own interval/initial-save policy; the decision was made above.
        with self._write_errors(step):
            started = bool(self._manager.save(step, args=args, force=True))
        self._in_flight = step if started else self._in_flight
        return started

    def restore(self, abstract_state, step: int | None = None) -> Restored | None:
        """Restore (step, state, extra) with every array placed on its target sharding.

        abstract_state: pytree of jax.ShapeDtypeStruct with shardings (or of jax.Arrays, whose
        shardings are used). step=None resumes from the newest good step: a damaged step is
        skipped with a CheckpointDamagedWarning naming it and moved to `damaged/` once an older
        step restored. Returns None when the directory holds no complete step at all.
        Raises CheckpointMismatchError when the checkpoint belongs to another model shape,
        DamagedCheckpointError when steps exist but none can be read (or the requested one
        cannot), FileNotFoundError when a requested step does not exist.
        """
        target = jax.tree_util.tree_map_with_path(_abstract_leaf, abstract_state)
        self._manager.wait_until_finished()  # our own save in flight is part of the listing
        self._manager.reload()  # the directory may have changed under us
        steps = self.all_steps()
        if step is not None:
            if int(step) not in steps:
                raise FileNotFoundError(
                    f"no checkpoint {self.step_path(int(step))} (steps on disk: {steps})"
                )
            candidates = [int(step)]
        elif not steps:
            return None
        else:
            candidates = steps[::-1]

        damaged: list[tuple[int, BaseException]] = []
        for candidate in candidates:
            try:
                restored = self._restore_step(candidate, target)
            except CheckpointMismatchError:
                raise  # another model: stop, do not fall back to older steps
            except Exception as err:  # anything unreadable: try the previous step
                damaged.append((candidate, err))
                continue
            if damaged:
                self._set_aside(damaged, good_step=candidate)
            return restored

        listed = "\n  ".join(f"{self.step_path(s)}: {_short(e)}" for s, e in damaged)
        raise DamagedCheckpointError(
            f"no readable checkpoint in {self.directory} (refusing to start from scratch):\n  "
            + listed
        ) from damaged[0][1]

    def read_tree(self, path: tuple[str, ...], step: int | None = None):
        """One subtree of a saved state (e.g. ``("ema", "ema")``) on the first local device,
        without knowing the model that wrote it: the target comes from the saved metadata,
        and the checksums are verified as in ``restore``. FileNotFoundError when the
        directory holds no checkpoint, KeyError naming the path when the state has no such
        subtree."""
        self._manager.reload()
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        saved = self._manager.metadata(step).item_metadata[STATE_ITEM]
        tree = getattr(saved, "tree", saved)
        node = tree
        for key in path:
            if not isinstance(node, dict) or key not in node:
                raise KeyError(
                    f"checkpoint {self.step_path(step)} has no {'/'.join(path)} in its state "
                    f"(it has {sorted(tree)})"
                )
            node = node[key]
        device = jax.local_devices()[0]
        single = jax.sharding.SingleDeviceSharding(device)
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=single), tree
        )
        restored = self.restore(target, step=step)
        node = restored.state
        for key in path:
            node = node[key]
        return node

    def _restore_step(self, step: int, target) -> Restored:
        path = self.step_path(step)
        saved = self._manager.metadata(step).item_metadata[STATE_ITEM]
        if saved is None:
            raise FileNotFoundError(f"{path / STATE_ITEM}: no readable state metadata")
        _check_matches(path, getattr(saved, "tree", saved), target)
        args = ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardRestore(target), EXTRA_ITEM: ocp.args.JsonRestore()}
        )
        items = self._manager.restore(step, args=args)
        state, extra = items[STATE_ITEM], items[EXTRA_ITEM]
        if extra is None:
            raise FileNotFoundError(f"{path / EXTRA_ITEM}: missing")
        bad = nonfinite_leaves(state)
        if bad:  # never written by `save`: the files changed on disk
            raise FloatingPointError(f"{path}: non-finite values in " + ", ".join(bad))
        saved_sums = extra.pop(CHECKSUMS_KEY, None)  # None: written before checksums existed
        if saved_sums is not None:
            now = checksums(state)
            changed = sorted(k for k, v in saved_sums.items() if now.get(k) != v)
            if changed:
                raise ValueError(
                    f"{path}: checksum mismatch (the bits on disk changed) in "
                    + ", ".join(changed[:_MAX_LISTED])
                )
        return Restored(step, state, extra)

    def _set_aside(self, damaged: list[tuple[int, BaseException]], good_step: int) -> None:
        """Warn about each damaged step and move it to `damaged/` (never delete it)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        moves = [
            (self.step_path(s), self.directory / DAMAGED_DIR / f"{s}-{stamp}") for s, _ in damaged
        ]
        for (src, dst), (_, err) in zip(moves, damaged, strict=True):
            warnings.warn(
                f"checkpoint {src} is damaged ({_short(err)}); resuming from step {good_step}, "
                f"moving it to {dst}",
                CheckpointDamagedWarning,
                stacklevel=3,
            )
        if jax.process_index() == 0:
            (self.directory / DAMAGED_DIR).mkdir(parents=True, exist_ok=True)
            for src, dst in moves:
                if src.exists():
                    src.rename(dst)
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes(f"diffusax_set_aside_{next(self._barrier_ids)}")
        self._manager.reload()

    @contextlib.contextmanager
    def _write_errors(self, step: int | None = None):
        """Re-raise a failed write (ours or an earlier asynchronous one) as CheckpointWriteError."""
        try:
            yield
        except (FloatingPointError, CheckpointWriteError):
            raise
        except Exception as err:  # Orbax and tensorstore raise many types
            step = self._in_flight if step is None else step
            what = f"step {step} " if step is not None else ""
            cause = (str(err).strip().splitlines() or [""])[0][:1000]  # names the file, errno
            raise CheckpointWriteError(
                f"could not write checkpoint {what}in {self.directory}: "
                f"{type(err).__name__}: {cause} (the complete steps there are left as they are)"
            ) from err

    def wait(self) -> None:
        """Block until the asynchronous save in flight (if any) is complete on disk."""
        with self._write_errors():
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release Orbax's resources."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
