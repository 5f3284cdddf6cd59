"""A small image classifier whose penultimate layer is the feature space of the Fréchet distance.

Inception features (FID) suit 299x299 photographs, not 8x8 digits, so the project trains its
own feature extractor on the dataset's train split and caches it:

    clf = load_or_train(train_source, test_source, "runs/x/eval/classifier_digits.npz",
                        steps=1500, seed=0)
    clf.features(images)    # (N, D) penultimate-layer activations
    clf.predict(images)     # (N,) class indices
    clf.test_accuracy       # accuracy on the held-out split

The cache holds a fingerprint of the data, the architecture and the training settings; a cache
whose fingerprint differs is retrained (and replaced atomically).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from diffusax import image_io

log = logging.getLogger("diffusax")

# Bump when the architecture or the training recipe changes, so old caches are retrained.
RECIPE_VERSION = 1
WIDTH = 32  # channels of the first convolution; doubled at each downsampling
FEATURE_DIM = 64  # the penultimate layer: a 64-d Gaussian is well estimated from 300 examples
BATCH_SIZE = 128
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 1e-4
MAX_SHIFT = 1  # random translations of up to one pixel while training
INFER_BATCH = 512  # images per call of the jitted feature function (one compilation)


class FeatureClassifier(nnx.Module):
    """conv 3x3 -> [conv 3x3 stride 2] x k -> dense (features) -> dense (logits).

    k halves the image until its side is at most 4 (k = 1 for 8x8 digits, 3 for 32x32).
    """

    def __init__(self, image_shape, num_classes: int, *, rngs: nnx.Rngs):
        height, width, channels = image_shape
        self.stem = nnx.Conv(channels, WIDTH, (3, 3), rngs=rngs)
        downs, ch, side_h, side_w = [], WIDTH, height, width
        while max(side_h, side_w) > 4:
            downs.append(nnx.Conv(ch, 2 * ch, (3, 3), strides=2, rngs=rngs))
            ch, side_h, side_w = 2 * ch, -(-side_h // 2), -(-side_w // 2)
        self.downs = nnx.List(downs)
        self.hidden = nnx.Linear(side_h * side_w * ch, FEATURE_DIM, rngs=rngs)
        self.head = nnx.Linear(FEATURE_DIM, num_classes, rngs=rngs)

    def features(self, x):
        x = nnx.relu(self.stem(x))  # (B, H, W, WIDTH)
        for conv in self.downs:
            x = nnx.relu(conv(x))  # (B, ⌈h/2⌉, ⌈w/2⌉, 2c)
        x = x.reshape(x.shape[0], -1)  # (B, h·w·c)
        return nnx.relu(self.hidden(x))  # (B, FEATURE_DIM)

    def __call__(self, x):
        return self.head(self.features(x))  # (B, num_classes)


def _build(image_shape, num_classes, seed):
    return FeatureClassifier(tuple(image_shape), num_classes, rngs=nnx.Rngs(params=seed))


def _split(model):
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(params)


def _random_shift(images, key):
    """Translate each image by up to MAX_SHIFT pixels; the border is filled with -1 (black)."""
    n, h, w, _ = images.shape
    p = MAX_SHIFT
    padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=-1.0)
    offsets = jax.random.randint(key, (n, 2), 0, 2 * p + 1)  # (N, 2) top-left corners
    crop = lambda img, off: jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))
    return jax.vmap(crop)(padded, offsets)  # (N, H, W, C)


def _check_labelled(source, argname):
    if source.info.num_classes is None:
        raise ValueError(
            f"{argname}: dataset '{source.info.name}' split '{source.info.split}' has no labels; "
            f"the feature classifier needs a labelled dataset (config field 'data.label_key')"
        )


def train_classifier(train_source, *, steps: int, seed: int, batch_size: int = BATCH_SIZE):
    """Train on ``train_source`` with AdamW (cosine-decayed) for ``steps`` steps.

    Deterministic given ``seed``: the batches come from per-epoch permutations of
    ``np.random.default_rng(seed)`` and the initialisation and shifts from ``jax.random``.
    Returns (graphdef, params as a pure dict).
    """
    _check_labelled(train_source, "train_source")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"config field 'eval.classifier_steps' must be >= 1, got {steps!r}")
    info = train_source.info
    graphdef, params = _split(_build(info.image_shape, info.num_classes, seed))
    optimizer = optax.adamw(
        optax.cosine_decay_schedule(LEARNING_RATE, steps), weight_decay=WEIGHT_DECAY
    )

    def loss_fn(params, images, labels):
        logits = nnx.merge(graphdef, params)(images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def train_step(params, opt_state, images, labels, key):
        images = _random_shift(images, key)
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    rng = np.random.default_rng(seed)
    key = jax.random.fold_in(jax.random.key(seed), 1)  # the shifts' stream, not the init's
    n = len(train_source)
    batch_size = min(batch_size, n)
    order, pos = rng.permutation(n), 0
    for step in range(steps):
        if pos + batch_size > n:  # a new epoch; every batch has the same size (one compile)
            order, pos = rng.permutation(n), 0
        batch = train_source.read(np.sort(order[pos : pos + batch_size]))
        pos += batch_size
        params, opt_state, loss = train_step(
            params, opt_state, batch["image"], batch["label"], jax.random.fold_in(key, step)
        )
    log.info("classifier: %d steps, final batch loss %.4f", steps, float(loss))
    return graphdef, params


def fingerprint(train_source, *, steps: int, seed: int) -> str:
    """A hash of what determines the trained classifier: data, architecture, recipe, seed.

    The data enter through their description and the bytes of (at most) the first and last
    1024 examples, so a huge dataset is not read whole to check a cache.
    """
    info = train_source.info
    h = hashlib.sha256()
    settings = {
        "dataset": [info.name, info.split, info.num_examples, list(info.image_shape)],
        "num_classes": info.num_classes,
        "recipe": [RECIPE_VERSION, WIDTH, FEATURE_DIM, BATCH_SIZE, LEARNING_RATE, WEIGHT_DECAY],
        "max_shift": MAX_SHIFT,
        "steps": steps,
        "seed": seed,
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    n = len(train_source)
    for idx in (np.arange(min(n, 1024)), np.arange(max(0, n - 1024), n)):
        rows = train_source.read(idx)
        h.update(np.ascontiguousarray(rows["image"], np.float32).tobytes())
        h.update(np.ascontiguousarray(rows["label"], np.int32).tobytes())
    return h.hexdigest()


@dataclasses.dataclass
class Classifier:
    """A trained classifier; ``features``/``predict`` take [-1, 1] images (N, H, W, C)."""

    graphdef: object
    params: dict
    fingerprint: str
    test_accuracy: float = float("nan")
    retrained: bool = False  # True when this call trained it, False when read from the cache

    def __post_init__(self):
        graphdef = self.graphdef
        self._features = jax.jit(lambda p, x: nnx.merge(graphdef, p).features(x))
        self._logits = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))

    def _batched(self, fn, images) -> np.ndarray:
        images = np.asarray(images, np.float32)
        if images.ndim != 4:
            raise ValueError(f"images: expected (N, H, W, C), got shape {images.shape}")
        out = []
        for start in range(0, len(images), INFER_BATCH):
            chunk = images[start : start + INFER_BATCH]
            pad = INFER_BATCH - len(chunk)  # pad the last chunk so every call has one shape
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            out.append(np.asarray(fn(self.params, chunk))[: INFER_BATCH - pad])
        return np.concatenate(out)

    def features(self, images) -> np.ndarray:
        """Penultimate-layer activations, float32 (N, FEATURE_DIM)."""
        return self._batched(self._features, images)

    def source_features(self, source, chunk: int = 4096) -> np.ndarray:
        """Features of every example of a source (N, FEATURE_DIM), read a chunk at a time."""
        return np.concatenate(
            [
                self.features(source.read(np.arange(s, min(s + chunk, len(source))))["image"])
                for s in range(0, len(source), chunk)
            ]
        )

    def logits(self, images) -> np.ndarray:
        return self._batched(self._logits, images)

    def predict(self, images) -> np.ndarray:
        """The most likely class of each image, int (N,)."""
        return np.argmax(self.logits(images), axis=-1)

    def accuracy(self, images, labels) -> float:
        return float(np.mean(self.predict(images) == np.asarray(labels)))


def read_all(source, chunk: int = 4096) -> dict[str, np.ndarray]:
    """Every example of a source, read in chunks: {'image': (N, H, W, C), 'label': (N,)}."""
    parts = [
        source.read(np.arange(s, min(s + chunk, len(source)))) for s in range(0, len(source), chunk)
    ]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _flatten(params: dict) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {
        "param/" + "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
        for path, v in leaves
    }


def save(path: str, clf: Classifier) -> None:
    """Write the parameters, fingerprint and accuracy to ``path`` (.npz), atomically."""
    image_io.save_npz(
        path,
        fingerprint=np.array(clf.fingerprint),
        test_accuracy=np.array(clf.test_accuracy),
        **_flatten(clf.params),
    )


def load(path: str, train_source, expected_fingerprint: str) -> Classifier | None:
    """The cached classifier, or None when there is none or it is stale or unreadable."""
    if not os.path.exists(path):
        return None
    info = train_source.info
    graphdef, abstract = _split(
        nnx.eval_shape(lambda: _build(info.image_shape, info.num_classes, 0))
    )
    try:
        with np.load(path) as npz:
            if str(npz["fingerprint"]) != expected_fingerprint:
                log.info("classifier cache %s is stale (fingerprint differs); retraining", path)
                return None
            stored = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, KeyError) as e:
        log.warning("classifier cache %s is unreadable (%s); retraining", path, e)
        return None
    names = _flatten(jax.tree.map(lambda a: np.zeros((), a.dtype), abstract))
    leaves, treedef = jax.tree.flatten(abstract)
    values = []
    for name, leaf in zip(names, leaves, strict=True):
        value = stored.get(name)
        if value is None or value.shape != leaf.shape:
            log.warning("classifier cache %s does not match the architecture; retraining", path)
            return None
        values.append(jnp.asarray(value, leaf.dtype))
    return Classifier(
        graphdef,
        jax.tree.unflatten(treedef, values),
        expected_fingerprint,
        float(stored["test_accuracy"]),
    )


def load_params(path: str, image_shape, num_classes: int) -> dict:
    """The parameters of a classifier saved by ``save``, as a pure dict, with no fingerprint
    check: for a frozen feature network (the autoencoder's perceptual term). FileNotFoundError
    or ValueError naming the file when it is missing or of another architecture."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no classifier at {path!r}; `make eval` of a digits run writes one "
            f"(runs/EXP/eval/classifier_digits.npz)"
        )
    _, abstract = _split(nnx.eval_shape(lambda: _build(image_shape, num_classes, 0)))
    names = _flatten(jax.tree.map(lambda a: np.zeros((), a.dtype), abstract))
    leaves, treedef = jax.tree.flatten(abstract)
    with np.load(path) as npz:
        stored = {k: npz[k] for k in npz.files}
    values = []
    for name, leaf in zip(names, leaves, strict=True):
        value = stored.get(name)
        if value is None or value.shape != leaf.shape:
            raise ValueError(
                f"classifier {path!r} does not fit images {tuple(image_shape)} with "
                f"{num_classes} classes ({name})"
            )
        values.append(np.asarray(value, leaf.dtype))
    return jax.tree.unflatten(treedef, values)


def load_or_train(train_source, test_source, cache_path: str, *, steps: int, seed: int):
    """The classifier cached at ``cache_path`` if its fingerprint matches, else a new one.

    A new one is trained on ``train_source``, scored on ``test_source`` and written to the cache
    (``retrained=True``).
    """
    _check_labelled(train_source, "train_source")
    _check_labelled(test_source, "test_source")
    if tuple(test_source.info.image_shape) != tuple(train_source.info.image_shape):
        raise ValueError(
            f"test_source: images of shape {tuple(test_source.info.image_shape)} differ from the "
            f"train split's {tuple(train_source.info.image_shape)}"
        )
    fp = fingerprint(train_source, steps=steps, seed=seed)
    cached = load(cache_path, train_source, fp)
    if cached is not None:
        return cached
    graphdef, params = train_classifier(train_source, steps=steps, seed=seed)
    clf = Classifier(graphdef, params, fp, retrained=True)
    test = read_all(test_source)
    clf.test_accuracy = clf.accuracy(test["image"], test["label"])
    log.info("classifier: held-out accuracy %.4f", clf.test_accuracy)
    if jax.process_index() == 0:
        save(cache_path, clf)
    return clf
