"""Latent datasets: images encoded once by a frozen KL autoencoder, drawn afresh every step.

Latent diffusion (Rombach et al. 2022) and DiT train on the latents of a fixed autoencoder.
Encoding is done once (``make latents EXP=...`` = ``--mode=latents``) and stores, per example,
the moments (μ, σ) of the posterior q(z | x) over the *unscaled* latent; training then sees a
fresh draw each step (``sample_latents``):

    z_s = scale_factor * (μ + σ ε),   ε ~ N(0, I),   scale_factor = 0.18215 for the SD VAE,

with ε a function of (seed, step, global batch row) only (``pipeline.read_rows``), so resumes
replay exactly and the batch does not depend on the number of hosts or devices.

    encode_from_config(cfg)                              # `make latents`: resumable
    source = LatentSource(cfg.latents.dir, 0.18215)      # info.image_shape = (32, 32, 4)
    batch = data.read_rows(source, step, seed, B, rows, random_flip=True)  # {'image': z_s, ...}
    images = make_decoder(cfg)(z_s)                      # samples -> [-1, 1] images

Horizontal flips. A mirrored latent is not the latent of the mirrored image, so with
``data.random_flip`` the encoder also stores the moments of the image flipped in pixel space:
view 0 is the image, view 1 its mirror, and a flipped row reads view 1.

Files (``latents.dir``): ``manifest.json`` (source, split, sizes, latent shape, views, the VAE,
the scale factor, ``complete``) and ``shard-KKKKK-of-NNNNN.npy``, each a NumPy structured array
of up to ``shard_size`` records ``(mean (V, h, w, C) f32, std (V, h, w, C) f32, label i32,
index i64)`` (and ``embedding`` f32 when the source carries embeddings), ``index`` being the
example's position in the source. Plain ``.npy`` is
memory-mapped, so a batch reads only its rows. Shard k holds examples [k S, (k + 1) S). ImageNet
256 with flips takes 64 KiB per example (~84 GB). A shard is written to a temporary name and
renamed when complete, so a killed run leaves no partial shard; running again skips the
finished shards (same partition: no re-encoding, no duplicates) and removes stale temporaries.
One encoder per directory, on one host (it uses all of that host's devices).

Precomputed condition embeddings (``condition.kind = "embedding"``): the TFDS feature
``condition.embedding_key`` (float (D,) or (L, D) per example) is copied into each record's
``embedding`` field; the manifest records ``embedding_key`` and ``embedding_shape``, and batches
carry ``'embedding'`` float32 beside ``'image'`` and ``'label'`` (the same for both views).

Sources (``latents.source``, read by ``raw_images``): a TFDS name prepared in array_record
(``imagenet2012``: download ILSVRC2012 by hand, then ``tfds build imagenet2012
--manual_dir=DIR --file_format=array_record``), ``folder:PATH`` (one sub-folder per class), or
the bundled ``digits``; centre-cropped to ``latents.image_size`` as ADM / DiT do.

The VAE (``latents.vae``): a local diffusers ``AutoencoderKL`` folder (config.json +
diffusion_pytorch_model.safetensors; read without torch), e.g. stabilityai/sd-vae-ft-ema, or
``tiny-random``: a 4-level, 8x-downsampling VAE with seeded random weights. Its latents mean
nothing; it exists so the whole pipeline (encode, train, decode) runs in smoke tests and
``runlocal`` without a download.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import logging
import os
from collections.abc import Callable

import numpy as np

from diffusax.data.raw_images import Images, center_crop, open_images
from diffusax.data.sources import DataConfigError, DatasetInfo, validate_info

log = logging.getLogger("diffusax")

FORMAT = "diffusax-latents-1"
MANIFEST = "manifest.json"
TINY_RANDOM = "tiny-random"
# The smoke-test VAE: SD's layout (4 levels, 8x smaller latents with 4 channels), 8-16 wide.
TINY_VAE = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)
# Manifest fields that must agree for a run to resume into an existing directory.
_SPEC_FIELDS = (
    "format",
    "source",
    "split",
    "num_examples",
    "num_classes",
    "image_size",
    "views",
    "vae",
    "latent_shape",
    "shard_size",
    "embedding_key",  # present only when the shards carry embeddings
    "embedding_shape",
)
_OPEN_SHARDS = 128  # memory maps kept open by a LatentSource (each holds a file descriptor)


class LatentShardsMissingError(FileNotFoundError):
    """``latents.dir`` holds no complete set of shards; the message says how to make them."""


def sample_latents(mean, std, noise, scale_factor: float) -> np.ndarray:
    """A draw of the scaled latent: z_s = scale_factor * (μ + σ ε), float32."""
    return (np.float32(scale_factor) * (mean + std * noise)).astype(np.float32)


# ---------------------------------------------------------------------------- the autoencoder


def load_vae(spec: str):
    """The frozen autoencoder named by ``latents.vae``: a local diffusers folder or tiny-random."""
    if spec == TINY_RANDOM:
        return tiny_random_vae()
    from diffusax.convert.common import CONFIG_NAME, WEIGHTS_NAME
    from diffusax.convert.diffusers_vae import load_diffusers_vae

    if not spec or not os.path.isfile(os.path.join(spec, CONFIG_NAME)):
        raise FileNotFoundError(
            f"config field 'latents.vae' = {spec!r} is not a diffusers AutoencoderKL folder "
            f"({CONFIG_NAME} + {WEIGHTS_NAME}). Nothing is downloaded at run time: fetch "
            f"DiT's VAE once where there is network, e.g.\n"
            f"  huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir sd-vae-ft-ema\n"
            f"and set latents.vae to that folder (or latents.vae={TINY_RANDOM!r} for a "
            f"meaningless smoke-test VAE)"
        )
    return load_diffusers_vae(spec)


@functools.cache
def tiny_random_vae(seed: int = 0):
    """A small SD-shaped AutoencoderKL with seeded random weights (same seed, same weights).

    Kernels ~ N(0, 1 / fan_in) (activations keep unit scale), biases 0, norm scales 1; drawn
    with NumPy (Flax's initialisers compile one program per shape, ~20 s on a small CPU). For
    pipeline tests only: its latents carry no meaning. Cached: every call with a seed returns
    the same (frozen, never modified) module.
    """
    import jax.numpy as jnp
    from flax import nnx

    from diffusax.models.autoencoder import AutoencoderKL

    model = nnx.eval_shape(lambda: AutoencoderKL(**TINY_VAE, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    for path, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Param):
            continue
        shape = var.get_value().shape
        if path[-1] == "kernel":
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        else:  # GroupNorm scale, or a bias
            value = np.full(shape, 1.0 if path[-1] == "scale" else 0.0)
        var.set_value(jnp.asarray(value, jnp.float32))
    return model


def _jit_encoder(vae, batch: int):
    """encode(uint8 images (n <= batch, S, S, 3)) -> (μ, σ) numpy (n, h, w, C) of q(z | x).

    Every call has ``batch`` rows (the rest is padding), split over this host's devices.
    """
    import jax
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from diffusax.data.sources import to_unit_range

    devices = jax.local_devices()
    batch = -(-batch // len(devices)) * len(devices)
    rows = NamedSharding(Mesh(np.array(devices), ("data",)), PartitionSpec("data"))
    graphdef, params = nnx.split(vae)
    params = jax.device_put(params, NamedSharding(rows.mesh, PartitionSpec()))

    @jax.jit
    def moments(params, x):
        q = nnx.merge(graphdef, params).encode(x)  # (batch, h, w, C) each
        return q.mean, q.std

    def encode(images_u8):
        n = len(images_u8)
        x = np.zeros((batch, *images_u8.shape[1:]), np.float32)
        x[:n] = to_unit_range(images_u8)  # [-1, 1]
        mean, std = moments(params, jax.device_put(x, rows))
        return np.asarray(mean)[:n], np.asarray(std)[:n]

    return encode


def make_decoder(cfg, mesh=None) -> Callable:
    """decode(z_s) -> images in [-1, 1]: clip(D(z_s / scale_factor), -1, 1), jitted.

    The VAE is ``latents.vae``, or the one the shards were made with when that is empty. Used for
    every sample that leaves the model (training grids, ``--mode=sample``), so samples are images.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from diffusax import parallel
    from diffusax.models.autoencoder import unscale_latents

    recorded = (read_manifest(cfg.latents.dir) or {}).get("vae", "")
    if cfg.latents.vae and recorded and cfg.latents.vae != recorded:
        log.warning("latents: decoding with %s, the shards' VAE is %s", cfg.latents.vae, recorded)
    graphdef, params = nnx.split(load_vae(cfg.latents.vae or recorded))
    if mesh is not None:
        params = jax.device_put(params, parallel.replicated(mesh))
    scale = float(cfg.latents.scale_factor)

    @jax.jit
    def decode(params, z_s):
        x = nnx.merge(graphdef, params).decode(unscale_latents(z_s, scale))  # (B, H, W, 3)
        return jnp.clip(x, -1.0, 1.0)

    return functools.partial(decode, params)


# ---------------------------------------------------------------------------- shards on disk


def shard_name(k: int, num_shards: int) -> str:
    return f"shard-{k:05d}-of-{num_shards:05d}.npy"


def shard_dtype(latent_shape, views: int, embedding_shape=None) -> np.dtype:
    """One record per example: both moments of every view, its label and source index, and
    its embedding (float32 ``embedding_shape``) when given."""
    moments = (np.float32, (views, *latent_shape))
    fields = [("mean", *moments), ("std", *moments), ("label", np.int32), ("index", np.int64)]
    if embedding_shape is not None:
        fields.append(("embedding", np.float32, tuple(embedding_shape)))
    return np.dtype(fields)


def read_manifest(directory: str) -> dict | None:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_atomically(path: str, write: Callable) -> None:
    """``write(file)`` into a temporary name, flushed to disk, then renamed onto ``path``."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_manifest(directory: str, manifest: dict) -> None:
    text = json.dumps(manifest, indent=1).encode()
    _write_atomically(os.path.join(directory, MANIFEST), lambda f: f.write(text))


def encode_to_shards(
    directory: str,
    images: Images,
    vae,
    vae_name: str,
    *,
    image_size: int,
    shard_size: int = 1024,
    batch_size: int = 32,
    views: int = 2,
    scale_factor: float = 0.18215,
    workers: int | None = None,
) -> dict:
    """Encode ``images`` with ``vae`` into shards under ``directory``; returns the manifest.

    Resumable: finished shards of an earlier run with the same settings are kept as they are
    (a directory made with other settings is refused, naming them). ``views`` 2 also stores the
    mirrored images' moments; ``batch_size`` examples (x ``views`` images) go through the
    encoder at a time; ``workers`` threads read and resize the images. When ``images`` carry
    embeddings (``images.embedding_shape``), every record stores its example's.
    """
    import jax

    if jax.process_count() > 1:
        raise ValueError("--mode=latents runs on one host; start it as a single process")
    if views not in (1, 2):
        raise ValueError(f"views must be 1 or 2, got {views}")
    f = vae.downsampling_factor
    if image_size % f:
        raise ValueError(
            f"config field 'latents.image_size' ({image_size}) must be a multiple of the VAE's "
            f"downsampling factor {f}"
        )
    if vae.in_channels != 3:
        raise ValueError(f"the VAE takes {vae.in_channels} channels; RGB (3) is supported")
    latent_shape = list(vae.latent_shape((image_size, image_size, 3)))
    num_shards = -(-images.num_examples // shard_size)
    manifest = {
        "format": FORMAT,
        "source": images.name,
        "split": images.split,
        "num_examples": images.num_examples,
        "num_classes": images.num_classes,
        "image_size": image_size,
        "views": views,
        "vae": vae_name,
        "latent_shape": latent_shape,
        "shard_size": shard_size,
        "num_shards": num_shards,
        "scale_factor": scale_factor,  # applied at training time; the shards hold unscaled z
        "complete": False,
    }
    embedding_shape = images.embedding_shape
    if embedding_shape is not None:
        manifest["embedding_key"] = images.embedding_key
        manifest["embedding_shape"] = [int(d) for d in embedding_shape]
    os.makedirs(directory, exist_ok=True)
    previous = read_manifest(directory)
    if previous is not None:
        changed = [k for k in _SPEC_FIELDS if previous.get(k) != manifest.get(k)]
        if changed:
            details = ", ".join(f"{k}: {previous.get(k)!r} -> {manifest.get(k)!r}" for k in changed)
            raise ValueError(
                f"latents.dir {directory} holds shards made with other settings ({details}); "
                f"use another latents.dir or delete it"
            )
        if previous.get("complete"):
            return previous
    elif any(name.startswith("shard-") for name in os.listdir(directory)):
        raise ValueError(f"latents.dir {directory} holds shards but no {MANIFEST}; use a new one")
    for name in os.listdir(directory):  # what a killed run was writing
        if ".tmp" in name:
            os.remove(os.path.join(directory, name))
    _write_manifest(directory, manifest)

    encode = _jit_encoder(vae, batch_size * views)
    dtype = shard_dtype(latent_shape, views, embedding_shape)
    with concurrent.futures.ThreadPoolExecutor(workers or min(16, os.cpu_count() or 1)) as pool:
        for k in range(num_shards):
            path = os.path.join(directory, shard_name(k, num_shards))
            if os.path.exists(path):
                continue  # finished by an earlier run
            indices = np.arange(k * shard_size, min((k + 1) * shard_size, images.num_examples))
            pixels = pool.map(lambda i: _load(images, i, image_size), indices)  # in order, lazily
            records = np.zeros(len(indices), dtype)
            records["index"] = indices
            for start in range(0, len(indices), batch_size):
                chunk = [next(pixels) for _ in indices[start : start + batch_size]]
                _encode_chunk(encode, chunk, records[start : start + len(chunk)], views)
            _write_atomically(path, lambda f, records=records: np.save(f, records))
            log.info("latents: wrote %s (%d/%d)", path, k + 1, num_shards)
    manifest["complete"] = True
    _write_manifest(directory, manifest)
    return manifest


def _load(images: Images, i: int, size: int):
    """(pixels uint8 (size, size, 3), label, embedding or None) of example ``i``."""
    image, label, *embedding = images.load(int(i))
    return center_crop(image, size), label, embedding[0] if embedding else None


def _encode_chunk(encode, chunk, records, views: int) -> None:
    """Fill ``records`` (a view of the shard's rows) from ``chunk``, a list of
    (pixels, label, embedding or None)."""
    pixels = np.stack([p for p, _, _ in chunk])  # (b, S, S, 3)
    both = np.concatenate([pixels, pixels[:, :, ::-1]])[: len(chunk) * views]  # view-major
    mean, std = encode(both)  # (views * b, h, w, C) each
    for name, value in (("mean", mean), ("std", std)):
        per_view = value.reshape(views, len(chunk), *value.shape[1:])
        records[name] = np.moveaxis(per_view, 0, 1)  # (b, views, h, w, C)
    records["label"] = [label for _, label, _ in chunk]
    if "embedding" in records.dtype.names:
        records["embedding"] = np.stack([e for _, _, e in chunk])  # (b, D) or (b, L, D)


# ---------------------------------------------------------------------------- from a config


def views_for(cfg) -> int:
    """Experiments that flip images need the mirrored views too."""
    return 2 if cfg.data.random_flip else 1


def encode_from_config(cfg) -> str:
    """`--mode=latents`: encode ``latents.source`` into ``latents.dir``; the manifest's path."""
    for field in ("dir", "source", "vae"):
        if not cfg.latents[field]:
            raise DataConfigError(f"config field 'latents.{field}' is empty; " + how_to_make(cfg))
    lat = cfg.latents
    vae = load_vae(lat.vae)
    images = open_images(
        lat.source,
        lat.source_split,
        lat.source_dir,
        cfg.data.image_key,
        cfg.data.label_key,
        embedding_key=embedding_key(cfg),
    )
    encode_to_shards(
        lat.dir,
        images,
        vae,
        lat.vae,
        image_size=lat.image_size,
        shard_size=lat.shard_size,
        batch_size=lat.batch_size,
        views=views_for(cfg),
        scale_factor=lat.scale_factor,
    )
    return os.path.join(lat.dir, MANIFEST)


def embedding_key(cfg) -> str | None:
    """``condition.embedding_key`` when the experiment is conditioned on embeddings, else None."""
    condition = cfg.get("condition")
    if condition is None or condition.get("kind") != "embedding":
        return None
    key = condition.get("embedding_key")
    if not key:
        raise DataConfigError(
            "config field 'condition.embedding_key' is empty; name the dataset feature that "
            "holds the embeddings (condition.kind = 'embedding')"
        )
    return key


def how_to_make(cfg) -> str:
    """The commands that make ``cfg``'s latent shards (for error messages)."""
    return (
        f"make the latent shards once with the frozen autoencoder:\n"
        f"  make latents EXP={cfg.name} ARGS='--config.latents.source=SOURCE "
        f"--config.latents.vae=VAE_DIR'\n"
        f"(the config has latents.source={cfg.latents.source!r}, "
        f"latents.vae={cfg.latents.vae!r}).\n"
        f"SOURCE: ImageNet in TFDS, imagenet2012 (download ILSVRC2012 by hand, then\n"
        f"    tfds build imagenet2012 --manual_dir=DOWNLOADS --data_dir=TFDS_DIR "
        f"--file_format=array_record\n"
        f"  and add --config.latents.source_dir=TFDS_DIR), or an image folder with one "
        f"sub-folder per\n  class: folder:/path/to/imagenet/train\n"
        f"VAE_DIR: a local diffusers AutoencoderKL folder, e.g. DiT's\n"
        f"    huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir VAE_DIR\n"
        f"An interrupted `make latents` continues where it stopped."
    )


def open_source(cfg) -> LatentSource:
    """The training data of a latent experiment; encodes first if ``latents.auto_encode``."""
    directory = cfg.latents.dir
    manifest = read_manifest(directory)
    if not (manifest and manifest.get("complete")) and cfg.latents.auto_encode:
        log.info("latents: encoding %s into %s", cfg.latents.source, directory)
        encode_from_config(cfg)
        manifest = read_manifest(directory)
    if manifest is None:
        raise LatentShardsMissingError(
            f"no latent shards in {directory!r} (config field 'latents.dir'); " + how_to_make(cfg)
        )
    if not manifest.get("complete"):
        raise LatentShardsMissingError(
            f"the latent shards in {directory!r} (config field 'latents.dir') are unfinished; "
            f"run `make latents EXP={cfg.name}` again with the same settings to finish them"
        )
    if cfg.data.random_flip and manifest["views"] < 2:
        raise DataConfigError(
            f"config field 'data.random_flip' is True but the shards in {directory!r} hold no "
            f"mirrored views; encode them again with data.random_flip=True into another "
            f"latents.dir, or train without flips"
        )
    key = embedding_key(cfg)
    if key is not None:
        if manifest.get("embedding_key") != key:
            held = manifest.get("embedding_key")
            raise DataConfigError(
                f"config field 'condition.embedding_key' is {key!r} but the shards in "
                f"{directory!r} hold "
                + (f"the embeddings of {held!r}" if held else "no embeddings")
                + "; encode them again with this condition into another latents.dir"
            )
        declared = tuple(cfg.condition.get("embedding_shape") or ())
        if declared and declared != tuple(manifest["embedding_shape"]):
            raise DataConfigError(
                f"config field 'condition.embedding_shape' is {declared} but the shards in "
                f"{directory!r} hold embeddings of shape {tuple(manifest['embedding_shape'])}"
            )
    return LatentSource(directory, cfg.latents.scale_factor)


class LatentSource:
    """Latent shards as a data source: ``info`` has the latent shape (h, w, C).

    ``read(indices)`` gives the stored moments ``{'mean', 'std'}`` (n, h, w, C) of view 0,
    ``label`` and, when the shards carry them (``info.embedding_shape``), ``embedding``;
    ``read_sampled(indices, noise, flip)`` gives ``{'image': z_s, 'label', 'embedding'}`` with
    z_s = scale_factor (μ + σ ε) of the mirrored view where ``flip``; ``pipeline.read_rows``
    calls it with ε drawn per global row.
    """

    def __init__(self, directory: str, scale_factor: float = 0.18215):
        manifest = read_manifest(directory)
        if manifest is None or manifest.get("format") != FORMAT:
            raise LatentShardsMissingError(f"no {FORMAT} manifest in {directory!r}")
        self.directory, self.manifest = directory, manifest
        self.scale_factor = float(scale_factor)
        self.views = int(manifest["views"])
        embedding_shape = manifest.get("embedding_shape")
        if embedding_shape is not None:
            embedding_shape = tuple(int(d) for d in embedding_shape)
        self.info = validate_info(
            DatasetInfo(
                name=f"latents:{manifest['source']}",
                split=manifest["split"],
                num_examples=manifest["num_examples"],
                image_shape=tuple(manifest["latent_shape"]),
                dtype="float32",
                num_classes=manifest["num_classes"],
                embedding_shape=embedding_shape,
            )
        )
        self._dtype = shard_dtype(manifest["latent_shape"], self.views, embedding_shape)
        self._shard_size = manifest["shard_size"]
        num_shards = manifest["num_shards"]
        for k in range(num_shards):  # fail now, not in the middle of training
            expected = min(self._shard_size, len(self) - k * self._shard_size)
            shard = self._shard(k)
            if shard.dtype != self._dtype or shard.shape != (expected,):
                raise ValueError(
                    f"latent shard {self._path(k)} holds {shard.shape} {shard.dtype}; expected "
                    f"({expected},) {self._dtype}"
                )

    def __len__(self) -> int:
        return self.info.num_examples

    def _path(self, k: int) -> str:
        return os.path.join(self.directory, shard_name(k, self.manifest["num_shards"]))

    @functools.lru_cache(maxsize=_OPEN_SHARDS)  # noqa: B019 (one source per run)
    def _shard(self, k: int) -> np.ndarray:
        path = self._path(k)
        if not os.path.isfile(path):
            raise LatentShardsMissingError(f"latent shard {path} is missing")
        return np.load(path, mmap_mode="r")

    def _records(self, indices) -> np.ndarray:
        indices = np.asarray(indices, np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"indices outside [0, {len(self)})")
        out = np.empty(indices.shape, self._dtype)
        shard, offset = np.divmod(indices, self._shard_size)
        for k in np.unique(shard):
            rows = shard == k
            out[rows] = self._shard(int(k))[offset[rows]]
        return out

    def read(self, indices, flip=None) -> dict[str, np.ndarray]:
        """Moments of the examples (of their mirrored images where ``flip``), and labels."""
        records = self._records(indices)
        view = np.zeros(len(records), np.int64)
        if flip is not None:
            view = np.asarray(flip, bool).astype(np.int64)
            if view.any() and self.views < 2:
                raise ValueError(f"the shards in {self.directory} hold no mirrored views")
        rows = np.arange(len(records))
        out = {"mean": records["mean"][rows, view], "std": records["std"][rows, view]}
        if self.info.num_classes is not None:
            out["label"] = records["label"]
        if self.info.embedding_shape is not None:
            out["embedding"] = np.ascontiguousarray(records["embedding"])  # (n, D) | (n, L, D)
        return out

    def read_sampled(self, indices, noise, flip=None) -> dict[str, np.ndarray]:
        """``{'image': z_s (n, h, w, C), 'label', 'embedding'}``, z_s = scale_factor (μ + σ noise);
        ``label`` and ``embedding`` where the shards hold them."""
        moments = self.read(indices, flip)
        out = {"image": sample_latents(moments["mean"], moments["std"], noise, self.scale_factor)}
        for key in ("label", "embedding"):
            if key in moments:
                out[key] = moments[key]
        return out
