"""Loss factories against the Gaussian oracle: the exact denoiser is the loss's minimiser."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusax import diffusion, gaussian, losses, schedules

SCHED = schedules.schedule_from_config("linear", 1000)
DATA = gaussian.GaussianData(jnp.array([0.5, -0.3]), jnp.array([[0.6, 0.25], [0.25, 0.4]]))
N = 4096
X0 = DATA.mean + jax.random.normal(jax.random.key(0), (N, 2)) @ jnp.linalg.cholesky(DATA.cov).T
BATCH = {"image": X0}


def oracle_prediction(prediction, xt, t):
    """The exact minimiser of each regression: E[ε|x_t], E[x_0|x_t] or E[v|x_t]."""
    eps = gaussian.optimal_eps(DATA, SCHED, xt, t)
    x0 = diffusion.x0_from_eps(SCHED, xt, t, eps)
    return diffusion.prediction_target(SCHED, prediction, x0, eps, t)


def scaled_oracle_apply(prediction):
    """A one-parameter family c · oracle: the loss must be stationary at c = 1."""

    def apply_fn(params, xt, t, y, dropout_key):
        return params["c"] * oracle_prediction(prediction, xt, t)

    return apply_fn


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_exact_denoiser_minimises_each_loss(prediction):
    loss_fn = losses.make_diffusion_loss(
        scaled_oracle_apply(prediction), SCHED, prediction=prediction
    )

    def mean_loss(c):
        # Average over several keys: the per-key gradient is a Monte Carlo estimate.
        keys = jax.random.split(jax.random.key(7), 8)
        vals = jax.vmap(lambda k: loss_fn({"c": c}, BATCH, k)[0])(keys)
        return jnp.mean(vals), vals

    grad = jax.jit(jax.grad(lambda c: mean_loss(c)[0]))
    per_key_grad = jax.jit(
        jax.vmap(jax.grad(lambda c, k: loss_fn({"c": c}, BATCH, k)[0]), (None, 0))
    )
    g = per_key_grad(1.0, jax.random.split(jax.random.key(7), 8))
    se = float(jnp.std(g)) / math.sqrt(g.shape[0]) + 1e-6
    assert abs(float(grad(1.0))) < 5 * se + 1e-3
    assert float(grad(1.2)) > 0 > float(grad(0.8))


def test_min_snr_eps_loss_equals_min_snr_x0_loss():
    """ε error = -√SNR · x_0 error, so ε-MSE · min(SNR, γ)/SNR ≡ x_0-MSE · min(SNR, γ)."""
    eps_apply = lambda p, xt, t, y, k: p["c"] * oracle_prediction("eps", xt, t)

    def x0_apply(p, xt, t, y, k):
        return diffusion.x0_from_eps(SCHED, xt, t, eps_apply(p, xt, t, y, k))

    key = jax.random.key(2)
    for gamma in (1.0, 5.0):
        eps_loss = losses.eps_prediction_loss(eps_apply, SCHED, min_snr_gamma=gamma)
        x0_loss = losses.reconstruction_loss(x0_apply, SCHED, min_snr_gamma=gamma)
        a, _ = jax.jit(eps_loss)({"c": 0.9}, BATCH, key)
        b, _ = jax.jit(x0_loss)({"c": 0.9}, BATCH, key)
        np.testing.assert_allclose(float(a), float(b), rtol=2e-3)
    weights = losses.min_snr_weight(jnp.array([0.1, 5.0, 100.0]), "eps", 5.0)
    np.testing.assert_allclose(weights, [1.0, 1.0, 0.05], rtol=1e-6)


def diag_data():
    return gaussian.GaussianData(jnp.array([0.2, -0.4]), jnp.diag(jnp.array([0.3, 0.7])))


def test_hybrid_loss_trains_variance_only_through_the_vlb_term():
    data = diag_data()
    x0 = data.mean + jax.random.normal(jax.random.key(4), (N, 2)) * jnp.sqrt(jnp.diag(data.cov))
    batch = {"image": x0}

    def apply_fn(params, xt, t, y, dropout_key):
        eps = params["c"] * gaussian.optimal_eps(data, SCHED, xt, t)
        var = params["v"] + gaussian.learned_range_output(data, SCHED, t)
        return jnp.concatenate([eps, var], axis=-1)

    hybrid = losses.hybrid_loss(apply_fn, SCHED, vlb_weight=0.001)
    simple = losses.eps_prediction_loss(
        lambda p, xt, t, y, k: apply_fn(p, xt, t, y, k)[:, :2], SCHED
    )
    key = jax.random.key(5)
    params = {"c": 0.9, "v": 0.0}
    g_hybrid = jax.jit(jax.grad(lambda p: hybrid(p, batch, key)[0]))(params)
    g_simple = jax.jit(jax.grad(lambda p: simple(p, batch, key)[0]))(params)
    # The vlb term's mean is stop-gradient: the ε head sees only L_simple.
    np.testing.assert_allclose(g_hybrid["c"], g_simple["c"], rtol=1e-5)
    # The exact variance is a stationary point of the vlb term (the KL is minimised there) ...
    keys = jax.random.split(key, 8)
    grad_v = jax.jit(
        jax.vmap(jax.grad(lambda v, k: hybrid({"c": 1.0, "v": v}, batch, k)[0]), (None, 0))
    )
    g0 = grad_v(0.0, keys)
    se = float(jnp.std(g0)) / math.sqrt(8) + 1e-9
    assert abs(float(jnp.mean(g0))) < 5 * se + 1e-6
    # ... and a variance pushed off it is pulled back.
    assert float(jnp.mean(grad_v(0.5, keys))) > 0 > float(jnp.mean(grad_v(-0.5, keys)))
    _, metrics = hybrid(params, batch, key)
    assert set(metrics) == {"loss", "mse", "vb"}


def test_label_dropout_rate_and_null_label():
    labels = jnp.zeros((20000,), jnp.int32)
    dropped = losses.drop_labels(labels, jax.random.key(0), 0.1, null_label=10)
    frac = float(jnp.mean(dropped == 10))
    assert abs(frac - 0.1) < 5 * math.sqrt(0.1 * 0.9 / 20000)
    assert set(np.unique(dropped).tolist()) == {0, 10}


def test_loss_reaches_labels_and_dropout_key():
    seen = {}

    def apply_fn(params, xt, t, y, dropout_key):
        seen["y"], seen["key"] = y, dropout_key
        return params["w"] * xt

    loss_fn = losses.make_diffusion_loss(apply_fn, SCHED, label_drop_prob=0.5, null_label=3)
    batch = {"image": jnp.zeros((8, 4, 4, 1)), "label": jnp.arange(8) % 3}
    _loss, metrics = loss_fn({"w": jnp.float32(0.0)}, batch, jax.random.key(0))
    chex.assert_shape(seen["y"], (8,))
    assert seen["key"] is not None
    assert float(metrics["loss"]) == pytest.approx(float(metrics["mse"]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prediction": "noise"}, "unknown prediction 'noise'"),
        ({"var_type": "big"}, "unknown var_type 'big'"),
        ({"label_drop_prob": 0.1}, "needs null_label"),
        (
            {"prediction": "v", "var_type": "learned_range"},
            "learned variance needs prediction='eps'",
        ),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        losses.make_diffusion_loss(lambda *a: None, SCHED, **kwargs)
