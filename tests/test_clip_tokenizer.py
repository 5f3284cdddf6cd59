"""ClipTokenizer: id-for-id parity with transformers' CLIPTokenizer on diffusers-style
``tokenizer/`` folders, the special and added tokens, padding/truncation, no torch, bad input.

The folders are tiny but real: a vocab of the 256 byte-level characters (each also with
``</w>``), merges learned here from a few captions, the two special tokens; written as CLIP's
files are (merges.txt with its ``#version`` header) and saved through transformers'
``CLIPTokenizer.save_pretrained``, or with the tokenizer_config.json / special_tokens_map.json
that Stable Diffusion v1.5's and SDXL's hub folders carry. The oracle is
``CLIPTokenizer.from_pretrained(folder)(prompts, padding="max_length", max_length=77,
truncation=True)``, as diffusers calls it. No JAX computation.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from diffusax.data.clip_tokenizer import ClipTokenizer

CAPTIONS = [
    "a photo of a cat",
    "astronaut riding a horse on the moon",
    "a painting of a cat's house",
    "photograph of an astronaut",
    "the cat's hat, it's a horse!!",
    "a café in paris, 1998",
]
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

PROMPTS = [
    "a photo of a cat",
    "A Photo Of An ASTRONAUT Riding A Horse",
    "astronaut, riding; a horse... on the moon?!",
    "it's a cat's toy, don't! I'm we're they've you'll he'd",
    "1998 3.14 42nd 007",
    "a  cat\t\tand\na\r\ndog",
    "   leading and trailing   ",
    "café naïve Ünïcödé",
    "🐱 a cat 🐱🐱 👨\u200d👩\u200d👧 🇯🇵",
    "一只猫",
    "猫が好きです、ねこ",
    "Кошка на ковре",
    "e\u0301 cafe\u0301 Å",
    "ctrl\x00\x01\x1b[31m\x7f\u200b\ufeff char",
    "a\x00b x\ufffdy",
    "",
    "     ",
    "a <|endoftext|> cat",
    "<|endoftext|>",
    "<|startoftext|>a photo<|endoftext|>",
    "<|ENDOFTEXT|> <|StartOfText|> <|endoftext |>",
    "a <cat-toy> on a horse, <CAT-TOY>",
    "hello!! world!",
    "'''s ''t <<||>>",
    "İstanbul ß ﬁ Ｆｕｌｌｗｉｄｔｈ １２３ ١٢٣ Ⅻ ½",
    "\u3000ideographic\u00a0no-break\u2028line",
    "x" * 300,
    " ".join(["astronaut riding a horse, a photo of a cat"] * 12),
]


# --- the tiny folders ---------------------------------------------------------------------


def byte_chars() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each byte 0..255 (transformers' bytes_to_unicode)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars, shifted = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


def learn_merges(texts: list[str], count: int) -> list[tuple[str, str]]:
    """BPE merges learned from the CLIP words of ``texts`` (most frequent pair first)."""
    chars = byte_chars()
    words = collections.Counter()
    for text in texts:
        for word in re.findall(r"'s|'t|[^\W\d_]+|\d|[^\s\w]+", text.lower()):
            symbols = [chars[b] for b in word.encode("utf-8")]
            symbols[-1] += "</w>"
            words[tuple(symbols)] += 1
    merges = []
    for _ in range(count):
        pairs = collections.Counter()
        for word, n in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merges.append(best)
        merged = collections.Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return merges


MERGES = learn_merges(CAPTIONS, 60)


def write_vocab_and_merges(folder) -> dict[str, int]:
    os.makedirs(folder, exist_ok=True)
    chars = byte_chars()
    tokens = [*chars, *(c + "</w>" for c in chars), *("".join(m) for m in MERGES), BOS, EOS]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    return vocab


def added_token(content: str, normalized: bool, **extra) -> dict:
    options = dict(lstrip=False, normalized=normalized, rstrip=False, single_word=False)
    return dict(content=content, **options, **extra)


def write_json(folder, name, obj):
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)


def make_folder(folder, kind: str) -> str:
    """A diffusers ``tokenizer/`` folder of one of the KINDS."""
    from transformers import CLIPTokenizer

    folder = str(folder)
    vocab = write_vocab_and_merges(folder)
    vocab_file, merges_file = (os.path.join(folder, f) for f in ("vocab.json", "merges.txt"))
    if kind in ("saved", "saved_pad_bang"):  # written by transformers' save_pretrained
        pad = {"pad_token": "!"} if kind == "saved_pad_bang" else {}
        CLIPTokenizer(vocab_file, merges_file, model_max_length=77, **pad).save_pretrained(folder)
        return folder
    typed = {"__type": "AddedToken"}
    if kind in ("sd15", "sd15_pad_bang"):  # Stable Diffusion v1.5 / diffusers' tiny test pipes
        config = dict(
            add_prefix_space=False,
            bos_token=dict(typed, **added_token(BOS, True)),
            do_lower_case=True,
            # special_tokens_map.json's entries win: its eos/unk say normalized (with pad "!",
            # "<|ENDOFTEXT|>" is then eos), as both of SD v1.5's files do; False here proves
            # which file is read
            eos_token=dict(typed, **added_token(EOS, False)),
            errors="replace",
            model_max_length=77,
            name_or_path="openai/clip-vit-large-patch14",
            pad_token="!" if kind == "sd15_pad_bang" else EOS,
            special_tokens_map_file="./special_tokens_map.json",
            tokenizer_class="CLIPTokenizer",
            unk_token=dict(typed, **added_token(EOS, False)),
        )
        special = {
            role: {k: v for k, v in value.items() if k != "__type"}
            if isinstance(value, dict)
            else value
            for role, value in config.items()
            if role.endswith("_token")
        }
        special["eos_token"] = special["unk_token"] = added_token(EOS, True)
        write_json(folder, "tokenizer_config.json", config)
        write_json(folder, "special_tokens_map.json", special)
        return folder
    # SDXL-style: the special tokens' options in added_tokens_decoder; textual inversion adds one
    decoder = {
        str(vocab[BOS]): added_token(BOS, True, special=True),
        str(vocab[EOS]): added_token(EOS, True, special=True),
    }
    if kind == "textual_inversion":
        decoder[str(len(vocab))] = added_token("<cat-toy>", True, special=False)
        write_json(folder, "added_tokens.json", {"<cat-toy>": len(vocab)})
    config = dict(
        add_prefix_space=False,
        added_tokens_decoder=decoder,
        bos_token=BOS,
        clean_up_tokenization_spaces=True,
        do_lower_case=True,
        eos_token=EOS,
        errors="replace",
        model_max_length=77,
        pad_token="!" if kind == "sdxl_pad_bang" else EOS,
        tokenizer_class="CLIPTokenizer",
        unk_token=EOS,
    )
    write_json(folder, "tokenizer_config.json", config)
    # transformers reads no special_tokens_map.json when added_tokens_decoder is present
    write_json(folder, "special_tokens_map.json", {"bos_token": added_token(BOS, False)})
    return folder


KINDS = ("saved", "saved_pad_bang", "sd15", "sd15_pad_bang", "sdxl_pad_bang", "textual_inversion")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_tokenizers")
    return {kind: make_folder(root / kind, kind) for kind in KINDS}


def reference_ids(folder, prompts) -> np.ndarray:
    from transformers import CLIPTokenizer

    ref = CLIPTokenizer.from_pretrained(folder)
    out = ref(prompts, padding="max_length", max_length=ref.model_max_length, truncation=True)
    return np.asarray(out.input_ids)


# --- parity -------------------------------------------------------------------------------


def test_merges_are_learned_and_used(folders):
    assert len(MERGES) >= 30 and sum(b.endswith("</w>") for _, b in MERGES) >= 10
    tok = ClipTokenizer.from_folder(folders["saved"])
    row = tok.encode(["a photo of a cat"])[0]
    words = row[1 : list(row).index(tok.eos_id)]
    assert len(words) < len("aphotoofacat") and (words >= 512).any()  # merged tokens in use


@pytest.mark.parametrize("kind", KINDS)
def test_ids_equal_transformers_clip_tokenizer(folders, kind):
    from transformers import CLIPTokenizer

    folder = folders[kind]
    ref = CLIPTokenizer.from_pretrained(folder)
    tok = ClipTokenizer.from_folder(folder)
    ours = tok.encode(PROMPTS)
    expected = reference_ids(folder, PROMPTS)
    assert ours.dtype == np.int32 and ours.shape == (len(PROMPTS), 77)
    differ = [PROMPTS[i] for i in np.nonzero((ours != expected).any(axis=1))[0]]
    assert not differ, f"{kind}: ids differ from CLIPTokenizer on {differ}"
    assert (tok.max_length, tok.vocab_size) == (ref.model_max_length, len(ref))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (
        ref.bos_token_id,
        ref.eos_token_id,
        ref.pad_token_id,
    )


def test_padding_truncation_and_special_tokens_in_a_prompt(folders):
    with open(os.path.join(folders["saved"], "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    tok = ClipTokenizer.from_folder(folders["saved"])
    bos, eos = vocab[BOS], vocab[EOS]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (bos, eos, eos)
    empty, spaces, special, long = tok.encode(["", "     ", "a <|endoftext|> cat", "x" * 300])
    np.testing.assert_array_equal(empty, [bos, eos] + [eos] * 75)
    np.testing.assert_array_equal(spaces, empty)
    np.testing.assert_array_equal(special[:5], [bos, vocab["a</w>"], eos, vocab["cat</w>"], eos])
    assert long[0] == bos and long[-1] == eos and (long[1:-1] == vocab["x"]).all()

    bang = ClipTokenizer.from_folder(folders["saved_pad_bang"])
    assert bang.pad_id == vocab["!"] != bang.eos_id  # the pad id is read from the config
    np.testing.assert_array_equal(bang.encode([""])[0], [bos, eos] + [vocab["!"]] * 75)


def test_max_length_and_defaults_come_from_the_folder(tmp_path):
    folder = str(tmp_path / "bare")
    vocab = write_vocab_and_merges(folder)  # no configs: CLIP's defaults, 77
    tok = ClipTokenizer.from_folder(folder)
    assert (tok.max_length, tok.bos_id, tok.eos_id, tok.pad_id) == (
        77,
        vocab[BOS],
        vocab[EOS],
        vocab[EOS],
    )
    assert tok.vocab_size == len(vocab)
    write_json(folder, "tokenizer_config.json", {"model_max_length": 8, "pad_token": "!"})
    tok = ClipTokenizer.from_folder(folder)
    rows = tok.encode(["astronaut riding a horse on the moon", "a"])
    assert rows.shape == (2, 8) and rows[0, -1] == vocab[EOS]
    np.testing.assert_array_equal(rows[1, 3:], [vocab["!"]] * 5)


# --- no torch, no transformers ------------------------------------------------------------


def test_runs_without_torch_or_transformers(folders):
    folder = folders["sd15_pad_bang"]
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["torch"] = None  # any torch import now fails
        from diffusax.data.clip_tokenizer import ClipTokenizer
        ids = ClipTokenizer.from_folder({folder!r}).encode({PROMPTS[:6]!r})
        assert "transformers" not in sys.modules, "transformers was imported"
        print(json.dumps(ids.tolist()))
        """
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ids = np.asarray(json.loads(run.stdout.strip().splitlines()[-1]))
    np.testing.assert_array_equal(ids, reference_ids(folder, PROMPTS[:6]))


