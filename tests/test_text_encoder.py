"""TextEncoder (CLIP text architecture): parity with transformers' CLIPTextModel through the
converter, both pooling conventions, padding masks, the config mapping and bad input.

The oracle is a tiny randomly initialised `transformers.CLIPTextModel` with every parameter
randomised (transformers initialises layer norms to (1, 0) and biases to zero, which would hide
a swapped weight/bias), saved with save_pretrained and loaded back with our converter.
"""

from __future__ import annotations

import functools
import math
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import CLIPTextConfig, CLIPTextModel

from diffusax.convert.transformers_clip import (
    clip_text_kwargs_from_config,
    load_clip_text_params,
    load_transformers_clip_text,
)
from diffusax.models.text import TextEncoder, check_tokens

VOCAB, EOS = 64, 60
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=16,
    bos_token_id=0,
    pad_token_id=1,
)

# Stable Diffusion v1.x's text_encoder/config.json (CLIP ViT-L/14, saved by transformers 4.22
# with the legacy eos_token_id=2).
SD_V1_TEXT_ENCODER = {
    "_name_or_path": "openai/clip-vit-large-patch14",
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0",
    "vocab_size": 49408,
}


def randomise_torch(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random, with O(1) activations."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 2:  # linear weights, embedding tables
                p.copy_(noise / math.sqrt(p.shape[-1]))
            else:  # biases; layer-norm scales around 1
                p.copy_(0.2 * noise + (1.0 if "norm" in name and name.endswith("weight") else 0))
    return model.eval()


@functools.cache
def torch_case(eos: int, activation: str = "quick_gelu"):
    """(torch CLIPTextModel, our TextEncoder loaded from its save_pretrained folder)."""
    torch.manual_seed(0)
    config = CLIPTextConfig(**TINY, eos_token_id=eos, hidden_act=activation)
    reference = randomise_torch(CLIPTextModel(config))
    with tempfile.TemporaryDirectory() as path:
        reference.save_pretrained(path)
        ours = load_transformers_clip_text(path)
    return reference, ours


def inputs(padding: str):
    """(tokens (3, 12), attention mask or None). Row 0 ends with its end-of-text token at 7,
    row 2 has two (4 and 9: the first one pools). Id 2 (the legacy eos_token_id) and, in row 0,
    id 63 > EOS come first, so the legacy rule (largest id) and the first-match rule pick
    different positions under either eos_token_id."""
    tokens = np.random.default_rng(0).integers(3, EOS, (3, 12))
    tokens[:, 0] = 0  # start of text
    tokens[0, 7] = tokens[1, 11] = tokens[2, 4] = tokens[2, 9] = EOS
    tokens[:, 2] = 2
    tokens[0, 1] = VOCAB - 1
    if padding == "none":
        return tokens, None
    mask = np.ones((3, 12), np.int64)
    mask[0, 8:] = mask[2, 5:] = 0  # right padding after the end-of-text token
    if padding == "left":
        mask[1, :3] = 0  # positions 0..2 of row 1 see no real token
    return tokens, mask


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, tokens, mask):
    return nnx.merge(graphdef, state)(tokens, mask)


def jitted(model: TextEncoder):
    """model(tokens, mask) jitted; one compilation per architecture and input signature."""
    return functools.partial(_apply, *nnx.split(model))


def torch_forward(model, tokens, mask):
    with torch.no_grad():
        out = model(
            torch.from_numpy(tokens),
            attention_mask=None if mask is None else torch.from_numpy(mask),
        )
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


