"""Acceptance tests of the training loop: the real loop on 8 fake CPU devices, real Orbax
checkpoints on disk.

- sharded (8 devices) and single-device training give the same loss curve (float32 tolerance);
- two runs with the same seed give bitwise identical parameters;
- a run stopped at step k and resumed reaches bitwise the state of an uninterrupted run;
- checkpoints every N steps keep the last K; the outputs (grid, loss curve, metrics, events);
- resuming with another model config stops with an error naming the fields.

SIGTERM and NaN losses are proved on real trainer processes by the reliability drills
(tests/test_drills_kill.py and tests/test_drills_damage.py).

The configs use a constant learning-rate schedule after the warmup so that a run's programs
do not depend on `train.num_steps` (with the cosine decay, extending a run changes the schedule
by design, and a k-step run is not the prefix of an n-step one).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from diffusax import checkpoint
from diffusax.config import load_experiment
from diffusax.train import loop, optim

REPO = Path(__file__).resolve().parents[1]

# Compiled programs are shared by the runs of this file and its subprocesses (the programs of
# equal configs are equal); keyed by the HLO and the jax version, so a stale entry is never used.
JAX_CACHE = os.path.join(tempfile.gettempdir(), f"diffusax-test-jax-cache-{os.getuid()}")
# (tests/conftest.py turns JAX's persistent compilation cache on, in this directory.)

# A tiny class-conditional U-Net on the bundled 8x8 digits.
TINY = {
    "model.ch": 16,
    "model.ch_mult": (1, 2),
    "model.num_res_blocks": 1,
    "model.attn_resolutions": (4,),
    "model.num_heads": 1,
    "diffusion.num_timesteps": 50,
    "optim.schedule": "constant",
    "optim.warmup_steps": 4,  # the warmup spans the stop at step 3 of the resume test
    "train.batch_size": 16,
    "train.num_steps": 6,
    "train.checkpoint_every": 3,
    "train.keep_checkpoints": 2,
    "train.log_every": 1,
    "train.grid_samples": 0,
    "train.progress": False,
    "sample.num_steps": 5,
    "sample.num_samples": 8,
    "sample.batch_size": 8,
}
NUM_STEPS = TINY["train.num_steps"]


def tiny(**changes):
    overrides = dict(TINY)
    overrides.update({k.replace("__", "."): v for k, v in changes.items()})
    return load_experiment("ddpm_digits", overrides=overrides)


def subprocess_env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=JAX_CACHE)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env.pop("XLA_FLAGS", None)  # one device, as a user's laptop
    return env


def leaves_equal(a, b) -> list[str]:
    """Names of the leaves that differ bitwise (empty: the trees are bitwise identical)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree.leaves(b)
    return [
        checkpoint.param_name(path)
        for (path, x), y in zip(flat_a, flat_b, strict=True)
        if not np.array_equal(np.asarray(x), np.asarray(y))
    ]


def restore(workdir, like, step=None):
    """Read a checkpoint of ``workdir`` from disk onto the shardings of the state ``like``."""
    with checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"), save_every=1, keep=100, async_save=False
    ) as ckpt:
        return ckpt.restore(like, step=step)


def saved_steps(workdir) -> list[int]:
    names = os.listdir(os.path.join(workdir, "checkpoints"))
    return sorted(int(n) for n in names if n.isdigit())


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def sharded_run(workdirs):
    """The reference: 6 steps on all 8 devices, with an EMA sample grid at the end."""
    workdir = workdirs / "sharded"
    result = loop.train(tiny(train__grid_samples=8, train__checkpoint_every=2), str(workdir))
    return workdir, result


@pytest.fixture(scope="module")
def resumed_run(workdirs):
    """3 steps (num_steps=3), then the same workdir with num_steps=6: resumed from disk."""
    workdir = workdirs / "resumed"
    first = loop.train(tiny(train__num_steps=3), str(workdir))
    second = loop.train(tiny(), str(workdir))
    return workdir, first, second


def test_state_is_born_sharded_and_stays_sharded(sharded_run):
    _, result = sharded_run
    assert len(jax.devices()) == 8
    for x in jax.tree.leaves(result.state):
        assert x.sharding.mesh.size == 8 and x.sharding.is_fully_replicated
    assert int(result.state.step) == NUM_STEPS
    assert sorted(result.losses) == list(range(NUM_STEPS))
    assert result.stopped_by is None and result.start_step == 0


def test_sharded_and_single_device_give_the_same_loss_curve(sharded_run, workdirs):
    _, sharded = sharded_run
    single = loop.train(tiny(), str(workdirs / "single"), devices=jax.devices()[:1])
    assert single.state.params["model"]["conv_in"]["kernel"].sharding.mesh.size == 1
    steps = sorted(sharded.losses)
    assert sorted(single.losses) == steps
    np.testing.assert_allclose(
        [single.losses[s] for s in steps], [sharded.losses[s] for s in steps], rtol=1e-5
    )


def test_two_runs_with_the_same_seed_are_bitwise_identical(sharded_run, workdirs):
    _, first = sharded_run
    second = loop.train(tiny(), str(workdirs / "same_seed"))
    assert leaves_equal(first.state, second.state) == []
    assert second.losses == first.losses


def test_stopped_and_resumed_run_is_bitwise_the_uninterrupted_run(sharded_run, resumed_run):
    _, full = sharded_run
    workdir, first, second = resumed_run
    assert first.start_step == 0 and int(first.state.step) == 3
    assert second.start_step == 3, "the second run must resume from the step-3 checkpoint"
    assert sorted(second.losses) == [3, 4, 5]
    assert {s: full.losses[s] for s in (3, 4, 5)} == second.losses
    # params, optimizer state (moments, count), EMA and step: bitwise.
    assert leaves_equal(second.state, full.state) == []
    # The final checkpoint on disk holds that same state.
    on_disk = restore(workdir, full.state)
    assert on_disk.step == NUM_STEPS
    assert leaves_equal(on_disk.state, full.state) == []
    assert on_disk.extra["data"]["step"] == NUM_STEPS


