"""The DDPM maths as pure functions (Ho et al. 2020; Nichol & Dhariwal 2021).

Conventions: ``sched`` is a ``schedules.Schedule``; ``t`` is an int array of shape (B,) with
0-based indices (see ``schedules``); ``x0``/``xt``/``eps`` have shape (B, ...) (NHWC images or
(B, D) vectors). Per-timestep constants are gathered at t and broadcast over the trailing axes.

Model outputs: a network predicts ε, x_0 or v (``prediction``) in its first C channels (last
axis); with a learned variance it returns 2C channels, the second half being the variance
output (``var_type``), as Improved DDPM and DiT do.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from diffusax.schedules import Schedule

PREDICTIONS = ("eps", "x0", "v")
VAR_TYPES = ("fixed_small", "fixed_large", "learned_range", "learned")
LEARNED_VAR_TYPES = ("learned_range", "learned")


def extract(coefs: jnp.ndarray, t: jnp.ndarray, x_shape) -> jnp.ndarray:
    """coefs[t] reshaped to (B, 1, ..., 1) so that it broadcasts against an array of x_shape."""
    out = jnp.take(coefs, t, axis=0)
    return out.reshape(out.shape + (1,) * (len(x_shape) - out.ndim))


# ---------------------------------------------------------------------------------------------
# The forward process


def q_step(sched: Schedule, x_prev, t, noise):
    """One forward step: x_t = √(1-β_t) x_{t-1} + √β_t z, i.e. q(x_t | x_{t-1}) (eq. 2)."""
    beta = extract(sched.betas, t, x_prev.shape)
    return jnp.sqrt(1.0 - beta) * x_prev + jnp.sqrt(beta) * noise


def q_mean_variance(sched: Schedule, x0, t):
    """q(x_t | x_0) = N(√ᾱ_t x_0, (1-ᾱ_t) I) (eq. 4): returns (mean, variance)."""
    abar = extract(sched.alphas_cumprod, t, x0.shape)
    return jnp.sqrt(abar) * x0, jnp.broadcast_to(1.0 - abar, x0.shape)


def q_sample(sched: Schedule, x0, t, noise):
    """x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε, a sample of q(x_t | x_0) in closed form."""
    abar = extract(sched.alphas_cumprod, t, x0.shape)
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


def q_posterior_mean_variance(sched: Schedule, x0, xt, t):
    """q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I) (eqs. 6-7).

    μ̃_t = √ᾱ_{t-1} β_t/(1-ᾱ_t) x_0 + √α_t (1-ᾱ_{t-1})/(1-ᾱ_t) x_t,  β̃_t = (1-ᾱ_{t-1})/(1-ᾱ_t) β_t.
    Returns (mean, variance, clipped log-variance).
    """
    mean = (
        extract(sched.posterior_mean_coef1, t, xt.shape) * x0
        + extract(sched.posterior_mean_coef2, t, xt.shape) * xt
    )
    var = jnp.broadcast_to(extract(sched.posterior_variance, t, xt.shape), xt.shape)
    logvar = jnp.broadcast_to(extract(sched.posterior_log_variance_clipped, t, xt.shape), xt.shape)
    return mean, var, logvar


# ---------------------------------------------------------------------------------------------
# Parametrisations: ε, x_0 and v = √ᾱ ε - √(1-ᾱ) x_0 (Salimans & Ho 2022)


def x0_from_eps(sched: Schedule, xt, t, eps):
    """x_0 = (x_t - √(1-ᾱ_t) ε) / √ᾱ_t."""
    abar = extract(sched.alphas_cumprod, t, xt.shape)
    return (xt - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar)


def eps_from_x0(sched: Schedule, xt, t, x0):
    """ε = (x_t - √ᾱ_t x_0) / √(1-ᾱ_t)."""
    abar = extract(sched.alphas_cumprod, t, xt.shape)
    return (xt - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)


def v_from_x0_eps(sched: Schedule, x0, eps, t):
    """v = √ᾱ_t ε - √(1-ᾱ_t) x_0."""
    abar = extract(sched.alphas_cumprod, t, x0.shape)
    return jnp.sqrt(abar) * eps - jnp.sqrt(1.0 - abar) * x0


def x0_from_v(sched: Schedule, xt, t, v):
    """x_0 = √ᾱ_t x_t - √(1-ᾱ_t) v."""
    abar = extract(sched.alphas_cumprod, t, xt.shape)
    return jnp.sqrt(abar) * xt - jnp.sqrt(1.0 - abar) * v


def eps_from_v(sched: Schedule, xt, t, v):
    """ε = √(1-ᾱ_t) x_t + √ᾱ_t v."""
    abar = extract(sched.alphas_cumprod, t, xt.shape)
    return jnp.sqrt(1.0 - abar) * xt + jnp.sqrt(abar) * v


def x0_eps_from_prediction(sched: Schedule, prediction: str, xt, t, pred):
    """(x̂_0, ε̂) from a network's prediction of ``prediction`` ∈ {eps, x0, v}."""
    if prediction == "eps":
        return x0_from_eps(sched, xt, t, pred), pred
    if prediction == "x0":
        return pred, eps_from_x0(sched, xt, t, pred)
    if prediction == "v":
        return x0_from_v(sched, xt, t, pred), eps_from_v(sched, xt, t, pred)
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


