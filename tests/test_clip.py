"""Method "clip" (contrastive pre-training, stage 1 of unCLIP): InfoNCE against a direct numpy
computation and under a swap of its arguments, the clamped learnable temperature, 8 devices
against 1, a resume against an uninterrupted run, bad configs, `make sample` refused, and a
tiny run that trains and evaluates.

One tiny run (a 2-conv image tower, a 1-block text tower 16 wide, 4 steps of 16 pairs) is
trained three times and shared: on 8 devices, on 1, and on 1 stopped at step 2 and resumed."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from drills import helpers as dh

from diffusax import conditions, contrastive, methods
from diffusax.config import ConfigError, load_experiment
from diffusax.methods import clip
from diffusax.train import loop

CLIP_EXP = dh.REPO / "experiments" / "clip_digits.py"
TINY = {
    "clip.embed_dim": 16,
    "clip.image_widths": (8, 16),
    "text.width": 16,
    "text.layers": 1,
    "text.heads": 2,
    "optim.schedule": "constant",  # a run of 2 steps is the prefix of a run of 4
    "optim.warmup_steps": 2,
    "train.batch_size": 16,
    "train.num_steps": 4,
    "train.checkpoint_every": 2,
    "train.log_every": 1,
    "train.progress": False,
}


def clip_cfg(**changes):
    over = dict(TINY, **{k.replace("__", "."): v for k, v in changes.items()})
    return load_experiment(str(CLIP_EXP), overrides=over)


def numpy_info_nce(u, v, t, t_max):
    """The symmetric InfoNCE written out with numpy in float64."""
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    logits = np.exp(min(t, t_max)) * u @ v.T

    def ce(m):  # -(1/B) Σ_i log softmax(m_i)_i
        m = m - m.max(axis=1, keepdims=True)
        return -np.mean(np.diag(m) - np.log(np.exp(m).sum(axis=1)))

    return 0.5 * (ce(logits) + ce(logits.T))


# --- the maths --------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.3, contrastive.INIT_LOGIT_SCALE, 6.0])
def test_info_nce_equals_a_direct_computation(t):
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)) * 4.0  # unnormalised features
    loss, metrics = contrastive.info_nce_loss(
        jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32), t
    )
    want = numpy_info_nce(u, v, t, math.log(100.0))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["logit_scale"]), min(math.exp(t), 100.0), rtol=1e-6)


def test_info_nce_is_symmetric_and_ranks_matched_pairs_first():
    rng = np.random.default_rng(1)
    u = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    a, ma = contrastive.info_nce_loss(u, v, 2.0)
    b, mb = contrastive.info_nce_loss(v, u, 2.0)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    assert float(ma["image_to_text_acc"]) == float(mb["text_to_image_acc"])
    matched, m = contrastive.info_nce_loss(u, 3.0 * u, 2.0)  # every caption is its image
    assert float(matched) < float(a) and float(m["image_to_text_acc"]) == 1.0
    with pytest.raises(ValueError, match="one shape"):
        contrastive.info_nce_loss(u, v[:5], 2.0)


def test_temperature_is_learnable_below_its_clamp_and_clamped_above():
    rng = np.random.default_rng(2)
    u = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    grad = jax.grad(lambda t: contrastive.info_nce_loss(u, v, t)[0])
    t_max = contrastive.MAX_LOGIT_SCALE
    assert t_max == pytest.approx(math.log(100.0))
    assert contrastive.INIT_LOGIT_SCALE == pytest.approx(math.log(1 / 0.07))
    assert float(grad(jnp.float32(2.0))) != 0.0
    assert float(grad(jnp.float32(t_max + 1.0))) == 0.0  # above the clamp: no gradient
    assert float(contrastive.logit_scale(t_max + 3.0)) == pytest.approx(100.0, rel=1e-6)
    logits = contrastive.similarity_logits(u, v, t_max + 3.0)
    assert float(jnp.max(jnp.abs(logits))) <= 100.0 * (1 + 1e-6)  # |cos| <= 1


# --- configs and modes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("clip.embed_dim", 0),
        ("clip.image_widths", ()),
        ("clip.init_logit_scale", 5.0),  # above clip.max_logit_scale = log 100
        ("clip.max_logit_scale", -1.0),
        ("eval.zero_shot_prompt", "a photo"),  # names no class
        ("eval.zero_shot_prompt", "a zebra {n}"),  # a word outside the captions' vocabulary
        ("condition.kind", "label"),
        ("text.heads", 3),  # does not divide text.width
    ],
)
def test_bad_config_is_refused_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        clip_cfg(**{field.replace(".", "__"): value})


def test_too_many_halvings_for_the_image_are_refused_naming_the_field():
    from diffusax.train.build import build

    cfg = clip_cfg(clip__image_widths=(4, 4, 4, 4, 4))  # 8 / 2^4 is not an integer size
    with pytest.raises(ConfigError, match=r"clip\.image_widths"):
        build(cfg, devices=jax.devices()[:1])


def test_make_sample_is_refused_with_a_clear_error(tmp_path):
    method = methods.get("clip")
    assert "sample" not in method.modes and "train" in method.modes
    with pytest.raises(ConfigError, match="draws no samples"):
        method.sample_to_disk(clip_cfg(), str(tmp_path))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    command = ["-m", "diffusax.main", f"--config={CLIP_EXP}", f"--workdir={tmp_path / 'w'}"]
    done = subprocess.run(
        [sys.executable, *command, "--mode=sample"],
        cwd=dh.REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "method 'clip' runs --mode train / eval / info, not 'sample'" in done.stderr
    assert "Traceback" not in done.stderr


# --- one tiny run, three ways -----------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny run on 8 fake devices, on 1, and on 1 stopped after 2 steps and resumed."""
    root = tmp_path_factory.mktemp("clip_runs")
    cfg = clip_cfg()
    one = jax.devices()[:1]
    sharded = loop.train(cfg, str(root / "sharded"))
    single = loop.train(cfg, str(root / "single"), devices=one)
    loop.train(clip_cfg(train__num_steps=2), str(root / "resumed"), devices=one)
    resumed = loop.train(cfg, str(root / "resumed"), devices=one)
    return cfg, root, sharded, single, resumed


