"""The DDPM maths against independent oracles: numpy recurrences, numerical integration, Bayes."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusax import diffusion, gaussian, schedules

T = 1000
SCHED = schedules.schedule_from_config("linear", T)


def test_linear_schedule_endpoints_and_cumprod_of_one_minus_beta():
    betas = np.linspace(1e-4, 0.02, T)
    np.testing.assert_allclose(SCHED.betas, betas, rtol=1e-6)
    # ᾱ_t = ∏ (1 - β_s), not ∏ β_s (the lecture's slip).
    np.testing.assert_allclose(SCHED.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-5)
    assert float(SCHED.alphas_cumprod[-1]) == pytest.approx(4.04e-5, rel=0.01)
    np.testing.assert_allclose(SCHED.alphas_cumprod_prev[0], 1.0)


def test_cosine_schedule_follows_its_alpha_bar():
    betas = schedules.cosine_betas(T)
    f = lambda tau: np.cos((tau + 0.008) / 1.008 * math.pi / 2) ** 2
    target = f(np.arange(1, T + 1) / T) / f(0.0)
    abar = np.cumprod(1 - betas)
    # Equal until the 0.999 clip binds in the last steps.
    np.testing.assert_allclose(abar[:-5], target[:-5], rtol=1e-6, atol=1e-9)
    assert betas.max() <= 0.999


def test_scaled_linear_and_bad_names():
    betas = schedules.scaled_linear_betas(T)
    np.testing.assert_allclose(np.sqrt(betas[[0, -1]]), np.sqrt([0.00085, 0.012]), rtol=1e-9)
    with pytest.raises(ValueError, match="unknown beta schedule 'cosin'"):
        schedules.make_betas("cosin", T)
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        schedules.make_schedule(np.array([0.1, 1.5]))


def test_iterated_forward_steps_match_closed_form_moments():
    """Propagating mean and variance through x_t = √(1-β_t) x_{t-1} + √β_t z gives q(x_t|x_0)."""
    betas = np.linspace(1e-4, 0.02, T)
    x0 = np.array([0.7, -1.0, 0.0])
    mean, var = x0.copy(), np.zeros(3)
    for t in range(T):
        mean, var = np.sqrt(1 - betas[t]) * mean, (1 - betas[t]) * var + betas[t]
        if t in (0, 9, 99, 499, 999):
            cm, cv = diffusion.q_mean_variance(
                SCHED, jnp.asarray(x0[None], jnp.float32), jnp.array([t])
            )
            np.testing.assert_allclose(cm[0], mean, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(cv[0], var, rtol=5e-4)  # 1-ᾱ in float32


def test_iterated_q_step_samples_match_q_sample_statistics():
    """Monte Carlo: T applications of q_step from a fixed x_0 reproduce N(√ᾱ x_0, 1-ᾱ)."""
    n, x0_value = 20000, 0.8
    x0 = jnp.full((n, 1), x0_value)

    @jax.jit
    def run(key):
        def body(x, t):
            z = jax.random.normal(jax.random.fold_in(key, t), x.shape)
            x = diffusion.q_step(SCHED, x, jnp.full((n,), t), z)
            return x, x[:, 0]

        _, path = jax.lax.scan(body, x0, jnp.arange(T))
        return path  # (T, n)

    path = run(jax.random.key(0))
    for t in (0, 49, 299, 999):
        abar = float(SCHED.alphas_cumprod[t])
        mean, var = math.sqrt(abar) * x0_value, 1 - abar
        se_mean, se_var = math.sqrt(var / n), var * math.sqrt(2 / n)
        assert abs(float(path[t].mean()) - mean) < 5 * se_mean
        assert abs(float(path[t].var()) - var) < 5 * se_var


@pytest.mark.parametrize("t", [0, 1, 10, 500, 998])
def test_posterior_equals_bayes_rule_by_numerical_integration(t):
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0), integrated on a grid (1-D)."""
    x0, xt = 0.4, -0.3
    beta = float(np.linspace(1e-4, 0.02, T)[t])
    abar_prev = float(np.cumprod(1 - np.linspace(1e-4, 0.02, T))[t - 1]) if t > 0 else 1.0
    mean, var, _ = diffusion.q_posterior_mean_variance(
        SCHED, jnp.array([[x0]]), jnp.array([[xt]]), jnp.array([t])
    )
    if t == 0:  # x_{-1} is x_0 itself: the posterior is a point mass at x_0.
        assert float(var[0, 0]) == 0.0
        np.testing.assert_allclose(mean[0, 0], x0, atol=1e-6)
        return
    width = 12 * math.sqrt(min(beta, 1 - abar_prev))
    centre = float(mean[0, 0])
    grid = np.linspace(centre - width, centre + width, 400001)
    log_p = -((xt - np.sqrt(1 - beta) * grid) ** 2) / (2 * beta)
    log_p += -((grid - np.sqrt(abar_prev) * x0) ** 2) / (2 * (1 - abar_prev))
    w = np.exp(log_p - log_p.max())
    w /= w.sum()
    num_mean = np.sum(w * grid)
    num_var = np.sum(w * (grid - num_mean) ** 2)
    np.testing.assert_allclose(float(mean[0, 0]), num_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(var[0, 0]), num_var, rtol=1e-3)


