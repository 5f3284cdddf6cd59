"""Samplers as pure step functions run in ``lax.scan``: DDPM, DDIM, DPM-Solver++(2M), Euler and
Euler-ancestral (Karras et al. 2022, as diffusers' Euler(Ancestral)DiscreteScheduler), LCM's
multistep consistency sampler (Luo et al. 2023, diffusers' LCMScheduler); CFG.

Conventions (see ``schedules`` and ``diffusion``):

- ``model_fn(x, t) -> output``: ``t`` is an int32 array (B,) of 0-based timesteps of the
  *training* schedule (float32 when a ``SamplingPlan`` visits fractional timesteps, as
  diffusers' Euler with "linspace" spacing does); ``output`` has the C channels of ``x``
  (ε, x_0 or v: ``prediction``), or 2C with a learned variance in the second half
  (``var_type`` 'learned_range' / 'learned'). Conditioning is bound by a closure
  (``bind_condition``).
- A sampler visits K of the T training timesteps, τ_1 < ... < τ_K, from τ_K down to τ_1 and then
  to the clean sample. The step functions index a *respaced* schedule (``respace``) with
  i = K-1, ..., 0 while the network is called with the original timestep of step i: this is
  how Improved DDPM and DiT sample a 1000-step model with 250 steps and a learned variance.
  A ``SamplingPlan`` gives the K timesteps, the ᾱ at each and the ᾱ each step lands on
  explicitly (``schedule_from_plan``): how a diffusers scheduler's timesteps, spacing, offset
  and final ᾱ are reproduced (``convert.diffusers_scheduler``).
- x is variance preserving throughout, x = √ᾱ x_0 + √(1-ᾱ) ε; the Euler samplers convert to
  Karras' x_σ = x/√ᾱ, σ = √((1-ᾱ)/ᾱ), for their step and back.
- Keys: x_T from one half of ``split(key)``, the noise of step i from ``fold_in(other half, i)``,
  so a given key gives the same x_T whatever the sampler or the number of steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusax import conditions, consistency, diffusion
from diffusax.schedules import Schedule, log_snr, make_schedule, schedule_of

SPACINGS = ("uniform", "leading", "trailing")

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


# ---------------------------------------------------------------------------------------------
# Which timesteps to visit


def timestep_subset(num_timesteps: int, num_steps: int, spacing: str = "trailing") -> np.ndarray:
    """K = ``num_steps`` of the T = ``num_timesteps`` training timesteps, ascending (int64).

    uniform:  round(linspace(0, T-1, K)): both ends, Improved DDPM's ``space_timesteps(T, "K")``
              as used by DiT (K = 1 gives [T-1]).
    leading:  k · ⌊T/K⌋ for k = 0..K-1: the DDIM paper, diffusers' "leading" (steps_offset 0).
    trailing: round(T - k·T/K) - 1 for k = 0..K-1: diffusers' "trailing", which starts at T-1 so
              that x_T ~ N(0, I) is as right as it can be (Lin et al. 2024). The default: it
              also suits DPM-Solver++, whose λ-steps stay even, where "uniform" ends with a
              large jump to t = 0 that spoils the second-order extrapolation.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must lie in [1, {num_timesteps}], got {num_steps}")
    if spacing == "uniform":
        if num_steps == 1:
            return np.array([num_timesteps - 1])
        steps = np.round(np.linspace(0, num_timesteps - 1, num_steps))
    elif spacing == "leading":
        steps = np.arange(num_steps) * (num_timesteps // num_steps)
    elif spacing == "trailing":
        steps = np.round(num_timesteps - np.arange(num_steps) * num_timesteps / num_steps) - 1
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}")
    return np.sort(steps.astype(np.int64))


def check_timesteps(timesteps, num_timesteps: int) -> np.ndarray:
    """An explicit list of timesteps as a sorted int64 array; ValueError unless each is a
    distinct integer in [0, T)."""
    steps = np.asarray(timesteps)
    if steps.ndim != 1 or steps.size == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D list, got shape {steps.shape}")
    if not np.issubdtype(steps.dtype, np.integer):
        raise ValueError(f"timesteps must be integers, got dtype {steps.dtype}")
    if steps.min() < 0 or steps.max() >= num_timesteps:
        raise ValueError(
            f"timesteps must lie in [0, {num_timesteps}), got {steps.min()}..{steps.max()}"
        )
    steps = np.sort(steps.astype(np.int64))
    if np.any(np.diff(steps) == 0):
        raise ValueError("timesteps must be distinct")
    return steps


