r"""The CLIP BPE tokenizer of Stable Diffusion, read from a diffusers ``tokenizer/`` folder.

    tok = ClipTokenizer.from_folder("sd-v1-5/tokenizer")   # vocab.json, merges.txt (+ configs)
    ids = tok.encode(["a photo of a cat", ""])            # int32 (2, 77)
    # [bos, a, photo, of, a, cat, eos, pad...], [bos, eos, pad...]

The ids equal those of transformers' ``CLIPTokenizer`` (the class diffusers'
``StableDiffusionPipeline`` uses) called as diffusers calls it for a prompt,
``tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
truncation=True)``: ``[bos] + bpe_ids[: max_length - 2] + [eos]``, padded with the pad token's
id to ``max_length`` (``model_max_length``, 77 for every Stable Diffusion folder).

Why ``tokenizers``: BPE is not written here but run by Hugging Face's ``tokenizers`` library, the
better-kept choice: a Rust BPE maintained by Hugging Face, the very library transformers' fast
tokenizers are built on (and, since transformers 5, the only backend its ``CLIPTokenizer`` has),
with no torch and no transformers needed. The pipeline built from the folder's files:

- added tokens: the special tokens (bos, eos, unk, pad) and any tokens the folder adds
  (tokenizer_config.json's ``added_tokens_decoder``, added_tokens.json, tokenizer.json's
  ``added_tokens``; e.g. a textual-inversion token) are found in the raw text first, each its
  own id: ``"a <|endoftext|> cat"`` is ``[bos, a, eos, cat, eos]``, as in transformers;
- normalizer ``Sequence([NFC(), Replace(Regex(r"\s+"), " "), Lowercase()])``;
- pre-tokenizer ``Sequence([Split(Regex(CLIP_PATTERN), "removed", invert=True),
  ByteLevel(add_prefix_space=False, use_regex=True)])``: the matches of CLIP's pattern
  ``<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+``
  are the words (the whitespace between them is dropped), then each word's UTF-8 bytes are
  mapped to GPT-2's 256 printable byte characters (``bytes_to_unicode``); ByteLevel's own GPT-2
  split changes a CLIP word only for a special token's spelling that was not caught as an added
  token (``"<|ENDOFTEXT|>"`` becomes ``<|``, ``endoftext``, ``|>``), exactly as in transformers;
- model ``BPE(vocab, merges, unk_token=unk, end_of_word_suffix="</w>",
  continuing_subword_prefix="", fuse_unk=False)``: ``</w>`` is appended to each word's last
  symbol before the merges are applied in rank order.

This is the pipeline of transformers 5's ``CLIPTokenizer`` (its only CLIP tokenizer class), which
the tests check id for id. transformers 4's ``CLIPTokenizerFast`` has the same pipeline but may
read a special token's ``normalized`` option differently (on SD v1.5's files it takes
"<|ENDOFTEXT|>" for eos; transformers 5 and this module do not). transformers 4's *slow*
``CLIPTokenizer`` (its default class; without ``ftfy``: transformers' ``BasicTokenizer``, which
cleans control characters and splits CJK, then CLIP's regex) gives the same ids on ordinary
prompts but, checked against transformers 4.57.1, differs on four kinds of input: it drops
control and format characters (NUL, ESC, DEL, zero-width space and joiner, BOM, U+FFFD; here
they are kept and tokenized like punctuation); it makes each CJK ideograph a word of its own
("一只猫" is three words ending in ``</w>`` there, one word here); it turns a special token
spelled in any letter case ("<|ENDOFTEXT|>") into its id (here only the exact spelling does, or
the lowercased one for a token whose config says ``"normalized": true``); and it matches an added
(textual-inversion) token case-sensitively, where transformers 5 and this module match a
normalized one after lowercasing.

Which special tokens are normalized is read as transformers 5 reads it: ``added_tokens_decoder``
in tokenizer_config.json, when present, is the record (special_tokens_map.json is then not read);
otherwise special_tokens_map.json's entries override tokenizer_config.json's. Entries are strings
or dicts with a ``"content"`` key (transformers' ``AddedToken`` serialisation); a string is a
special token matched case-sensitively, a dict gives ``normalized``/``lstrip``/``rstrip``/
``single_word`` itself; when one string has several roles (eos = pad = unk), the last role read
(bos, eos, unk, pad) decides its options.

A folder saved by transformers 5 alone holds tokenizer.json instead of vocab.json and merges.txt:
its BPE model's vocabulary and merges are read from it (the pipeline is built as above).
``tokenizers`` is imported
inside ``from_folder``: this module itself imports only numpy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

CLIP_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"""
    r"""|[^\s\p{L}\p{N}]+"""
)
DEFAULT_MAX_LENGTH = 77
# transformers' order of the special-token roles (SPECIAL_TOKENS_ATTRIBUTES), those CLIP has.
ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")
DEFAULT_TOKENS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
TOKEN_OPTIONS = ("single_word", "lstrip", "rstrip", "normalized")
MAX_MAX_LENGTH = 1 << 20  # a larger model_max_length is transformers' "no limit" marker (1e30)


