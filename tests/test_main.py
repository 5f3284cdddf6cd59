"""The command line, run as a user runs it: `python -m diffusax.main` in a subprocess.

Subprocesses see one CPU device (`--cpu_devices=1`, where a user's run gets one per core) and
share the compiled programs of tests/test_train.py through JAX's persistent compilation cache.
"""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from diffusax.config import load_experiment
from diffusax.train.build import build
from diffusax.train.state import split_params

REPO = Path(__file__).resolve().parents[1]
JAX_CACHE = os.path.join(tempfile.gettempdir(), f"diffusax-test-jax-cache-{os.getuid()}")

# The tiny config of tests/test_train.py, as flags.
TINY = {
    "model.ch": 16,
    "model.ch_mult": (1, 2),
    "model.num_res_blocks": 1,
    "model.attn_resolutions": (4,),
    "model.num_heads": 1,
    "diffusion.num_timesteps": 50,
    "optim.schedule": "constant",
    "optim.warmup_steps": 4,
    "train.batch_size": 16,
    "train.num_steps": 6,
    "train.checkpoint_every": 3,
    "train.keep_checkpoints": 2,
    "train.log_every": 1,
    "train.grid_samples": 0,
    "train.progress": False,
    "sample.num_steps": 5,
    "sample.num_samples": 12,  # not a multiple of the sampling batch: a padded last batch
    "sample.batch_size": 8,
}


def main(mode, workdir, *flags, overrides=TINY, timeout=300, cpu_devices=1):
    """Run `python -m diffusax.main` from the repository root; returns the CompletedProcess."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=JAX_CACHE)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env.pop("XLA_FLAGS", None)
    cmd = [
        sys.executable,
        "-m",
        "diffusax.main",
        "--config=experiments/ddpm_digits.py",
        f"--workdir={workdir}",
        f"--mode={mode}",
        f"--cpu_devices={cpu_devices}",
        *[f"--config.{k}={v}" for k, v in overrides.items()],
        *flags,
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_info_prints_what_a_run_would_use(tmp_path):
    flags = ("--config.runlocal=True", "--config.train.num_steps=3")
    done = main("info", tmp_path / "info", *flags, overrides={})
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    params = int(re.search(r"^parameters: (\d+)$", out, re.M).group(1))
    gflops = float(re.search(r"^forward GFLOPs: ([\d.]+)", out, re.M).group(1))
    # The same count in this process: runlocal's U-Net (ch 16, mult (1, 2), 10 classes).
    cfg = load_experiment("ddpm_digits", overrides={"runlocal": True})
    net = build(cfg).networks["model"]
    _, abstract = split_params(nnx.eval_shape(lambda: net.build(jax.random.key(0))))
    assert params == sum(x.size for x in jax.tree.leaves(abstract))
    # Each 3x3 convolution weight is used at every pixel: far more than 2 FLOPs per parameter,
    # and below 2 * params * pixels.
    assert 2 * params / 1e9 < gflops < 2 * params * 64 / 1e9
    assert "mesh: {'data': 1, 'fsdp': 1} over 1 cpu device(s)" in out
    assert "dataset: digits [train] 1497 examples, images (8, 8, 1)" in out
    assert "classes 10" in out
    assert "method: ddpm" in out
    assert "sampler: ddim, 20 steps, guidance 1.5" in out
    # runlocal shrinks to a batch of 16; the explicit override of num_steps comes after it.
    assert "batch: 16 global, 3 steps" in out


def test_a_cpu_run_splits_the_batch_over_one_device_per_core(tmp_path):
    # The default (--cpu_devices=0): the most devices, up to the core count, dividing the batch.
    cores = len(os.sched_getaffinity(0))
    for batch in (16, 15):
        expected = max(d for d in range(1, cores + 1) if batch % d == 0)
        flags = ("--config.runlocal=True", f"--config.train.batch_size={batch}")
        done = main("info", tmp_path / "info", *flags, overrides={}, cpu_devices=0)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"mesh: {{'data': {expected}, 'fsdp': 1}} over {expected} cpu" in done.stdout
    assert not (tmp_path / "info").exists(), "info must not write anything"


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--config.sample.sampler=ddimm", r"'sample\.sampler' is 'ddimm'.*did you mean 'ddim'"),
        ("--config.train.num_steps=abc", r"--config\.train\.num_steps=abc"),
        ("--config.train.num_steps=0", r"'train\.num_steps' must be > 0"),
        (
            "--config.train.num_stepz=5",
            r"unknown config field 'train\.num_stepz'; did you mean 'num_steps'",
        ),
        ("--config.trian.num_steps=5", r"unknown config field 'trian\.num_steps'"),
    ],
)
def test_a_bad_flag_exits_2_naming_the_field(tmp_path, flag, message):
    done = main("info", tmp_path / "w", flag, overrides={}, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert re.search(message, done.stderr), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "w").exists()


def test_sample_without_a_checkpoint_exits_2_naming_the_checkpoint_dir(tmp_path):
    workdir = tmp_path / "empty"
    done = main("sample", workdir)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"no checkpoint in {workdir / 'checkpoints'}" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (workdir / "checkpoints").exists(), "a failed sample must not create anything"


def test_train_then_sample(tmp_path):
    workdir = tmp_path / "run"
    done = main("train", workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 6]
    assert (workdir / "loss.png").is_file() and (workdir / "metrics.jsonl").is_file()

    done = main("sample", workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    path = workdir / "samples" / "samples.npz"
    assert f"wrote {path}" in done.stdout
    with np.load(path) as npz:
        images, labels = npz["images"], npz["labels"]
    n = TINY["sample.num_samples"]
    assert images.dtype == np.uint8 and images.shape == (n, 8, 8, 1)  # NHWC
    assert labels.shape == (n,) and np.issubdtype(labels.dtype, np.integer)
    np.testing.assert_array_equal(labels, np.arange(n) % 10)  # sample.label=-1: classes in turn
    assert images.min() < images.max(), "samples must not be constant images"
    grid = Image.open(workdir / "samples" / "samples_grid.png")
    assert grid.size[0] > 8 and grid.size[1] > 8
    assert not list((workdir / "samples").glob("*.tmp*")), "no temporary file is left behind"
