"""The jitted train step: one function for every method (the loss is what differs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from diffusax.train.optim import ema_update
from diffusax.train.state import TrainState


def make_train_step(loss_fn, optimizer, *, ema_decay: float, seed: int, skip_nonfinite: bool):
    """train_step(state, batch) -> (state, metrics), pure and jit-able.

    The step's key is fold_in(key(seed), step): no RNG state, and a resumed run draws exactly
    the keys an uninterrupted one would. With ``skip_nonfinite`` a step whose loss or gradient
    is not finite leaves params, optimizer state and EMA bitwise unchanged (the step counter
    still advances, so the data position moves past the bad batch) and counts into
    ``bad_steps``; a finite step resets it.
    """
    base_key = jax.random.key(seed)

    def train_step(state: TrainState, batch):
        key = jax.random.fold_in(base_key, state.step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, metrics), grads = grad_fn(state.params, batch, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema, params, ema_decay)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = TrainState(state.step + 1, params, opt_state, ema, jnp.zeros((), jnp.int32))
        if skip_nonfinite:
            keep = lambda n, o: jnp.where(finite, n, o)
            new = TrainState(
                step=state.step + 1,
                params=jax.tree.map(keep, params, state.params),
                opt_state=jax.tree.map(keep, opt_state, state.opt_state),
                ema=jax.tree.map(keep, ema, state.ema),
                bad_steps=jnp.where(finite, 0, state.bad_steps + 1),
            )
        metrics = dict(metrics, grad_norm=grad_norm, finite=finite, bad_steps=new.bad_steps)
        return new, metrics

    return train_step
