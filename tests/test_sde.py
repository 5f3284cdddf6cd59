"""Tests of diffusax.sde against closed forms.

Statistical checks use fixed seeds and bounds of 5 standard errors: for n samples of a Gaussian
with variance v, SE(mean) = sqrt(v / n) and SE(sample variance) = v sqrt(2 / (n - 1)). Wherever a
discretisation bias exists (Euler–Maruyama is weakly first order) the step count is chosen so that
the bias is under one standard error; the comments give the measured size.
"""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusax import sde as S

NUM_SAMPLES = 20_000
BETA = S.LinearBeta()
VP = S.vp_sde(BETA)

# One compiled simulator for the whole module: sde, num_steps and full_path are static.
simulate = jax.jit(S.euler_maruyama, static_argnames=("sde", "num_steps", "full_path"))


def se_mean(var, n=NUM_SAMPLES):
    return np.sqrt(var / n)


def se_var(var, n=NUM_SAMPLES):
    return var * np.sqrt(2.0 / (n - 1))


def gaussian_data_marginal(t, mu, s):
    """VP marginal of data N(mu, s^2): N(a mu, a^2 s^2 + 1 - a^2), a = exp(-1/2 int_0^t beta)."""
    a = jnp.exp(-0.5 * BETA.integral(t))
    return a * mu, a**2 * s**2 + 1.0 - a**2


def gaussian_data_score(mu, s):
    """grad_x log p_t(x) = -(x - mean_t) / var_t for Gaussian data N(mu, s^2)."""

    def score(x, t):
        mean, var = gaussian_data_marginal(t, mu, s)
        return -(x - mean) / var

    return score


# --- Wiener process ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def brownian():
    ts, W = S.wiener_paths(jax.random.key(0), NUM_SAMPLES, num_steps=100, t_end=2.0, dim=2)
    return np.asarray(ts), np.asarray(W, dtype=np.float64)


def test_wiener_shapes_and_start(brownian):
    ts, W = brownian
    assert ts.shape == (101,) and W.shape == (NUM_SAMPLES, 101, 2)
    np.testing.assert_allclose(ts[[0, 50, -1]], [0.0, 1.0, 2.0], atol=1e-6)
    assert np.all(W[:, 0] == 0.0)


@pytest.mark.parametrize("index", [5, 25, 50, 100])
def test_wiener_mean_zero_variance_t(brownian, index):
    ts, W = brownian
    t, w = ts[index], W[:, index]  # (n, 2): both coordinates are standard Wiener processes
    assert np.all(np.abs(w.mean(0)) < 5 * se_mean(t))
    assert np.all(np.abs(w.var(0) - t) < 5 * se_var(t))


def test_wiener_disjoint_increments_uncorrelated(brownian):
    ts, W = brownian
    first = W[:, 30] - W[:, 10]  # over (0.2, 0.6]
    second = W[:, 90] - W[:, 60]  # over (1.2, 1.8]
    len_a, len_b = ts[30] - ts[10], ts[90] - ts[60]
    # Var(first * second) = len_a * len_b for independent centred Gaussians.
    assert np.all(np.abs((first * second).mean(0)) < 5 * se_mean(len_a * len_b))
    assert np.all(np.abs(second.var(0) - len_b) < 5 * se_var(len_b))
    # The two coordinates are independent Wiener processes too.
    assert abs((W[:, 100, 0] * W[:, 100, 1]).mean()) < 5 * se_mean(ts[100] ** 2)


@pytest.mark.parametrize("i, j", [(10, 40), (25, 100), (50, 50), (80, 30)])
def test_wiener_covariance_is_min(brownian, i, j):
    ts, W = brownian
    s, t = sorted((ts[i], ts[j]))
    # Var(W_s W_t) = E[W_s^2 W_t^2] - s^2 = 3 s^2 + s (t - s) - s^2 = s^2 + s t.
    cov = (W[:, i] * W[:, j]).mean(0)
    assert np.all(np.abs(cov - s) < 5 * se_mean(s**2 + s * t))


# --- Euler–Maruyama on the VP-SDE -------------------------------------------------------------

