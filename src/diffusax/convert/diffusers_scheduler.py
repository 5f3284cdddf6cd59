"""A diffusers ``scheduler/scheduler_config.json`` -> the β schedule, the prediction type and the
sampling plan that diffusers' schedulers would use (pure numpy: no torch, no diffusers).

A pipeline folder's scheduler config is read by whichever scheduler class the user builds from
it: ``DDIMScheduler.from_config(folder_config)`` takes the keys that class knows, fills the
others with *that class's* defaults, and ignores the rest (an SD 1.5 folder's config names
``PNDMScheduler``; its skip_prk_steps means nothing to DDIM). So

- ``schedule_from_scheduler_config`` builds the training schedule from the keys every class
  reads the same way (num_train_timesteps, beta_schedule, beta_start, beta_end, trained_betas,
  rescale_betas_zero_snr) and checks timestep_spacing, which each class rejects if unknown;
- ``prediction_from_scheduler_config`` maps prediction_type to ``diffusion.PREDICTIONS``;
- ``plan_from_scheduler_config(sched, config, sampler, K)`` reproduces ``set_timesteps(K)`` of
  the class behind ``sampler`` (``SCHEDULER_CLASSES``), with its defaults, as a
  ``sampling.SamplingPlan``, and rejects the values of that class's keys that would make its
  maths differ from the project's sampler;
- ``lcm_scalings_from_scheduler_config`` gives LCMScheduler's boundary scalings as
  ``sampling.sample``'s sigma_data / timestep_scaling.

LCMScheduler is the one class whose β defaults differ (scaled_linear, 0.00085..0.012, SD's):
``schedule_from_scheduler_config(config, sampler="lcm")`` applies them to a config that lacks
those keys.

Every error is a ValueError naming the field and its value. The facts below were read from
diffusers 0.42's scheduling_ddim.py, scheduling_dpmsolver_multistep.py,
scheduling_euler_discrete.py, scheduling_euler_ancestral_discrete.py and scheduling_lcm.py, and
are checked
against those classes in tests/test_diffusers_scheduler.py.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from diffusax import consistency, schedules
from diffusax.sampling import SamplingPlan
from diffusax.schedules import Schedule

# sampler -> the diffusers class whose set_timesteps / step it reproduces.
SCHEDULER_CLASSES = {
    "ddim": "DDIMScheduler",
    "dpm++2m": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "lcm": "LCMScheduler",
}
# Each class's timestep_spacing default, used when the config has no such key.
DEFAULT_SPACING = {
    "ddim": "leading",
    "dpm++2m": "linspace",
    "euler": "linspace",
    "euler_a": "linspace",
    "lcm": "leading",  # never read by LCMScheduler
}
# LCMScheduler's β defaults (every other class: linear, 1e-4 .. 0.02).
LCM_BETA_DEFAULTS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def _field(config: Mapping, key: str, value, why: str) -> ValueError:
    return ValueError(f"scheduler config field {key}={value!r}: {why}")


def _int_field(config: Mapping, key: str, default: int, minimum: int) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise _field(config, key, value, f"must be an integer >= {minimum}")
    return int(value)


def _reject_true(config: Mapping, sampler: str, keys) -> None:
    for key in keys:
        if config.get(key):
            raise _field(
                config, key, config[key], f"not supported ({SCHEDULER_CLASSES[sampler]} reads it)"
            )


def _check_spacing(config: Mapping, default: str) -> str:
    spacing = config.get("timestep_spacing", default)
    if spacing not in SPACINGS:
        raise _field(config, "timestep_spacing", spacing, f"choose one of {SPACINGS}")
    return spacing


# ---------------------------------------------------------------------------------------------
# The schedule and the prediction


def schedule_from_scheduler_config(config: Mapping, sampler: str | None = None) -> Schedule:
    """The training schedule of a diffusers scheduler config.

    ``sampler`` = "lcm" reads the config as LCMScheduler does: beta_schedule, beta_start and
    beta_end default to ``LCM_BETA_DEFAULTS`` (scaled_linear, 0.00085, 0.012) instead.

    num_train_timesteps T (default 1000); trained_betas (a list of T betas) if not null, else
    beta_schedule (default "linear") with beta_start / beta_end (defaults 1e-4 / 0.02):
    "linear" β = linspace(β_start, β_end), "scaled_linear" β = linspace(√β_start, √β_end)², and
    "squaredcos_cap_v2" = diffusers' betas_for_alpha_bar(T): β_t = min(1 - ᾱ((t+1)/T)/ᾱ(t/T),
    0.999), ᾱ(τ) = cos²((τ + 0.008)/1.008 · π/2), which is ``schedules.cosine_betas`` (Improved
    DDPM's schedule). diffusers computes β and ᾱ in float32; here they are float64, stored as
    float32 (ᾱ agrees to ~1e-6 relative). rescale_betas_zero_snr true and an unknown
    timestep_spacing raise.
    """
    if sampler == "lcm":
        config = {**LCM_BETA_DEFAULTS, **config}
    num_timesteps = _int_field(config, "num_train_timesteps", 1000, 1)
    if config.get("rescale_betas_zero_snr"):
        raise _field(
            config,
            "rescale_betas_zero_snr",
            config["rescale_betas_zero_snr"],
            "zero terminal SNR (ᾱ_T = 0) is not supported",
        )
    if "timestep_spacing" in config:
        _check_spacing(config, "leading")
    trained = config.get("trained_betas")
    if trained is not None:
        betas = np.asarray(trained, dtype=np.float64)
        if betas.shape != (num_timesteps,):
            raise _field(
                config,
                "trained_betas",
                f"<{betas.shape} array>",
                f"must be a list of num_train_timesteps={num_timesteps} betas",
            )
        if not np.all((betas > 0) & (betas <= 1)):
            raise _field(config, "trained_betas", "<list>", "every beta must lie in (0, 1]")
        return schedules.make_schedule(betas)
    name = config.get("beta_schedule", "linear")
    start, end = config.get("beta_start", 0.0001), config.get("beta_end", 0.02)
    for key, value in (("beta_start", start), ("beta_end", end)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise _field(config, key, value, "must be a number in (0, 1)")
    if name == "linear":
        betas = schedules.linear_betas(num_timesteps, start, end)
    elif name == "scaled_linear":
        betas = schedules.scaled_linear_betas(num_timesteps, start, end)
    elif name == "squaredcos_cap_v2":
        betas = schedules.cosine_betas(num_timesteps, s=0.008, max_beta=0.999)
    else:
        raise _field(config, "beta_schedule", name, f"choose one of {BETA_SCHEDULES}")
    return schedules.make_schedule(betas)


def prediction_from_scheduler_config(config: Mapping) -> str:
    """prediction_type "epsilon" (the default) -> "eps", "v_prediction" -> "v", "sample" -> "x0"."""
    value = config.get("prediction_type", "epsilon")
    if value not in PREDICTION_TYPES:
        raise _field(config, "prediction_type", value, f"choose one of {list(PREDICTION_TYPES)}")
    return PREDICTION_TYPES[value]


# ---------------------------------------------------------------------------------------------
# Each class's set_timesteps


def _ddim_timesteps(num_timesteps, num_steps, spacing, offset):
    """DDIMScheduler.set_timesteps: descending int64."""
    if spacing == "linspace":
        return np.linspace(0, num_timesteps - 1, num_steps).round()[::-1].astype(np.int64)
    if spacing == "leading":
        ratio = num_timesteps // num_steps
        return (np.arange(num_steps) * ratio).round()[::-1].astype(np.int64) + offset
    ratio = num_timesteps / num_steps  # trailing
    return np.round(np.arange(num_timesteps, 0, -ratio)).astype(np.int64) - 1


def _dpm_timesteps(num_timesteps, last, num_steps, spacing, offset):
    """DPMSolverMultistepScheduler.set_timesteps: K of K+1 points (t = 0 dropped), descending.
    ``last`` is T less the timesteps whose λ lies below lambda_min_clipped."""
    if spacing == "linspace":
        steps = np.linspace(0, last - 1, num_steps + 1).round()[::-1][:-1]
        return steps.astype(np.int64)
    if spacing == "leading":
        ratio = last // (num_steps + 1)
        steps = (np.arange(num_steps + 1) * ratio).round()[::-1][:-1]
        return steps.astype(np.int64) + offset
    ratio = num_timesteps / num_steps  # trailing
    return np.arange(last, 0, -ratio).round().astype(np.int64) - 1


def _euler_timesteps(num_timesteps, num_steps, spacing, offset):
    """Euler(Ancestral)DiscreteScheduler.set_timesteps: descending float32 (fractional for
    "linspace"), returned as float64."""
    if spacing == "linspace":
        steps = np.linspace(0, num_timesteps - 1, num_steps, dtype=np.float32)[::-1]
    elif spacing == "leading":
        ratio = num_timesteps // num_steps
        steps = (np.arange(num_steps) * ratio).round()[::-1].astype(np.float32)
        steps += np.float32(offset)
    else:  # trailing
        ratio = num_timesteps / num_steps
        steps = np.arange(num_timesteps, 0, -ratio).round().astype(np.float32)
        steps -= np.float32(1)
    return steps.astype(np.float64)


def _check_timesteps(steps, num_timesteps, num_steps, spacing, offset):
    """ValueError, naming the fields, unless ``steps`` are K distinct timesteps in [0, T-1]."""
    where = f"num_steps={num_steps} with timestep_spacing={spacing!r}"
    if len(steps) != num_steps:
        # np.arange(T, 0, -T/K) has K+1 entries for some K (T = 1000: K = 61, 103, ...): diffusers
        # then visits timestep -1, i.e. alphas_cumprod[-1], the noisiest.
        raise ValueError(
            f"{where} gives {len(steps)} timesteps in diffusers (a float rounding in its "
            f"np.arange; the last is {steps[-1]:g}): choose another num_steps"
        )
    if steps.min() < 0 or steps.max() > num_timesteps - 1:
        raise ValueError(
            f"{where} and steps_offset={offset} gives timesteps {steps.min():g}..{steps.max():g}, "
            f"outside [0, {num_timesteps - 1}]"
        )
    if np.any(np.diff(steps) >= 0):
        raise ValueError(f"{where} gives repeated timesteps: choose fewer steps")


def _check_dpm(config: Mapping) -> None:
    """The DPMSolverMultistepScheduler keys that would change its maths."""
    algorithm = config.get("algorithm_type", "dpmsolver++")
    if algorithm != "dpmsolver++":
        raise _field(config, "algorithm_type", algorithm, "only 'dpmsolver++' is supported")
    order = config.get("solver_order", 2)
    if order != 2:
        raise _field(config, "solver_order", order, "only 2 (DPM-Solver++(2M)) is supported")
    # diffusers maps the UniPC names logrho / bh1 / bh2 to midpoint.
    solver_type = config.get("solver_type", "midpoint")
    if solver_type not in ("midpoint", "logrho", "bh1", "bh2"):
        raise _field(config, "solver_type", solver_type, "only 'midpoint' is supported")
    final = config.get("final_sigmas_type", "zero")
    if final != "zero":
        raise _field(config, "final_sigmas_type", final, "only 'zero' is supported")
    _reject_true(
        config,
        "dpm++2m",
        (
            "thresholding",
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "use_lu_lambdas",
            "use_flow_sigmas",
        ),
    )
    # lower_order_final and euler_at_final only choose first order for the last step, which
    # final_sigmas_type "zero" already does; variance_type only says the output has a variance
    # half, which ``sampling.sample`` is told by var_type.


def _check_euler(config: Mapping, sampler: str) -> None:
    if sampler == "euler_a":
        if config.get("prediction_type", "epsilon") == "sample":
            raise _field(
                config, "prediction_type", "sample", "EulerAncestralDiscreteScheduler lacks it"
            )
        return  # the ancestral class has none of the keys below
    final = config.get("final_sigmas_type", "zero")
    if final != "zero":
        raise _field(config, "final_sigmas_type", final, "only 'zero' is supported")
    interpolation = config.get("interpolation_type", "linear")
    if interpolation != "linear":
        raise _field(config, "interpolation_type", interpolation, "only 'linear' is supported")
    timestep_type = config.get("timestep_type", "discrete")
    if timestep_type not in ("discrete", "continuous"):
        raise _field(config, "timestep_type", timestep_type, "choose 'discrete' or 'continuous'")
    if timestep_type == "continuous" and config.get("prediction_type") == "v_prediction":
        raise _field(
            config,
            "timestep_type",
            timestep_type,
            "with v_prediction the network is called at ¼ log σ: not supported",
        )
    _reject_true(
        config, "euler", ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
    )


def lcm_scalings_from_scheduler_config(config: Mapping) -> dict:
    """LCMScheduler's boundary-condition scalings as keyword arguments of ``sampling.sample``:
    dict(sigma_data=0.5, timestep_scaling=config's timestep_scaling, default 10.0). σ_d is no
    config field: LCMScheduler fixes it to 0.5. ValueError, naming the field, unless
    timestep_scaling is a finite number > 0."""
    value = config.get("timestep_scaling", consistency.TIMESTEP_SCALING)
    try:
        consistency.check_scalings(consistency.SIGMA_DATA, value)
    except ValueError:
        raise _field(config, "timestep_scaling", value, "must be a finite number > 0") from None
    return dict(sigma_data=consistency.SIGMA_DATA, timestep_scaling=float(value))


def _lcm_timesteps(sched: Schedule, config: Mapping, num_timesteps: int, num_steps: int):
    """LCMScheduler.set_timesteps(K) (descending int64), after its checks and this module's."""
    _reject_true(config, "lcm", ("thresholding",))
    clip = config.get("clip_sample", False)
    if clip:
        raise _field(
            config,
            "clip_sample",
            clip,
            f"LCMScheduler clamps x̂_0 to ±clip_sample_range="
            f"{config.get('clip_sample_range', 1.0)}: set clip_sample false and pass "
            f"sample(clip_x0=clip_sample_range), which is the same for LCM (it uses no ε̂)",
        )
    lcm_scalings_from_scheduler_config(config)
    origin = _int_field(config, "original_inference_steps", 50, 1)
    if origin > num_timesteps:
        raise _field(
            config,
            "original_inference_steps",
            origin,
            f"must be <= num_train_timesteps={num_timesteps} (LCMScheduler raises)",
        )
    if num_steps > origin:
        raise ValueError(
            f"num_steps={num_steps} exceeds scheduler config field original_inference_steps="
            f"{origin}: LCMScheduler visits a subset of its {origin}-step grid"
        )
    expected = schedule_from_scheduler_config(config, sampler="lcm").betas
    if not np.array_equal(np.asarray(sched.betas), np.asarray(expected)):
        missing = [key for key in LCM_BETA_DEFAULTS if key not in config]
        key = missing[0] if missing else "beta_schedule"
        raise _field(
            config,
            key,
            config.get(key, f"<absent: LCMScheduler's default {LCM_BETA_DEFAULTS[key]!r}>"),
            "sched's betas are not LCMScheduler's for this config (whose β defaults are "
            "scaled_linear 0.00085..0.012): build sched with "
            "schedule_from_scheduler_config(config, sampler='lcm')",
        )
    return consistency.lcm_timesteps(num_timesteps, num_steps, origin)[::-1]


def plan_from_scheduler_config(
    sched: Schedule, config: Mapping, sampler: str, num_steps: int
) -> SamplingPlan:
    """The ``SamplingPlan`` of ``SCHEDULER_CLASSES[sampler].from_config(config)`` after
    ``set_timesteps(num_steps)``; ``sched`` is ``schedule_from_scheduler_config(config)``.

    Timesteps, k = 0..K-1 (T = num_train_timesteps, K = num_steps, o = steps_offset, default 0,
    used by "leading" only; timestep_spacing defaults to "leading" for DDIM and to "linspace"
    for the other three classes):

        DDIM, Euler(-a)  leading   k·⌊T/K⌋ + o
                         trailing  round(T - k·(T/K)) - 1, as np.arange(T, 0, -T/K) forms it
                         linspace  round(k(T-1)/(K-1)) (DDIM), k(T-1)/(K-1) in float32 (Euler)
        DPM-Solver++     leading   k·⌊T'/(K+1)⌋ + o, k = 1..K  (K+1 points, t = 0 dropped)
                         trailing  round(T' - k·(T/K)) - 1
                         linspace  round(k(T'-1)/K), k = 1..K  (likewise)
                         T' = T less the timesteps whose λ is below lambda_min_clipped.

    ᾱ at each: ᾱ_t (ᾱ recomputed from ``sched.betas`` in float64, as ``respace`` does), except
    for Euler at a fractional t: σ = √((1-ᾱ)/ᾱ) interpolated linearly in t between the two
    integer timesteps and ᾱ = 1/(1+σ²). Where each step lands:

        DDIM     ᾱ_{t - ⌊T/K⌋}, or when t - ⌊T/K⌋ < 0 the final ᾱ: 1 if set_alpha_to_one (the
                 default) else ᾱ_0. With trailing spacing t - ⌊T/K⌋ need not be visited, and
                 the chain may end at ᾱ_0 rather than at a clean sample (T/K not an integer).
        others   the next visited ᾱ; the last step lands on σ = 0 (ᾱ = 1).

    DPM-Solver++(2M) (solver_order 2, final_sigmas_type "zero") takes a first-order first and
    last step and second-order steps between, for every K: exactly ``sampling.dpmpp_2m_step``.
    The Euler classes start from x_σ = σ_max z with "linspace"/"trailing" spacing (their
    init_noise_sigma) and from √(σ_max²+1) z (the variance-preserving x = z) with "leading":
    init_noise_scale = √(1-ᾱ_max) or 1.

    ValueError naming the field for: a sampler without a class, num_steps outside [1, T], a
    num_train_timesteps that is not sched's, K for which diffusers' timesteps repeat, fall
    outside [0, T-1] (steps_offset) or number K+1, and the class's unsupported keys: DDIM's
    clip_sample (true by default!) and thresholding; DPM's algorithm_type, solver_order,
    solver_type, final_sigmas_type, thresholding and use_*_sigmas / use_lu_lambdas; Euler's
    final_sigmas_type, interpolation_type, use_*_sigmas and continuous timesteps with
    v_prediction; prediction_type "sample" for Euler-ancestral.

    LCM (``sampling.lcm_step``; LCMScheduler's set_timesteps with strength 1): the timesteps are
    ``consistency.lcm_timesteps(T, K, N)``, N = original_inference_steps (default 50): entries
    ⌊jN/K⌋ of [Nk-1, ..., 2k-1, k-1], k = ⌊T/N⌋ (999, 759, 499, 259 for K = 4); each step lands
    on the ᾱ of the next visited timestep and the last on 1 (LCMScheduler uses ᾱ_t there, but
    its last step returns the denoised sample, so the entry is never used); init_noise_scale 1.
    LCMScheduler never reads timestep_spacing or steps_offset, and set_alpha_to_one only for a
    negative previous timestep, which its own timesteps never give: all three are ignored. It
    raises for K > N and N > T (ValueError here, naming the fields); thresholding and
    clip_sample true are refused (clip_sample: pass ``sample(clip_x0=clip_sample_range)``,
    identical for LCM, which uses no ε̂), and so is a ``sched`` whose β are not LCMScheduler's
    for this config (it defaults to scaled_linear: build ``sched`` with
    ``schedule_from_scheduler_config(config, sampler="lcm")``). Its timestep_scaling is
    ``lcm_scalings_from_scheduler_config``'s.
    """
    if sampler not in SCHEDULER_CLASSES:
        raise ValueError(
            f"sampler {sampler!r} has no diffusers scheduler here; choose one of "
            f"{list(SCHEDULER_CLASSES)}"
        )
    num_timesteps = _int_field(config, "num_train_timesteps", 1000, 1)
    if sched.num_timesteps != num_timesteps:
        raise _field(
            config,
            "num_train_timesteps",
            num_timesteps,
            f"but the schedule has {sched.num_timesteps} timesteps",
        )
    if (
        isinstance(num_steps, bool)
        or not isinstance(num_steps, (int, np.integer))
        or not 1 <= num_steps <= num_timesteps
    ):
        raise ValueError(f"num_steps must lie in [1, {num_timesteps}], got {num_steps!r}")
    if config.get("rescale_betas_zero_snr"):
        raise _field(
            config, "rescale_betas_zero_snr", config["rescale_betas_zero_snr"], "not supported"
        )
    prediction_from_scheduler_config(config)
    spacing = _check_spacing(config, DEFAULT_SPACING[sampler])
    offset = _int_field(config, "steps_offset", 0, 0)
    abar_table = np.cumprod(1.0 - np.asarray(sched.betas, dtype=np.float64))  # (T,)

    if sampler == "ddim":
        clip = config.get("clip_sample", True)
        if clip:
            raise _field(
                config,
                "clip_sample",
                clip,
                f"DDIMScheduler (whose default it is when the key is absent) clips x̂_0 to "
                f"±clip_sample_range={config.get('clip_sample_range', 1.0)} and keeps ε̂: not "
                f"supported (sample's clip_x0 recomputes ε̂); set clip_sample false",
            )
        _reject_true(config, sampler, ("thresholding",))
        steps = _ddim_timesteps(num_timesteps, num_steps, spacing, offset)
        _check_timesteps(steps, num_timesteps, num_steps, spacing, offset)
        final = 1.0 if config.get("set_alpha_to_one", True) else abar_table[0]
        prev = steps - num_timesteps // num_steps
        abar = abar_table[steps]
        abar_prev = np.where(prev >= 0, abar_table[np.maximum(prev, 0)], final)
        scale = 1.0
    elif sampler == "lcm":
        steps = _lcm_timesteps(sched, config, num_timesteps, num_steps)
        abar = abar_table[steps]
        abar_prev = np.append(abar[1:], 1.0)
        scale = 1.0
    elif sampler == "dpm++2m":
        _check_dpm(config)
        lam = 0.5 * (np.log(abar_table) - np.log1p(-abar_table))  # λ = log(α/σ), descending
        clipped = np.searchsorted(lam[::-1], config.get("lambda_min_clipped", -np.inf))
        last = num_timesteps - int(clipped)
        steps = _dpm_timesteps(num_timesteps, last, num_steps, spacing, offset)
        _check_timesteps(steps, num_timesteps, num_steps, spacing, offset)
        abar = abar_table[steps]
        abar_prev = np.append(abar[1:], 1.0)
        scale = 1.0
    else:
        _check_euler(config, sampler)
        steps = _euler_timesteps(num_timesteps, num_steps, spacing, offset)
        _check_timesteps(steps, num_timesteps, num_steps, spacing, offset)
        sigma_table = np.sqrt((1.0 - abar_table) / abar_table)
        sigma = np.interp(steps, np.arange(num_timesteps), sigma_table)
        abar = 1.0 / (1.0 + sigma**2)
        abar_prev = np.append(abar[1:], 1.0)
        scale = 1.0 if spacing == "leading" else float(np.sqrt(1.0 - abar[0]))

    # diffusers' order (noisiest first) -> the plan's (ascending)
    return SamplingPlan(
        timesteps=np.asarray(steps[::-1], dtype=np.float64),
        alphas_cumprod=np.asarray(abar[::-1], dtype=np.float64),
        alphas_cumprod_prev=np.asarray(abar_prev[::-1], dtype=np.float64),
        init_noise_scale=scale,
    )
