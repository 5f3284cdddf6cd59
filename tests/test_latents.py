"""Latent shards: encode once (killed for real and resumed), draw z = s (μ + σ ε) per step, decode.

The autoencoder is the seeded `tiny-random` VAE (8x downsampling like SD's), except for one test
that loads a real diffusers AutoencoderKL folder. The command line runs as a user runs it:
`python -m diffusax.main --config=experiments/dit_xl2.py --config.runlocal=True`.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from diffusax import data, parallel
from diffusax.config import ConfigError, load_experiment
from diffusax.data import latents, raw_images
from diffusax.data.sources import to_unit_range

REPO = Path(__file__).resolve().parents[1]
JAX_CACHE = os.path.join(tempfile.gettempdir(), f"diffusax-test-jax-cache-{os.getuid()}")
SIZE = 16  # in-process tests: 16x16 images -> 2x2x4 latents
N = 10
SCALE = 0.18215


@pytest.fixture(scope="module")
def vae():
    return latents.tiny_random_vae()


@pytest.fixture(scope="module")
def images():
    """N random RGB images of varied, non-square sizes, labelled i % 3."""
    rng = np.random.default_rng(0)
    arrays = [
        rng.integers(0, 256, (18 + 2 * i, 20 + 5 * (i % 3), 3), dtype=np.uint8) for i in range(N)
    ]
    load = lambda i: (Image.fromarray(arrays[i]), i % 3)
    return raw_images.Images("random", "train", N, 3, load)


@pytest.fixture(scope="module")
def direct(vae, images):
    """The oracle: q(z | x) of every image and of its mirror, straight from the VAE."""
    graphdef, params = nnx.split(vae)

    @jax.jit
    def moments(x):
        q = nnx.merge(graphdef, params).encode(x)
        return q.mean, q.std

    pixels = np.stack([raw_images.center_crop(images.load(i)[0], SIZE) for i in range(N)])
    return {
        view: tuple(np.asarray(m) for m in moments(to_unit_range(x)))
        for view, x in ((0, pixels), (1, pixels[:, :, ::-1]))
    }


@pytest.fixture(scope="module")
def shards(tmp_path_factory, vae, images):
    directory = str(tmp_path_factory.mktemp("shards"))
    kw = dict(image_size=SIZE, shard_size=4, batch_size=3, views=2)
    manifest = latents.encode_to_shards(directory, images, vae, latents.TINY_RANDOM, **kw)
    return directory, manifest


def test_center_crop_takes_the_middle_square():
    # 64 wide, 32 high: the middle 32 columns red, the rest blue. Halved once (short side 32 >=
    # 2 * 16) to 32 x 16, whose middle 16 columns are exactly the red ones.
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[..., 2] = 255
    pixels[:, 16:48] = (255, 0, 0)
    out = raw_images.center_crop(Image.fromarray(pixels), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.broadcast_to([255, 0, 0], (16, 16, 3)))


def test_shards_round_trip(shards, direct, vae):
    directory, manifest = shards
    assert vae.downsampling_factor == 8 and vae.latent_channels == 4  # SD's layout
    names = sorted(p for p in os.listdir(directory) if p.endswith(".npy"))
    assert names == [latents.shard_name(k, 3) for k in range(3)]  # 4 + 4 + 2 examples
    assert manifest["complete"] and manifest["latent_shape"] == [2, 2, 4]
    assert json.load(open(os.path.join(directory, "manifest.json"))) == manifest
    source = latents.LatentSource(directory, SCALE)
    assert source.info == data.DatasetInfo("latents:random", "train", N, (2, 2, 4), "float32", 3)
    for view in (0, 1):
        got = source.read(np.arange(N), flip=np.full(N, bool(view)))
        # Batches of 3 against one of 10: XLA may sum in another order (a CI run differed by
        # 1.5e-6 on a mean of 9e-4), so the bound is float32 rounding at the values' scale, 1e-5.
        np.testing.assert_allclose(got["mean"], direct[view][0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["std"], direct[view][1], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got["label"], np.arange(N) % 3)
    records = np.concatenate([np.load(os.path.join(directory, n)) for n in names])
    np.testing.assert_array_equal(records["index"], np.arange(N))
    # The mirrored view is the latent of the mirrored image, not the mirrored latent.
    assert not np.allclose(direct[1][0], direct[0][0][:, :, ::-1], atol=1e-3)


def test_a_batch_draws_each_row_from_its_view(shards):
    source = latents.LatentSource(shards[0], SCALE)
    rows = np.arange(8)
    batch = data.read_rows(source, step=3, seed=5, global_batch=8, rows=rows, random_flip=True)
    indices = data.batch_indices(N, 8, 3, 5)
    flip = data.flip_mask(8, 3, 5)
    assert 0 < flip.sum() < 8  # both views occur in this batch
    moments = source.read(indices, flip)
    noise = data.noise_rows((2, 2, 4), 3, 5, rows)
    expect = SCALE * (moments["mean"] + moments["std"] * noise)  # z = s (μ + σ ε)
    np.testing.assert_allclose(batch["image"], expect, rtol=1e-6)
    np.testing.assert_array_equal(batch["label"], indices % 3)
    unflipped = data.read_rows(source, 3, 5, 8, rows, random_flip=False)["image"]
    differs = np.abs(unflipped - batch["image"]).max(axis=(1, 2, 3)) > 0
    np.testing.assert_array_equal(differs, flip)  # only the flipped rows change


def test_noise_is_standard_normal_and_fixed_per_row():
    shape = (4, 4, 4)
    eps = data.noise_rows(shape, step=7, seed=1, rows=np.arange(256))  # (256, 4, 4, 4)
    n = eps.size
    assert abs(eps.mean()) < 5 / np.sqrt(n)
    assert abs(eps.var() - 1) < 5 * np.sqrt(2 / n)
    flat = eps.reshape(256, -1)
    corr = np.mean(flat[:-1] * flat[1:])  # neighbouring rows are independent
    assert abs(corr) < 5 / np.sqrt(flat[:-1].size)
    # Row r's noise depends on (seed, step, r) only, not on which rows are read with it.
    np.testing.assert_array_equal(data.noise_rows(shape, 7, 1, [5, 200])[1], eps[200])
    assert not np.array_equal(data.noise_rows(shape, 8, 1, [200])[0], eps[200])


def test_batches_do_not_depend_on_processes_or_devices(shards):
    source = latents.LatentSource(shards[0], SCALE)
    whole = data.host_batch(source, step=2, seed=0, global_batch=8, random_flip=True)
    halves = [data.host_batch(source, 2, 0, 8, p, 2, random_flip=True) for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), whole["image"])
    batches = []
    for devices in (jax.devices(), jax.devices()[:2]):
        mesh = parallel.make_mesh(devices=devices)
        loader = data.Loader(source, mesh, 8, seed=0, random_flip=True, step=1)
        batches.append([np.asarray(next(loader)["image"]) for _ in range(3)])
        loader.close()
    np.testing.assert_array_equal(batches[0], batches[1])
    np.testing.assert_array_equal(batches[0][1], whole["image"])  # steps 1, 2, 3


def test_decoder_inverts_the_scale_through_the_same_vae(vae, shards):
    cfg = load_experiment("dit_xl2", overrides={"runlocal": True, "latents.dir": shards[0]})
    decode = latents.make_decoder(cfg)  # latents.vae from the config: tiny-random
    z = np.random.default_rng(0).standard_normal((2, 2, 2, 4)).astype(np.float32)
    graphdef, params = nnx.split(vae)
    vae_decode = jax.jit(lambda z: nnx.merge(graphdef, params).decode(z))
    expect = np.clip(np.asarray(vae_decode(z / SCALE)), -1, 1)  # x = D(z_s / s)
    np.testing.assert_allclose(np.asarray(decode(z)), expect, rtol=1e-5, atol=1e-5)
    assert np.asarray(decode(z)).shape == (2, 16, 16, 3)


def test_auto_encode_makes_the_shards_a_config_names(tmp_path):
    cfg = load_experiment(
        "dit_xl2",
        overrides={"runlocal": True, "latents.dir": str(tmp_path), "latents.image_size": 16},
    )
    source = latents.open_source(cfg)  # runlocal: digits through tiny-random
    assert source.info.image_shape == (2, 2, 4) and source.info.num_classes == 10
    assert len(source) == 1497 and source.views == 2
    assert latents.read_manifest(str(tmp_path))["vae"] == "tiny-random"


def test_missing_shards_say_how_to_make_them(tmp_path):
    cfg = load_experiment("dit_xl2", overrides={"latents.dir": str(tmp_path / "none")})
    with pytest.raises(latents.LatentShardsMissingError) as e:
        latents.open_source(cfg)
    message = str(e.value)
    for needle in (
        "latents.dir",
        "make latents EXP=dit_xl2",
        "imagenet2012",
        "--manual_dir",
        "folder:/path/to/imagenet/train",
        "stabilityai/sd-vae-ft-ema",
    ):
        assert needle in message
    assert not (tmp_path / "none").exists()
    with pytest.raises(FileNotFoundError, match=r"(?s)'latents\.vae' = '/no/vae'.*sd-vae-ft-ema"):
        latents.load_vae("/no/vae")


def test_unfinished_or_other_shards_are_refused(tmp_path, shards, vae, images):
    directory = str(tmp_path / "part")
    os.makedirs(directory)
    manifest = dict(shards[1], complete=False)
    Path(directory, "manifest.json").write_text(json.dumps(manifest))
    cfg = load_experiment("dit_xl2", overrides={"latents.dir": directory})
    with pytest.raises(latents.LatentShardsMissingError, match=r"unfinished.*make latents"):
        latents.open_source(cfg)
    with pytest.raises(ValueError, match=r"other settings \(image_size: 16 -> 24, "):
        kw = dict(image_size=24, shard_size=4, views=2)
        latents.encode_to_shards(directory, images, vae, latents.TINY_RANDOM, **kw)
    Path(directory, "manifest.json").write_text(json.dumps(dict(manifest, views=1, complete=True)))
    # Flips need the mirrored views: a config field the data cannot serve, named in the error.
    with pytest.raises(data.DataConfigError, match=r"data\.random_flip"):
        latents.open_source(cfg)


def test_config_checks_latent_fields():
    with pytest.raises(ConfigError, match=r"sample\.clip_x0"):
        load_experiment("dit_xl2", overrides={"sample.clip_x0": 1.0})
    with pytest.raises(ConfigError, match=r"latents\.shard_size"):
        load_experiment("dit_xl2", overrides={"latents.shard_size": 0})


def test_dit_xl2_is_the_papers_recipe():
    c = load_experiment("dit_xl2")
    assert (c.model.name, c.model.variant, c.model.class_conditional) == ("dit", "XL/2", True)
    assert (c.optim.name, c.optim.learning_rate, c.optim.weight_decay) == ("adamw", 1e-4, 0.0)
    assert (c.optim.warmup_steps, c.optim.grad_clip, c.optim.ema_decay) == (0, 0.0, 0.9999)
    assert c.train.batch_size == 256 and c.data.random_flip
    assert (c.latents.scale_factor, c.latents.image_size) == (0.18215, 256)
    d = c.diffusion
    assert (d.schedule, d.num_timesteps, d.beta_start, d.beta_end) == ("linear", 1000, 1e-4, 0.02)
    assert (d.var_type, d.vlb_weight, d.label_drop_prob) == ("learned_range", 1.0, 0.1)
    assert (c.sample.sampler, c.sample.num_steps, c.sample.guidance_scale) == ("ddpm", 250, 1.5)


def test_folder_source_labels_sorted_subfolders(tmp_path):
    for cls, sizes in (("n02", [(40, 30)]), ("n01", [(20, 20), (33, 50)])):
        os.makedirs(tmp_path / cls)
        for j, size in enumerate(sizes):
            Image.new("RGB", size, (10 * j, 0, 0)).save(tmp_path / cls / f"{j}.JPEG")
    (tmp_path / "n01" / "notes.txt").write_text("not an image")
    images = raw_images.open_images(f"folder:{tmp_path}")
    assert (images.num_examples, images.num_classes) == (3, 2)
    assert [images.load(i)[1] for i in range(3)] == [0, 0, 1]  # n01 -> 0, n02 -> 1
    assert images.load(2)[0].size == (40, 30) and images.load(2)[0].mode == "RGB"
    with pytest.raises(FileNotFoundError, match=r"latents\.source"):
        raw_images.open_images("folder:/does/not/exist")


def test_tfds_source_reads_by_index(tmp_path):
    from diffusax.data import digits_tfds

    builder = digits_tfds.prepare(str(tmp_path))
    images = raw_images.open_images("digits_tfds", "test", str(tmp_path))
    assert (images.num_examples, images.num_classes) == (300, 10)
    record = builder.as_data_source("test")[7]
    image, label = images.load(7)
    assert label == record["label"] and image.mode == "RGB" and image.size == (8, 8)
    np.testing.assert_array_equal(np.asarray(image)[..., 1], record["image"][..., 0])


def test_diffusers_vae_folder_gives_diffusers_moments(tmp_path):
    torch = pytest.importorskip("torch")
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    theirs = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=16,
    ).eval()
    theirs.save_pretrained(tmp_path / "vae")  # config.json + safetensors
    pixels = np.random.default_rng(1).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    items = raw_images.Images("px", "train", 3, None, lambda i: (Image.fromarray(pixels[i]), -1))
    ours = latents.load_vae(str(tmp_path / "vae"))
    latents.encode_to_shards(str(tmp_path / "z"), items, ours, "vae", image_size=16, views=1)
    got = latents.LatentSource(str(tmp_path / "z")).read(np.arange(3))
    x = torch.from_numpy(to_unit_range(pixels)).permute(0, 3, 1, 2)
    with torch.no_grad():
        q = theirs.encode(x).latent_dist
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got["mean"], nhwc(q.mean), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["std"], nhwc(q.std), rtol=1e-4, atol=1e-6)
    assert "label" not in got


# --- the command line: a real kill, a resume, and the runlocal experiment end to end ----------

# runlocal's digits, the 300 of the test split (to save time), in 10 shards of 32.
SPLIT, NUM, SHARD = "test", 300, 32
LATENT_FLAGS = {
    "latents.source_split": SPLIT,
    "latents.shard_size": SHARD,
    "latents.batch_size": 32,
}


def run_main(mode, workdir, latents_dir, *flags, output=subprocess.PIPE):
    cmd = [
        sys.executable,
        "-m",
        "diffusax.main",
        "--config=experiments/dit_xl2.py",
        "--config.runlocal=True",
        f"--config.latents.dir={latents_dir}",
        *[f"--config.{k}={v}" for k, v in LATENT_FLAGS.items()],
        f"--workdir={workdir}",
        f"--mode={mode}",
        *flags,
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=JAX_CACHE)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env.pop("XLA_FLAGS", None)
    kw = dict(cwd=REPO, env=env, stdout=output, stderr=output, text=True)
    return subprocess.Popen(cmd, **kw)


def finished_shards(directory):
    return sorted(p for p in os.listdir(directory) if p.startswith("shard") and p.endswith(".npy"))


@pytest.fixture(scope="module")
def killed_then_resumed(tmp_path_factory):
    """`--mode=latents` SIGKILLed after two of its ten shards, then run again to completion."""
    root = tmp_path_factory.mktemp("kill")
    directory = root / "latents"
    with open(root / "killed.log", "w") as log:  # a file: a full pipe would stall the child
        proc = run_main("latents", root / "w", directory, output=log)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if directory.is_dir() and len(finished_shards(directory)) >= 2:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (root / "killed.log").read_text()[-3000:]
    before = {p: os.stat(directory / p) for p in finished_shards(directory)}
    manifest = json.loads((directory / "manifest.json").read_text())
    proc = run_main("latents", root / "w", directory)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    return directory, before, manifest, stdout, stderr


def test_killed_encoding_resumes_without_re_encoding(killed_then_resumed):
    directory, before, manifest_at_kill, stdout, stderr = killed_then_resumed
    total = -(-NUM // SHARD)
    assert not manifest_at_kill["complete"]
    assert 2 <= len(before) < total, "the kill must land between the first and the last shard"
    assert f"wrote {directory / 'manifest.json'}" in stdout
    names = finished_shards(directory)
    assert names == [latents.shard_name(k, total) for k in range(total)]
    assert sorted(os.listdir(directory)) == sorted([*names, "manifest.json"]), "no temporaries"
    for name, stat in before.items():  # the finished shards were left alone
        now = os.stat(directory / name)
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), name
    assert stderr.count("latents: wrote") == total - len(before)
    records = np.concatenate([np.load(directory / n) for n in names])
    np.testing.assert_array_equal(records["index"], np.arange(NUM))  # each example once
    # The same as an uninterrupted encoding (in this process, on 8 devices).
    ref = str(directory) + "_ref"
    cfg = load_experiment(
        "dit_xl2", overrides={"runlocal": True, "latents.dir": ref, **LATENT_FLAGS}
    )
    latents.encode_from_config(cfg)
    expect = np.concatenate([np.load(os.path.join(ref, n)) for n in names])
    for field in ("label", "index"):
        np.testing.assert_array_equal(records[field], expect[field])
    for field in ("mean", "std"):
        np.testing.assert_allclose(records[field], expect[field], rtol=1e-5, atol=1e-6)
    assert json.loads((directory / "manifest.json").read_text()) == latents.read_manifest(ref)


def test_dit_xl2_runlocal_trains_and_samples(killed_then_resumed, tmp_path):
    directory = killed_then_resumed[0]
    workdir = tmp_path / "run"
    proc = run_main("train", workdir, directory)
    _, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 0, stderr[-3000:]
    assert "latents: wrote" not in stderr, "complete shards are not encoded again"
    assert (workdir / "samples" / "grid.png").is_file()
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 20
    proc = run_main("sample", workdir, directory)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "samples.npz" in stdout
    with np.load(workdir / "samples" / "samples.npz") as npz:
        images, labels = npz["images"], npz["labels"]
    assert images.shape == (16, 32, 32, 3) and images.dtype == np.uint8  # decoded, not latents
    np.testing.assert_array_equal(labels, np.arange(16) % 10)
    assert images.std() > 0
