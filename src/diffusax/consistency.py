"""Consistency-model pieces of Latent Consistency Models (Luo et al. 2023), after consistency
models (Song et al. 2023): the boundary-condition scalings, the guidance-scale embedding and the
timesteps LCM distils on and samples at. Pure functions (jnp, numpy for the timesteps).

A consistency function maps any point x_t of a probability-flow ODE trajectory to its origin:

    f(x_t, t) = c_skip(t) x_t + c_out(t) x̂_0(x_t, t),   f(x, 0) = x  (the boundary condition),

with x̂_0 the network's clean-sample estimate (from ε, x_0 or v). LCM uses the EDM-like
scalings of a discrete timestep t scaled by s = ``timestep_scaling``,

    c_skip = σ_d² / ((s t)² + σ_d²),   c_out = s t / √((s t)² + σ_d²),   σ_d = ``sigma_data``,

as diffusers' LCMScheduler (σ_d = 0.5 fixed, s = its config's timestep_scaling, default 10) and
the LCM distillation scripts do; s = 10 makes c_skip ≈ 0 already at t = 1.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def boundary_scalings(
    t, sigma_data: float = SIGMA_DATA, timestep_scaling: float = TIMESTEP_SCALING
):
    """(c_skip, c_out) at timestep(s) ``t`` (float32, t's shape):

    c_skip = σ_d² / ((s t)² + σ_d²),  c_out = s t / √((s t)² + σ_d²).

    At t = 0 exactly c_skip = 1 and c_out = 0 (σ_d²/σ_d² and 0/σ_d in IEEE arithmetic), so
    ``consistency_function`` returns its input unchanged there.
    """
    scaled = timestep_scaling * jnp.asarray(t, jnp.float32)
    denom = scaled**2 + sigma_data**2
    return sigma_data**2 / denom, scaled / jnp.sqrt(denom)


def consistency_function(
    z,
    t,
    x0_pred,
    *,
    sigma_data: float = SIGMA_DATA,
    timestep_scaling: float = TIMESTEP_SCALING,
):
    """f(z, t) = c_skip(t) z + c_out(t) x̂_0 (``boundary_scalings``); t of shape (B,) (or a
    scalar) is broadcast over the trailing dimensions of z (B, ...)."""
    c_skip, c_out = boundary_scalings(t, sigma_data, timestep_scaling)
    c_skip = jnp.reshape(c_skip, c_skip.shape + (1,) * (z.ndim - c_skip.ndim))
    c_out = jnp.reshape(c_out, c_out.shape + (1,) * (z.ndim - c_out.ndim))
    return c_skip * z + c_out * x0_pred


def guidance_embedding(w, dim: int, dtype=jnp.float32):
    """LCM's embedding of the guidance scale w (B,), shape (B, dim): with h = ⌊dim/2⌋,

    e = [sin(1000 w ν_k), cos(1000 w ν_k)]_{k<h},  ν_k = exp(-k log(10⁴)/(h - 1)),

    zero-padded to ``dim`` when dim is odd (VDM's timestep embedding of 1000 w; diffusers'
    LatentConsistencyModelPipeline.get_guidance_scale_embedding and the LCM training scripts'
    guidance_scale_embedding). The pipeline feeds w = guidance_scale - 1 to the U-Net as
    ``timestep_cond`` (its time_cond_proj_dim = ``dim``). ValueError unless w is 1-D and dim ≥ 4
    (h = 1 divides by h - 1 = 0: diffusers returns NaN there).
    """
    w = jnp.asarray(w)
    if w.ndim != 1:
        raise ValueError(f"w must be 1-D (one guidance scale per row), got shape {w.shape}")
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 4:
        raise ValueError(f"dim must be an integer >= 4, got {dim!r}")
    half = dim // 2
    rate = jnp.log(jnp.asarray(10000.0, dtype)) / (half - 1)
    freqs = jnp.exp(jnp.arange(half, dtype=dtype) * -rate)  # (h,)
    angles = (w * 1000.0).astype(dtype)[:, None] * freqs[None, :]  # (B, h)
    emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _positive_int(name: str, value, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if value > maximum:
        raise ValueError(f"{name}={value} must be <= {maximum}")
    return int(value)


def lcm_origin_timesteps(num_timesteps: int = 1000, origin_steps: int = 50) -> np.ndarray:
    """The skipping-step DDIM grid LCM distils on, ascending int64:

    [k - 1, 2k - 1, ..., N k - 1],  k = ⌊T/N⌋,  N = ``origin_steps``, T = ``num_timesteps``

    (ends at T - 1 when N divides T: [19, 39, ..., 999] for T = 1000, N = 50). diffusers'
    LCMScheduler (original_inference_steps, strength 1) and the distillation script's DDIMSolver.
    ValueError unless 1 ≤ N ≤ T.
    """
    num_timesteps = _positive_int("num_timesteps", num_timesteps, np.iinfo(np.int64).max)
    origin_steps = _positive_int("origin_steps", origin_steps, num_timesteps)
    k = num_timesteps // origin_steps
    return np.arange(1, origin_steps + 1, dtype=np.int64) * k - 1


def lcm_timesteps(num_timesteps: int, num_steps: int, origin_steps: int = 50) -> np.ndarray:
    """The K = ``num_steps`` timesteps LCMScheduler.set_timesteps(K) visits, ascending int64:
    entries ⌊j N/K⌋, j = 0..K-1, of the origin grid (``lcm_origin_timesteps``) read from its
    noisiest end, i.e. τ_j = (N - ⌊j N/K⌋) k - 1 (T = 1000, N = 50: K = 4 gives
    999, 759, 499, 259). ValueError, naming the argument, unless 1 ≤ N ≤ T and 1 ≤ K ≤ N
    (diffusers: num_inference_steps ≤ original_inference_steps ≤ num_train_timesteps).
    """
    origin = lcm_origin_timesteps(num_timesteps, origin_steps)[::-1]  # descending
    num_steps = _positive_int("num_steps", num_steps, len(origin))
    index = np.floor(np.linspace(0, len(origin), num=num_steps, endpoint=False)).astype(np.int64)
    return np.sort(origin[index])


def check_scalings(sigma_data, timestep_scaling) -> None:
    """ValueError unless both are finite positive numbers (the boundary scalings need σ_d > 0;
    s > 0 keeps c_out ≥ 0)."""
    for name, value in (("sigma_data", sigma_data), ("timestep_scaling", timestep_scaling)):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float, np.floating, np.integer))
            or not math.isfinite(value)
            or value <= 0
        ):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