def respace(sched: Schedule, timesteps) -> Schedule:
    """The schedule of the chain that visits only τ_1 < ... < τ_K (Nichol & Dhariwal 2021, §4).

    ᾱ'_i = ᾱ_{τ_i},  β'_i = 1 - ᾱ'_i / ᾱ'_{i-1}  (ᾱ'_0 := 1),  and every other constant follows
    from β' (``make_schedule``). ᾱ is recomputed in float64 from the stored β, so the full set
    of timesteps gives back ``sched``. ``sched`` must be concrete: close over it under ``jit``.
    """
    steps = check_timesteps(timesteps, sched.num_timesteps)
    try:
        betas = np.asarray(sched.betas, dtype=np.float64)
    except jax.errors.TracerArrayConversionError as err:
        raise ValueError(
            "sched must be concrete to respace it: close over the schedule instead of passing it "
            "as a traced jit argument"
        ) from err
    alphas_cumprod = np.cumprod(1.0 - betas)[steps]
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    return make_schedule(1.0 - alphas_cumprod / alphas_cumprod_prev)


class SamplingPlan(NamedTuple):
    """The K steps a sampler takes, stated explicitly (numpy arrays of shape (K,), ascending).

    timesteps:           the network's timestep input at each step, float64; may be fractional
                         (diffusers' Euler, "linspace" spacing, calls the U-Net at 999·k/(K-1)).
    alphas_cumprod:      ᾱ at each step.
    alphas_cumprod_prev: the ᾱ step i lands on. Entry 0 is the final ᾱ: 1 for a clean sample, but
                         diffusers' DDIM ends at ᾱ_0 when set_alpha_to_one is false; and DDIM's
                         prev_t = t - ⌊T/K⌋ need not be the next visited step (trailing spacing).
    init_noise_scale:    the standard deviation of x at the first step, in these variance-
                         preserving units: ``sample`` starts from init_noise_scale · x_T. 1 except
                         for diffusers' Euler samplers with "linspace"/"trailing" spacing, which
                         start from x_σ = σ_max z, i.e. x = √ᾱ σ_max z = √(1-ᾱ_max) z.
    """

    timesteps: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    init_noise_scale: float = 1.0


def check_plan(plan: SamplingPlan, num_timesteps: int | None = None) -> SamplingPlan:
    """The plan as float64 numpy arrays; ValueError, naming the field, unless the timesteps are
    1-D, strictly ascending (and in [0, T-1] when ``num_timesteps`` = T is given), all three
    fields have the same length, 0 < ᾱ < 1, ᾱ ≤ ᾱ_prev ≤ 1 and init_noise_scale > 0."""
    if not isinstance(plan, SamplingPlan):
        raise ValueError(f"plan must be a SamplingPlan, got {type(plan).__name__}")
    try:
        arrays = [np.asarray(a, dtype=np.float64) for a in plan[:3]]
    except jax.errors.TracerArrayConversionError as err:
        raise ValueError("plan must be concrete: close over it instead of tracing it") from err
    steps, abar, abar_prev = arrays
    if steps.ndim != 1 or steps.size == 0:
        raise ValueError(f"plan.timesteps must be a non-empty 1-D array, got shape {steps.shape}")
    for name, a in (("alphas_cumprod", abar), ("alphas_cumprod_prev", abar_prev)):
        if a.shape != steps.shape:
            raise ValueError(f"plan.{name} has shape {a.shape}, plan.timesteps {steps.shape}")
    if np.any(np.diff(steps) <= 0):
        raise ValueError("plan.timesteps must be strictly ascending")
    if num_timesteps is not None and (steps[0] < 0 or steps[-1] > num_timesteps - 1):
        raise ValueError(
            f"plan.timesteps must lie in [0, {num_timesteps - 1}], got {steps[0]}..{steps[-1]}"
        )
    if not np.all((abar > 0) & (abar < 1)):
        raise ValueError("plan.alphas_cumprod must lie in (0, 1)")
    if not np.all((abar_prev >= abar) & (abar_prev <= 1)):
        raise ValueError("plan.alphas_cumprod_prev must lie in [alphas_cumprod, 1]")
    scale = float(plan.init_noise_scale)
    if not scale > 0:
        raise ValueError(f"plan.init_noise_scale must be > 0, got {plan.init_noise_scale}")
    return SamplingPlan(steps, abar, abar_prev, scale)


