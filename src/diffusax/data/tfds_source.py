"""TFDS datasets (mnist, cifar10, ...) read by index from a prepared TFDS data directory.

Nothing is downloaded at run time. A dataset must first be prepared in ``array_record`` format
(random access by index) on a machine with network, e.g. for cifar10::

    python -c "import tensorflow_datasets as tfds; \\
      tfds.builder('cifar10', data_dir='DATA_DIR').download_and_prepare(file_format='array_record')"

or ``tfds build cifar10 --data_dir=DATA_DIR --file_format=array_record``, then copied to the
training machine's ``DATA_DIR``. ``tensorflow_datasets`` is imported only when a TFDS source is
made, so the bundled digits need none of it.
"""

from __future__ import annotations

import numpy as np

from diffusax.data.sources import DataConfigError, DatasetInfo, to_unit_range, validate_info

RANDOM_ACCESS_FORMATS = ("array_record", "parquet")


def prepare_command(name: str, data_dir: str | None) -> str:
    """The shell command that prepares ``name`` for random access under ``data_dir``."""
    where = f", data_dir={str(data_dir)!r}" if data_dir else ""
    return (
        f'python -c "import tensorflow_datasets as tfds; tfds.builder({name!r}{where})'
        f".download_and_prepare(file_format='array_record')\""
    )


class DatasetNotPreparedError(FileNotFoundError):
    """The TFDS dataset is not in the data directory in a random-access format."""


def not_prepared(name, data_dir, problem) -> DatasetNotPreparedError:
    """The error for TFDS dataset ``name`` not usable in ``data_dir``, with how to prepare it."""
    shown_dir = data_dir or "the default TFDS data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    return DatasetNotPreparedError(
        f"TFDS dataset '{name}' {problem} in data_dir={shown_dir}. Nothing is downloaded at run "
        f"time: prepare it once on a machine with network access with\n"
        f"  {prepare_command(name, data_dir)}\n"
        f"(or: tfds build {name} --file_format=array_record"
        f"{f' --data_dir={data_dir}' if data_dir else ''}) and copy the folder to this data_dir."
    )


class TfdsSource:
    """One split of a prepared TFDS dataset, read by index (``builder.as_data_source``).

    Images (``image_key``, an ``Image`` or ``Tensor`` feature of fixed shape (H, W, C), uint8)
    become float32 in [-1, 1]; labels (``label_key``, a ``ClassLabel``; None for unlabelled
    data) become int32; embeddings (``embedding_key``, a float ``Tensor`` feature of shape (D,)
    or (L, D); None for none) become ``'embedding'`` float32.
    """

    def __init__(
        self,
        name: str,
        split: str = "train",
        data_dir: str | None = None,
        image_key: str = "image",
        label_key: str | None = "label",
        image_shape=None,
        embedding_key: str | None = None,
    ):
        import tensorflow_datasets as tfds

        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise not_prepared(
                name, data_dir, "is neither a known TFDS dataset nor found"
            ) from None
        if not builder.is_prepared():
            raise not_prepared(name, data_dir, f"is not prepared (looked in {builder.data_dir})")
        file_format = builder.info.file_format
        if file_format is None or file_format.value not in RANDOM_ACCESS_FORMATS:
            raise not_prepared(
                name,
                data_dir,
                f"is prepared as {getattr(file_format, 'value', file_format)}, which cannot be "
                f"read by index; it must be array_record (prepare it again into another "
                f"data_dir)",
            )
        if split not in builder.info.splits:
            raise ValueError(
                f"dataset '{name}' has no split {split!r}; it has {sorted(builder.info.splits)}"
            )
        features = builder.info.features
        self.info = validate_info(
            DatasetInfo(
                name=name,
                split=split,
                num_examples=builder.info.splits[split].num_examples,
                image_shape=_image_shape(name, features, image_key),
                dtype=np.dtype(features[image_key].np_dtype).name,
                num_classes=_num_classes(name, features, label_key),
                embedding_shape=(
                    None
                    if embedding_key is None
                    else embedding_shape(name, features, embedding_key)
                ),
            ),
            image_shape,
        )
        if self.info.dtype != "uint8":
            raise ValueError(
                f"dataset '{name}': feature '{image_key}' has dtype {self.info.dtype}; "
                f"TFDS images are read as uint8 pixels"
            )
        self._image_key, self._label_key = image_key, label_key
        self._embedding_key = embedding_key
        self._data = builder.as_data_source(split)

    def __len__(self) -> int:
        return self.info.num_examples

    def read(self, indices) -> dict[str, np.ndarray]:
        indices = [int(i) for i in np.asarray(indices).reshape(-1)]
        records = self._data.__getitems__(indices)  # list of feature dicts
        images = np.stack([np.asarray(r[self._image_key]) for r in records])  # (n, H, W, C)
        if images.shape[1:] != self.info.image_shape:
            raise ValueError(
                f"dataset '{self.info.name}': read images of shape {images.shape[1:]}, "
                f"expected {self.info.image_shape}"
            )
        out = {"image": to_unit_range(images)}
        if self._label_key is not None:
            out["label"] = np.array([r[self._label_key] for r in records], dtype=np.int32)
        if self._embedding_key is not None:
            out["embedding"] = check_embeddings(
                self.info.name,
                np.stack([np.asarray(r[self._embedding_key]) for r in records]),
                self.info.embedding_shape,
            )
        return out


