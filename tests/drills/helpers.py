"""Shared parts of the reliability drills (tests/test_drills_*.py, RELIABILITY.md).

The drills run the real trainer, `python tests/drills/trainer.py` (= `python -m diffusax.main`
plus a batch log), as separate processes on a tiny U-Net over the bundled 8x8 digits, and read
what they leave on disk: Orbax checkpoints, the batch log, metrics.jsonl, stderr.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from diffusax import checkpoint, parallel
from diffusax.config import load_experiment
from diffusax.train.build import build

REPO = Path(__file__).resolve().parents[2]
TRAINER = Path(__file__).resolve().parent / "trainer.py"
LAUNCH = Path(__file__).resolve().parent / "launch.py"
CONFIG = REPO / "experiments" / "ddpm_digits.py"
AUTOENCODER = REPO / "experiments" / "autoencoder_digits.py"
LCM = REPO / "experiments" / "lcm_digits.py"

# A U-Net of one level (residual blocks down and up, the middle block with its attention,
# time and class embeddings): a checkpoint of ~0.7 MB, quick to save and restore, yet a save
# lasts long enough for kills to land in all its phases. Constant learning rate after the warmup: the programs do not depend on
# train.num_steps, so a run of k steps is the prefix of a run of n.
TINY = {
    "model.ch": 8,
    "model.ch_mult": (1,),
    "model.num_res_blocks": 1,
    "model.attn_resolutions": (),
    "model.num_heads": 1,
    "diffusion.num_timesteps": 50,
    "optim.schedule": "constant",
    "optim.warmup_steps": 4,
    "train.batch_size": 16,
    "train.log_every": 1,
    "train.grid_samples": 0,
    "train.progress": False,
    "sample.num_steps": 5,
    "sample.num_samples": 8,
    "sample.batch_size": 8,
}

# The eval and sampling sizes of the few-step distillation tests (lcm, add): 32 samples, the
# student at 1 and 2 steps against the teacher at 5.
FEW_STEP_EVAL = {
    "eval.num_samples": 32,
    "eval.classifier_steps": 50,
    "eval.few_steps": (1, 2),
    "eval.teacher_steps": 5,
    "sample.num_samples": 8,
    "sample.batch_size": 8,
    "sample.num_steps": 2,
}


def labelled_batch(run, rows=16):
    """The first ``rows`` images of a run's source, labelled 0, 1, ..., 9, 0, ... (a batch of
    a method's loss)."""
    images = np.asarray(run.source.read(np.arange(rows))["image"], np.float32)
    labels = np.arange(rows, dtype=np.int32) % 10
    return {"image": jnp.asarray(images), "label": jnp.asarray(labels)}


# The autoencoder method at its smallest: two 8-channel levels at the digits' 8x8, a one-layer
# PatchGAN on from step 4, constant learning rates (a run of k steps is the prefix of n).
TINY_AUTOENCODER = {
    "autoencoder.image_size": 8,
    "autoencoder.block_out_channels": (8, 8),
    "autoencoder.norm_num_groups": 4,
    "autoencoder.disc_channels": 8,
    "autoencoder.disc_norm_groups": 4,
    "autoencoder.disc_start": 4,
    "optim.schedule": "constant",
    "optim.warmup_steps": 4,
    "train.batch_size": 16,
    "train.log_every": 1,
    "train.progress": False,
}


def overrides(**changes) -> dict:
    """TINY with changes given as ``train__num_steps=8`` (double underscore for a dot)."""
    out = dict(TINY)
    out.update({k.replace("__", "."): v for k, v in changes.items()})
    return out


def config(over: dict, experiment=CONFIG):
    return load_experiment(str(experiment), overrides=over)


def flags(over: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in over.items()]