def schedule_from_plan(plan: SamplingPlan) -> Schedule:
    """The K-entry schedule whose step i goes from ᾱ_i = plan.alphas_cumprod[i] to
    ᾱ'_i = plan.alphas_cumprod_prev[i], so that every step function runs on it unchanged:
    β_i = 1 - ᾱ_i/ᾱ'_i and the rest as ``schedules.schedule_of`` derives them. β_i may be 0
    (diffusers' DDIM stepping from ᾱ_0 to a final ᾱ_0)."""
    _, abar, abar_prev, _ = check_plan(plan)
    return schedule_of(1.0 - abar / abar_prev, abar, abar_prev)


# ---------------------------------------------------------------------------------------------
# One step of each sampler. ``i`` is a scalar index into ``sched`` (a respaced schedule): the
# sampler runs i = K-1, ..., 0 and step i maps x at ᾱ_i to x at ᾱ_prev = alphas_cumprod_prev[i]
# (1 after the last step). Each returns (x_prev, x̂_0).


def _batch_index(i, x):
    return jnp.full((x.shape[0],), i, dtype=jnp.int32)  # (B,)


def predict_x0_eps(
    sched: Schedule, model_out, x, i, *, prediction="eps", var_type="fixed_large", clip_x0=None
):
    """(x̂_0, ε̂) at step i: the variance half (if any) dropped, x̂_0 clipped to [-c, c] and ε̂
    recomputed from it when ``clip_x0`` = c is given."""
    t = _batch_index(i, x)
    pred, _ = diffusion.split_model_output(model_out, var_type)
    x0, eps = diffusion.x0_eps_from_prediction(sched, prediction, x, t, pred)
    if clip_x0 is not None:
        x0 = jnp.clip(x0, -clip_x0, clip_x0)
        eps = diffusion.eps_from_x0(sched, x, t, x0)
    return x0, eps


def ddpm_step(
    sched: Schedule,
    model_out,
    x,
    i,
    noise,
    *,
    prediction: str = "eps",
    var_type: str = "fixed_large",
    clip_x0: float | None = None,
):
    """Ancestral sampling, Ho et al. 2020 Algorithm 2: x_{t-1} = μ_θ(x_t, t) + σ_t z.

    μ_θ = 1/√α_t (x_t - β_t/√(1-ᾱ_t) ε̂), computed as the posterior mean μ̃_t(x̂_0, x_t) (the same
    for ε-prediction, and right for x_0- and v-prediction too). ε̂ is divided by √(1-ᾱ_t): the
    lecture's (x_t - β_t ε̂)/√(1-β_t) is a slip, not the reverse step. σ_t² = β_t
    ('fixed_large'), β̃_t ('fixed_small') or learned (``diffusion.model_log_variance``); z = 0
    at the last step (i = 0), whose output is μ_θ.
    """
    t = _batch_index(i, x)
    p = diffusion.p_mean_variance(
        sched, model_out, x, t, prediction=prediction, var_type=var_type, clip_x0=clip_x0
    )
    std = jnp.where(i > 0, jnp.exp(0.5 * p["logvar"]), 0.0)
    return p["mean"] + std * noise, p["x0"]


def ddim_sigma(sched: Schedule, i, eta):
    """σ_i(η) = η √((1-ᾱ_prev)/(1-ᾱ_t)) √(1-ᾱ_t/ᾱ_prev) (Song et al. 2021, eq. 16).

    η = 1 gives σ² = β̃ (DDPM with the posterior variance); η = 0 the deterministic DDIM.
    """
    abar, abar_prev = sched.alphas_cumprod[i], sched.alphas_cumprod_prev[i]
    return eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))


def ddim_step(
    sched: Schedule,
    model_out,
    x,
    i,
    noise,
    *,
    eta=0.0,
    prediction: str = "eps",
    var_type: str = "fixed_large",
    clip_x0: float | None = None,
):
    """DDIM, Song et al. 2021 eq. 12:

    x_prev = √ᾱ_prev x̂_0 + √(1 - ᾱ_prev - σ²) ε̂ + σ z,  σ = ``ddim_sigma(η)``.

    After the last step ᾱ_prev = 1, so σ = 0 and the output is x̂_0. A learned variance half of
    the output is ignored.
    """
    x0, eps = predict_x0_eps(
        sched, model_out, x, i, prediction=prediction, var_type=var_type, clip_x0=clip_x0
    )
    abar_prev = sched.alphas_cumprod_prev[i]
    sigma = ddim_sigma(sched, i, eta)
    direction = jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma**2, 0.0))  # rounding can dip below 0
    return jnp.sqrt(abar_prev) * x0 + direction * eps + sigma * noise, x0