def test_normal_kl_matches_numerical_integration():
    m1, lv1, m2, lv2 = 0.3, math.log(0.5), -0.2, math.log(1.7)
    grid = np.linspace(-15, 15, 600001)
    dx = grid[1] - grid[0]
    logp = -0.5 * (math.log(2 * math.pi) + lv1 + (grid - m1) ** 2 / math.exp(lv1))
    logq = -0.5 * (math.log(2 * math.pi) + lv2 + (grid - m2) ** 2 / math.exp(lv2))
    numeric = np.sum(np.exp(logp) * (logp - logq)) * dx
    np.testing.assert_allclose(float(diffusion.normal_kl(m1, lv1, m2, lv2)), numeric, rtol=1e-5)


def test_discretized_likelihood_is_a_distribution_over_256_levels():
    levels = jnp.linspace(-1.0, 1.0, 256)
    for mean, logvar in [(0.1, math.log(0.01)), (-0.95, math.log(0.3)), (0.5, math.log(1e-4))]:
        logp = diffusion.discretized_gaussian_log_likelihood(
            levels, mean, jnp.full_like(levels, logvar)
        )
        np.testing.assert_allclose(float(jnp.sum(jnp.exp(logp))), 1.0, rtol=1e-4)
    # With a wide Gaussian, an interior bin's mass is density × bin width.
    x, mean, logvar = levels[100], 0.0, math.log(0.25)
    logp = diffusion.discretized_gaussian_log_likelihood(x, mean, jnp.asarray(logvar))
    density = diffusion.gaussian_log_likelihood(x, mean, jnp.asarray(logvar)) + math.log(2 / 255)
    np.testing.assert_allclose(float(logp), float(density), atol=1e-4)


class TestParametrisations:
    key = jax.random.key(3)
    x0 = jax.random.normal(jax.random.fold_in(key, 0), (6, 4, 4, 3))
    eps = jax.random.normal(jax.random.fold_in(key, 1), (6, 4, 4, 3))
    t = jnp.array([0, 1, 100, 500, 900, 999])

    def test_round_trips(self):
        xt = diffusion.q_sample(SCHED, self.x0, self.t, self.eps)
        chex.assert_trees_all_close(
            diffusion.x0_from_eps(SCHED, xt, self.t, self.eps), self.x0, atol=2e-3
        )
        chex.assert_trees_all_close(
            diffusion.eps_from_x0(SCHED, xt, self.t, self.x0), self.eps, atol=2e-3
        )
        v = diffusion.v_from_x0_eps(SCHED, self.x0, self.eps, self.t)
        chex.assert_trees_all_close(diffusion.x0_from_v(SCHED, xt, self.t, v), self.x0, atol=1e-5)
        chex.assert_trees_all_close(diffusion.eps_from_v(SCHED, xt, self.t, v), self.eps, atol=1e-5)
        for name, pred in [("eps", self.eps), ("x0", self.x0), ("v", v)]:
            x0, eps = diffusion.x0_eps_from_prediction(SCHED, name, xt, self.t, pred)
            chex.assert_trees_all_close(x0, self.x0, atol=2e-3)
            chex.assert_trees_all_close(eps, self.eps, atol=2e-3)

    def test_eps_mean_is_algorithm_2(self):
        """μ_θ = 1/√α_t (x_t - β_t/√(1-ᾱ_t) ε̂): the ε̂ term is divided by √(1-ᾱ_t)."""
        xt = diffusion.q_sample(SCHED, self.x0, self.t, self.eps)
        p = diffusion.p_mean_variance(SCHED, self.eps, xt, self.t, prediction="eps")
        b = SCHED.betas[self.t][:, None, None, None]
        abar = SCHED.alphas_cumprod[self.t][:, None, None, None]
        expected = (xt - b / jnp.sqrt(1 - abar) * self.eps) / jnp.sqrt(1 - b)
        chex.assert_trees_all_close(p["mean"], expected, atol=1e-4)


