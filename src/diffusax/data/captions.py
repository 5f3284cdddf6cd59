"""Captions of the 8x8 digits: the class plus attributes measured from the image itself.

Each digit is described by its class (as a word, "seven", or a numeral, "7") and by two
attributes measured from its pixels, bucketed relative to its class:

    values = measure(images)                        # {'thickness', 'slant'}: float64 (N,)
    thresholds = fit_thresholds(values, labels)     # per-class terciles, on the train split
    attrs = buckets(values, labels, thresholds)     # {'thickness', 'slant'}: int8 in {-1, 0, 1}
    caption_rows(labels, attrs, seed, step, rows)   # e.g. "a thick seven leaning right"

``measure`` is a pure function of the image, so generated samples (float in [-1, 1]) are measured
and bucketed exactly like the data, with the train split's thresholds, to check that a sample
obeys the attribute its prompt asked for.

A caption has at most 12 words (14 tokens with bos/eos: a text context of 16 fits) and at
most 68 characters (70 with bos/eos).

Note: a horizontal flip negates ``slant``; buckets belong to the unflipped image (and mirrored
digits are not digits), so a captioned run should not use random flips.

Pure numpy: this module imports neither jax nor ``diffusax.config``.
"""

from __future__ import annotations

import json

import numpy as np

from diffusax.data.tokenizer import split_words

CAPTION_STREAM = 3  # pipeline.py's random streams are 0 (order), 1 (flips), 2 (noise)

ATTRIBUTES = ("thickness", "slant")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# attribute -> bucket -> phrasings. Thickness words are adjectives ("a thick 7", "the digit 7,
# thin"); slant words follow the noun ("a 7 leaning left"). Bucket 0 is not mentioned, except
# that a middle-bucket slant is sometimes called "upright"/"straight" (adjectives).
ATTRIBUTE_WORDS: dict[str, dict[int, tuple[str, ...]]] = {
    "thickness": {
        -1: ("thin", "light", "fine"),
        1: ("thick", "bold", "heavy"),
    },
    "slant": {
        -1: ("leaning left", "slanted left", "tilted to the left"),
        0: ("upright", "straight"),
        1: ("leaning right", "slanted right", "tilted to the right"),
    },
}

MENTION_PROB = 0.7  # a non-zero attribute is named with this probability
ZERO_MENTION_PROB = 0.15  # a middle-bucket attribute with bucket-0 words is named this often
NUMERAL_PROB = 0.5  # the class is written "7" rather than "seven"
FRAME_PROB = 0.2  # "an image of ..." and the like
FRAMES = ("an image of", "a picture of", "a drawing of", "a photo of")
ARTICLES = ("", "a", "the")  # "a" becomes "an" before a vowel sound ("an eight", "an 8")
HEADS = ("{n}", "digit {n}", "number {n}", "handwritten {n}", "handwritten digit {n}")
HEAD_WEIGHTS = (0.4, 0.25, 0.15, 0.1, 0.1)

_AN_WORDS = frozenset({"eight", "8", "upright"})


# --- measurement --------------------------------------------------------------------------------