def dpmpp_2m_step(
    sched: Schedule,
    model_out,
    x,
    i,
    x0_prev,
    *,
    prediction: str = "eps",
    var_type: str = "fixed_large",
    clip_x0: float | None = None,
):
    """DPM-Solver++(2M), Lu et al. 2022 Algorithm 2, with data prediction x̂_0.

    With α = √ᾱ, σ = √(1-ᾱ), λ = log(α/σ), from s (step i) to t (ᾱ_prev), h = λ_t - λ_s:

        x_t = (σ_t/σ_s) x_s - α_t (e^{-h} - 1) D,
        D   = (1 + 1/(2r)) x̂_0(s) - 1/(2r) x̂_0(s'),  r = h'/h,

    where s' is the previous (noisier) step and h' = λ_s - λ_{s'}. The first step (i = K-1)
    has no x̂_0(s') and the last (i = 0, to the clean sample: σ_t = 0, λ_t = ∞) is first order,
    D = x̂_0(s); the last step's output is then x̂_0(s). e^{-h} is formed as
    (σ_t α_s)/(α_t σ_s), which stays finite at σ_t = 0. ``x0_prev`` is x̂_0(s') (anything at
    the first step); returns (x_t, x̂_0(s)) so the caller carries x̂_0(s) to the next step.
    """
    num_steps = sched.num_timesteps
    x0, _ = predict_x0_eps(
        sched, model_out, x, i, prediction=prediction, var_type=var_type, clip_x0=clip_x0
    )
    abar_s, abar_t = sched.alphas_cumprod[i], sched.alphas_cumprod_prev[i]
    alpha_s, sigma_s = jnp.sqrt(abar_s), jnp.sqrt(1.0 - abar_s)
    alpha_t, sigma_t = jnp.sqrt(abar_t), jnp.sqrt(1.0 - abar_t)
    exp_neg_h = (sigma_t * alpha_s) / (alpha_t * sigma_s)

    second_order = (i < num_steps - 1) & (i > 0)
    # λ = ½ log SNR; placeholders where λ_t = ∞ (last step) or s' does not exist (first step).
    lam = lambda abar: 0.5 * log_snr(abar)
    lam_s = lam(abar_s)
    h = lam(jnp.where(i > 0, abar_t, 0.5)) - lam_s
    h_prev = lam_s - lam(sched.alphas_cumprod[jnp.minimum(i + 1, num_steps - 1)])
    r = jnp.where(second_order, h_prev / h, 1.0)
    d = jnp.where(second_order, (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev, x0)
    return (sigma_t / sigma_s) * x + alpha_t * (1.0 - exp_neg_h) * d, x0


def karras_sigma(abar):
    """σ = √((1-ᾱ)/ᾱ): the noise level of x_σ = x/√ᾱ = x_0 + σ ε (0 at ᾱ = 1)."""
    return jnp.sqrt((1.0 - abar) / abar)


def _euler_setup(sched, model_out, x, i, prediction, var_type, clip_x0):
    """(x_σ, x̂_0, d, σ, σ') at step i: d = (x_σ - x̂_0)/σ, the probability-flow ODE's dx_σ/dσ."""
    x0, _ = predict_x0_eps(
        sched, model_out, x, i, prediction=prediction, var_type=var_type, clip_x0=clip_x0
    )
    abar = sched.alphas_cumprod[i]
    sigma, sigma_next = karras_sigma(abar), karras_sigma(sched.alphas_cumprod_prev[i])
    x_sigma = x / jnp.sqrt(abar)
    return x_sigma, x0, (x_sigma - x0) / sigma, sigma, sigma_next


def euler_step(
    sched: Schedule,
    model_out,
    x,
    i,
    *,
    prediction: str = "eps",
    var_type: str = "fixed_large",
    clip_x0: float | None = None,
):
    """Euler on the probability-flow ODE in σ-space (Karras et al. 2022, Algorithm 1 without
    churn; diffusers' EulerDiscreteScheduler):

        x_σ' = x_σ + (σ' - σ) d,  d = (x_σ - x̂_0)/σ,  x_σ = x/√ᾱ,  σ = √((1-ᾱ)/ᾱ),

    σ' = σ(ᾱ_prev), returned as x' = √ᾱ_prev x_σ'. It is DDIM with η = 0, step for step: x_σ =
    x̂_0 + σ ε̂ makes d = ε̂, so x_σ' = x̂_0 + σ' ε̂ and x' = √ᾱ' x̂_0 + √(1-ᾱ') ε̂. The last step
    (σ' = 0) returns x̂_0. A learned variance half of the output is ignored.
    """
    x_sigma, x0, d, sigma, sigma_next = _euler_setup(
        sched, model_out, x, i, prediction, var_type, clip_x0
    )
    x_next = x_sigma + (sigma_next - sigma) * d
    return jnp.sqrt(sched.alphas_cumprod_prev[i]) * x_next, x0


def euler_ancestral_step(
    sched: Schedule,
    model_out,
    x,
    i,
    noise,
    *,
    prediction: str = "eps",
    var_type: str = "fixed_large",
    clip_x0: float | None = None,
):
    """Euler-ancestral (k-diffusion's sample_euler_ancestral, diffusers'
    EulerAncestralDiscreteScheduler): an Euler step down to σ_down, then fresh noise σ_up z,

        σ_up = √(σ'²(σ² - σ'²)/σ²),  σ_down = √(σ'² - σ_up²),
        x_σ' = x_σ + (σ_down - σ) d + σ_up z,

    in the notation of ``euler_step``, returned as x' = √ᾱ' x_σ'. It is DDIM with η = 1 with the
    same z: ᾱ'σ_up² = (1-ᾱ')(1 - ᾱ/ᾱ')/(1-ᾱ) = ``ddim_sigma(η=1)``² (σ² - σ'² = 1/ᾱ - 1/ᾱ'), and
    ᾱ'σ_down² = 1 - ᾱ' - ᾱ'σ_up² is DDIM's direction coefficient squared. The last step (σ' = 0)
    returns x̂_0.
    """
    x_sigma, x0, d, sigma, sigma_next = _euler_setup(
        sched, model_out, x, i, prediction, var_type, clip_x0
    )
    sigma_up = jnp.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    sigma_down = jnp.sqrt(jnp.maximum(sigma_next**2 - sigma_up**2, 0.0))  # rounding can dip < 0
    x_next = x_sigma + (sigma_down - sigma) * d + sigma_up * noise
    return jnp.sqrt(sched.alphas_cumprod_prev[i]) * x_next, x0


def lcm_step(
    sched: Schedule,
    model_out,
    x,
    i,
    t,
    noise,
    *,
    prediction: str = "eps",
    var_type: str = "fixed_large",
    clip_x0: float | None = None,
    sigma_data: float = consistency.SIGMA_DATA,
    timestep_scaling: float = consistency.TIMESTEP_SCALING,
):
    """LCM's multistep consistency sampling (Luo et al. 2023, Algorithm 1 of Song et al. 2023;
    diffusers' LCMScheduler.step): with t (B,) the network's timestep at step i,

        x̂_0      from the output (``predict_x0_eps``: any ``prediction``, optionally clipped),
        denoised = c_skip(t) x + c_out(t) x̂_0          (``consistency.consistency_function``),
        x_prev   = √ᾱ_prev denoised + √(1 - ᾱ_prev) z   (i > 0),   x_prev = denoised   (i = 0),

    ᾱ_prev = alphas_cumprod_prev[i], on a respaced schedule the ᾱ of the next visited timestep:
    each step jumps to the clean sample and re-noises it to the next noise level. The last step
    returns ``denoised`` whatever alphas_cumprod_prev[0] is. Returns (x_prev, denoised). A
    learned variance half of the output is ignored.
    """
    x0, _ = predict_x0_eps(
        sched, model_out, x, i, prediction=prediction, var_type=var_type, clip_x0=clip_x0
    )
    denoised = consistency.consistency_function(
        x, t, x0, sigma_data=sigma_data, timestep_scaling=timestep_scaling
    )
    return _renoise(sched, denoised, i, noise)


def _renoise(sched: Schedule, denoised, i, noise):
    """(√ᾱ_prev denoised + √(1 - ᾱ_prev) z if i > 0 else denoised, denoised): the jump of the
    multistep consistency and ADD samplers to the next visited noise level."""
    abar_prev = sched.alphas_cumprod_prev[i]
    renoised = jnp.sqrt(abar_prev) * denoised + jnp.sqrt(1.0 - abar_prev) * noise
    return jnp.where(i > 0, renoised, denoised), denoised


def renoise_step(
    sched: Schedule,
    model_out,
    x,
    i,
    noise,
    *,
    prediction: str = "eps",
    var_type: str = "fixed_large",
    clip_x0: float | None = None,
):
    """The multistep sampling of an adversarially distilled student (ADD, Sauer et al. 2023):
    each step denoises to the network's x̂_0 and re-noises it with fresh noise to the next
    visited timestep,

        x̂_0    from the output (``predict_x0_eps``: any ``prediction``, optionally clipped),
        x_prev = √ᾱ_prev x̂_0 + √(1 - ᾱ_prev) z   (i > 0),   x_prev = x̂_0   (i = 0),

    ᾱ_prev = alphas_cumprod_prev[i] (on a respaced schedule the ᾱ of the next visited
    timestep). It is ``lcm_step`` with c_skip = 0, c_out = 1: the student's output is its
    sample, not a boundary-conditioned consistency function. Returns (x_prev, x̂_0).
    """
    x0, _ = predict_x0_eps(
        sched, model_out, x, i, prediction=prediction, var_type=var_type, clip_x0=clip_x0
    )
    return _renoise(sched, x0, i, noise)


# ---------------------------------------------------------------------------------------------
# The driver


def resolve_timesteps(num_timesteps: int, num_steps=None, timesteps=None, spacing="trailing"):
    """The ascending timesteps to visit: ``timesteps`` if given, else ``num_steps`` of them
    by ``spacing``, else all T."""
    if num_steps is not None and timesteps is not None:
        raise ValueError("pass num_steps or timesteps, not both")
    if timesteps is not None:
        return check_timesteps(timesteps, num_timesteps)
    if num_steps is None:
        return np.arange(num_timesteps)
    return timestep_subset(num_timesteps, num_steps, spacing)


def _check_output(out, x, var_type):
    """ValueError (while tracing, before compiling) if the output does not fit ``var_type``."""
    channels = x.shape[-1] * (2 if var_type in diffusion.LEARNED_VAR_TYPES else 1)
    if out.shape != (*x.shape[:-1], channels):
        raise ValueError(
            f"model output has shape {out.shape}, but x has shape {x.shape} and "
            f"var_type={var_type!r} expects {channels} channels (a learned variance doubles them)"
        )


# The registry of samplers: name -> step(sched, out, x, i, noise(), x0_prev, eta, t, **kwargs),
# t (B,) the network's timestep at step i (int32, or float32 for a plan's fractional ones).
# ``noise`` is a thunk, so that the deterministic solvers draw nothing.
SAMPLERS = {
    "ddpm": lambda sub, out, x, i, noise, x0_prev, eta, t=None, **kw: ddpm_step(
        sub, out, x, i, noise(), **kw
    ),
    "ddim": lambda sub, out, x, i, noise, x0_prev, eta, t=None, **kw: ddim_step(
        sub, out, x, i, noise(), eta=eta, **kw
    ),
    "dpm++2m": lambda sub, out, x, i, noise, x0_prev, eta, t=None, **kw: dpmpp_2m_step(
        sub, out, x, i, x0_prev, **kw
    ),
    "euler": lambda sub, out, x, i, noise, x0_prev, eta, t=None, **kw: euler_step(
        sub, out, x, i, **kw
    ),
    "euler_a": lambda sub, out, x, i, noise, x0_prev, eta, t=None, **kw: euler_ancestral_step(
        sub, out, x, i, noise(), **kw
    ),
}


def _lcm_entry(sub, out, x, i, noise, x0_prev, eta, t=None, **kw):
    if t is None:
        raise ValueError("sampler 'lcm' needs the network timestep t")
    return lcm_step(sub, out, x, i, t, noise(), **kw)


# Samplers whose step does not end with x̂_0 (the consistency function adds c_skip(t) x), kept
# apart from SAMPLERS, whose tests assume it does; same signature. ``sample`` takes either.
# "add" (``renoise_step``, the few-step students' denoise-then-re-noise) is kept here beside
# "lcm", its c_skip = 0 relative, and tested with method "add" (tests/test_add.py).
CONSISTENCY_SAMPLERS = {
    "lcm": _lcm_entry,
    "add": lambda sub, out, x, i, noise, x0_prev, eta, t=None, **kw: renoise_step(
        sub, out, x, i, noise(), **kw
    ),
}
SAMPLER_NAMES = (*SAMPLERS, *CONSISTENCY_SAMPLERS)


def _validate(sampler, prediction, var_type, eta, spacing):
    if sampler not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {list(SAMPLER_NAMES)}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}")
    if prediction not in diffusion.PREDICTIONS:
        raise ValueError(
            f"unknown prediction {prediction!r}; choose one of {diffusion.PREDICTIONS}"
        )
    if var_type not in diffusion.VAR_TYPES:
        raise ValueError(f"unknown var_type {var_type!r}; choose one of {diffusion.VAR_TYPES}")
    if isinstance(eta, (int, float)):  # a traced η is checked by nobody: the caller's choice
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if eta != 0 and sampler != "ddim":
            raise ValueError(f"eta={eta} applies only to sampler='ddim', not {sampler!r}")


