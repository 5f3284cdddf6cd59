"""A diffusers scheduler config -> schedule, prediction and plan, against the real schedulers.

For each of DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler and
EulerAncestralDiscreteScheduler built with ``from_config`` (so with that class's defaults for
the keys a config lacks) and ``set_timesteps(K)``: the plan's timesteps are the scheduler's
(exactly: the Euler classes' float32 timesteps are held exactly in float64), its ᾱ are the
scheduler's to 2e-6 relative (diffusers forms β and ᾱ in float32, the project in float64),
and a whole sampling loop with a fixed analytic fake network ends where diffusers' loop ends
to 1e-5 · (1 + |x|) (measured: 2e-6; float32 rounding of two differently ordered computations
and of ᾱ; leaving out the Euler classes' initial σ_max scaling would miss by 6e-3).
Euler-ancestral is fed diffusers' own noise: the draws of a torch generator replayed with the
same seed. The stepping runs eagerly (no compilation per case); ``sampling.sample`` with a plan
is checked on a few cases, a handful of compilations.
"""

import functools
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusax import sampling
from diffusax.convert import diffusers_scheduler as ds

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
diffusers.utils.logging.set_verbosity_error()  # from_config's "PNDMScheduler config" notice

CLASSES = {
    "ddim": diffusers.DDIMScheduler,
    "dpm++2m": diffusers.DPMSolverMultistepScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "euler_a": diffusers.EulerAncestralDiscreteScheduler,
}
# The scheduler/scheduler_config.json of runwayml/stable-diffusion-v1-5.
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
CONFIGS = {
    "sd15": SD15,  # DDIM: leading + 1 (its default); the others: linspace (theirs)
    "trailing": {**SD15, "timestep_spacing": "trailing"},
    "linspace": {**SD15, "timestep_spacing": "linspace"},
    "leading_offset0_alpha1": {
        **SD15,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "set_alpha_to_one": True,
    },
    "v_linear": {  # an SD 2-style v-prediction config on the DDPM schedule, DDIM's class
        "_class_name": "DDIMScheduler",
        "beta_schedule": "linear",
        "prediction_type": "v_prediction",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    },
}
NUM_STEPS = (1, 4, 7, 50)
SHAPE = (3, 4)
X_T = np.array(jax.random.normal(jax.random.key(0), SHAPE))  # the unit noise, "latents"


def fake_net(x, t):
    """A fixed smooth function of (x, t) read as ε, v or x_0; t may be fractional."""
    t = jnp.asarray(t, jnp.float32).reshape(-1, *([1] * (x.ndim - 1)))
    return jnp.tanh(x) * (0.6 + 0.4 * t / 1000.0) + 0.2 * jnp.sin(2.0 * x + t / 100.0)


def torch_net(x, t):
    """``fake_net`` on torch tensors (through the same jnp code)."""
    t = np.full((x.shape[0],), float(t), np.float32)
    return torch.from_numpy(np.array(fake_net(jnp.asarray(x.numpy()), jnp.asarray(t))))


def reference(sampler, config, num_steps):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = CLASSES[sampler].from_config(config)
        ref.set_timesteps(num_steps)
    return ref


def diffusers_loop(sampler, config, num_steps, seed=0, eta=0.0):
    """What a diffusers pipeline does: latents · init_noise_sigma, then scale_model_input and
    step at each timestep; returns (final sample, the noise euler_a drew at each step)."""
    ref = reference(sampler, config, num_steps)
    x = torch.from_numpy(X_T) * ref.init_noise_sigma
    generator = torch.Generator().manual_seed(seed)
    replay = torch.Generator().manual_seed(seed)
    noises, kwargs = [], {}
    for k, t in enumerate(ref.timesteps):
        out = torch_net(ref.scale_model_input(x, t), t)
        if sampler == "euler_a":
            kwargs = dict(generator=generator)
            # randn_tensor draws torch.randn(shape, generator) on the CPU: the same draw
            noises.append(torch.randn(out.shape, generator=replay, dtype=torch.float32).numpy())
        if sampler == "ddim" and eta > 0:
            z = np.array(jax.random.normal(jax.random.key(100 + k), SHAPE))
            kwargs = dict(eta=eta, variance_noise=torch.from_numpy(z))
            noises.append(z)
        x = ref.step(out, t, x, **kwargs).prev_sample
    return x.numpy(), noises[::-1]  # noises by the plan's index i = K-1 .. 0