# ---------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("eos", [EOS, 2], ids=["eos", "legacy_eos2"])
def test_parity_with_transformers(eos, padding):
    reference, ours = torch_case(eos)
    tokens, mask = inputs(padding)
    hidden_ref, pooled_ref = torch_forward(reference, tokens, mask)
    hidden, pooled = jitted(ours)(tokens, None if mask is None else mask.astype(bool))
    assert hidden.dtype == pooled.dtype == jnp.float32
    assert hidden.shape == (3, 12, 32) and pooled.shape == (3, 32)
    assert np.abs(hidden_ref).max() > 1.0, "degenerate reference output"
    # Max |diff| seen: 1.2e-6 (hidden, |values| up to 3.3) and 1.0e-6 (pooled).
    np.testing.assert_allclose(hidden, hidden_ref, atol=5e-6, rtol=0)
    np.testing.assert_allclose(pooled, pooled_ref, atol=5e-6, rtol=0)
    # The pooled row is the hidden state at the rule's position.
    if eos == 2:
        expected = tokens.argmax(-1)
    else:
        expected = (tokens == EOS).argmax(-1)
    np.testing.assert_array_equal(pooled, np.asarray(hidden)[np.arange(3), expected])
    if padding == "right":  # the mask bites: padded keys change the padded positions
        unmasked, _ = jitted(ours)(tokens, None)
        assert np.abs(np.asarray(unmasked)[0, 8:] - hidden[0, 8:]).max() > 1e-3
        np.testing.assert_allclose(unmasked[0, :8], hidden[0, :8], atol=1e-6)


def test_parity_with_exact_gelu_and_integer_mask():
    reference, ours = torch_case(EOS, "gelu")
    tokens, mask = inputs("right")
    hidden_ref, pooled_ref = torch_forward(reference, tokens, mask)
    hidden, pooled = jitted(ours)(tokens, mask)  # integer 0/1 mask
    np.testing.assert_allclose(hidden, hidden_ref, atol=5e-6, rtol=0)
    np.testing.assert_allclose(pooled, pooled_ref, atol=5e-6, rtol=0)


