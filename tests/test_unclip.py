"""Method "unclip" (unCLIP's decoder, stage 3, and the text -> prior -> decoder pipeline): the
two null conditions at their configured rates, independently, and where they are drawn; the
decoder reading both conditions; the spherical walk; 8 devices against 1; a resume against an
uninterrupted run; sampling, variations, interpolation and the evaluation of a tiny run; bad
configs.

test_prior's tiny CLIP and a tiny prior over it (4 steps each) are trained once for the module;
the tiny decoder (16 wide, 4 steps of 16 digits) three times: on 8 devices, on 1, and on 1
stopped at step 2 and resumed."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from drills import helpers as dh
from flax import nnx
from test_prior import CLIP_EXP, PRIOR_EXP, TINY_CLIP, TINY_PRIOR, TINY_RUN

from diffusax import conditions, methods
from diffusax.config import ConfigError, load_experiment
from diffusax.methods import unclip
from diffusax.models.unclip_decoder import UnclipDecoder
from diffusax.train import loop

UNCLIP_EXP = dh.REPO / "experiments" / "unclip_digits.py"
TINY_DECODER = {
    "model.ch": 16,
    "model.ch_mult": (1, 2),
    "model.num_res_blocks": 1,
    "model.num_heads": 2,
    "unclip.prior_experiment": "",  # the fixture trains it
    "train.grid_samples": 0,
    "sample.num_steps": 2,
    "sample.num_samples": 20,
    "sample.batch_size": 20,
    "sample.interpolate_steps": 3,
    "eval.num_samples": 20,
    "eval.classifier_steps": 20,
    "eval.attribute_per_class": 2,
    "unclip.eval_variations": 20,
    "unclip.num_variations": 10,
    "unclip.num_sources": 2,
}
# Every draw of the module is a batch of 20 (the sampled prompts, the attribute prompts, the
# variations), so each sampler compiles once (the persistent compilation cache matches them),
# and the prior's evaluation is test_prior's, whose programs are cached already.


@pytest.fixture(scope="module")
def frozen_dirs(tmp_path_factory):
    """(the tiny CLIP's run, the tiny prior's run over it)."""
    root = tmp_path_factory.mktemp("unclip_frozen")
    one = jax.devices()[:1]
    clip_cfg = load_experiment(str(CLIP_EXP), overrides={**TINY_CLIP, **TINY_RUN})
    loop.train(clip_cfg, str(root / "clip"), devices=one)
    over = {**TINY_CLIP, **TINY_RUN, **TINY_PRIOR, "prior.clip": f"run:{root / 'clip'}"}
    loop.train(load_experiment(str(PRIOR_EXP), overrides=over), str(root / "prior"), devices=one)
    return root / "clip", root / "prior"


@pytest.fixture(scope="module")
def unclip_cfg(frozen_dirs):
    clip_dir, prior_dir = frozen_dirs

    def make(**changes):
        over = {**TINY_CLIP, **TINY_RUN, **TINY_PRIOR, **TINY_DECODER}
        over.update({"prior.clip": f"run:{clip_dir}", "unclip.prior": f"run:{prior_dir}"})
        over.update({k.replace("__", "."): v for k, v in changes.items()})
        return load_experiment(str(UNCLIP_EXP), overrides=over)

    return make


@pytest.fixture(scope="module")
def runs(unclip_cfg, tmp_path_factory):
    """The tiny decoder on 8 fake devices, on 1, and on 1 stopped after 2 steps and resumed."""
    root = tmp_path_factory.mktemp("unclip_runs")
    cfg = unclip_cfg()
    one = jax.devices()[:1]
    sharded = loop.train(cfg, str(root / "sharded"))
    single = loop.train(cfg, str(root / "single"), devices=one)
    loop.train(unclip_cfg(train__num_steps=2), str(root / "resumed"), devices=one)
    resumed = loop.train(cfg, str(root / "resumed"), devices=one)
    return cfg, root, sharded, single, resumed


# --- the maths --------------------------------------------------------------------------------


def test_slerp_walks_the_great_circle():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 8))
    walk = np.asarray(unclip.slerp(jnp.asarray(a), jnp.asarray(b), jnp.linspace(0, 1, 5)))
    unit = lambda v: v / np.linalg.norm(v)
    np.testing.assert_allclose(walk[0], unit(a), atol=1e-6)
    np.testing.assert_allclose(walk[-1], unit(b), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(walk, axis=1), 1.0, rtol=1e-6)
    angles = np.arccos(np.clip(np.sum(walk[1:] * walk[:-1], axis=1), -1, 1))
    np.testing.assert_allclose(angles, angles[0], rtol=1e-4)  # equal steps along the arc
    # Every point lies in the plane of a and b: the walk is the great circle between them.
    basis = np.linalg.qr(np.stack([a, b], 1))[0]
    np.testing.assert_allclose(basis @ (basis.T @ walk.T), walk.T, atol=1e-6)
    same = np.asarray(unclip.slerp(jnp.asarray(a), jnp.asarray(a), jnp.linspace(0, 1, 3)))
    np.testing.assert_allclose(same, np.tile(unit(a), (3, 1)), atol=1e-6)  # no 0 / 0


def test_the_null_conditions_are_drawn_at_their_rates_independently():
    """20000 rows: the shares of empty captions and of null embeddings lie within 4.5 standard
    deviations of their rates, the share of both within 4.5 of the product (independent
    draws), and only the drawn rows change."""
    rows, text_rate, image_rate = 20_000, 0.5, 0.1
    text = conditions.Condition("text", context_length=6)
    null = text.null_row()
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(3, 50, size=(rows, 6)), jnp.int32)
    mask = jnp.ones((rows, 6), bool)
    e = jnp.asarray(rng.normal(size=(rows, 4)), jnp.float32)
    y = unclip.decoder_condition(tokens, mask, e)
    out, (no_text, no_image) = unclip.drop_conditions(
        y, jax.random.key(0), text_rate=text_rate, image_rate=image_rate, text_null=null
    )
    no_text, no_image = np.asarray(no_text), np.asarray(no_image)
    for share, p in ((no_text, text_rate), (no_image, image_rate), (no_text & no_image, 0.05)):
        assert abs(share.mean() - p) < 4.5 * np.sqrt(p * (1 - p) / rows), (share.mean(), p)
    np.testing.assert_array_equal(
        np.asarray(out["tokens"])[no_text], np.tile(null["tokens"], (no_text.sum(), 1))
    )
    np.testing.assert_array_equal(
        np.asarray(out["mask"])[no_text], np.tile(null["mask"], (no_text.sum(), 1))
    )
    np.testing.assert_array_equal(np.asarray(out["tokens"])[~no_text], np.asarray(tokens)[~no_text])
    np.testing.assert_array_equal(np.asarray(out["image_null"]), no_image)
    np.testing.assert_array_equal(np.asarray(out["image"]), np.asarray(e))  # the model swaps it


def test_the_decoder_reads_the_caption_and_the_embedding_unless_nulled():
    text_kwargs = dict(
        vocab_size=20, width=16, layers=1, heads=2, mlp_dim=32, context_length=6, eos_token_id=2
    )
    unet_kwargs = dict(
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        attention_levels=(False, True),
        num_heads=2,
        norm_num_groups=8,
    )
    model = UnclipDecoder(
        embed_dim=8, unet_kwargs=unet_kwargs, text_kwargs=text_kwargs, bos_id=1, rngs=nnx.Rngs(0)
    )
    # The U-Net's residual branches and conv_out start at zero, so at its initialisation no
    # condition reaches the output: perturb every parameter.
    graphdef, params = nnx.split(model)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    model = nnx.merge(graphdef, jax.tree.unflatten(tree, noisy))
    rng = np.random.default_rng(2)
    x, t = jnp.asarray(rng.normal(size=(2, 8, 8, 1)), jnp.float32), jnp.array([5, 500])
    tokens = jnp.array([[1, 5, 6, 2, 0, 0], [1, 7, 2, 0, 0, 0]])
    mask = tokens != 0
    e = jnp.asarray(rng.normal(size=(2, 8)), jnp.float32)
    apply = nnx.jit(lambda m, y: m(x, t, y))
    base = apply(model, unclip.decoder_condition(tokens, mask, e))
    other_e = apply(model, unclip.decoder_condition(tokens, mask, -e))
    other_text = apply(model, unclip.decoder_condition(tokens.at[:, 1].set(9), mask, e))
    assert float(jnp.max(jnp.abs(base - other_e))) > 1e-4
    assert float(jnp.max(jnp.abs(base - other_text))) > 1e-4
    nulled = dict(unclip.decoder_condition(tokens, mask, e), image_null=jnp.ones((2,), bool))
    nulled_other = dict(nulled, image=-e)
    np.testing.assert_array_equal(apply(model, nulled), apply(model, nulled_other))
    both_null = model.null_condition(2)
    np.testing.assert_array_equal(apply(model, both_null), apply(model, None))


# --- the runs ---------------------------------------------------------------------------------


def digits_batch(run, rows):
    data = run.source.read(np.arange(rows) % len(run.source))
    prompts = [f"the digit {int(c)}" for c in data["label"]]
    tokens, mask = conditions.encode_prompts(run.cfg, prompts)
    return {"image": jnp.asarray(data["image"], jnp.float32), "tokens": tokens, "mask": mask}


def test_the_step_draws_both_nulls_at_the_configured_rates(runs, unclip_cfg):
    """The method's own loss on 2048 digits logs the shares it drew: within 4.5 standard
    deviations of unclip.drop_text and unclip.drop_image (rates other than the defaults,
    which the pure test above checks)."""
    _, _, _, single, _ = runs
    run, rows = single.run, 2048
    batch = digits_batch(run, rows)
    params = jax.device_get(single.state.params)
    for text_rate, image_rate in ((0.2, 0.3),):
        cfg = unclip_cfg(unclip__drop_text=text_rate, unclip__drop_image=image_rate)
        loss = run.method.updates(cfg, run.ctx)[0].loss
        _, metrics = jax.jit(loss)(params, run.frozen(), batch, jax.random.key(3))
        for name, p in (("text_null_rate", text_rate), ("image_null_rate", image_rate)):
            sd = np.sqrt(p * (1 - p) / rows)
            assert abs(float(metrics[name]) - p) < 4.5 * sd, (name, metrics[name], p)


def test_eight_devices_equal_one(runs):
    _, _, sharded, single, _ = runs
    # atol 3e-5: the last residual block's conv2 bias feeds a GroupNorm of one channel per
    # group, which cancels it, so its gradient is rounding noise (~1e-5 after 4 steps).
    dh.assert_sharded_equals_single(sharded, single, steps=4, atol=3e-5)


def test_resume_is_bitwise_the_uninterrupted_run(runs):
    _, _, _, single, resumed = runs
    dh.assert_resumed_is_bitwise(single, resumed, stopped_at=2, steps=4)


def test_only_the_decoder_trains_beside_the_frozen_clip_and_prior(runs):
    _, _, _, single, _ = runs
    state, run = single.state, single.run
    assert sorted(state.params) == ["model"] and sorted(state.ema) == ["ema"]
    assert sorted(run.frozen()) == ["clip", "prior"]
    sampled = run.sample_params(state)
    assert sampled["model"] is state.ema["ema"] and sorted(sampled) == ["clip", "model", "prior"]
    assert all(np.isfinite(v) for v in single.losses.values())


def test_text_to_image_variations_and_interpolation(runs):
    cfg, root, _, single, _ = runs
    run = single.run
    workdir = str(root / "single")
    params = run.sample_params(jax.device_get(single.state))
    generate = run.method.make_sampler(run, cfg.sample)  # batches of 20
    tokens, mask = conditions.encode_prompts(cfg, ["a seven", "3", "the digit 4", "nine"] * 5)
    images = np.asarray(generate(params, {"tokens": tokens, "mask": mask}, jax.random.key(0)))
    assert images.shape == (20, 8, 8, 1) and np.all(np.abs(images) <= 1.0)
    again = np.asarray(generate(params, {"tokens": tokens, "mask": mask}, jax.random.key(0)))
    np.testing.assert_array_equal(images, again)

    method = methods.get("unclip")
    path = method.variations_to_disk(cfg, workdir)
    assert path.endswith("samples/variations_heldout_0.png")
    saved = np.load(path[: -len(".png")] + ".npz")
    assert saved["variations"].shape == (2, 10, 8, 8, 1)  # 2 sources x 10 variations
    assert not np.array_equal(saved["variations"][:, 0], saved["variations"][:, 1])  # η > 0
    strip = method.interpolate_to_disk(cfg, workdir)
    assert strip.endswith("samples/interpolate_heldout_0_1.png")


def test_evaluate_reports_prompts_variations_and_the_prior(runs):
    cfg, root, _, _, _ = runs
    workdir = root / "single"
    method = methods.get("unclip")
    report = method.evaluate(cfg, str(workdir))
    on_disk = json.loads((workdir / "eval" / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert report["checkpoint_step"] == 4 and report["num_samples"] == 20
    assert 0.0 <= report["class_accuracy"] <= 1.0 and np.isfinite(report["fd_samples"])
    v = report["variations"]
    assert v["num"] == 20 and 0.0 <= v["class_kept"] <= 1.0 and np.isfinite(v["fd"])
    p = report["prior"]
    assert -1.0 <= p["similarity_to_class"] <= 1.0 and -1.0 <= p["random_pair_similarity"] <= 1
    text = method.format_report(report)
    assert "class kept" in text and "random pairs of held-out digits" in text


# --- configs and modes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"unclip.prior": "runs/prior_digits"}, "unclip.prior"),  # not "run:DIR"
        ({"unclip.drop_text": 1.0}, "unclip.drop_text"),
        ({"unclip.drop_image": -0.1}, "unclip.drop_image"),
        ({"unclip.drop_text": 0.0, "unclip.drop_image": 0.0}, "sample.guidance_scale"),
        ({"unclip.interpolate_indices": (0, 1, 2)}, "unclip.interpolate_indices"),
        ({"unclip.num_variations": 0}, "unclip.num_variations"),
        ({"prior.heads": 3}, "prior.heads"),  # the prior's own checks apply
        ({"sample.prompt": "a zebra"}, "sample.prompt"),  # a word the captions never use
    ],
)
def test_bad_config_is_refused_naming_the_field(unclip_cfg, changes, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        unclip_cfg(**{k.replace(".", "__"): v for k, v in changes.items()})


def test_a_missing_prior_run_says_how_to_make_it(unclip_cfg, tmp_path):
    from diffusax.train.build import build

    cfg = unclip_cfg(
        unclip__prior=f"run:{tmp_path / 'none'}", unclip__prior_experiment="prior_digits"
    )
    with pytest.raises(FileNotFoundError, match="make train EXP=prior_digits"):
        build(cfg, devices=jax.devices()[:1]).frozen()


def test_a_bad_variation_source_is_refused_before_the_run_is_loaded(unclip_cfg, tmp_path):
    method = methods.get("unclip")
    workdir = str(tmp_path / "no_run")  # no checkpoint: the source is checked first
    with pytest.raises(ConfigError, match=r"unclip\.source"):
        method.variations_to_disk(unclip_cfg(unclip__source="heldout:299"), workdir)
    with pytest.raises(FileNotFoundError, match=r"unclip\.source"):
        method.variations_to_disk(unclip_cfg(unclip__source=str(tmp_path / "no.png")), workdir)
    with pytest.raises(ConfigError, match=r"unclip\.interpolate_indices"):
        method.interpolate_to_disk(unclip_cfg(unclip__interpolate_indices=(0, 300)), workdir)
    assert "variations" not in methods.get("ddpm").modes