def our_loop(sampler, plan, prediction, noises=None, eta=0.0):
    """The plan stepped eagerly with the project's step functions (what ``sample`` scans)."""
    sub = sampling.schedule_from_plan(plan)
    x = plan.init_noise_scale * jnp.asarray(X_T)
    x0_prev = jnp.zeros_like(x)
    num = len(plan.timesteps)
    for i in range(num - 1, -1, -1):
        out = fake_net(x, jnp.full((SHAPE[0],), plan.timesteps[i], jnp.float32))
        noise = (lambda: jnp.asarray(noises[i])) if noises else (lambda: jnp.zeros_like(x))
        x, x0_prev = sampling.SAMPLERS[sampler](
            sub, out, x, i, noise, x0_prev, eta, prediction=prediction
        )
    return np.asarray(x)


def plan_for(sampler, config, num_steps):
    sched = ds.schedule_from_scheduler_config(config)
    return ds.plan_from_scheduler_config(sched, config, sampler, num_steps)


def assert_close_samples(ours, ref, err_msg=""):
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5, err_msg=err_msg)


# ---------------------------------------------------------------------------------------------
# Schedule and prediction


@pytest.mark.parametrize(
    "config",
    [
        SD15,
        {"beta_schedule": "linear"},
        {},  # every default: linear, 1e-4 .. 0.02, T = 1000
        {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 500},
        {"trained_betas": list(np.linspace(1e-3, 0.05, 200)), "num_train_timesteps": 200},
    ],
)
def test_schedule_is_diffusers(config):
    """β to float32 rounding (squaredcos_cap_v2 is betas_for_alpha_bar = cosine_betas) and ᾱ
    to 2e-6 relative (diffusers' float32 cumprod; the project's is float64), 2e-5 for the
    cosine schedule, whose last β is clipped to 0.999: float32 keeps 1 - β to ~1e-5 only."""
    sched = ds.schedule_from_scheduler_config(config)
    ref = diffusers.DDIMScheduler.from_config(config)
    np.testing.assert_allclose(sched.betas, ref.betas.numpy(), rtol=3e-7)
    rtol = 2e-5 if config.get("beta_schedule") == "squaredcos_cap_v2" else 2e-6
    np.testing.assert_allclose(sched.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=rtol)


def test_prediction_types():
    assert ds.prediction_from_scheduler_config(SD15) == "eps"  # absent: epsilon
    for value, ours in (("epsilon", "eps"), ("v_prediction", "v"), ("sample", "x0")):
        assert ds.prediction_from_scheduler_config({"prediction_type": value}) == ours
    with pytest.raises(ValueError, match="prediction_type='flow_prediction'"):
        ds.prediction_from_scheduler_config({"prediction_type": "flow_prediction"})


# ---------------------------------------------------------------------------------------------
# Plans: timesteps, ᾱ, initial noise


