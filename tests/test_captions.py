"""Digit captions (attributes measured from the image, per-class buckets, phrasings) and the
word/character tokenizer that encodes them. Numpy only."""

import json
import re

import numpy as np
import pytest

from diffusax.data import captions, tokenizer
from diffusax.data.sources import digits_arrays

WORDS_CONTEXT = 16


def bar(width, shear=0.0, size=8, length=6):
    """A vertical bar image in [-1, 1] (1, size, size, 1); row i from the top is shifted right by
    ``shear * (centre - i)`` pixels (top to the right for shear > 0), with linear interpolation."""
    img = np.zeros((size, size))
    top = (size - length) // 2
    for i in range(top, top + length):
        left = (size - width) // 2 + shear * ((size - 1) / 2 - i)
        for j in range(size):
            img[i, j] = np.clip(min(j + 1, left + width) - max(j, left), 0, 1)  # coverage
    return (img * 2 - 1)[None, :, :, None]


@pytest.fixture(scope="module")
def train():
    pixels, labels, _ = digits_arrays()["train"]
    return pixels.astype(np.float32) / 8 - 1, labels


@pytest.fixture(scope="module")
def fitted(train):
    images, labels = train
    values = captions.measure(images)
    return values, captions.fit_thresholds(values, labels)


@pytest.fixture(scope="module")
def words():
    return tokenizer.from_captions("words")


