"""The training state of any method, and its creation directly in its sharding.

A method's trainable groups, their optimizer states and the EMAs are dicts by name, so one
state type serves DDPM (one group, one EMA), an autoencoder with its discriminator (two
groups, two optimizers) and LoRA (a group holding a subset of one network's parameters).
Frozen trees are not part of it: they travel beside it (``train.build.Run.frozen``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from diffusax.train.optim import ema_init

# The layout of TrainState as saved; recorded in every checkpoint's `extra` item. Checkpoints
# written before it was recorded (one parameter tree, ``ema.params``) are refused by name.
STATE_LAYOUT = 2


class TrainState(NamedTuple):
    """Everything a step reads and writes; a pytree of arrays (checkpointed whole)."""

    step: jax.Array  # int32 scalar: the number of batches consumed so far
    params: dict  # {group: pure dict of the group's trainable parameters}
    opt_state: dict  # {group: optax state}
    ema: dict  # {EMA name: tree shaped as params[its group]}
    bad_steps: jax.Array  # int32 scalar: consecutive non-finite steps (the "skip" policy)


def model_builder(cfg, image_shape, num_classes, condition=None):
    """A function key -> the diffusion network of this config (used under eval_shape and jit).

    ``condition`` (``conditions.Condition``): the network takes it through its condition
    encoder (``conditions.encoder_kwargs``)."""
    from diffusax import conditions, diffusion, models

    learned = cfg.diffusion.var_type in diffusion.LEARNED_VAR_TYPES
    conditioning = None if condition is None else conditions.encoder_kwargs(cfg, condition)

    def build(key):
        return models.build_model(
            cfg.model,
            image_shape=image_shape,
            num_classes=num_classes,
            learned_variance=learned,
            rngs=nnx.Rngs(params=key),
            conditioning=conditioning,
        )

    return build


def split_params(model):
    """(graphdef, pure dict of parameters); the model must hold nothing but parameters."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError("the model holds non-parameter state, which the train state cannot carry")
    return graphdef, nnx.to_pure_dict(params)


def model_graphdef(build, key):
    """The network's graph definition, without allocating its parameters.

    Kept on ``build`` after the first call: the structure does not depend on the key, and
    tracing a large model's construction takes seconds.
    """
    graphdef = getattr(build, "graphdef", None)
    if graphdef is None:
        graphdef = split_params(nnx.eval_shape(lambda: build(key)))[0]
        build.graphdef = graphdef
    return graphdef


# ---------------------------------------------------------------------------------------------
# Trainable subsets of one network's parameters (pure dicts, split and merged by path)


def flat_paths(tree) -> dict[tuple, object]:
    """{(key, ...): leaf} of a nested pure dict."""
    return {
        tuple(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _unflatten(flat: dict[tuple, object]) -> dict:
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return out


def split_tree(tree: dict, selected: frozenset) -> tuple[dict, dict]:
    """(the leaves whose path is in ``selected``, the others), each a nested pure dict."""
    flat = flat_paths(tree)
    unknown = selected - set(flat)
    if unknown:
        raise ValueError(f"parameter paths not in the network: {sorted(unknown)[:5]}")
    chosen = {p: x for p, x in flat.items() if p in selected}
    rest = {p: x for p, x in flat.items() if p not in selected}
    return _unflatten(chosen), _unflatten(rest)


def merge_trees(a: dict, b: dict) -> dict:
    """The union of two nested dicts with disjoint leaves (``split_tree``'s inverse)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge_trees(out[k], v) if k in out and isinstance(v, dict) else v
    return out


def subset_paths(abstract_model, subset) -> frozenset:
    """The parameter paths a ``methods.Group.subset`` selects in an (abstract) nnx model.

    ``subset`` is a predicate over the path tuple, or an nnx variable type (``nnx.LoRAParam``):
    the parameters of that type.
    """
    if isinstance(subset, type) and issubclass(subset, nnx.Variable):
        _, chosen, _ = nnx.split(abstract_model, subset, ...)
        return frozenset(flat_paths(nnx.to_pure_dict(chosen)))
    _, params = split_params(abstract_model)
    return frozenset(p for p in flat_paths(params) if subset(p))


# ---------------------------------------------------------------------------------------------
# Creation


def init_state(params: dict, optimizers: dict, emas: dict) -> TrainState:
    """The state at step 0 for ``params`` {group: tree}; ``emas`` {name: methods.Ema}."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state={g: optimizers[g].init(p) for g, p in params.items()},
        ema={name: ema_init(params[e.group]).params for name, e in emas.items()},
        bad_steps=jnp.zeros((), jnp.int32),
    )


def create_train_state(init_params, optimizers, emas, key, shardings=None, *args) -> TrainState:
    """``init_params(key, *args) -> {group: tree}`` to the step-0 state; with ``shardings`` the
    arrays are born sharded (jit out_shardings). ``args`` (loaded trees) are jit arguments."""
    fn = lambda k, *a: init_state(init_params(k, *a), optimizers, emas)
    return jax.jit(fn, out_shardings=shardings)(key, *args)


def abstract_train_state(abstract_params, optimizers, emas) -> TrainState:
    """The state's shapes and dtypes from those of its parameters, without allocating it."""
    return jax.eval_shape(lambda p: init_state(p, optimizers, emas), abstract_params)


__all__ = [
    "STATE_LAYOUT",
    "TrainState",
    "abstract_train_state",
    "create_train_state",
    "flat_paths",
    "merge_trees",
    "model_builder",
    "model_graphdef",
    "split_params",
    "split_tree",
    "subset_paths",
]
