"""Diffusion of Gaussian data in closed form: the analytic oracle for samplers and bounds.

For data x_0 ~ N(μ, Σ) every quantity a network would learn is known exactly, so samplers and
the variational bound can be proved right independently of any training:

    x_t | x_0 ~ N(a x_0, s² I),  a = √ᾱ_t, s² = 1 - ᾱ_t
    x_t       ~ N(a μ, C_t),     C_t = a² Σ + s² I
    E[x_0 | x_t] = μ + a Σ C_t⁻¹ (x_t - a μ)
    E[ε | x_t]   = (x_t - a E[x_0 | x_t]) / s          (the optimal ε-predictor)
    ∇ log p(x_t) = -C_t⁻¹ (x_t - a μ)

Vectors only: x has shape (B, D).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp

from diffusax.diffusion import extract
from diffusax.schedules import Schedule


class GaussianData(NamedTuple):
    mean: jnp.ndarray  # (D,)
    cov: jnp.ndarray  # (D, D)

    @property
    def dim(self) -> int:
        return self.mean.shape[0]


def posterior_x0(data: GaussianData, abar, xt):
    """E[x_0 | x_t] = μ + a Σ (a² Σ + s² I)⁻¹ (x_t - a μ) for each row, abar of shape (B, 1)."""
    a = jnp.sqrt(abar)[:, :, None]  # (B, 1, 1)
    eye = jnp.eye(data.dim)
    cov_t = a**2 * data.cov + (1.0 - abar)[:, :, None] * eye  # (B, D, D)
    resid = xt - a[:, :, 0] * data.mean  # (B, D)
    solved = jnp.linalg.solve(cov_t, resid[..., None])[..., 0]  # (B, D)
    return data.mean + a[:, :, 0] * (solved @ data.cov.T)


def optimal_eps(data: GaussianData, sched: Schedule, xt, t):
    """The exact minimiser of the ε-prediction loss: E[ε | x_t]."""
    abar = extract(sched.alphas_cumprod, t, xt.shape)  # (B, 1)
    x0 = posterior_x0(data, abar, xt)
    return (xt - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)


def marginal_variance_diag(data: GaussianData, abar):
    """Var(x_t) per dimension for diagonal Σ: ᾱ σ_d² + 1 - ᾱ."""
    return abar * jnp.diag(data.cov) + 1.0 - abar


def reverse_log_variance(data: GaussianData, sched: Schedule, t):
    """log Var(x_{t-1} | x_t) for diagonal Σ, shape (B, D).

    (x_{t-1}, x_t) are jointly Gaussian with x_t = √α_t x_{t-1} + √β_t z, so
    Var(x_{t-1} | x_t) = v_{t-1} β_t / v_t with v = Var(x) per dimension (x_{-1} := x_0). With
    σ_d² < 1 this lies between β̃_t (σ_d² → 0) and β_t (σ_d² = 1).
    """
    shape = (t.shape[0], data.dim)
    v_prev = marginal_variance_diag(data, extract(sched.alphas_cumprod_prev, t, shape))
    v_t = marginal_variance_diag(data, extract(sched.alphas_cumprod, t, shape))
    return jnp.log(v_prev * extract(sched.betas, t, shape) / v_t)


def learned_range_output(data: GaussianData, sched: Schedule, t):
    """The ``learned_range`` variance output that reproduces ``reverse_log_variance`` exactly."""
    shape = (t.shape[0], data.dim)
    min_log = extract(sched.posterior_log_variance_clipped, t, shape)
    max_log = extract(jnp.log(sched.betas), t, shape)
    frac = (reverse_log_variance(data, sched, t) - min_log) / (max_log - min_log)
    return 2.0 * frac - 1.0


def oracle_model_fn(data: GaussianData, sched: Schedule, *, learned_variance: bool = False):
    """model_fn(x_t, t) returning the optimal ε (and the exact learned-range variance output)."""

    def model_fn(xt, t):
        eps = optimal_eps(data, sched, xt, t)
        if not learned_variance:
            return eps
        return jnp.concatenate([eps, learned_range_output(data, sched, t)], axis=-1)

    return model_fn


def negative_log_likelihood(data: GaussianData, x0):
    """-log N(x_0; μ, Σ) per row, in nats."""
    resid = x0 - data.mean
    _, logdet = jnp.linalg.slogdet(data.cov)
    maha = jnp.sum(resid * jnp.linalg.solve(data.cov, resid.T).T, axis=-1)
    return 0.5 * (maha + logdet + data.dim * math.log(2 * math.pi))
