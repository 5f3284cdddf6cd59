"""Datasets that carry precomputed condition embeddings (condition.kind = "embedding").

A real TFDS dataset (``tests/embedding_tfds.py``: 16 images 8x8x1, labels, a (6,) embedding and a
(3, 6) sequence each) is built locally and read through ``data.load_source``, through an
``ArraySource``, and through latent shards encoded by the seeded ``tiny-random`` VAE.
"""

import embedding_tfds as et
import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from diffusax import data
from diffusax.config import load_experiment
from diffusax.data import latents, raw_images
from diffusax.data.sources import DataConfigError, to_unit_range

SIZE = 8  # latents: 8x8 images -> 1x1x4 through the 8x-downsampling tiny VAE
SCALE = 0.18215


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    et.prepare(data_dir)
    return data_dir


@pytest.fixture(scope="module")
def positions(tfds_dir):
    """Row i of the prepared split is example positions[i] of ``embedding_tfds`` (TFDS shuffles)."""
    import tensorflow_datasets as tfds

    raw = tfds.builder("embedding_tfds", data_dir=tfds_dir).as_data_source("train")
    return np.array([raw[i]["index"] for i in range(len(raw))])


# --- TFDS ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,shape,values",
    [
        ("embedding", et.EMBEDDING_SHAPE, et.EMBEDDINGS),
        ("sequence", et.SEQUENCE_SHAPE, et.SEQUENCES),
    ],
)
def test_tfds_embeddings_read_back(tfds_dir, positions, key, shape, values):
    source = data.load_source("embedding_tfds", "train", tfds_dir, embedding_key=key)
    assert source.info == data.DatasetInfo(
        "embedding_tfds", "train", et.NUM_EXAMPLES, (8, 8, 1), "uint8", et.NUM_CLASSES, shape
    )
    order = np.arange(et.NUM_EXAMPLES)[::-1]
    batch = source.read(order)
    assert set(batch) == {"image", "label", "embedding"}
    assert batch["embedding"].dtype == np.float32
    assert batch["embedding"].shape == (et.NUM_EXAMPLES, *shape)
    pos = positions[order]
    np.testing.assert_array_equal(batch["embedding"], values[pos])  # exactly what was written
    np.testing.assert_array_equal(batch["image"], to_unit_range(et.IMAGES[pos]))
    np.testing.assert_array_equal(batch["label"], et.LABELS[pos])
    # The pipeline carries them row-aligned, flips leaving them alone.
    rows = data.read_rows(
        source, step=1, seed=3, global_batch=8, rows=np.arange(8), random_flip=True
    )
    indices = data.batch_indices(et.NUM_EXAMPLES, 8, 1, 3)
    np.testing.assert_array_equal(rows["embedding"], values[positions[indices]])


def test_without_embedding_key_nothing_changes(tfds_dir):
    source = data.load_source("embedding_tfds", "train", tfds_dir)
    assert source.info.embedding_shape is None
    assert set(source.read([0, 1])) == {"image", "label"}


@pytest.mark.parametrize(
    "key,match",
    [
        ("clip", r"no such feature; it has \['embedding', 'image', 'index', 'label', 'sequence'\]"),
        ("label", "ClassLabel of shape"),
        ("image", "expected a float Tensor"),
    ],
)
def test_bad_embedding_feature_names_the_field(tfds_dir, key, match):
    with pytest.raises(DataConfigError, match=rf"'condition.embedding_key' = '{key}'.*{match}"):
        data.load_source("embedding_tfds", "train", tfds_dir, embedding_key=key)
    with pytest.raises(DataConfigError, match=r"condition.embedding_key"):
        raw_images.open_images("embedding_tfds", "train", tfds_dir, embedding_key=key)


def test_sources_without_embeddings_refuse_an_embedding_key():
    with pytest.raises(DataConfigError, match=r"condition.embedding_key.*digits carry no"):
        data.load_source("digits", "train", embedding_key="embedding")
    with pytest.raises(DataConfigError, match=r"condition.embedding_key.*carries no embeddings"):
        raw_images.open_images("digits", embedding_key="embedding")


