"""Load an experiment's config and validate it before anything is compiled.

    cfg = load_experiment("ddpm_digits", overrides={"train.num_steps": 100})

Experiments are files `experiments/NAME.py` with `get_config(arg=None)`; `--config.a.b=value`
flags (or ``overrides``) change single fields. `experiments/base.py` declares every key, and
``validate`` checks each against it: unknown keys (with a "did you mean"), wrong types, names
that are not one of the choices, and values out of range each raise ``ConfigError`` naming the
field. Checks that need the dataset or the devices are in ``check_runtime``.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from collections.abc import Mapping

import ml_collections

from diffusax import conditions, diffusion, sampling, schedules

EXPERIMENTS_DIR = "experiments"
# experiments/ of the source checkout (src/diffusax/config.py -> ../../experiments).
_CHECKOUT_EXPERIMENTS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), EXPERIMENTS_DIR
)

# Fields whose value must be one of a few names. The method, the model family and the sampler
# are checked against their registries (``_registry_choices``), not listed here.
CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "diffusion.schedule": tuple(schedules.BETA_SCHEDULES),
    "diffusion.prediction": ("", *diffusion.PREDICTIONS),  # "": a pretrained folder's
    "diffusion.var_type": diffusion.VAR_TYPES,
    "optim.name": ("adam", "adamw"),
    "optim.schedule": ("constant", "cosine"),
    "train.nonfinite": ("abort", "skip"),
    "sample.spacing": tuple(sampling.SPACINGS),
    "condition.kind": ("", *conditions.KINDS),
    "text.tokenizer": ("words", "chars"),
    "text.captions": ("digits",),
}


def _registry_choices() -> dict:
    """The names the registries hold (imported here, late: they import this module)."""
    from diffusax import methods, models, sampling

    return {
        "method": tuple(methods.names()),
        "model.name": tuple(models.FAMILIES),
        "sample.sampler": tuple(sampling.SAMPLER_NAMES),
    }


POSITIVE = (
    "model.ch",
    "model.num_res_blocks",
    "model.num_heads",
    "diffusion.num_timesteps",
    "optim.learning_rate",
    "train.batch_size",
    "train.grad_accum_steps",
    "train.num_steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.max_bad_steps",
    "sample.num_samples",
    "sample.batch_size",
    "eval.num_samples",
    "latents.scale_factor",
    "latents.image_size",
    "latents.shard_size",
    "latents.batch_size",
)
NON_NEGATIVE = (
    "seed",
    "optim.warmup_steps",
    "optim.eps",
    "diffusion.vlb_weight",
    "optim.weight_decay",
    "optim.grad_clip",
    "diffusion.min_snr_gamma",
    "sample.num_steps",
    "sample.height",
    "sample.width",
    "sample.eta",
    "sample.clip_x0",
    "train.sample_every",
    "train.grid_samples",
    "eval.bpd_examples",
    "eval.classifier_steps",
    "model.depth",
    "model.hidden_size",
    "model.heads",
)
UNIT_INTERVAL = (
    "model.dropout",
    "diffusion.label_drop_prob",
    "optim.ema_decay",
    "optim.b1",
    "optim.b2",
)
# Tuples of positive ints.
POSITIVE_INTS = ("model.ch_mult", "model.attn_resolutions")


class ConfigError(ValueError):
    """A config that cannot work; the message names the field."""


def _base_config() -> ml_collections.ConfigDict:
    return _load_module(experiment_path("base")).get_base_config()


def _load_module(path: str):
    if not os.path.exists(path):
        raise ConfigError(f"experiment file {path!r} does not exist")
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:  # experiments import `experiments.base`
        sys.path.insert(0, root)
    name = "diffusax_experiment_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def experiment_path(name_or_path: str) -> str:
    """`ddpm_digits` -> `experiments/ddpm_digits.py`; a path is returned as it is.

    A bare name is looked up in ./experiments, then in the checkout diffusax was installed
    from (so notebooks and scripts run from any directory find the bundled experiments).
    """
    if name_or_path.endswith(".py"):
        return name_or_path
    local = os.path.join(EXPERIMENTS_DIR, f"{name_or_path}.py")
    checkout = os.path.join(_CHECKOUT_EXPERIMENTS, f"{name_or_path}.py")
    return local if os.path.exists(local) or not os.path.exists(checkout) else checkout


def load_experiment(
    name_or_path: str, arg: str | None = None, overrides: Mapping[str, object] | None = None
) -> ml_collections.ConfigDict:
    """get_config(arg) of the experiment, with overrides and the runlocal shrink, validated."""
    path = experiment_path(name_or_path)
    cfg = _load_module(path).get_config(arg)
    overrides = dict(overrides or {})
    for key, value in overrides.items():
        _set_field(cfg, key, value)
    return finalize(cfg, path, overrides)


def finalize(cfg, path: str, overrides: Mapping[str, object]) -> ml_collections.ConfigDict:
    """Apply the experiment's `runlocal` shrink when asked, re-apply explicit overrides, validate.

    The overrides go last so that `--config.runlocal=True --config.train.num_steps=50` means 50.
    """
    if cfg.get("runlocal"):
        module = _load_module(path)
        shrink = (
            getattr(module, "runlocal", None)
            or _load_module(os.path.join(os.path.dirname(path) or ".", "base.py")).runlocal
        )
        shrink(cfg)
        for key, value in overrides.items():
            _set_field(cfg, key, value)
    validate(cfg)
    return cfg


def _set_field(cfg, dotted: str, value) -> None:
    node, leaf = _parent_node(cfg, dotted)
    with node.unlocked():
        try:
            node[leaf] = value
        except TypeError as e:  # ml_collections refuses a value of another type
            old = node[leaf]
            raise ConfigError(
                f"config field {dotted!r} must be of type {type(old).__name__}, got {value!r} "
                f"({type(value).__name__})"
            ) from e


def _parent_node(cfg, dotted: str):
    """(the ConfigDict holding ``dotted``, its last name); ConfigError for an unknown field."""
    parent, _, leaf = dotted.rpartition(".")
    node = cfg
    for part in parent.split(".") if parent else ():
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise ConfigError(f"unknown config field {dotted!r}{_suggest(part, list(node))}")
        node = node[part]
    if leaf not in node:
        raise ConfigError(f"unknown config field {dotted!r}{_suggest(leaf, list(node))}")
    return node, leaf


def check_field_name(dotted: str) -> None:
    """ConfigError (with a "did you mean") unless ``dotted`` is a field of experiments/base.py."""
    _parent_node(_base_config(), dotted)


def _suggest(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _flatten(cfg, prefix=""):
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from _flatten(value, path + ".")
        else:
            yield path, value


def _type_ok(value, default) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, (tuple, list)):
        if not isinstance(value, (tuple, list)):
            return False
        # The elements must have the type of the default's elements (ints for model.ch_mult).
        return not default or all(_type_ok(v, default[0]) for v in value)
    return isinstance(value, type(default))


def _type_name(default) -> str:
    if isinstance(default, (tuple, list)) and default:
        return f"tuple of {type(default[0]).__name__}"
    return type(default).__name__


def validate(cfg) -> None:
    """Raise ConfigError naming the first field that cannot work."""
    base = dict(_flatten(_base_config()))
    fields = dict(_flatten(cfg))
    for path, value in fields.items():
        if path not in base:
            raise ConfigError(f"unknown config field {path!r}{_suggest(path, list(base))}")
        if not _type_ok(value, base[path]):
            raise ConfigError(
                f"config field {path!r} must be of type {_type_name(base[path])}, "
                f"got {value!r} ({type(value).__name__})"
            )
    for path, names in {**_registry_choices(), **CHOICES}.items():
        if fields.get(path) not in names:
            raise ConfigError(
                f"config field {path!r} is {fields.get(path)!r}; choose one of {list(names)}"
                f"{_suggest(str(fields.get(path)), names)}"
            )
    for path in POSITIVE:
        if not fields[path] > 0:
            raise ConfigError(f"config field {path!r} must be > 0, got {fields[path]!r}")
    for path in NON_NEGATIVE:
        if not fields[path] >= 0:
            raise ConfigError(f"config field {path!r} must be >= 0, got {fields[path]!r}")
    if fields["model.name"] == "dit":
        _check_dit_sizes(fields)
    _check_guidance_fields(fields)
    _check_latents(fields)
    for path in UNIT_INTERVAL:
        if not 0 <= fields[path] < 1:
            raise ConfigError(f"config field {path!r} must be in [0, 1), got {fields[path]!r}")
    for path in POSITIVE_INTS:
        if any(v < 1 for v in fields[path]):
            raise ConfigError(
                f"config field {path!r} must hold positive ints, got {fields[path]!r}"
            )
    if not fields["model.ch_mult"]:
        raise ConfigError("config field 'model.ch_mult' is empty; give one multiplier per level")
    if fields["data.num_levels"] < 2:
        raise ConfigError(
            f"config field 'data.num_levels' must be >= 2, got {fields['data.num_levels']}"
        )
    if fields["diffusion.schedule"] != "cosine":
        start, end = fields["diffusion.beta_start"], fields["diffusion.beta_end"]
        if not 0 < start <= end < 1:
            raise ConfigError(
                f"config fields 'diffusion.beta_start' ({start}) and 'diffusion.beta_end' ({end}) "
                f"must satisfy 0 < beta_start <= beta_end < 1"
            )
    if fields["sample.label"] < -1:
        raise ConfigError(
            f"config field 'sample.label' must be -1 (every class in turn) or a class index, got "
            f"{fields['sample.label']}"
        )
    if fields["sample.num_steps"] > fields["diffusion.num_timesteps"]:
        raise ConfigError(
            f"config field 'sample.num_steps' ({fields['sample.num_steps']}) exceeds "
            f"'diffusion.num_timesteps' ({fields['diffusion.num_timesteps']})"
        )
    learned = fields["diffusion.var_type"] in diffusion.LEARNED_VAR_TYPES
    if learned and fields["diffusion.prediction"] != "eps":
        raise ConfigError("config field 'diffusion.var_type' learned needs prediction='eps'")
    conditional = fields["model.class_conditional"] or fields["condition.kind"]
    if fields["diffusion.label_drop_prob"] > 0 and not conditional:
        raise ConfigError(
            "config field 'diffusion.label_drop_prob' > 0 needs model.class_conditional=True "
            "(or a condition.kind)"
        )
    if fields["sample.guidance_scale"] != 1.0 and not conditional:
        raise ConfigError(
            "config field 'sample.guidance_scale' needs a class-conditional model (or a "
            "condition.kind)"
        )
    if fields["condition.kind"] and fields["model.name"] != "unet_cond":
        raise ConfigError(
            f"config field 'condition.kind' ({fields['condition.kind']!r}) feeds τθ(y) to a "
            f"cross-attention U-Net: set model.name='unet_cond' (got {fields['model.name']!r})"
        )
    if fields["model.name"] == "unet_cond" and not fields["condition.kind"]:
        raise ConfigError(
            "config field 'model.name' is 'unet_cond' (the cross-attention U-Net): set "
            "condition.kind to label, text or embedding"
        )
    if (
        fields["train.mesh_fsdp"] < 1
        or fields["train.mesh_data"] == 0
        or fields["train.mesh_data"] < -1
    ):
        raise ConfigError("config fields 'train.mesh_data' (-1 or >= 1) / 'train.mesh_fsdp' (>= 1)")
    from diffusax import methods

    methods.get(fields["method"]).validate(cfg)  # the method's own fields


def _check_dit_sizes(fields) -> None:
    """The DiT variant exists and the explicit sizes (model.depth / hidden_size / heads) fit it."""
    from diffusax.models.dit import VARIANTS, resolve_variant

    variant = fields["model.variant"]
    if variant not in VARIANTS:
        raise ConfigError(
            f"config field 'model.variant' is {variant!r}; choose one of "
            f"{sorted(VARIANTS)}{_suggest(variant, VARIANTS)}"
        )
    sizes = {
        "depth": fields["model.depth"] or None,
        "hidden": fields["model.hidden_size"] or None,
        "heads": fields["model.heads"] or None,
    }
    try:
        resolve_variant(variant, **sizes)
    except ValueError as e:
        raise ConfigError(
            f"config fields 'model.hidden_size' / 'model.heads' (0 = the variant's) do not fit "
            f"DiT {variant}: {e}"
        ) from e


def _check_latents(fields) -> None:
    """The latent-shard fields: a source that can be named, no clipping of latents to [-1, 1]."""
    source = fields["latents.source"]
    if source.startswith("folder:") and not source.removeprefix("folder:"):
        raise ConfigError("config field 'latents.source' 'folder:PATH' needs a PATH")
    if fields["latents.auto_encode"] and not fields["latents.dir"]:
        raise ConfigError("config field 'latents.auto_encode' needs latents.dir (where to write)")
    if fields["latents.dir"] and 0 < fields["sample.clip_x0"] <= 1:
        raise ConfigError(
            f"config field 'sample.clip_x0' ({fields['sample.clip_x0']}) would clip latents, "
            f"which are not in [-1, 1]; set sample.clip_x0=0 for latent diffusion"
        )


def _check_guidance_fields(fields) -> None:
    """sample.guided_channels and the label-interpolation fields."""
    guided = fields["sample.guided_channels"]
    if guided != -1 and guided < 1:
        raise ConfigError(
            f"config field 'sample.guided_channels' must be -1 (every channel) or a number of "
            f"channels >= 1, got {guided}"
        )
    classes = fields["sample.interpolate_classes"]
    if len(classes) != 2 or any(c < 0 for c in classes):
        raise ConfigError(
            f"config field 'sample.interpolate_classes' must be two class indices (a, b), got "
            f"{classes!r}"
        )
    if fields["sample.interpolate_steps"] < 2:
        raise ConfigError(
            f"config field 'sample.interpolate_steps' must be >= 2 (both ends), got "
            f"{fields['sample.interpolate_steps']}"
        )


def check_runtime(cfg, image_shape, num_classes, num_devices: int) -> None:
    """The checks that need the dataset and the devices; still before any compilation."""
    data, fsdp = cfg.train.mesh_data, cfg.train.mesh_fsdp
    batch_devices = num_devices if data == -1 else data * fsdp
    if data == -1 and num_devices % fsdp:
        raise ConfigError(
            f"config field 'train.mesh_fsdp' ({fsdp}) does not divide the {num_devices} devices"
        )
    if data != -1 and data * fsdp != num_devices:
        raise ConfigError(
            f"config fields 'train.mesh_data' x 'train.mesh_fsdp' = {data} x {fsdp} must equal "
            f"the {num_devices} devices (or set train.mesh_data=-1 to use them all)"
        )
    if cfg.train.batch_size % batch_devices:
        raise ConfigError(
            f"config field 'train.batch_size' ({cfg.train.batch_size}) is not divisible by the "
            f"{batch_devices} devices it is split over"
        )
    accum = cfg.train.grad_accum_steps
    if (cfg.train.batch_size // batch_devices) % accum:
        raise ConfigError(
            f"config field 'train.grad_accum_steps' ({accum}) does not divide the "
            f"{cfg.train.batch_size // batch_devices} rows each of the {batch_devices} devices "
            f"gets from train.batch_size={cfg.train.batch_size}"
        )
    if cfg.model.class_conditional and not num_classes:
        raise ConfigError(
            f"config field 'model.class_conditional' is True but dataset {cfg.data.name!r} has "
            f"no labels"
        )
    if num_classes and cfg.sample.label >= num_classes:
        raise ConfigError(
            f"config field 'sample.label' ({cfg.sample.label}) is not a class of dataset "
            f"{cfg.data.name!r} (0..{num_classes - 1})"
        )
    guided = cfg.sample.guided_channels
    if guided > image_shape[-1]:
        raise ConfigError(
            f"config field 'sample.guided_channels' ({guided}) exceeds the {image_shape[-1]} "
            f"channels the model generates (-1 guides them all)"
        )
    from diffusax import methods, models

    if "model" not in methods.get(cfg.method).param_sections:
        return  # the method builds no denoising network from `config.model`
    try:
        models.check_image_shape(cfg.model, tuple(image_shape))
    except ValueError as e:  # its message names the field
        raise ConfigError(str(e)) from e


def describe(cfg) -> str:
    """One line per field, for logs."""
    return "\n".join(f"{k} = {v!r}" for k, v in _flatten(cfg))


# Model fields that do not change the parameters: a resumed run may change them.
_RESUMABLE_MODEL_FIELDS = (
    "model.dropout",
    "model.remat",
    "model.dtype",
    "model.scan_blocks",
    "model.fused_attention",
)


def digest_fields(cfg, sections=("model",)) -> dict:
    """The fields that must not change across a resume (they shape the parameters): those of
    the method's network ``sections`` (``Method.param_sections``), the method and the
    variance type."""
    prefixes = tuple(f"{s}." for s in sections)
    return {
        k: v
        for k, v in _flatten(cfg)
        if (k.startswith(prefixes) and k not in _RESUMABLE_MODEL_FIELDS)
        or k in ("method", "diffusion.var_type")
    }