@pytest.mark.parametrize("sampler", CLASSES)
@pytest.mark.parametrize("config_name", CONFIGS)
def test_plan_is_set_timesteps(sampler, config_name):
    config = CONFIGS[config_name]
    for num_steps in (*NUM_STEPS, 333, 500):
        plan = plan_for(sampler, config, num_steps)
        ref = reference(sampler, config, num_steps)
        msg = f"{sampler} {config_name} K={num_steps}"
        np.testing.assert_array_equal(
            plan.timesteps, ref.timesteps.numpy().astype(np.float64)[::-1], err_msg=msg
        )
        if sampler == "ddim":
            abar = ref.alphas_cumprod.numpy()
            steps = ref.timesteps.numpy()
            prev = steps - 1000 // num_steps
            expected = abar[steps], np.where(prev >= 0, abar[prev], ref.final_alpha_cumprod)
        else:  # the scheduler's σ (float32), ᾱ = 1/(1+σ²); the last step lands on σ = 0
            abar = 1.0 / (1.0 + ref.sigmas.numpy().astype(np.float64) ** 2)
            expected = abar[:-1], abar[1:]
        np.testing.assert_allclose(plan.alphas_cumprod[::-1], expected[0], rtol=2e-6, err_msg=msg)
        np.testing.assert_allclose(
            plan.alphas_cumprod_prev[::-1], expected[1], rtol=2e-6, err_msg=msg
        )
        # The Euler classes' init_noise_sigma is the std of x_σ: √ᾱ_max times it in our units.
        # diffusers' float32 σ = √((1-ᾱ)/ᾱ) keeps 1 - ᾱ to ~6e-8 only (K = 1 "linspace"
        # starts at t = 0, 1 - ᾱ ~ 1e-4), whence the tolerance.
        init, abar_max = float(ref.init_noise_sigma), plan.alphas_cumprod[-1]
        if sampler in ("euler", "euler_a"):
            init *= np.sqrt(abar_max)
        rel = 2e-6 + 6e-8 / (1.0 - abar_max)
        assert plan.init_noise_scale == pytest.approx(init, rel=rel), msg


def test_sd15_plans_spell_out():
    """The SD 1.5 folder's plans by hand: what each class's defaults make of the same file."""
    ddim = plan_for("ddim", SD15, 4)  # leading, offset 1, set_alpha_to_one false
    np.testing.assert_array_equal(ddim.timesteps, [1, 251, 501, 751])
    abar = np.cumprod(1 - np.asarray(ds.schedule_from_scheduler_config(SD15).betas, np.float64))
    np.testing.assert_allclose(ddim.alphas_cumprod_prev, abar[[0, 1, 251, 501]], rtol=1e-6)
    euler = plan_for("euler", SD15, 4)  # linspace: fractional, offset ignored
    np.testing.assert_allclose(euler.timesteps, [0, 333, 666, 999], atol=0)
    assert plan_for("euler", SD15, 7).timesteps[1] == np.float32(999 / 6)  # 166.5
    dpm = plan_for("dpm++2m", SD15, 4)  # linspace over K+1 points, t = 0 dropped
    np.testing.assert_array_equal(dpm.timesteps, [250, 500, 749, 999])
    assert dpm.alphas_cumprod_prev[0] == 1.0 and ddim.init_noise_scale == 1.0
    # DDIM trailing with T/K not an integer: prev_t = t - ⌊T/K⌋ is not the next visited step,
    # and the chain ends at ᾱ_0 (prev_t = 142 - 142 = 0), not at a clean sample.
    trailing = plan_for("ddim", CONFIGS["trailing"], 7)
    np.testing.assert_array_equal(trailing.timesteps, [142, 285, 428, 570, 713, 856, 999])
    np.testing.assert_allclose(trailing.alphas_cumprod_prev[:2], abar[[0, 143]], rtol=1e-6)


def test_trailing_counts_that_diffusers_gets_wrong_are_refused():
    """np.arange(1000, 0, -1000/61) has 62 entries: diffusers then visits t = -1 (ᾱ_999)."""
    assert len(reference("ddim", CONFIGS["trailing"], 61).timesteps) == 62
    with pytest.raises(ValueError, match="num_steps=61 with timestep_spacing='trailing'"):
        plan_for("euler", CONFIGS["trailing"], 61)
    with pytest.raises(ValueError, match="steps_offset=1"):  # leading + 1 reaches t = 1000
        plan_for("ddim", SD15, 1000)


# ---------------------------------------------------------------------------------------------
# Whole sampling loops


@pytest.mark.parametrize("sampler", CLASSES)
@pytest.mark.parametrize("config_name", CONFIGS)
def test_sampling_loop_is_diffusers(sampler, config_name):
    config = CONFIGS[config_name]
    prediction = ds.prediction_from_scheduler_config(config)
    for num_steps in NUM_STEPS:
        ref, noises = diffusers_loop(sampler, config, num_steps)
        ours = our_loop(sampler, plan_for(sampler, config, num_steps), prediction, noises)
        assert_close_samples(ours, ref, f"{sampler} {config_name} K={num_steps}")


