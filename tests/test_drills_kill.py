"""Reliability drills 1 and 2: a real trainer process killed (SIGKILL) or stopped (SIGTERM).

Drill 1 kills the trainer at 20 moments chosen by a seeded random generator - during start-up
(before its first batch), between steps, while an asynchronous Orbax checkpoint is being written, just after one was
committed - and restarts it each time. Every restart must resume from the newest complete
checkpoint (nothing older, nothing half-written), no temporary checkpoint directory may
survive a restart, and the final parameters, optimizer state and EMA, the batch of every step
and every logged loss must be bitwise those of an uninterrupted run of the same length.

Drill 2 sends SIGTERM at three moments (between steps, during a step, with a save in flight):
the trainer must finish the step in hand, save it, wait for the write and exit 143 within a
bound; the restart must start at that very step (no step lost, no batch trained twice). A
fourth SIGTERM, while the final checkpoint is being written, must not cut that write short.

Each run is `tests/drills/trainer.py` (`python -m diffusax.main` plus a log of the batches it
takes) on one CPU device. See RELIABILITY.md for the figures measured.
"""

import itertools
import random
import signal
import time

import pytest
from drills import helpers as dh

NUM_STEPS = 48
OVERRIDES = dh.overrides(
    train__num_steps=NUM_STEPS, train__checkpoint_every=2, train__keep_checkpoints=3
)
KILL_SEED = 20261127
# 20 kills: where each lands is drawn from KILL_SEED (see _kill_moment).
MOMENTS = ["startup"] * 3 + ["step"] * 6 + ["write"] * 8 + ["commit"] * 3


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (it also fills the compilation cache the later runs read). It saves
    its last step only: saves change nothing it computes, and each costs a second."""
    workdir = tmp_path_factory.mktemp("kill") / "reference"
    trainer = dh.run(workdir, dict(OVERRIDES, **{"train.checkpoint_every": NUM_STEPS}))
    assert trainer.proc.returncode == 0, trainer.stderr()[-3000:]
    batches = {r["step"]: r["digests"] for r in trainer.batches()}
    assert sorted(batches) == list(range(NUM_STEPS))
    losses = {r["step"]: r["loss"] for r in dh.read_metrics(workdir)}
    assert sorted(losses) == list(range(1, NUM_STEPS + 1))
    return workdir, batches, losses


def _tmp_dirs_by_age(trainer) -> tuple[list, list]:
    """Temporary checkpoint directories (older than this trainer, made by it)."""
    older, own = [], []
    for path in dh.tmp_dirs(trainer.workdir):
        try:
            made_before = path.stat().st_mtime < trainer.started
        except FileNotFoundError:
            continue
        (older if made_before else own).append(path.name)
    return older, own


def _kill_moment(trainer, moment: str, start: int, rng: random.Random) -> str:
    """Wait for ``moment`` of this attempt (which resumed at ``start``); returns what was hit."""
    if moment == "startup":  # importing, compiling, restoring: before the first batch
        # At a random time in the first 8 s, or as the first batch is taken if that is sooner:
        # a trainer that starts in ~5 s would otherwise train many steps before a "startup"
        # kill, and the 20 attempts could run out of the 48 steps before the last kill.
        deadline = time.time() + rng.uniform(0.5, 8.0)
        while time.time() < deadline and not trainer.batches() and trainer.poll() is None:
            time.sleep(0.01)
        return "startup"
    # Once it trains, what the killed attempts left half-written is gone.
    if not dh.wait_until(trainer.batches, timeout=300, trainer=trainer, every=0.005):
        return "exited"
    assert _tmp_dirs_by_age(trainer)[0] == [], "a temporary directory survived a restart"
    if moment == "step":  # at a random time after a random step
        target = start + rng.randint(1, 5)
        reached = dh.wait_until(
            lambda: any(r["step"] >= target for r in trainer.batches()),
            timeout=300,
            trainer=trainer,
            every=0.02,
        )
        if reached:
            time.sleep(rng.uniform(0.0, 0.4))
        return "step"
    # "write" and "commit" wait for this attempt's first save to complete (progress) ...
    first = dh.wait_until(
        lambda: [s for s in dh.steps_on_disk(trainer.workdir) if s > start],
        timeout=300,
        trainer=trainer,
    )
    if not first:
        return "exited"
    if moment == "commit":  # ... and kill just after it was renamed into place
        return "commit"
    # ... then kill while the next one is being written.
    writing = dh.wait_until(
        lambda: [p for p in dh.tmp_dirs(trainer.workdir) if dh.tmp_step(p) > first[0]],
        timeout=300,
        trainer=trainer,
        every=0.001,
    )
    if writing:
        time.sleep(rng.uniform(0.0, 0.1))
    return "write"


def test_sigkill_at_20_moments_then_resume_is_bitwise_the_uninterrupted_run(reference, tmp_path):
    ref_dir, ref_batches, ref_losses = reference
    rng = random.Random(KILL_SEED)
    moments = list(MOMENTS)
    rng.shuffle(moments)
    workdir = tmp_path / "killed"
    env = dh.trainer_env(1, cache_writes=False)
    attempts = []  # (trainer, step it had to resume from)
    mid_write = 0
    t0 = time.time()
    for i, moment in enumerate(moments):
        start = max(dh.steps_on_disk(workdir), default=0)
        trainer = dh.Trainer(workdir, OVERRIDES, env=env, name=f"attempt{i:02d}")
        try:
            hit = _kill_moment(trainer, moment, start, rng)
        finally:
            trainer.kill()
        assert trainer.proc.returncode == -9, f"attempt {i} ended by itself:\n{trainer.stderr()}"
        assert hit == moment, f"attempt {i}: wanted a kill at {moment}, got {hit}"
        mid_write += bool(_tmp_dirs_by_age(trainer)[1])  # it left a half-written step behind
        attempts.append((trainer, start))
    kill_seconds = time.time() - t0

    last_start = max(dh.steps_on_disk(workdir), default=0)
    final = dh.Trainer(workdir, OVERRIDES, env=env, name="final")
    assert final.wait() == 0, final.stderr()[-3000:]
    attempts.append((final, last_start))

    # Every restart began exactly at the newest complete checkpoint it found.
    for i, (trainer, start) in enumerate(attempts):
        batches = trainer.batches()
        if batches:
            assert batches[0]["step"] == start, f"attempt {i} resumed at {batches[0]['step']}"
            if start:
                assert f"resumed from step {start}" in trainer.stderr()
    assert f"resumed from step {last_start}" in final.stderr()

    # Every batch any attempt took is the reference's batch of that step; all steps were run.
    taken = {}
    for record in dh.read_batches(attempts[0][0].batch_log):
        assert record["digests"] == ref_batches[record["step"]], record["step"]
        taken.setdefault(record["step"], 0)
        taken[record["step"]] += 1
    assert sorted(taken) == list(range(NUM_STEPS))
    # Every loss any attempt logged is the reference's loss of that step, bitwise.
    for record in dh.read_metrics(workdir):
        assert record["loss"] == ref_losses[record["step"]], record["step"]

    # Nothing half-written or set aside is left; the final states are bitwise equal.
    assert dh.tmp_dirs(workdir) == []
    assert not (workdir / "checkpoints" / "damaged").exists()
    assert dh.steps_on_disk(workdir) == [44, 46, 48]
    got, want = dh.restore(workdir, OVERRIDES), dh.restore(ref_dir, OVERRIDES)
    assert got.step == want.step == NUM_STEPS
    assert got.extra["data"] == want.extra["data"]
    assert dh.differing_leaves(got.state, want.state) == []
    print(
        f"\nkill drill: {len(moments)} SIGKILLs ({mid_write} left a checkpoint half-written), "
        f"{sum(n - 1 for n in taken.values())} steps replayed, {kill_seconds:.0f} s of attempts"
    )
    assert mid_write >= 4, "too few kills landed during a checkpoint write"


# --- SIGTERM ------------------------------------------------------------------------------

SIGTERM_BOUND_S = 60  # one step, one save, and the wait for it: seconds on a loaded 2-core CPU
TERM_OVERRIDES = dict(OVERRIDES, **{"train.checkpoint_every": 5, "train.keep_checkpoints": 10})


def _term_moment(trainer, moment: str, start: int) -> None:
    if moment == "between steps":
        dh.wait_until(
            lambda: any(r["step"] >= start + 3 for r in trainer.batches()),
            timeout=300,
            trainer=trainer,
            every=0.02,
        )
    elif moment == "during a step":  # just after the loop took a batch
        dh.wait_until(
            lambda: any(r["step"] >= start + 2 for r in trainer.batches()),
            timeout=300,
            trainer=trainer,
            every=0.001,
        )
    else:  # with an asynchronous save in flight
        dh.wait_until(
            lambda: [p for p in dh.tmp_dirs(trainer.workdir) if dh.tmp_step(p) > start],
            timeout=300,
            trainer=trainer,
            every=0.001,
        )


def test_sigterm_saves_the_step_in_hand_and_the_restart_loses_and_replays_nothing(
    reference, tmp_path
):
    ref_dir, ref_batches, _ = reference
    workdir = tmp_path / "terminated"
    env = dh.trainer_env(1, cache_writes=False)
    trainers, exit_seconds, restart_seconds = [], [], []
    for i, moment in enumerate(["between steps", "during a step", "save in flight"]):
        start = max(dh.steps_on_disk(workdir), default=0)
        trainer = dh.Trainer(workdir, TERM_OVERRIDES, env=env, name=f"term{i}")
        trainers.append(trainer)
        try:
            _term_moment(trainer, moment, start)
            assert trainer.poll() is None, trainer.stderr()[-3000:]
            sent = trainer.signal(signal.SIGTERM)
            code = trainer.wait(timeout=SIGTERM_BOUND_S * 3)
            exit_seconds.append(time.time() - sent)
        finally:
            trainer.kill()
        assert code == 143, f"{moment}: exit {code}\n{trainer.stderr()[-3000:]}"
        taken = [r["step"] for r in trainer.batches()]
        assert taken == list(range(start, taken[-1] + 1))
        saved = taken[-1] + 1  # the step in hand was finished and saved, due or not
        assert f"saved step {saved}, exiting" in trainer.stderr()
        assert dh.steps_on_disk(workdir)[-1] == saved
        assert dh.tmp_dirs(workdir) == [], f"{moment}: the write was not waited for"

    # The last run is stopped while its final checkpoint is being written (the loop is over and
    # waits for the write): the signal must not cut that write short. The run is complete: exit
    # 0, or death by the signal if it came after the write, while the loss curve was drawn.
    final = dh.Trainer(workdir, TERM_OVERRIDES, env=env, name="final")
    trainers.append(final)
    try:
        last_write = dh.wait_until(
            lambda: [p for p in dh.tmp_dirs(workdir) if dh.tmp_step(p) == NUM_STEPS],
            timeout=600,
            trainer=final,
            every=0.001,
        )
        assert last_write, final.stderr()[-3000:]
        time.sleep(0.05)  # past save(), into the wait for the write (it takes longer)
        final.signal(signal.SIGTERM)
        code = final.wait()
    finally:
        final.kill()
    assert code in (0, -signal.SIGTERM), final.stderr()[-3000:]
    assert dh.steps_on_disk(workdir)[-1] == NUM_STEPS, "the final write was cut short"
    assert dh.tmp_dirs(workdir) == []
    for before, after in itertools.pairwise(trainers):
        first = after.batches()[0]
        assert first["step"] == before.batches()[-1]["step"] + 1, "a step was lost or replayed"
        restart_seconds.append(first["time"] - after.started)  # start-up to the first step
    # Over all runs: every step exactly once, each with the reference's batch.
    records = dh.read_batches(final.batch_log)
    assert [r["step"] for r in records] == list(range(NUM_STEPS))
    assert all(r["digests"] == ref_batches[r["step"]] for r in records)
    got, want = dh.restore(workdir, OVERRIDES), dh.restore(ref_dir, OVERRIDES)
    assert dh.differing_leaves(got.state, want.state) == []
    assert max(exit_seconds) < SIGTERM_BOUND_S, exit_seconds
    print(
        "\nsigterm drill: seconds from SIGTERM to exit "
        + ", ".join(f"{s:.1f}" for s in exit_seconds)
        + "; restart to first step "
        + ", ".join(f"{s:.1f}" for s in restart_seconds)
        + "; steps lost 0, batches replayed 0"
    )


# --- the autoencoder method (two networks, two optimizers) ---------------------------------

AE_STEPS = 40
AE_OVERRIDES = dict(
    dh.TINY_AUTOENCODER,
    **{"train.num_steps": AE_STEPS, "train.checkpoint_every": 2, "train.keep_checkpoints": 3},
)
AE_MOMENTS = ["startup", "step", "step", "write", "write", "commit"]


def test_sigkill_of_the_autoencoder_method_then_resume_is_bitwise(tmp_path):
    """Six SIGKILLs of a two-network run (the discriminator on from step 4); each restart
    resumes from the newest complete checkpoint, and the final vae, discriminator, both Adam
    states and every logged loss are bitwise those of an uninterrupted run."""
    env = dh.trainer_env(1)
    ref_dir = tmp_path / "reference"
    saves_once = dict(AE_OVERRIDES, **{"train.checkpoint_every": AE_STEPS})  # as above
    reference = dh.Trainer(ref_dir, saves_once, env=env, name="ref", config=dh.AUTOENCODER)
    assert reference.wait() == 0, reference.stderr()[-3000:]
    ref_losses = {r["step"]: r["loss"] for r in dh.read_metrics(ref_dir)}
    assert sorted(ref_losses) == list(range(1, AE_STEPS + 1))

    rng = random.Random(KILL_SEED + 1)
    workdir = tmp_path / "killed"
    kill_env = dh.trainer_env(1, cache_writes=False)
    for i, moment in enumerate(AE_MOMENTS):
        start = max(dh.steps_on_disk(workdir), default=0)
        trainer = dh.Trainer(
            workdir, AE_OVERRIDES, env=kill_env, name=f"attempt{i}", config=dh.AUTOENCODER
        )
        try:
            hit = _kill_moment(trainer, moment, start, rng)
        finally:
            trainer.kill()
        assert trainer.proc.returncode == -9, trainer.stderr()[-3000:]
        assert hit == moment, f"attempt {i}: wanted a kill at {moment}, got {hit}"
        batches = trainer.batches()
        if batches:
            assert batches[0]["step"] == start
    last_start = max(dh.steps_on_disk(workdir), default=0)
    final = dh.Trainer(workdir, AE_OVERRIDES, env=kill_env, name="final", config=dh.AUTOENCODER)
    assert final.wait() == 0, final.stderr()[-3000:]
    if last_start:
        assert f"resumed from step {last_start}" in final.stderr()

    for record in dh.read_metrics(workdir):
        assert record["loss"] == ref_losses[record["step"]], record["step"]
    assert dh.tmp_dirs(workdir) == []
    got = dh.restore(workdir, AE_OVERRIDES, experiment=dh.AUTOENCODER)
    want = dh.restore(ref_dir, AE_OVERRIDES, experiment=dh.AUTOENCODER)
    assert got.step == want.step == AE_STEPS
    assert sorted(got.state.params) == ["disc", "vae"]
    assert dh.differing_leaves(got.state, want.state) == []


# --- Distillations: a frozen teacher and the student's networks --------------------------------

DISTILL_STEPS = 24
DISTILL_MOMENTS = ["startup", "step", "write", "commit"]
ADD = dh.REPO / "experiments" / "add_digits.py"


def _kill_drill_of_distillation(tmp_path, experiment, method_over, seed, logged=("loss",)):
    """Trains a 4-step teacher, then the distillation ``experiment`` of it twice: once
    uninterrupted, once SIGKILLed at each of DISTILL_MOMENTS and restarted. Every logged value
    of ``logged`` must match the uninterrupted run; returns both final (restored) runs."""
    env = dh.trainer_env(1)
    teacher = tmp_path / "teacher"
    t_over = dict(OVERRIDES, **{"train.num_steps": 4, "train.checkpoint_every": 4})
    assert dh.Trainer(teacher, t_over, env=env, name="teacher").wait() == 0
    section = "lcm" if experiment == dh.LCM else "add"
    over = dict(
        OVERRIDES,
        **{"train.num_steps": DISTILL_STEPS, f"{section}.teacher": f"run:{teacher}"},
        **method_over,
    )
    ref_dir = tmp_path / "reference"
    saves_once = dict(over, **{"train.checkpoint_every": DISTILL_STEPS})
    reference = dh.Trainer(ref_dir, saves_once, env=env, name="ref", config=experiment)
    assert reference.wait() == 0, reference.stderr()[-3000:]
    values = lambda r: tuple(r[k] for k in logged)
    ref_values = {r["step"]: values(r) for r in dh.read_metrics(ref_dir)}
    assert sorted(ref_values) == list(range(1, DISTILL_STEPS + 1))

    rng = random.Random(KILL_SEED + seed)
    workdir = tmp_path / "killed"
    kill_env = dh.trainer_env(1, cache_writes=False)
    for i, moment in enumerate(DISTILL_MOMENTS):
        start = max(dh.steps_on_disk(workdir), default=0)
        trainer = dh.Trainer(workdir, over, env=kill_env, name=f"attempt{i}", config=experiment)
        try:
            hit = _kill_moment(trainer, moment, start, rng)
        finally:
            trainer.kill()
        assert trainer.proc.returncode == -9, trainer.stderr()[-3000:]
        assert hit == moment, f"attempt {i}: wanted a kill at {moment}, got {hit}"
    last_start = max(dh.steps_on_disk(workdir), default=0)
    final = dh.Trainer(workdir, over, env=kill_env, name="final", config=experiment)
    assert final.wait() == 0, final.stderr()[-3000:]
    if last_start:
        assert f"resumed from step {last_start}" in final.stderr()
    for record in dh.read_metrics(workdir):
        assert values(record) == ref_values[record["step"]], record["step"]
    got = dh.restore(workdir, over, experiment=experiment)
    want = dh.restore(ref_dir, over, experiment=experiment)
    assert got.step == want.step == DISTILL_STEPS
    return got, want


def test_sigkill_of_lcm_distillation_then_resume_is_bitwise(tmp_path):
    """Four SIGKILLs of an LCM distillation run (teacher frozen, read from its own run); each
    restart resumes from the newest complete checkpoint, and the final student, its Adam state,
    its EMA target θ⁻ and every logged loss are bitwise those of an uninterrupted run."""
    over = {
        "lcm.num_ddim_timesteps": 10,
        "model.guidance_embed_dim": 8,
        "sample.sampler": "lcm",
        "sample.num_steps": 2,
    }
    got, want = _kill_drill_of_distillation(tmp_path, dh.LCM, over, seed=2)
    assert sorted(got.state.params) == ["student"] and sorted(got.state.ema) == ["target"]
    assert dh.differing_leaves(got.state, want.state) == []


def test_sigkill_of_add_distillation_then_resume_is_bitwise(tmp_path):
    """Four SIGKILLs of an ADD run (teacher frozen, read from its own run; its encoder is the
    discriminator's feature network); each restart resumes from the newest complete checkpoint,
    and the final student, discriminator heads, both Adam states and every logged student and
    discriminator loss are bitwise those of an uninterrupted run."""
    over = {
        "add.compare_lcm": "",
        "add.head_width": 8,
        "add.head_norm_groups": 4,
        "add.r1_gamma": 1.0,
        "disc_optim.schedule": "constant",
        "disc_optim.warmup_steps": 4,
        "sample.num_steps": 2,
    }
    got, want = _kill_drill_of_distillation(
        tmp_path, ADD, over, seed=3, logged=("loss", "disc/loss")
    )
    assert sorted(got.state.params) == sorted(got.state.opt_state) == ["discriminator", "student"]
    assert dh.differing_leaves(got.state, want.state) == []