def prediction_target(sched: Schedule, prediction: str, x0, eps, t):
    """The regression target of each parametrisation: ε, x_0, or v."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return v_from_x0_eps(sched, x0, eps, t)
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


def split_model_output(out, var_type: str):
    """(prediction, variance output or None): a learned variance occupies the second half."""
    if var_type in LEARNED_VAR_TYPES:
        pred, var_out = jnp.split(out, 2, axis=-1)
        return pred, var_out
    return out, None


# ---------------------------------------------------------------------------------------------
# The reverse process p(x_{t-1} | x_t)


def model_log_variance(sched: Schedule, t, shape, var_type: str, var_out=None):
    """log σ_t² of p(x_{t-1} | x_t) for each ``var_type``.

    fixed_small:   σ_t² = β̃_t (the lower bound of Ho et al.; clipped at the first step).
    fixed_large:   σ_t² = β_t, with β̃ at the first step (as DDPM does, so that the decoder
                   variance is not needlessly large).
    learned_range: log σ_t² = v log β_t + (1 - v) log β̃_t with v = (out + 1)/2 (iDDPM eq. 15).
    learned:       log σ_t² = out.
    """
    if var_type == "fixed_small":
        return jnp.broadcast_to(extract(sched.posterior_log_variance_clipped, t, shape), shape)
    if var_type == "fixed_large":
        large = jnp.concatenate([sched.posterior_variance[1:2], sched.betas[1:]])
        return jnp.broadcast_to(extract(jnp.log(large), t, shape), shape)
    if var_type == "learned_range":
        frac = (var_out + 1.0) / 2.0
        min_log = extract(sched.posterior_log_variance_clipped, t, shape)
        max_log = extract(jnp.log(sched.betas), t, shape)
        return frac * max_log + (1.0 - frac) * min_log
    if var_type == "learned":
        return var_out
    raise ValueError(f"unknown var_type {var_type!r}; choose one of {VAR_TYPES}")


def p_mean_variance(
    sched: Schedule,
    model_out,
    xt,
    t,
    *,
    prediction: str = "eps",
    var_type: str = "fixed_large",
    clip_x0: float | None = None,
):
    """Mean and log-variance of p_θ(x_{t-1} | x_t) from a network output.

    μ_θ(x_t, t) = μ̃_t(x̂_0, x_t), the posterior mean at the predicted x̂_0. For ε-prediction this
    equals 1/√α_t (x_t - β_t/√(1-ᾱ_t) ε̂) (Algorithm 2). Note the ε̂ coefficient is
    β_t/√(1-ᾱ_t); the lecture's (x_t - β_t ε̂)/√(1-β_t) drops the √(1-ᾱ_t) and is a slip.
    ``clip_x0`` clips x̂_0 to [-c, c] before forming the mean (images live in [-1, 1]).
    Returns a dict with mean, logvar, x0 and eps.
    """
    pred, var_out = split_model_output(model_out, var_type)
    x0, eps = x0_eps_from_prediction(sched, prediction, xt, t, pred)
    if clip_x0 is not None:
        x0 = jnp.clip(x0, -clip_x0, clip_x0)
        eps = eps_from_x0(sched, xt, t, x0)
    mean, _, _ = q_posterior_mean_variance(sched, x0, xt, t)
    logvar = model_log_variance(sched, t, xt.shape, var_type, var_out)
    return {"mean": mean, "logvar": logvar, "x0": x0, "eps": eps}


# ---------------------------------------------------------------------------------------------
# Likelihoods and the variational bound


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(μ₁, σ₁²) ‖ N(μ₂, σ₂²)) elementwise, in nats.

    = ½ (log σ₂² - log σ₁² + (σ₁² + (μ₁ - μ₂)²)/σ₂² - 1).
    """
    return 0.5 * (
        logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * jnp.exp(-logvar2)
        - 1.0
    )


