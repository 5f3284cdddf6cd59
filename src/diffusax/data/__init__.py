"""Datasets and the deterministic, sharded batch pipeline.

source = data.load_source("digits", "train")            # bundled, no download
source = data.load_source("cifar10", "train", data_dir)  # a prepared TFDS dataset
loader = data.Loader(source, mesh, global_batch=128, seed=0, random_flip=True)
batch = next(loader)        # {'image': (128, H, W, C) f32, 'label': (128,) i32}, sharded
ckpt = loader.state()       # {'step', 'seed', 'num_examples'}; loader.restore(ckpt)

Latent diffusion reads latent shards made once by the frozen autoencoder (``latents.py``):
source = latents.LatentSource("data/imagenet256_latents")   # batches of z = s (μ + σ ε)
"""

from diffusax.data.pipeline import (
    Loader,
    batch_indices,
    epoch_permutation,
    flip_mask,
    host_batch,
    noise_rows,
    read_rows,
)
from diffusax.data.sources import (
    ArraySource,
    DataConfigError,
    DatasetInfo,
    digits,
    validate_info,
)

BUNDLED = ("digits",)


def load_source(
    name: str,
    split: str = "train",
    data_dir: str | None = None,
    *,
    image_key: str = "image",
    label_key: str | None = "label",
    image_shape=None,
    embedding_key: str | None = None,
):
    """A random-access source: the bundled ``digits``, else the TFDS dataset ``name``.

    TFDS datasets are read from ``data_dir`` (None or "": TFDS's default) and must already be
    prepared in array_record format; a missing one raises ``DatasetNotPreparedError`` with the
    command that prepares it. ``label_key`` None or "" reads no labels. ``image_shape``
    (H, W, C), when given, must match the dataset's. ``embedding_key`` (``condition.embedding_key``;
    None or "": none) names a float ``Tensor`` feature of shape (D,) or (L, D), read as
    ``'embedding'`` float32 and recorded in ``info.embedding_shape``; a dataset without it
    raises ``DataConfigError``.
    """
    if name == "digits":
        if embedding_key:
            raise DataConfigError(
                f"config field 'condition.embedding_key' = {embedding_key!r}: the bundled "
                f"digits carry no embeddings; use a TFDS dataset with an embedding feature"
            )
        return digits(split, image_shape=image_shape)
    from diffusax.data.tfds_source import TfdsSource

    return TfdsSource(
        name,
        split,
        data_dir or None,
        image_key,
        label_key or None,
        image_shape,
        embedding_key=embedding_key or None,
    )


__all__ = [
    "BUNDLED",
    "ArraySource",
    "DataConfigError",
    "DatasetInfo",
    "Loader",
    "batch_indices",
    "digits",
    "epoch_permutation",
    "flip_mask",
    "host_batch",
    "load_source",
    "noise_rows",
    "read_rows",
    "validate_info",
]
