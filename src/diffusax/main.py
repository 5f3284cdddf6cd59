"""Command line: train, sample, evaluate or describe an experiment, or interpolate between two
classes (`--mode=interpolate`: samples/interpolate_<a>_<b>.png; an unCLIP run walks between two
images' embeddings instead, and `--mode=variations` decodes variations of an image).

    python -m diffusax.main --config=experiments/ddpm_digits.py --workdir=runs/ddpm_digits \\
        --mode=train [--config.train.num_steps=500 ...]

The Makefile wraps it: `make train|sample|eval|info EXP=NAME [WORKDIR=...] [ARGS='--config.a=b']`;
`make latents EXP=NAME` (`--mode=latents`) encodes a latent experiment's images once.
Exit status: 0 done, 1 the run failed (a non-finite loss: the message names the step; a
checkpoint that could not be written: it names the directory), 2 bad flags, config or input,
143 after SIGTERM and 130 after Ctrl-C (the state was saved first: run the same command again
to resume). RELIABILITY.md lists what each is tested against.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from diffusax import config as config_lib

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment file (experiments/NAME.py)")
flags.DEFINE_string("workdir", None, "directory for checkpoints, samples and logs")
flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "sample", "eval", "info", "interpolate", "variations", "latents"],
    "what to do",
)
flags.DEFINE_integer(
    "cpu_devices",
    0,
    "JAX CPU devices to split the batch over on a CPU host: 0 = one per core (the most that "
    "divide train.batch_size), -1 = leave JAX's default (one)",
)
flags.mark_flags_as_required(["config", "workdir"])


def describe_run(cfg) -> str:
    """`make info`: what a run would use, from the shapes the config declares; trains nothing
    and needs no data (a dataset line says what is missing and how to prepare it)."""
    import jax
    from flax import nnx

    from diffusax import models
    from diffusax.train.build import build

    run = build(cfg, require_data=False)
    spec, method = run.data, run.method
    lines = [f"experiment: {cfg.name}", f"method: {method.describe(cfg)}"]
    flops_of = method.forward_flops(run)
    total = 0
    for name, net in run.networks.items():
        abstract = nnx.eval_shape(lambda net=net: net.build(run.init_key))
        count = models.count_params(abstract)
        total += count
        group = run.ctx.group_of.get(name)
        role = "frozen" if group is None else f"trained as group {group!r}"
        if name in run.ctx.subsets:
            role = f"group {group!r} trains {len(run.ctx.subsets[name])} of its arrays, rest frozen"
        line = f"network {name}: {type(abstract).__name__}, {count} parameters, {role}"
        if flops_of.get(name) is not None:
            line += f", {flops_of[name] / 1e9:.4f} forward GFLOPs per example"
        lines.append(line)
    if cfg.model.name and "model" in run.networks:
        lines.append(f"model: {cfg.model.name}")
    lines.append(f"parameters: {total}")
    main_net = method.sample_network(cfg)
    flops = flops_of.get(main_net)
    if main_net in flops_of:
        lines += (
            [
                f"forward GFLOPs: {flops / 1e9:.4f}  (per example, {main_net})",
                f"forward GMACs: {flops / 2e9:.4f}",
            ]
            if flops is not None
            else [
                "forward GFLOPs: unknown (XLA gave no cost analysis on this backend)",
                "forward GMACs: unknown",
            ]
        )
    platform = jax.devices()[0].platform
    lines.append(f"mesh: {dict(run.mesh.shape)} over {run.mesh.size} {platform} device(s)")
    if spec.info is not None:
        info = spec.info
        lines.append(
            f"dataset: {info.name} [{info.split}] {info.num_examples} examples, images "
            f"{tuple(info.image_shape)} {info.dtype}, classes {info.num_classes}"
        )
    else:
        lines.append(
            f"dataset: {spec.name}: not prepared; the config declares examples "
            f"{tuple(spec.image_shape)}, classes {spec.dataset_classes}. {spec.missing}"
        )
    accum = cfg.train.grad_accum_steps
    lines.append(
        f"batch: {cfg.train.batch_size} global, {cfg.train.num_steps} steps"
        + (f", {accum} accumulated micro-batches per step" if accum > 1 else "")
    )
    sampler = method.describe_sampler(cfg)
    if sampler:
        lines.append(f"sampler: {sampler}")
    return "\n".join(lines)


def _flag_error_message(argv, error: Exception) -> str | None:
    """A readable message naming the field for a --config.* flag that could not be parsed."""
    for arg in argv[1:]:
        if arg.startswith("--config."):
            name = arg[len("--config.") :].split("=", 1)[0]
            try:
                config_lib.check_field_name(name)
            except config_lib.ConfigError as e:
                return f"{e} (flag {arg})"
    # OSError: the experiment file cannot be read (config_flags loads it while parsing).
    return str(error) if isinstance(error, flags.Error | OSError) else None


def parse_flags(argv):
    """absl's flag parsing, but a bad flag exits with status 2 and one readable line.

    ml_collections reports an unknown `--config.a.b` with an AttributeError traceback; this
    names the field instead (with a "did you mean").
    """
    try:
        return FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, OSError) as e:
        message = _flag_error_message(argv, e)
        if message is None:
            raise
        print(f"config error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv):
    del argv
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU" noise
    logging.getLogger("diffusax").setLevel(logging.INFO)
    try:
        cfg = config_lib.finalize(
            _CONFIG.value,
            config_flags.get_config_filename(FLAGS["config"]),
            config_flags.get_override_values(FLAGS["config"]),
        )
    except (config_lib.ConfigError, OSError) as e:  # OSError: the experiment file is unreadable
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from diffusax import checkpoint, methods, parallel
    from diffusax.train.loop import NonFiniteLossError

    method = methods.get(cfg.method)
    if FLAGS.mode not in method.modes:
        print(
            f"config error: method {cfg.method!r} runs --mode {' / '.join(method.modes)}, not "
            f"{FLAGS.mode!r}",
            file=sys.stderr,
        )
        return 2

    if not parallel.initialize_distributed() and FLAGS.cpu_devices >= 0:
        # Each device's rows must still split into train.grad_accum_steps micro-batches.
        accum = cfg.train.grad_accum_steps
        rows = cfg.train.batch_size // accum if cfg.train.batch_size % accum == 0 else 1
        parallel.use_cpu_cores(rows, FLAGS.cpu_devices)
    try:
        if FLAGS.mode == "info":
            print(method.describe_run(cfg) or describe_run(cfg))
        elif FLAGS.mode == "train":
            from diffusax.train import loop

            method.prepare(cfg)  # what the run needs first (a distillation's teacher)
            result = loop.train(cfg, FLAGS.workdir)
            if result.stopped_by is not None:
                return loop.EXIT_SIGTERM if result.stopped_by == 15 else loop.EXIT_SIGINT
        elif FLAGS.mode == "sample":
            print(f"wrote {method.sample_to_disk(cfg, FLAGS.workdir)}")
        elif FLAGS.mode == "latents":  # encode latents.source once into latent shards
            from diffusax.data import latents

            print(f"wrote {latents.encode_from_config(cfg)}")
        elif FLAGS.mode == "interpolate":
            print(f"wrote {method.interpolate_to_disk(cfg, FLAGS.workdir)}")
        elif FLAGS.mode == "variations":  # unclip: decoded variations of an image
            print(f"wrote {method.variations_to_disk(cfg, FLAGS.workdir)}")
        elif FLAGS.mode == "eval":
            print(method.format_report(method.evaluate(cfg, FLAGS.workdir)))
    except (NonFiniteLossError, checkpoint.CheckpointWriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (
        ValueError,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        PermissionError,
        checkpoint.DamagedCheckpointError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run():
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)


if __name__ == "__main__":
    run()
