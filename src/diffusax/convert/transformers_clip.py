"""transformers `CLIPTextModel` checkpoints -> `diffusax.models.text.TextEncoder`.

Reads a local `save_pretrained` folder (config.json + model.safetensors, or a sharded
model.safetensors.index.json) with `safetensors.numpy`, so PyTorch is not needed. For Stable
Diffusion v1.x's text encoder (CLIP ViT-L/14), pass a pipeline download's `text_encoder/`:

    encoder = load_transformers_clip_text("stable-diffusion-v1-5/text_encoder")

Parameter names are transformers' own; checkpoints written by transformers < 5 prefix them with
`text_model.` (`text_model.encoder.layers.0.self_attn.q_proj.weight`), transformers 5 does not:
both load. The `position_ids` buffer older checkpoints store is ignored. Every other tensor
must be used exactly once and every model parameter set, with matching shapes, or one
ValueError lists everything that is wrong.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from diffusax.convert import common
from diffusax.models.text import ACTIVATIONS, TextEncoder

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PREFIX = "text_model."

# CLIPTextConfig's defaults (transformers 4.45 - 5.x), for fields a config.json leaves out.
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "eos_token_id": 49407,
}

# Fields with no effect on a frozen CLIPTextModel's forward pass: metadata, initialisation,
# training-only dropout, the special ids the tokenizer uses, the projection width of
# CLIPTextModelWithProjection (which `architectures` rules out), and PretrainedConfig's generic
# fields that transformers < 4.31 wrote out in full.
_IGNORED = {
    "_name_or_path",
    "architectures",
    "model_type",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "initializer_range",
    "initializer_factor",
    "attention_dropout",
    "dropout",
    "bos_token_id",
    "pad_token_id",
    "projection_dim",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "use_return_dict",
    "torchscript",
    "use_bfloat16",
    "tf_legacy_loss",
    "pruned_heads",
    "tie_word_embeddings",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "is_decoder",
    "cross_attention_hidden_size",
    "add_cross_attention",
    "tie_encoder_decoder",
    "id2label",
    "label2id",
    "problem_type",
    "tokenizer_class",
    "prefix",
    "sep_token_id",
    "decoder_start_token_id",
    "task_specific_params",
    "finetuning_task",
    # generation defaults older configs carry: no effect on an encoder's forward pass
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
}


def clip_text_kwargs_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Map a transformers CLIPTextConfig (config.json as a dict) to `TextEncoder(**kwargs)`.

    Raises ValueError naming any field or value the TextEncoder cannot represent.
    """
    config = dict(config)
    if config.get("model_type", "clip_text_model") != "clip_text_model":
        raise ValueError(
            f"unsupported model_type={config['model_type']!r}; only 'clip_text_model' (for a "
            f"whole CLIP model, pass its text_config or a CLIPTextModel folder)"
        )
    known = set(_DEFAULTS) | _IGNORED
    unknown = sorted(k for k in config if k not in known)
    if unknown:
        raise ValueError(f"unsupported CLIPTextConfig fields: {unknown}")
    architectures = config.get("architectures") or ["CLIPTextModel"]
    if list(architectures) != ["CLIPTextModel"]:
        raise ValueError(
            f"unsupported architectures={architectures!r}; only ['CLIPTextModel'] (a text "
            f"projection or a vision tower is not part of the TextEncoder)"
        )
    cfg = {**_DEFAULTS, **{k: v for k, v in config.items() if k in _DEFAULTS}}
    for field in _DEFAULTS:
        if field in ("hidden_act", "layer_norm_eps"):
            continue
        value, least = cfg[field], 0 if field == "eos_token_id" else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            kind = "a non-negative" if least == 0 else "a positive"
            raise ValueError(f"unsupported {field}={value!r}: must be {kind} int")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ValueError(
            f"unsupported num_attention_heads={cfg['num_attention_heads']}: it must divide "
            f"hidden_size={cfg['hidden_size']}"
        )
    if cfg["hidden_act"] not in ACTIVATIONS:
        raise ValueError(
            f"unsupported hidden_act={cfg['hidden_act']!r}; supported: {list(ACTIVATIONS)}"
        )
    eps = cfg["layer_norm_eps"]
    if not isinstance(eps, int | float) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"unsupported layer_norm_eps={eps!r}: must be a positive number")
    return {
        "vocab_size": cfg["vocab_size"],
        "width": cfg["hidden_size"],
        "layers": cfg["num_hidden_layers"],
        "heads": cfg["num_attention_heads"],
        "mlp_dim": cfg["intermediate_size"],
        "context_length": cfg["max_position_embeddings"],
        "eos_token_id": cfg["eos_token_id"],
        "activation": cfg["hidden_act"],
        "layer_norm_eps": float(eps),
    }