# EM with 1000 steps has a weak bias of at most ~5e-3 in the variance at t = 1 (measured from the
# exact moment recursion of the scheme), half a standard error of NUM_SAMPLES samples.
CHECK_TIMES = (0.1, 0.3, 0.5, 1.0)
EM_STEPS = 1000


@pytest.mark.parametrize("start", ["fixed", "gaussian"])
def test_euler_maruyama_vp_matches_closed_form_marginals(start):
    if start == "fixed":
        x0, mean0, var0 = jnp.full((NUM_SAMPLES,), 1.5), 1.5, 0.0
    else:
        mean0, var0 = 2.0, 0.25
        x0 = mean0 + np.sqrt(var0) * jax.random.normal(jax.random.key(3), (NUM_SAMPLES,))
    ts, xs = simulate(VP, x0, jax.random.key(4), t0=0.0, t1=1.0, num_steps=EM_STEPS)
    assert ts.shape == (EM_STEPS + 1,) and xs.shape == (EM_STEPS + 1, NUM_SAMPLES)
    np.testing.assert_array_equal(xs[0], x0)
    for t in CHECK_TIMES:
        x_t = np.asarray(xs[round(t * EM_STEPS)], np.float64)
        mean_coef, std = S.vp_marginal(1.0, t, BETA)
        mean, var = float(mean_coef) * mean0, float(mean_coef) ** 2 * var0 + float(std) ** 2
        assert abs(x_t.mean() - mean) < 5 * se_mean(var), (t, x_t.mean(), mean)
        assert abs(x_t.var() - var) < 5 * se_var(var), (t, x_t.var(), var)


def test_euler_maruyama_end_only_equals_path_end():
    x0 = jnp.linspace(-1.0, 1.0, 16).reshape(2, 2, 2, 2)  # NHWC
    _, path = simulate(VP, x0, jax.random.key(5), t0=0.0, t1=0.5, num_steps=50)
    ts, end = simulate(VP, x0, jax.random.key(5), t0=0.0, t1=0.5, num_steps=50, full_path=False)
    assert path.shape == (51, 2, 2, 2, 2) and end.shape == x0.shape and ts.shape == (51,)
    np.testing.assert_allclose(end, path[-1], rtol=1e-6, atol=1e-6)


def test_euler_maruyama_backward_grid():
    ts, xs = simulate(VP, jnp.zeros(3), jax.random.key(0), t0=1.0, t1=0.25, num_steps=3)
    np.testing.assert_allclose(ts, [1.0, 0.75, 0.5, 0.25], atol=1e-6)
    assert xs.shape == (4, 3)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="num_steps"):
        S.euler_maruyama(VP, jnp.zeros(2), jax.random.key(0), t0=0.0, t1=1.0, num_steps=0)
    with pytest.raises(ValueError, match="t0 and t1"):
        S.euler_maruyama(VP, jnp.zeros(2), jax.random.key(0), t0=0.5, t1=0.5, num_steps=4)
    with pytest.raises(ValueError, match="x0"):
        S.euler_maruyama(VP, jnp.zeros(2, jnp.int32), jax.random.key(0), t0=0, t1=1, num_steps=4)
    with pytest.raises(TypeError, match="sde"):
        S.euler_maruyama(BETA, jnp.zeros(2), jax.random.key(0), t0=0.0, t1=1.0, num_steps=4)
    with pytest.raises(ValueError, match="num_paths"):
        S.wiener_paths(jax.random.key(0), 0, 10, 1.0)
    with pytest.raises(ValueError, match="t_end"):
        S.wiener_paths(jax.random.key(0), 4, 10, -1.0)
    with pytest.raises(ValueError, match="beta_min"):
        S.LinearBeta(beta_min=1.0, beta_max=0.5)


# --- Closed forms of the VP-SDE ---------------------------------------------------------------


