"""Reliability drill 5: bad configs and bad inputs, each through the real command line.

Every case runs the trainer (`tests/drills/trainer.py`, i.e. `python -m diffusax.main`) on a
copy of an existing run's workdir (a checkpoint, metrics, events) and must

- exit 2 (bad flags, config or input) with one message naming the field, file or directory, and
  no traceback;
- fail before step 0: the loop took no batch (the trainer's batch log stays empty);
- leave every existing file byte for byte as it was.

The wrong datasets are real TFDS datasets built locally (tests/drills/datasets.py). Permission
cases hold for root too: the trainers run without root's right to ignore file permissions
(tests/drills/launch.py --plain-user).
Two cases more, a full disk and a directory made read-only during a save, are in
tests/test_drills_damage.py (they fail at a save, not before step 0).
"""

import concurrent.futures
import dataclasses
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from drills import helpers as dh

BASE = dh.overrides(train__num_steps=2, train__checkpoint_every=2)
TFDS = "{tfds}"  # replaced by the data directory of tests/drills/datasets.py
EMPTY_DIR = "{empty}"  # replaced by an empty directory


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    changes: dict  # config fields on top of BASE
    message: str  # regex the error must match
    devices: int = 1
    config: str | None = None  # another experiment file
    workdir: str = "existing"  # how the workdir is spoiled, see _prepare_workdir


