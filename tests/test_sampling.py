"""Samplers against the Gaussian-data oracle, diffusers' schedulers, and each other.

For x_0 ~ N(μ, Σ) the optimal ε-predictor is known in closed form (``diffusax.gaussian``), so a
correct sampler driven by it must return N(μ, Σ) up to its discretisation error. Statistics are
taken in whitened coordinates w = L⁻¹(x - μ), Σ = L Lᵀ, where the target is N(0, I): with n
samples the mean has standard error 1/√n, a diagonal covariance entry √(2/n) and an
off-diagonal one 1/√n. Each bound is 5 standard errors plus the sampler's own bias (ALLOW),
which was computed exactly in float64 by propagating the mean and covariance of each discrete
chain (every step is affine in x and Gaussian noise) and is quoted next to each case.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from diffusax import diffusion, gaussian, sampling, schedules

NUM_SAMPLES = 8192
SCHED = schedules.schedule_from_config("linear", 1000)  # the DDPM default
# A short schedule for tests of plumbing, not of accuracy (ᾱ_T ≈ 1e-4 still).
SHORT = schedules.make_schedule(schedules.linear_betas(100, 1e-3, 0.17))

FULL = gaussian.GaussianData(  # full covariance, eigenvalues 0.16 and 0.74
    mean=jnp.array([0.5, -1.0]), cov=jnp.array([[0.6, 0.25], [0.25, 0.3]])
)
DIAG = gaussian.GaussianData(  # diagonal, variances < 1 so the learned range is not clipped
    mean=jnp.array([0.3, -0.4]), cov=jnp.diag(jnp.array([0.5, 0.1]))
)
DATA = {"full": FULL, "diag": DIAG}


def respaced_learned_oracle(data, sched, steps):
    """ε from the oracle at the original τ, and the learned-range output that gives the exact
    Var(x_{τ_{i-1}} | x_{τ_i}) of the respaced chain (iDDPM interpolates in the respaced range)."""
    sub = sampling.respace(sched, steps)
    eps_fn = gaussian.oracle_model_fn(data, sched)
    taus = jnp.asarray(steps)

    def model_fn(x, t):
        i = jnp.searchsorted(taus, t)  # the respaced index of each original timestep
        return jnp.concatenate([eps_fn(x, t), gaussian.learned_range_output(data, sub, i)], -1)

    return model_fn


@functools.cache
def draw(data_name, sampler, var_type="fixed_large", exact_respaced=False, **kwargs):
    """NUM_SAMPLES samples (numpy) from one jitted sampler run with the oracle; cached."""
    data = DATA[data_name]
    if exact_respaced:
        steps = sampling.timestep_subset(1000, kwargs.pop("num_steps"), kwargs.pop("spacing"))
        model_fn = respaced_learned_oracle(data, SCHED, steps)
        kwargs["timesteps"] = steps
    else:
        learned = var_type in diffusion.LEARNED_VAR_TYPES
        model_fn = gaussian.oracle_model_fn(data, SCHED, learned_variance=learned)
    run = jax.jit(
        lambda key: sampling.sample(
            model_fn,
            SCHED,
            (NUM_SAMPLES, data.dim),
            key,
            sampler=sampler,
            var_type=var_type,
            **kwargs,
        )
    )
    return np.asarray(run(jax.random.key(0)), np.float64)


def assert_moments(samples, data, allow):
    mean, cov = np.asarray(data.mean, np.float64), np.asarray(data.cov, np.float64)
    chol = np.linalg.cholesky(cov)
    white = np.linalg.solve(chol, (samples - mean).T).T  # (n, D), N(0, I) if right
    n, dim = white.shape
    eye = np.eye(dim)
    mean_err = np.abs(white.mean(0))
    cov_err = np.abs(np.cov(white.T) - eye)
    mean_bound = 5 / np.sqrt(n) + allow
    cov_bound = 5 * np.where(eye > 0, np.sqrt(2 / n), np.sqrt(1 / n)) + allow
    assert np.all(mean_err < mean_bound), f"whitened mean error {mean_err} > {mean_bound}"
    assert np.all(cov_err < cov_bound), f"whitened cov error\n{cov_err}\n> {cov_bound}"


# (data, sampler, options, ALLOW). Exact max whitened bias of each chain in the comment.
MOMENT_CASES = {
    "ddpm_fixed_large_1000": ("full", "ddpm", dict(var_type="fixed_large"), 0.01),  # 0.004
    "ddpm_fixed_small_1000": ("full", "ddpm", dict(var_type="fixed_small"), 0.025),  # 0.019
    # the oracle's variance is exact for diagonal Σ: only x_T ≠ N(√ᾱ_T μ, C_T) remains
    "ddpm_learned_range_1000": ("diag", "ddpm", dict(var_type="learned_range"), 0.005),  # 0.001
    "ddpm_fixed_large_respaced_250": (
        "full",
        "ddpm",
        dict(num_steps=250, spacing="uniform"),
        0.025,  # 0.018
    ),
    "ddpm_learned_range_respaced_100": (
        "diag",
        "ddpm",
        dict(var_type="learned_range", exact_respaced=True, num_steps=100, spacing="uniform"),
        0.005,  # 0.001
    ),
    "ddim_eta0_250": ("full", "ddim", dict(num_steps=250, eta=0.0), 0.035),  # 0.028 (1st order)
    "ddim_eta1_1000": ("full", "ddim", dict(eta=1.0), 0.025),  # 0.019, = DDPM with β̃
    "dpm++2m_50": ("full", "dpm++2m", dict(num_steps=50), 0.01),  # 0.007 (2nd order)
}


@pytest.mark.parametrize("case", sorted(MOMENT_CASES))
def test_samples_match_gaussian_data(case):
    data_name, sampler, options, allow = MOMENT_CASES[case]
    assert_moments(draw(data_name, sampler, **options), DATA[data_name], allow)


def test_a_wrong_variance_fails_the_moment_check():
    """The bounds are tight enough to see σ² = β̃ with 100 steps (0.14 too little variance)."""
    with pytest.raises(AssertionError):
        assert_moments(
            draw("full", "ddpm", var_type="fixed_small", num_steps=100, spacing="uniform"),
            FULL,
            0.01,
        )


def test_ddim_eta1_is_ddpm_with_posterior_variance():
    """σ(η=1)² = β̃ and √(1-ᾱ_prev-β̃) ε̂ + √ᾱ_prev x̂_0 = μ̃: the same chain, noise by noise."""
    ddpm = draw("full", "ddpm", var_type="fixed_small")
    ddim = draw("full", "ddim", eta=1.0)
    np.testing.assert_allclose(ddim, ddpm, atol=2e-4)


def test_ddpm_step_noise_scale_per_var_type():
    """x_{t-1} - μ_θ = σ_t z with σ_t² = β_t (fixed_large) or β̃_t (fixed_small), 0 at i = 0."""
    x = jax.random.normal(jax.random.key(1), (4, 2))
    z = jax.random.normal(jax.random.key(2), (4, 2))
    out = jnp.zeros_like(x)
    for var_type, table in (
        ("fixed_large", SHORT.betas),
        ("fixed_small", SHORT.posterior_variance),
    ):
        for i in (50, 1):
            noisy, _ = sampling.ddpm_step(SHORT, out, x, i, z, var_type=var_type)
            mean, _ = sampling.ddpm_step(SHORT, out, x, i, 0 * z, var_type=var_type)
            np.testing.assert_allclose(noisy - mean, jnp.sqrt(table[i]) * z, rtol=1e-5)
        noisy, _ = sampling.ddpm_step(SHORT, out, x, 0, z, var_type=var_type)
        mean, _ = sampling.ddpm_step(SHORT, out, x, 0, 0 * z, var_type=var_type)
        np.testing.assert_array_equal(noisy, mean)


def test_ddpm_step_is_algorithm_2():
    """μ_θ = 1/√α_t (x_t - β_t/√(1-ᾱ_t) ε̂), not the lecture's (x_t - β_t ε̂)/√(1-β_t)."""
    x = jax.random.normal(jax.random.key(3), (4, 2))
    eps = jax.random.normal(jax.random.key(4), (4, 2))
    i = 40
    beta, abar = SCHED.betas[i], SCHED.alphas_cumprod[i]
    mean, _ = sampling.ddpm_step(SCHED, eps, x, i, jnp.zeros_like(x))
    expected = (x - beta / jnp.sqrt(1 - abar) * eps) / jnp.sqrt(1 - beta)
    np.testing.assert_allclose(mean, expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The probability-flow ODE: determinism and order


def exact_flow(data, abar_start, x_start):
    """The exact probability-flow ODE map from ᾱ = abar_start to the data, for Gaussian data.

    In Σ's eigenbasis the ODE is linear and decoupled, and it carries each marginal
    N(√ᾱ μ, ᾱ λ_d + 1 - ᾱ) to the next, so the standardised coordinate is conserved.
    """
    mean, cov = np.asarray(data.mean, np.float64), np.asarray(data.cov, np.float64)
    lam, basis = np.linalg.eigh(cov)
    scale = np.sqrt(lam / (abar_start * lam + 1 - abar_start))
    centred = (np.asarray(x_start, np.float64) - np.sqrt(abar_start) * mean) @ basis
    return mean + (centred * scale) @ basis.T


@functools.cache
def deterministic_run(sampler, num_steps):
    """A jitted (key, x_T) -> samples of a deterministic sampler on FULL, compiled once."""
    model_fn = gaussian.oracle_model_fn(FULL, SCHED)
    return jax.jit(
        lambda key, x_T: sampling.sample(
            model_fn, SCHED, x_T.shape, key, sampler=sampler, num_steps=num_steps, x_T=x_T
        )
    )


FLOW_X_T = jax.random.normal(jax.random.key(5), (512, 2))


@functools.cache
def flow_error(sampler, num_steps):
    """RMS distance of a deterministic sampler's samples from the exact ODE solution."""
    out = deterministic_run(sampler, num_steps)(jax.random.key(0), FLOW_X_T)
    abar_start = float(np.cumprod(1 - np.asarray(SCHED.betas, np.float64))[-1])  # trailing: 999
    exact = exact_flow(FULL, abar_start, FLOW_X_T)
    return float(np.sqrt(np.mean((np.asarray(out, np.float64) - exact) ** 2)))


def test_dpmpp_2m_is_second_order_and_beats_ddim():
    """Exact errors (float64): DDIM 0.27 / 0.14, DPM++ 0.14 / 0.04 at 10 / 20 trailing steps."""
    assert flow_error("dpm++2m", 20) < 0.5 * flow_error("ddim", 20)
    order = lambda s: np.log2(flow_error(s, 10) / flow_error(s, 20))
    assert 0.7 < order("ddim") < 1.3
    assert order("dpm++2m") > 1.5


def test_deterministic_samplers_map_the_same_noise_to_the_same_sample():
    for sampler in ("ddim", "dpm++2m"):
        run = deterministic_run(sampler, 20)
        first = run(jax.random.key(1), FLOW_X_T)
        np.testing.assert_array_equal(first, run(jax.random.key(2), FLOW_X_T))
        assert not np.allclose(first, run(jax.random.key(1), FLOW_X_T + 0.1))


STEPS = {
    "ddpm": lambda sched, out, x, i, **kw: sampling.ddpm_step(sched, out, x, i, NOISE, **kw),
    "ddim": lambda sched, out, x, i, **kw: sampling.ddim_step(
        sched, out, x, i, NOISE, eta=0.5, **kw
    ),
    "dpm++2m": lambda sched, out, x, i, **kw: sampling.dpmpp_2m_step(
        sched, out, x, i, 0.5 * NOISE, **kw
    ),
    "euler": lambda sched, out, x, i, **kw: sampling.euler_step(sched, out, x, i, **kw),
    "euler_a": lambda sched, out, x, i, **kw: sampling.euler_ancestral_step(
        sched, out, x, i, NOISE, **kw
    ),
}
NOISE = jax.random.normal(jax.random.key(6), (16, 2))


@pytest.mark.parametrize("sampler", sampling.SAMPLERS)
def test_parametrisations_give_the_same_step(sampler):
    """A model predicting x_0 or v moves x exactly as the ε-model it is converted from."""
    x = jax.random.normal(jax.random.key(7), (16, 2))
    step = STEPS[sampler]
    for i in (99, 50, 1, 0):
        t = jnp.full((16,), i, jnp.int32)
        eps = gaussian.optimal_eps(FULL, SHORT, x, t)
        x0 = diffusion.x0_from_eps(SHORT, x, t, eps)
        ref, ref_x0 = step(SHORT, eps, x, i)
        for prediction, out in (("x0", x0), ("v", diffusion.v_from_x0_eps(SHORT, x0, eps, t))):
            got, got_x0 = step(SHORT, out, x, i, prediction=prediction)
            np.testing.assert_allclose(got, ref, atol=1e-4, err_msg=f"{prediction} i={i}")
            np.testing.assert_allclose(got_x0, ref_x0, atol=1e-4, err_msg=f"{prediction} i={i}")


@pytest.mark.parametrize("sampler", sampling.SAMPLERS)
def test_clip_x0_bounds_the_last_step(sampler):
    """The last step returns x̂_0 (DDPM's posterior mean at ᾱ_prev = 1 is x̂_0), so it is clipped."""
    x = 3.0 * jax.random.normal(jax.random.key(8), (16, 2))
    out = jax.random.normal(jax.random.key(9), (16, 2))
    for i in (60, 0):
        x_prev, x0 = STEPS[sampler](SHORT, out, x, i, clip_x0=0.5)
        assert float(jnp.max(jnp.abs(x0))) <= 0.5
        assert float(jnp.max(jnp.abs(x0))) == pytest.approx(0.5)  # the clip was active
    np.testing.assert_allclose(x_prev, x0, atol=1e-6)


def test_trajectory_starts_at_x_T_and_ends_at_the_sample():
    model_fn = gaussian.oracle_model_fn(FULL, SHORT)
    x_T = jax.random.normal(jax.random.key(9), (8, 2))
    out, path = sampling.sample(
        model_fn,
        SHORT,
        x_T.shape,
        jax.random.key(0),
        sampler="ddim",
        num_steps=7,
        x_T=x_T,
        return_trajectory=True,
    )
    assert path.shape == (8, 8, 2)
    np.testing.assert_array_equal(path[0], x_T)
    np.testing.assert_array_equal(path[-1], out)


# ---------------------------------------------------------------------------------------------
# Timesteps and respacing


def test_respace_of_every_timestep_is_the_identity():
    for sched in (SCHED, schedules.schedule_from_config("cosine", 1000)):
        same = sampling.respace(sched, np.arange(1000))
        for field, a, b in zip(sched._fields, sched, same):
            # 2e-5: the cosine schedule's clipped β = 0.999 keeps only ~1e-5 of 1 - β in float32
            np.testing.assert_allclose(b, a, rtol=2e-5, err_msg=field)


def test_respaced_schedule_keeps_alpha_bar_at_the_chosen_steps():
    steps = sampling.timestep_subset(1000, 25, "uniform")
    sub = sampling.respace(SCHED, steps)
    np.testing.assert_allclose(sub.alphas_cumprod, SCHED.alphas_cumprod[steps], rtol=1e-6)
    assert float(sub.alphas_cumprod_prev[0]) == 1.0
    np.testing.assert_allclose(sub.alphas_cumprod_prev[1:], SCHED.alphas_cumprod[steps[:-1]])


def test_uniform_spacing_is_improved_ddpm_space_timesteps():
    """iDDPM's space_timesteps(1000, "250"): round(k · 999/249), both ends included."""
    stride, expected = 999 / 249, []
    for k in range(250):
        expected.append(round(k * stride))
    np.testing.assert_array_equal(sampling.timestep_subset(1000, 250, "uniform"), expected)
    np.testing.assert_array_equal(sampling.timestep_subset(1000, 1, "uniform"), [999])


def test_explicit_timesteps_in_any_order():
    np.testing.assert_array_equal(
        sampling.resolve_timesteps(100, timesteps=[99, 50, 7, 0]), [0, 7, 50, 99]
    )
    np.testing.assert_array_equal(sampling.resolve_timesteps(100), np.arange(100))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' own np.array(tensor)
def test_against_diffusers_schedulers():
    """Timestep spacings, DPM-Solver++(2M) and DDIM with η > 0 step for step against diffusers."""
    pytest.importorskip("diffusers")
    import torch
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    common = dict(num_train_timesteps=1000, beta_schedule="linear", steps_offset=0)
    for spacing in ("leading", "trailing"):
        for k in (20, 50, 333):
            ref = DDIMScheduler(timestep_spacing=spacing, **common)
            ref.set_timesteps(k)
            ours = sampling.timestep_subset(1000, k, spacing)[::-1]
            np.testing.assert_array_equal(ours, ref.timesteps.numpy(), err_msg=f"{spacing} {k}")

    model_fn = gaussian.oracle_model_fn(FULL, SCHED)
    oracle = lambda x, t: torch.from_numpy(
        np.array(model_fn(jnp.asarray(x.numpy()), jnp.full((x.shape[0],), int(t), jnp.int32)))
    )
    x_T = jax.random.normal(jax.random.key(10), (16, 2))

    dpm = DPMSolverMultistepScheduler(
        timestep_spacing="trailing",
        algorithm_type="dpmsolver++",
        solver_order=2,
        final_sigmas_type="zero",
        **common,
    )
    dpm.set_timesteps(20)
    x = torch.from_numpy(np.array(x_T))
    ref_path = [x]
    for t in dpm.timesteps:
        x = dpm.step(oracle(x, t), t, x).prev_sample
        ref_path.append(x)
    _, path = sampling.sample(
        model_fn,
        SCHED,
        x_T.shape,
        jax.random.key(0),
        sampler="dpm++2m",
        num_steps=20,
        x_T=x_T,
        return_trajectory=True,
    )
    np.testing.assert_allclose(path, torch.stack(ref_path).numpy(), atol=2e-4)

    ddim = DDIMScheduler(timestep_spacing="trailing", clip_sample=False, **common)
    ddim.set_timesteps(20)
    steps = sampling.timestep_subset(1000, 20, "trailing")
    sub = sampling.respace(SCHED, steps)
    x_ref, x = torch.from_numpy(np.array(x_T)), x_T
    for i in range(19, -1, -1):
        z = jax.random.normal(jax.random.fold_in(jax.random.key(11), i), x.shape)
        t = int(steps[i])
        assert t == int(ddim.timesteps[19 - i])
        x_ref = ddim.step(
            oracle(x_ref, t), t, x_ref, eta=0.5, variance_noise=torch.from_numpy(np.array(z))
        ).prev_sample
        x, _ = sampling.ddim_step(sub, model_fn(x, jnp.full((16,), t, jnp.int32)), x, i, z, eta=0.5)
        np.testing.assert_allclose(x, x_ref.numpy(), atol=2e-4, err_msg=f"step {i}")


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance


CLASS_MEANS = jnp.array([[1.0, 0.0], [-1.0, 0.5], [0.0, 0.0]])  # classes 0, 1 and null = 2


def conditional_apply(x, t, y, *, learned_variance=False):
    """The oracle ε for N(μ_y, Σ) (a class-conditional model), optionally with a variance half
    that depends on y so that the branch it comes from is visible."""
    eps = jnp.stack(
        [gaussian.optimal_eps(gaussian.GaussianData(m, FULL.cov), SHORT, x, t) for m in CLASS_MEANS]
    )  # (3, B, D)
    eps = jnp.take_along_axis(eps, y[None, :, None], axis=0)[0]  # (B, D)
    if not learned_variance:
        return eps
    return jnp.concatenate([eps, jnp.broadcast_to(y[:, None] / 4.0, eps.shape)], axis=-1)


def _cfg_inputs():
    x = jax.random.normal(jax.random.key(12), (6, 2))
    t = jnp.array([0, 10, 20, 50, 80, 99], jnp.int32)
    y = jnp.array([0, 1, 0, 1, 1, 0], jnp.int32)
    return x, t, y


def test_cfg_scale_one_is_conditional_and_zero_is_unconditional():
    x, t, y = _cfg_inputs()
    cond, uncond = conditional_apply(x, t, y), conditional_apply(x, t, jnp.full_like(y, 2))
    for scale, expected in ((1.0, cond), (0.0, uncond), (4.0, uncond + 4.0 * (cond - uncond))):
        guided = sampling.classifier_free_guidance(conditional_apply, scale, null_label=2)
        np.testing.assert_allclose(guided(x, t, y), expected, rtol=1e-5, atol=1e-5)


def test_cfg_makes_one_batched_call():
    calls = []

    def apply_fn(x, t, y):
        calls.append((x.shape, t.shape, np.asarray(y)))
        return conditional_apply(x, t, y)

    x, t, y = _cfg_inputs()
    sampling.classifier_free_guidance(apply_fn, 3.0, null_label=2)(x, t, y)
    assert len(calls) == 1
    assert calls[0][0] == (12, 2) and calls[0][1] == (12,)
    np.testing.assert_array_equal(calls[0][2], np.concatenate([y, np.full(6, 2)]))


def test_cfg_guided_channels_and_learned_variance():
    x, t, y = _cfg_inputs()
    apply_fn = functools.partial(conditional_apply, learned_variance=True)
    cond, uncond = apply_fn(x, t, y), apply_fn(x, t, jnp.full_like(y, 2))  # (B, 4) each
    guided = sampling.classifier_free_guidance(
        apply_fn, 3.0, null_label=2, learned_variance=True, guided_channels=1
    )(x, t, y)
    np.testing.assert_allclose(
        guided[:, 0], uncond[:, 0] + 3.0 * (cond[:, 0] - uncond[:, 0]), rtol=1e-5, atol=1e-5
    )
    # (allclose, not equal: the doubled batch may round differently in the last bit)
    np.testing.assert_allclose(guided[:, 1], cond[:, 1], atol=1e-5)  # unguided: conditional
    np.testing.assert_allclose(guided[:, 2:], cond[:, 2:], atol=1e-5)  # variance: conditional
    all_channels = sampling.classifier_free_guidance(
        apply_fn, 3.0, null_label=2, learned_variance=True
    )(x, t, y)
    np.testing.assert_allclose(
        all_channels[:, :2],
        uncond[:, :2] + 3.0 * (cond[:, :2] - uncond[:, :2]),
        rtol=1e-5,
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="guided_channels"):
        sampling.classifier_free_guidance(apply_fn, 3.0, null_label=2, guided_channels=0)
    with pytest.raises(ValueError, match="guided_channels"):
        sampling.classifier_free_guidance(
            apply_fn, 3.0, null_label=2, learned_variance=True, guided_channels=3
        )(x, t, y)


def test_cfg_with_a_null_embedding():
    """A condition that is an embedding (B, L) with a learned null embedding (L,)."""
    apply_fn = lambda x, t, y: x + jnp.sum(y, axis=-1, keepdims=True)
    x = jnp.zeros((3, 2))
    y = jnp.ones((3, 5))
    guided = sampling.classifier_free_guidance(apply_fn, 2.0, null_label=jnp.full((5,), -1.0))
    np.testing.assert_allclose(guided(x, jnp.zeros(3, jnp.int32), y), jnp.full((3, 2), 15.0))


def test_cfg_scale_one_samples_like_the_conditional_model():
    y = jnp.array([0, 1] * 16, jnp.int32)
    run = lambda fn: sampling.sample(
        sampling.bind_condition(fn, y),
        SHORT,
        (32, 2),
        jax.random.key(13),
        sampler="ddpm",
        num_steps=10,
    )
    guided = sampling.classifier_free_guidance(conditional_apply, 1.0, null_label=2)
    np.testing.assert_allclose(run(guided), run(conditional_apply), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# jit and no-jit agree


@functools.cache
def _short_run(sampler, var_type):
    """(key, x_T, eta) -> samples: under the with_jit variant x_T and η are traced too."""
    learned = var_type in diffusion.LEARNED_VAR_TYPES
    model_fn = gaussian.oracle_model_fn(DIAG, SHORT, learned_variance=learned)
    return lambda key, x_T, eta: sampling.sample(
        model_fn,
        SHORT,
        x_T.shape,
        key,
        sampler=sampler,
        num_steps=10,
        var_type=var_type,
        eta=eta,
        x_T=x_T,
    )


JIT_X_T = jax.random.normal(jax.random.key(14), (64, 2))
JIT_CASES = (
    ("ddpm", "learned_range", 0.0),
    ("ddim", "fixed_small", 0.5),
    ("dpm++2m", "learned_range", 0.0),
)


@functools.cache
def _jitted_reference(sampler, var_type, eta):
    return np.asarray(jax.jit(_short_run(sampler, var_type))(jax.random.key(15), JIT_X_T, eta))


class JitTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*JIT_CASES)
    def test_jit_and_no_jit_agree(self, sampler, var_type, eta):
        out = self.variant(_short_run(sampler, var_type))(jax.random.key(15), JIT_X_T, eta)
        np.testing.assert_allclose(out, _jitted_reference(sampler, var_type, eta), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad input


def _never_called(x, t):
    raise AssertionError("model_fn must not be traced for bad arguments")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sampler="heun"), "sampler"),
        (dict(num_steps=0), "num_steps"),
        (dict(num_steps=101), "num_steps"),
        (dict(timesteps=[0, 100]), "timesteps"),
        (dict(timesteps=[-1, 5]), "timesteps"),
        (dict(timesteps=[3, 3]), "timesteps"),
        (dict(timesteps=[0.5, 3.0]), "timesteps"),
        (dict(num_steps=10, timesteps=[1, 2]), "num_steps or timesteps"),
        (dict(num_steps=10, spacing="log"), "spacing"),
        (dict(num_steps=2.5), "num_steps"),
        (dict(sampler="ddim", eta=-0.1), "eta"),
        (dict(sampler="ddpm", eta=0.5), "eta"),
        (dict(sampler="dpm++2m", eta=1.0), "eta"),
        (dict(prediction="score"), "prediction"),
        (dict(var_type="fixed"), "var_type"),
        (dict(x_T=jnp.zeros((3, 2))), "x_T"),
    ],
)
def test_bad_arguments_raise_before_tracing(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sampling.sample(_never_called, SHORT, (4, 2), jax.random.key(0), **kwargs)


def test_output_that_does_not_fit_var_type_is_rejected():
    model_fn = gaussian.oracle_model_fn(DIAG, SHORT)  # C channels, no variance half
    with pytest.raises(ValueError, match="var_type"):
        sampling.sample(model_fn, SHORT, (4, 2), jax.random.key(0), var_type="learned_range")
    learned = gaussian.oracle_model_fn(DIAG, SHORT, learned_variance=True)  # 2C channels
    with pytest.raises(ValueError, match="var_type"):
        sampling.sample(learned, SHORT, (4, 2), jax.random.key(0), sampler="ddim")


def test_respace_needs_a_concrete_schedule():
    with pytest.raises(ValueError, match="sched"):
        jax.jit(lambda s: sampling.respace(s, [0, 50]))(SHORT)
