"""The optimizer and the EMA of the parameters, from `config.optim`."""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax


def make_lr_schedule(optim_cfg, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the learning rate, then constant or cosine decay to 0."""
    lr, warmup = optim_cfg.learning_rate, optim_cfg.warmup_steps
    if optim_cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, lr, warmup_steps=warmup, decay_steps=max(num_steps, warmup + 1)
        )
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)], [warmup]
    )


def make_optimizer(optim_cfg, num_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping, then Adam or AdamW on the schedule above."""
    lr = make_lr_schedule(optim_cfg, num_steps)
    kw = dict(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps)
    if optim_cfg.name == "adamw":
        opt = optax.adamw(lr, weight_decay=optim_cfg.weight_decay, **kw)
    else:
        opt = optax.adam(lr, **kw)
    if optim_cfg.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), opt)
    return opt


class EmaState(NamedTuple):
    """An exponential moving average of the parameters (optax-style state)."""

    params: dict


def ema_init(params) -> EmaState:
    return EmaState(params=jax.tree.map(lambda p: p.copy(), params))


def ema_update(state: EmaState, params, decay: float) -> EmaState:
    """θ_ema ← decay · θ_ema + (1 - decay) · θ."""
    return EmaState(
        params=jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.params, params)
    )
