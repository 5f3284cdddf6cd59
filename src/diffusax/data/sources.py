"""Random-access image datasets: their description, validation, and the bundled digits.

A *source* is anything with ``info: DatasetInfo``, ``__len__`` and
``read(indices) -> {'image': float32 (n, H, W, C) in [-1, 1], 'label': int32 (n,)}``.
``label`` is present exactly when ``info.num_classes`` is not None, and ``embedding`` (float32
(n, D) or (n, L, D): precomputed CLIP / T5 / ... embeddings, ``condition.kind = "embedding"``)
exactly when ``info.embedding_shape`` is not None. Sources read by index, so a batch is a pure
function of the indices asked for (see ``pipeline.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os

import numpy as np

DIGITS_TEST_PER_CLASS = 30  # held out: the last 30 examples of each class


class DataConfigError(ValueError):
    """A config field that cannot work with the data found; the message names the field.

    The data layer does not import ``diffusax.config``, so it raises this instead of
    ``config.ConfigError``; both are ``ValueError``, which ``diffusax.main`` reports with exit
    status 2.
    """


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset split.

    ``dtype`` is the dtype the images are stored in (``uint8`` for TFDS images, mapped to
    float32 in [-1, 1] when read); ``num_classes`` is None for an unlabelled dataset;
    ``embedding_shape`` ((D,) or (L, D)) is that of the precomputed embeddings each example
    carries, None when it carries none.
    """

    name: str
    split: str
    num_examples: int
    image_shape: tuple  # (H, W, C)
    dtype: str
    num_classes: int | None
    embedding_shape: tuple | None = None  # (D,) or (L, D)


SUPPORTED_DTYPES = ("uint8", "float32", "float64")