def sample(
    model_fn: ModelFn,
    sched: Schedule,
    shape,
    key,
    *,
    sampler: str = "ddpm",
    num_steps: int | None = None,
    timesteps=None,
    spacing: str = "trailing",
    plan: SamplingPlan | None = None,
    prediction: str = "eps",
    var_type: str = "fixed_large",
    eta=0.0,
    clip_x0: float | None = None,
    x_T=None,
    return_trajectory: bool = False,
    sigma_data: float = consistency.SIGMA_DATA,
    timestep_scaling: float = consistency.TIMESTEP_SCALING,
    lcm_origin_steps: int = 50,
):
    """Draw samples of ``shape`` (B, ...) by running one sampler's step in ``lax.scan``.

    sampler:   'ddpm' (ancestral, σ² by ``var_type``), 'ddim' (with ``eta``), 'dpm++2m',
               'euler' or 'euler_a' (``euler_step``, ``euler_ancestral_step``), 'lcm'
               (``lcm_step``, a consistency model's multistep sampling), 'add'
               (``renoise_step``: denoise, re-noise). All but 'ddpm' ignore a learned
               variance half.
    num_steps: visit this many timesteps chosen by ``spacing`` (``timestep_subset``); or give
               ``timesteps`` explicitly; neither: all T. For 'lcm', num_steps = K visits
               ``consistency.lcm_timesteps(T, K)`` (LCMScheduler's: K ≤ 50, 999, 759, 499, 259
               for K = 4 and T = 1000) and ``spacing`` is ignored; it needs num_steps,
               timesteps or a plan.
    plan:      instead of those, a ``SamplingPlan``: its timesteps are the network's input
               (float32 when any is fractional), ``schedule_from_plan(plan)`` the schedule the
               steps index, and the chain starts from plan.init_noise_scale · x_T (the
               trajectory starts there too). ``sched`` then only bounds the timesteps.
    x_T:       the starting noise; by default N(0, I) from ``key``.
    sigma_data, timestep_scaling: the boundary scalings of 'lcm' (``consistency``; diffusers'
               LCMScheduler: 0.5 and its config's timestep_scaling); other samplers refuse
               values other than the defaults.
    lcm_origin_steps: the grid 'lcm' picks num_steps timesteps from (LCMScheduler's
               original_inference_steps; a student distilled on another DDIM grid passes its own).
    Jittable with everything but ``key``, ``x_T`` and ``eta`` static (close over ``model_fn``,
    ``sched`` and ``plan``). Returns the samples, or (samples, trajectory of shape (K+1, B, ...)
    from x_T). Bad arguments raise ValueError before anything is traced.
    """
    _validate(sampler, prediction, var_type, eta, spacing)
    consistency.check_scalings(sigma_data, timestep_scaling)
    defaults = (consistency.SIGMA_DATA, consistency.TIMESTEP_SCALING)
    if sampler != "lcm" and (sigma_data, timestep_scaling) != defaults:
        raise ValueError(
            f"sigma_data={sigma_data} and timestep_scaling={timestep_scaling} apply only to "
            f"sampler='lcm', not {sampler!r}"
        )
    if plan is not None:
        if num_steps is not None or timesteps is not None:
            raise ValueError("pass plan or num_steps / timesteps, not both")
        plan = check_plan(plan, sched.num_timesteps)
        steps, sub = plan.timesteps, schedule_from_plan(plan)
        fractional = bool(np.any(steps != np.round(steps)))
    else:
        if sampler == "lcm" and timesteps is None:
            if num_steps is None:
                raise ValueError("sampler='lcm' needs num_steps, timesteps or a plan")
            steps = consistency.lcm_timesteps(sched.num_timesteps, num_steps, lcm_origin_steps)
        else:
            steps = resolve_timesteps(sched.num_timesteps, num_steps, timesteps, spacing)
        sub, fractional = respace(sched, steps), False
    shape = tuple(shape)
    if x_T is not None and tuple(x_T.shape) != shape:
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
    key_init, key_steps = jax.random.split(key)
    x = jax.random.normal(key_init, shape, jnp.float32) if x_T is None else x_T
    if plan is not None and plan.init_noise_scale != 1.0:
        x = plan.init_noise_scale * x
    kwargs = dict(prediction=prediction, var_type=var_type, clip_x0=clip_x0)
    if sampler == "lcm":
        kwargs.update(sigma_data=sigma_data, timestep_scaling=timestep_scaling)
    step_fn = SAMPLERS[sampler] if sampler in SAMPLERS else CONSISTENCY_SAMPLERS[sampler]
    t_dtype = jnp.float32 if fractional else jnp.int32

    def body(carry, step):
        x, x0_prev = carry
        i, t = step
        t_batch = jnp.full((x.shape[0],), t, dtype=t_dtype)
        out = model_fn(x, t_batch)
        _check_output(out, x, var_type)
        noise = lambda: jax.random.normal(jax.random.fold_in(key_steps, i), x.shape, x.dtype)
        x, x0 = step_fn(sub, out, x, i, noise, x0_prev, eta, t_batch, **kwargs)
        return (x, x0), (x if return_trajectory else None)

    order = np.arange(len(steps))[::-1]  # i = K-1, ..., 0
    xs = (jnp.asarray(order, jnp.int32), jnp.asarray(steps[order], t_dtype))
    (x_final, _), path = jax.lax.scan(body, (x, jnp.zeros_like(x)), xs)
    if return_trajectory:
        return x_final, jnp.concatenate([x[None], path])  # (K+1, B, ...)
    return x_final


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance (Ho & Salimans 2022)


