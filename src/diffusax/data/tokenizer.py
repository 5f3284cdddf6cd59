"""A word- or character-level tokenizer over a fixed vocabulary, saved with a run as JSON.

    tok = tokenizer.from_captions("words")          # the digit captions' vocabulary
    tokens, mask = tok.encode(["a thick 7", ""], context_length=16)
    # tokens int32 (2, 16): [bos, a, thick, 7, eos, pad...], [bos, eos, pad...]
    # mask bool (2, 16): True on bos..eos; "" is the null caption of classifier-free guidance
    tok.save(path); tokenizer.Tokenizer.load(path)

Ids: pad 0, bos 1, eos 2, then the vocabulary in order. Text is lowercased; "words" splits it
into the matches of ``[a-z]+|[0-9]`` (punctuation and spaces are dropped, "17" is "1", "7"),
"chars" into its characters once whitespace runs are collapsed to one space and stripped.

Pure numpy: this module imports neither jax nor ``diffusax.config``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Sequence

import numpy as np

KINDS = ("words", "chars")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
NUM_SPECIAL = 3
FORMAT = "diffusax.tokenizer"
VERSION = 1

_WORD = re.compile(r"[a-z]+|[0-9]")
_SPACES = re.compile(r"\s+")


def split_words(text: str) -> list[str]:
    """The word tokens of ``text``: matches of ``[a-z]+|[0-9]`` in ``text.lower()``."""
    return _WORD.findall(text.lower())


def split_chars(text: str) -> list[str]:
    """The character tokens of ``text``: lowercased, whitespace runs as one space, stripped."""
    return list(_SPACES.sub(" ", text.lower()).strip())


class Tokenizer:
    """``Tokenizer(kind, vocab)``: kind "words" (vocab: words) or "chars" (vocab: characters)."""

    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

    def __init__(self, kind: str, vocab: Sequence[str]):
        if kind not in KINDS:
            raise ValueError(f"tokenizer kind must be one of {KINDS}, got {kind!r}")
        if isinstance(vocab, str):
            raise ValueError("tokenizer vocab must be a sequence of strings, not one string")
        vocab = list(vocab)
        for v in vocab:
            if not isinstance(v, str):
                raise ValueError(f"tokenizer vocab holds {v!r}; expected strings")
            if kind == "words" and _WORD.fullmatch(v) is None:
                raise ValueError(
                    f"'words' tokenizer vocab holds {v!r}, which is not one token "
                    f"(lowercase [a-z]+ or a single digit)"
                )
            if kind == "chars" and (len(v) != 1 or split_chars("a" + v + "a") != ["a", v, "a"]):
                raise ValueError(
                    f"'chars' tokenizer vocab holds {v!r}; expected single lowercase characters "
                    f"(whitespace only as ' ')"
                )
        if len(set(vocab)) != len(vocab):
            dup = sorted({v for v in vocab if vocab.count(v) > 1})
            raise ValueError(f"tokenizer vocab has duplicates: {dup[:5]}")
        self.kind = kind
        self.vocab = tuple(vocab)
        self._ids = {v: NUM_SPECIAL + i for i, v in enumerate(self.vocab)}

    @property
    def vocab_size(self) -> int:
        """Number of ids, the 3 special ones included."""
        return NUM_SPECIAL + len(self.vocab)

    @property
    def _unit(self) -> str:
        return "words" if self.kind == "words" else "characters"

    def tokenize(self, text: str) -> list[str]:
        """The tokens (strings) of ``text``, before the vocabulary lookup."""
        return split_words(text) if self.kind == "words" else split_chars(text)

    def normalize(self, text: str) -> str:
        """``text`` as ``decode`` gives it back: its tokens joined by spaces (words) or not."""
        return (" " if self.kind == "words" else "").join(self.tokenize(text))

    def encode(
        self,
        texts: Sequence[str],
        context_length: int,
        *,
        field: str = "sample.prompt",
        context_field: str = "text.context_length",
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens int32 (N, L), mask bool (N, L))``: rows [bos, ids..., eos, pad...].

        ``mask`` is True on bos..eos. Every text is checked before any is encoded: a token not
        in the vocabulary, or a text longer than ``context_length`` - 2 tokens, raises a
        ValueError naming ``field`` (and ``context_field`` for the length).
        """
        if isinstance(texts, str):
            raise ValueError(
                f"{field}: expected a list of prompts, got the string {texts!r} (wrap it in a list)"
            )
        texts = list(texts)
        if not isinstance(context_length, (int, np.integer)) or context_length < 2:
            raise ValueError(
                f"config field '{context_field}' is {context_length!r}; the text encoder's context "
                f"must be an int >= 2 (room for bos and eos)"
            )
        many = len(texts) > 1
        encoded = []
        for i, text in enumerate(texts):
            where = f"{field}[{i}]" if many else field
            if not isinstance(text, str):
                raise ValueError(f"{where}: expected a string prompt, got {text!r}")
            toks = self.tokenize(text)
            unknown = list(dict.fromkeys(t for t in toks if t not in self._ids))
            if unknown:
                shown = ", ".join(repr(t) for t in unknown[:5])
                more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
                raise ValueError(
                    f"{where}: prompt {text!r} has {self._unit} not in the vocabulary: {shown}{more} "
                    f"(the '{self.kind}' tokenizer knows {len(self.vocab)} {self._unit}"
                    f"{self._examples()})"
                )
            if len(toks) + 2 > context_length:
                raise ValueError(
                    f"{where}: prompt {text!r} has {len(toks)} tokens ({len(toks) + 2} with "
                    f"bos/eos), more than the text encoder's context of {context_length} "
                    f"(config field '{context_field}')"
                )
            encoded.append([self._ids[t] for t in toks])
        tokens = np.full((len(texts), int(context_length)), PAD_ID, dtype=np.int32)
        mask = np.zeros((len(texts), int(context_length)), dtype=bool)
        for i, ids in enumerate(encoded):
            row = [BOS_ID, *ids, EOS_ID]
            tokens[i, : len(row)] = row
            mask[i, : len(row)] = True
        return tokens, mask

    def _examples(self) -> str:
        if self.kind == "words":
            shown = ", ".join(self.vocab[:12])
            return f": {shown}{', ...' if len(self.vocab) > 12 else ''}"
        return ": " + repr("".join(self.vocab))

    def decode(self, tokens) -> list[str]:
        """Texts of token rows (N, L) (or one row (L,)): ids up to the first eos, specials dropped.

        Words are joined by single spaces, characters directly.
        """
        tokens = np.asarray(tokens)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(
                f"decode: tokens have shape {tokens.shape} dtype {tokens.dtype}; expected "
                f"integers (N, L)"
            )
        bad = tokens[(tokens < 0) | (tokens >= self.vocab_size)]
        if bad.size:
            raise ValueError(
                f"decode: token id {int(bad[0])} is outside [0, {self.vocab_size}) of this tokenizer"
            )
        sep = " " if self.kind == "words" else ""
        out = []
        for row in tokens:
            parts = []
            for t in row.tolist():
                if t == EOS_ID:
                    break
                if t >= NUM_SPECIAL:
                    parts.append(self.vocab[t - NUM_SPECIAL])
            out.append(sep.join(parts))
        return out

    # --- serialisation --------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "version": VERSION,
                "kind": self.kind,
                "special": {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID},
                "vocab": list(self.vocab),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"tokenizer JSON is not valid JSON: {e}") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError(f'not a tokenizer JSON (expected "format": "{FORMAT}")')
        if raw.get("version") != VERSION:
            raise ValueError(
                f"tokenizer JSON has version {raw.get('version')!r}; this code reads {VERSION}"
            )
        special = {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID}
        if raw.get("special", special) != special:
            raise ValueError(f"tokenizer JSON has special ids {raw['special']}; expected {special}")
        return cls(raw.get("kind"), raw.get("vocab", []))

    def save(self, path) -> None:
        """Write ``to_json()`` to ``path`` atomically (a temporary file, then ``os.replace``)."""
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tokenizer-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load(cls, path) -> Tokenizer:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no tokenizer file at {path}: a text-conditional run writes it with "
                f"Tokenizer.save when it starts"
            )
        with open(path) as f:
            text = f.read()
        try:
            return cls.from_json(text)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def __eq__(self, other) -> bool:
        if not isinstance(other, Tokenizer):
            return NotImplemented
        return (self.kind, self.vocab) == (other.kind, other.vocab)

    def __hash__(self) -> int:
        return hash((self.kind, self.vocab))

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, {len(self.vocab)} {self._unit})"


def from_captions(kind: str = "words") -> Tokenizer:
    """The digit captions' tokenizer: ``captions.vocabulary()`` for "words"; for "chars", every
    character of a caption (the vocabulary's, the space and the comma)."""
    from diffusax.data import captions

    if kind == "words":
        return Tokenizer("words", captions.vocabulary())
    if kind == "chars":
        return Tokenizer("chars", captions.characters())
    raise ValueError(f"tokenizer kind must be one of {KINDS}, got {kind!r}")