def trainer_env(devices: int = 1, *, cache_writes: bool = True, **extra) -> dict:
    """Environment of a trainer process: CPU, ``devices`` JAX devices, the shared JIT cache.

    ``cache_writes=False`` only reads the persistent compilation cache: a process that is
    about to be killed must not leave a half-written entry in it. A writing trainer keeps even
    its quickest programs (Orbax's ~30 slicing ops of a save): every trainer started after it
    reads them back instead of compiling them again.
    """
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices))
    env.pop("XLA_FLAGS", None)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0" if cache_writes else "1e9"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(key, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Trainer:
    """One trainer process. Its stderr is copied to a file by a thread of this process: through
    a pipe, so that a file-size limit set for the trainer does not cut its error messages short.
    """

    def __init__(
        self,
        workdir,
        over: dict,
        *,
        env: dict,
        name: str = "run",
        extra_flags=(),
        config=CONFIG,
        launch=(),
        logs=None,
    ):
        """Start it; its stderr and batch log go to ``logs`` (default: beside the workdir).

        ``launch``: options of launch.py to run it with, e.g. ``["--plain-user"]`` (file
        permissions apply to it even when the tests run as root).
        """
        self.workdir = Path(workdir)
        logs = self.workdir.parent if logs is None else Path(logs)
        logs.mkdir(parents=True, exist_ok=True)
        self.stderr_path = logs / f"{self.workdir.name}.{name}.stderr"
        cmd = [
            sys.executable,
            str(TRAINER),
            f"--config={config}",
            f"--workdir={self.workdir}",
            "--mode=train",
            *flags(over),
            *extra_flags,
        ]
        if launch:
            cmd = [sys.executable, str(LAUNCH), *launch, *cmd]
        env = dict(env)
        env.setdefault("DRILL_BATCH_LOG", str(logs / f"{self.workdir.name}.batches"))
        self.batch_log = Path(env["DRILL_BATCH_LOG"])
        self.started = time.time()
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self.pid = self.proc.pid
        self._copier = threading.Thread(target=self._copy_stderr, daemon=True)
        self._copier.start()

    def _copy_stderr(self) -> None:
        with open(self.stderr_path, "wb", buffering=0) as out:
            for chunk in iter(lambda: self.proc.stderr.read1(65536), b""):
                out.write(chunk)

    def poll(self):
        return self.proc.poll()

    def wait(self, timeout: float = 600) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"trainer ran over {timeout} s:\n{self.stderr()[-3000:]}"
            ) from None
        self._copier.join(timeout=60)
        return code

    def signal(self, signum) -> float:
        """Send ``signum``; returns the time it was sent."""
        self.proc.send_signal(signum)
        return time.time()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._copier.join(timeout=60)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def batches(self) -> list[dict]:
        """This process's batch-log records (its own pid), in order."""
        return [r for r in read_batches(self.batch_log) if r["pid"] == self.pid]


def run(workdir, over: dict, *, devices: int = 1, timeout: float = 600, **kw) -> Trainer:
    """Start a trainer and wait for it to exit."""
    env = kw.pop("env", None) or trainer_env(devices)
    trainer = Trainer(workdir, over, env=env, **kw)
    trainer.wait(timeout)
    return trainer


def wait_until(predicate, *, timeout: float, trainer: Trainer | None = None, every=0.002):
    """Poll ``predicate()`` until true; AssertionError on timeout or when the trainer exits."""
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if trainer is not None and trainer.poll() is not None:
            return None  # the process ended first: the caller decides
        if time.time() > deadline:
            tail = trainer.stderr()[-3000:] if trainer else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {predicate}\n{tail}")
        time.sleep(every)


def read_batches(path) -> list[dict]:
    """Batch-log records; a line torn by a kill (it cannot be, see trainer.py) would fail."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def read_metrics(workdir) -> list[dict]:
    """metrics.jsonl records; a line cut short by a SIGKILL is skipped (it is not ours)."""
    path = Path(workdir) / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else ():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def steps_on_disk(workdir) -> list[int]:
    """Complete checkpoint steps: the step directories Orbax has renamed into place."""
    ckpt = Path(workdir) / "checkpoints"
    if not ckpt.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())


def tmp_dirs(workdir) -> list[Path]:
    """Orbax's temporary directories (``<step>.orbax-checkpoint-tmp*``) anywhere in the workdir."""
    ckpt = Path(workdir) / "checkpoints"
    if not ckpt.is_dir():
        return []
    try:
        return [p for p in ckpt.iterdir() if ".orbax-checkpoint-tmp" in p.name]
    except FileNotFoundError:
        return []


def tmp_step(path: Path) -> int:
    return int(path.name.split(".", 1)[0])