def classifier_free_guidance(
    apply_fn: Callable,
    scale,
    *,
    null_label,
    learned_variance: bool = False,
    guided_channels: int | None = None,
):
    """Wrap a conditional network ``apply_fn(x, t, y)`` into a guided one ``(x, t, y) -> out``.

    One call on the doubled batch [x, x] with conditions [y, ∅] (``null_label`` broadcast to
    y's shape: a class index, a null embedding, or a pytree such as the empty caption's tokens
    and mask, ``conditions.Condition.null_row``), then for the prediction channels

        out = out(∅) + s (out(y) - out(∅)),

    s = ``scale`` (Ho & Salimans' w is s - 1; s = 1 is the conditional model, s = 0 the
    unconditional one). ``guided_channels`` = k guides only the first k channels and keeps the
    conditional output in the rest (DiT's reference guides 3 of its 4 latent channels). With
    ``learned_variance`` the output's second half is a variance, taken from the conditional
    branch.
    """
    if guided_channels is not None and (
        not isinstance(guided_channels, int) or guided_channels < 1
    ):
        raise ValueError(f"guided_channels must be a positive int or None, got {guided_channels!r}")

    def guided(x, t, y):
        # y and the null may be pytrees (a text condition's tokens and mask): leaf by leaf.
        y_both = conditions.concat(y, conditions.broadcast_null(null_label, y))
        out = apply_fn(
            jnp.concatenate([x, x]), jnp.concatenate([t, t]), y_both
        )  # (2B, ..., C) or (2B, ..., 2C)
        cond, uncond = jnp.split(out, 2, axis=0)  # (B, ..., C or 2C) each
        if learned_variance:
            cond, var = jnp.split(cond, 2, axis=-1)
            uncond, _ = jnp.split(uncond, 2, axis=-1)
        k = cond.shape[-1] if guided_channels is None else guided_channels
        if k > cond.shape[-1]:
            raise ValueError(
                f"guided_channels={k} exceeds the {cond.shape[-1]} prediction channels"
            )
        mixed = uncond[..., :k] + scale * (cond[..., :k] - uncond[..., :k])
        pred = jnp.concatenate([mixed, cond[..., k:]], axis=-1)
        return jnp.concatenate([pred, var], axis=-1) if learned_variance else pred

    return guided


def bind_condition(apply_fn: Callable, y) -> ModelFn:
    """``model_fn(x, t) = apply_fn(x, t, y)``: a conditional (or guided) network for ``sample``."""
    return lambda x, t: apply_fn(x, t, y)
