"""Consistency models and LCM sampling: the boundary scalings, LCMScheduler's timesteps and step,
and the exact consistency function of Gaussian data.

- ``boundary_scalings`` / ``consistency_function``: f(z, 0) = z bit for bit; c_skip, c_out as a
  float64 numpy formula to 1e-6 relative and as LCMScheduler's to float32 rounding.
- LCM against diffusers' LCMScheduler (scaled_linear as SD, and squaredcos_cap_v2; ε, v and x_0
  prediction; 1, 2, 4, 8 steps): the timesteps exactly; each step, fed the same model output,
  x and noise (a torch generator's draws, replayed with the same seed) and diffusers' own float32
  ᾱ, to 1e-6 · max|x| (measured ≤ 1.9e-7: float32 rounding of differently ordered
  products); whole loops on the project's own ᾱ (float64 cumprod, diffusers' float32) to
  1e-5 · max|x| (measured ≤ 1.7e-6).
- Gaussian data x_0 ~ N(μ, diag s²): the probability-flow ODE carries the marginal
  N(√ᾱ μ, ᾱ s² + 1 - ᾱ) of each dimension monotonically onto N(μ, s²), so its consistency
  function is the affine map f(x, t) = μ + s (x - √ᾱ_t μ)/√(ᾱ_t s² + 1 - ᾱ_t). A model whose x̂_0
  makes c_skip x + c_out x̂_0 = f exactly, sampled with 'lcm', must return N(μ, s²): one step
  from the exact marginal at T pointwise (μ + s z from x_T = √ᾱ_T μ + √(ᾱ_T s² + 1 - ᾱ_T) z),
  and 2 or 4 steps in distribution (re-noising an exact sample gives the exact marginal).
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusax import consistency, sampling, schedules
from diffusax.convert import diffusers_scheduler as ds

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
diffusers.utils.logging.set_verbosity_error()
from diffusers.pipelines.latent_consistency_models import (  # noqa: E402
    pipeline_latent_consistency_text2img as lcm_pipeline,
)

SHAPE = (3, 4, 5)  # (B, ...): every LCM operation is elementwise but for t's broadcast
X_T = np.array(jax.random.normal(jax.random.key(0), SHAPE))


# ---------------------------------------------------------------------------------------------
# Boundary scalings


def test_boundary_condition_is_exact():
    z = jax.random.normal(jax.random.key(1), SHAPE)
    x0 = 100.0 * jax.random.normal(jax.random.key(2), SHAPE)
    for kwargs in ({}, dict(sigma_data=0.3, timestep_scaling=1.0), dict(timestep_scaling=7.5)):
        c_skip, c_out = consistency.boundary_scalings(jnp.zeros(3, jnp.int32), **kwargs)
        assert np.all(np.asarray(c_skip) == 1.0) and np.all(np.asarray(c_out) == 0.0)
        out = consistency.consistency_function(z, jnp.zeros(3, jnp.int32), x0, **kwargs)
        np.testing.assert_array_equal(
            np.asarray(out).view(np.uint32), np.asarray(z).view(np.uint32)
        )
    # a batch with one row at t = 0 keeps that row, bit for bit
    t = jnp.array([0, 1, 999])
    out = consistency.consistency_function(z, t, x0)
    np.testing.assert_array_equal(out[0], z[0])
    assert not np.allclose(out[1:], z[1:])


def test_scalings_are_the_formula_and_lcm_schedulers():
    t = np.concatenate([np.arange(1000), [0.5, 12.25]])
    for sigma_data, scaling in ((0.5, 10.0), (0.3, 1.0)):
        st = scaling * t
        c_skip = sigma_data**2 / (st**2 + sigma_data**2)
        c_out = st / np.sqrt(st**2 + sigma_data**2)
        ours = consistency.boundary_scalings(jnp.asarray(t), sigma_data, scaling)
        np.testing.assert_allclose(ours[0], c_skip, rtol=1e-6, atol=1e-30)
        np.testing.assert_allclose(ours[1], c_out, rtol=1e-6)
    ref = diffusers.LCMScheduler(timestep_scaling=4.0)
    steps = torch.arange(1000)
    c_skip, c_out = ref.get_scalings_for_boundary_condition_discrete(steps)
    ours = consistency.boundary_scalings(jnp.arange(1000), timestep_scaling=4.0)
    np.testing.assert_allclose(ours[0], c_skip.numpy(), rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(ours[1], c_out.numpy(), rtol=1e-6)


def test_consistency_function_broadcasts_t():
    z = jax.random.normal(jax.random.key(3), SHAPE)
    x0 = jax.random.normal(jax.random.key(4), SHAPE)
    t = jnp.array([0, 3, 500])
    out = consistency.consistency_function(z, t, x0)
    for b in range(3):
        c_skip, c_out = consistency.boundary_scalings(t[b])
        np.testing.assert_allclose(out[b], c_skip * z[b] + c_out * x0[b], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Guidance embedding


def test_guidance_embedding_is_diffusers():
    """Equal to 1e-6 where 1000 w is small; for large w the angle 1000 w ν_k inherits a 1-ulp
    difference between torch's and XLA's float32 exp of ν_k (22 of 256 entries differ), so the
    bound is 1e-6 + 2.4e-7 · |1000 w ν_k| (measured 5e-4 at w = 7, dim 512)."""
    get = functools.partial(
        lcm_pipeline.LatentConsistencyModelPipeline.get_guidance_scale_embedding, None
    )
    for w in ([0.0, 1e-4, 1e-3, 4e-3], [0.0, 1.5, 3.0, 7.0]):
        for dim in (4, 255, 256, 512):
            ref = get(torch.tensor(w), embedding_dim=dim).numpy()
            ours = np.asarray(consistency.guidance_embedding(jnp.asarray(w), dim))
            assert ours.shape == ref.shape == (4, dim)
            half = dim // 2
            freqs = np.exp(-np.arange(half) * np.log(10000.0) / (half - 1))
            angle = np.abs(1000.0 * np.asarray(w)[:, None] * freqs)
            bound = 1e-6 + 2.4e-7 * np.concatenate([angle, angle], 1)
            if dim % 2:
                bound = np.pad(bound, ((0, 0), (0, 1)), constant_values=1e-6)
            assert np.all(np.abs(ours - ref) <= bound), (w, dim, np.abs(ours - ref).max())
    with pytest.raises(ValueError, match="dim"):
        consistency.guidance_embedding(jnp.zeros(2), 3)
    with pytest.raises(ValueError, match="w must be 1-D"):
        consistency.guidance_embedding(jnp.zeros((2, 1)), 8)


# ---------------------------------------------------------------------------------------------
# Timesteps


def test_origin_timesteps():
    np.testing.assert_array_equal(consistency.lcm_origin_timesteps(), np.arange(1, 51) * 20 - 1)
    np.testing.assert_array_equal(consistency.lcm_origin_timesteps(1000, 30)[-2:], [956, 989])
    assert consistency.lcm_origin_timesteps().dtype == np.int64
    with pytest.raises(ValueError, match="origin_steps"):
        consistency.lcm_origin_timesteps(100, 101)


def reference(config, num_steps, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.LCMScheduler.from_config(config)
        ref.set_timesteps(num_steps, **kwargs)
    return ref


def test_lcm_timesteps_are_set_timesteps():
    np.testing.assert_array_equal(consistency.lcm_timesteps(1000, 4), [259, 499, 759, 999])
    for num_timesteps, origin in ((1000, 50), (1000, 30), (1000, 1000), (100, 7), (50, 50)):
        config = {"num_train_timesteps": num_timesteps, "original_inference_steps": origin}
        for num_steps in sorted({1, 2, 3, 4, 8, 13, origin // 2 or 1, origin}):
            if num_steps > origin:
                continue
            ours = consistency.lcm_timesteps(num_timesteps, num_steps, origin)
            ref = reference(config, num_steps).timesteps.numpy()
            assert ours.dtype == np.int64
            np.testing.assert_array_equal(ours, ref[::-1], err_msg=f"{config} K={num_steps}")


def test_lcm_timesteps_refuse_what_diffusers_refuses():
    config = {"num_train_timesteps": 1000, "original_inference_steps": 50}
    with pytest.raises(ValueError, match="num_inference_steps"):
        reference(config, 51)
    for args, match in (
        ((1000, 51), "num_steps=51 must be <= 50"),
        ((1000, 0), "num_steps"),
        ((1000, 2.0), "num_steps"),
        ((1000, 4, 1001), "origin_steps=1001 must be <= 1000"),
        ((1000, 4, 0), "origin_steps"),
        ((0, 1, 1), "num_timesteps"),
    ):
        with pytest.raises(ValueError, match=match):
            consistency.lcm_timesteps(*args)


# ---------------------------------------------------------------------------------------------
# The LCM step against LCMScheduler.step


def fake_net(x, t):
    """A fixed smooth function of (x, t), read as ε, v or x_0."""
    t = jnp.asarray(t, jnp.float32).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.3 * x + 0.1 * jnp.sin(2.0 * x + t / 100.0)


PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
CONFIGS = {
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
}


def loops(schedule_name, prediction_type, num_steps, seed=0):
    """diffusers' loop and, at every step, the project's step from the same x, output and noise
    on diffusers' ᾱ; then the project's own loop (its ᾱ) with the same noise. Returns
    (max per-step error / max|x|, final error / max|x|)."""
    config = {**CONFIGS[schedule_name], "prediction_type": prediction_type}
    ref = reference(config, num_steps)
    steps = ref.timesteps.numpy()[::-1].astype(np.int64)  # ascending
    np.testing.assert_array_equal(steps, consistency.lcm_timesteps(1000, num_steps))
    abar = ref.alphas_cumprod.numpy().astype(np.float64)[steps]
    theirs = sampling.schedule_from_plan(
        sampling.SamplingPlan(steps.astype(np.float64), abar, np.append(1.0, abar[:-1]))
    )
    sched = ds.schedule_from_scheduler_config(config, sampler="lcm")
    ours_sub = sampling.respace(sched, steps)
    prediction = PREDICTIONS[prediction_type]
    generator = torch.Generator().manual_seed(seed)
    replay = torch.Generator().manual_seed(seed)
    x_ref, x_ours = torch.from_numpy(X_T), jnp.asarray(X_T)
    step_err = 0.0
    for k, t in enumerate(ref.timesteps):
        i = num_steps - 1 - k
        t_batch = jnp.full((SHAPE[0],), int(t), jnp.int32)
        if k < num_steps - 1:  # LCMScheduler draws no noise at its last step
            noise = jnp.asarray(torch.randn(SHAPE, generator=replay, dtype=torch.float32).numpy())
        else:
            noise = jnp.full(SHAPE, jnp.nan)  # must not be used
        x_np = jnp.asarray(x_ref.numpy())
        out = fake_net(x_np, t_batch)
        mine, _ = sampling.lcm_step(theirs, out, x_np, i, t_batch, noise, prediction=prediction)
        x_ref = ref.step(torch.from_numpy(np.array(out)), t, x_ref, generator=generator)
        x_ref = x_ref.prev_sample
        scale = float(np.abs(x_ref.numpy()).max())
        step_err = max(step_err, float(np.abs(np.asarray(mine) - x_ref.numpy()).max()) / scale)
        out = fake_net(x_ours, t_batch)
        x_ours, _ = sampling.CONSISTENCY_SAMPLERS["lcm"](
            ours_sub, out, x_ours, i, lambda: noise, None, 0.0, t_batch, prediction=prediction
        )
    final = x_ref.numpy()
    return step_err, float(np.abs(np.asarray(x_ours) - final).max() / np.abs(final).max())


@pytest.mark.parametrize("schedule_name", CONFIGS)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_lcm_step_is_lcm_scheduler_step(schedule_name, prediction_type):
    for num_steps in (1, 2, 4, 8):
        step_err, loop_err = loops(schedule_name, prediction_type, num_steps)
        msg = f"{schedule_name} {prediction_type} K={num_steps}: {step_err:.2g} {loop_err:.2g}"
        print(msg)
        assert step_err < 1e-6, msg
        assert loop_err < 1e-5, msg


@functools.cache
def sample_fn(num_steps, **kwargs):
    """A jitted (key, x_T) -> LCM samples of ``fake_net`` on the SD schedule."""
    sched = ds.schedule_from_scheduler_config(CONFIGS["scaled_linear"])
    return jax.jit(
        lambda key, x_T: sampling.sample(
            fake_net, sched, x_T.shape, key, sampler="lcm", num_steps=num_steps, x_T=x_T, **kwargs
        )
    )


def test_sample_runs_the_lcm_steps_in_scan():
    """``sample`` with sampler 'lcm' is the eager loop over lcm_timesteps(T, K) with the noise of
    step i from fold_in(split(key)[1], i); one step needs no noise and is diffusers' loop."""
    key = jax.random.key(7)
    x_T = jnp.asarray(X_T)
    sched = ds.schedule_from_scheduler_config(CONFIGS["scaled_linear"])
    steps = consistency.lcm_timesteps(1000, 4)
    sub = sampling.respace(sched, steps)
    key_steps = jax.random.split(key)[1]
    x = x_T
    for i in range(3, -1, -1):
        t = jnp.full((SHAPE[0],), steps[i], jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(key_steps, i), SHAPE)
        x, _ = sampling.lcm_step(sub, fake_net(x, t), x, i, t, noise)
    np.testing.assert_allclose(sample_fn(4)(key, x_T), x, rtol=1e-5, atol=1e-5)
    # explicit timesteps are taken as they are; spacing is ignored
    explicit = sampling.sample(
        fake_net, sched, SHAPE, key, sampler="lcm", timesteps=steps, x_T=x_T, spacing="uniform"
    )
    np.testing.assert_allclose(explicit, x, rtol=1e-5, atol=1e-5)
    # one step: deterministic, diffusers' loop
    ref = reference(CONFIGS["scaled_linear"], 1)
    t = ref.timesteps[0]
    out = torch.from_numpy(np.array(fake_net(x_T, jnp.full((SHAPE[0],), int(t)))))
    expected = ref.step(out, t, torch.from_numpy(X_T)).prev_sample.numpy()
    np.testing.assert_allclose(sample_fn(1)(key, x_T), expected, rtol=2e-5, atol=2e-5)
    # timestep_scaling reaches the step
    other = sample_fn(1, timestep_scaling=0.01)(key, x_T)
    assert not np.allclose(other, expected, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Gaussian data: the exact consistency function

SCHED = schedules.schedule_from_config("linear", 1000)
ABAR = np.asarray(SCHED.alphas_cumprod, np.float64)
MU = np.array([1.0, -2.0, 0.5])
STD = np.array([0.5, 1.5, 0.2])
NUM_SAMPLES = 20_000


def flow_map(x, abar):
    """The exact consistency function of the VP probability-flow ODE for N(μ, diag s²)."""
    return MU + STD * (x - np.sqrt(abar) * MU) / np.sqrt(abar * STD**2 + 1.0 - abar)


def exact_x0_model(x, t):
    """The x̂_0 for which c_skip x + c_out x̂_0 = f(x, t) (prediction 'x0'); t ≥ 1 (c_out > 0)."""
    abar = SCHED.alphas_cumprod[t][:, None]  # (B, 1)
    mu, std = jnp.asarray(MU, jnp.float32), jnp.asarray(STD, jnp.float32)
    f = mu + std * (x - jnp.sqrt(abar) * mu) / jnp.sqrt(abar * std**2 + 1.0 - abar)
    c_skip, c_out = consistency.boundary_scalings(t)
    return (f - c_skip[:, None] * x) / c_out[:, None]


@functools.cache
def gaussian_run(num_steps):
    """A jitted (key, x_T) -> (samples, trajectory) with the exact model."""
    return jax.jit(
        lambda key, x_T: sampling.sample(
            exact_x0_model,
            SCHED,
            x_T.shape,
            key,
            sampler="lcm",
            num_steps=num_steps,
            prediction="x0",
            x_T=x_T,
            return_trajectory=True,
        )
    )


Z = np.asarray(jax.random.normal(jax.random.key(11), (NUM_SAMPLES, 3)), np.float64)


def marginal_x_T():
    abar = ABAR[-1]
    return np.sqrt(abar) * MU + np.sqrt(abar * STD**2 + 1.0 - abar) * Z


def assert_standard(white, mean_bias=0.0, std_bias=0.0):
    """Whitened samples (n, D) are N(mean_bias, (1 + std_bias)²): within 5 standard errors
    (1/√n for the mean, 1/√(2n) for the std: 0.035 and 0.025 at n = 20000)."""
    n = white.shape[0]
    mean_err = np.abs(white.mean(0) - mean_bias)
    std_err = np.abs(white.std(0) - (1.0 + std_bias))
    assert np.all(mean_err < 5 / np.sqrt(n)), f"whitened mean error {mean_err}"
    assert np.all(std_err < 5 / np.sqrt(2 * n)), f"whitened std error {std_err}"


def test_one_step_from_the_exact_marginal_is_exact():
    """f(x_T, T) = μ + s z pointwise (to 5e-6; measured 8e-7 in float32), hence N(μ, s²)."""
    out, _ = gaussian_run(1)(jax.random.key(0), jnp.asarray(marginal_x_T(), jnp.float32))
    out = np.asarray(out, np.float64)
    np.testing.assert_allclose(out, MU + STD * Z, atol=5e-6)
    np.testing.assert_allclose(out, flow_map(marginal_x_T(), ABAR[-1]), atol=5e-6)
    assert_standard((out - MU) / STD)


@pytest.mark.parametrize("num_steps", [2, 4])
def test_multistep_lcm_keeps_the_exact_marginals(num_steps):
    """Every visited x_τ is N(√ᾱ_τ μ, ᾱ_τ s² + 1 - ᾱ_τ), and the samples N(μ, s²)."""
    out, path = gaussian_run(num_steps)(jax.random.key(1), jnp.asarray(marginal_x_T(), jnp.float32))
    steps = consistency.lcm_timesteps(1000, num_steps)[::-1]  # the order visited
    for k, tau in enumerate(steps):
        x = np.asarray(path[k], np.float64)
        abar = ABAR[tau]
        assert_standard((x - np.sqrt(abar) * MU) / np.sqrt(abar * STD**2 + 1.0 - abar))
    assert_standard((np.asarray(out, np.float64) - MU) / STD)


def test_one_step_from_unit_noise_is_off_by_the_terminal_signal():
    """From x_T ~ N(0, I) instead of N(√ᾱ_T μ, ᾱ_T s² + 1 - ᾱ_T) one step gives
    μ + g (z - √ᾱ_T μ), g = s/√(ᾱ_T s² + 1 - ᾱ_T): whitened, the mean is off by
    -g √ᾱ_T μ/s (≤ 0.013, O(√ᾱ_T), ᾱ_T = 4e-5) and the std by g/s - 1 = O(ᾱ_T) (≤ 4e-5)."""
    out, _ = gaussian_run(1)(jax.random.key(0), jnp.asarray(Z, jnp.float32))
    out = np.asarray(out, np.float64)
    abar = ABAR[-1]
    g = STD / np.sqrt(abar * STD**2 + 1.0 - abar)
    np.testing.assert_allclose(out, flow_map(Z, abar), atol=5e-6)
    # pointwise: |out - (μ + s z)| ≤ g √ᾱ_T |μ| + |g - s| |z|, with |g - s| ≤ s ᾱ_T |s² - 1|
    gap = np.abs(out - (MU + STD * Z))
    bound = STD * (np.sqrt(abar) * np.abs(MU) + abar * np.abs(STD**2 - 1) * np.abs(Z))
    assert np.all(gap <= 1.001 * bound + 5e-6)
    assert np.max(np.abs(g / STD - 1)) < 4e-5
    assert np.max(np.abs(g * np.sqrt(abar) * MU / STD)) < 0.013
    assert_standard((out - MU) / STD, mean_bias=-g * np.sqrt(abar) * MU / STD, std_bias=g / STD - 1)


# ---------------------------------------------------------------------------------------------
# Bad input


def _never_called(x, t):
    raise AssertionError("model_fn must not be traced for bad arguments")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sampler="lcm"), "sampler='lcm' needs num_steps"),
        (dict(sampler="lcm", num_steps=51), "num_steps=51 must be <= 50"),
        (dict(sampler="lcm", num_steps=4, eta=0.5), "eta"),
        (dict(sampler="lcm", num_steps=4, sigma_data=0.0), "sigma_data"),
        (dict(sampler="lcm", num_steps=4, timestep_scaling=float("inf")), "timestep_scaling"),
        (dict(sampler="lcm", num_steps=4, timestep_scaling=True), "timestep_scaling"),
        (dict(sampler="ddim", num_steps=4, timestep_scaling=5.0), "only to sampler='lcm'"),
        (dict(sampler="lcm", num_steps=4, timesteps=[1, 2]), "num_steps or timesteps"),
    ],
)
def test_bad_arguments_raise_before_tracing(kwargs, match):
    sched = schedules.schedule_from_config("linear", 1000)
    with pytest.raises(ValueError, match=match):
        sampling.sample(_never_called, sched, (4, 2), jax.random.key(0), **kwargs)