def test_x0_prediction_and_ddim_with_noise():
    """prediction_type "sample" (x_0) for the classes that have it; DDIM with η = 1 and the
    noise passed to diffusers as variance_noise."""
    config = {**SD15, "prediction_type": "sample"}
    for sampler in ("ddim", "dpm++2m", "euler"):
        ref, _ = diffusers_loop(sampler, config, 7)
        assert_close_samples(our_loop(sampler, plan_for(sampler, config, 7), "x0"), ref, sampler)
    for config_name in ("sd15", "trailing"):
        ref, noises = diffusers_loop("ddim", CONFIGS[config_name], 7, eta=1.0)
        plan = plan_for("ddim", CONFIGS[config_name], 7)
        assert_close_samples(our_loop("ddim", plan, "eps", noises, eta=1.0), ref, config_name)


# ---------------------------------------------------------------------------------------------
# sample(..., plan=...): a handful of compilations


@functools.cache
def run(sampler, plan_sampler, eta=0.0):
    """(sample() with the SD 1.5 7-step plan of ``plan_sampler``, the dtypes of t the network
    was traced with)."""
    sched = ds.schedule_from_scheduler_config(SD15)
    plan = ds.plan_from_scheduler_config(sched, SD15, plan_sampler, 7)
    seen = []

    def net(x, t):
        seen.append(t.dtype)
        return fake_net(x, t)

    out = np.asarray(
        sampling.sample(
            net,
            sched,
            SHAPE,
            jax.random.key(3),
            sampler=sampler,
            plan=plan,
            eta=eta,
            x_T=jnp.asarray(X_T),
        )
    )
    return out, tuple(seen)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m", "euler"])
def test_sample_with_a_plan_is_diffusers(sampler):
    out, seen = run(sampler, sampler)
    ref, _ = diffusers_loop(sampler, SD15, 7)
    assert_close_samples(out, ref, sampler)
    # Euler's linspace timesteps are fractional (999/6 = 166.5): the network sees float32 t
    assert seen == (jnp.dtype(jnp.float32 if sampler == "euler" else jnp.int32),)


def test_euler_is_ddim_eta0_and_euler_a_is_ddim_eta1():
    """On the same plan (fractional Euler timesteps), the same noise keys for the ancestral pair."""
    euler, ddim = run("euler", "euler")[0], run("ddim", "euler")[0]
    np.testing.assert_allclose(euler, ddim, rtol=1e-5, atol=1e-5)
    ancestral, ddim1 = run("euler_a", "euler")[0], run("ddim", "euler", eta=1.0)[0]
    np.testing.assert_allclose(ancestral, ddim1, rtol=1e-5, atol=1e-5)
    # and sample's euler_a is the eager loop fed the noise of step i: fold_in(split(key)[1], i)
    key_steps = jax.random.split(jax.random.key(3))[1]
    noises = [jax.random.normal(jax.random.fold_in(key_steps, i), SHAPE) for i in range(7)]
    eager = our_loop("euler_a", plan_for("euler_a", SD15, 7), "eps", noises)
    np.testing.assert_allclose(ancestral, eager, rtol=1e-5, atol=1e-5)


