"""Images out: [-1, 1] floats to uint8, sample grids and strips as PNG, arrays as .npz, the loss
curve. Every file is written to a temporary name and renamed into place: a crash mid-write never
leaves a truncated file where a good one was."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def to_uint8(images) -> np.ndarray:
    """[-1, 1] floats (N, H, W, C) -> uint8 in [0, 255]."""
    x = (np.asarray(images, np.float32) + 1.0) * 127.5
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def make_grid(images_u8: np.ndarray, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile (N, H, W, C) uint8 images into one (rows·(H+pad), cols·(W+pad), C) image."""
    n, h, w, c = images_u8.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.zeros((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = images_u8[i]
    return grid


def save_png(path: str, image_u8: np.ndarray, scale: int = 1) -> str:
    """Write an (H, W, C) uint8 image, optionally enlarged ``scale`` times (nearest neighbour)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    image = image_u8[..., 0] if image_u8.shape[-1] == 1 else image_u8
    pil = Image.fromarray(image)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    tmp = path + ".tmp.png"
    pil.save(tmp)
    os.replace(tmp, path)  # never leave a half-written PNG where a good one was
    return path


def save_npz(path: str, **arrays) -> str:
    """``np.savez(path, **arrays)``, atomically (the parent directory is created)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def class_columns(num_images: int, num_classes: int | None) -> int | None:
    """A grid's columns: one per class when every row holds the classes in turn."""
    return num_classes if num_classes and num_images % num_classes == 0 else None


def save_grid(path: str, images, ncols: int | None = None) -> str:
    """Save [-1, 1] images as a PNG grid, enlarged so that small images stay visible."""
    u8 = to_uint8(images)
    scale = max(1, 256 // (u8.shape[1] * (ncols or math.ceil(math.sqrt(len(u8))))) or 1)
    return save_png(path, make_grid(u8, ncols), scale=max(scale, 4 if u8.shape[1] <= 16 else 1))


def save_loss_curve(path: str, steps, losses) -> str:
    """Plot the per-step loss (and a smoothed line) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = np.asarray(steps), np.asarray(losses)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=0.5, alpha=0.4, label="loss")
    if len(losses) >= 20:
        k = max(len(losses) // 50, 5)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
