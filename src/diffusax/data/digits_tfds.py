"""``digits_tfds``: scikit-learn's bundled digits as a real TFDS dataset, built without network.

It lets the TFDS path (the one cifar10 or mnist take) run anywhere: tests build it in a
temporary folder and read it back through ``diffusax.data.tfds_source``. Build it with::

    python -c "from diffusax.data import digits_tfds; digits_tfds.prepare('DATA_DIR')"

Features: ``image`` (8, 8, 1) uint8 PNG, pixels round(p * 255 / 16) of the 0..16 originals;
``label`` ClassLabel(10); ``index`` the example's position in ``load_digits()`` (TFDS shuffles
examples when it writes them, so tests use it to match rows). The splits are those of
``sources.digits``. Importing this module registers the builder with TFDS.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from diffusax.data import sources


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Digits pixels p in 0..16 -> uint8 round(p * 255 / 16) in 0..255."""
    return np.round(pixels.astype(np.float64) * (255.0 / 16.0)).astype(np.uint8)


class DigitsTfds(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 handwritten digits (UCI optical recognition of handwritten digits)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}

    # TFDS 4.9.10 finds a packaged builder's file through `importlib_resources`, a backport it
    # only declares for Python < 3.9; naming the file here avoids that import.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                    "index": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            supervised_keys=("image", "label"),
            description=__doc__,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # bundled with scikit-learn: nothing to download
        return {split: self._generate_examples(split) for split in ("train", "test")}

    def _generate_examples(self, split):
        pixels, labels, positions = sources.digits_arrays()[split]
        for image, label, position in zip(to_uint8(pixels), labels, positions):
            yield int(position), {"image": image, "label": int(label), "index": int(position)}


def prepare(data_dir: str) -> tfds.core.DatasetBuilder:
    """Build ``digits_tfds`` in array_record format under ``data_dir`` (no network)."""
    builder = DigitsTfds(data_dir=data_dir)
    builder.download_and_prepare(file_format="array_record")
    return builder
