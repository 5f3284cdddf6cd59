"""`--mode=eval`: sample quality and likelihood of a trained run, written to eval/metrics.json.

    metrics = evaluate(cfg, workdir)      # also writes WORKDIR/eval/metrics.json
    print(format_report(metrics))

Sample quality is the Fréchet distance (FID's formula) in the features of a small classifier
trained on the dataset's train split (``classifier.py``): samples vs the train split, next to
held-out real images vs the train split, the value a perfect model reaches at that sample size.
The distance is biased upwards at small sample sizes, so the samples are also scored on a
subset as large as the held-out set, next to held-out and train images of that size. The train
subset overlaps the reference, so it marks what copying the training images would reach; on
digits the held-out split (the last 30 examples of each class) comes from other writers and
sits farther from the train split than a disjoint half of the train split does, even in pixel
space. Likelihood is bits per dimension of the variational bound
on held-out images.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

import jax
import numpy as np

from diffusax import diffusion, inference, methods, parallel
from diffusax.evaluate import classifier as classifier_lib
from diffusax.evaluate.frechet import features_frechet_distance
from diffusax.train.build import open_split

log = logging.getLogger("diffusax")

SAMPLE_KEY = 20_000_003  # fold-in constants: eval draws its own samples and bound noise
BOUND_KEY = 20_000_011
ATTRIBUTE_KEY = 20_000_017
MAX_BOUND_BATCH = 128


def quantize(images, num_levels: int) -> np.ndarray:
    """Round [-1, 1] images to the data's ``num_levels`` evenly spaced values (as FID's uint8).

    x ↦ 2 round((x + 1)/2 · (L - 1)) / (L - 1) - 1, so samples and real data take the same values.
    """
    scale = (num_levels - 1) / 2.0
    x = np.clip(np.asarray(images, np.float32), -1.0, 1.0)
    return (np.round((x + 1.0) * scale) / scale - 1.0).astype(np.float32)


def make_bound_fn(trained):
    """A jitted ``bpd(params, x0, labels, key) -> (B,)`` from ``diffusion.variational_bound``.

    The decoder is the discretised Gaussian on ``cfg.data.num_levels`` levels; x̂_0 is clipped
    as the sampler clips it (``cfg.sample.clip_x0``), so the bound is that of the reverse process
    that draws the samples.
    """
    cfg = trained.cfg
    d = cfg.diffusion

    def bpd(params, x0, labels, key):
        model_fn = lambda xt, t: trained.apply_fn(params, xt, t, labels)
        out = diffusion.variational_bound(
            trained.sched,
            model_fn,
            x0,
            key,
            prediction=d.prediction,
            var_type=d.var_type,
            decoder="discretized",
            bins=cfg.data.num_levels,
            clip_x0=cfg.sample.clip_x0 or None,
        )
        return out["bpd"]

    return jax.jit(bpd)


def bits_per_dim(
    trained, images, labels, key, *, bound=None, batch_size: int = MAX_BOUND_BATCH
) -> np.ndarray:
    """Per-example bits per dimension (N,) of ``images``; one compilation, batches over the mesh.

    ``labels`` are the true labels for a class-conditional model and ignored otherwise.
    ``bound`` (from ``make_bound_fn``) may be passed to reuse its compilation. Batch i uses the
    key ``fold_in(key, i)``.
    """
    n = len(images)
    batch = methods.padded_batch_size(min(n, batch_size), trained.mesh.size)
    sharding = parallel.batch_sharding(trained.mesh)
    bound = bound or make_bound_fn(trained)
    out = []
    for i, start in enumerate(range(0, n, batch)):
        x = images[start : start + batch]  # (b, H, W, C)
        y = labels[start : start + batch] if trained.num_classes is not None else None
        pad = batch - len(x)  # pad with copies so that every call has one shape
        if pad:
            x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])  # (batch, H, W, C)
            y = None if y is None else np.concatenate([y, np.repeat(y[-1:], pad)])
        x = jax.device_put(x, sharding)
        y = None if y is None else jax.device_put(y.astype(np.int32), sharding)
        values = bound(trained.params, x, y, jax.random.fold_in(key, i))
        out.append(np.asarray(values)[: batch - pad])
    return np.concatenate(out)


def _sampler_settings(cfg) -> dict:
    s = cfg.sample
    return {
        "sampler": s.sampler,
        "num_steps": s.num_steps or cfg.diffusion.num_timesteps,
        "eta": s.eta,
        "guidance_scale": s.guidance_scale,
        "clip_x0": s.clip_x0,
        "label": s.label,
    }


def subset(n: int, size: int, seed: int) -> np.ndarray:
    """``size`` of ``range(n)`` in increasing order, chosen by ``seed`` (the same every run)."""
    return np.sort(np.random.default_rng(seed).permutation(n)[:size])


def check_eval_config(cfg) -> None:
    """Raise ValueError naming the field before anything is loaded or compiled."""
    e = cfg.eval
    if not isinstance(e.num_samples, int) or e.num_samples < 2:
        raise ValueError(f"config field 'eval.num_samples' must be >= 2, got {e.num_samples!r}")
    if not isinstance(e.bpd_examples, int) or e.bpd_examples < 0:
        raise ValueError(f"config field 'eval.bpd_examples' must be >= 0, got {e.bpd_examples!r}")
    if not isinstance(e.classifier_steps, int) or e.classifier_steps < 1:
        raise ValueError(
            f"config field 'eval.classifier_steps' must be >= 1, got {e.classifier_steps!r}"
        )
    if not isinstance(cfg.data.num_levels, int) or cfg.data.num_levels < 2:
        raise ValueError(
            f"config field 'data.num_levels' must be >= 2, got {cfg.data.num_levels!r}"
        )


def evaluate(cfg, workdir: str, *, devices=None, trained=None) -> dict:
    """Score the latest checkpoint of ``workdir``; writes ``workdir/eval/metrics.json``.

    ``devices`` (default: all) are the devices the diffusion model is sampled and scored on.

    Nothing is written until every number has been computed, and then atomically, so a failed
    evaluation leaves the previous metrics.json as it was.
    """
    check_eval_config(cfg)
    t0 = time.time()
    timings = {}
    if trained is None:  # a caller that scores the run further passes its own
        trained = inference.load_trained(cfg, workdir, devices=devices)
    train_source = open_split(cfg, cfg.data.train_split)
    test_source = open_split(cfg, cfg.data.eval_split)
    eval_dir = os.path.join(workdir, "eval")
    clf = classifier_lib.load_or_train(
        train_source,
        test_source,
        os.path.join(eval_dir, f"classifier_{cfg.data.name}.npz"),
        steps=cfg.eval.classifier_steps,
        seed=cfg.seed,
    )
    timings["classifier"] = time.time() - t0

    t = time.time()
    key = jax.random.key(cfg.seed)
    samples, asked = inference.draw_conditioned(
        trained, cfg.eval.num_samples, jax.random.fold_in(key, SAMPLE_KEY)
    )
    sample_labels = asked.get("labels")
    bad = int(np.sum(~np.all(np.isfinite(samples.reshape(len(samples), -1)), axis=1)))
    if bad:
        raise ValueError(
            f"{bad} of {len(samples)} samples of the checkpoint at step {trained.step} in "
            f"{workdir} contain NaN or inf; the model (or the sampler settings) diverged"
        )
    data_shape = tuple(test_source.info.image_shape)
    if samples.shape[1:] != data_shape:  # a latent model's autoencoder works at another size
        from diffusax.evaluate.reconstruction import to_data_size

        samples = to_data_size(samples, data_shape)
    samples = quantize(samples, cfg.data.num_levels)  # (N, H, W, C)
    timings["sampling"] = time.time() - t

    t = time.time()
    train_features = clf.source_features(train_source)  # (N_train, D)
    test = classifier_lib.read_all(test_source)
    test_features = clf.features(test["image"])  # (N_test, D)
    sample_features = clf.features(samples)  # (N, D)
    matched = min(len(samples), len(test_features))
    # Conditional samples cycle through the classes, so their first `matched` are balanced.
    test_subset = subset(len(test_features), matched, cfg.seed)
    train_subset = subset(len(train_features), matched, cfg.seed)
    metrics = {
        "experiment": cfg.name,
        "dataset": cfg.data.name,
        "checkpoint_step": int(trained.step),
        "num_samples": len(samples),
        "num_reference": len(train_features),
        "num_heldout": len(test_features),
        "matched_size": matched,
        "fd_samples": features_frechet_distance(sample_features, train_features),
        "fd_samples_matched": features_frechet_distance(sample_features[:matched], train_features),
        "fd_heldout": features_frechet_distance(test_features, train_features),
        "fd_heldout_matched": features_frechet_distance(test_features[test_subset], train_features),
        # What a model that reproduces its training images would reach (a lower reference).
        "fd_train_matched": features_frechet_distance(train_features[train_subset], train_features),
    }
    if sample_labels is not None:
        metrics["class_accuracy"] = clf.accuracy(samples, sample_labels)
    if "prompts" in asked and sample_labels is not None:  # by how the prompt names the class
        predicted = clf.predict(samples)
        numeral = np.array([any(ch.isdigit() for ch in p) for p in asked["prompts"]])
        for name, rows in (("numeral", numeral), ("word", ~numeral)):
            if rows.any():
                hits = predicted[rows] == sample_labels[rows]
                metrics[f"class_accuracy_{name}_prompts"] = float(np.mean(hits))
    timings["frechet"] = time.time() - t
    if trained.run is not None and cfg.condition.kind == "text":
        from diffusax.evaluate import conditional

        t = time.time()
        metrics["attributes"] = conditional.attribute_agreement(
            trained, clf, data_shape, jax.random.fold_in(key, ATTRIBUTE_KEY)
        )
        timings["attributes"] = time.time() - t

    t = time.time()
    num_bpd = min(cfg.eval.bpd_examples, len(test_source))
    if trained.run is not None and not trained.run.method.pixel_bound:
        num_bpd = 0  # the model's bound is not one on the data (a latent model's)
    if num_bpd:
        rows = subset(len(test_source), num_bpd, cfg.seed + 1)
        bpd = bits_per_dim(
            trained, test["image"][rows], test["label"][rows], jax.random.fold_in(key, BOUND_KEY)
        )
        metrics["bpd"] = float(np.mean(bpd))
        metrics["bpd_stderr"] = (
            float(np.std(bpd, ddof=1) / math.sqrt(len(bpd))) if len(bpd) > 1 else float("nan")
        )
    metrics["bpd_examples"] = num_bpd
    timings["bpd"] = time.time() - t

    metrics["classifier_accuracy"] = clf.test_accuracy
    metrics["classifier_steps"] = cfg.eval.classifier_steps
    metrics["feature_dim"] = int(train_features.shape[1])
    metrics["sampler"] = _sampler_settings(cfg)
    timings["total"] = time.time() - t0
    metrics["seconds"] = {k: round(v, 2) for k, v in timings.items()}
    if jax.process_index() == 0:
        write_json(os.path.join(eval_dir, "metrics.json"), metrics)
    return metrics


def write_json(path: str, metrics: dict) -> None:
    def clean(value):  # NaN/inf are not JSON: write null
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(clean(metrics), f, indent=2, allow_nan=False)
    os.replace(tmp, path)  # never a half-written metrics.json


def format_report(d: dict) -> str:
    """A short table of ``evaluate``'s results."""
    s = d["sampler"]
    fd = "Fréchet distance to the train split"
    lines = [
        f"{d['experiment']} at step {d['checkpoint_step']} on {d['dataset']}: {s['sampler']} "
        f"sampler, {s['num_steps']} steps, eta {s['eta']}, guidance {s['guidance_scale']}",
        f"  {fd:<44} {'n':>6}  {'FD':>9}",
        f"  {'samples':<44} {d['num_samples']:>6}  {d['fd_samples']:>9.3f}",
        f"  {'samples (subset)':<44} {d['matched_size']:>6}  {d['fd_samples_matched']:>9.3f}",
        f"  {'held-out real (subset): a perfect model':<44} {d['matched_size']:>6}  "
        f"{d['fd_heldout_matched']:>9.3f}",
    ]
    lines.append(
        f"  {'train images (subset): a copying model':<44} {d['matched_size']:>6}  "
        f"{d['fd_train_matched']:>9.3f}"
    )
    if d["matched_size"] != d["num_heldout"]:
        lines.append(
            f"  {'held-out real (all)':<44} {d['num_heldout']:>6}  {d['fd_heldout']:>9.3f}"
        )
    if "class_accuracy" in d:
        lines.append(f"  class accuracy of the samples: {100 * d['class_accuracy']:.1f}%")
    for name in ("word", "numeral"):
        if f"class_accuracy_{name}_prompts" in d:
            lines.append(
                f"    prompts naming the class by its {name}: "
                f"{100 * d[f'class_accuracy_{name}_prompts']:.1f}%"
            )
    for row in d.get("attributes", {}).get("rows", []):
        lines.append(
            f"  attribute {row['attribute']} {row['asked']:+d} ({row['example_prompt']!r}, "
            f"n={row['num_samples']}): measured as asked {100 * row['agreement']:.1f}% "
            f"(chance {100 * row['chance']:.1f}%), the opposite {100 * row['opposite']:.1f}%"
        )
    if "bpd" in d:
        lines.append(
            f"  bits/dim on {d['bpd_examples']} held-out images (variational bound): "
            f"{d['bpd']:.4f} ± {d['bpd_stderr']:.4f}"
        )
    lines.append(
        f"  feature classifier: {d['feature_dim']}-d features, held-out accuracy "
        f"{100 * d['classifier_accuracy']:.1f}% ({d['classifier_steps']} steps)"
    )
    return "\n".join(lines)