def _read_json(path: str, required: bool):
    """The JSON object in ``path``; None when it is absent and not ``required``."""
    if not os.path.isfile(path):
        if required:
            raise FileNotFoundError(f"CLIP tokenizer file {path} does not exist")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"CLIP tokenizer file {path} is not readable JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(
            f"CLIP tokenizer file {path} must hold a JSON object, got {type(obj).__name__}"
        )
    return obj


def _read_vocab(path: str) -> dict[str, int]:
    vocab = _read_json(path, required=True)
    if not vocab:
        raise ValueError(f"CLIP tokenizer file {path} holds an empty vocabulary")
    seen: dict[int, str] = {}
    for token, i in vocab.items():
        if type(i) is not int or i < 0:
            raise ValueError(
                f"CLIP tokenizer file {path}: token {token!r} has id {i!r}; ids must be "
                f"non-negative integers"
            )
        if i in seen:
            raise ValueError(
                f"CLIP tokenizer file {path}: tokens {seen[i]!r} and {token!r} share id {i}"
            )
        seen[i] = token
    return vocab


def _read_merges(path: str) -> list[tuple[str, str]]:
    """The merges of ``path``, one ``left right`` pair a line after the ``#version`` header."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP tokenizer file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"CLIP tokenizer file {path} is not readable UTF-8 text: {e}") from e
    merges = []
    for n, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if not line or (n == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2 or not all(pair):
            raise ValueError(
                f"CLIP tokenizer file {path} line {n}: {line!r} is not a merge (two tokens "
                f"separated by one space)"
            )
        merges.append((pair[0], pair[1]))
    return merges


def _read_tokenizer_json(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE vocabulary and merges of a tokenizers ``tokenizer.json`` (what transformers 5
    saves instead of vocab.json and merges.txt); merges are "a b" strings or [a, b] pairs."""
    model = _read_json(path, required=True).get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ValueError(f"CLIP tokenizer file {path} holds no BPE model (model.type, model.vocab)")
    merges = []
    for n, merge in enumerate(model.get("merges") or []):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not isinstance(pair, list) or len(pair) != 2 or not all(pair):
            raise ValueError(f"CLIP tokenizer file {path}: model.merges[{n}] = {merge!r}")
        merges.append((pair[0], pair[1]))
    return model["vocab"], merges


def _token_spec(value, where: str) -> dict:
    """An added token's content and options from a string or an ``AddedToken`` dict."""
    if isinstance(value, str):
        return dict(
            content=value,
            special=True,
            single_word=False,
            lstrip=False,
            rstrip=False,
            normalized=False,
        )
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        spec = dict(content=value["content"], special=bool(value.get("special", True)))
        for key in ("single_word", "lstrip", "rstrip"):
            spec[key] = bool(value.get(key, False))
        spec["normalized"] = bool(value.get("normalized", not spec["special"]))
        return spec
    raise ValueError(f"{where} must be a string or a dict with a 'content' string, got {value!r}")