def test_linear_beta_and_integral():
    # score_sde defaults; B(1) = 0.1 + 19.9 / 2; beta(t) / 1000 spans DDPM's 1e-4 .. 0.02.
    np.testing.assert_allclose(BETA(jnp.array([0.0, 0.5, 1.0])), [0.1, 10.05, 20.0], rtol=1e-6)
    np.testing.assert_allclose(BETA.integral(1.0), 10.05, rtol=1e-6)
    np.testing.assert_allclose(BETA.integral(0.8, 0.3), BETA.integral(0.8) - BETA.integral(0.3))
    # The integral's derivative is beta (central difference, exact for a quadratic).
    h, t = 1e-2, 0.37
    np.testing.assert_allclose(
        (BETA.integral(t + h) - BETA.integral(t - h)) / (2 * h), BETA(t), rtol=1e-4
    )


def test_vp_marginal_values_and_per_example_times():
    mean, std = S.vp_marginal(jnp.array(2.0), 0.0)
    np.testing.assert_allclose([mean, std], [2.0, 0.0], atol=1e-7)
    x0 = jnp.ones((3, 8, 8, 1))  # NHWC
    t = jnp.array([0.0, 0.2, 1.0])
    mean, std = S.vp_marginal(x0, t)
    assert mean.shape == (3, 8, 8, 1) and std.shape == (3, 1, 1, 1)
    integral = np.array([0.0, 0.1 * 0.2 + 9.95 * 0.04, 10.05])
    np.testing.assert_allclose(mean[:, 0, 0, 0], np.exp(-0.5 * integral), rtol=1e-6)
    np.testing.assert_allclose(std[:, 0, 0, 0] ** 2, 1 - np.exp(-integral), rtol=1e-6, atol=1e-7)
    # A scalar x0 with an array of times gives the curves over t.
    curve_mean, curve_std = S.vp_marginal(1.0, t)
    np.testing.assert_allclose(curve_mean, mean[:, 0, 0, 0])
    np.testing.assert_allclose(curve_std, std[:, 0, 0, 0])
    # Variance preserving: unit-variance data keeps unit variance, mean^2 + std^2 = 1.
    np.testing.assert_allclose(mean[:, 0, 0, 0] ** 2 + std[:, 0, 0, 0] ** 2, 1.0, rtol=1e-6)


def transition_coefficients(step, beta):
    """(mean coefficient, noise coefficient) of a step that is linear in (x, z)."""
    return step(1.0, beta, 0.0), step(0.0, beta, 1.0)


def test_exact_transition_composes_to_the_marginal():
    # A non-uniform grid: the exact transition does not care about the step sizes.
    grid = np.sort(np.concatenate([[0.0, 1.0], np.random.default_rng(0).uniform(0, 1, 60)]))
    mean, var = 1.0, 0.0  # moments of x(t) given x(0) = 1
    for s, t in itertools.pairwise(grid):
        a, c = transition_coefficients(S.vp_exact_transition, BETA.integral(t, s))
        mean, var = a * mean, a**2 * var + c**2
        m_t, std_t = S.vp_marginal(1.0, t)
        np.testing.assert_allclose(mean, m_t, rtol=1e-4)
        np.testing.assert_allclose(var, std_t**2, rtol=1e-5)


def test_exact_transition_samples_match_marginal():
    # The exact transition as a sampler: 10 steps land on the marginal, no discretisation bias.
    grid = jnp.linspace(0.0, 0.4, 11)
    x = jnp.full((NUM_SAMPLES,), -1.0)
    for n in range(10):
        z = jax.random.normal(jax.random.fold_in(jax.random.key(6), n), x.shape)
        x = S.vp_exact_transition(x, BETA.integral(grid[n + 1], grid[n]), z)
    mean, std = S.vp_marginal(-1.0, 0.4)
    var = float(std) ** 2
    assert abs(float(x.mean()) - float(mean)) < 5 * se_mean(var)
    assert abs(float(x.var()) - var) < 5 * se_var(var)