_RENAME = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def transformers_name(path: tuple) -> str:
    """The transformers state-dict key (unprefixed) of one of our parameters, e.g.
    ('encoder', 'layers', 0, 'self_attn', 'q_proj', 'kernel')
    -> 'encoder.layers.0.self_attn.q_proj.weight'."""
    return common.dotted_name(path, _RENAME)


def _linear_layout(array: np.ndarray, leaf: str, target_ndim: int) -> np.ndarray:
    """torch Linear weights (O, I) -> our (I, O) kernels; everything else as it is."""
    return array.T if leaf == "kernel" and array.ndim == 2 else array


def _strip_prefix(state_dict: Mapping[str, np.ndarray]) -> tuple[dict, list[str]]:
    """(tensors under unprefixed names, names that clash once the prefix is dropped)."""
    tensors: dict[str, np.ndarray] = {}
    clashes = []
    for key, value in state_dict.items():
        name = key.removeprefix(PREFIX)
        if name in tensors:
            clashes.append(key)
        tensors[name] = value
    return tensors, clashes


def load_clip_text_params(model: TextEncoder, state_dict: Mapping[str, np.ndarray]) -> None:
    """Copy a transformers CLIPTextModel state dict (numpy arrays) into `model` in place.

    Keys may carry the `text_model.` prefix (transformers < 5, and `state_dict()` of
    CLIPTextModel there) or not (transformers 5); torch Linear weights (O, I) become our
    (I, O) kernels. Works on a concrete or an abstract (`nnx.eval_shape`) model. Raises one
    ValueError listing every unused tensor, parameter without a tensor and shape mismatch.
    """
    tensors, clashes = _strip_prefix(state_dict)
    for key in ("embeddings.position_ids",):  # a buffer (arange), not a parameter
        tensors.pop(key, None)
    duplicates = [f"{k} (duplicate)" for k in clashes]
    common.load_tensors(
        model, tensors, transformers_name, _linear_layout, "transformers CLIPTextModel", duplicates
    )


def read_folder(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json as a dict, the state dict as numpy) of a transformers folder:
    model.safetensors, the shards model.safetensors.index.json lists, or the PyTorch
    pytorch_model.bin (read with torch, which must then be installed: ``common.read_folder``).

    A FileNotFoundError names the missing file.
    """
    legacy = ("pytorch_model.bin", "pytorch_model.bin")  # (the file, how the message names it)
    return common.read_folder(
        path, "CLIPTextModel", weights_name=WEIGHTS_NAME, index_name=INDEX_NAME, legacy_bin=legacy
    )


def load_transformers_clip_text(
    path: str | os.PathLike, *, dtype=None, rngs: nnx.Rngs | None = None
) -> TextEncoder:
    """Build a TextEncoder from a local transformers `save_pretrained` folder with its weights.

    The model is built abstractly and every parameter then set from the checkpoint, so no
    random initialisation runs; `rngs` is accepted for symmetry with the constructors and not
    needed. `dtype` is the computation dtype; parameters stay float32.
    """
    del rngs  # every parameter comes from the checkpoint
    folder = read_folder(path)
    return common.load_folder(
        folder, clip_text_kwargs_from_config, TextEncoder, load_clip_text_params, dtype=dtype
    )
