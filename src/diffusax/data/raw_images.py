"""Full-size images to encode into latent shards, read by index, with ADM / DiT's resizing.

    images = open_images("folder:/data/imagenet/train")     # or "imagenet2012" (TFDS), "digits"
    image, label = images.load(7)                            # PIL RGB image, int label (-1: none)
    pixels = center_crop(image, 256)                         # uint8 (256, 256, 3)

With ``embedding_key`` (``condition.kind = "embedding"``) a TFDS dataset's precomputed embeddings
come too: ``image, label, embedding = images.load(7)``, float32 of ``images.embedding_shape``.

``folder:PATH`` holds one sub-folder per class (sorted names = labels 0..K-1, as torchvision's
ImageFolder that DiT reads) or, without sub-folders, unlabelled images. A TFDS name must be
prepared in array_record; unlike ``TfdsSource`` the images may differ in size (ImageNet).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import numpy as np
from PIL import Image

from diffusax.data.sources import DataConfigError, digits

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclasses.dataclass(frozen=True)
class Images:
    """A dataset to encode: ``load(i) -> (PIL image, label)``, label -1 when unlabelled.

    When the examples carry precomputed embeddings (``embedding_shape`` (D,) or (L, D) is not
    None), ``load(i) -> (PIL image, label, embedding float32 of embedding_shape)``;
    ``embedding_key`` is the feature they were read from.
    """

    name: str
    split: str
    num_examples: int
    num_classes: int | None
    load: Callable[[int], tuple]
    embedding_shape: tuple | None = None
    embedding_key: str | None = None


def open_images(
    spec: str,
    split: str = "train",
    data_dir: str = "",
    image_key="image",
    label_key="label",
    embedding_key: str | None = None,
) -> Images:
    """``digits``, ``folder:PATH`` or a prepared TFDS dataset name, as ``Images``.

    ``embedding_key`` (None or "": none) also reads that feature's embeddings (TFDS only).
    """
    if embedding_key and (spec == "digits" or spec.startswith("folder:")):
        raise DataConfigError(
            f"config field 'condition.embedding_key' = {embedding_key!r}: latents.source "
            f"{spec!r} carries no embeddings; only a TFDS dataset with that feature does"
        )
    if spec == "digits":
        source = digits(split)
        batch = source.read(np.arange(len(source)))
        pixels = np.round((batch["image"][..., 0] + 1) * 127.5).astype(np.uint8)  # (n, 8, 8)
        labels = batch["label"]
        load = lambda i: (Image.fromarray(pixels[i]).convert("RGB"), int(labels[i]))
        return Images("digits", split, len(source), 10, load)
    if spec.startswith("folder:"):
        return _folder_images(spec.removeprefix("folder:"))
    if not spec:
        raise ValueError("config field 'latents.source' is empty; name the images to encode")
    return _tfds_images(
        spec, split, data_dir or None, image_key, label_key or None, embedding_key or None
    )


def _folder_images(root: str) -> Images:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"config field 'latents.source': folder {root!r} does not exist")
    is_image = lambda name: name.lower().endswith(IMAGE_EXTENSIONS)
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if classes:  # one sub-folder per class
        files = [
            (os.path.join(root, c, f), label)
            for label, c in enumerate(classes)
            for f in sorted(os.listdir(os.path.join(root, c)))
            if is_image(f)
        ]
    else:
        files = [(os.path.join(root, f), -1) for f in sorted(os.listdir(root)) if is_image(f)]
    if not files:
        raise ValueError(f"config field 'latents.source': no images ({IMAGE_EXTENSIONS}) in {root}")

    def load(i):
        path, label = files[i]
        with Image.open(path) as image:
            return image.convert("RGB"), label

    return Images(f"folder:{root}", "all", len(files), len(classes) or None, load)


def _tfds_images(name, split, data_dir, image_key, label_key, embedding_key=None) -> Images:
    """A TFDS split read by index; unlike ``TfdsSource``, images may differ in size (ImageNet)."""
    import tensorflow_datasets as tfds

    from diffusax.data.tfds_source import (
        RANDOM_ACCESS_FORMATS,
        check_embeddings,
        embedding_shape,
        not_prepared,
    )

    def missing(problem):
        error = not_prepared(name, data_dir, problem)
        return type(error)(
            f"{error}\nImageNet (imagenet2012) cannot be downloaded by TFDS: get ILSVRC2012 by "
            f"hand and run tfds build imagenet2012 --manual_dir=DOWNLOADS "
            f"--file_format=array_record, or encode an image folder: "
            f"latents.source=folder:/path/to/imagenet/train"
        )

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise missing("is neither a known TFDS dataset nor found") from None
    file_format = getattr(builder.info.file_format, "value", None)
    if not builder.is_prepared() or file_format not in RANDOM_ACCESS_FORMATS:
        raise missing("is not prepared in array_record format")
    if split not in builder.info.splits:
        raise ValueError(f"dataset '{name}' has no split {split!r}: {sorted(builder.info.splits)}")
    records = builder.as_data_source(split)
    num_classes = None
    if label_key:
        num_classes = int(builder.info.features[label_key].num_classes)
    shape = None
    if embedding_key:
        shape = embedding_shape(name, builder.info.features, embedding_key)

    def load(i):
        record = records[i]
        pixels = np.asarray(record[image_key])  # (H, W, 1 or 3) uint8
        image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
        label = int(record[label_key]) if label_key else -1
        if shape is None:
            return image.convert("RGB"), label
        embedding = check_embeddings(name, np.asarray(record[embedding_key])[None], shape)[0]
        return image.convert("RGB"), label, embedding

    return Images(
        name, split, len(records), num_classes, load, shape, embedding_key if shape else None
    )


def center_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM / DiT's preprocessing: uint8 (size, size, 3).

    Halve with a box filter while the short side is >= 2 size (cheap anti-aliasing), resize
    bicubically so the short side is ``size``, then crop the centre square.
    """
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    size_out = tuple(round(s * scale) for s in image.size)
    image = image.resize(size_out, resample=Image.Resampling.BICUBIC)
    pixels = np.asarray(image.convert("RGB"))  # (H', W', 3), min(H', W') = size
    top, left = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
    return pixels[top : top + size, left : left + size]