def test_discrete_step_agrees_to_first_order_in_beta():
    betas = np.array([0.08, 0.04, 0.02, 0.01])
    a_exact, c_exact = transition_coefficients(S.vp_exact_transition, betas)
    a_disc, c_disc = transition_coefficients(S.vp_discrete_step, betas)
    # exp(-b/2) - sqrt(1 - b) = b^2/4 + b^3/24: the gap shrinks 4x when b halves.
    mean_gap = np.asarray(a_exact - a_disc, np.float64)
    np.testing.assert_allclose(mean_gap, betas**2 / 4, rtol=0.03)
    np.testing.assert_allclose(mean_gap[:-1] / mean_gap[1:], 4.0, rtol=0.05)
    # (1 - exp(-b)) - b = -b^2/2 + b^3/6: the variances also differ at second order.
    var_gap = np.asarray(c_exact**2 - c_disc**2, np.float64)
    np.testing.assert_allclose(var_gap[:-1] / var_gap[1:], 4.0, rtol=0.05)
    # The noise coefficients themselves differ by -b^{3/2}/4: ratio 2^{3/2} per halving.
    std_gap = np.asarray(c_exact - c_disc, np.float64)
    np.testing.assert_allclose(std_gap[:-1] / std_gap[1:], 2**1.5, rtol=0.05)


def test_ddpm_steps_with_beta_over_n_converge_to_the_marginal():
    # beta_i = beta(t_i) / N: N DDPM steps approach the SDE's marginal with an O(1/N) error.
    def ddpm_moments(num_steps):
        ts = np.arange(num_steps) / num_steps
        a, c = transition_coefficients(S.vp_discrete_step, BETA(ts) / num_steps)
        a, c = np.asarray(a, np.float64), np.asarray(c, np.float64)
        mean, var = 1.0, 0.0
        for a_i, c_i in zip(a, c):
            mean, var = a_i * mean, a_i**2 * var + c_i**2
        return mean, var

    m_exact, std = S.vp_marginal(1.0, 1.0)
    errors = []
    for num_steps in (250, 500, 1000):
        mean, _ = ddpm_moments(num_steps)
        errors.append(abs(mean - float(m_exact)) / float(m_exact))
    assert errors[-1] < 0.035  # relative error of exp(-B(1)/2) = 0.0066 at N = 1000: 2.8%
    np.testing.assert_allclose(np.array(errors[:-1]) / np.array(errors[1:]), 2.0, rtol=0.1)
    np.testing.assert_allclose(ddpm_moments(1000)[1], float(std) ** 2, rtol=1e-3)


# --- Reverse time with the exact score of Gaussian data ----------------------------------------

DATA_MEAN, DATA_STD = 1.5, 0.5
REVERSE_STEPS = 500


def sample_prior(n=NUM_SAMPLES):
    """x(1) from the exact marginal p_1 of Gaussian data (N(0.0099, 0.99997): N(0, 1)-ish)."""
    mean, var = gaussian_data_marginal(1.0, DATA_MEAN, DATA_STD)
    return mean + jnp.sqrt(var) * jax.random.normal(jax.random.key(7), (n,)), mean, var


@pytest.mark.parametrize("probability_flow", [False, True])
def test_reverse_time_recovers_gaussian_data(probability_flow):
    # Measured with 200k samples at 500 steps: bias < 1.5e-3 in mean and variance, < 1 SE here.
    score = gaussian_data_score(DATA_MEAN, DATA_STD)
    reverse = S.reverse_sde(VP, score, probability_flow=probability_flow)
    x1, _, _ = sample_prior()
    ts, x0 = simulate(
        reverse, x1, jax.random.key(8), t0=1.0, t1=0.0, num_steps=REVERSE_STEPS, full_path=False
    )
    assert float(ts[-1]) == 0.0
    x0 = np.asarray(x0, np.float64)
    var = DATA_STD**2
    assert abs(x0.mean() - DATA_MEAN) < 5 * se_mean(var), x0.mean()
    assert abs(x0.var() - var) < 5 * se_var(var), x0.var()


