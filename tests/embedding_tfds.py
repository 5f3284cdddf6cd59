"""``embedding_tfds``: a tiny TFDS dataset whose examples carry precomputed embeddings.

Built locally (no network) in array_record format, as a user's prepared dataset of images with
CLIP / T5 embeddings would be. Features:

    image      (8, 8, 1) uint8 PNG
    label      ClassLabel(4): i % 4
    embedding  Tensor (6,) float32       (a pooled, CLIP-like vector)
    sequence   Tensor (3, 6) float32     (a per-token, T5-like sequence)
    index      int64: the example's row in ``IMAGES`` etc. (TFDS shuffles when it writes)

Importing this module registers the builder with TFDS.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

NUM_EXAMPLES = 16
NUM_CLASSES = 4
EMBEDDING_SHAPE = (6,)
SEQUENCE_SHAPE = (3, 6)

_rng = np.random.default_rng(0)
IMAGES = _rng.integers(0, 256, (NUM_EXAMPLES, 8, 8, 1), dtype=np.uint8)
LABELS = np.arange(NUM_EXAMPLES) % NUM_CLASSES
EMBEDDINGS = _rng.standard_normal((NUM_EXAMPLES, *EMBEDDING_SHAPE)).astype(np.float32)
SEQUENCES = _rng.standard_normal((NUM_EXAMPLES, *SEQUENCE_SHAPE)).astype(np.float32)


class EmbeddingTfds(tfds.core.GeneratorBasedBuilder):
    """Random 8x8 grey images with labels, a (6,) embedding and a (3, 6) sequence each."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
    # A top-level module (tests/ is no package): TFDS would look for its metadata folder
    # through importlib.resources, which needs a package.
    pkg_dir_path = epath.Path(__file__).parent

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:  # see diffusax.data.digits_tfds
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                    "embedding": tfds.features.Tensor(shape=EMBEDDING_SHAPE, dtype=np.float32),
                    "sequence": tfds.features.Tensor(shape=SEQUENCE_SHAPE, dtype=np.float32),
                    "index": tfds.features.Scalar(dtype=np.int64),
                }
            )
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(NUM_EXAMPLES):
            yield (
                i,
                {
                    "image": IMAGES[i],
                    "label": int(LABELS[i]),
                    "embedding": EMBEDDINGS[i],
                    "sequence": SEQUENCES[i],
                    "index": i,
                },
            )


def prepare(data_dir: str) -> tfds.core.DatasetBuilder:
    """Build ``embedding_tfds`` in array_record format under ``data_dir``."""
    builder = EmbeddingTfds(data_dir=data_dir)
    builder.download_and_prepare(file_format="array_record")
    return builder
