"""Datasets and the deterministic batch pipeline, including a real TFDS dataset built locally."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from diffusax import data, parallel
from diffusax.data import sources

N_TRAIN, N_TEST = 1497, 300


@pytest.fixture(scope="module")
def train():
    return data.load_source("digits", "train")


@pytest.fixture(scope="module")
def sklearn_digits():
    return load_digits()


# --- bundled digits -------------------------------------------------------------------------


def test_digits_shapes_range_labels(train, sklearn_digits):
    test = data.load_source("digits", "test")
    assert train.info == data.DatasetInfo("digits", "train", N_TRAIN, (8, 8, 1), "float32", 10)
    assert len(test) == N_TEST
    batch = train.read(np.arange(N_TRAIN))
    assert batch["image"].shape == (N_TRAIN, 8, 8, 1) and batch["image"].dtype == np.float32
    assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0
    assert batch["label"].dtype == np.int32 and set(batch["label"]) == set(range(10))
    # Values are sklearn's pixels p in 0..16 mapped by p / 8 - 1, with sklearn's labels.
    idx = sources.digits_split_indices("train")
    np.testing.assert_array_equal(batch["image"][..., 0], sklearn_digits.images[idx] / 8 - 1)
    np.testing.assert_array_equal(batch["label"], sklearn_digits.target[idx])


def test_digits_split_is_disjoint_stratified_and_fixed(sklearn_digits):
    train_idx = sources.digits_split_indices("train")
    test_idx = sources.digits_split_indices("test")
    assert not set(train_idx) & set(test_idx)
    assert sorted(np.concatenate([train_idx, test_idx])) == list(range(1797))
    assert np.bincount(sklearn_digits.target[test_idx]).tolist() == [30] * 10
    with pytest.raises(ValueError, match="split='validation'"):
        data.load_source("digits", "validation")


def test_digits_expected_shape_is_checked():
    with pytest.raises(ValueError, match=r"'digits'.*\(8, 8, 1\).*\(32, 32, 3\)"):
        data.load_source("digits", image_shape=(32, 32, 3))


# --- order of examples ----------------------------------------------------------------------


def test_batch_indices_deterministic():
    a = data.batch_indices(1497, 64, step=11, seed=3)
    np.testing.assert_array_equal(a, data.batch_indices(1497, 64, step=11, seed=3))
    assert a.shape == (64,) and a.dtype == np.int64
    assert not np.array_equal(a, data.batch_indices(1497, 64, step=12, seed=3))
    assert not np.array_equal(a, data.batch_indices(1497, 64, step=11, seed=4))


@pytest.mark.parametrize("n,batch", [(100, 8), (97, 8), (5, 8)])
def test_every_example_once_per_epoch(n, batch):
    """Stream positions [e * N, (e + 1) * N) hold each example exactly once, for each epoch e."""
    steps = -(-3 * n // batch)  # enough steps for three epochs
    stream = np.concatenate([data.batch_indices(n, batch, s, seed=1) for s in range(steps)])
    epochs = [stream[e * n : (e + 1) * n] for e in range(3)]
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
    assert not np.array_equal(epochs[0], epochs[1])  # a new order each epoch


def test_epoch_of_a_step():
    """Batch `step` is positions step*B ..; its epoch is step*B // N (a straddling batch wraps)."""
    n, b = 10, 4
    batch = data.batch_indices(n, b, step=2, seed=0)  # positions 8, 9 | 10, 11
    np.testing.assert_array_equal(batch[:2], data.epoch_permutation(n, 0, 0)[8:10])
    np.testing.assert_array_equal(batch[2:], data.epoch_permutation(n, 0, 1)[0:2])