def embedding_shape(name, features, embedding_key) -> tuple:
    """The per-example shape (D,) or (L, D) of the float feature ``embedding_key``.

    DataConfigError naming ``condition.embedding_key`` (and listing the features) when the
    dataset has no such feature or it is not a fixed-shape float tensor of rank 1 or 2.
    """
    if embedding_key not in features:
        raise DataConfigError(
            f"config field 'condition.embedding_key' = {embedding_key!r}: dataset '{name}' has "
            f"no such feature; it has {sorted(features.keys())}"
        )
    feature = features[embedding_key]
    shape = tuple(getattr(feature, "shape", ()) or ())
    dtype = getattr(feature, "np_dtype", None)
    if (
        dtype is None
        or not np.issubdtype(dtype, np.floating)
        or len(shape) not in (1, 2)
        or any(d is None or d <= 0 for d in shape)
    ):
        raise DataConfigError(
            f"config field 'condition.embedding_key' = {embedding_key!r}: feature "
            f"'{embedding_key}' of dataset '{name}' is {type(feature).__name__} of shape {shape} "
            f"dtype {dtype}; expected a float Tensor of fixed shape (D,) or (L, D)"
        )
    return tuple(int(d) for d in shape)


def check_embeddings(name, embeddings: np.ndarray, shape) -> np.ndarray:
    """Embeddings read from dataset ``name``, (n, *shape) and finite, as float32."""
    if embeddings.shape[1:] != tuple(shape):
        raise ValueError(
            f"dataset '{name}': read embeddings of shape {embeddings.shape[1:]}, expected "
            f"{tuple(shape)}"
        )
    embeddings = embeddings.astype(np.float32)
    if not np.isfinite(embeddings).all():
        raise ValueError(f"dataset '{name}': embeddings hold non-finite values (NaN or inf)")
    return embeddings


def _image_shape(name, features, image_key) -> tuple:
    if image_key not in features:
        raise ValueError(
            f"dataset '{name}' has no feature '{image_key}' (image_key); it has "
            f"{sorted(features.keys())}"
        )
    return tuple(features[image_key].shape)


def _num_classes(name, features, label_key) -> int | None:
    if label_key is None:
        return None
    if label_key not in features:
        raise ValueError(
            f"dataset '{name}' has no feature '{label_key}' (label_key); it has "
            f"{sorted(features.keys())}; use label_key=None for unlabelled data"
        )
    num_classes = getattr(features[label_key], "num_classes", None)
    if num_classes is None:
        raise ValueError(
            f"dataset '{name}': feature '{label_key}' (label_key) is not a ClassLabel; use a "
            f"class-label feature or label_key=None"
        )
    return int(num_classes)