def _added_tokens(folder: str, config: dict, config_path: str):
    """The folder's role tokens {role: spec} and added tokens [(id, spec)], as transformers 5
    resolves them (see the module docstring)."""
    roles = {role: config[role] for role in ROLES if config.get(role) is not None}
    roles_where = {role: f"{config_path} entry {role!r}" for role in roles}
    added: dict[int, dict] = {}
    decoder = config.get("added_tokens_decoder")
    if decoder is not None:
        if not isinstance(decoder, dict):
            raise ValueError(f"{config_path} entry 'added_tokens_decoder' must be a dict")
        for key, value in decoder.items():
            try:
                i = int(key)
            except ValueError:
                raise ValueError(
                    f"{config_path} 'added_tokens_decoder' key {key!r} is not an id"
                ) from None
            added[i] = _token_spec(value, f"{config_path} added_tokens_decoder[{key!r}]")
    else:
        map_path = os.path.join(folder, "special_tokens_map.json")
        for role, value in (_read_json(map_path, required=False) or {}).items():
            if role in ROLES and value is not None:
                roles[role], roles_where[role] = value, f"{map_path} entry {role!r}"
        role_contents = {_token_spec(v, roles_where[r])["content"] for r, v in roles.items()} | {
            DEFAULT_TOKENS[r] for r in ROLES if r not in roles
        }
        legacy_path = os.path.join(folder, "added_tokens.json")
        for content, i in (_read_json(legacy_path, required=False) or {}).items():
            if type(i) is not int or i < 0:
                raise ValueError(f"{legacy_path}: token {content!r} has id {i!r}")
            special = content in role_contents
            added[i] = dict(content=content, special=special, single_word=False, lstrip=False)
            added[i].update(rstrip=False, normalized=not special)
        fast_path = os.path.join(folder, "tokenizer.json")
        fast = _read_json(fast_path, required=False) or {}
        for n, value in enumerate(fast.get("added_tokens") or []):
            where = f"{fast_path} added_tokens[{n}]"
            if not isinstance(value, dict) or type(value.get("id")) is not int:
                raise ValueError(f"{where} must be a dict with an integer 'id', got {value!r}")
            added[value["id"]] = _token_spec(value, where)
    by_content = {spec["content"]: spec for spec in added.values()}
    specs = {}
    for role in ROLES:
        if role not in roles:
            specs[role] = _token_spec(DEFAULT_TOKENS[role], role)
            continue
        spec = _token_spec(roles[role], roles_where[role])
        # transformers takes a role's options from the added token of the same content
        specs[role] = by_content.get(spec["content"], spec) if added else spec
    return specs, sorted(added.items())