def test_position_of_an_example_is_uniform():
    """Where example 0 lands in the epoch order is uniform over 0..N-1 (chi-square, 400 epochs)."""
    n, epochs = 8, 400
    counts = np.bincount(
        [int(np.argmax(data.epoch_permutation(n, 7, e) == 0)) for e in range(epochs)], minlength=n
    )
    expected = epochs / n
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 30.0, counts  # 7 dof: P(chi2 > 30) ~ 1e-4


@pytest.mark.parametrize("kwargs", [{"step": -1}, {"seed": -1}, {"global_batch": 0}])
def test_batch_indices_rejects_bad_arguments(kwargs):
    args = {"num_examples": 10, "global_batch": 4, "step": 0, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        data.batch_indices(**args)


# --- flips and host slicing -----------------------------------------------------------------


def test_random_flip_mirrors_the_chosen_rows(train):
    plain = data.read_rows(train, 4, 9, 256, np.arange(256), random_flip=False)
    flipped = data.read_rows(train, 4, 9, 256, np.arange(256), random_flip=True)
    mask = data.flip_mask(256, 4, 9)
    np.testing.assert_array_equal(flipped["image"][mask], plain["image"][mask][:, :, ::-1])
    np.testing.assert_array_equal(flipped["image"][~mask], plain["image"][~mask])
    np.testing.assert_array_equal(flipped["label"], plain["label"])
    np.testing.assert_array_equal(mask, data.flip_mask(256, 4, 9))
    assert not np.array_equal(mask, data.flip_mask(256, 5, 9))


def test_flip_rate_is_one_half():
    rate = data.flip_mask(40_000, 0, 0).mean()
    assert abs(rate - 0.5) < 5 * 0.5 / np.sqrt(40_000)  # 5 standard errors = 0.0125


@pytest.mark.parametrize("processes", [2, 4])
def test_host_batches_reconstruct_the_global_batch(train, processes):
    whole = data.host_batch(train, step=3, seed=2, global_batch=32, random_flip=True)
    parts = [
        data.host_batch(train, 3, 2, 32, process_index=p, process_count=processes, random_flip=True)
        for p in range(processes)
    ]
    for key in ("image", "label"):
        assert all(part[key].shape[0] == 32 // processes for part in parts)
        np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), whole[key])


def test_host_batch_rejects_bad_process(train):
    with pytest.raises(ValueError, match="process_index=2"):
        data.host_batch(train, 0, 0, 32, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="process_count=3"):
        data.host_batch(train, 0, 0, 32, process_index=0, process_count=3)


# --- loader: sharded batches and resume ----------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 1), (4, 2)])
def test_loader_yields_sharded_global_batches(train, shape):
    mesh = parallel.make_mesh(*shape)
    loader = data.Loader(train, mesh, global_batch=32, seed=1, random_flip=True, step=5)
    batch = next(loader)
    expect = data.host_batch(train, step=5, seed=1, global_batch=32, random_flip=True)
    for key in ("image", "label"):
        assert batch[key].shape == expect[key].shape and batch[key].dtype == expect[key].dtype
        assert batch[key].sharding == parallel.batch_sharding(mesh)
        for shard in batch[key].addressable_shards:
            assert shard.data.shape[0] == 4
            np.testing.assert_array_equal(np.asarray(shard.data), expect[key][shard.index])
    assert loader.state() == {"step": 6, "seed": 1, "num_examples": N_TRAIN}
    loader.close()


def _host(batch):
    return {key: np.asarray(value) for key, value in batch.items()}


