"""Itô stochastic differential equations: Wiener paths, Euler–Maruyama, the VP-SDE.

An Itô SDE

    dX = mu(X, t) dt + sigma(X, t) dW

is held as data, `ItoSDE(drift, diffusion)`, and everything else is a pure function of it.

Conventions (shared by every function here):
- ``x`` is an array of any shape, usually ``(batch, ...)`` (NHWC for images).
- ``t`` is a scalar time: all examples of a batch share the time grid of one simulation.
- ``drift(x, t)`` returns an array of ``x``'s shape.
- ``diffusion(x, t)`` returns an array *broadcastable* to ``x``'s shape that multiplies the Wiener
  increment elementwise (diagonal noise): a scalar for the VP-SDE, or a per-element array.
- Time may run backward (``t1 < t0``): a reverse-time SDE is written in the same form, with a
  negative ``dt`` and a reverse-time Wiener increment of variance ``|dt|`` (Song et al. 2021).

The VP-SDE of score_sde (Song et al., "Score-Based Generative Modeling through Stochastic
Differential Equations", ICLR 2021) with the linear beta(t) on t in [0, 1] is the continuous-time
limit of DDPM: with N steps of size 1/N, the discrete DDPM beta_i is the integral of beta(t) over
step i, beta_i ≈ beta(t_i) / N. For beta_min = 0.1, beta_max = 20 and N = 1000 this gives DDPM's
linear schedule from 1e-4 to 0.02.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp

Array = jax.Array
DriftFn = Callable[[Array, Array], Array]
ScoreFn = Callable[[Array, Array], Array]


@dataclasses.dataclass(frozen=True)
class ItoSDE:
    """The Itô SDE dX = drift(X, t) dt + diffusion(X, t) dW.

    Attributes:
      drift: mu(x, t) -> array of x's shape.
      diffusion: sigma(x, t) -> array broadcastable to x's shape (a scalar, or elementwise);
        it multiplies the Wiener increment elementwise (diagonal noise).

    Frozen and hashable (by the identity of its two functions), so it can be a static argument
    of `jax.jit`.
    """

    drift: DriftFn
    diffusion: DriftFn


# --- Wiener process and Euler–Maruyama --------------------------------------------------------


def wiener_paths(
    key: Array, num_paths: int, num_steps: int, t_end: float, dim: int = 1
) -> tuple[Array, Array]:
    """Sampled paths of a standard Wiener process on the grid t_n = n t_end / num_steps.

    W_0 = 0 and W_{t_{n+1}} = W_{t_n} + dW_n with independent dW_n ~ N(0, dt I), dt = t_end /
    num_steps: the sum of independent Gaussian increments, so W_t - W_s ~ N(0, (t - s) I) on the
    grid exactly.

    Returns:
      ts: shape (num_steps + 1,).
      W: shape (num_paths, num_steps + 1, dim).
    """
    for name, value in (("num_paths", num_paths), ("num_steps", num_steps), ("dim", dim)):
        _check_positive_int(name, value)
    if isinstance(t_end, (int, float)) and t_end <= 0:
        raise ValueError(f"t_end must be positive, got {t_end}")
    dt = t_end / num_steps
    increments = jnp.sqrt(dt) * jax.random.normal(key, (num_paths, num_steps, dim))
    start = jnp.zeros((num_paths, 1, dim), increments.dtype)
    W = jnp.concatenate([start, jnp.cumsum(increments, axis=1)], axis=1)  # (P, num_steps + 1, dim)
    ts = jnp.linspace(0.0, t_end, num_steps + 1)
    return ts, W


def euler_maruyama(
    sde: ItoSDE,
    x0: Array,
    key: Array,
    *,
    t0: float,
    t1: float,
    num_steps: int,
    full_path: bool = True,
) -> tuple[Array, Array]:
    """Simulates the SDE from x(t0) = x0 to t1 with the Euler–Maruyama scheme.

    On the uniform grid t_n = t0 + n dt, dt = (t1 - t0) / num_steps:

        x_{n+1} = x_n + mu(x_n, t_n) dt + sigma(x_n, t_n) sqrt(|dt|) z_n,   z_n ~ N(0, I),

    with z_n drawn from `jax.random.fold_in(key, n)`. dt is negative when t1 < t0 (reverse time).
    The steps run in `jax.lax.scan`; jit it with `sde`, `num_steps` and `full_path` static.

    Returns:
      ts: the time grid, shape (num_steps + 1,).
      xs: the path, shape (num_steps + 1, *x0.shape), with xs[0] = x0; or only the end state
        x(t1), shape x0.shape, when full_path is False.
    """
    if not isinstance(sde, ItoSDE):
        raise TypeError(f"sde must be an ItoSDE, got {type(sde).__name__}")
    _check_positive_int("num_steps", num_steps)
    if isinstance(t0, (int, float)) and isinstance(t1, (int, float)) and t0 == t1:
        raise ValueError(f"t0 and t1 must differ, got t0 = t1 = {t0}")
    x0 = jnp.asarray(x0)
    if not jnp.issubdtype(x0.dtype, jnp.floating):
        raise ValueError(f"x0 must be a floating-point array, got dtype {x0.dtype}")

    # The time grid is at least float32 even for bfloat16 states; the state keeps its dtype.
    ts = jnp.linspace(t0, t1, num_steps + 1, dtype=jnp.promote_types(x0.dtype, jnp.float32))

    def step(x, n):
        t, dt = ts[n], ts[n + 1] - ts[n]
        z = jax.random.normal(jax.random.fold_in(key, n), x.shape, x.dtype)
        x_next = x + sde.drift(x, t) * dt + sde.diffusion(x, t) * jnp.sqrt(jnp.abs(dt)) * z
        x_next = x_next.astype(x.dtype)
        return x_next, (x_next if full_path else None)

    x_end, path = jax.lax.scan(step, x0, jnp.arange(num_steps))  # path: (num_steps, *x0.shape)
    if not full_path:
        return ts, x_end
    return ts, jnp.concatenate([x0[None], path], axis=0)  # (num_steps + 1, *x0.shape)


# --- The variance-preserving SDE --------------------------------------------------------------


class BetaSchedule(Protocol):
    """A continuous noise rate beta(t) >= 0 with its integral from s to t."""

    def __call__(self, t: Array) -> Array: ...

    def integral(self, t: Array, s: Array = 0.0) -> Array: ...


@dataclasses.dataclass(frozen=True)
class LinearBeta:
    """The linear noise rate beta(t) = beta_min + t (beta_max - beta_min), t in [0, 1].

    Defaults are score_sde's VP-SDE (0.1, 20), the continuous limit of DDPM's 1e-4 .. 0.02 over
    1000 steps.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0

    def __post_init__(self):
        if not 0 <= self.beta_min <= self.beta_max:
            raise ValueError(
                f"LinearBeta needs 0 <= beta_min <= beta_max, got beta_min={self.beta_min}, "
                f"beta_max={self.beta_max}"
            )

    def __call__(self, t: Array) -> Array:
        """beta(t) = beta_min + t (beta_max - beta_min)."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integral(self, t: Array, s: Array = 0.0) -> Array:
        """int_s^t beta(u) du = beta_min (t - s) + (beta_max - beta_min) (t^2 - s^2) / 2."""
        t, s = jnp.asarray(t), jnp.asarray(s)
        return self.beta_min * (t - s) + 0.5 * (self.beta_max - self.beta_min) * (t**2 - s**2)


def vp_sde(beta: Callable[[Array], Array] = LinearBeta()) -> ItoSDE:
    """The variance-preserving SDE dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW.

    The drift shrinks x while the noise adds variance beta(t) dt, so Var x(t) -> 1 from any start
    and exactly stays 1 from Var x(0) = 1. `beta` is any callable t -> beta(t) >= 0.
    """
    return ItoSDE(
        drift=lambda x, t: -0.5 * beta(t) * x,
        diffusion=lambda x, t: jnp.sqrt(beta(t)),
    )


def vp_marginal(x0: Array, t: Array, beta: BetaSchedule = LinearBeta()) -> tuple[Array, Array]:
    """Mean and standard deviation of the VP-SDE's marginal p(x(t) | x(0) = x0).

        mean = x0 exp(-1/2 B(t)),   std^2 = 1 - exp(-B(t)),   B(t) = int_0^t beta(u) du.

    `t` is a scalar, or has shape (batch,) and is broadcast over x0's trailing axes (NHWC images
    with one time per example); a scalar x0 with an array t gives the curves over t. The std has
    t's shape with unit axes appended, so it broadcasts against the mean.
    """
    x0 = jnp.asarray(x0)
    integral = _expand_to(beta.integral(jnp.asarray(t)), x0)
    mean = x0 * jnp.exp(-0.5 * integral)
    std = jnp.sqrt(-jnp.expm1(-integral))  # expm1: exact for small B where 1 - exp(-B) cancels
    return mean, std


def vp_exact_transition(x: Array, beta_integral: Array, z: Array) -> Array:
    """Exact VP-SDE transition over an interval with integrated rate beta = int beta(u) du:

        x_{t+1} = exp(-beta / 2) x_t + sqrt(1 - exp(-beta)) z,   z ~ N(0, I).

    Composing it over consecutive intervals gives `vp_marginal` exactly (the integrals add).
    """
    return jnp.exp(-0.5 * beta_integral) * x + jnp.sqrt(-jnp.expm1(-beta_integral)) * z


def vp_discrete_step(x: Array, beta: Array, z: Array) -> Array:
    """The DDPM forward step, the first-order discretisation of `vp_exact_transition`:

        x_{t+1} = sqrt(1 - beta_t) x_t + sqrt(beta_t) z,   z ~ N(0, I).

    exp(-beta/2) - sqrt(1 - beta) = beta^2/4 + O(beta^3) and (1 - exp(-beta)) - beta =
    -beta^2/2 + O(beta^3): the mean coefficient and the variance agree to first order in beta
    (the noise coefficient sqrt(1 - exp(-beta)) - sqrt(beta) is O(beta^{3/2})). With N steps on
    [0, 1], beta_t = beta_i ≈ beta(t_i) / N. Needs 0 <= beta < 1 (NaN otherwise): N > beta_max.
    """
    return jnp.sqrt(1.0 - beta) * x + jnp.sqrt(beta) * z


# --- Reverse time -----------------------------------------------------------------------------


def reverse_sde(sde: ItoSDE, score_fn: ScoreFn, probability_flow: bool = False) -> ItoSDE:
    """The reverse-time SDE (Anderson 1982) or the probability-flow ODE of `sde`.

    Reverse SDE:       dx = [mu(x, t) - sigma(x, t)^2 score(x, t)] dt + sigma(x, t) dW_bar,
    probability flow:  dx = [mu(x, t) - 1/2 sigma(x, t)^2 score(x, t)] dt,

    with score(x, t) = grad_x log p_t(x), dt < 0 and W_bar a reverse-time Wiener process. Both
    have the forward SDE's marginals p_t; simulate them with `euler_maruyama` from t0 = 1 down to
    t1 ≈ 0. Valid for a diffusion that does not depend on x (VP, VE, sub-VP); otherwise
    Anderson's drift has an extra divergence term.
    """
    weight = 0.5 if probability_flow else 1.0

    def drift(x, t):
        return sde.drift(x, t) - weight * sde.diffusion(x, t) ** 2 * score_fn(x, t)

    def diffusion(x, t):
        return jnp.zeros((), x.dtype) if probability_flow else sde.diffusion(x, t)

    return ItoSDE(drift=drift, diffusion=diffusion)


# --- Helpers ----------------------------------------------------------------------------------


def _expand_to(t: Array, x: Array) -> Array:
    """Appends unit axes to t so that a per-example t of shape (batch,) broadcasts against x."""
    return t.reshape(t.shape + (1,) * max(x.ndim - t.ndim, 0))


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
