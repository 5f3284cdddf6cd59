"""β schedules and the per-timestep constants derived from them.

Time convention: discrete timesteps are indexed t = 0, ..., T-1, as in the DDPM code and
diffusers; index t is the paper's step t+1 (the paper counts 1..T). So ``alphas_cumprod[0]`` is
ᾱ_1 = 1 - β_1 and ``alphas_cumprod[T-1]`` is ᾱ_T.

ᾱ_t = ∏_{s≤t} (1 - β_s). (The lecture this project grew from writes ᾱ_t = ∏ β_s: that is a
slip; the product is over α_s = 1 - β_s, Ho et al. 2020, eq. 4.)

Constants are computed in float64 with numpy, once, and stored as float32 arrays in a
``Schedule``: a NamedTuple, hence a pytree that can be passed straight into jitted functions.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


def linear_betas(
    num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
    """β_t evenly spaced from ``beta_start`` to ``beta_end`` (DDPM: 1e-4..0.02, T = 1000)."""
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def scaled_linear_betas(
    num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012
) -> np.ndarray:
    """β_t = (linspace(√β_start, √β_end))², the latent-diffusion / Stable Diffusion schedule."""
    return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Improved DDPM's cosine schedule (Nichol & Dhariwal 2021, eq. 17).

    ᾱ(τ) = f(τ)/f(0), f(τ) = cos²((τ/T + s)/(1 + s) · π/2), and β_t = min(1 - ᾱ(t)/ᾱ(t-1), max_beta).
    The clip at 0.999 keeps the last step from being a singular β = 1.
    """
    tau = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((tau + s) / (1 + s) * math.pi / 2) ** 2
    return np.minimum(1.0 - f[1:] / f[:-1], max_beta)


BETA_SCHEDULES = {
    "linear": linear_betas,
    "scaled_linear": scaled_linear_betas,
    "cosine": cosine_betas,
}


def make_betas(name: str, num_timesteps: int, **kwargs) -> np.ndarray:
    """The named β schedule (one of ``BETA_SCHEDULES``) with ``num_timesteps`` steps."""
    if name not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {name!r}; choose one of {sorted(BETA_SCHEDULES)}")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    return BETA_SCHEDULES[name](num_timesteps, **kwargs)


class Schedule(NamedTuple):
    """Every per-timestep constant the DDPM maths needs, each a float32 array of shape (T,)."""

    betas: jnp.ndarray  # β_t
    alphas_cumprod: jnp.ndarray  # ᾱ_t = ∏_{s≤t} (1 - β_s)
    alphas_cumprod_prev: jnp.ndarray  # ᾱ_{t-1}, with ᾱ_0 := 1 (no noise before the first step)
    posterior_variance: jnp.ndarray  # β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) · β_t
    # log β̃_t with the first entry (β̃ = 0 at the first step) replaced by log β̃ of the second,
    # as DDPM does, so that the log is finite.
    posterior_log_variance_clipped: jnp.ndarray
    posterior_mean_coef1: jnp.ndarray  # √ᾱ_{t-1} β_t / (1 - ᾱ_t), multiplies x_0
    posterior_mean_coef2: jnp.ndarray  # √α_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t), multiplies x_t

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]


def make_schedule(betas: np.ndarray) -> Schedule:
    """All schedule constants from β_1..β_T (computed in float64, stored as float32)."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if not np.all((betas > 0) & (betas <= 1)):
        raise ValueError("every beta must lie in (0, 1]")
    alphas_cumprod = np.cumprod(1.0 - betas)
    return schedule_of(betas, alphas_cumprod, np.append(1.0, alphas_cumprod[:-1]))


def schedule_of(betas, alphas_cumprod, alphas_cumprod_prev) -> Schedule:
    """The ``Schedule`` of a chain whose step t goes from ᾱ_t to ᾱ_prev,t with β_t = 1 - α_t
    (float64 arrays of one length; ``make_schedule`` has ᾱ_prev,t = ᾱ_{t-1}, a sampling plan
    may land elsewhere): β̃_t = (1 - ᾱ_prev)/(1 - ᾱ_t) β_t and the posterior mean coefficients
    √ᾱ_prev β_t/(1 - ᾱ_t) and √α_t (1 - ᾱ_prev)/(1 - ᾱ_t). A first β̃ of 0 (ᾱ_prev = 1) has
    its log replaced by that of the second (of β_1 when there is one step), so that it is
    finite; a β of 0 (a plan step that stays put) is allowed here."""
    betas, abar, abar_prev = (
        np.asarray(a, dtype=np.float64) for a in (betas, alphas_cumprod, alphas_cumprod_prev)
    )
    posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
    clipped = posterior_variance.copy()
    if clipped[0] <= 0:
        clipped[0] = posterior_variance[1] if clipped.size > 1 else betas[0]
    with np.errstate(divide="ignore"):  # log 0 = -inf only for one step with β = 0
        log_clipped = np.log(clipped)
    f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
    return Schedule(
        betas=f32(betas),
        alphas_cumprod=f32(abar),
        alphas_cumprod_prev=f32(abar_prev),
        posterior_variance=f32(posterior_variance),
        posterior_log_variance_clipped=f32(log_clipped),
        posterior_mean_coef1=f32(betas * np.sqrt(abar_prev) / (1.0 - abar)),
        posterior_mean_coef2=f32((1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar)),
    )


def schedule_from_config(name: str, num_timesteps: int, **kwargs) -> Schedule:
    """``make_schedule(make_betas(name, num_timesteps, **kwargs))``."""
    return make_schedule(make_betas(name, num_timesteps, **kwargs))


def snr(alphas_cumprod):
    """Signal-to-noise ratio SNR_t = ᾱ_t / (1 - ᾱ_t) of x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε."""
    return alphas_cumprod / (1.0 - alphas_cumprod)


def log_snr(alphas_cumprod):
    """λ_t = log(ᾱ_t / (1 - ᾱ_t)) = 2 log(α_t/σ_t), the time variable of DPM-Solver."""
    return jnp.log(alphas_cumprod) - jnp.log1p(-alphas_cumprod)
