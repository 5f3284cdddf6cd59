"""The one training loop: every method and model runs through ``train``.

config -> ``build`` (mesh, data, the method's networks, state born sharded, jitted donated
step) -> batches -> Orbax checkpoints -> sample grids, TensorBoard scalars, a loss curve.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time

import jax
import numpy as np

from diffusax import checkpoint, conditions, image_io, methods
from diffusax import config as config_lib
from diffusax.train.build import Run, build
from diffusax.train.state import STATE_LAYOUT

log = logging.getLogger("diffusax")

# Exit statuses of `diffusax.main --mode=train` after a signal: the state was saved first.
EXIT_SIGTERM = 143  # 128 + SIGTERM: preempted, resume by running the same command
EXIT_SIGINT = 130  # 128 + SIGINT (Ctrl-C)


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN/inf; the message names the step."""


@dataclasses.dataclass
class TrainResult:
    state: object  # the final TrainState
    run: Run
    losses: dict  # step -> loss, for the steps this process ran
    stopped_by: int | None  # the signal number that ended the run early, or None
    start_step: int


class _StopFlag:
    """Set by SIGTERM / SIGINT; the loop finishes the step in hand, saves, and returns."""

    def __init__(self):
        self.signum = None

    def __call__(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once
        self.signum = signum


@contextlib.contextmanager
def _signal_handlers(flag):
    if threading.current_thread() is not threading.main_thread():
        yield  # signals can only be caught on the main thread
        return
    previous = {s: signal.signal(s, flag) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def train(cfg, workdir: str, *, devices=None) -> TrainResult:
    """Train (or resume) the experiment ``cfg`` in ``workdir`` until ``cfg.train.num_steps``."""
    config_lib.validate(cfg)
    run = build(cfg, devices=devices)
    _check_workdir(workdir)
    conditions.keep_tokenizer_with_run(cfg, workdir, write=jax.process_index() == 0)
    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        save_every=cfg.train.checkpoint_every,
        keep=cfg.train.keep_checkpoints,
        async_save=cfg.train.async_checkpoint,
    )
    digest = config_lib.digest_fields(cfg, run.method.param_sections)
    try:
        frozen = run.frozen()
        frozen_record = run.frozen_record()
        state = _restore_or_init(ckpt, run, digest, frozen_record)
    except BaseException:
        ckpt.close()  # no Orbax threads left behind by a refused resume
        raise
    start = int(jax.device_get(state.step))
    loader = run.loader(start)
    grid_cfg = _grid_sample_cfg(cfg, run.mesh.size)
    generate = run.method.make_sampler(run, grid_cfg)
    writer = _Writer(workdir) if jax.process_index() == 0 else None
    flag = _StopFlag()
    stopped_by = None
    losses: dict[int, float] = {}
    pending = None  # (step, metrics) of the previous step, checked one step late
    t_start, steps_done = time.time(), 0
    progress = _progress(cfg, start)

    def save(state, force):
        extra = {
            "data": loader.state(),
            "model_config": digest,
            "state_layout": STATE_LAYOUT,
            "frozen": frozen_record,
        }
        return ckpt.save(int(jax.device_get(state.step)), state, extra, force=force)

    def check(step, metrics):
        metrics = jax.device_get(metrics)
        if not metrics["finite"]:
            if cfg.train.nonfinite == "abort":
                raise NonFiniteLossError(
                    f"non-finite loss or gradient at step {step} (loss={metrics['loss']}); "
                    f"stopping. The last checkpoint is intact; set train.nonfinite='skip' to "
                    f"skip such steps"
                )
            if int(metrics["bad_steps"]) >= cfg.train.max_bad_steps:
                raise NonFiniteLossError(
                    f"{int(metrics['bad_steps'])} non-finite steps in a row, the last at step "
                    f"{step} (train.max_bad_steps={cfg.train.max_bad_steps}); stopping"
                )
            log.warning("step %d: non-finite loss, update skipped", step)
        losses[step] = float(metrics["loss"])
        return metrics

    try:
        with _signal_handlers(flag):
            for step in range(start, cfg.train.num_steps):
                batch = next(loader)
                state, metrics = run.train_step(state, frozen, batch)
                if pending is not None:
                    _log(cfg, writer, progress, pending[0], check(*pending), t_start, steps_done)
                pending = (step, metrics)
                steps_done += 1
                last = step + 1 == cfg.train.num_steps
                stop = _agreed_signal(flag)
                if (step + 1) % cfg.train.checkpoint_every == 0 or last or stop:
                    check(*pending)
                    save(state, force=last or bool(stop))
                if cfg.train.sample_every and (step + 1) % cfg.train.sample_every == 0:
                    _write_grid(run, grid_cfg, generate, state, workdir, step + 1)
                if stop:
                    log.warning("signal %d: saved step %d, exiting", stop, step + 1)
                    stopped_by = stop
                    break
            if pending is not None:
                _log(cfg, writer, progress, pending[0], check(*pending), t_start, steps_done)
    except BaseException:
        if writer:
            writer.close()
        raise
    finally:
        try:
            with _signal_handlers(flag):  # a signal now must not cut the last save short
                ckpt.close()  # waits for the save in flight; a failed write raises here
        finally:
            loader.close()
            if progress is not None:
                progress.close()
    if not stopped_by and steps_done:
        _write_grid(run, grid_cfg, generate, state, workdir, None)
        if writer:
            writer.finish(workdir)
    elif writer:
        writer.close()
    return TrainResult(state, run, losses, stopped_by, start)


def _check_workdir(workdir) -> None:
    """Create ``workdir``; an OSError naming it unless it is a readable, writable directory."""
    for path in (workdir, os.path.join(workdir, "checkpoints")):
        if os.path.exists(path) and not os.path.isdir(path):
            raise NotADirectoryError(f"workdir {workdir!r}: {path!r} is not a directory")
    os.makedirs(workdir, exist_ok=True)  # NotADirectoryError when a parent is a file
    if not os.access(workdir, os.R_OK | os.W_OK | os.X_OK):
        raise PermissionError(f"workdir {workdir!r} is not readable and writable")


def _restore_or_init(ckpt, run, digest, frozen_record):
    """The latest checkpoint's state, or a new state born sharded when there is none."""
    step = ckpt.latest_step()
    saved_extra = _saved_extra(ckpt, step)
    if saved_extra is not None and "state_layout" not in saved_extra:
        raise checkpoint.CheckpointMismatchError(
            f"checkpoint {ckpt.step_path(step)} predates the new state layout (one parameter "
            f"tree and one EMA; now groups, optimizer states and EMAs by name): it cannot be "
            f"resumed by this version. Use another workdir (nothing was changed in this one), "
            f"or restore it with the diffusax version that wrote it"
        )
    try:
        restored = ckpt.restore(run.abstract_with_shardings())
    except checkpoint.CheckpointMismatchError as e:
        _check_same_model((saved_extra or {}).get("model_config"), digest, step, ckpt, cause=e)
        raise  # the parameters differ although the recorded fields do not
    if restored is None:
        return run.init_state()
    _check_same_model(restored.extra.get("model_config", {}), digest, restored.step, ckpt)
    _check_same_frozen(restored.extra.get("frozen", {}), frozen_record, restored.step, ckpt)
    log.info("resumed from step %d", restored.step)
    return restored.state


def _check_same_frozen(saved: dict, current: dict, step: int, ckpt) -> None:
    """CheckpointMismatchError naming the frozen networks whose weights changed since ``step``."""
    changed = sorted(
        name
        for name in set(saved) | set(current)
        if (saved.get(name) or {}).get("digest") != (current.get(name) or {}).get("digest")
    )
    if changed:
        details = ", ".join(
            f"{n}: {(saved.get(n) or {}).get('source')!r} -> {(current.get(n) or {}).get('source')!r}"
            for n in changed
        )
        raise checkpoint.CheckpointMismatchError(
            f"checkpoint {ckpt.step_path(step)} was trained against other frozen weights "
            f"({details}; their digests differ); resume with the frozen networks it was "
            f"trained with, or use another workdir"
        )


def _agreed_signal(flag) -> int | None:
    """The stop signal, agreed by every process (all must save the same step, or none)."""
    if jax.process_count() == 1:
        return flag.signum
    from jax.experimental import multihost_utils

    signums = multihost_utils.process_allgather(np.int32(flag.signum or 0))
    return int(np.max(signums)) or None


def _check_same_model(saved, current: dict, step: int, ckpt, cause=None) -> None:
    """CheckpointMismatchError naming the config fields that changed since ``step`` was saved.

    Only fields recorded on both sides are compared, so a checkpoint from a version that recorded
    fewer fields still resumes.
    """
    saved = saved or {}
    changed = {k for k in set(saved) & set(current) if saved[k] != _jsonable(current[k])}
    if changed:
        details = ", ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in sorted(changed))
        raise checkpoint.CheckpointMismatchError(
            f"checkpoint {ckpt.step_path(step)} was written for another model: config fields "
            f"changed since ({details}); use another workdir or restore the original config"
        ) from cause


def _saved_extra(ckpt, step) -> dict | None:
    """The JSON `extra` item of ``step`` read straight from disk, or None if unreadable."""
    if step is None:
        return None
    try:
        path = ckpt.step_path(step) / checkpoint.EXTRA_ITEM / "metadata"  # Orbax's JSON file
        extra = json.loads(path.read_text())
    except (OSError, ValueError, AttributeError):
        return None
    return extra if isinstance(extra, dict) else None


def _jsonable(value):
    return json.loads(json.dumps(value))


def _grid_sample_cfg(cfg, num_devices):
    s = cfg.sample.copy_and_resolve_references()
    with s.unlocked():
        s.batch_size = methods.padded_batch_size(max(cfg.train.grid_samples, 1), num_devices)
    return s


def _write_grid(run, grid_cfg, generate, state, workdir, step):
    """Sample a grid with the method's sampling parameters (every process takes part in the
    sampling; process 0 writes it)."""
    cfg = run.cfg
    if not cfg.train.grid_samples or generate is None:
        return
    num_classes = run.data.num_classes
    key = jax.random.fold_in(jax.random.key(cfg.seed + 1), step or 0)
    conditions, meta = run.method.sample_conditions(run, cfg.train.grid_samples, grid_cfg)
    images, _ = methods.generate_many(
        generate,
        run.sample_params(state),
        cfg.train.grid_samples,
        grid_cfg.batch_size,
        num_classes,
        key,
        conditions=conditions,
    )
    num_classes = num_classes or (run.data.dataset_classes if "labels" in meta else None)
    if jax.process_index() != 0:
        return
    ncols = image_io.class_columns(cfg.train.grid_samples, num_classes)
    name = "grid.png" if step is None else f"grid_{step:08d}.png"
    path = image_io.save_grid(os.path.join(workdir, "samples", name), images, ncols)
    log.info("wrote %s", path)


def _progress(cfg, start):
    if not cfg.train.progress or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.train.num_steps, initial=start, unit="step", dynamic_ncols=True)


