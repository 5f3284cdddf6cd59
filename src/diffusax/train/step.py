"""The jitted train step: one function for every method (its updates are what differ)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from diffusax import parallel
from diffusax.train.optim import EmaState, ema_update
from diffusax.train.state import TrainState


def make_train_step(
    updates,
    optimizers: dict,
    emas: dict,
    *,
    seed: int,
    skip_nonfinite: bool,
    accum_steps: int = 1,
    mesh=None,
):
    """train_step(state, frozen, batch) -> (state, metrics), pure and jit-able.

    ``updates``: the method's ``GradUpdate`` list, applied in order: each takes the gradient of
    its loss for its group alone, at the parameters the earlier updates left, and makes one
    update with ``optimizers[group]``. Then every EMA of ``emas`` ({name: methods.Ema}) moves
    towards its group's new parameters. ``frozen`` ({network: tree}) is read, never written.

    The step's key is fold_in(key(seed), step): no RNG state, and a resumed run draws exactly
    the keys an uninterrupted one would; update i > 0 draws from fold_in of it. With
    ``skip_nonfinite`` a step whose losses or gradients are not all finite leaves the whole
    state (every group, optimizer state and EMA) bitwise unchanged (the step counter still
    advances, so the data position moves past the bad batch) and counts into ``bad_steps``; a
    finite step resets it.

    ``accum_steps`` > 1 accumulates gradients: the batch is cut into that many micro-batches
    (see `split_micro_batches`), one `lax.scan` sums their gradients (the micro-batch k draws
    with fold_in(update key, k)), and their mean makes one optimizer update, as the whole batch
    would: the memory of a micro-batch for the update of the batch. Metrics are the mean over
    micro-batches. ``mesh`` keeps every micro-batch spread over the batch axes of the mesh.

    Metrics: the first update's as they are (its "loss" is the run's loss, "grad_norm" its
    gradient norm), a later update's under its ``metrics_prefix``; "finite" and "bad_steps".
    """
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
    if not updates:
        raise ValueError("a method needs at least one update")
    base_key = jax.random.key(seed)

    def group_grad_fn(update):
        def loss_of_group(group_params, params, frozen, batch, key, step, ema):
            args = (frozen, batch, key, step) if update.with_step else (frozen, batch, key)
            kwargs = {"ema": ema} if update.with_ema else {}
            return update.loss({**params, update.group: group_params}, *args, **kwargs)

        return jax.value_and_grad(loss_of_group, has_aux=True)

    grad_fns = [group_grad_fn(u) for u in updates]

    def accumulated_grads(grad_fn, group_params, params, frozen, batch, key, step, ema):
        micro = split_micro_batches(batch, accum_steps, mesh)

        def body(total, xs):
            index, micro_batch = xs
            key_k = jax.random.fold_in(key, index)
            out = grad_fn(group_params, params, frozen, micro_batch, key_k, step, ema)
            return jax.tree.map(jnp.add, total, out), None

        first = jax.tree.map(lambda x: x[0], micro)
        shapes = jax.eval_shape(grad_fn, group_params, params, frozen, first, key, step, ema)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
        return jax.tree.map(lambda x: x / accum_steps, total)

    def train_step(state: TrainState, frozen, batch):
        step_key = jax.random.fold_in(base_key, state.step)
        params, opt_state = dict(state.params), dict(state.opt_state)
        metrics, finite = {}, jnp.asarray(True)
        for i, (update, grad_fn) in enumerate(zip(updates, grad_fns, strict=True)):
            key = (
                step_key
                if i == 0
                else jax.random.fold_in(jax.random.fold_in(step_key, 0x7FFFFFFF), i)
            )
            g = update.group
            if accum_steps == 1:
                (loss, aux), grads = grad_fn(
                    params[g], params, frozen, batch, key, state.step, state.ema
                )
            else:
                (loss, aux), grads = accumulated_grads(
                    grad_fn, params[g], params, frozen, batch, key, state.step, state.ema
                )
            change, opt_state[g] = optimizers[g].update(grads, opt_state[g], params[g])
            params[g] = optax.apply_updates(params[g], change)
            grad_norm = optax.global_norm(grads)
            finite = finite & jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            prefix = update.metrics_prefix
            metrics.update({prefix + k: v for k, v in dict(aux, grad_norm=grad_norm).items()})
            if prefix:
                metrics[prefix + "loss"] = loss
        ema = {
            name: ema_update(EmaState(state.ema[name]), params[e.group], e.decay).params
            for name, e in emas.items()
        }
        new = TrainState(state.step + 1, params, opt_state, ema, jnp.zeros((), jnp.int32))
        if skip_nonfinite:
            keep = lambda n, o: jnp.where(finite, n, o)
            new = TrainState(
                step=state.step + 1,
                params=jax.tree.map(keep, new.params, state.params),
                opt_state=jax.tree.map(keep, new.opt_state, state.opt_state),
                ema=jax.tree.map(keep, new.ema, state.ema),
                bad_steps=jnp.where(finite, 0, state.bad_steps + 1),
            )
        metrics = dict(metrics, finite=finite, bad_steps=new.bad_steps)
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
