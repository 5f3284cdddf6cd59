"""What a method declares: its networks, trainable groups, optimizers, EMAs and updates.

A method is one registered object (``diffusax.methods.register``). The one loop, the
checkpoints, inference, `make info` and the benchmarks ask it, through ``train.build``:

    networks(cfg, data)  -> {name: Network}   what to build; trainable, or frozen with a source
    groups(cfg)          -> {name: Group}     the trainable parameter groups, one optimizer each
    emas(cfg)            -> {name: Ema}       moving averages of groups
    updates(cfg, ctx)    -> [GradUpdate]      the gradient updates of one step, in order
    validate(cfg)                              its own config fields (ConfigError naming one)
    prepare(cfg)                               `make train`: what the run needs first
    sample_params(state, frozen, cfg)          what inference samples or evaluates with
    make_sampler(run, sample_cfg)              its sampler (None: it draws no samples)
    sample_conditions(run, num, sample_cfg)    the labels / prompts / embeddings it samples
    sample_to_disk(cfg, workdir)               `make sample` (default: the run's checkpoint)
    interpolate_to_disk, variations_to_disk    `--mode=interpolate`, `--mode=variations`
    describe_run(cfg)                          `make info` (default: the built run's networks)
    modes                                      the --mode values it runs
    evaluate(cfg, workdir), format_report(r)   `make eval`

A trainable group is a whole network or a subset of one network's parameters (the LoRA case:
``Group(network, subset=...)``, a predicate over parameter paths or an nnx variable type). The
rest of that network is frozen: gradients, optimizer moments and EMAs exist for the subset
only. Frozen trees travel beside the train state: not donated, not checkpointed (the
checkpoint records their source and digest).

Every loss of a ``GradUpdate`` has the signature ``loss(params, frozen, batch, key) -> (loss,
metrics)``; ``params`` are all trainable groups (updated by the earlier updates of the step),
``frozen`` the frozen trees; the gradient is taken for ``GradUpdate.group`` alone. Use
``ctx.network_params(name, params, frozen)`` for a network's whole parameter tree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from diffusax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Network:
    """One network of a method.

    build:     key -> nnx.Module (called under eval_shape and jit; the module holds only
               parameters).
    trainable: False for a frozen network (a teacher, a feature extractor, a fixed VAE).
    source:    frozen only: where its weights come from, for the checkpoint's record and the
               error messages (e.g. "run:runs/ddpm_digits", "diffusers:/models/sd-vae").
    load:      frozen only: () -> the pure parameter dict (read once, when the run is built).
    init_from: trainable only: () -> a pure parameter dict the network starts from instead of
               its initialisation (a student that starts as its teacher). Its leaves replace
               those of the initialised tree at the same paths; the others (parameters the
               teacher lacks, like a guidance embedding) keep their initialisation.
    """

    build: Callable[[Any], Any]
    trainable: bool = True
    source: str = ""
    load: Callable[[], dict] | None = None
    init_from: Callable[[], dict] | None = None


@dataclasses.dataclass(frozen=True)
class Group:
    """A trainable parameter group: a network, or a subset of its parameters.

    subset: None (every parameter), a predicate ``path -> bool`` over the parameter path (a
            tuple of str keys), or an nnx variable type (e.g. ``nnx.LoRAParam``).
    optim:  the config section of its optimizer ("optim", "disc_optim", ...).
    """

    network: str
    optim: str = "optim"
    subset: Any = None


@dataclasses.dataclass(frozen=True)
class Ema:
    """θ_ema ← decay · θ_ema + (1 - decay) · θ over the parameters of ``group``."""

    group: str
    decay: float


@dataclasses.dataclass(frozen=True)
class GradUpdate:
    """One optimizer update of ``group`` on ``loss(params, frozen, batch, key)``.

    ``metrics_prefix``: the update's metrics and gradient norm are logged under this prefix
    ("" for the first update, whose "loss" is the run's loss).
    """

    group: str
    loss: Callable
    metrics_prefix: str = ""
    # True: the loss also takes the step, ``loss(params, frozen, batch, key, step)`` (a term
    # that starts at some step, like the autoencoder's discriminator).
    with_step: bool = False
    # True: the loss also takes the EMAs as they were before this step, as ``ema={name: tree}``
    # (a consistency model's target network θ⁻); no gradient flows into them.
    with_ema: bool = False


class Method:
    """Base class of a registered method; subclasses override what they need."""

    name: str = ""
    # The config sections whose fields shape the networks' parameters: a resume that changes
    # one of them is refused, naming it (``config.digest_fields``).
    param_sections: tuple[str, ...] = ("model",)
    # `make eval` reports bits/dim from the model's variational bound on the data (a pixel
    # diffusion model); a latent model's bound is on latents, so it reports none.
    pixel_bound: bool = True
    # The --mode values it runs; a method that samples a pretrained folder trains nothing.
    modes: tuple[str, ...] = ("train", "sample", "eval", "info", "interpolate", "latents")

    def validate(self, cfg) -> None:
        """ConfigError naming the field for a config this method cannot run."""

    def prepare(self, cfg) -> None:
        """`make train`, before the run is built: make what it needs and lacks (a
        distillation trains its missing teacher)."""

    def networks(self, cfg, data) -> dict[str, Network]:
        """``data``: ``train.build.DataSpec`` (image shape, number of classes)."""
        raise NotImplementedError

    def groups(self, cfg) -> dict[str, Group]:
        raise NotImplementedError

    def emas(self, cfg) -> dict[str, Ema]:
        return {}

    def updates(self, cfg, ctx) -> list[GradUpdate]:
        """``ctx``: ``train.build.Context`` (apply functions, schedule, data spec, mesh)."""
        raise NotImplementedError

    def sample_params(self, state, frozen, cfg) -> dict:
        """The parameter tree inference samples or evaluates with (an EMA, usually)."""
        raise NotImplementedError

    def sample_network(self, cfg) -> str:
        """The name of the network that ``sample_params`` belongs to."""
        raise NotImplementedError

    def make_sampler(self, run, sample_cfg):
        """A jitted ``generate(params, labels, key) -> images in [-1, 1]`` over ``run.mesh``
        with ``sample_cfg``'s settings, or None for a method that draws no samples (the loop
        then writes no sample grid)."""
        return None

    def sample_conditions(self, run, num: int, sample_cfg):
        """(the conditions of ``num`` samples for ``make_sampler``'s generate, or None; a dict
        of what they were: ``labels`` and/or ``prompts`` arrays, written beside samples)."""
        from diffusax.conditions import sample_labels

        labels = sample_labels(num, run.data.num_classes, sample_cfg.label)
        return labels, ({} if labels is None else {"labels": labels})

    def sample_to_disk(self, cfg, workdir: str) -> str:
        """`make sample`: write samples/samples.npz and PNGs; returns the npz's path."""
        from diffusax import inference

        return inference.sample_to_disk(cfg, workdir)

    def interpolate_to_disk(self, cfg, workdir: str) -> str:
        """`--mode=interpolate`: a strip of samples walking between two conditions; returns
        its path (default: between two classes' label embeddings)."""
        from diffusax import inference

        return inference.interpolate_to_disk(cfg, workdir)

    def variations_to_disk(self, cfg, workdir: str) -> str:
        """`--mode=variations` (a method that lists it in ``modes``): variations of an image."""
        raise NotImplementedError

    def describe_run(self, cfg) -> str | None:
        """`make info`'s text, or None for the default (``main.describe_run``: the networks
        and data of the built run)."""
        return None

    def evaluate(self, cfg, workdir: str) -> dict:
        """`make eval`: the method's metrics of the run in ``workdir`` (also written to disk)."""
        from diffusax.evaluate import run as eval_run

        return eval_run.evaluate(cfg, workdir)

    def format_report(self, report: dict) -> str:
        from diffusax.evaluate import run as eval_run

        return eval_run.format_report(report)

    def describe(self, cfg) -> str:
        """One line for `make info`."""
        return self.name

    def describe_sampler(self, cfg) -> str:
        """One line for `make info` ("" when the method draws no samples)."""
        return ""

    def forward_flops(self, run) -> dict:
        """{network: FLOPs of one forward pass on one example, or None if XLA gives none}."""
        return {}


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` under ``method.name`` (its module calls this when imported)."""
    if not method.name:
        raise ValueError(f"{type(method).__name__} has no name")
    _REGISTRY[method.name] = method
    return method


def registered(name: str) -> Method | None:
    return _REGISTRY.get(name)


def registered_names() -> list[str]:
    return sorted(_REGISTRY)


def check_fields(cfg, section: str, *, positive=(), non_negative=(), unit_interval=()) -> None:
    """The usual range checks over ``cfg[section]``'s fields, ConfigError naming the field."""
    node = cfg[section]
    for name in positive:
        if not node[name] > 0:
            raise ConfigError(f"config field '{section}.{name}' must be > 0, got {node[name]!r}")
    for name in non_negative:
        if not node[name] >= 0:
            raise ConfigError(f"config field '{section}.{name}' must be >= 0, got {node[name]!r}")
    for name in unit_interval:
        if not 0 <= node[name] < 1:
            raise ConfigError(
                f"config field '{section}.{name}' must be in [0, 1), got {node[name]!r}"
            )