def test_resume_replays_the_uninterrupted_run(train):
    """Checkpoint after 3 steps, restore into a fresh loader: the next batches are identical."""
    mesh = parallel.make_mesh()
    straight = data.Loader(train, mesh, 64, seed=4, random_flip=True)
    run = [_host(next(straight)) for _ in range(30)]  # 64 * 30 > 1497: crosses an epoch
    first = data.Loader(train, mesh, 64, seed=4, random_flip=True)
    for _ in range(3):
        next(first)
    saved = first.state()
    first.close()
    # A loader that has read ahead 3 steps with another seed must throw that away on restore.
    resumed = data.Loader(train, mesh, 64, seed=99, random_flip=True, prefetch=2)
    for _ in range(3):
        next(resumed)
    resumed.restore(saved)
    for step in range(3, 30):
        batch = _host(next(resumed))
        for key in ("image", "label"):
            np.testing.assert_array_equal(batch[key], run[step][key])
    assert resumed.state()["step"] == 30
    # Restoring a running loader to an earlier step throws away what it read ahead.
    straight.restore({"step": 1, "seed": 4, "num_examples": N_TRAIN})
    np.testing.assert_array_equal(_host(next(straight))["label"], run[1]["label"])
    straight.close()


def test_restore_rejects_another_dataset(train):
    loader = data.Loader(train, parallel.make_mesh(), 8, seed=0)
    with pytest.raises(ValueError, match="1797 examples, but 'digits' has 1497"):
        loader.restore({"step": 3, "seed": 0, "num_examples": 1797})


def test_loader_rejects_batch_that_does_not_split(train):
    with pytest.raises(ValueError, match="global_batch=12"):
        data.Loader(train, parallel.make_mesh(), 12, seed=0)


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "images,labels,match",
    [
        (np.zeros((4, 8, 8), np.uint8), None, r"shape \(4, 8, 8\); expected \(N, H, W, C\)"),
        (np.zeros((0, 8, 8, 1), np.uint8), None, "is empty"),
        (np.zeros((4, 8, 8, 2), np.uint8), None, "2 channels"),
        (np.zeros((4, 8, 8, 1), np.int16), None, "dtype int16"),
        (np.full((4, 8, 8, 1), 2.0, np.float32), None, r"span \[2.0, 2.0\]"),
        (np.zeros((4, 8, 8, 1), np.uint8), np.array([0, 1, 2, 10]), r"outside \[0, 10\)"),
        (np.zeros((4, 8, 8, 1), np.uint8), np.zeros(3, np.int32), r"expected integers of shape"),
    ],
)
def test_array_source_rejects_bad_data(images, labels, match):
    with pytest.raises(ValueError, match=rf"dataset 'toy' split 'train'.*{match}"):
        data.ArraySource("toy", "train", images, labels, num_classes=10)


def test_array_source_maps_uint8_to_unit_range():
    images = np.array([0, 51, 255], np.uint8).reshape(3, 1, 1, 1)
    source = data.ArraySource("toy", "train", images)
    out = source.read([2, 0, 1])
    np.testing.assert_allclose(out["image"].ravel(), [1.0, -1.0, 51 / 127.5 - 1], atol=1e-7)
    assert "label" not in out and source.info.num_classes is None


@pytest.mark.parametrize(
    "shape,match", [((8, 8), "rank 2"), ((None, None, 3), "not fixed"), ((8, 8, 1, 1), "rank 4")]
)
def test_validate_info_rejects_bad_shapes(shape, match):
    info = data.DatasetInfo("toy", "train", 10, shape, "uint8", 10)
    with pytest.raises(ValueError, match=f"dataset 'toy'.*{match}"):
        data.validate_info(info)


# --- TFDS: a real array_record dataset built locally, read like cifar10 --------------------


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    """digits_tfds built once per session (about 4 s, most of it importing TensorFlow)."""
    from diffusax.data import digits_tfds

    data_dir = tmp_path_factory.mktemp("tfds")
    digits_tfds.prepare(str(data_dir))
    return str(data_dir)


