"""The jitted train step: one function for every method (the loss is what differs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from diffusax import parallel
from diffusax.train.optim import ema_update
from diffusax.train.state import TrainState


def make_train_step(
    loss_fn,
    optimizer,
    *,
    ema_decay: float,
    seed: int,
    skip_nonfinite: bool,
    accum_steps: int = 1,
    mesh=None,
):
    """train_step(state, batch) -> (state, metrics), pure and jit-able.

    The step's key is fold_in(key(seed), step): no RNG state, and a resumed run draws exactly
    the keys an uninterrupted one would. With ``skip_nonfinite`` a step whose loss or gradient
    is not finite leaves params, optimizer state and EMA bitwise unchanged (the step counter
    still advances, so the data position moves past the bad batch) and counts into
    ``bad_steps``; a finite step resets it.

    ``accum_steps`` > 1 accumulates gradients: the batch is cut into that many micro-batches
    (see `split_micro_batches`), one `lax.scan` sums their gradients (the micro-batch k draws
    with fold_in(step key, k)), and their mean makes one optimizer update, as the whole batch
    would: the memory of a micro-batch for the update of the batch. Metrics are the mean over
    micro-batches. ``mesh`` keeps every micro-batch spread over the batch axes of the mesh.
    """
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
    base_key = jax.random.key(seed)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulated_grads(params, batch, key):
        micro = split_micro_batches(batch, accum_steps, mesh)

        def body(total, xs):
            index, micro_batch = xs
            (loss, metrics), grads = grad_fn(params, micro_batch, jax.random.fold_in(key, index))
            return jax.tree.map(jnp.add, total, (loss, metrics, grads)), None

        first = jax.tree.map(lambda x: x[0], micro)
        (loss, metrics), grads = jax.eval_shape(grad_fn, params, first, key)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss, metrics, grads))
        total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
        loss, metrics, grads = jax.tree.map(lambda x: x / accum_steps, total)
        return (loss, metrics), grads

    def train_step(state: TrainState, batch):
        key = jax.random.fold_in(base_key, state.step)
        if accum_steps == 1:
            (loss, metrics), grads = grad_fn(state.params, batch, key)
        else:
            (loss, metrics), grads = accumulated_grads(state.params, batch, key)
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


def split_micro_batches(batch, accum_steps: int, mesh=None):
    """(B, ...) arrays -> (accum_steps, B / accum_steps, ...): micro-batch k = rows k, k + n, ...

    Row r goes to micro-batch r mod n, so when the batch is split over devices in contiguous
    blocks (whose size n divides) every micro-batch keeps the same share of rows on every
    device and nothing moves between devices; with a mesh this layout is pinned by a sharding
    constraint over its batch axes.
    """

    def split(x):
        x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])  # (B/n, n, ...)
        x = jnp.moveaxis(x, 1, 0)  # (n, B/n, ...)
        if mesh is not None:
            x = jax.lax.with_sharding_constraint(
                x, NamedSharding(mesh, PartitionSpec(None, parallel.BATCH_AXES))
            )
        return x

    return jax.tree.map(split, batch)