def test_exact_reverse_variance_lies_between_posterior_and_beta():
    data = gaussian.GaussianData(jnp.zeros(3), jnp.diag(jnp.array([0.05, 0.5, 0.95])))
    t = jnp.arange(1, T)
    logvar = gaussian.reverse_log_variance(data, SCHED, t)
    low = jnp.log(SCHED.posterior_variance[t])[:, None]
    high = jnp.log(SCHED.betas[t])[:, None]
    # Inside [β̃_t, β_t] (up to float32 rounding where both ends meet at large t) ...
    assert bool(jnp.all((logvar >= low - 1e-5) & (logvar <= high + 1e-5)))
    # ... and strictly inside while the two ends are apart.
    apart = (high - low)[:, 0] > 1e-2
    assert bool(jnp.all(((logvar > low) & (logvar < high))[apart]))
    assert int(apart.sum()) > 100


@pytest.fixture(scope="module")
def elbo_setup():
    data = gaussian.GaussianData(jnp.array([0.3, -0.5]), jnp.diag(jnp.array([0.5, 0.2])))
    n = 8000
    x0 = data.mean + jax.random.normal(jax.random.key(0), (n, 2)) * jnp.sqrt(jnp.diag(data.cov))

    def bound(var_type):
        model = gaussian.oracle_model_fn(data, SCHED, learned_variance=var_type == "learned_range")
        fn = jax.jit(
            lambda x, k: diffusion.variational_bound(
                SCHED, model, x, k, var_type=var_type, decoder="gaussian"
            )["total_nats"]
        )
        return fn(x0, jax.random.key(1))

    return data, x0, bound


def test_variational_bound_with_exact_reverse_model_equals_nll(elbo_setup):
    """With the true reverse conditionals the bound is tight: E[L] = -log p(x_0) (MC error)."""
    data, x0, bound = elbo_setup
    gap = bound("learned_range") - gaussian.negative_log_likelihood(data, x0)
    se = float(jnp.std(gap)) / math.sqrt(gap.shape[0])
    assert abs(float(jnp.mean(gap))) < 5 * se, (float(jnp.mean(gap)), se)
    assert se < 0.03  # the test has the power to see a 0.15-nat error


@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large"])
def test_variational_bound_with_fixed_variances_is_strictly_larger(elbo_setup, var_type):
    data, x0, bound = elbo_setup
    gap = bound(var_type) - gaussian.negative_log_likelihood(data, x0)
    se = float(jnp.std(gap)) / math.sqrt(gap.shape[0])
    assert float(jnp.mean(gap)) > 5 * se


def test_bits_per_dim_of_uniform_noise_model_is_about_8_bits():
    """An x_0 predictor that knows nothing (x̂_0 = 0) on 8-bit noise images costs about 8 bits/dim.

    The bound can never beat the data's entropy; for uniform 8-bit data it is exactly 8 bits per
    dimension, so a model with no knowledge must pay at least that.
    """
    sched = schedules.schedule_from_config("linear", 100, beta_start=1e-3, beta_end=0.2)
    key = jax.random.key(0)
    x0 = jax.random.randint(key, (64, 4, 4, 1), 0, 256).astype(jnp.float32) / 127.5 - 1.0
    model = lambda x, t: jnp.zeros_like(x)
    out = jax.jit(lambda x: diffusion.variational_bound(sched, model, x, key, prediction="x0"))(x0)
    assert float(jnp.mean(out["bpd"])) > 8.0
    chex.assert_shape(out["terms_nats"], (64, 100))