def test_eight_devices_equal_one(runs):
    _, _, sharded, single, _ = runs
    # The key bias adds q·b to every logit of a query: softmax cancels it, so its gradient is
    # rounding noise, which Adam scales up differently on 8 devices (the helper skips it).
    dh.assert_sharded_equals_single(sharded, single, steps=4)
    # What matters: both towers compute the same embeddings.
    batch = dh.labelled_batch(single.run)
    tokens, mask = conditions.encode_prompts(single.run.cfg, ["a thick 7"] * 16)
    embedded = []
    for result in (sharded, single):
        model = single.run.ctx.module("clip", jax.device_get(result.state.params["clip"]))
        embedded.append((model.encode_image(batch["image"]), model.encode_text(tokens, mask)))
    for a, b in zip(*embedded, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_resume_is_bitwise_the_uninterrupted_run(runs):
    _, _, _, single, resumed = runs
    dh.assert_resumed_is_bitwise(single, resumed, stopped_at=2, steps=4)


def test_the_tiny_run_trains_its_temperature_and_both_towers(runs):
    cfg, _, _, single, _ = runs
    assert sorted(single.state.params) == ["clip"] and single.state.ema == {}
    trained = jax.device_get(single.state.params["clip"])
    initial = jax.device_get(single.run.init_params(single.run.init_key)["clip"])
    assert float(initial["logit_scale"]) == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    assert float(trained["logit_scale"]) != float(initial["logit_scale"])
    for tower in ("image", "text", "text_projection"):
        assert dh.differing_leaves(initial[tower], trained[tower]), tower
    assert all(np.isfinite(v) for v in single.losses.values())
    # The step's loss is InfoNCE of the towers' embeddings of the step's batch.
    loader = single.run.loader(0)
    batch = next(loader)
    loader.close()
    model = single.run.ctx.module("clip", initial)
    step_key = jax.random.fold_in(jax.random.key(cfg.seed), 0)  # the loop's key of step 0
    images = clip.random_shift(batch["image"], step_key, cfg.clip.max_shift)
    assert cfg.clip.max_shift == 1 and not np.array_equal(images, batch["image"])
    want, _ = contrastive.info_nce_loss(
        model.encode_image(images),
        model.encode_text(batch["tokens"], batch["mask"]),
        model.logit_scale[...],
    )
    np.testing.assert_allclose(single.losses[0], float(want), rtol=1e-5)


def test_evaluate_reports_zero_shot_and_retrieval(runs):
    cfg, root, _, _, _ = runs
    workdir = root / "sharded"
    method = methods.get("clip")
    report = method.evaluate(cfg, str(workdir))
    on_disk = json.loads((workdir / "eval" / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert report["checkpoint_step"] == 4
    assert report["num_heldout"] == report["retrieval_pool_size"] == 300
    for key in (
        "zero_shot_accuracy",
        "zero_shot_ensemble_accuracy",
        "retrieval_recall_at_1",
        "retrieval_recall_at_5",
        "retrieval_class_at_1",
    ):
        assert 0.0 <= report[key] <= 1.0, key
    assert report["retrieval_recall_at_1"] <= report["retrieval_recall_at_5"]
    assert len(report["zero_shot_per_class"]) == 10
    assert report["retrieval_chance_at_1"] == pytest.approx(1 / 300)
    text = method.format_report(report)
    assert "zero-shot accuracy" in text and "among 300 held-out images" in text