def test_probability_flow_is_the_exact_transport_map():
    # In 1-D the flow is monotone, so it must be the affine map N(m1, v1) -> N(mu, s^2):
    # x(0) = mu + s (x(1) - m1) / sqrt(v1), sample by sample. Euler's error halves with dt.
    score = gaussian_data_score(DATA_MEAN, DATA_STD)
    flow = S.reverse_sde(VP, score, probability_flow=True)
    x1, m1, v1 = sample_prior(n=1000)
    exact = DATA_MEAN + DATA_STD * (x1 - m1) / jnp.sqrt(v1)
    errors = []
    for num_steps in (250, 500, 1000):
        _, x0 = simulate(
            flow, x1, jax.random.key(9), t0=1.0, t1=0.0, num_steps=num_steps, full_path=False
        )
        errors.append(float(jnp.max(jnp.abs(x0 - exact))))
    assert errors[-1] < 3e-3, errors
    np.testing.assert_allclose(np.array(errors[:-1]) / np.array(errors[1:]), 2.0, rtol=0.15)
    # Deterministic: the key does not matter.
    _, again = simulate(
        flow, x1, jax.random.key(10), t0=1.0, t1=0.0, num_steps=1000, full_path=False
    )
    np.testing.assert_array_equal(again, x0)


def test_reverse_sde_drift_and_diffusion():
    score = gaussian_data_score(DATA_MEAN, DATA_STD)
    x, t = jnp.array([0.3, -1.2]), jnp.array(0.4)
    g2 = BETA(t)
    reverse, flow = S.reverse_sde(VP, score), S.reverse_sde(VP, score, probability_flow=True)
    np.testing.assert_allclose(reverse.drift(x, t), -0.5 * g2 * x - g2 * score(x, t), rtol=1e-6)
    np.testing.assert_allclose(flow.drift(x, t), -0.5 * g2 * x - 0.5 * g2 * score(x, t), rtol=1e-6)
    np.testing.assert_allclose(reverse.diffusion(x, t), jnp.sqrt(g2), rtol=1e-6)
    assert float(flow.diffusion(x, t)) == 0.0


# --- jit and no-jit agree ---------------------------------------------------------------------


class JitVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_euler_maruyama(self):
        run = self.variant(S.euler_maruyama, static_argnames=("sde", "num_steps", "full_path"))
        x0 = jnp.linspace(-2.0, 2.0, 24).reshape(2, 3, 4, 1)  # NHWC
        ts, xs = run(VP, x0, jax.random.key(11), t0=0.0, t1=1.0, num_steps=20)
        ref_ts, ref_xs = simulate(VP, x0, jax.random.key(11), t0=0.0, t1=1.0, num_steps=20)
        chex.assert_shape(xs, (21, 2, 3, 4, 1))
        np.testing.assert_allclose(ts, ref_ts, rtol=1e-6)
        np.testing.assert_allclose(xs, ref_xs, rtol=1e-5, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_wiener_paths(self):
        run = self.variant(S.wiener_paths, static_argnums=(1, 2, 3, 4))
        ts, W = run(jax.random.key(12), 3, 10, 1.0, 2)
        ref_ts, ref_W = S.wiener_paths(jax.random.key(12), 3, 10, 1.0, 2)
        chex.assert_shape(W, (3, 11, 2))
        np.testing.assert_allclose(ts, ref_ts, rtol=1e-6)
        np.testing.assert_allclose(W, ref_W, rtol=1e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_closed_forms(self):
        @self.variant
        def closed_forms(x, t, beta, z):
            mean, std = S.vp_marginal(x, t)
            return (
                mean,
                std,
                S.vp_exact_transition(x, beta, z),
                S.vp_discrete_step(x, beta, z),
            )

        args = (jnp.array([0.5, -1.0]), jnp.array([0.1, 0.9]), jnp.array(0.02), jnp.ones(2))
        out = closed_forms(*args)
        _, ref_std = S.vp_marginal(args[0], args[1])
        a = jnp.exp(-0.5 * BETA.integral(args[1]))
        np.testing.assert_allclose(out[0], args[0] * a, rtol=1e-6)
        np.testing.assert_allclose(out[1], ref_std, rtol=1e-6)
        np.testing.assert_allclose(
            out[2], np.exp(-0.01) * args[0] + np.sqrt(1 - np.exp(-0.02)), rtol=1e-5
        )
        np.testing.assert_allclose(out[3], np.sqrt(0.98) * args[0] + np.sqrt(0.02), rtol=1e-6)