def gaussian_log_likelihood(x, mean, logvar):
    """log N(x; μ, σ²) elementwise = -½ (log 2π + log σ² + (x-μ)²/σ²)."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (x - mean) ** 2 * jnp.exp(-logvar))


def _standard_normal_cdf(x):
    return 0.5 * (1.0 + jax.scipy.special.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x, mean, logvar, *, bins: int = 256):
    """log p(x | x_1) for data on ``bins`` levels in [-1, 1] (Ho et al. eq. 13).

    Each value x owns the interval [x - 1/(bins-1), x + 1/(bins-1)] except the two edges, which
    own (-∞, -1 + 1/(bins-1)] and [1 - 1/(bins-1), ∞); the likelihood is the Gaussian mass of
    that interval.
    """
    half_width = 1.0 / (bins - 1)
    inv_std = jnp.exp(-0.5 * logvar)
    cdf_plus = _standard_normal_cdf(inv_std * (x - mean + half_width))
    cdf_minus = _standard_normal_cdf(inv_std * (x - mean - half_width))
    tiny = 1e-12
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, tiny))
    log_one_minus_cdf_minus = jnp.log(jnp.maximum(1.0 - cdf_minus, tiny))
    log_mass = jnp.log(jnp.maximum(cdf_plus - cdf_minus, tiny))
    return jnp.where(
        x < -1.0 + 1e-3,
        log_cdf_plus,
        jnp.where(x > 1.0 - 1e-3, log_one_minus_cdf_minus, log_mass),
    )


def mean_flat(x):
    """Mean over every axis but the first (batch)."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def sum_flat(x):
    """Sum over every axis but the first (batch)."""
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def vlb_term(
    sched: Schedule, p_mean, p_logvar, x0, xt, t, *, decoder: str = "discretized", bins: int = 256
):
    """One term of the bound per example, in nats summed over dimensions.

    t > 0 (paper's t ≥ 2): L_{t-1} = KL(q(x_{t-1} | x_t, x_0) ‖ p_θ(x_{t-1} | x_t)).
    t = 0 (paper's t = 1): L_0 = -log p_θ(x_0 | x_1), with the discretised Gaussian decoder for
    images quantised to ``bins`` levels (256: 8 bits) or ``decoder="gaussian"`` (the continuous
    density) for real-valued data.
    """
    q_mean, _, q_logvar = q_posterior_mean_variance(sched, x0, xt, t)
    kl = sum_flat(normal_kl(q_mean, q_logvar, p_mean, p_logvar))
    if decoder == "discretized":
        nll = -sum_flat(discretized_gaussian_log_likelihood(x0, p_mean, p_logvar, bins=bins))
    elif decoder == "gaussian":
        nll = -sum_flat(gaussian_log_likelihood(x0, p_mean, p_logvar))
    else:
        raise ValueError(f"unknown decoder {decoder!r}; choose 'discretized' or 'gaussian'")
    return jnp.where(t == 0, nll, kl)


def prior_term(sched: Schedule, x0):
    """L_T = KL(q(x_T | x_0) ‖ N(0, I)) per example, in nats summed over dimensions."""
    t_last = jnp.full((x0.shape[0],), sched.num_timesteps - 1, dtype=jnp.int32)
    mean, var = q_mean_variance(sched, x0, t_last)
    return sum_flat(normal_kl(mean, jnp.log(var), 0.0, 0.0))


def variational_bound(
    sched: Schedule,
    model_fn,
    x0,
    key,
    *,
    prediction: str = "eps",
    var_type: str = "fixed_large",
    decoder: str = "discretized",
    bins: int = 256,
    clip_x0: float | None = None,
):
    """The full bound L = L_T + Σ_{t≥2} L_{t-1} + L_0 (Ho et al. eq. 5) for a batch x0.

    ``model_fn(xt, t) -> output`` is the network with its parameters bound. Each term samples
    its own x_t ~ q(x_t | x_0); the sum is an unbiased estimate of -ELBO. The timesteps are
    scanned (not unrolled), so memory is that of one network call.
    Returns per-example totals in nats and bits per dimension, and the terms (B, T) in nats.
    """
    num_dims = math.prod(x0.shape[1:])
    batch = x0.shape[0]

    def term(_, t_scalar):
        t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(key, t_scalar), x0.shape, x0.dtype)
        xt = q_sample(sched, x0, t, noise)
        p = p_mean_variance(
            sched, model_fn(xt, t), xt, t, prediction=prediction, var_type=var_type, clip_x0=clip_x0
        )
        return None, vlb_term(sched, p["mean"], p["logvar"], x0, xt, t, decoder=decoder, bins=bins)

    _, terms = jax.lax.scan(term, None, jnp.arange(sched.num_timesteps))
    terms = terms.T  # (B, T)
    prior = prior_term(sched, x0)
    total = prior + jnp.sum(terms, axis=1)
    return {
        "total_nats": total,
        "bpd": total / (num_dims * math.log(2.0)),
        "prior_nats": prior,
        "terms_nats": terms,
    }