class ClipTokenizer:
    """CLIP's BPE tokenizer; build it with :meth:`from_folder`.

    ``max_length``: the rows' length (``model_max_length``); ``vocab_size``: one more than the
    largest id it can return (the text encoder's embedding table must be at least that big);
    ``bos_id``, ``eos_id``, ``pad_id``: the special tokens' ids.
    """

    def __init__(self, tokenizer, *, max_length: int, bos_id: int, eos_id: int, pad_id: int):
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer
        self.max_length = int(max_length)
        self.bos_id, self.eos_id, self.pad_id = int(bos_id), int(eos_id), int(pad_id)
        self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> ClipTokenizer:
        """The tokenizer of a diffusers ``tokenizer/`` folder: vocab.json and merges.txt (or
        tokenizer.json's BPE model, when the two are absent), with
        tokenizer_config.json (``model_max_length``, the special tokens), special_tokens_map.json,
        added_tokens.json and tokenizer.json's ``added_tokens`` read when present. Bad or missing
        files raise ``ValueError`` or ``FileNotFoundError`` naming the file."""
        try:
            from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
            from tokenizers.models import BPE
        except ImportError as e:
            raise ImportError(
                "ClipTokenizer needs Hugging Face's tokenizers library: pip install tokenizers"
            ) from e

        folder = os.fspath(path)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"CLIP tokenizer folder {folder} does not exist")
        vocab_path = os.path.join(folder, "vocab.json")
        merges_path = os.path.join(folder, "merges.txt")
        config_path = os.path.join(folder, "tokenizer_config.json")
        json_path = os.path.join(folder, "tokenizer.json")
        have_files = os.path.isfile(vocab_path) or os.path.isfile(merges_path)
        if not have_files and os.path.isfile(json_path):
            vocab, merges = _read_tokenizer_json(json_path)  # a transformers-5 save
        else:
            vocab = _read_vocab(vocab_path)
            merges = _read_merges(merges_path)
        config = _read_json(config_path, required=False) or {}

        max_length = config.get("model_max_length", DEFAULT_MAX_LENGTH)
        if type(max_length) is not int or not 2 <= max_length <= MAX_MAX_LENGTH:
            raise ValueError(
                f"{config_path} entry 'model_max_length' = {max_length!r}: expected an integer "
                f"in [2, {MAX_MAX_LENGTH}] (Stable Diffusion's CLIP uses 77)"
            )
        specs, added = _added_tokens(folder, config, config_path)

        try:
            model = BPE(
                vocab,
                merges,
                unk_token=specs["unk_token"]["content"],
                end_of_word_suffix="</w>",
                continuing_subword_prefix="",
                fuse_unk=False,
                dropout=None,
            )
        except Exception as e:  # the Rust side raises a bare Exception on a bad vocab/merges pair
            raise ValueError(
                f"CLIP tokenizer files {vocab_path} and {merges_path} do not form a BPE model: {e}"
            ) from e
        tok = Tokenizer(model)
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )

        def added_token(spec):
            options = {key: spec[key] for key in TOKEN_OPTIONS}
            return AddedToken(spec["content"], special=spec["special"], **options)

        for _, spec in added:
            add = tok.add_special_tokens if spec["special"] else tok.add_tokens
            add([added_token(spec)])
        for role in ROLES:  # in transformers' order: the last role of a shared token decides
            tok.add_special_tokens([added_token(specs[role])])
        for i, spec in added:
            if tok.token_to_id(spec["content"]) != i:
                raise ValueError(
                    f"CLIP tokenizer folder {folder}: added token {spec['content']!r} is recorded "
                    f"with id {i} but gets id {tok.token_to_id(spec['content'])} from vocab.json"
                )
        ids = {role: tok.token_to_id(specs[role]["content"]) for role in ROLES}
        return cls(
            tok,
            max_length=max_length,
            bos_id=ids["bos_token"],
            eos_id=ids["eos_token"],
            pad_id=ids["pad_token"],
        )

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        """int32 ``(len(prompts), max_length)``: each row ``[bos] + ids[: max_length - 2] +
        [eos]`` then pad ids, as diffusers tokenizes a prompt (``padding="max_length",
        truncation=True``). ``""`` is ``[bos, eos, pad...]``."""
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings, not one string: pass [prompt]")
        prompts = list(prompts)
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise ValueError(f"prompt {i} is a {type(p).__name__} ({p!r}), not a str")
        out = np.full((len(prompts), self.max_length), self.pad_id, np.int32)
        keep = self.max_length - 2
        for row, enc in zip(out, self.tokenizer.encode_batch(prompts, add_special_tokens=False)):
            ids = enc.ids[:keep]
            row[0] = self.bos_id
            row[1 : 1 + len(ids)] = ids
            row[1 + len(ids)] = self.eos_id
        return out


__all__ = ["CLIP_PATTERN", "DEFAULT_MAX_LENGTH", "ClipTokenizer"]