def test_tfds_dataset_reads_back_against_sklearn(tfds_dir, sklearn_digits):
    import tensorflow_datasets as tfds

    from diffusax.data import digits_tfds

    for split, size in (("train", N_TRAIN), ("test", N_TEST)):
        source = data.load_source("digits_tfds", split, tfds_dir)
        assert source.info == data.DatasetInfo("digits_tfds", split, size, (8, 8, 1), "uint8", 10)
        order = np.arange(size)[::-1]  # read in an arbitrary order
        batch = source.read(order)
        assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
        # TFDS shuffles when writing; its 'index' feature names each row's sklearn example.
        raw = tfds.builder("digits_tfds", data_dir=tfds_dir).as_data_source(split)
        positions = np.array([raw[int(i)]["index"] for i in order])
        assert sorted(positions) == sorted(sources.digits_split_indices(split))
        pixels = digits_tfds.to_uint8(sklearn_digits.images[positions])[..., None]
        np.testing.assert_array_equal(batch["image"], pixels / np.float32(127.5) - 1)
        np.testing.assert_array_equal(batch["label"], sklearn_digits.target[positions])
        # Within half a uint8 step of the bundled digits' p / 8 - 1.
        bundled = sklearn_digits.images[positions][..., None] / 8 - 1
        np.testing.assert_allclose(batch["image"], bundled, atol=0.5 / 127.5 + 1e-6)


def test_tfds_dataset_through_the_loader(tfds_dir):
    source = data.load_source("digits_tfds", "train", tfds_dir)
    mesh = parallel.make_mesh(4, 2)
    loader = data.Loader(source, mesh, 16, seed=0, random_flip=True)
    batches = [next(loader) for _ in range(3)]
    expect = data.host_batch(source, step=2, seed=0, global_batch=16, random_flip=True)
    assert batches[2]["image"].sharding == parallel.batch_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(batches[2]["image"]), expect["image"])
    np.testing.assert_array_equal(np.asarray(batches[2]["label"]), expect["label"])
    loader.close()


@pytest.mark.parametrize("name", ["cifar10", "no_such_dataset"])
def test_missing_tfds_dataset_says_how_to_prepare_it(tmp_path, name):
    from diffusax.data.tfds_source import DatasetNotPreparedError

    with pytest.raises(DatasetNotPreparedError) as err:
        data.load_source(name, "train", str(tmp_path))
    message = str(err.value)
    assert f"'{name}'" in message and str(tmp_path) in message
    assert f"tfds.builder('{name}', data_dir='{tmp_path}')" in message
    assert "download_and_prepare(file_format='array_record')" in message
    assert f"tfds build {name} --file_format=array_record" in message
    assert not (tmp_path / name).exists() or not any((tmp_path / name).rglob("*.array_record*"))


def test_tfrecord_dataset_is_rejected_with_the_fix(tmp_path):
    from diffusax.data import digits_tfds
    from diffusax.data.tfds_source import DatasetNotPreparedError

    digits_tfds.DigitsTfds(data_dir=str(tmp_path)).download_and_prepare(file_format="tfrecord")
    with pytest.raises(DatasetNotPreparedError, match=r"prepared as tfrecord.*array_record"):
        data.load_source("digits_tfds", "train", str(tmp_path))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"image_key": "label"}, "rank 0"),
        ({"image_key": "index"}, "rank 0"),
        ({"image_key": "picture"}, "no feature 'picture'.*'image', 'index', 'label'"),
        ({"label_key": "index"}, "'index' .label_key. is not a ClassLabel"),
        ({"split": "validation"}, "no split 'validation'"),
        ({"image_shape": (32, 32, 3)}, r"\(8, 8, 1\) but the config asks for \(32, 32, 3\)"),
    ],
)
def test_tfds_bad_features_are_rejected(tfds_dir, kwargs, match):
    args = {"name": "digits_tfds", "split": "train", "data_dir": tfds_dir} | kwargs
    with pytest.raises(ValueError, match=f"'digits_tfds'.*{match}"):
        data.load_source(**args)


def test_tfds_unlabelled_reading(tfds_dir):
    source = data.load_source("digits_tfds", "test", tfds_dir, label_key="")  # as configs say
    assert source.info.num_classes is None
    assert set(source.read([0, 1])) == {"image"}