def test_euler_steps_equal_ddim_steps():
    """One step each, also for x_0- and v-prediction and a final ᾱ < 1 (DDIM's plan)."""
    plan = plan_for("ddim", SD15, 7)
    sub = sampling.schedule_from_plan(plan)
    x = jnp.asarray(X_T)
    z = jax.random.normal(jax.random.key(5), SHAPE)
    out = fake_net(x, jnp.full((3,), 500.0))
    for prediction in ("eps", "x0", "v"):
        for i in (6, 3, 0):
            euler, _ = sampling.euler_step(sub, out, x, i, prediction=prediction)
            ddim, _ = sampling.ddim_step(sub, out, x, i, z, eta=0.0, prediction=prediction)
            np.testing.assert_allclose(euler, ddim, rtol=1e-5, atol=1e-5)
            ancestral, _ = sampling.euler_ancestral_step(sub, out, x, i, z, prediction=prediction)
            ddim1, _ = sampling.ddim_step(sub, out, x, i, z, eta=1.0, prediction=prediction)
            np.testing.assert_allclose(ancestral, ddim1, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "edit, sampler, match",
    [
        ({"rescale_betas_zero_snr": True}, "ddim", "rescale_betas_zero_snr=True"),
        ({"beta_schedule": "sigmoid"}, "ddim", "beta_schedule='sigmoid'"),
        ({"timestep_spacing": "karras"}, "euler", "timestep_spacing='karras'"),
        ({"num_train_timesteps": 0}, "ddim", "num_train_timesteps=0"),
        ({"trained_betas": [0.1, 0.2]}, "ddim", "trained_betas"),
        ({"beta_start": -1.0}, "ddim", "beta_start=-1.0"),
        ({"thresholding": True}, "ddim", "thresholding=True"),
        ({"clip_sample": True}, "ddim", "clip_sample=True"),
        ({"clip_sample": None}, "euler", None),  # Euler has no clip_sample: ignored
        ({"thresholding": True}, "dpm++2m", "thresholding=True"),
        ({"algorithm_type": "sde-dpmsolver++"}, "dpm++2m", "algorithm_type='sde-dpmsolver++'"),
        ({"solver_order": 3}, "dpm++2m", "solver_order=3"),
        ({"solver_order": 3}, "euler", None),  # a DPM key means nothing to Euler
        ({"solver_type": "heun"}, "dpm++2m", "solver_type='heun'"),
        ({"final_sigmas_type": "sigma_min"}, "dpm++2m", "final_sigmas_type='sigma_min'"),
        ({"final_sigmas_type": "sigma_min"}, "euler", "final_sigmas_type='sigma_min'"),
        ({"use_karras_sigmas": True}, "dpm++2m", "use_karras_sigmas=True"),
        ({"use_karras_sigmas": True}, "euler", "use_karras_sigmas=True"),
        ({"use_lu_lambdas": True}, "dpm++2m", "use_lu_lambdas=True"),
        ({"interpolation_type": "log_linear"}, "euler", "interpolation_type='log_linear'"),
        (
            {"timestep_type": "continuous", "prediction_type": "v_prediction"},
            "euler",
            "timestep_type='continuous'",
        ),
        ({"prediction_type": "sample"}, "euler_a", "prediction_type='sample'"),
        ({"prediction_type": "flow_prediction"}, "euler", "prediction_type"),
        ({"steps_offset": -1}, "ddim", "steps_offset=-1"),
    ],
)
def test_bad_config_names_the_field(edit, sampler, match):
    config = {**SD15, **edit}
    if match is None:
        plan_for(sampler, config, 4)
        return
    with pytest.raises(ValueError, match=re.escape(match)):
        plan_for(sampler, config, 4)


def test_ddim_clip_sample_defaults_to_true():
    """A config without clip_sample clips in DDIMScheduler: refused, not silently unclipped."""
    config = {k: v for k, v in SD15.items() if k != "clip_sample"}
    assert reference("ddim", config, 4).config.clip_sample is True
    with pytest.raises(ValueError, match="clip_sample=True"):
        plan_for("ddim", config, 4)
    plan_for("dpm++2m", config, 4)  # DPM has no such key