CASES = [
    # Misspelled keys, with a "did you mean".
    Case("misspelled_key", {"train.num_stepz": 5}, r"'train\.num_stepz'; did you mean 'num_steps'"),
    Case("misspelled_section", {"trian.batch_size": 16}, r"unknown config field 'trian\.batch_"),
    Case("misspelled_model_key", {"model.chanels": 8}, r"unknown config field 'model\.chanels'"),
    # Wrong types.
    Case("int_given_text", {"train.batch_size": "abc"}, r"train\.batch_size"),
    Case("int_given_float", {"train.batch_size": 16.5}, r"train\.batch_size"),
    Case("bool_given_text", {"train.progress": "maybe"}, r"train\.progress"),
    Case("tuple_given_text", {"model.ch_mult": "abc"}, r"model\.ch_mult"),
    # Names that are not one of the choices.
    Case("unknown_model", {"model.name": "unett"}, r"'model\.name' is 'unett'.*mean 'unet'"),
    Case("unknown_sampler", {"sample.sampler": "ddimm"}, r"'sample\.sampler' is 'ddimm'.*'ddim'"),
    Case(
        "unknown_dit_variant",
        {"model.name": "dit", "model.variant": "XXL/2"},
        r"'model\.variant' is 'XXL/2'",
    ),
    Case("unknown_optimizer", {"optim.name": "sgd"}, r"'optim\.name' is 'sgd'"),
    Case("unknown_schedule", {"diffusion.schedule": "cosin"}, r"did you mean 'cosine'"),
    Case("unknown_nan_policy", {"train.nonfinite": "ignore"}, r"'train\.nonfinite' is 'ignore'"),
    # Values out of range or contradicting each other.
    Case("zero_steps", {"train.num_steps": 0}, r"'train\.num_steps' must be > 0"),
    Case("negative_interval", {"train.checkpoint_every": -2}, r"'train\.checkpoint_every' must"),
    Case("ema_decay_one", {"optim.ema_decay": 1.0}, r"'optim\.ema_decay' must be in \[0, 1\)"),
    Case("sampler_steps_over_T", {"sample.num_steps": 500}, r"'sample\.num_steps' \(500\) exceed"),
    Case("missing_experiment", {}, r"experiments/no_such_experiment\.py", config="nope"),
    # The devices.
    Case(
        "batch_not_divisible",
        {"train.batch_size": 12},
        r"'train\.batch_size' \(12\) is not divisible by the 8 devices",
        devices=8,
    ),
    Case("fsdp_not_dividing", {"train.mesh_fsdp": 3}, r"'train\.mesh_fsdp' \(3\)", devices=8),
    # The model against the data.
    Case("unet_too_deep", {"model.ch_mult": (1, 2, 2, 2, 2)}, r"'model\.ch_mult' has 5 levels"),
    Case("attention_nowhere", {"model.attn_resolutions": (16,)}, r"model\.attn_resolutions"),
    Case(
        "heads_not_dividing",
        {"model.attn_resolutions": (8,), "model.num_heads": 3},
        r"model\.num_heads=3",
    ),
    Case(
        "patch_not_dividing",
        {
            "data.name": "drill_images/side10",
            "data.data_dir": TFDS,
            "model.name": "dit",
            "model.variant": "S/4",
        },
        r"'model\.variant' \(S/4\) has patch size 4.*10x10",
    ),
    Case("label_not_a_class", {"sample.label": 10}, r"'sample\.label' \(10\) is not a class"),
    # Datasets.
    Case("unknown_split", {"data.train_split": "validation"}, r"got split='validation'"),
    Case(
        "two_channel_images",
        {"data.name": "drill_images/two_channels", "data.data_dir": TFDS},
        r"'drill_images/two_channels'.*images have 2 channels",
    ),
    Case(
        "float_images",
        {"data.name": "drill_images/float_pixels", "data.data_dir": TFDS},
        r"'drill_images/float_pixels'.*dtype float32",
    ),
    Case(
        "images_without_channels",
        {"data.name": "drill_images/rank2", "data.data_dir": TFDS},
        r"'drill_images/rank2'.*rank 2",
    ),
    Case(
        "empty_dataset",
        {"data.name": "drill_images/empty", "data.data_dir": TFDS},
        r"'drill_images/empty' split 'train' is empty",
    ),
    Case(
        "wrong_image_key",
        {"data.name": "drill_images/side10", "data.data_dir": TFDS, "data.image_key": "img"},
        r"no feature 'img' \(image_key\)",
    ),
    Case(
        "unlabelled_for_conditional",
        {"data.name": "drill_images/side10", "data.data_dir": TFDS, "data.label_key": ""},
        r"'model\.class_conditional' is True but dataset 'drill_images/side10' has no labels",
    ),
    Case(
        "missing_tfds_dataset",
        {"data.name": "mnist", "data.data_dir": EMPTY_DIR},
        r"(?s)TFDS dataset 'mnist' is not prepared.*tfds build mnist",
    ),
    Case(
        "unknown_tfds_dataset",
        {"data.name": "no_such_dataset", "data.data_dir": EMPTY_DIR},
        r"'no_such_dataset' is neither a known TFDS dataset",
    ),
    Case(
        "empty_latent_dir",
        {"latents.dir": EMPTY_DIR, "sample.clip_x0": 0.0},  # latents are not clipped to [-1, 1]
        r"latents\.dir",
    ),
    # The workdir.
    Case("workdir_is_a_file", {}, r"workdir '.*/run' is not a directory", workdir="file"),
    Case("workdir_under_a_file", {}, r"Not a directory: '.*/run/sub'", workdir="under_file"),
    Case("checkpoints_is_a_file", {}, r"'.*/checkpoints' is not a directory", workdir="ckpt_file"),
    Case("unreadable_workdir", {}, r"workdir '.*' is not readable", workdir="mode_000"),
    Case(
        "unwritable_workdir", {}, r"workdir '.*' is not readable and writable", workdir="mode_555"
    ),
    Case(
        "unreadable_checkpoint",
        {},
        r"(?s)no readable checkpoint in .*/checkpoints \(refusing to start from scratch\)"
        r".*/checkpoints/2",
        workdir="ckpt_000",
    ),
]