# --- in memory ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5,), (2, 5)])
def test_array_source_with_embeddings(shape):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
    embeddings = rng.standard_normal((4, *shape))  # float64: read as float32
    source = data.ArraySource(
        "toy", "train", images, np.arange(4), num_classes=4, embeddings=embeddings
    )
    assert source.info.embedding_shape == shape
    out = source.read([3, 1])
    assert out["embedding"].dtype == np.float32
    np.testing.assert_array_equal(out["embedding"], embeddings[[3, 1]].astype(np.float32))
    np.testing.assert_array_equal(out["label"], [3, 1])
    assert "embedding" not in data.ArraySource("toy", "train", images).read([0])


@pytest.mark.parametrize(
    "embeddings,match",
    [
        (np.zeros((3, 6), np.float32), "3 embeddings for 4 images"),
        (np.zeros(4, np.float32), r"shape \(4,\).*expected floats of shape \(N, D\)"),
        (np.zeros((4, 1, 2, 3), np.float32), r"shape \(4, 1, 2, 3\)"),
        (np.zeros((4, 6), np.int32), "dtype int32"),
        (np.full((4, 6), np.nan, np.float32), "non-finite"),
        (np.zeros((4, 0), np.float32), r"shape \(0,\) per example"),
    ],
)
def test_array_source_rejects_bad_embeddings(embeddings, match):
    images = np.zeros((4, 8, 8, 1), np.uint8)
    with pytest.raises(ValueError, match=rf"dataset 'toy' split 'train'.*{match}"):
        data.ArraySource("toy", "train", images, embeddings=embeddings)


# --- latent shards ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cfg(tfds_dir, tmp_path_factory):
    """dit_xl2's latent settings, made to encode embedding_tfds with its embeddings."""
    cfg = load_experiment(
        "dit_xl2",
        overrides={
            "latents.dir": str(tmp_path_factory.mktemp("shards")),
            "latents.source": "embedding_tfds",
            "latents.source_dir": tfds_dir,
            "latents.vae": latents.TINY_RANDOM,
            "latents.image_size": SIZE,
            "latents.shard_size": 5,  # 5 + 5 + 5 + 1 examples
            "latents.batch_size": 4,
        },
    ).copy_and_resolve_references()
    # condition.kind needs model.name = unet_cond in a full config; the data layer reads only
    # these two fields.
    cfg.condition.kind = "embedding"
    cfg.condition.embedding_shape = et.EMBEDDING_SHAPE
    return cfg


@pytest.fixture(scope="module")
def shards(cfg):
    latents.encode_from_config(cfg)
    return latents.open_source(cfg)


def test_latent_shards_store_the_embeddings(cfg, shards, positions):
    manifest = latents.read_manifest(cfg.latents.dir)
    assert manifest["complete"] and manifest["num_shards"] == 4 and manifest["views"] == 2
    assert manifest["embedding_shape"] == [6] and manifest["embedding_key"] == "embedding"
    assert shards.info == data.DatasetInfo(
        "latents:embedding_tfds", "train", et.NUM_EXAMPLES, (1, 1, 4), "float32", 4, (6,)
    )
    moments = shards.read(np.arange(et.NUM_EXAMPLES))
    np.testing.assert_array_equal(moments["embedding"], et.EMBEDDINGS[positions])
    np.testing.assert_array_equal(moments["label"], et.LABELS[positions])


