"""`make eval` of an autoencoder run: how well held-out images survive encode -> decode.

    eval/metrics.json          psnr, fd_reconstructions, class accuracy on reconstructions and
                               on the originals, the classifier's own held-out accuracy
    eval/reconstructions.npz   originals, reconstructions (uint8 NHWC, the autoencoder's
                               resolution), labels

Reconstructions decode the posterior's mean (no sampling). PSNR is over [-1, 1] images at the
autoencoder's resolution (peak-to-peak 2: PSNR = 10 log10(4 / MSE)). The digits classifier
(`evaluate.classifier`, the one the diffusion runs are scored with) sees the data's own
resolution: reconstructions made at a larger size are brought back by the least-squares
inverse of the bilinear upsampling (exact for a perfect reconstruction) before it classifies
them or takes their features.
"""

from __future__ import annotations

import math
import os
import time

import jax
import numpy as np

from diffusax import image_io, inference
from diffusax.evaluate import classifier as classifier_lib
from diffusax.evaluate.frechet import features_frechet_distance
from diffusax.evaluate.run import write_json
from diffusax.train.build import open_split

BATCH = 256  # images per jitted reconstruction call (one compilation)


def reconstruct_fn(trained):
    """A jitted ``(params, x) -> (x at the autoencoder's size, its reconstruction)``."""
    from diffusax.methods.autoencoder import model_shape, resize

    run = trained.run
    size = model_shape(trained.cfg, run.data)[0]

    def reconstruct(params, x):
        x = resize(x, size)  # (B, S, S, C)
        vae = run.ctx.module("vae", params)
        z = vae.encode(x).mode()  # (B, h, w, c)
        return x, vae.decode(z), z

    return jax.jit(reconstruct)


def reconstruct_all(trained, images: np.ndarray, with_latents: bool = False):
    """(originals, reconstructions[, latents: the posterior means]) at the autoencoder's size,
    in batches padded to BATCH."""
    fn = reconstruct_fn(trained)
    originals, recs, latents = [], [], []
    for start in range(0, len(images), BATCH):
        chunk = images[start : start + BATCH]
        n = len(chunk)
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], BATCH - n, axis=0)])
        x, r, z = fn(trained.params, padded)
        originals.append(np.asarray(x)[:n])
        recs.append(np.asarray(r)[:n])
        latents.append(np.asarray(z)[:n])
    out = (np.concatenate(originals), np.clip(np.concatenate(recs), -1.0, 1.0))
    return (*out, np.concatenate(latents)) if with_latents else out


def inverse_resize_matrix(small: int, large: int) -> np.ndarray:
    """P (small, large): the least-squares inverse of the bilinear resize small -> large along
    one axis (the pseudo-inverse of its matrix U, whose column j resizes the unit vector e_j),
    so that P U = I: an image upsampled by ``methods.autoencoder.resize`` comes back exactly."""
    eye = np.eye(small, dtype=np.float32)[:, :, None, None]  # (small, small, 1, 1): e_j rows
    cols = jax.image.resize(eye, (small, large, 1, 1), "bilinear")[:, :, 0, 0]  # (small, large)
    return np.linalg.pinv(np.asarray(cols, np.float64).T).astype(np.float32)  # (small, large)


def to_data_size(images: np.ndarray, shape) -> np.ndarray:
    """Images at the autoencoder's size brought back to the data's (H, W) for the classifier,
    by the least-squares inverse of the upsampling (``inverse_resize_matrix``)."""
    if images.shape[1:3] == tuple(shape[:2]):
        return images
    p_h = inverse_resize_matrix(shape[0], images.shape[1])  # (h, H)
    p_w = inverse_resize_matrix(shape[1], images.shape[2])  # (w, W)
    out = np.einsum("ah,bw,nhwc->nabc", p_h, p_w, np.asarray(images, np.float32))
    return np.clip(out, -1.0, 1.0)  # (N, h, w, C)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """10 log10(4 / MSE) for images in [-1, 1]."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(4.0 / mse)