def validate_info(info: DatasetInfo, image_shape=None) -> DatasetInfo:
    """Raise ValueError naming the dataset when it cannot feed an image diffusion model.

    Checks: at least one example, images of rank 3 (H, W, C) with fixed positive sizes and
    1, 3 or 4 channels, a supported dtype, ``num_classes`` >= 1 when labelled, embeddings (when
    carried) of shape (D,) or (L, D) with fixed positive sizes, and, when ``image_shape`` is
    given, that the images have exactly that shape.
    """
    where = f"dataset '{info.name}' split '{info.split}'"
    if info.num_examples <= 0:
        raise ValueError(f"{where} is empty ({info.num_examples} examples)")
    shape = tuple(info.image_shape)
    if len(shape) != 3:
        raise ValueError(
            f"{where}: images have rank {len(shape)} (shape {shape}); expected rank 3 (H, W, C)"
        )
    if any(d is None or d <= 0 for d in shape):
        raise ValueError(
            f"{where}: image shape {shape} is not fixed; variable-size images are not "
            f"supported (prepare a resized version of the dataset)"
        )
    if shape[-1] not in (1, 3, 4):
        raise ValueError(f"{where}: images have {shape[-1]} channels; expected 1, 3 or 4")
    if info.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{where}: images have dtype {info.dtype}; expected one of {SUPPORTED_DTYPES}"
        )
    if info.num_classes is not None and info.num_classes < 1:
        raise ValueError(f"{where}: num_classes={info.num_classes}; expected >= 1 or None")
    if info.embedding_shape is not None:
        emb = tuple(info.embedding_shape)
        if len(emb) not in (1, 2) or any(d is None or d <= 0 for d in emb):
            raise ValueError(
                f"{where}: embeddings have shape {emb} per example; expected a fixed (D,) or (L, D)"
            )
    if image_shape is not None and tuple(image_shape) != shape:
        raise ValueError(
            f"{where}: images have shape {shape} but the config asks for {tuple(image_shape)}"
        )
    return info


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 pixels p in {0..255} -> float32 x = p / 127.5 - 1 in [-1, 1]."""
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


class ArraySource:
    """An in-memory dataset: images (N, H, W, C) uint8 in [0, 255] or float in [-1, 1].

    ``embeddings``, when given, are float (N, D) or (N, L, D), one per image, read as
    ``'embedding'`` float32.
    """

    def __init__(
        self,
        name,
        split,
        images,
        labels=None,
        num_classes=None,
        image_shape=None,
        embeddings=None,
    ):
        images = np.asarray(images)
        where = f"dataset '{name}' split '{split}'"
        if images.ndim != 4:
            raise ValueError(
                f"{where}: images array has shape {images.shape}; expected (N, H, W, C)"
            )
        if embeddings is not None:
            embeddings = _check_embeddings(where, embeddings, images.shape[0])
        self.info = validate_info(
            DatasetInfo(
                name=name,
                split=split,
                num_examples=images.shape[0],
                image_shape=images.shape[1:],
                dtype=str(images.dtype),
                num_classes=num_classes if labels is not None else None,
                embedding_shape=None if embeddings is None else embeddings.shape[1:],
            ),
            image_shape,
        )
        self._embeddings = embeddings  # (N, D) or (N, L, D) float32, or None
        if images.dtype == np.uint8:
            images = to_unit_range(images)
        else:
            lo, hi = float(images.min()), float(images.max())
            if lo < -1.0 or hi > 1.0 or not np.isfinite(lo + hi):
                raise ValueError(f"{where}: float images span [{lo}, {hi}]; expected [-1, 1]")
            images = images.astype(np.float32)
        self._images = images  # (N, H, W, C) float32
        self._labels = None
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(
                    f"{where}: labels have shape {labels.shape} dtype {labels.dtype}; expected "
                    f"integers of shape ({images.shape[0]},)"
                )
            if num_classes is None:
                raise ValueError(f"{where}: labels given without num_classes")
            if labels.min() < 0 or labels.max() >= num_classes:
                raise ValueError(
                    f"{where}: labels span [{labels.min()}, {labels.max()}], outside "
                    f"[0, {num_classes})"
                )
            self._labels = labels.astype(np.int32)

    def __len__(self) -> int:
        return self.info.num_examples

    def read(self, indices) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, dtype=np.int64)
        out = {"image": self._images[indices]}  # (n, H, W, C)
        if self._labels is not None:
            out["label"] = self._labels[indices]  # (n,)
        if self._embeddings is not None:
            out["embedding"] = self._embeddings[indices]  # (n, D) or (n, L, D)
        return out


def _check_embeddings(where: str, embeddings, num_examples: int) -> np.ndarray:
    """float32 (N, D) or (N, L, D), or ValueError naming the dataset (``where``)."""
    embeddings = np.asarray(embeddings)
    if embeddings.ndim not in (2, 3) or not np.issubdtype(embeddings.dtype, np.floating):
        raise ValueError(
            f"{where}: embeddings have shape {embeddings.shape} dtype {embeddings.dtype}; "
            f"expected floats of shape (N, D) or (N, L, D)"
        )
    if embeddings.shape[0] != num_examples:
        raise ValueError(
            f"{where}: {embeddings.shape[0]} embeddings for {num_examples} images; expected one "
            f"per image"
        )
    if not np.isfinite(embeddings).all():
        raise ValueError(f"{where}: embeddings hold non-finite values (NaN or inf)")
    return embeddings.astype(np.float32)


@functools.cache
def digits_arrays() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """scikit-learn's 8x8 digits as ``{split: (pixels, labels, positions)}``.

    pixels: uint8 (n, 8, 8, 1) in 0..16; labels: int32 (n,) in 0..9; positions: int64 (n,), the
    examples' indices in ``sklearn.datasets.load_digits()``.

    The 1797 digits are split once: 'test' holds the last 30 examples of each class in
    ``load_digits()`` order (300), 'train' the other 1497; each split keeps the original order.
    """
    table = _digits_table()  # (1797, 65): 64 pixels then the label, as load_digits() reads it
    pixels = table[:, :64].reshape(-1, 8, 8, 1).astype(np.uint8)  # values 0..16
    labels = table[:, 64].astype(np.int32)
    # No random numbers, so the split cannot change with a library version.
    test_idx = np.concatenate(
        [np.flatnonzero(labels == c)[-DIGITS_TEST_PER_CLASS:] for c in range(10)]
    )
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    out = {}
    for split, idx in (("train", np.sort(train_idx)), ("test", np.sort(test_idx))):
        out[split] = (pixels[idx], labels[idx], idx)
    return out


def _digits_table() -> np.ndarray:
    """The digits' table, read from the file scikit-learn ships, without importing sklearn.

    Importing sklearn (scipy with it) costs ~3 s, the trainer's whole start-up on the digits
    otherwise; `load_digits()` reads this very file, and is the fallback should it move.
    """
    spec = importlib.util.find_spec("sklearn")
    for folder in (spec and spec.submodule_search_locations) or ():
        path = os.path.join(folder, "datasets", "data", "digits.csv.gz")
        if os.path.exists(path):
            return np.loadtxt(path, delimiter=",", dtype=np.float64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.concatenate([digits.data, digits.target[:, None]], axis=1)


def digits_split_indices(split: str) -> np.ndarray:
    """Positions in ``sklearn.datasets.load_digits()`` of the examples of ``split``."""
    return digits_arrays()[_check_digits_split(split)][2]


def _check_digits_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"dataset 'digits' has splits 'train' and 'test'; got split={split!r}")
    return split


def digits(split: str = "train", image_shape=None) -> ArraySource:
    """The bundled digits (no download): images float32 (n, 8, 8, 1) = pixels / 8 - 1."""
    pixels, labels, _ = digits_arrays()[_check_digits_split(split)]
    images = pixels.astype(np.float32) / np.float32(8.0) - np.float32(1.0)  # 0..16 -> [-1, 1]
    return ArraySource("digits", split, images, labels, num_classes=10, image_shape=image_shape)