def measure(images) -> dict[str, np.ndarray]:
    """Attributes of each image: ``{'thickness': float64 (N,), 'slant': float64 (N,)}``.

    images: (N, H, W, 1) float in [-1, 1] (digits: pixel p in 0..16 is p / 8 - 1); the ink is
    ``ink = clip((x + 1) / 2, 0, 1)``. Pixel (i, j) (row i from the top, column j) sits at
    x = j - (W - 1) / 2, y = (H - 1) / 2 - i (y points up).

    thickness (pixels): the width of the rectangle with the same ink area A and perimeter P,
      A = Σ ink,   P = (S_h + S_v + (S_d + S_a) / √2) / (1 + √2) + (4 - 2√2),
      thickness = (P/2 - sqrt(max((P/2)² - 4 A, 0))) / 2   (0 for a blank image),
    where S_h, S_v, S_d, S_a are the sums of |ink(p + d) - ink(p)| over the image zero-padded by
    one pixel, for d a step right, down, down-right and down-left. That is a discrete Crofton
    formula: an edge counts about the same whatever its direction (within ~8%, where the plain
    S_h + S_v overcounts a diagonal edge by up to √2), and 4 - 2√2 adds back what it misses at
    the corners of a rectangle, so a sharp w x L rectangle gets P = 2 (w + L) and thickness
    exactly min(w, L). It is ink per unit of stroke length, A / L, with the length estimated
    from the edges as L = P/2 - thickness. Unlike the ink mass A alone, it barely grows with a
    longer or wider drawing of the same pen. It sees edges, not darkness: a faint stroke smeared
    over two pixels reads as about as wide as the two pixels.

    slant (pixels of x per pixel of y): the ink-weighted least-squares slope of x on y,
      slant = Σ ink (x - x̄)(y - ȳ) / Σ ink (y - ȳ)²,  x̄ = Σ ink x / A,  ȳ = Σ ink y / A,
    positive when the top leans right (0 for a blank image or a single row of ink);
    0.2 is a lean of about 11° from vertical.

    The height of the inked extent is not an attribute: the digits are scaled to the full box,
    so 1496 of the 1497 train digits span all 8 rows.
    """
    x = np.asarray(images, dtype=np.float64)
    if x.ndim != 4 or x.shape[-1] != 1:
        raise ValueError(f"measure: images have shape {x.shape}; expected (N, H, W, 1)")
    if not np.all(np.isfinite(x)):
        raise ValueError("measure: images contain NaN or infinite values")
    ink = np.clip((x[..., 0] + 1.0) / 2.0, 0.0, 1.0)  # (N, H, W)
    return {"thickness": _thickness(ink), "slant": _slant(ink)}


_CORNERS = 4.0 - 2.0 * np.sqrt(2.0)  # what the Crofton sum misses at a rectangle's 4 corners


def _thickness(ink: np.ndarray) -> np.ndarray:
    area = ink.sum((1, 2))  # (N,)
    p = np.pad(ink, ((0, 0), (1, 1), (1, 1)))  # (N, H + 2, W + 2)
    s_h = np.abs(np.diff(p, axis=2)).sum((1, 2))
    s_v = np.abs(np.diff(p, axis=1)).sum((1, 2))
    s_d = np.abs(p[:, 1:, 1:] - p[:, :-1, :-1]).sum((1, 2))
    s_a = np.abs(p[:, 1:, :-1] - p[:, :-1, 1:]).sum((1, 2))
    perimeter = (s_h + s_v + (s_d + s_a) / np.sqrt(2.0)) / (1.0 + np.sqrt(2.0)) + _CORNERS
    half = perimeter / 2.0
    return (half - np.sqrt(np.maximum(half * half - 4.0 * area, 0.0))) / 2.0


def _slant(ink: np.ndarray) -> np.ndarray:
    _, h, w = ink.shape
    y = ((h - 1) / 2.0 - np.arange(h, dtype=np.float64))[:, None]  # (H, 1), up
    x = (np.arange(w, dtype=np.float64) - (w - 1) / 2.0)[None, :]  # (1, W), right
    mass = ink.sum((1, 2))
    safe = np.where(mass > 0, mass, 1.0)
    x_mean = (ink * x).sum((1, 2)) / safe  # (N,)
    y_mean = (ink * y).sum((1, 2)) / safe
    dx = x[None] - x_mean[:, None, None]  # (N, 1, W)
    dy = y[None] - y_mean[:, None, None]  # (N, H, 1)
    cov = (ink * dx * dy).sum((1, 2)) / safe
    var = (ink * dy * dy).sum((1, 2)) / safe
    ok = (mass > 0) & (var > 1e-9)
    return np.where(ok, cov / np.where(ok, var, 1.0), 0.0)


# --- buckets ------------------------------------------------------------------------------------


def _check_labels(labels, n: int, num_classes: int, where: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{where}: labels have shape {labels.shape} dtype {labels.dtype}; expected "
            f"integers of shape ({n},)"
        )
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{where}: labels span [{labels.min()}, {labels.max()}], outside [0, {num_classes})"
        )
    return labels


def fit_thresholds(values: dict, labels, num_classes: int = 10) -> dict[str, np.ndarray]:
    """Per-class lower and upper terciles: ``{attribute: float64 (num_classes, 2)}``.

    Row c is ``np.quantile(values[attribute][labels == c], [1/3, 2/3])``; fit on the train
    split. Every class needs at least 3 examples.
    """
    out = {}
    for name, v in values.items():
        v = np.asarray(v, dtype=np.float64)
        if v.ndim != 1:
            raise ValueError(f"fit_thresholds: values[{name!r}] has shape {v.shape}; expected (N,)")
        lab = _check_labels(labels, v.shape[0], num_classes, f"fit_thresholds({name!r})")
        rows = []
        for c in range(num_classes):
            vc = v[lab == c]
            if vc.size < 3:
                raise ValueError(
                    f"fit_thresholds: class {c} has {vc.size} examples; terciles need at least 3"
                )
            rows.append(np.quantile(vc, [1.0 / 3.0, 2.0 / 3.0]))
        out[name] = np.asarray(rows, dtype=np.float64)  # (num_classes, 2)
    return out