def tree_digest(root) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root`` (to prove files were not touched)."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def abstract_state(over: dict, devices, experiment=CONFIG):
    """The train state's shapes with replicated shardings over ``devices`` (a restore target)."""
    cfg = config(over, experiment)
    run = build(cfg, devices=list(devices))
    abstract = run.abstract
    repl = parallel.replicated(run.mesh)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), abstract)


def restore(workdir, over: dict, devices=None, step=None, experiment=CONFIG) -> checkpoint.Restored:
    """A checkpoint of ``workdir`` read back onto ``devices`` (default: the first device)."""
    devices = jax.devices()[:1] if devices is None else devices
    target = abstract_state(over, devices, experiment)
    with checkpoint.Checkpointer(
        Path(workdir) / "checkpoints", save_every=1, keep=1000, async_save=False
    ) as ckpt:
        restored = ckpt.restore(target, step=step)
    assert restored is not None, f"no checkpoint in {workdir}"
    return restored


def host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def differing_leaves(a, b) -> list[str]:
    """Names of the leaves of two equal-structure trees that differ bitwise."""
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b)
    return [
        checkpoint.param_name(path)
        for (path, x), y in zip(flat_a, flat_b, strict=True)
        if not np.array_equal(host(x), host(y))
    ]


def network_outputs(over: dict, state, examples: int = 16) -> dict[str, np.ndarray]:
    """The network's outputs on fixed inputs, with the state's parameters and with its EMA.

    Training on another device count adds in another order; Adam turns the rounding noise of
    a gradient that is exactly zero in theory (a bias that a GroupNorm right after cancels)
    into full-size steps, so such parameters drift apart while the function the network
    computes does not. Comparing outputs compares what matters.
    """
    cfg = config(over)
    run = build(cfg, devices=jax.devices()[:1])
    source, num_classes = run.source, run.data.num_classes
    batch = source.read(np.arange(examples))
    x = batch["image"]  # (n, H, W, C)
    t = np.linspace(0, cfg.diffusion.num_timesteps - 1, examples).astype(np.int32)  # (n,)
    y = batch.get("label") if num_classes else None
    apply_fn = jax.jit(run.ctx.apply_fn("model"))
    return {
        "params": host(apply_fn(jax.device_get(state.params["model"]), x, t, y)),
        "ema": host(apply_fn(jax.device_get(state.ema["ema"]), x, t, y)),
    }


def assert_sharded_equals_single(sharded, single, *, steps: int, atol: float = 1e-5) -> None:
    """Two ``loop.train`` results of one config, on 8 devices and on 1: the same losses (rtol
    1e-5) and parameters (rtol 1e-4, ``atol``). A key projection's bias is only compared as
    small: softmax cancels it, so it is rounding noise."""
    assert sharded.run.mesh.size == 8 and single.run.mesh.size == 1
    order = sorted(single.losses)
    assert order == sorted(sharded.losses) == list(range(steps))
    np.testing.assert_allclose(
        [sharded.losses[s] for s in order], [single.losses[s] for s in order], rtol=1e-5
    )
    a, b = jax.device_get(sharded.state.params), jax.device_get(single.state.params)
    flat = jax.tree_util.tree_flatten_with_path(a)[0]
    for (path, x), y in zip(flat, jax.tree.leaves(b), strict=True):
        name = jax.tree_util.keystr(path)
        if "k_proj']['bias" in name:
            assert np.max(np.abs(x)) < 1e-3 and np.max(np.abs(y)) < 1e-3, name
            continue
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=atol, err_msg=name)


def assert_resumed_is_bitwise(single, resumed, *, stopped_at: int, steps: int) -> None:
    """A run stopped at ``stopped_at`` and resumed equals the uninterrupted one bitwise: its
    losses after the stop, parameters, optimizer states and EMAs."""
    after = list(range(stopped_at, steps))
    assert resumed.start_step == stopped_at and sorted(resumed.losses) == after
    assert [resumed.losses[s] for s in after] == [single.losses[s] for s in after]
    for part in ("params", "opt_state", "ema"):
        a, b = getattr(single.state, part), getattr(resumed.state, part)
        assert differing_leaves(a, b) == [], part
