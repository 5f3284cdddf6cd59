"""Reliability drills 3 and 4, and the two disk cases of drill 5, on real trainer processes.

3. Damaged checkpoints: a truncated array file, one flipped bit in an array file, a truncated
   metadata file, a missing or garbled `extra` item, an empty step directory. The trainer falls back to the newest good step with
   a warning naming the damaged one, moves it to `checkpoints/damaged/` (never deletes it) and
   ends bitwise where an undamaged resume ends. When no step is readable, or the checkpoint is
   of another model, it stops (exit 2) naming the path and the field or parameter, takes no
   batch, and changes no file. It never silently starts again from step 0.
4. A NaN in the batch of step k: `abort` exits 1 naming k; `skip` leaves the parameters,
   optimizer state and EMA bitwise unchanged for that step and exits 1 after
   `train.max_bad_steps` bad steps in a row; no checkpoint on disk ever holds a non-finite value.
5. (end) A full disk (a tiny tmpfs, when this user may mount one, and a file-size limit for any
   user) and a checkpoint directory made read-only during the run: the save fails, the trainer
   exits 1 naming the directory and the cause, and the checkpoints already there are intact.
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jax
import orbax.checkpoint as ocp
import pytest
from drills import helpers as dh

from diffusax import checkpoint

BASE = dh.overrides(train__num_steps=6, train__checkpoint_every=2, train__keep_checkpoints=10)
RESUMED = dict(BASE, **{"train.num_steps": 8})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run to step 6 (checkpoints 2, 4, 6) and its undamaged resume to 8 (the reference)."""
    root = tmp_path_factory.mktemp("damage")
    base = root / "base"
    trainer = dh.run(base, BASE)
    assert trainer.proc.returncode == 0, trainer.stderr()[-3000:]
    assert dh.steps_on_disk(base) == [2, 4, 6]
    reference = root / "reference"
    shutil.copytree(base, reference)
    trainer = dh.run(reference, RESUMED)
    assert trainer.proc.returncode == 0, trainer.stderr()[-3000:]
    return base, dh.restore(reference, RESUMED)


def _copy(base: Path, tmp_path: Path) -> Path:
    workdir = tmp_path / "run"
    shutil.copytree(base, workdir)
    return workdir


# --- damage that the trainer survives ------------------------------------------------------


