"""Deterministic batches: a batch is a pure function of (seed, step), so resuming replays exactly.

Order of examples. The examples are read as one endless stream made of epochs laid end to end;
epoch e is the permutation ``perm(seed, e)`` of ``0..N-1``. Batch ``step`` of size B is the
stream positions ``[step * B, (step + 1) * B)``, so its epoch is ``step * B // N``. Nothing is
dropped: every example appears exactly once per epoch, and a batch that straddles the end of an
epoch takes its last rows from the next epoch ("wrap" semantics; B > N is allowed).

Random horizontal flips are drawn per global batch row from (seed, step), so each row's flip is
the same whatever the number of processes. So is the noise ε of sources that store a
distribution per example (latent shards: z = s (μ + σ ε), see ``latents.py``): row r of batch
``step`` draws it from (seed, step, r), and such a source picks its mirrored view for a flip.

Multi-host: each process reads only the rows its devices hold (``parallel.process_rows``) and
``parallel.host_to_global`` assembles the global ``jax.Array``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools

import numpy as np

from diffusax import parallel

_PERMUTATION_STREAM = 0  # separate random streams for the order and the flips
_FLIP_STREAM = 1
_NOISE_STREAM = 2


def _check_seed(seed) -> int:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


@functools.lru_cache(maxsize=4)
def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """perm(seed, epoch): a uniformly random permutation of 0..N-1, int64 (N,), read-only."""
    rng = np.random.default_rng([_check_seed(seed), _PERMUTATION_STREAM, int(epoch)])
    perm = rng.permutation(num_examples)
    perm.flags.writeable = False  # shared by the cache
    return perm


def batch_indices(num_examples: int, global_batch: int, step: int, seed: int) -> np.ndarray:
    """Dataset indices of batch ``step``, int64 (B,).

    Row r is stream position s = step * B + r: example ``perm(seed, s // N)[s % N]``.
    """
    if num_examples < 1:
        raise ValueError(f"num_examples must be positive, got {num_examples}")
    if global_batch < 1:
        raise ValueError(f"global_batch must be positive, got {global_batch}")
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    positions = int(step) * int(global_batch) + np.arange(global_batch, dtype=np.int64)  # (B,)
    epochs, offsets = np.divmod(positions, num_examples)
    out = np.empty(global_batch, dtype=np.int64)
    for epoch in np.unique(epochs):
        rows = epochs == epoch
        out[rows] = epoch_permutation(num_examples, seed, int(epoch))[offsets[rows]]
    return out


def flip_mask(global_batch: int, step: int, seed: int) -> np.ndarray:
    """Which rows of batch ``step`` are mirrored left-right: bool (B,), each True w.p. 1/2."""
    rng = np.random.default_rng([_check_seed(seed), _FLIP_STREAM, int(step)])
    return rng.random(global_batch) < 0.5


def noise_rows(shape, step: int, seed: int, rows) -> np.ndarray:
    """ε ~ N(0, I), float32 (n, *shape), for global rows ``rows`` of batch ``step``.

    Row r draws from its own stream (seed, step, r), so a row's noise never depends on which
    process reads it or how many rows the process reads.
    """
    seed, step = _check_seed(seed), int(step)
    out = np.empty((len(rows), *shape), np.float32)
    for i, r in enumerate(rows):
        rng = np.random.default_rng([seed, _NOISE_STREAM, step, int(r)])
        out[i] = rng.standard_normal(shape, dtype=np.float32)
    return out


def read_rows(source, step, seed, global_batch, rows, random_flip=False) -> dict[str, np.ndarray]:
    """Rows ``rows`` (global batch positions) of batch ``step``, as numpy arrays."""
    rows = np.asarray(rows, dtype=np.int64)
    indices = batch_indices(len(source), global_batch, step, seed)[rows]
    if hasattr(source, "read_sampled"):  # one draw per row from the example's stored q(z | x)
        flip = flip_mask(global_batch, step, seed)[rows] if random_flip else None
        noise = noise_rows(tuple(source.info.image_shape), step, seed, rows)
        return source.read_sampled(indices, noise, flip)
    batch = source.read(indices)
    if random_flip:
        flip = flip_mask(global_batch, step, seed)[rows]
        image = batch["image"]  # (n, H, W, C)
        batch["image"] = np.where(flip[:, None, None, None], image[:, :, ::-1, :], image)
    if hasattr(source, "annotate"):  # per-step fields drawn from (seed, step, row): captions
        batch = source.annotate(batch, indices, step, seed, rows)
    return batch


def host_batch(
    source,
    step: int,
    seed: int,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
    random_flip: bool = False,
) -> dict[str, np.ndarray]:
    """This process's contiguous share of batch ``step``: ``dict(image=..., label=...)`` numpy.

    Process p of P gets global rows ``[p * B / P, (p + 1) * B / P)``; image float32
    (B / P, H, W, C) in [-1, 1], label int32 (B / P,) when the dataset has labels.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} must lie in [0, process_count={process_count})"
        )
    if global_batch % process_count:
        raise ValueError(
            f"global_batch={global_batch} is not divisible by process_count={process_count}"
        )
    per_process = global_batch // process_count
    rows = np.arange(process_index * per_process, (process_index + 1) * per_process)
    return read_rows(source, step, seed, global_batch, rows, random_flip)