def test_read_sampled_returns_embeddings_row_aligned(shards, positions, tfds_dir):
    rows = np.arange(8)
    batch = data.read_rows(shards, step=2, seed=1, global_batch=8, rows=rows, random_flip=True)
    assert set(batch) == {"image", "label", "embedding"}
    indices = data.batch_indices(et.NUM_EXAMPLES, 8, 2, 1)
    flip = data.flip_mask(8, 2, 1)
    assert 0 < flip.sum() < 8
    examples = positions[indices]
    assert batch["embedding"].dtype == np.float32 and batch["embedding"].shape == (8, 6)
    np.testing.assert_array_equal(batch["embedding"], et.EMBEDDINGS[examples])
    np.testing.assert_array_equal(batch["label"], et.LABELS[examples])
    # Row r's latent is a draw from q(z | x) of the very image whose embedding row r holds (its
    # mirror where flipped): the oracle encodes those images straight through the VAE.
    graphdef, params = nnx.split(latents.tiny_random_vae())
    pixels = np.stack(
        [
            raw_images.center_crop(Image.fromarray(et.IMAGES[e][..., 0]).convert("RGB"), SIZE)
            for e in examples
        ]
    )
    pixels = np.where(flip[:, None, None, None], pixels[:, :, ::-1], pixels)
    q = jax.jit(lambda x: nnx.merge(graphdef, params).encode(x))(to_unit_range(pixels))
    noise = data.noise_rows((1, 1, 4), 2, 1, rows)
    expect = SCALE * (np.asarray(q.mean) + np.asarray(q.std) * noise)
    np.testing.assert_allclose(batch["image"], expect, rtol=1e-4, atol=1e-5)


def test_shards_refuse_another_embedding(cfg, shards, tfds_dir):
    other = cfg.copy_and_resolve_references()
    other.condition.embedding_key = "sequence"
    with pytest.raises(ValueError, match=r"embedding_key: 'embedding' -> 'sequence'"):
        latents.encode_from_config(other)  # resuming into them with another feature
    with pytest.raises(DataConfigError, match=r"'condition.embedding_key' is 'sequence'"):
        latents.open_source(other)
    other.condition.embedding_key = "embedding"
    other.condition.embedding_shape = (3, 6)
    with pytest.raises(DataConfigError, match=r"'condition.embedding_shape' is \(3, 6\)"):
        latents.open_source(other)
    plain = cfg.copy_and_resolve_references()
    plain.condition.kind = ""  # shards with embeddings still serve an experiment without them
    assert latents.open_source(plain).info.embedding_shape == (6,)


def test_shards_without_embeddings_refuse_an_embedding_condition(tmp_path, cfg):
    images = raw_images.open_images("embedding_tfds", "train", cfg.latents.source_dir)
    assert images.embedding_shape is None and len(images.load(0)) == 2
    vae = latents.tiny_random_vae()
    latents.encode_to_shards(
        str(tmp_path), images, vae, latents.TINY_RANDOM, image_size=SIZE, shard_size=16, views=1
    )
    manifest = latents.read_manifest(str(tmp_path))
    assert "embedding_shape" not in manifest and "embedding_key" not in manifest
    assert latents.LatentSource(str(tmp_path)).info.embedding_shape is None
    other = cfg.copy_and_resolve_references()
    other.latents.dir = str(tmp_path)
    other.data.random_flip = False
    with pytest.raises(DataConfigError, match=r"'condition.embedding_key'.*hold no embeddings"):
        latents.open_source(other)


def test_an_embedding_of_the_wrong_width_stops_the_run_before_step_0(tfds_dir, tmp_path):
    """A config that declares (5,) embeddings on a dataset holding (6,) ones: the trainer stops
    while opening the data, naming the field and both shapes, and writes no checkpoint."""
    from diffusax.config import ConfigError
    from diffusax.train import loop

    cfg = load_experiment(
        "ldm_digits",
        overrides={
            "method": "ddpm",
            "data.name": "embedding_tfds",
            "data.data_dir": tfds_dir,
            "condition.kind": "embedding",
            "condition.embedding_key": "embedding",
            "condition.embedding_shape": (5,),
        },
    )
    with pytest.raises(
        ConfigError,
        match=r"'condition.embedding_shape' declares \(5,\).*embeddings of shape \(6,\)",
    ):
        loop.train(cfg, str(tmp_path / "run"), devices=jax.devices()[:1])
    assert not (tmp_path / "run" / "checkpoints").exists()
