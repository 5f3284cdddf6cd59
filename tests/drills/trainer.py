"""`python -m diffusax.main`, with two test-only hooks, for the reliability drills.

    python tests/drills/trainer.py --config=experiments/ddpm_digits.py --workdir=W --mode=train ...

Flags, signals and exit statuses are those of `diffusax.main`; the hooks only watch or poison
the batches the training loop takes (tests/test_drills_*.py start this script and kill it):

- ``DRILL_BATCH_LOG=PATH``: after ``next(loader)``, append one JSON line
  ``{"step", "time", "pid", "process", "rows": [first, end), "digests": [...]}``: a digest of
  each of this process's batch rows (image and label bytes) as placed on the devices: the batch
  the step trains on. One ``os.write`` per line on an ``O_APPEND`` file, so a SIGKILL leaves
  whole lines behind.
- ``DRILL_NAN_STEPS=3,4``: the first image of this process's rows of those batches is NaN.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import numpy as np


def local_rows(array) -> tuple[int, np.ndarray]:
    """(first global row, this process's rows in order) of a batch-sharded ``jax.Array``."""
    shards = {}
    for shard in array.addressable_shards:
        shards.setdefault(shard.index[0].start or 0, np.asarray(shard.data))
    starts = sorted(shards)
    return starts[0], np.concatenate([shards[s] for s in starts])


def row_digests(batch: dict) -> tuple[int, int, list[str]]:
    """(first row, end row, a short sha256 per row of image + label)."""
    first, images = local_rows(batch["image"])  # (n, H, W, C)
    labels = local_rows(batch["label"])[1] if "label" in batch else None  # (n,)
    digests = []
    for r in range(images.shape[0]):
        h = hashlib.sha256(np.ascontiguousarray(images[r]).tobytes())
        if labels is not None:
            h.update(np.ascontiguousarray(labels[r]).tobytes())
        digests.append(h.hexdigest()[:16])
    return first, first + images.shape[0], digests


def install_hooks() -> None:
    from diffusax import data

    nan_steps = {int(s) for s in os.environ.get("DRILL_NAN_STEPS", "").split(",") if s.strip()}
    if nan_steps:
        host_rows = data.Loader.host_rows

        def poisoned_host_rows(self, step):
            rows = host_rows(self, step)
            if step in nan_steps:
                rows = dict(rows, image=np.array(rows["image"], copy=True))
                rows["image"][0] = np.nan
            return rows

        data.Loader.host_rows = poisoned_host_rows

    log_path = os.environ.get("DRILL_BATCH_LOG")
    if log_path:
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        next_batch = data.Loader.__next__

        def logged_next(self):
            import jax

            step = self.step
            batch = next_batch(self)
            first, end, digests = row_digests(batch)
            record = {
                "step": step,
                "time": time.time(),
                "pid": os.getpid(),
                "process": jax.process_index(),
                "rows": [first, end],
                "digests": digests,
            }
            os.write(fd, (json.dumps(record) + "\n").encode())
            return batch

        data.Loader.__next__ = logged_next


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())  # as `python -m diffusax.main` run from the checkout
    install_hooks()
    from diffusax import main

    main.run()
