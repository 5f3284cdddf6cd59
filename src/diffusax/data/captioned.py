"""A labelled image source whose batches also carry captions, as caption tokens and a mask.

    source = CaptionedSource(digits("train"), tokenizer, context_length=16)
    batch = read_rows(source, step, seed, B, rows)
    # {'image', 'label', 'tokens': int32 (n, 16), 'mask': bool (n, 16)}

Each example's attributes are measured once from its pixels (``captions.measure``) and
bucketed by the per-class terciles of the *train* split (``captions.fit_thresholds``), so a
sample can later be measured against the same thresholds. The caption of a row is drawn afresh
at every step from (seed, step, global row) (``captions.caption_rows``), so an image is seen
with many phrasings, and a batch does not depend on the number of hosts.
"""

from __future__ import annotations

import functools

import numpy as np

from diffusax.data import captions
from diffusax.data.sources import digits


@functools.cache
def digits_thresholds() -> dict:
    """The attribute thresholds of the bundled digits: per-class terciles of the train split."""
    train = digits("train")
    data = train.read(np.arange(len(train)))
    return captions.fit_thresholds(captions.measure(data["image"]), data["label"])


def attribute_buckets(source, thresholds: dict) -> dict[str, np.ndarray]:
    """{attribute: int8 (N,) bucket in {-1, 0, 1}} of every example of ``source``."""
    everything = source.read(np.arange(len(source)))
    values = captions.measure(everything["image"])
    return captions.buckets(values, everything["label"], thresholds)


class CaptionedSource:
    """``source`` (labelled, images in [-1, 1]) with captions tokenized by ``tokenizer``."""

    def __init__(self, source, tokenizer, context_length: int, thresholds: dict | None = None):
        if source.info.num_classes is None:
            raise ValueError(f"captions name the class: dataset '{source.info.name}' has no labels")
        self.source, self.info = source, source.info
        self.tokenizer, self.context_length = tokenizer, int(context_length)
        self.thresholds = thresholds if thresholds is not None else digits_thresholds()
        self.attributes = attribute_buckets(source, self.thresholds)

    def __len__(self) -> int:
        return len(self.source)

    def read(self, indices) -> dict[str, np.ndarray]:
        return self.source.read(indices)

    def annotate(self, batch: dict, indices, step: int, seed: int, rows) -> dict:
        """``batch`` (rows ``rows`` of batch ``step``) with its captions' tokens and mask."""
        attrs = {k: v[np.asarray(indices)] for k, v in self.attributes.items()}
        texts = captions.caption_rows(batch["label"], attrs, seed, step, rows)
        tokens, mask = self.tokenizer.encode(
            texts, self.context_length, field="text.captions"
        )  # (n, L) each
        return dict(batch, tokens=tokens, mask=mask)


@functools.cache
def random_captions(draws: int = 4000) -> tuple[str, ...]:
    """``draws`` random captions over every class and attribute combination (seeded): what
    a context-length check encodes, as the captions' length is bounded."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(draws):
        attrs = {a: int(rng.integers(-1, 2)) for a in captions.ATTRIBUTES}
        out.append(captions.caption(i % 10, attrs, rng))
    return tuple(out)


def longest_captions() -> list[str]:
    """Captions at least as long as any ``captions.caption`` can make: the longest frame,
    article, class name and head, with each attribute in its longest phrasing, before or after
    the noun (an upper bound on the captions' length in words and in characters)."""
    words = captions.ATTRIBUTE_WORDS
    longest = lambda options: max(options, key=len)
    frame, head = longest(captions.FRAMES), longest(captions.HEADS)
    name = longest([*captions.NUMBER_WORDS, "0"])
    thick = longest([w for b, ws in words["thickness"].items() for w in ws])
    slant_pre = longest(words["slant"][0])
    slant_post = longest([w for b, ws in words["slant"].items() if b for w in ws])
    out = []
    for pre_thick in (True, False):
        for pre_slant in (True, False):
            pre = ([thick] if pre_thick else []) + ([slant_pre] if pre_slant else [])
            post = ("" if pre_thick else ", " + thick) + ("" if pre_slant else ", " + slant_post)
            body = " ".join([frame, longest(captions.ARTICLES), *pre, head.format(n=name)])
            out.append(body + post)
    return out