def _log(cfg, writer, progress, step, metrics, t_start, steps_done):
    if progress is not None:
        progress.update(1)
        if step % 10 == 0:
            progress.set_postfix(loss=f"{float(metrics['loss']):.4f}")
    if writer is None:
        return
    writer.losses.append((step, float(metrics["loss"])))
    if (step + 1) % cfg.train.log_every == 0:
        rate = steps_done / max(time.time() - t_start, 1e-9)
        scalars = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
        scalars["steps_per_sec"] = rate
        writer.scalars(step + 1, scalars)


class _Writer:
    """TensorBoard event files (tensorboardX: no TensorFlow needed) and a metrics.jsonl."""

    def __init__(self, workdir):
        self.tb = _summary_writer(os.path.join(workdir, "tensorboard"))
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self.losses = []

    def scalars(self, step, values):
        for name, value in values.items():
            self.tb.add_scalar(f"train/{name}", value, step)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()

    def finish(self, workdir):
        if self.losses:
            steps, values = zip(*self.losses)
            image_io.save_loss_curve(os.path.join(workdir, "loss.png"), steps, values)
        self.close()

    def close(self):
        self.tb.close()
        self.jsonl.close()


def _summary_writer(logdir):
    """tensorboardX's SummaryWriter, imported without torch.

    tensorboardX imports torch whenever it is installed, only to accept torch tensors (this loop
    logs floats): 4 s more at every start where torch is present. A None in ``sys.modules`` makes
    that import fail as if torch were absent; a torch already imported is left as it is.
    """
    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None
        try:
            import tensorboardX  # noqa: F401  (imported once, without torch)
        finally:
            del sys.modules["torch"]
    from tensorboardX import SummaryWriter

    return SummaryWriter(logdir)