def test_bfloat16_compute_stays_close():
    reference, ours = torch_case(EOS)
    tokens, _ = inputs("none")
    _, state = nnx.split(ours)
    kwargs = clip_text_kwargs_from_config(reference.config.to_dict())
    half = nnx.eval_shape(lambda: TextEncoder(**kwargs, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    nnx.update(half, state)
    hidden, pooled = jitted(half)(tokens, None)
    assert hidden.dtype == pooled.dtype == jnp.float32
    full, _ = jitted(ours)(tokens, None)
    assert np.abs(np.asarray(hidden) - np.asarray(full)).max() < 0.1


# ---------------------------------------------------------------- the converter


def prefixed_state(reference) -> dict[str, np.ndarray]:
    """The state dict as transformers < 5 names it: `text_model.` prefix, position_ids buffer."""
    state = {f"text_model.{k}": v.numpy() for k, v in reference.state_dict().items()}
    state["text_model.embeddings.position_ids"] = np.arange(16)[None]
    return state


def abstract_encoder(eos: int = EOS) -> TextEncoder:
    kwargs = clip_text_kwargs_from_config({**TINY, "eos_token_id": eos})
    return nnx.eval_shape(lambda: TextEncoder(**kwargs, rngs=nnx.Rngs(0)))


def test_in_memory_prefixed_state_dict_loads_the_same():
    reference, ours = torch_case(EOS)
    model = abstract_encoder()
    load_clip_text_params(model, prefixed_state(reference))
    tokens, _ = inputs("none")
    for a, b in zip(jitted(model)(tokens, None), jitted(ours)(tokens, None)):
        np.testing.assert_array_equal(a, b)


def test_converter_checks_every_tensor():
    reference, _ = torch_case(EOS)
    state = prefixed_state(reference)
    missing = {k: v for k, v in state.items() if k != "text_model.final_layer_norm.bias"}
    with pytest.raises(ValueError, match=r"missing from the checkpoint: \['final_layer_norm.bias"):
        load_clip_text_params(abstract_encoder(), missing)
    extra = {**state, "text_model.text_projection.weight": np.zeros((8, 32), np.float32)}
    with pytest.raises(ValueError, match=r"not used by the model: \['text_projection.weight'\]"):
        load_clip_text_params(abstract_encoder(), extra)
    wrong = {**state, "text_model.encoder.layers.1.mlp.fc1.weight": np.zeros((32, 64))}
    with pytest.raises(ValueError, match=r"shape mismatches.*layers.1.mlp.fc1.weight"):
        load_clip_text_params(abstract_encoder(), wrong)
    both = {**state, "final_layer_norm.weight": np.ones(32, np.float32)}
    with pytest.raises(ValueError, match=r"final_layer_norm.weight \(duplicate\)"):
        load_clip_text_params(abstract_encoder(), both)


def test_sd_v1_config_maps_to_clip_vit_l14():
    assert clip_text_kwargs_from_config(SD_V1_TEXT_ENCODER) == {
        "vocab_size": 49408,
        "width": 768,
        "layers": 12,
        "heads": 12,
        "mlp_dim": 3072,
        "context_length": 77,
        "eos_token_id": 2,  # legacy: pools at the largest id (49407, end of text)
        "activation": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }


@pytest.mark.parametrize(
    "change,match",
    [
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"model_type": "clip"}, "model_type"),
        ({"architectures": ["CLIPTextModelWithProjection"]}, "architectures"),
        ({"position_embedding_type": "rope"}, "position_embedding_type"),
        ({"num_attention_heads": 5}, "num_attention_heads"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps"),
        ({"eos_token_id": None}, "eos_token_id"),
    ],
)
def test_converter_rejects_unsupported_configs(change, match):
    with pytest.raises(ValueError, match=match):
        clip_text_kwargs_from_config({**SD_V1_TEXT_ENCODER, **change})


def test_load_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_transformers_clip_text(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(
        FileNotFoundError, match=r"no model\.safetensors \(nor pytorch_model\.bin\)"
    ):
        load_transformers_clip_text(tmp_path)


def test_a_pytorch_bin_folder_loads_as_its_safetensors_twin(tmp_path):
    """A folder saved as a PyTorch pickle (pytorch_model.bin, as older SD downloads hold) loads
    through torch into the same parameters as the safetensors folder."""
    reference, ours = torch_case(EOS)
    reference.config.save_pretrained(tmp_path)  # config.json
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")  # the legacy format
    from_bin = load_transformers_clip_text(tmp_path)
    for a, b in zip(jax.tree.leaves(nnx.state(from_bin)), jax.tree.leaves(nnx.state(ours))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------- bad input


def test_bad_inputs_name_the_argument():
    _, ours = torch_case(EOS)
    tokens, _ = inputs("none")
    with pytest.raises(ValueError, match="tokens must be"):
        ours(jnp.asarray(tokens, jnp.float32))
    with pytest.raises(ValueError, match="tokens must be"):
        ours(jnp.asarray(tokens[0]))
    with pytest.raises(ValueError, match=r"tokens has length 17.*context_length=16"):
        ours(jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match="mask must have the shape"):
        ours(jnp.asarray(tokens), jnp.ones((3, 11), bool))
    with pytest.raises(ValueError, match="mask must be bool"):
        ours(jnp.asarray(tokens), jnp.ones((3, 12), jnp.float32))
    with pytest.raises(ValueError, match="tokens must be"):  # raised while tracing, too
        jax.jit(lambda t: ours(t))(jnp.zeros((3,), jnp.int32))
    # Ids cannot be checked under jit; check_tokens does it on the host.
    np.testing.assert_array_equal(ours.check_tokens(tokens), tokens)
    bad = tokens.copy()
    bad[1, 5] = VOCAB
    with pytest.raises(ValueError, match=r"id 64 at \[1, 5\].*vocab_size=64"):
        ours.check_tokens(bad)
    with pytest.raises(ValueError, match=r"id -1 at \[0, 0\]"):
        check_tokens(np.full((1, 2), -1), vocab_size=VOCAB)
    with pytest.raises(ValueError, match="context_length=16"):
        ours.check_tokens(np.zeros((1, 17), np.int64))


@pytest.mark.parametrize(
    "change,match",
    [
        ({"heads": 5}, "heads=5 must divide width"),
        ({"activation": "relu"}, "activation"),
        ({"context_length": 0}, "context_length"),
        ({"layer_norm_eps": -1.0}, "layer_norm_eps"),
    ],
)
def test_constructor_rejects_bad_arguments(change, match):
    kwargs = clip_text_kwargs_from_config({**TINY, "eos_token_id": EOS}) | change
    with pytest.raises(ValueError, match=match):
        TextEncoder(**kwargs, rngs=nnx.Rngs(0))