def test_bad_arguments():
    sched = ds.schedule_from_scheduler_config(SD15)
    for num_steps in (0, 1001, 2.0):
        with pytest.raises(ValueError, match="num_steps"):
            ds.plan_from_scheduler_config(sched, SD15, "ddim", num_steps)
    with pytest.raises(ValueError, match="sampler 'ddpm'"):
        ds.plan_from_scheduler_config(sched, SD15, "ddpm", 4)
    with pytest.raises(ValueError, match="num_train_timesteps=500"):
        ds.plan_from_scheduler_config(sched, {**SD15, "num_train_timesteps": 500}, "ddim", 4)
    plan = ds.plan_from_scheduler_config(sched, SD15, "ddim", 4)
    never = lambda x, t: pytest.fail("traced")
    with pytest.raises(ValueError, match="plan or num_steps"):
        sampling.sample(never, sched, SHAPE, jax.random.key(0), plan=plan, num_steps=4)
    bad_plans = {
        "plan.timesteps must be strictly": plan._replace(timesteps=plan.timesteps[::-1]),
        "plan.alphas_cumprod has shape": plan._replace(alphas_cumprod=plan.alphas_cumprod[:2]),
        r"plan.alphas_cumprod_prev must lie": plan._replace(
            alphas_cumprod_prev=plan.alphas_cumprod / 2
        ),
        "plan.init_noise_scale": plan._replace(init_noise_scale=0.0),
    }
    for match, bad in bad_plans.items():
        with pytest.raises(ValueError, match=match):
            sampling.sample(never, sched, SHAPE, jax.random.key(0), sampler="ddim", plan=bad)
    short = ds.schedule_from_scheduler_config({**SD15, "num_train_timesteps": 500})
    with pytest.raises(ValueError, match=r"plan.timesteps must lie in \[0, 499\]"):
        sampling.sample(never, short, SHAPE, jax.random.key(0), sampler="ddim", plan=plan)


def test_schedule_from_plan_of_a_chain_is_respace():
    """A plan whose steps land on the previous visited ᾱ (and 1 at the end) is ``respace``."""
    sched = ds.schedule_from_scheduler_config(SD15)
    steps = np.array([0, 10, 400, 999])
    abar = np.cumprod(1.0 - np.asarray(sched.betas, np.float64))[steps]
    plan = sampling.SamplingPlan(steps.astype(np.float64), abar, np.append(1.0, abar[:-1]))
    for field, a, b in zip(
        sched._fields, sampling.schedule_from_plan(plan), sampling.respace(sched, steps)
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=field)


# ---------------------------------------------------------------------------------------------
# LCM: LCMScheduler.from_config of a pipeline folder's config (an SD folder names PNDM)


def lcm_reference(config, num_steps):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.LCMScheduler.from_config(config)
        ref.set_timesteps(num_steps)
    return ref


def lcm_plan(config, num_steps):
    sched = ds.schedule_from_scheduler_config(config, sampler="lcm")
    return ds.plan_from_scheduler_config(sched, config, "lcm", num_steps)


LCM_CONFIGS = {
    "sd15": SD15,  # steps_offset 1 and set_alpha_to_one false: LCMScheduler never reads them
    "sd15_trailing": {**SD15, "timestep_spacing": "trailing"},  # nor timestep_spacing
    "lcm_dreamshaper": {  # an LCM folder's own LCMScheduler config
        **SD15,
        "_class_name": "LCMScheduler",
        "original_inference_steps": 50,
        "set_alpha_to_one": True,
        "timestep_scaling": 10.0,
        "timestep_spacing": "leading",
    },
    "origin_25_cosine_v": {
        "beta_schedule": "squaredcos_cap_v2",
        "original_inference_steps": 25,
        "prediction_type": "v_prediction",
    },
    "empty": {},  # LCMScheduler's defaults: scaled_linear 0.00085 .. 0.012, as SD
}


@pytest.mark.parametrize("config_name", LCM_CONFIGS)
def test_lcm_plan_is_set_timesteps(config_name):
    """Timesteps exactly; ᾱ at each and at the next visited timestep to 2e-6 relative (2e-5 for
    the cosine schedule's clipped last β); the β LCMScheduler builds from the same config."""
    config = LCM_CONFIGS[config_name]
    sched = ds.schedule_from_scheduler_config(config, sampler="lcm")
    rtol = 2e-5 if config.get("beta_schedule") == "squaredcos_cap_v2" else 2e-6
    for num_steps in (1, 2, 4, 8):
        plan = lcm_plan(config, num_steps)
        ref = lcm_reference(config, num_steps)
        msg = f"{config_name} K={num_steps}"
        np.testing.assert_array_equal(
            plan.timesteps, ref.timesteps.numpy().astype(np.float64)[::-1], err_msg=msg
        )
        abar = ref.alphas_cumprod.numpy()[ref.timesteps.numpy()]  # diffusers' order
        np.testing.assert_allclose(plan.alphas_cumprod[::-1], abar, rtol=rtol, err_msg=msg)
        np.testing.assert_allclose(plan.alphas_cumprod_prev[::-1][:-1], abar[1:], rtol=rtol)
        assert plan.alphas_cumprod_prev[0] == 1.0 and plan.init_noise_scale == 1.0
        assert ref.init_noise_sigma == 1.0
    np.testing.assert_allclose(sched.betas, ref.betas.numpy(), rtol=3e-7)