def draws(n, seed=0):
    """(label, attrs, caption) for n random labels and buckets."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        label = int(rng.integers(10))
        attrs = {a: int(rng.integers(-1, 2)) for a in captions.ATTRIBUTES}
        out.append((label, attrs, captions.caption(label, attrs, rng)))
    return out


# --- measurements ---------------------------------------------------------------------------


def test_measure_bars():
    thin, thick, wider = bar(1.0), bar(2.0), bar(3.0)
    m = captions.measure(np.concatenate([thin, thick, wider, bar(2.0, 0.4), bar(2.0, -0.4)]))
    assert set(m) == {"thickness", "slant"}
    assert all(v.shape == (5,) and v.dtype == np.float64 for v in m.values())
    t, s = m["thickness"], m["slant"]
    assert t[0] < t[1] < t[2]
    np.testing.assert_allclose(t[:3], [1.0, 2.0, 3.0], rtol=1e-9)  # a sharp bar: its width
    assert abs(s[0]) < 1e-9 and abs(s[1]) < 1e-9  # upright
    assert s[3] > 0.25 and s[4] < -0.25  # top to the right / to the left
    np.testing.assert_allclose(s[3], -s[4], rtol=1e-9)  # mirror images
    np.testing.assert_allclose(s[3], 0.4, rtol=0.2)  # dx per dy
    # The same stroke lying down, or twice as long, has about the same thickness.
    lying = np.swapaxes(thick, 1, 2)
    longer = bar(2.0, size=16, length=12)
    assert captions.measure(lying)["thickness"][0] == pytest.approx(t[1], rel=1e-9)
    assert captions.measure(longer)["thickness"][0] == pytest.approx(t[1], rel=1e-9)
    # A diagonal stroke of the same width reads about the same.
    yy, xx = np.mgrid[0:32, 0:32] + 0.5
    diag = np.abs(xx - yy) / np.sqrt(2) < 4  # 8 px wide at 32x32: 2 px at 8x8, along y = x
    diag &= (xx > 4) & (xx < 28)
    diag8 = diag.reshape(8, 4, 8, 4).mean((1, 3)) * 2 - 1
    td = captions.measure(diag8[None, :, :, None])["thickness"][0]
    assert td == pytest.approx(t[1], rel=0.1)


def test_measure_blank_clips_and_rejects_bad_shapes():
    blank = -np.ones((2, 8, 8, 1))
    m = captions.measure(blank)
    np.testing.assert_array_equal(m["thickness"], 0.0)
    np.testing.assert_array_equal(m["slant"], 0.0)
    # Values outside [-1, 1] are clipped to ink in [0, 1].
    np.testing.assert_array_equal(captions.measure(blank - 0.5)["thickness"], 0.0)
    with pytest.raises(ValueError, match=r"\(N, H, W, 1\)"):
        captions.measure(np.zeros((8, 8, 1)))
    with pytest.raises(ValueError, match="NaN"):
        captions.measure(np.full((1, 8, 8, 1), np.nan))


def test_thresholds_give_terciles_per_class(train, fitted):
    images, labels = train
    values, thresholds = fitted
    assert {k: v.shape for k, v in thresholds.items()} == {"thickness": (10, 2), "slant": (10, 2)}
    b = captions.buckets(values, labels, thresholds)
    for name, col in b.items():
        assert col.dtype == np.int8 and set(np.unique(col)) == {-1, 0, 1}
        for c in range(10):
            share = np.bincount(col[labels == c] + 1, minlength=3) / np.sum(labels == c)
            np.testing.assert_allclose(share, 1 / 3, atol=0.02, err_msg=f"{name} class {c}")
    # Held-out digits measured the same way fall in every bucket too.
    pixels, test_labels, _ = digits_arrays()["test"]
    tb = captions.buckets(captions.measure(pixels / 8.0 - 1), test_labels, thresholds)
    for col in tb.values():
        share = np.bincount(col + 1, minlength=3) / len(col)
        assert np.all(share > 0.1), share  # not terciles: the held-out writers differ
    # A thick digit has more ink than a thin one of its class, on average.
    ink = (images + 1).sum((1, 2, 3))
    for c in range(10):
        sel = labels == c
        assert ink[sel & (b["thickness"] == 1)].mean() > ink[sel & (b["thickness"] == -1)].mean()


def test_thresholds_json_round_trip(train, fitted):
    values, thresholds = fitted
    text = captions.thresholds_to_json(thresholds)
    raw = json.loads(text)
    assert isinstance(raw["slant"], list) and len(raw["slant"]) == 10
    back = captions.thresholds_from_json(text)
    for k in thresholds:
        np.testing.assert_array_equal(back[k], thresholds[k])
    assert captions.thresholds_from_json(raw).keys() == thresholds.keys()
    with pytest.raises(ValueError, match="num_classes, 2"):
        captions.thresholds_from_json('{"slant": [1, 2, 3]}')
    with pytest.raises(ValueError, match="class 3 has 0 examples"):
        captions.fit_thresholds({"slant": np.arange(9.0)}, np.arange(9) // 3, 4)
    with pytest.raises(ValueError, match="outside"):
        captions.buckets(values, np.full(len(values["slant"]), 10), thresholds)


# --- captions -------------------------------------------------------------------------------


def test_captions_name_the_class_and_only_the_given_buckets():
    numbers = set(captions.NUMBER_WORDS) | {str(d) for d in range(10)}
    phrase_words = {
        (a, b): [tokenizer.split_words(p) for p in ps]
        for a, by_bucket in captions.ATTRIBUTE_WORDS.items()
        for b, ps in by_bucket.items()
    }

    def mentions(tokens, attr, bucket):
        return any(
            any(tokens[i : i + len(p)] == p for i in range(len(tokens)))
            for p in phrase_words.get((attr, bucket), [])
        )

    mentioned, nonzero = 0, 0
    for label, attrs, text in draws(3000):
        tokens = tokenizer.split_words(text)
        named = [t for t in tokens if t in numbers]
        assert named in ([captions.NUMBER_WORDS[label]], [str(label)]), text
        for attr, bucket in attrs.items():
            for other in (-1, 0, 1):
                if other != bucket:
                    assert not mentions(tokens, attr, other), (text, attrs)
            if bucket:
                nonzero += 1
                mentioned += mentions(tokens, attr, bucket)
        assert text == text.strip() and "  " not in text and text == text.lower()
        assert not re.search(r"\ba [aeiou8]", text.replace("a one", "")), text
    assert 0.65 < mentioned / nonzero < 0.75
    # Captions naming nothing but the digit are common.
    bare = [t for _, _, t in draws(500, seed=1) if len(t.split()) <= 2]
    assert len(bare) > 50


def test_every_vocabulary_word_is_used_and_every_caption_encodes(words):
    vocab = captions.vocabulary()
    assert vocab == sorted(set(vocab)) and all(w == w.lower() for w in vocab)
    assert {str(d) for d in range(10)} <= set(vocab) and set(captions.NUMBER_WORDS) <= set(vocab)
    texts = [t for _, _, t in draws(3000)]
    seen = {w for t in texts for w in tokenizer.split_words(t)}
    assert seen == set(vocab), set(vocab) - seen
    _, mask = words.encode(texts, WORDS_CONTEXT)  # no error: all known, all fit
    assert mask.sum(1).max() <= WORDS_CONTEXT
    chars = tokenizer.from_captions("chars")
    assert {c for t in texts for c in t} <= set(chars.vocab)
    chars.encode(texts, 80)


def test_caption_rows_deterministic_and_split_independent(train, fitted):
    _, labels = train
    values, thresholds = fitted
    b = captions.buckets(values, labels, thresholds)
    rows = np.arange(64)
    sel = rows * 7 % len(labels)  # the dataset examples these rows hold
    take = lambda r: (labels[sel[r]], {k: v[sel[r]] for k, v in b.items()})
    whole = captions.caption_rows(*take(rows), seed=3, step=11, rows=rows)
    assert whole == captions.caption_rows(*take(rows), seed=3, step=11, rows=rows)
    halves = [captions.caption_rows(*take(r), 3, 11, r) for r in (rows[:24], rows[24:])]
    assert halves[0] + halves[1] == whole
    odd = rows[1::2]
    assert captions.caption_rows(*take(odd), 3, 11, odd) == whole[1::2]
    # Row r's stream is (seed, CAPTION_STREAM, step, r).
    rng = np.random.default_rng([3, captions.CAPTION_STREAM, 11, 5])
    assert whole[5] == captions.caption(int(labels[sel[5]]), take(5)[1], rng)
    assert captions.CAPTION_STREAM == 3
    other_step = captions.caption_rows(*take(rows), seed=3, step=12, rows=rows)
    other_seed = captions.caption_rows(*take(rows), seed=4, step=11, rows=rows)
    assert sum(a != b for a, b in zip(whole, other_step)) > 32
    assert sum(a != b for a, b in zip(whole, other_seed)) > 32
    with pytest.raises(ValueError, match="rows"):
        captions.caption_rows(labels[:3], {}, 0, 0, np.arange(4))


def test_evaluation_prompts(words):
    for label in range(10):
        cp = captions.class_prompts(label)
        assert str(label) in cp and captions.NUMBER_WORDS[label] in cp
        words.encode(cp, WORDS_CONTEXT)
        for attr, by_bucket in captions.ATTRIBUTE_WORDS.items():
            for bucket in (-1, 0, 1):
                prompts = captions.attribute_prompts(label, attr, bucket)
                words.encode(prompts, WORDS_CONTEXT)
                if bucket in by_bucket:
                    assert len(prompts) == 2 * len(by_bucket[bucket])
                    assert all(any(p.find(w) >= 0 for w in by_bucket[bucket]) for p in prompts)
                else:
                    assert prompts == cp
    assert "a thick 7" in captions.attribute_prompts(7, "thickness", 1)
    assert "an eight leaning left" in captions.attribute_prompts(8, "slant", -1)
    with pytest.raises(ValueError, match="unknown attribute"):
        captions.attribute_prompts(7, "colour", 1)


# --- tokenizer ------------------------------------------------------------------------------


def test_tokenizer_words_round_trip_and_null_caption(words):
    assert (words.pad_id, words.bos_id, words.eos_id) == (0, 1, 2)
    assert words.vocab_size == 3 + len(captions.vocabulary())
    texts = ["A thick Seven, leaning-right", "", "the digit 17", "  7  "]
    tokens, mask = words.encode(texts, WORDS_CONTEXT)
    assert tokens.dtype == np.int32 and mask.dtype == bool and tokens.shape == (4, 16)
    assert words.decode(tokens) == ["a thick seven leaning right", "", "the digit 1 7", "7"]
    np.testing.assert_array_equal(tokens[1], [1, 2] + [0] * 14)  # the empty caption
    np.testing.assert_array_equal(mask.sum(1), [7, 2, 6, 3])
    np.testing.assert_array_equal(mask, np.arange(16) < mask.sum(1, keepdims=True))
    assert np.all(tokens[~mask] == 0)
    assert tokens[0, 6] == words.eos_id
    assert words.encode([], WORDS_CONTEXT)[0].shape == (0, 16)
    assert words.decode(tokens[0]) == ["a thick seven leaning right"]


def test_tokenizer_errors_name_the_field_and_the_problem(words):
    with pytest.raises(ValueError) as e:
        words.encode(["a thick 7", "a purple sevn"], 16, field="eval.prompts")
    msg = str(e.value)
    assert "eval.prompts[1]" in msg and "'purple'" in msg and "'sevn'" in msg
    assert "'words' tokenizer" in msg and f"{len(words.vocab)} words" in msg
    with pytest.raises(ValueError) as e:
        words.encode(["seven " * 20], 16)
    assert str(e.value).endswith(
        "has 20 tokens (22 with bos/eos), more than the text encoder's context of 16 "
        "(config field 'text.context_length')"
    )
    assert str(e.value).startswith("sample.prompt: prompt 'seven seven")
    with pytest.raises(ValueError, match=r"'model\.text_len'"):
        words.encode(["seven " * 20], 16, context_field="model.text_len")
    with pytest.raises(ValueError, match="list of prompts"):
        words.encode("seven", 16)
    with pytest.raises(ValueError, match=r"'text\.context_length'"):
        words.encode(["seven"], 1)
    # The longest allowed prompt fits exactly.
    words.encode(["seven " * 14], 16)
    with pytest.raises(ValueError, match="not one token"):
        tokenizer.Tokenizer("words", ["seven", "Seven"])
    with pytest.raises(ValueError, match="duplicates"):
        tokenizer.Tokenizer("words", ["seven", "seven"])
    with pytest.raises(ValueError, match="kind"):
        tokenizer.Tokenizer("bytes", ["a"])


def test_tokenizer_chars():
    chars = tokenizer.from_captions("chars")
    assert " " in chars.vocab and "," in chars.vocab and "7" in chars.vocab
    tokens, mask = chars.encode(["  The digit\t7,  thin ", ""], 32)
    assert chars.decode(tokens) == ["the digit 7, thin", ""]
    assert mask[0].sum() == len("the digit 7, thin") + 2
    with pytest.raises(ValueError) as e:
        chars.encode(["seven!?"], 32, field="sample.prompt")
    msg = str(e.value)
    assert "sample.prompt" in msg and "'!'" in msg and "'?'" in msg and "'chars' tokenizer" in msg
    assert f"{len(chars.vocab)} characters" in msg


def test_tokenizer_json_save_load(tmp_path, words):
    for tok in (words, tokenizer.from_captions("chars")):
        assert tokenizer.Tokenizer.from_json(tok.to_json()) == tok
        path = tmp_path / "run" / f"{tok.kind}.json"
        tok.save(path)
        back = tokenizer.Tokenizer.load(path)
        assert back == tok and back.vocab_size == tok.vocab_size
        texts = captions.class_prompts(7)
        np.testing.assert_array_equal(back.encode(texts, 32)[0], tok.encode(texts, 32)[0])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["chars.json", "words.json"]
    with pytest.raises(FileNotFoundError, match=r"no tokenizer file at .*missing\.json"):
        tokenizer.Tokenizer.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match=r"bad\.json.*not a tokenizer JSON"):
        tokenizer.Tokenizer.load(tmp_path / "bad.json")