def _prepare_workdir(case: Case, existing: Path, root: Path) -> Path:
    """A copy of the existing run, spoiled as ``case.workdir`` says; returns the workdir path."""
    root.mkdir(parents=True)
    workdir = root / "run"
    if case.workdir == "file":
        workdir.write_text("not a directory\n")
        return workdir
    if case.workdir == "under_file":
        workdir.write_text("not a directory\n")
        return workdir / "sub"
    shutil.copytree(existing, workdir)
    if case.workdir == "ckpt_file":
        shutil.rmtree(workdir / "checkpoints")
        (workdir / "checkpoints").write_text("not a directory\n")
    elif case.workdir == "mode_000":
        workdir.chmod(0o000)
    elif case.workdir == "mode_555":
        workdir.chmod(0o555)
    elif case.workdir == "ckpt_000":
        (workdir / "checkpoints" / "2" / "state").chmod(0o000)
    return workdir


def _snapshot(path: Path):
    if path.is_dir():
        return dh.tree_digest(path)
    return path.read_bytes() if path.is_file() else None


def _fill(value, tfds_dir: Path, empty_dir: Path):
    if isinstance(value, str):
        return value.replace(TFDS, str(tfds_dir)).replace(EMPTY_DIR, str(empty_dir))
    return value


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Run every case, two trainers at a time (one per core): {id: outcome dict}."""
    from drills import datasets

    root = tmp_path_factory.mktemp("inputs")
    tfds_dir, empty_dir = root / "tfds", root / "empty"
    empty_dir.mkdir()
    datasets.prepare(str(tfds_dir))
    existing = root / "existing"
    trainer = dh.run(existing, BASE)
    assert trainer.proc.returncode == 0, trainer.stderr()[-3000:]
    assert dh.steps_on_disk(existing) == [2]

    def attempt(case: Case) -> dict:
        workdir = _prepare_workdir(case, existing, root / case.id)
        target = workdir if workdir.name == "run" else workdir.parent
        before = _snapshot(target)
        over = dict(BASE, **{k: _fill(v, tfds_dir, empty_dir) for k, v in case.changes.items()})
        config = dh.CONFIG if case.config is None else "experiments/no_such_experiment.py"
        started = time.time()
        trainer = dh.Trainer(
            workdir,
            over,
            env=dh.trainer_env(case.devices, cache_writes=False),
            config=config,
            launch=["--plain-user"],
            logs=root / f"{case.id}.logs",  # not inside a spoiled workdir
        )
        trainer.wait(timeout=300)
        seconds = time.time() - started
        for path in (workdir, workdir / "checkpoints" / "2" / "state"):
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)  # to read it back
        return {
            "code": trainer.proc.returncode,
            "stderr": trainer.stderr(),
            "batches": dh.read_batches(trainer.batch_log),
            "untouched": _snapshot(target) == before,
            "seconds": seconds,
        }

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip([c.id for c in CASES], pool.map(attempt, CASES), strict=True))
    slowest = max(results.values(), key=lambda r: r["seconds"])["seconds"]
    print(f"\nbad-input drill: {len(CASES)} cases, the slowest failed after {slowest:.1f} s")
    return results


def test_there_are_at_least_25_distinct_bad_inputs():
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_stops_before_step_0_naming_it_and_touches_nothing(outcomes, case):
    got = outcomes[case.id]
    stderr = got["stderr"]
    assert got["code"] == 2, f"exit {got['code']}:\n{stderr[-3000:]}"
    assert re.search(case.message, stderr), stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert got["batches"] == [], "the loop took a batch: it did not stop before step 0"
    assert got["untouched"], "an existing file was changed, moved or deleted"


def test_launch_plain_user_makes_file_permissions_apply_even_to_root(tmp_path):
    """Else the permission cases would prove nothing when the tests run as root."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o000)
    try:
        probe = f"import os; print(os.access({str(locked)!r}, os.R_OK))"
        cmd = [sys.executable, str(dh.LAUNCH), "--plain-user", sys.executable, "-c", probe]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "False", out
    finally:
        locked.chmod(0o755)