def test_lcm_sd15_plan_spells_out():
    np.testing.assert_array_equal(lcm_plan(SD15, 4).timesteps, [259, 499, 759, 999])
    np.testing.assert_array_equal(lcm_plan(SD15, 1).timesteps, [999])
    np.testing.assert_array_equal(
        lcm_plan({**SD15, "original_inference_steps": 4}, 2).timesteps, [499, 999]
    )
    assert ds.lcm_scalings_from_scheduler_config(SD15) == dict(
        sigma_data=0.5, timestep_scaling=10.0
    )
    scalings = ds.lcm_scalings_from_scheduler_config({**SD15, "timestep_scaling": 4})
    assert scalings == dict(sigma_data=0.5, timestep_scaling=4.0)
    assert lcm_reference({**SD15, "timestep_scaling": 4}, 1).config.timestep_scaling == 4
    # the β defaults differ from every other class's (linear 1e-4 .. 0.02)
    linear = ds.schedule_from_scheduler_config({})
    with pytest.raises(ValueError, match=r"beta_schedule=.*sampler='lcm'"):
        ds.plan_from_scheduler_config(linear, {}, "lcm", 4)
    np.testing.assert_array_equal(
        ds.schedule_from_scheduler_config(SD15).betas,
        ds.schedule_from_scheduler_config(SD15, sampler="lcm").betas,
    )


def test_lcm_sample_with_a_plan_is_diffusers():
    """One step (no noise) of ``sample`` with the SD 1.5 plan and its scalings, and diffusers'."""
    config = {**SD15, "timestep_scaling": 4.0}
    sched = ds.schedule_from_scheduler_config(config, sampler="lcm")
    plan = ds.plan_from_scheduler_config(sched, config, "lcm", 1)
    out = sampling.sample(
        fake_net,
        sched,
        SHAPE,
        jax.random.key(0),
        sampler="lcm",
        plan=plan,
        x_T=jnp.asarray(X_T),
        **ds.lcm_scalings_from_scheduler_config(config),
    )
    ref = lcm_reference(config, 1)
    t = ref.timesteps[0]
    expected = ref.step(torch_net(torch.from_numpy(X_T), t), t, torch.from_numpy(X_T))
    assert_close_samples(np.asarray(out), expected.prev_sample.numpy())


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"thresholding": True}, "thresholding=True"),
        ({"clip_sample": True}, "clip_sample=True"),
        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr=True"),
        ({"original_inference_steps": 2000}, "original_inference_steps=2000"),
        ({"original_inference_steps": 0}, "original_inference_steps=0"),
        ({"original_inference_steps": 2}, "original_inference_steps=2"),  # K = 4 > 2
        ({"timestep_scaling": -1.0}, "timestep_scaling=-1.0"),
        ({"prediction_type": "flow_prediction"}, "prediction_type"),
        ({"clip_sample": False, "set_alpha_to_one": True, "steps_offset": 0}, None),
    ],
)
def test_lcm_bad_config_names_the_field(edit, match):
    config = {**SD15, **edit}
    if match is None:
        lcm_plan(config, 4)
        return
    with pytest.raises(ValueError, match=re.escape(match)):
        lcm_plan(config, 4)
    if "timestep_scaling" in edit:
        with pytest.raises(ValueError, match=re.escape(match)):
            ds.lcm_scalings_from_scheduler_config(config)
    if edit.get("original_inference_steps") in (2000, 2):  # LCMScheduler refuses them too
        with pytest.raises(ValueError):
            lcm_reference(config, 4)
