"""Small TFDS datasets that are wrong for an image diffusion model, for the bad-input drill.

``drill_images/<config>`` is built locally (no network) in array_record format, as a user's
prepared dataset would be; the trainer then reads it from the data directory like any TFDS
dataset (``tfds.builder`` rebuilds the description from the files, so the trainer process
never imports this module).

    side10        (10, 10, 1) uint8 images: no DiT patch size of 4 or 8 divides 10
    two_channels  (8, 8, 2) uint8: neither grey, RGB nor RGBA
    float_pixels  (8, 8, 1) float32: TFDS images are read as uint8 pixels
    rank2         (8, 8) uint8: no channel axis
    empty         (8, 8, 1) uint8 images, but a train split of no examples (TFDS refuses to
                  write an empty split: one example is written, then dataset_info.json is
                  edited to say 0, as a dataset emptied by a filter would read)
"""

from __future__ import annotations

import json
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

NUM_EXAMPLES = 32
# config name -> (feature kind, shape, dtype, number of examples)
CONFIGS = {
    "side10": ("image", (10, 10, 1), np.uint8, NUM_EXAMPLES),
    "two_channels": ("tensor", (8, 8, 2), np.uint8, NUM_EXAMPLES),
    "float_pixels": ("tensor", (8, 8, 1), np.float32, NUM_EXAMPLES),
    "rank2": ("tensor", (8, 8), np.uint8, NUM_EXAMPLES),
    "empty": ("image", (8, 8, 1), np.uint8, 1),
}


class DrillImages(tfds.core.GeneratorBasedBuilder):
    """Random images with the shapes and dtypes of ``CONFIGS``, labels 0..9."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS: ClassVar[list] = [tfds.core.BuilderConfig(name=name) for name in CONFIGS]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:  # see diffusax.data.digits_tfds
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        kind, shape, dtype, _ = CONFIGS[self.builder_config.name]
        if kind == "image":
            image = tfds.features.Image(shape=shape, dtype=dtype)
        else:
            image = tfds.features.Tensor(shape=shape, dtype=dtype)
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {"image": image, "label": tfds.features.ClassLabel(num_classes=10)}
            )
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        _, shape, dtype, count = CONFIGS[self.builder_config.name]
        rng = np.random.default_rng(0)
        for i in range(count):
            image = rng.integers(0, 256, shape).astype(dtype)
            yield i, {"image": image, "label": i % 10}


def prepare(data_dir: str, configs=tuple(CONFIGS)) -> list[str]:
    """Build the given configs under ``data_dir``; returns the names they are read by."""
    names = []
    for name in configs:
        builder = DrillImages(config=name, data_dir=data_dir)
        builder.download_and_prepare(file_format="array_record")
        if name == "empty":
            info_path = epath.Path(builder.data_dir) / "dataset_info.json"
            info = json.loads(info_path.read_text())
            for split in info["splits"]:
                split["shardLengths"], split["numBytes"] = ["0"], "0"
            info_path.write_text(json.dumps(info))
        names.append(f"drill_images/{name}")
    return names
