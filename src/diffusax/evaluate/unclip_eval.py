"""`make eval`, `--mode=variations` and `--mode=interpolate` of an unCLIP decoder run.

`make eval` writes eval/metrics.json with, for text -> prior -> decoder samples of prompts
naming a class (``evaluate.run``'s numbers: the Fréchet distance to the train split in the
digits classifier's features, the share the classifier reads as the prompted class, and the
thickness / slant agreement of prompts asking for one), and beside them:

- ``variations``: ``unclip.eval_variations`` held-out digits, each decoded once from its own
  CLIP image embedding with the empty caption (DDIM at η = unclip.variation_eta); the share
  the classifier reads as the source's class, and the variations' Fréchet distance;
- ``prior``: ``prior_eval.score`` of the run's frozen prior (the cosine of its sampled
  embeddings to held-out digits of the prompted class, against random pairs of held-out
  digits).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusax import image_io, inference, methods
from diffusax.config import ConfigError
from diffusax.evaluate import classifier as classifier_lib
from diffusax.evaluate import prior_eval
from diffusax.evaluate import run as eval_run
from diffusax.evaluate.frechet import features_frechet_distance
from diffusax.methods import prior as prior_method
from diffusax.methods import unclip
from diffusax.train.build import open_split

VARIATION_KEY = 50_000_017  # folded into the seed's key for the variations' draws
INTERPOLATE_KEY = 50_000_021


def embedder(run):
    """A jitted ``fn(clip params, images) -> (B, D)`` unit CLIP image embeddings."""

    @jax.jit
    def embed(clip_params, images):
        return prior_method.image_embeddings(run.ctx.module("clip", clip_params), images)

    return embed


def variation_settings(cfg, rows: int, num_devices: int, *, eta=None):
    s = cfg.sample.copy_and_resolve_references()
    with s.unlocked():
        s.batch_size = methods.padded_batch_size(rows, num_devices)
        if s.sampler == "ddim":
            s.eta = cfg.unclip.variation_eta if eta is None else eta
    return s


def decode_embeddings(trained, e, key, *, eta=None, shared_noise=False, batch_size=None):
    """(N, D) unit embeddings -> (N, H, W, C) images in [-1, 1] with the empty caption."""
    run, cfg = trained.run, trained.cfg
    rows = min(batch_size or cfg.sample.batch_size, len(e))
    s = variation_settings(cfg, rows, trained.mesh.size, eta=eta)
    generate = run.method.make_image_sampler(run, s, shared_noise=shared_noise)
    images, _ = methods.generate_many(
        generate, trained.params, len(e), s.batch_size, None, key, conditions=np.asarray(e)
    )
    return images


def load_image_file(path: str, shape) -> np.ndarray:
    """An image file (PNG, JPEG, ... or .npy) as one grey (H, W, C) image in [-1, 1]."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config field 'unclip.source': no image file at {path!r}")
    h, w, c = shape
    if path.endswith(".npy"):
        x = np.asarray(np.load(path), np.float32)
        if x.ndim == 2:
            x = x[..., None]
        if x.shape != (h, w, c):
            raise ValueError(
                f"config field 'unclip.source': {path} holds an array of shape {x.shape}; the "
                f"data's images are {(h, w, c)} in [-1, 1]"
            )
        return np.clip(x, -1.0, 1.0)
    from PIL import Image

    with Image.open(path) as im:
        grey = im.convert("L").resize((w, h), Image.Resampling.BOX)
    x = np.asarray(grey, np.float32) / 127.5 - 1.0  # (H, W) in [-1, 1]
    return np.repeat(x[..., None], c, axis=-1)


def source_images(cfg, shape) -> tuple[np.ndarray, str]:
    """(the source images (S, H, W, C), a name for the files) of ``unclip.source``."""
    spec = cfg.unclip.source
    if spec.startswith("heldout:"):
        held_out = open_split(cfg, cfg.data.eval_split)
        try:
            first = int(spec[len("heldout:") :])
        except ValueError:
            raise ConfigError(
                f"config field 'unclip.source' is {spec!r}: give heldout:K (an index) or a path"
            ) from None
        rows = np.arange(first, first + cfg.unclip.num_sources)
        if first < 0 or rows[-1] >= len(held_out):
            raise ConfigError(
                f"config field 'unclip.source': held-out rows {first}..{rows[-1]} are outside "
                f"the {len(held_out)} examples of split {cfg.data.eval_split!r}"
            )
        return np.asarray(held_out.read(rows)["image"], np.float32), f"heldout_{first}"
    name = os.path.splitext(os.path.basename(spec))[0]
    return load_image_file(spec, shape)[None], name