# --- errors -------------------------------------------------------------------------------


def copy_folder(folders, tmp_path, kind="saved"):
    return shutil.copytree(folders[kind], tmp_path / "tokenizer")


def test_missing_folder_and_files_name_the_path(folders, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        ClipTokenizer.from_folder(missing)
    for name in ("merges.txt", "vocab.json"):
        folder = copy_folder(folders, tmp_path / name, kind="sd15")
        os.remove(folder / name)
        with pytest.raises(FileNotFoundError, match=re.escape(str(folder / name))):
            ClipTokenizer.from_folder(folder)


def test_a_tokenizer_json_only_folder_gives_the_same_ids(folders, tmp_path):
    """A transformers-5 save holds tokenizer.json, not vocab.json and merges.txt."""
    folder = copy_folder(folders, tmp_path / "fast_only", kind="saved_pad_bang")
    os.remove(folder / "vocab.json")
    os.remove(folder / "merges.txt")
    ours = ClipTokenizer.from_folder(folder).encode(PROMPTS)
    np.testing.assert_array_equal(ours, reference_ids(folders["saved_pad_bang"], PROMPTS))


@pytest.mark.parametrize(
    "name, text, problem",
    [
        ("vocab.json", '{"a": 0, ', "not readable JSON"),
        ("vocab.json", b"\xff\xfe{}", "not readable JSON"),
        ("vocab.json", '["a", "b"]', "must hold a JSON object"),
        ("vocab.json", "{}", "empty vocabulary"),
        ("vocab.json", '{"a": 0, "b": "1"}', "ids must be non-negative integers"),
        ("vocab.json", '{"a": 0, "b": 0}', "share id 0"),
        ("merges.txt", "#version: 0.2\nh o\nthree part line\n", "line 3"),
        ("merges.txt", "#version: 0.2\nqq zz\n", "do not form a BPE model"),
        ("tokenizer_config.json", '{"model_max_length": 1e30}', "model_max_length"),
        ("tokenizer_config.json", '{"pad_token": 7}', "'pad_token'"),
        ("tokenizer_config.json", "[1]", "must hold a JSON object"),
        ("special_tokens_map.json", "{bad", "not readable JSON"),
    ],
)
def test_bad_files_raise_value_errors_naming_the_file(folders, tmp_path, name, text, problem):
    folder = copy_folder(folders, tmp_path)
    mode = "wb" if isinstance(text, bytes) else "w"
    with open(folder / name, mode) as f:
        f.write(text)
    with pytest.raises(ValueError, match=re.escape(name)) as info:
        ClipTokenizer.from_folder(folder)
    assert problem in str(info.value)


def test_bad_prompts_name_their_index(folders):
    tok = ClipTokenizer.from_folder(folders["saved"])
    with pytest.raises(ValueError, match=r"prompt 2 is a int"):
        tok.encode(["a cat", "", 3])
    with pytest.raises(ValueError, match=r"prompt 0 is a NoneType"):
        tok.encode([None])
    with pytest.raises(ValueError, match=r"not one string"):
        tok.encode("a cat")
    assert tok.encode([]).shape == (0, 77)


def test_missing_tokenizers_library_says_how_to_install(folders, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match=r"pip install tokenizers"):
        ClipTokenizer.from_folder(folders["saved"])
