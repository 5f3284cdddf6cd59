"""Configs are validated before anything is compiled, and every error names the field."""

from pathlib import Path

import jax
import numpy as np
import pytest

import diffusax.data
from diffusax import config as config_lib
from diffusax.config import ConfigError, check_runtime, load_experiment
from diffusax.train.build import build

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(
    p.stem for p in (REPO / "experiments").glob("*.py") if p.stem not in ("base", "__init__")
)

# A small model for the checks that build it (abstractly: nothing is compiled).
SMALL = {"model.ch": 16, "model.num_res_blocks": 1}


def test_the_bundled_experiments_are_found():
    assert "ddpm_digits" in EXPERIMENTS and "ddpm_cifar10" in EXPERIMENTS


@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.parametrize("runlocal", [False, True])
def test_every_experiment_loads_and_validates(name, runlocal):
    cfg = load_experiment(name, overrides={"runlocal": runlocal})
    config_lib.validate(cfg)
    assert cfg.name == name
    if runlocal:
        assert cfg.train.num_steps <= 20 and cfg.train.batch_size <= 16


def test_experiments_load_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./experiments here: the checkout's are used
    assert load_experiment("ddpm_digits").name == "ddpm_digits"


BAD = [
    # unknown keys, with a suggestion
    ({"train.num_stepz": 5}, r"unknown config field 'train\.num_stepz'; did you mean 'num_steps'"),
    ({"trian.batch_size": 8}, r"unknown config field 'trian\.batch_size'; did you mean 'train'"),
    ({"model.chanels": 8}, r"unknown config field 'model\.chanels'"),
    # wrong types
    ({"train.batch_size": "16"}, r"'train\.batch_size' must be of type int, got '16'"),
    ({"train.batch_size": 16.0}, r"'train\.batch_size' must be of type int"),
    ({"optim.learning_rate": "1e-3"}, r"'optim\.learning_rate' must be of type float"),
    ({"train.progress": 1}, r"'train\.progress' must be of type bool"),
    ({"model.ch_mult": (1, "2")}, r"'model\.ch_mult' must be of type tuple of int, got \(1, '2'\)"),
    ({"model.attn_resolutions": 4}, r"'model\.attn_resolutions' must be of type tuple"),
    ({"model.class_conditional": "yes"}, r"'model\.class_conditional' must be of type bool"),
    # names that are not one of the choices
    (
        {"sample.sampler": "ddimm"},
        r"'sample\.sampler' is 'ddimm'; choose one of .*did you mean 'ddim'",
    ),
    ({"optim.name": "sgd"}, r"'optim\.name' is 'sgd'; choose one of \['adam', 'adamw'\]"),
    ({"method": "gan"}, r"'method' is 'gan'"),
    ({"diffusion.prediction": "epsilon"}, r"'diffusion\.prediction' is 'epsilon'"),
    ({"diffusion.schedule": "cosin"}, r"'diffusion\.schedule'.*did you mean 'cosine'"),
    ({"train.nonfinite": "ignore"}, r"'train\.nonfinite' is 'ignore'"),
    # zero, negative and out-of-range values
    ({"train.batch_size": 0}, r"'train\.batch_size' must be > 0, got 0"),
    ({"train.num_steps": -1}, r"'train\.num_steps' must be > 0"),
    ({"optim.learning_rate": 0.0}, r"'optim\.learning_rate' must be > 0"),
    ({"model.ch": 0}, r"'model\.ch' must be > 0"),
    ({"diffusion.num_timesteps": 0}, r"'diffusion\.num_timesteps' must be > 0"),
    ({"train.checkpoint_every": 0}, r"'train\.checkpoint_every' must be > 0"),
    ({"optim.warmup_steps": -1}, r"'optim\.warmup_steps' must be >= 0"),
    ({"seed": -1}, r"'seed' must be >= 0"),
    ({"train.grid_samples": -8}, r"'train\.grid_samples' must be >= 0"),
    ({"optim.ema_decay": 1.0}, r"'optim\.ema_decay' must be in \[0, 1\)"),
    ({"model.dropout": -0.1}, r"'model\.dropout' must be in \[0, 1\)"),
    ({"optim.b2": 1.5}, r"'optim\.b2' must be in \[0, 1\)"),
    ({"model.ch_mult": (1, 0)}, r"'model\.ch_mult' must hold positive ints"),
    ({"model.ch_mult": ()}, r"'model\.ch_mult' is empty"),
    (
        {"diffusion.schedule": "linear", "diffusion.beta_end": 1.5},
        r"'diffusion\.beta_start' \(0\.0001\) and 'diffusion\.beta_end'",
    ),
    (
        {"diffusion.schedule": "linear", "diffusion.beta_start": 0.1},
        r"must satisfy 0 < beta_start <= beta_end < 1",
    ),
    ({"sample.label": -2}, r"'sample\.label' must be -1"),
    ({"train.mesh_fsdp": 0}, r"'train\.mesh_data'.*'train\.mesh_fsdp'"),
    # fields that contradict each other
    (
        {"sample.num_steps": 2000},
        r"'sample\.num_steps' \(2000\) exceeds 'diffusion\.num_timesteps'",
    ),
    ({"model.class_conditional": False}, r"'diffusion\.label_drop_prob' > 0 needs model\.class_"),
    (
        {"model.class_conditional": False, "diffusion.label_drop_prob": 0.0},
        r"'sample\.guidance_scale' needs a class-conditional model",
    ),
    (
        {"diffusion.var_type": "learned_range", "diffusion.prediction": "x0"},
        r"'diffusion\.var_type' learned needs prediction='eps'",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[str(o) for o, _ in BAD])
def test_a_bad_config_stops_with_a_message_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment("ddpm_digits", overrides=overrides)


def test_ints_are_accepted_where_floats_are_expected():
    cfg = load_experiment("ddpm_digits", overrides={"optim.learning_rate": 1, "sample.eta": 0})
    assert cfg.optim.learning_rate == 1


def test_check_field_name_suggests_the_closest_field():
    config_lib.check_field_name("train.num_steps")
    with pytest.raises(ConfigError, match=r"'train\.num_steps\.x'"):
        config_lib.check_field_name("train.num_steps.x")
    with pytest.raises(ConfigError, match=r"did you mean 'sampler'"):
        config_lib.check_field_name("sample.samplr")


# --- checks that need the dataset and the devices ------------------------------------------

DIGITS = (8, 8, 1)


def digits_cfg(**overrides):
    return load_experiment("ddpm_digits", overrides={**SMALL, **overrides})


def test_batch_not_divisible_by_the_devices():
    cfg = digits_cfg(**{"train.batch_size": 12})
    check_runtime(cfg, DIGITS, 10, num_devices=4)  # 12 = 4 x 3 is fine
    with pytest.raises(ConfigError, match=r"'train\.batch_size' \(12\) is not divisible by the 8"):
        check_runtime(cfg, DIGITS, 10, num_devices=8)
    # The loop checks it on the 8 devices before building or compiling anything.
    with pytest.raises(ConfigError, match=r"'train\.batch_size'"):
        build(cfg)


def test_mesh_fields_must_fit_the_devices():
    with pytest.raises(ConfigError, match=r"'train\.mesh_fsdp' \(3\) does not divide the 8"):
        check_runtime(digits_cfg(**{"train.mesh_fsdp": 3}), DIGITS, 10, 8)
    cfg = digits_cfg(**{"train.mesh_data": 2, "train.mesh_fsdp": 2})
    with pytest.raises(ConfigError, match=r"'train\.mesh_data' x 'train\.mesh_fsdp' = 2 x 2"):
        check_runtime(cfg, DIGITS, 10, 8)
    check_runtime(cfg, DIGITS, 10, 4)


def test_an_image_size_the_unet_cannot_take():
    cfg = digits_cfg(**{"model.ch_mult": (1, 2, 2, 2, 2)})  # 4 halvings: needs a side of 16k
    with pytest.raises(ConfigError, match=r"'model\.ch_mult' has 5 levels.*8x8"):
        check_runtime(cfg, DIGITS, 10, 8)
    with pytest.raises(ConfigError, match=r"'model\.ch_mult'.*square"):
        check_runtime(digits_cfg(), (8, 6, 1), 10, 8)
    check_runtime(cfg, (32, 32, 3), 10, 8)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model.attn_resolutions": (16,)}, r"model\.attn_resolutions \[16\] match no level"),
        ({"model.num_heads": 3}, r"model\.num_heads=3 must divide"),
    ],
)
def test_model_arguments_are_checked_before_compiling(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build(digits_cfg(**overrides))


def test_class_conditional_on_an_unlabelled_dataset(monkeypatch):
    unlabelled = diffusax.data.ArraySource("blank", "train", np.zeros((32, 8, 8, 1), np.uint8))
    monkeypatch.setattr(diffusax.data, "load_source", lambda *args, **kwargs: unlabelled)
    with pytest.raises(ConfigError, match=r"'model\.class_conditional' is True but dataset"):
        build(digits_cfg())
    # Unconditional, it is fine.
    cfg = digits_cfg(
        **{
            "model.class_conditional": False,
            "diffusion.label_drop_prob": 0.0,
            "sample.guidance_scale": 1.0,
        }
    )
    run = build(cfg)
    mesh, source, num_classes = run.mesh, run.source, run.data.num_classes
    assert source is unlabelled and num_classes is None and mesh.size == len(jax.devices())


def test_sample_label_must_be_a_class():
    with pytest.raises(ConfigError, match=r"'sample\.label' \(10\) is not a class"):
        check_runtime(digits_cfg(**{"sample.label": 10}), DIGITS, 10, 8)
    check_runtime(digits_cfg(**{"sample.label": 9}), DIGITS, 10, 8)


# --- runlocal and explicit overrides -------------------------------------------------------


def test_runlocal_shrinks_and_explicit_overrides_win():
    full = load_experiment("ddpm_digits")
    small = load_experiment("ddpm_digits", overrides={"runlocal": True})
    assert (full.train.num_steps, full.train.batch_size, full.model.ch) == (1800, 128, 32)
    assert (small.train.num_steps, small.train.batch_size, small.model.ch) == (20, 16, 16)
    # Explicit overrides go after the shrink, whatever their order in the mapping.
    both = load_experiment(
        "ddpm_digits", overrides={"train.num_steps": 50, "runlocal": True, "model.ch": 8}
    )
    assert (both.train.num_steps, both.train.batch_size, both.model.ch) == (50, 16, 8)
    # And an override that the shrink would make invalid is still validated afterwards.
    with pytest.raises(ConfigError, match=r"'sample\.num_steps' \(20\) exceeds"):
        load_experiment("ddpm_digits", overrides={"runlocal": True, "diffusion.num_timesteps": 10})


def test_digest_holds_the_fields_that_shape_the_parameters():
    digest = config_lib.digest_fields(load_experiment("ddpm_digits"))
    assert digest["model.ch"] == 32 and digest["method"] == "ddpm"
    assert digest["diffusion.var_type"] == "fixed_large"
    assert "model.dropout" not in digest and "model.remat" not in digest
    assert "train.batch_size" not in digest