def variations_to_disk(cfg, workdir: str) -> str:
    """samples/variations_<source>.png: each row a source image, then
    ``unclip.num_variations`` decodings of its CLIP image embedding (and the .npz beside)."""
    shape = tuple(open_split(cfg, cfg.data.eval_split).info.image_shape)
    sources, name = source_images(cfg, shape)  # a bad source stops before anything is built
    trained = inference.load_trained(cfg, workdir)
    e = np.asarray(embedder(trained.run)(trained.params["clip"], jnp.asarray(sources)))  # (S, D)
    v = cfg.unclip.num_variations
    key = jax.random.fold_in(jax.random.key(cfg.seed), VARIATION_KEY)
    images = decode_embeddings(trained, np.repeat(e, v, axis=0), key)  # (S·V, H, W, C)
    rows = images.reshape(len(sources), v, *images.shape[1:])
    grid = np.concatenate([sources[:, None], rows], axis=1).reshape(-1, *images.shape[1:])
    path = os.path.join(workdir, "samples", f"variations_{name}.png")
    if jax.process_index() == 0:
        image_io.save_grid(path, grid, ncols=v + 1)
        image_io.save_npz(path[: -len(".png")] + ".npz", sources=sources, variations=rows)
    return path


def interpolate_to_disk(cfg, workdir: str) -> str:
    """samples/interpolate_heldout_<a>_<b>.png: held-out digit a, the decodings of
    ``sample.interpolate_steps`` points of the spherical walk from its embedding to b's (one
    shared x_T, DDIM at η = 0), then digit b."""
    held_out = open_split(cfg, cfg.data.eval_split)
    a, b = (int(i) for i in cfg.unclip.interpolate_indices)
    if not (0 <= a < len(held_out) and 0 <= b < len(held_out)):
        raise ConfigError(
            f"config field 'unclip.interpolate_indices' ({a}, {b}) must index the "
            f"{len(held_out)} held-out examples"
        )
    trained = inference.load_trained(cfg, workdir)
    ends = np.asarray(held_out.read(np.array([a, b]))["image"], np.float32)
    e = embedder(trained.run)(trained.params["clip"], jnp.asarray(ends))  # (2, D)
    steps = cfg.sample.interpolate_steps
    walk = np.asarray(unclip.slerp(e[0], e[1], jnp.linspace(0.0, 1.0, steps)))
    key = jax.random.fold_in(jax.random.key(cfg.seed), INTERPOLATE_KEY)
    frames = decode_embeddings(trained, walk, key, eta=0.0, shared_noise=True, batch_size=steps)
    strip = np.concatenate([ends[:1], frames, ends[1:]])
    path = os.path.join(workdir, "samples", f"interpolate_heldout_{a}_{b}.png")
    if jax.process_index() == 0:
        image_io.save_grid(path, strip, ncols=len(strip))
    return path


def evaluate(cfg, workdir: str, *, devices=None) -> dict:
    """``evaluate.run``'s metrics of the text -> prior -> decoder samples, with the
    variations' and the prior's beside (eval/metrics.json, written once all are computed)."""
    t0 = time.time()
    trained = inference.load_trained(cfg, workdir, devices=devices)  # once, for both parts
    metrics = eval_run.evaluate(cfg, workdir, trained=trained)
    run = trained.run
    train_source = open_split(cfg, cfg.data.train_split)
    test_source = open_split(cfg, cfg.data.eval_split)
    clf = classifier_lib.load_or_train(  # the one evaluate.run trained and cached
        train_source,
        test_source,
        os.path.join(workdir, "eval", f"classifier_{cfg.data.name}.npz"),
        steps=cfg.eval.classifier_steps,
        seed=cfg.seed,
    )

    t = time.time()
    test = classifier_lib.read_all(test_source)
    n = min(cfg.unclip.eval_variations, len(test["image"]))
    sources, labels = test["image"][:n], test["label"][:n]
    e = np.asarray(embedder(run)(trained.params["clip"], jnp.asarray(sources)))
    key = jax.random.fold_in(jax.random.key(cfg.seed), VARIATION_KEY)
    images = eval_run.quantize(decode_embeddings(trained, e, key), cfg.data.num_levels)
    predicted = clf.predict(images)
    metrics["variations"] = {
        "num": n,
        "eta": cfg.unclip.variation_eta,
        "class_kept": float(np.mean(predicted == labels)),
        "source_class_accuracy": clf.accuracy(sources, labels),  # the classifier on the sources
        "fd": features_frechet_distance(clf.features(images), clf.source_features(train_source)),
        "seconds": round(time.time() - t, 2),
    }

    t = time.time()
    prior_params = {"clip": trained.params["clip"], "prior": trained.params["prior"]}
    metrics["prior"] = prior_eval.score(cfg, run, prior_params, trained.step)
    metrics["prior"]["seconds"] = round(time.time() - t, 2)
    metrics["seconds"]["total_unclip"] = round(time.time() - t0, 2)
    if jax.process_index() == 0:
        eval_run.write_json(os.path.join(workdir, "eval", "metrics.json"), metrics)
    return metrics


def format_report(d: dict) -> str:
    v, p = d["variations"], d["prior"]
    return "\n".join(
        [
            "text -> prior -> decoder:",
            eval_run.format_report(d),
            f"variations of {v['num']} held-out digits (empty caption, η {v['eta']}): class kept "
            f"{100 * v['class_kept']:.1f}% (the classifier on the sources themselves "
            f"{100 * v['source_class_accuracy']:.1f}%), FD {v['fd']:.3f}",
            "the frozen prior:",
            prior_eval.format_report(p),
        ]
    )
