"""The training state and its creation directly in its sharding."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from diffusax import models
from diffusax.train.optim import EmaState, ema_init


class TrainState(NamedTuple):
    """Everything a step reads and writes; a pytree of arrays (checkpointed whole)."""

    step: jax.Array  # int32 scalar: the number of batches consumed so far
    params: dict  # pure dict of the network's parameters
    opt_state: optax.OptState
    ema: EmaState
    bad_steps: jax.Array  # int32 scalar: consecutive non-finite steps (the "skip" policy)


def model_builder(cfg, image_shape, num_classes):
    """A function key -> nnx model for this config (used under eval_shape and jit)."""
    from diffusax import diffusion

    learned = cfg.diffusion.var_type in diffusion.LEARNED_VAR_TYPES

    def build(key):
        return models.build_model(
            cfg.model,
            image_shape=image_shape,
            num_classes=num_classes,
            learned_variance=learned,
            rngs=nnx.Rngs(params=key),
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


def _init_state(build, optimizer, key) -> TrainState:
    _, params = split_params(build(key))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ema=ema_init(params),
        bad_steps=jnp.zeros((), jnp.int32),
    )


def create_train_state(build, optimizer, key, shardings=None) -> TrainState:
    """Initialise the state; with ``shardings`` the arrays are born sharded (jit out_shardings)."""
    return jax.jit(lambda k: _init_state(build, optimizer, k), out_shardings=shardings)(key)


def abstract_train_state(build, optimizer, key) -> TrainState:
    """The state's shapes and dtypes, without allocating it."""
    return jax.eval_shape(lambda k: _init_state(build, optimizer, k), key)