class Loader:
    """Globally sharded batches over ``mesh``, with a position saved in checkpoints.

    ``next(loader)`` returns batch ``loader.step`` as ``{'image', 'label'}`` ``jax.Array``s
    sharded by ``parallel.batch_sharding(mesh)`` and advances the step. ``state()`` gives
    ``{'step', 'seed', 'num_examples'}`` (plain ints, for the checkpoint); ``restore(state)``
    continues from it. Up to ``prefetch`` later batches are read ahead on a background thread.
    """

    def __init__(
        self,
        source,
        mesh,
        global_batch: int,
        seed: int,
        *,
        random_flip: bool = False,
        step: int = 0,
        prefetch: int = 2,
    ):
        parallel.check_global_batch(mesh, global_batch)
        self.source, self.mesh = source, mesh
        self.global_batch, self.seed = int(global_batch), _check_seed(seed)
        self.random_flip = random_flip
        self.rows = parallel.process_rows(mesh, global_batch)  # this process's batch rows
        self.step = int(step)
        self._prefetch = max(int(prefetch), 0)
        self._pool = None
        self._pending = collections.deque()  # ((seed, step), future) in step order

    def host_rows(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of batch ``step`` as numpy (no state change)."""
        return read_rows(
            self.source, step, self.seed, self.global_batch, self.rows, self.random_flip
        )

    def batch(self, step: int):
        """Global batch ``step`` as sharded ``jax.Array``s (no state change)."""
        return parallel.host_to_global(self.mesh, self.host_rows(step))

    def __iter__(self):
        return self

    def __next__(self):
        host = self._next_host_rows()
        self.step += 1
        return parallel.host_to_global(self.mesh, host)

    def _next_host_rows(self):
        if not self._prefetch:
            return self.host_rows(self.step)
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, "diffusax-data")
        if self._pending and self._pending[0][0] != (self.seed, self.step):
            self._drop_pending()  # the position was changed since these were read ahead
        upcoming = self.step + len(self._pending)
        while len(self._pending) < self._prefetch + 1:
            future = self._pool.submit(self.host_rows, upcoming)
            self._pending.append(((self.seed, upcoming), future))
            upcoming += 1
        return self._pending.popleft()[1].result()

    def _drop_pending(self):
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()

    def state(self) -> dict:
        return {"step": self.step, "seed": self.seed, "num_examples": len(self.source)}

    def restore(self, state: dict) -> None:
        """Continue from ``state()`` of an earlier run; the dataset size must be the same."""
        if int(state["num_examples"]) != len(self.source):
            raise ValueError(
                f"data state was saved for a dataset of {int(state['num_examples'])} examples, "
                f"but '{self.source.info.name}' has {len(self.source)}; resuming would change "
                f"the order of the examples"
            )
        self._drop_pending()
        self.seed = _check_seed(int(state["seed"]))
        self.step = int(state["step"])

    def close(self) -> None:
        self._drop_pending()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
