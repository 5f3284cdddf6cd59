"""Load a trained run's EMA parameters and draw samples from it (`--mode=sample`), or walk
between two classes' label embeddings (`--mode=interpolate`)."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from diffusax import checkpoint, conditions, image_io, methods, parallel
from diffusax import config as config_lib
from diffusax.train.build import Run, build


@dataclasses.dataclass
class Trained:
    """What sampling and evaluation need from a finished (or running) training run."""

    cfg: object
    mesh: object
    apply_fn: object  # the sampled network as apply_fn(params, x, t, y)
    params: dict  # what the method samples with (the EMA, for DDPM)
    step: int
    num_classes: int | None
    image_shape: tuple
    sched: object
    run: Run | None = None  # the built run (None for a hand-made Trained, as in tests)
    state: object = None  # the restored TrainState


def load_trained(cfg, workdir: str, *, devices=None) -> Trained:
    """Restore the latest checkpoint of ``workdir``; a clear error when there is none."""
    run = build(cfg, devices=devices)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    missing = FileNotFoundError(
        f"no checkpoint in {ckpt_dir}; train first: make train EXP={cfg.name} "
        f"(or pass the run's WORKDIR=)"
    )
    if not os.path.isdir(ckpt_dir):
        raise missing  # before Orbax, which would create the directory
    conditions.keep_tokenizer_with_run(cfg, workdir, write=False)
    with checkpoint.Checkpointer(ckpt_dir, save_every=1, keep=10**9, async_save=False) as ckpt:
        restored = ckpt.restore(run.abstract_with_shardings())
    if restored is None:
        raise missing
    return Trained(
        cfg=cfg,
        mesh=run.mesh,
        apply_fn=run.ctx.apply_fn(run.method.sample_network(cfg)),
        params=run.sample_params(restored.state),
        step=restored.step,
        num_classes=run.data.num_classes,
        image_shape=run.data.image_shape,
        sched=methods.make_schedule(cfg),
        run=run,
        state=restored.state,
    )


def draw_samples(trained: Trained, num: int, key, *, sample_cfg=None, label: int | None = None):
    """``num`` samples as ([-1, 1] float images, labels or None) with ``cfg.sample`` settings."""
    images, meta = draw_conditioned(trained, num, key, sample_cfg=sample_cfg, label=label)
    return images, meta.get("labels")


def draw_conditioned(trained: Trained, num: int, key, *, sample_cfg=None, label=None):
    """``num`` samples as ([-1, 1] float images, {"labels", "prompts"}: what each was asked
    for, where the method conditions on it) with ``cfg.sample`` settings."""
    s = (sample_cfg or trained.cfg.sample).copy_and_resolve_references()
    with s.unlocked():
        s.batch_size = methods.padded_batch_size(min(s.batch_size, num), trained.mesh.size)
        if label is not None:
            s.label = label
    if trained.run is not None:  # the method's sampler
        generate = trained.run.method.make_sampler(trained.run, s)
    else:  # a hand-made Trained: the denoising sampler over its fields
        generate = methods.make_generate(
            trained.cfg,
            trained.apply_fn,
            trained.sched,
            trained.num_classes,
            trained.image_shape,
            sample_cfg=s,
            mesh=trained.mesh,
        )
    if generate is None:
        raise config_lib.ConfigError(
            f"method {trained.cfg.method!r} draws no samples; see `make eval EXP={trained.cfg.name}`"
        )
    if trained.run is None:
        images, labels = methods.generate_many(
            generate, trained.params, num, s.batch_size, trained.num_classes, key, s.label
        )
        return images, ({} if labels is None else {"labels": labels})
    conditions, meta = trained.run.method.sample_conditions(trained.run, num, s)
    images, _ = methods.generate_many(
        generate,
        trained.params,
        num,
        s.batch_size,
        trained.num_classes,
        key,
        conditions=conditions,
    )
    return images, meta


def sample_to_disk(cfg, workdir: str) -> str:
    """`--mode=sample`: write samples/samples.npz (uint8 NHWC `images`, and the `labels` or
    `prompts` they were drawn with) and a grid."""
    trained = load_trained(cfg, workdir)
    key = jax.random.fold_in(jax.random.key(cfg.seed), 10_000_019)
    images, meta = draw_conditioned(trained, cfg.sample.num_samples, key)  # every process samples
    out_dir = os.path.join(workdir, "samples")
    path = os.path.join(out_dir, "samples.npz")
    if jax.process_index() != 0:
        return path
    os.makedirs(out_dir, exist_ok=True)
    arrays = {"images": image_io.to_uint8(images)}
    arrays.update(meta)  # the labels and / or prompts each sample was drawn with
    image_io.save_npz(path, **arrays)  # an interrupted run never leaves a truncated file
    n_grid = min(len(images), 100)
    classes = trained.num_classes or (trained.run.data.dataset_classes if "labels" in meta else 0)
    ncols = image_io.class_columns(n_grid, classes)
    image_io.save_grid(os.path.join(out_dir, "samples_grid.png"), images[:n_grid], ncols)
    return path


def interpolation_weights(num_classes: int, class_a: int, class_b: int, steps: int) -> np.ndarray:
    """Label weights (steps, num_classes + 1): w_j = (1 - λ_j) onehot(a) + λ_j onehot(b),
    λ_j = j / (steps - 1), so that w_j E = (1 - λ_j) E[a] + λ_j E[b] (``layers.embed_labels``)."""
    lam = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None]  # (steps, 1)
    eye = np.eye(num_classes + 1, dtype=np.float32)
    return (1.0 - lam) * eye[class_a] + lam * eye[class_b]  # (steps, num_classes + 1)


def interpolate(
    trained: Trained, class_a: int, class_b: int, steps: int, key, *, sample_cfg=None
) -> np.ndarray:
    """``steps`` samples (steps, H, W, C) in [-1, 1] while the label embedding walks linearly
    from class a's to class b's; every one starts from the same noise and draws the same noise
    at each step, so only the label changes along the strip.

    Sample j is ``generate(params, w_j[None], key)`` of ``methods.make_generate`` with a batch
    of one: its ends are exactly the ordinary class-a and class-b samples of that key. Guidance
    (``sample.guidance_scale``) takes the null label as its unconditional branch.
    """
    cfg, num_classes = trained.cfg, trained.num_classes
    if num_classes is None:
        raise config_lib.ConfigError(
            "label interpolation needs a class-conditional model (model.class_conditional=True)"
        )
    for c in (class_a, class_b):
        if not 0 <= c < num_classes:
            raise config_lib.ConfigError(
                f"config field 'sample.interpolate_classes' ({class_a}, {class_b}): {c} is not a "
                f"class of dataset {cfg.data.name!r} (0..{num_classes - 1})"
            )
    s = (sample_cfg or cfg.sample).copy_and_resolve_references()
    with s.unlocked():
        s.batch_size = 1
    generate = methods.make_generate(
        cfg, trained.apply_fn, trained.sched, num_classes, trained.image_shape, sample_cfg=s
    )
    one = lambda params, w, key: generate(params, w[None], key)[0]  # (H, W, C)
    run = jax.jit(jax.vmap(one, in_axes=(None, 0, None)))
    weights = interpolation_weights(num_classes, class_a, class_b, steps)
    return parallel.to_host(run(trained.params, weights, key))  # (steps, H, W, C)


def interpolate_to_disk(cfg, workdir: str) -> str:
    """`--mode=interpolate`: write samples/interpolate_<a>_<b>.png, a strip of
    ``sample.interpolate_steps`` samples from class a to class b."""
    trained = load_trained(cfg, workdir)
    a, b = cfg.sample.interpolate_classes
    key = jax.random.fold_in(jax.random.key(cfg.seed), 10_000_019)
    images = interpolate(trained, a, b, cfg.sample.interpolate_steps, key)
    path = os.path.join(workdir, "samples", f"interpolate_{a}_{b}.png")
    if jax.process_index() == 0:
        image_io.save_grid(path, images, ncols=len(images))
    return path