def test_checkpoints_every_n_steps_keep_the_last_k(sharded_run, resumed_run):
    workdir, result = sharded_run
    # checkpoint_every=2, keep=2: steps 2, 4, 6 were written, 4 and 6 are kept.
    assert saved_steps(workdir) == [4, 6]
    restored = restore(workdir, result.state, step=4)
    assert int(restored.state.step) == 4
    assert restored.extra["model_config"]["model.ch"] == TINY["model.ch"]
    # checkpoint_every=3: the stopped run saved 3, the resumed one 6.
    resumed_dir, _, _ = resumed_run
    assert saved_steps(resumed_dir) == [3, 6]


def test_outputs_are_written(sharded_run):
    workdir, _ = sharded_run
    assert (workdir / "samples" / "grid.png").stat().st_size > 0
    assert (workdir / "loss.png").stat().st_size > 0
    events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1))  # log_every=1
    for r in records:
        assert {"loss", "mse", "grad_norm", "steps_per_sec"} <= set(r)
        assert np.isfinite(r["loss"]) and r["loss"] > 0


def test_resume_with_another_model_config_names_the_fields(resumed_run, workdirs):
    source, _, _ = resumed_run
    workdir = workdirs / "changed_model"
    shutil.copytree(source, workdir)
    before = saved_steps(workdir)
    # A change of shapes (Orbax would only list parameters) and one of structure only.
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"model\.ch: 16 -> 32"):
        loop.train(tiny(model__ch=32, train__num_steps=8), str(workdir))
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"model\.num_heads: 1 -> 2"):
        loop.train(tiny(model__num_heads=2, train__num_steps=8), str(workdir))
    assert saved_steps(workdir) == before  # nothing written, nothing moved aside
    assert not (workdir / "checkpoints" / checkpoint.DAMAGED_DIR).exists()


def test_the_trainer_imports_neither_torch_nor_sklearn(tmp_path):
    """Each would cost seconds at every start: the digits are read from sklearn's file and the
    event writer is imported without torch (the reliability drills start ~100 trainers)."""
    probe = (
        "import sys; from diffusax.data import sources; from diffusax.train import loop; "
        "assert len(sources.digits()) == 1497; loop._Writer(sys.argv[1]).close(); "
        "print(sorted(m for m in ('torch', 'sklearn', 'tensorboardX') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path)],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["['tensorboardX']"]
    assert list((tmp_path / "tensorboard").iterdir()), "no event file written"


# --- the optimizer and the EMA (no model) --------------------------------------------------


def test_lr_schedules_warm_up_then_hold_or_decay():
    cfg = tiny(optim__warmup_steps=10, optim__learning_rate=1e-3).optim
    constant = optim.make_lr_schedule(cfg, num_steps=100)
    assert float(constant(0)) == 0.0
    np.testing.assert_allclose(float(constant(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose([float(constant(s)) for s in (10, 50, 99)], 1e-3, rtol=1e-6)
    with cfg.unlocked():
        cfg.schedule = "cosine"
    cosine = optim.make_lr_schedule(cfg, num_steps=100)
    np.testing.assert_allclose(float(cosine(10)), 1e-3, rtol=1e-6)
    # Half way through the decay: lr/2 (1 + cos(pi/2)) = lr/2; at the end: 0.
    np.testing.assert_allclose(float(cosine(55)), 5e-4, rtol=1e-5)
    assert float(cosine(100)) == pytest.approx(0.0, abs=1e-12)


def test_optimizer_clips_the_global_norm_and_decays_weights():
    params = {"w": np.ones(4, np.float32)}
    grads = {"w": np.full(4, 100.0, np.float32)}  # global norm 200
    cfg = tiny(optim__warmup_steps=0, optim__learning_rate=0.1, optim__grad_clip=1.0).optim

    def first_update(optim_cfg):
        opt = optim.make_optimizer(optim_cfg, num_steps=10)
        updates, _ = opt.update(grads, opt.init(params), params)
        return np.asarray(updates["w"])

    # Adam's first step is -lr * g / (|g| + eps) whatever the scale: clipping shows in the
    # moments, so compare against optax on the clipped gradient directly.
    clipped = {"w": grads["w"] / 200.0}
    ref = optax.adam(0.1, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    ref_updates, ref_state = ref.update(clipped, ref.init(params), params)
    opt = optim.make_optimizer(cfg, num_steps=10)
    updates, state = opt.update(grads, opt.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["w"]), np.asarray(ref_updates["w"]), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(state[1][0].mu["w"]), np.asarray(ref_state[0].mu["w"]), rtol=1e-6
    )
    with cfg.unlocked():
        cfg.name, cfg.weight_decay = "adamw", 0.5
    # AdamW adds lr * wd * w to the Adam step: -0.1 * (1 + 0.5 * 1) per coordinate.
    np.testing.assert_allclose(first_update(cfg), -0.1 * 1.5, rtol=1e-5)


def test_ema_update_is_the_exponential_moving_average():
    params = {"w": np.array([1.0, 2.0], np.float32)}
    ema = optim.ema_init(params)
    ema = optim.ema_update(ema, {"w": np.array([3.0, 6.0], np.float32)}, decay=0.75)
    np.testing.assert_allclose(np.asarray(ema.params["w"]), [1.5, 3.0])  # 0.75 e + 0.25 p