def _truncate_largest_array_file(step: Path) -> None:
    victim = max((p for p in (step / "state").rglob("*") if p.is_file()), key=os.path.getsize)
    os.truncate(victim, victim.stat().st_size // 2)


def _read_unchecked(step: Path):
    """The state arrays of a step read by Orbax alone (no diffusax checks), or None if unreadable."""
    target = dh.abstract_state(BASE, jax.devices()[:1])
    try:
        with ocp.StandardCheckpointer() as reader:
            return reader.restore(step / "state", target)
    except Exception:  # any decoding error: this flip is not silent
        return None


def _flip_a_bit_of_array_data(step: Path) -> None:
    """Bit rot that Orbax cannot see: one bit of an array-data file, chosen so that the step
    still reads without error but with other (finite) values. The arrays are compressed, so
    the bit is found by trying: the largest file first, at a few offsets.
    """
    good = _read_unchecked(step)
    files = sorted((step / "state" / "ocdbt.process_0" / "d").iterdir(), key=os.path.getsize)
    for path in reversed(files):
        data = path.read_bytes()
        for offset in (len(data) * k // 16 for k in range(4, 13)):
            flipped = bytearray(data)
            flipped[offset] ^= 0x01
            path.write_bytes(bytes(flipped))
            read = _read_unchecked(step)
            if (
                read is not None
                and dh.differing_leaves(read, good)
                and not checkpoint.nonfinite_leaves(read)
            ):
                return  # silent for Orbax: only the checksum can tell
            path.write_bytes(data)
    raise AssertionError(f"no bit flip in {step} reads back silently")


def _truncate_metadata(step: Path) -> None:
    victim = step / "state" / "_METADATA"
    os.truncate(victim, victim.stat().st_size // 2)


def _remove_extra(step: Path) -> None:
    shutil.rmtree(step / "extra")


def _garble_extra(step: Path) -> None:
    (step / "extra" / "metadata").write_text('{"data": {"step": ')


def _empty_step_directory(step: Path) -> None:
    step.mkdir()


SURVIVED = [  # (damage, the step it hits, the step the trainer must fall back to)
    (_truncate_largest_array_file, 6, 4),
    (_flip_a_bit_of_array_data, 6, 4),
    (_truncate_metadata, 6, 4),
    (_remove_extra, 6, 4),
    (_garble_extra, 6, 4),
    (_empty_step_directory, 8, 6),
]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    ("damage", "hit", "fallback"), SURVIVED, ids=[d[0].__name__ for d in SURVIVED]
)
def test_damaged_checkpoint_falls_back_with_a_warning_and_ends_bitwise(
    runs, tmp_path, damage, hit, fallback
):
    base, reference = runs
    workdir = _copy(base, tmp_path)
    ckpt_dir = workdir / "checkpoints"
    good = {s: dh.tree_digest(ckpt_dir / str(s)) for s in dh.steps_on_disk(workdir) if s < hit}
    damage(ckpt_dir / str(hit))

    trainer = dh.run(workdir, RESUMED)
    err = trainer.stderr()
    assert trainer.proc.returncode == 0, err[-3000:]
    assert f"checkpoint {ckpt_dir / str(hit)} is damaged" in err, err[-3000:]
    if damage is _flip_a_bit_of_array_data:  # read back without error: the checksum caught it
        assert "checksum mismatch (the bits on disk changed)" in err, err[-3000:]
    assert f"resuming from step {fallback}" in err
    assert trainer.batches()[0]["step"] == fallback  # not 0, not the damaged step
    # The damaged step was moved aside, not deleted; the good ones are byte for byte intact.
    assert [p.name.split("-")[0] for p in (ckpt_dir / "damaged").iterdir()] == [str(hit)]
    for step, digest in good.items():
        assert dh.tree_digest(ckpt_dir / str(step)) == digest, f"good step {step} changed"
    final = dh.restore(workdir, RESUMED)
    assert final.step == 8 and dh.differing_leaves(final.state, reference.state) == []


# --- damage that stops the trainer ---------------------------------------------------------


def _damage_every_step(workdir: Path) -> None:
    for step in dh.steps_on_disk(workdir):
        _truncate_metadata(workdir / "checkpoints" / str(step))


def _forget_model_config(workdir: Path) -> None:
    """Step 6 as an older diffusax wrote it: no model fields recorded beside the arrays."""
    path = workdir / "checkpoints" / "6" / "extra" / "metadata"
    extra = json.loads(path.read_text())
    del extra["model_config"]
    path.write_text(json.dumps(extra))


STOPPED = [  # (id, damage, config changes, message)
    (
        "every_step_damaged",
        _damage_every_step,
        {},
        r"(?s)no readable checkpoint in {ckpt} \(refusing to start from scratch\)"
        r".*{ckpt}/6: .*{ckpt}/4: .*{ckpt}/2: ",
    ),
    (
        "other_model_shape",
        None,
        {"model.ch": 16},
        r"checkpoint {ckpt}/6 was written for another model: config fields changed since "
        r"\(model\.ch: 8 -> 16\)",
    ),
    (
        "other_model_shape_unrecorded",
        _forget_model_config,
        {"model.ch": 16},
        r"(?s)checkpoint {ckpt}/6 does not match the model .*"
        r"ema\.ema\.conv_in\.kernel: checkpoint has shape \(3, 3, 1, 8\) float32, model has "
        r"\(3, 3, 1, 16\)",
    ),
]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    ("name", "damage", "changes", "message"), STOPPED, ids=[s[0] for s in STOPPED]
)
def test_unusable_checkpoints_stop_naming_the_path_and_change_nothing(
    runs, tmp_path, name, damage, changes, message
):
    base, _ = runs
    workdir = _copy(base, tmp_path)
    if damage:
        damage(workdir)
    before = dh.tree_digest(workdir / "checkpoints")
    trainer = dh.run(workdir, dict(RESUMED, **changes))
    err = trainer.stderr()
    assert trainer.proc.returncode == 2, err[-3000:]
    assert re.search(message.format(ckpt=re.escape(str(workdir / "checkpoints"))), err), err[-3000:]
    assert "Traceback" not in err
    assert trainer.batches() == [], "it started training (from step 0?)"
    assert dh.tree_digest(workdir / "checkpoints") == before


# --- NaN -----------------------------------------------------------------------------------

NAN = dh.overrides(train__num_steps=8, train__checkpoint_every=1, train__keep_checkpoints=20)


def _all_checkpoints_finite(workdir, over) -> dict:
    """{step: restored} for every step on disk, each checked finite leaf by leaf."""
    restored = {}
    for step in dh.steps_on_disk(workdir):
        restored[step] = dh.restore(workdir, over, step=step)
        assert checkpoint.nonfinite_leaves(restored[step].state) == [], step
    return restored


def _nan_run(tmp_path, over, steps):
    env = dh.trainer_env(1, DRILL_NAN_STEPS=",".join(map(str, steps)))
    return dh.run(tmp_path / "run", over, env=env)


def test_nan_with_abort_exits_1_naming_the_step(tmp_path):
    over = dict(NAN, **{"train.checkpoint_every": 2})
    trainer = _nan_run(tmp_path, over, [5])
    err = trainer.stderr()
    assert trainer.proc.returncode == 1, err[-3000:]
    assert "error: non-finite loss or gradient at step 5 " in err
    assert dh.steps_on_disk(tmp_path / "run") == [2, 4]  # step 6 held the NaN: never saved
    _all_checkpoints_finite(tmp_path / "run", over)


def test_nan_with_skip_leaves_the_state_bitwise_unchanged_for_that_step(tmp_path):
    over = dict(NAN, **{"train.nonfinite": "skip"})
    trainer = _nan_run(tmp_path, over, [5])
    err = trainer.stderr()
    assert trainer.proc.returncode == 0, err[-3000:]
    assert "step 5: non-finite loss, update skipped" in err
    saved = _all_checkpoints_finite(tmp_path / "run", over)
    assert sorted(saved) == list(range(1, 9))
    before, after = saved[5].state, saved[6].state  # around the skipped step 5
    for part in ("params", "opt_state", "ema"):
        assert dh.differing_leaves(getattr(before, part), getattr(after, part)) == [], part
    assert int(after.bad_steps) == 1 and int(saved[7].state.bad_steps) == 0
    assert dh.differing_leaves(saved[6].state.params, saved[7].state.params) != []  # goes on


def test_nan_with_skip_exits_1_after_max_bad_steps_in_a_row(tmp_path):
    over = dict(NAN, **{"train.nonfinite": "skip", "train.max_bad_steps": 3})
    trainer = _nan_run(tmp_path, over, [3, 4, 5])
    err = trainer.stderr()
    assert trainer.proc.returncode == 1, err[-3000:]
    assert "error: 3 non-finite steps in a row, the last at step 5 " in err
    saved = _all_checkpoints_finite(tmp_path / "run", over)
    assert sorted(saved) == [1, 2, 3, 4, 5]  # the state after the third bad step: not saved
    assert dh.differing_leaves(saved[3].state.params, saved[5].state.params) == []
    assert int(saved[5].state.bad_steps) == 2


# --- a save that cannot be written -----------------------------------------------------------


def _assert_failed_save_kept_the_good_steps(trainer, workdir, before, cause):
    err = trainer.stderr()
    assert trainer.proc.returncode == 1, err[-3000:]
    ckpt = re.escape(str(workdir / "checkpoints"))
    assert re.search(rf"error: could not write checkpoint (step \d+ )?in {ckpt}: .*{cause}", err), (
        err[-3000:]
    )
    for step, digest in before.items():
        assert dh.tree_digest(workdir / "checkpoints" / str(step)) == digest, step
    assert dh.restore(workdir, RESUMED).step == 6  # the newest good step still restores


def _can_mount_tmpfs(where: Path) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)])
    if done.returncode:
        return False
    subprocess.run(["umount", str(where)], check=True)
    return True