def evaluate(cfg, workdir: str, *, devices=None) -> dict:
    """Score the latest checkpoint of the autoencoder run in ``workdir``; nothing is written
    until every number is computed, and then atomically."""
    t0 = time.time()
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
    test = classifier_lib.read_all(test_source)
    images, labels = test["image"], test["label"]  # (N, h, w, C) in [-1, 1]
    originals, recs, latents = reconstruct_all(trained, images, with_latents=True)
    shape = tuple(test_source.info.image_shape)
    small = to_data_size(recs, shape)
    rec_features = clf.features(small)
    test_features = clf.features(images)
    train_features = clf.source_features(train_source)
    metrics = {
        "experiment": cfg.name,
        "dataset": cfg.data.name,
        "checkpoint_step": int(trained.step),
        "num_heldout": len(images),
        "image_shape": list(originals.shape[1:]),
        "latent_shape": list(_latent_shape(trained, originals.shape[1:])),
        "psnr": psnr(originals, recs),
        "psnr_data_size": psnr(images, small),
        # Reconstructions against the held-out originals they came from, and (as a scale)
        # the held-out originals against the training images.
        "fd_reconstructions": features_frechet_distance(rec_features, test_features),
        "fd_reconstructions_vs_train": features_frechet_distance(rec_features, train_features),
        "fd_heldout_vs_train": features_frechet_distance(test_features, train_features),
        "accuracy_reconstructions": clf.accuracy(small, labels),
        "accuracy_originals": clf.accuracy(images, labels),
        # LDM's scale factor makes the latents about unit variance (ldm.scale_factor).
        "latent_std": float(np.std(latents)),
        "suggested_scale_factor": float(1.0 / np.std(latents)),
        "classifier_accuracy": clf.test_accuracy,
        "classifier_steps": cfg.eval.classifier_steps,
    }
    metrics["seconds"] = round(time.time() - t0, 2)
    if jax.process_index() == 0:
        os.makedirs(eval_dir, exist_ok=True)
        image_io.save_npz(
            os.path.join(eval_dir, "reconstructions.npz"),
            originals=image_io.to_uint8(originals),
            reconstructions=image_io.to_uint8(recs),
            labels=np.asarray(labels, np.int32),
        )
        pairs = np.concatenate([originals[:50], recs[:50]])  # originals above, reconstructions
        image_io.save_grid(os.path.join(eval_dir, "reconstructions.png"), pairs, ncols=10)
        write_json(os.path.join(eval_dir, "metrics.json"), metrics)
    return metrics


def _latent_shape(trained, image_shape) -> tuple:
    from flax import nnx

    vae = nnx.eval_shape(lambda: trained.run.networks["vae"].build(trained.run.init_key))
    return vae.latent_shape(image_shape)


def format_report(d: dict) -> str:
    return "\n".join(
        [
            f"experiment {d['experiment']} (step {d['checkpoint_step']}), "
            f"{d['num_heldout']} held-out images {tuple(d['image_shape'])} -> latents "
            f"{tuple(d['latent_shape'])}",
            f"PSNR {d['psnr']:.2f} dB (at the data's size: {d['psnr_data_size']:.2f} dB)",
            f"reconstruction Frechet distance (classifier features): "
            f"{d['fd_reconstructions']:.3f} vs the held-out originals; "
            f"{d['fd_reconstructions_vs_train']:.3f} vs train "
            f"(held-out originals vs train: {d['fd_heldout_vs_train']:.3f})",
            f"classifier accuracy: reconstructions {d['accuracy_reconstructions']:.4f}, "
            f"originals {d['accuracy_originals']:.4f}",
            f"latent std {d['latent_std']:.4f}: latent diffusion on it takes "
            f"ldm.scale_factor = 1/std = {d['suggested_scale_factor']:.4f}",
        ]
    )