def buckets(values: dict, labels, thresholds: dict) -> dict[str, np.ndarray]:
    """``{attribute: int8 (N,)}``: -1 below the class's lower tercile, +1 above its upper, else 0.

    Every attribute of ``thresholds`` must be in ``values``.
    """
    out = {}
    for name, t in thresholds.items():
        if name not in values:
            raise ValueError(
                f"buckets: thresholds have attribute {name!r} but the values have only "
                f"{sorted(values)}"
            )
        t = np.asarray(t, dtype=np.float64)
        v = np.asarray(values[name], dtype=np.float64)
        lab = _check_labels(labels, v.shape[0], t.shape[0], f"buckets({name!r})")
        lo, hi = t[lab, 0], t[lab, 1]
        out[name] = np.where(v < lo, -1, np.where(v > hi, 1, 0)).astype(np.int8)
    return out


def thresholds_to_json(thresholds: dict) -> str:
    """JSON text ``{attribute: [[lower, upper], ...one per class]}`` (plain lists of floats)."""
    return json.dumps(
        {name: np.asarray(t, dtype=np.float64).tolist() for name, t in thresholds.items()},
        sort_keys=True,
    )


def thresholds_from_json(text) -> dict[str, np.ndarray]:
    """The inverse of ``thresholds_to_json``; also takes the already-parsed dict."""
    raw = json.loads(text) if isinstance(text, (str, bytes)) else text
    if not isinstance(raw, dict):
        raise ValueError(f"thresholds JSON must be an object, got {type(raw).__name__}")
    out = {}
    for name, rows in raw.items():
        t = np.asarray(rows, dtype=np.float64)
        if t.ndim != 2 or t.shape[1] != 2 or not np.all(np.isfinite(t)):
            raise ValueError(
                f"thresholds[{name!r}] has shape {t.shape}; expected finite (num_classes, 2)"
            )
        if np.any(t[:, 0] > t[:, 1]):
            raise ValueError(f"thresholds[{name!r}]: a lower tercile exceeds its upper one")
        out[name] = t
    return out


# --- captions -----------------------------------------------------------------------------------


def _check_label(label) -> int:
    if not isinstance(label, (int, np.integer)) or not 0 <= label < len(NUMBER_WORDS):
        raise ValueError(f"label must be an int in 0..9, got {label!r}")
    return int(label)


def _check_attrs(attrs: dict) -> dict[str, int]:
    out = {}
    for name, b in attrs.items():
        if name not in ATTRIBUTE_WORDS:
            raise ValueError(f"unknown attribute {name!r}; expected one of {ATTRIBUTES}")
        if int(b) not in (-1, 0, 1):
            raise ValueError(f"attribute {name!r} has bucket {b!r}; expected -1, 0 or 1")
        out[name] = int(b)
    return out


def _pick(options, rng: np.random.Generator):
    return options[int(rng.integers(len(options)))]


def _article(article: str, next_word: str) -> str:
    if article == "a" and next_word in _AN_WORDS:
        return "an"
    return article