def test_full_disk_during_a_save_exits_1_naming_the_directory(runs, tmp_path):
    base, _ = runs
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or shutil.which("mount") is None or not _can_mount_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs here (needs root); the file-size-limit drill covers it")
    used = sum(p.stat().st_size for p in base.rglob("*") if p.is_file())
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={used + 2**20}", "tmpfs", str(disk)], check=True
    )
    try:
        workdir = _copy(base, disk)
        before = {s: dh.tree_digest(workdir / "checkpoints" / str(s)) for s in (2, 4, 6)}
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * (free - 64 * 1024))  # 64 KiB left: logs fit
        trainer = dh.run(workdir, RESUMED, logs=tmp_path)
        _assert_failed_save_kept_the_good_steps(trainer, workdir, before, "No space left on device")
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_file_size_limit_during_a_save_exits_1_naming_the_directory(runs, tmp_path):
    base, _ = runs
    workdir = _copy(base, tmp_path)
    before = {s: dh.tree_digest(workdir / "checkpoints" / str(s)) for s in (2, 4, 6)}
    env = dh.trainer_env(1, cache_writes=False)
    trainer = dh.Trainer(workdir, RESUMED, env=env, launch=["--max-file-size=65536"])
    trainer.wait()
    _assert_failed_save_kept_the_good_steps(trainer, workdir, before, "File too large")


def test_checkpoint_directory_made_read_only_during_the_run(runs, tmp_path):
    base, _ = runs
    workdir = _copy(base, tmp_path)
    ckpt = workdir / "checkpoints"
    before = {s: dh.tree_digest(ckpt / str(s)) for s in (2, 4, 6)}
    env = dh.trainer_env(1, cache_writes=False)
    trainer = dh.Trainer(workdir, RESUMED, env=env, launch=["--plain-user"])
    try:
        assert dh.wait_until(trainer.batches, timeout=300, trainer=trainer, every=0.01)
        ckpt.chmod(0o555)  # the run has resumed from 6 and is training 6, 7; 8 is due
        trainer.wait()
    finally:
        trainer.kill()
        ckpt.chmod(0o755)
    _assert_failed_save_kept_the_good_steps(trainer, workdir, before, "Permission denied")
