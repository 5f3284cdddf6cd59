"""Sample-quality evaluation: the Fréchet distance against closed forms, the feature classifier
and its cache, the metric's ranking of image sets, and `evaluate` end to end on a tiny run."""

import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from diffusax import config, data, diffusion, inference, methods, parallel
from diffusax.evaluate import classifier as classifier_lib
from diffusax.evaluate import frechet, run

CLASSIFIER_STEPS = 150  # ~94% held-out accuracy on digits; the e2e run reuses this cache


def _random_spd(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / (rank or d) + (0.0 if rank else 0.1) * np.eye(d)


def _fd_with_scipy_sqrtm(mu1, s1, mu2, s2):
    """The formula as FID code writes it, through scipy's general matrix square root."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)


# ---------------------------------------------------------------------------------------------
# The Fréchet distance


def test_identical_gaussians_are_at_distance_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=16), _random_spd(rng, 16)
    assert frechet.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_shifted_means_give_the_squared_shift():
    rng = np.random.default_rng(1)
    mu, sigma, delta = rng.normal(size=16), _random_spd(rng, 16), rng.normal(size=16)
    fd = frechet.frechet_distance(mu, sigma, mu + delta, sigma)
    assert fd == pytest.approx(float(delta @ delta), rel=1e-9)


def test_diagonal_covariances_give_the_squared_difference_of_standard_deviations():
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    fd = frechet.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert fd == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("rank", [None, 5])  # full rank, and singular (fewer samples than dims)
def test_general_covariances_match_scipy_sqrtm_are_symmetric_and_non_negative(rank):
    rng = np.random.default_rng(3)
    for _ in range(5):
        mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
        s1, s2 = _random_spd(rng, 12, rank), _random_spd(rng, 12, rank)
        fd12 = frechet.frechet_distance(mu1, s1, mu2, s2)
        assert fd12 == pytest.approx(_fd_with_scipy_sqrtm(mu1, s1, mu2, s2), rel=1e-6, abs=1e-8)
        # √ of eigenvalues that are 0 up to rounding (1e-16) contributes up to ~1e-7 each.
        assert fd12 == pytest.approx(frechet.frechet_distance(mu2, s2, mu1, s1), abs=1e-6)
        assert fd12 > 0
        # Nearly equal singular covariances: rounding must not make the result negative.
        assert frechet.frechet_distance(mu1, s1, mu1, s1 * (1 + 1e-12)) >= 0.0


def test_features_distance_estimates_the_closed_form_from_samples():
    """Two Gaussian samples (N = 20000, D = 4): the estimate is within 5 standard errors.

    The noise is dominated by the mean term: sd(‖μ̂₁ - μ̂₂‖²) ≈ 2‖δ‖ √(2/N) = 0.028 for ‖δ‖ = 1.
    """
    rng = np.random.default_rng(4)
    n, delta, scales = 20_000, np.array([1.0, 0, 0, 0]), np.array([1.0, 2.0, 0.5, 1.0])
    f1 = rng.normal(size=(n, 4))
    f2 = delta + rng.normal(size=(n, 4)) * scales
    expected = 1.0 + np.sum((1.0 - scales) ** 2)  # 1 + 1 + 0.25 = 2.25
    se = 2 * 1.0 * math.sqrt(2 / n)
    assert frechet.features_frechet_distance(f1, f2) == pytest.approx(expected, abs=5 * se)


def test_frechet_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="sigma2"):
        frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="mu1: contains NaN"):
        frechet.frechet_distance(np.array([np.nan, 0, 0]), np.eye(3), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="features"):
        frechet.features_frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


# ---------------------------------------------------------------------------------------------
# The feature classifier


@pytest.fixture(scope="module")
def digits_sources():
    return data.load_source("digits", "train"), data.load_source("digits", "test")


@pytest.fixture(scope="module")
def trained_classifier(digits_sources, tmp_path_factory):
    train, test = digits_sources
    path = str(tmp_path_factory.mktemp("clf") / "classifier_digits.npz")
    clf = classifier_lib.load_or_train(train, test, path, steps=CLASSIFIER_STEPS, seed=0)
    return clf, path


def test_classifier_trains_to_high_held_out_accuracy(trained_classifier, digits_sources):
    clf, path = trained_classifier
    assert clf.retrained and os.path.exists(path)
    assert clf.test_accuracy > 0.90
    test = classifier_lib.read_all(digits_sources[1])
    assert clf.accuracy(test["image"], test["label"]) == clf.test_accuracy
    features = clf.features(test["image"][:7])
    assert features.shape == (7, classifier_lib.FEATURE_DIM) and np.all(features >= 0)  # ReLU
    assert clf.predict(test["image"][:7]).shape == (7,)


def test_classifier_cache_is_reused_and_a_changed_fingerprint_retrains(
    trained_classifier, digits_sources, tmp_path
):
    clf, path = trained_classifier
    train, test = digits_sources
    mtime = os.stat(path).st_mtime_ns
    again = classifier_lib.load_or_train(train, test, path, steps=CLASSIFIER_STEPS, seed=0)
    assert not again.retrained and os.stat(path).st_mtime_ns == mtime
    assert again.test_accuracy == clf.test_accuracy
    images = classifier_lib.read_all(test)["image"][:32]
    np.testing.assert_array_equal(again.features(images), clf.features(images))

    # The data enter the fingerprint: one changed pixel changes it.
    rows = classifier_lib.read_all(train)
    images_changed = rows["image"].copy()
    images_changed[0, 0, 0, 0] += 0.125  # the top-left pixel of the first image is -1
    changed = data.ArraySource("digits", "train", images_changed, rows["label"], num_classes=10)
    fp = classifier_lib.fingerprint(train, steps=CLASSIFIER_STEPS, seed=0)
    assert classifier_lib.fingerprint(changed, steps=CLASSIFIER_STEPS, seed=0) != fp
    assert classifier_lib.fingerprint(train, steps=CLASSIFIER_STEPS, seed=1) != fp

    # Other training settings: the cache is stale, retrained and atomically replaced.
    copy = str(tmp_path / "classifier_digits.npz")
    shutil.copy(path, copy)
    other = classifier_lib.load_or_train(train, test, copy, steps=10, seed=0)
    assert other.retrained
    cached = classifier_lib.load_or_train(train, test, copy, steps=10, seed=0)
    assert not cached.retrained
    assert os.listdir(tmp_path) == ["classifier_digits.npz"]  # no temporary file left

    # Training is deterministic given the seed.
    _, params = classifier_lib.train_classifier(train, steps=10, seed=0)
    jax.tree.map(np.testing.assert_array_equal, params, cached.params)


def test_classifier_needs_labels(digits_sources, tmp_path):
    rows = classifier_lib.read_all(digits_sources[0])
    unlabelled = data.ArraySource("digits", "train", rows["image"])
    with pytest.raises(ValueError, match=r"data\.label_key"):
        classifier_lib.load_or_train(
            unlabelled, digits_sources[1], str(tmp_path / "c.npz"), steps=5, seed=0
        )


def test_distance_ranks_real_digits_far_above_degraded_images(trained_classifier, digits_sources):
    """Held-out real digits are much closer to the train split than noise, blurred or
    pixel-shuffled digits, or a sample that has collapsed onto two classes."""
    clf, _ = trained_classifier
    train = classifier_lib.read_all(digits_sources[0])
    test = classifier_lib.read_all(digits_sources[1])
    reference = clf.features(train["image"])
    x = test["image"]  # (300, 8, 8, 1)
    rng = np.random.default_rng(0)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    blurred = sum(padded[:, i : i + 8, j : j + 8] for i in range(3) for j in range(3)) / 9
    shuffled = x.reshape(len(x), 64)[:, rng.permutation(64)].reshape(x.shape)
    two_classes = x[np.isin(test["label"], [0, 1])]
    degraded = {
        "noise": rng.uniform(-1, 1, x.shape).astype(np.float32),
        "blurred": blurred,
        "shuffled": shuffled,
        "two classes": np.concatenate([two_classes] * 5)[: len(x)],
    }
    fd_real = frechet.features_frechet_distance(clf.features(x), reference)
    for name, images in degraded.items():
        fd = frechet.features_frechet_distance(clf.features(images), reference)
        assert fd > 5 * fd_real, (name, fd, fd_real)


def test_quantize_puts_samples_on_the_data_levels():
    real = data.load_source("digits", "test").read(np.arange(50))["image"]
    np.testing.assert_array_equal(run.quantize(real, 17), real)  # real digits are unchanged
    x = np.random.default_rng(0).uniform(-1.2, 1.2, (4, 8, 8, 1))
    q = run.quantize(x, 17)
    levels = (q + 1) * 8
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-5)
    assert q.min() >= -1 and q.max() <= 1
    assert np.max(np.abs(q - np.clip(x, -1, 1))) <= 1 / 16 + 1e-6  # half a level at most


# ---------------------------------------------------------------------------------------------
# End to end on a tiny trained run


TINY = {
    "train.num_steps": 5,
    "train.batch_size": 8,
    "train.progress": False,
    "train.grid_samples": 8,
    "train.async_checkpoint": False,
    "optim.warmup_steps": 2,
    "model.ch": 16,
    "model.ch_mult": (1,),
    "model.num_res_blocks": 1,
    "model.attn_resolutions": (),
    "diffusion.num_timesteps": 50,
    "sample.num_steps": 5,
    "eval.num_samples": 50,
    "eval.bpd_examples": 12,
    "eval.classifier_steps": CLASSIFIER_STEPS,
}


# One device: compiling the U-Net for the 8-device mesh costs ~20 s more on 2 shared cores.
DEVICES = 1


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, trained_classifier):
    from diffusax.train import loop

    cfg = config.load_experiment("ddpm_digits", overrides=TINY)
    workdir = str(tmp_path_factory.mktemp("tiny_run"))
    loop.train(cfg, workdir, devices=jax.devices()[:DEVICES])
    # The classifier trained above has this config's fingerprint: evaluate must reuse it.
    os.makedirs(os.path.join(workdir, "eval"))
    shutil.copy(trained_classifier[1], os.path.join(workdir, "eval", "classifier_digits.npz"))
    return cfg, workdir


def test_evaluate_end_to_end_writes_finite_metrics(tiny_run, trained_classifier):
    cfg, workdir = tiny_run
    metrics = run.evaluate(cfg, workdir, devices=jax.devices()[:DEVICES])
    path = os.path.join(workdir, "eval", "metrics.json")
    with open(path) as f:
        written = json.load(f)
    assert written == json.loads(json.dumps(metrics))
    expected_keys = {
        "fd_samples",
        "fd_samples_matched",
        "fd_heldout",
        "fd_heldout_matched",
        "fd_train_matched",
        "class_accuracy",
        "bpd",
        "bpd_stderr",
        "classifier_accuracy",
        "checkpoint_step",
        "sampler",
    }
    assert expected_keys <= set(metrics)
    for key in expected_keys - {"sampler", "checkpoint_step"}:
        assert math.isfinite(metrics[key]), key
    assert metrics["checkpoint_step"] == 5
    assert metrics["num_samples"] == 50 and metrics["matched_size"] == 50
    assert metrics["num_heldout"] == 300 and metrics["bpd_examples"] == 12
    assert metrics["classifier_accuracy"] == trained_classifier[0].test_accuracy  # cache reused
    assert metrics["sampler"]["sampler"] == "ddim" and metrics["sampler"]["num_steps"] == 5
    # A 5-step model draws noise, not digits: far worse than real held-out digits.
    assert metrics["fd_samples_matched"] > 3 * metrics["fd_heldout_matched"]
    assert metrics["fd_train_matched"] < metrics["fd_heldout_matched"]
    assert metrics["bpd"] > 0
    report = run.format_report(metrics)
    assert f"{metrics['fd_samples']:.3f}" in report and "bits/dim" in report

    # A config that cannot work (changed after validation) fails before anything is written.
    before = open(path).read()
    bad = cfg.copy_and_resolve_references()
    bad.eval.bpd_examples = -1
    with pytest.raises(ValueError, match=r"eval\.bpd_examples"):
        run.evaluate(bad, workdir, devices=jax.devices()[:DEVICES])
    assert open(path).read() == before


def test_bits_per_dim_batches_pads_and_passes_labels():
    """``bits_per_dim`` equals ``variational_bound`` called on each batch (key fold_in(key, i)):
    the padding of the last batch does not leak into the real rows, and the true labels reach a
    conditional model (here a small closed-form network whose ε̂ depends on the label)."""
    cfg = config.load_experiment("ddpm_digits", overrides=TINY)
    sched = methods.make_schedule(cfg)
    mesh = parallel.make_mesh()  # 8 devices: batches are padded to multiples of 8
    apply_fn = lambda params, x, t, y: params["w"] * x + 0.05 * y[:, None, None, None]
    trained = inference.Trained(
        cfg, mesh, apply_fn, {"w": jnp.float32(0.3)}, 0, 10, (8, 8, 1), sched
    )
    rows = data.load_source("digits", "test").read(np.arange(13))
    images, labels = rows["image"], rows["label"]
    key = jax.random.key(0)
    bpd = run.bits_per_dim(trained, images, labels, key, batch_size=8)  # batches of 8 and 5 + 3

    @jax.jit
    def direct(x, y, i):
        model_fn = lambda xt, t: apply_fn(trained.params, xt, t, y)
        return diffusion.variational_bound(
            sched, model_fn, x, jax.random.fold_in(key, i), bins=17, clip_x0=1.0
        )["bpd"]

    padded = np.concatenate([images[8:], np.repeat(images[-1:], 3, axis=0)])
    padded_labels = np.concatenate([labels[8:], np.repeat(labels[-1:], 3)])
    expected = np.concatenate(
        [direct(images[:8], labels[:8], 0), direct(padded, padded_labels, 1)[:5]]
    )
    assert bpd.shape == (13,)
    np.testing.assert_allclose(bpd, expected, rtol=1e-5)
    other = run.bits_per_dim(trained, images, (labels + 1) % 10, key, batch_size=8)
    assert np.min(np.abs(other - bpd)) > 1e-3


def test_evaluate_without_a_checkpoint_is_a_clear_error(tmp_path):
    cfg = config.load_experiment("ddpm_digits", overrides=TINY)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run.evaluate(cfg, str(tmp_path), devices=jax.devices()[:DEVICES])
    assert not os.path.exists(tmp_path / "eval" / "metrics.json")