def caption(label: int, attrs: dict, rng: np.random.Generator) -> str:
    """One random caption of a digit of class ``label`` with attribute buckets ``attrs``.

    The class is always named, as a word or a numeral; each non-zero attribute is named with
    probability ``MENTION_PROB`` using one of its ``ATTRIBUTE_WORDS``; a middle-bucket slant is
    called "upright"/"straight" with probability ``ZERO_MENTION_PROB``; a middle-bucket thickness
    is never named. E.g. "a thick seven leaning right", "the digit 7, thin", "7". The same rng
    state gives the same caption.
    """
    label = _check_label(label)
    attrs = _check_attrs(attrs)
    name = str(label) if rng.random() < NUMERAL_PROB else NUMBER_WORDS[label]
    pre, post = [], []  # adjectives before the noun; ", thin" / " leaning left" after it
    for attr in ATTRIBUTES:
        bucket = attrs.get(attr, 0)
        words = ATTRIBUTE_WORDS[attr].get(bucket)
        if not words:
            continue
        if rng.random() >= (MENTION_PROB if bucket else ZERO_MENTION_PROB):
            continue
        phrase = _pick(words, rng)
        if attr == "thickness":
            if rng.random() < 0.7:
                pre.append(phrase)
            else:
                post.append((", ", phrase))
        elif bucket == 0:
            pre.append(phrase)
        else:
            post.append((" " if rng.random() < 0.7 else ", ", phrase))
    if len(pre) > 1 and rng.random() < 0.5:
        pre.reverse()
    if len(post) > 1 and rng.random() < 0.5:
        post.reverse()
    post = [(sep if i == 0 else ", ") + phrase for i, (sep, phrase) in enumerate(post)]
    head = str(rng.choice(HEADS, p=HEAD_WEIGHTS)).format(n=name)
    frame = _pick(FRAMES, rng) if rng.random() < FRAME_PROB else ""
    article = _pick(ARTICLES[1:] if frame else ARTICLES, rng)
    body = [*pre, head]
    words = [frame] if frame else []
    if article:
        words.append(_article(article, body[0].split()[0]))
    return " ".join(words + body) + "".join(post)


def caption_rows(labels, attr_buckets: dict, seed: int, step: int, rows) -> list[str]:
    """Captions of global batch rows ``rows`` of training step ``step``.

    Row r draws from ``np.random.default_rng([seed, CAPTION_STREAM, step, r])``, so its caption
    does not depend on which process reads it or how the rows are split. ``labels`` (n,) and
    ``attr_buckets`` ({attribute: (n,)}) are those rows' values.
    """
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    columns = {name: np.asarray(b).reshape(-1) for name, b in attr_buckets.items()}
    for name, col in [("labels", labels)] + [
        (f"attr_buckets[{k!r}]", c) for k, c in columns.items()
    ]:
        if col.shape[0] != rows.shape[0]:
            raise ValueError(
                f"caption_rows: {name} has {col.shape[0]} rows but rows has {len(rows)}"
            )
    out = []
    for i, r in enumerate(rows):
        rng = np.random.default_rng([int(seed), CAPTION_STREAM, int(step), int(r)])
        attrs = {name: int(col[i]) for name, col in columns.items()}
        out.append(caption(int(labels[i]), attrs, rng))
    return out


def vocabulary() -> list[str]:
    """Every word a caption can contain, plus the digits "0".."9": sorted, lowercase, unique."""
    pieces = [*NUMBER_WORDS, *FRAMES, *ARTICLES, "an", *HEADS]
    pieces += [p for by_bucket in ATTRIBUTE_WORDS.values() for ws in by_bucket.values() for p in ws]
    words = {w for piece in pieces for w in split_words(piece.replace("{n}", ""))}
    return sorted(words | {str(d) for d in range(10)})


def characters() -> list[str]:
    """Every character a caption can contain (the words', the space and the comma), sorted."""
    return sorted({ch for w in vocabulary() for ch in w} | {" ", ","})


def class_prompts(label: int) -> list[str]:
    """Prompts that name only the digit: "7", "seven", "a seven", "the digit seven", ..."""
    label = _check_label(label)
    word, num = NUMBER_WORDS[label], str(label)
    a = _article("a", word)
    return [num, word, f"{a} {word}", f"the digit {word}", f"the digit {num}", f"the number {num}"]


def attribute_prompts(label: int, attribute: str, bucket: int) -> list[str]:
    """Prompts naming the digit and one attribute bucket, one per phrasing and class spelling.

    E.g. thickness +1: "a thick 7", "a thick seven", "a bold 7", ...; slant -1: "a 7 leaning
    left", ...; slant 0: "an upright 7", ... A bucket without words (thickness 0) is described by
    not naming it: ``class_prompts(label)``.
    """
    label = _check_label(label)
    bucket = _check_attrs({attribute: bucket})[attribute]
    words = ATTRIBUTE_WORDS[attribute].get(bucket)
    if not words:
        return class_prompts(label)
    out = []
    for phrase in words:
        for name in (str(label), NUMBER_WORDS[label]):
            if attribute == "thickness" or bucket == 0:
                out.append(f"{_article('a', phrase)} {phrase} {name}")
            else:
                out.append(f"{_article('a', name)} {name} {phrase}")
    return out
