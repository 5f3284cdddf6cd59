"""Method "prior" (unCLIP's diffusion prior, stage 2): the x_0 loss against a direct numpy
computation, the null caption at its configured rate and where it is drawn, the candidate
selection, 8 devices against 1, a resume against an uninterrupted run, bad configs, and the
evaluation of a tiny run.

A tiny CLIP (clip_digits at test_clip's sizes, 4 steps) is trained once for the module; the
tiny prior over it (one block 16 wide, 4 steps of 16 captions) is trained three times and
shared: on 8 devices, on 1, and on 1 stopped at step 2 and resumed."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from drills import helpers as dh
from flax import nnx

from diffusax import conditions, methods, schedules
from diffusax.config import ConfigError, load_experiment
from diffusax.methods import prior
from diffusax.models.prior_transformer import PriorTransformer
from diffusax.train import loop
from diffusax.train.build import build

CLIP_EXP = dh.REPO / "experiments" / "clip_digits.py"
PRIOR_EXP = dh.REPO / "experiments" / "prior_digits.py"
TINY_CLIP = {  # test_clip's tiny CLIP: the prior's clip and text sections must equal it
    "clip.embed_dim": 16,
    "clip.image_widths": (8, 16),
    "text.width": 16,
    "text.layers": 1,
    "text.heads": 2,
}
TINY_RUN = {
    "optim.schedule": "constant",  # a run of 2 steps is the prefix of a run of 4
    "optim.warmup_steps": 2,
    "train.batch_size": 16,
    "train.num_steps": 4,
    "train.checkpoint_every": 2,
    "train.log_every": 1,
    "train.progress": False,
}
TINY_PRIOR = {
    "prior.width": 16,
    "prior.layers": 1,
    "prior.heads": 2,
    "prior.num_steps": 3,
    "prior.clip_experiment": "",  # the fixture trains it
    "optim.ema_decay": 0.5,  # an EMA that moves visibly in 4 steps
    "eval.num_samples": 20,
}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("prior_clip") / "clip"
    cfg = load_experiment(str(CLIP_EXP), overrides={**TINY_CLIP, **TINY_RUN})
    loop.train(cfg, str(path), devices=jax.devices()[:1])
    return path


@pytest.fixture(scope="module")
def prior_cfg(clip_dir):
    def make(**changes):
        over = {**TINY_CLIP, **TINY_RUN, **TINY_PRIOR, "prior.clip": f"run:{clip_dir}"}
        over.update({k.replace("__", "."): v for k, v in changes.items()})
        return load_experiment(str(PRIOR_EXP), overrides=over)

    return make


@pytest.fixture(scope="module")
def runs(prior_cfg, tmp_path_factory):
    """The tiny prior on 8 fake devices, on 1, and on 1 stopped after 2 steps and resumed."""
    root = tmp_path_factory.mktemp("prior_runs")
    cfg = prior_cfg()
    one = jax.devices()[:1]
    sharded = loop.train(cfg, str(root / "sharded"))
    single = loop.train(cfg, str(root / "single"), devices=one)
    loop.train(prior_cfg(train__num_steps=2), str(root / "resumed"), devices=one)
    resumed = loop.train(cfg, str(root / "resumed"), devices=one)
    return cfg, root, sharded, single, resumed


def captions_batch(run, rows):
    """``rows`` held-in digits (cycled) with captions naming their classes."""
    source = run.source
    index = np.arange(rows) % len(source)
    data = source.read(index)
    prompts = [f"the digit {int(c)}" for c in data["label"]]
    tokens, mask = conditions.encode_prompts(run.cfg, prompts)
    return {"image": jnp.asarray(data["image"], jnp.float32), "tokens": tokens, "mask": mask}


# --- the maths --------------------------------------------------------------------------------


def test_x0_loss_equals_a_direct_computation():
    """A 1000-step cosine schedule, 5 embeddings of 3 coordinates, a known 'network'."""
    sched = schedules.schedule_from_config("cosine", 1000)
    rng = np.random.default_rng(0)
    z0 = rng.normal(size=(5, 3))
    w = rng.normal(size=(3, 3))
    predict = lambda z_t, t, null: z_t @ w + 1e-3 * t[:, None] + jnp.where(null, 1.0, 0.0)[:, None]
    key = jax.random.key(7)
    loss, metrics = prior.prior_loss(predict, sched, jnp.asarray(z0, jnp.float32), key, 0.5)
    # The draws, by the documented key split; the formula in float64.
    key_t, key_eps, key_null = jax.random.split(key, 3)
    t = np.asarray(jax.random.randint(key_t, (5,), 0, 1000))
    eps = np.asarray(jax.random.normal(key_eps, (5, 3)), np.float64)
    null = np.asarray(jax.random.bernoulli(key_null, 0.5, (5,)))
    abar = np.cumprod(1.0 - schedules.cosine_betas(1000))[t][:, None]
    z_t = np.sqrt(abar) * z0 + np.sqrt(1.0 - abar) * eps
    x0 = z_t @ w + 1e-3 * t[:, None] + null[:, None]
    want = np.mean((x0 - z0) ** 2)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(metrics["null_rate"]) == pytest.approx(np.mean(null))
    assert 0 < null.sum() < 5  # both branches of the toy network were exercised


def test_the_embedding_scale_gives_unit_mean_square():
    u = jax.random.normal(jax.random.key(0), (100, 64))
    z = prior.embedding_scale(64) * (u / jnp.linalg.norm(u, axis=1, keepdims=True))
    np.testing.assert_allclose(np.mean(np.asarray(z) ** 2, axis=1), 1.0, rtol=1e-5)


def test_candidate_selection_keeps_the_closer_one():
    text = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # (B=3, D=2)
    first = jnp.asarray([[5.0, 1.0], [1.0, 0.0], [-1.0, -1.0]])  # closer for caption 0 only
    second = jnp.asarray([[0.0, 2.0], [0.1, 3.0], [2.0, 2.1]])  # closer for captions 1 and 2
    kept = prior.select_candidates(jnp.stack([first, second]), text)  # (B, D)
    np.testing.assert_array_equal(kept, jnp.stack([first[0], second[1], second[2]]))
    # The norm plays no part: a long vector pointing away loses to a short one pointing near.
    far = jnp.asarray([[0.0, 100.0]] * 3)
    kept = prior.select_candidates(jnp.stack([far, 0.01 * text]), text)
    np.testing.assert_array_equal(kept[0], 0.01 * text[0])


def test_the_null_caption_hides_the_caption_and_only_there():
    model = PriorTransformer(
        embed_dim=4, text_width=6, context_length=5, width=8, layers=1, heads=2, rngs=_rngs()
    )
    r = np.random.default_rng(0)
    z, t = jnp.asarray(r.normal(size=(2, 4)), jnp.float32), jnp.asarray([3, 900])
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], bool)
    states = [jnp.asarray(r.normal(size=(2, 5, 6)), jnp.float32) for _ in range(2)]
    texts = [jnp.asarray(r.normal(size=(2, 4)), jnp.float32) for _ in range(2)]
    null = jnp.asarray([True, False])
    graphdef, weights = nnx.split(model)
    apply = jax.jit(lambda *args: nnx.merge(graphdef, weights)(*args))  # one program
    a = apply(z, t, states[0], mask, texts[0], null)
    b = apply(z, t, states[1], mask, texts[1], null)
    np.testing.assert_array_equal(a[0], b[0])  # the null row reads no caption
    assert not np.allclose(a[1], b[1])  # the other does
    # Padding is no key: what a padded position holds changes nothing.
    padded = states[0].at[:, 3:].set(99.0)
    no_null = jnp.zeros((2,), bool)
    np.testing.assert_allclose(
        apply(z, t, padded, mask, texts[0], no_null),
        apply(z, t, states[0], mask, texts[0], no_null),
        rtol=1e-6,
    )


def _rngs():
    return nnx.Rngs(params=jax.random.key(0))


# --- the method on the tiny runs ----------------------------------------------------------------


def test_the_null_caption_is_drawn_at_the_configured_rate(runs, prior_cfg):
    """The method's own loss on a batch of 4096 captions: the share of captions replaced by
    the null lies within 4.5 standard deviations of prior.drop_text (0.1, and 0.3)."""
    _, _, _, single, _ = runs
    run, rows = single.run, 4096
    batch = captions_batch(run, rows)
    params = jax.device_get(single.state.params)
    for rate in (0.1, 0.3):
        cfg = prior_cfg(prior__drop_text=rate)
        loss = run.method.updates(cfg, run.ctx)[0].loss
        _, metrics = jax.jit(loss)(params, run.frozen(), batch, jax.random.key(3))
        sd = np.sqrt(rate * (1 - rate) / rows)
        assert abs(float(metrics["null_rate"]) - rate) < 4.5 * sd, (rate, metrics["null_rate"])


def test_the_step_loss_is_the_x0_loss_through_the_frozen_clip(runs):
    """The method's loss on 64 captions equals z_0 = √D u(x), t, ε and the null drawn by the
    documented key split, the prior's x̂_0 with the null where drawn, and the mean square; with
    the null ignored it would differ."""
    cfg, _, _, single, _ = runs
    run = single.run
    batch = captions_batch(run, 64)
    params = jax.device_get(single.state.params)
    key = jax.random.key(11)
    loss_fn = jax.jit(run.method.updates(cfg, run.ctx)[0].loss)
    loss, _ = loss_fn(params, run.frozen(), batch, key)
    key_t, key_eps, key_null = jax.random.split(key, 3)
    t = jax.random.randint(key_t, (64,), 0, cfg.prior.num_timesteps)
    eps = jax.random.normal(key_eps, (64, cfg.clip.embed_dim))
    null = jax.random.bernoulli(key_null, cfg.prior.drop_text, (64,))
    abar = jnp.asarray(np.cumprod(1.0 - schedules.cosine_betas(cfg.prior.num_timesteps)))[t]
    scale = np.sqrt(cfg.clip.embed_dim)

    @jax.jit  # one program rather than hundreds of eager ops
    def direct(clip_params, prior_params, null):
        clip_model = run.ctx.module("clip", clip_params)
        u = clip_model.encode_image(batch["image"])
        z0 = scale * u / jnp.linalg.norm(u, axis=1, keepdims=True)
        z_t = jnp.sqrt(abar)[:, None] * z0 + jnp.sqrt(1 - abar)[:, None] * eps
        states, _ = clip_model.text(batch["tokens"], mask=batch["mask"])
        v = clip_model.encode_text(batch["tokens"], batch["mask"])
        text = scale * v / jnp.linalg.norm(v, axis=1, keepdims=True)
        prior_model = run.ctx.module("prior", prior_params)
        return jnp.mean((prior_model(z_t, t, states, batch["mask"], text, null) - z0) ** 2)

    frozen = run.frozen()["clip"]
    want = [float(direct(frozen, params["prior"], n)) for n in (null, jnp.zeros_like(null))]
    assert 0 < int(null.sum()) < 64
    np.testing.assert_allclose(float(loss), want[0], rtol=1e-5)
    assert abs(want[0] - want[1]) > 1e-6


def test_eight_devices_equal_one(runs):
    _, _, sharded, single, _ = runs
    dh.assert_sharded_equals_single(sharded, single, steps=4)


def test_resume_is_bitwise_the_uninterrupted_run(runs):
    _, _, _, single, resumed = runs
    dh.assert_resumed_is_bitwise(single, resumed, stopped_at=2, steps=4)


def test_only_the_prior_trains_and_its_ema_is_sampled(runs):
    _, _, _, single, _ = runs
    state = single.state
    assert sorted(state.params) == ["prior"] and sorted(state.ema) == ["ema"]
    assert "clip" in single.run.frozen()  # frozen, beside the state, not checkpointed
    initial = jax.device_get(single.run.init_params(single.run.init_key)["prior"])
    assert dh.differing_leaves(initial, state.params["prior"])
    assert dh.differing_leaves(state.params["prior"], state.ema["ema"])  # decay 0.5: it lags
    assert single.run.sample_params(state) is state.ema["ema"]
    assert all(np.isfinite(v) for v in single.losses.values())


def test_sampled_embeddings_are_unit_vectors_one_per_caption(runs):
    cfg, _, _, single, _ = runs
    run = single.run
    params = {"clip": run.frozen()["clip"], "prior": jax.device_get(single.state.ema["ema"])}
    tokens, mask = conditions.encode_prompts(cfg, ["a seven", "the digit 3", "1"])
    for scale in (1.0, 3.0):  # unguided and guided
        fn = prior.make_sampler_fn(run, prior.sampling_of(cfg, guidance_scale=scale))
        out = np.asarray(fn(params, tokens, mask, jax.random.key(0)))
        assert out.shape == (3, cfg.clip.embed_dim) and np.all(np.isfinite(out))
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    again = fn(params, tokens, mask, jax.random.key(0))
    np.testing.assert_array_equal(out, again)  # a key gives the same draw


def test_evaluate_reports_similarity_against_random_pairs(runs):
    cfg, root, _, _, _ = runs
    workdir = root / "single"
    method = methods.get("prior")
    report = method.evaluate(cfg, str(workdir))
    on_disk = json.loads((workdir / "eval" / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert report["checkpoint_step"] == 4 and report["num_prompts"] == 20
    assert report["num_heldout"] == 300
    for key in (
        "similarity_to_class",
        "random_pair_similarity",
        "same_class_pair_similarity",
        "text_embedding_similarity",
        "unguided_similarity_to_class",
    ):
        assert -1.0 <= report[key] <= 1.0, key
    for key in ("class_agreement", "nearest_image_agreement", "unguided_class_agreement"):
        assert 0.0 <= report[key] <= 1.0, key
    assert len(report["per_class_agreement"]) == 10
    text = method.format_report(report)
    assert "random pairs of held-out digits" in text and "class agreement" in text


# --- configs and modes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"prior.clip": "runs/clip_digits"}, "prior.clip"),  # not "run:DIR"
        ({"prior.heads": 3}, "prior.heads"),  # does not divide prior.width = 16
        ({"prior.sampler": "euler"}, "prior.sampler"),
        ({"prior.drop_text": 1.0}, "prior.drop_text"),
        ({"prior.num_candidates": 0}, "prior.num_candidates"),
        ({"prior.num_steps": 5000}, "prior.num_steps"),
        ({"prior.sampler": "ddpm", "prior.eta": 0.5}, "prior.eta"),
        ({"prior.drop_text": 0.0}, "prior.guidance_scale"),  # guidance 2 without a null
        ({"condition.kind": "label"}, "condition.kind"),
        ({"clip.embed_dim": 0}, "clip.embed_dim"),
    ],
)
def test_bad_config_is_refused_naming_the_field(prior_cfg, changes, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        prior_cfg(**{k.replace(".", "__"): v for k, v in changes.items()})


def test_a_clip_of_other_sizes_is_refused_naming_the_run(prior_cfg, clip_dir):
    run = build(prior_cfg(clip__embed_dim=8), devices=jax.devices()[:1])
    with pytest.raises(ConfigError, match=r"frozen network 'clip' from 'run:"):
        run.frozen()


def test_a_missing_clip_run_says_how_to_make_it(prior_cfg, tmp_path):
    cfg = prior_cfg(prior__clip=f"run:{tmp_path / 'none'}", prior__clip_experiment="clip_digits")
    run = build(cfg, devices=jax.devices()[:1])
    with pytest.raises(FileNotFoundError, match="make train EXP=clip_digits"):
        run.frozen()


def test_make_sample_is_refused_with_a_clear_error(prior_cfg, tmp_path):
    method = methods.get("prior")
    assert "sample" not in method.modes and "train" in method.modes
    with pytest.raises(ConfigError, match="draws image embeddings, not images"):
        method.sample_to_disk(prior_cfg(), str(tmp_path))
