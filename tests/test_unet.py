"""DDPM U-Net: parameter count, parity with diffusers' UNet2DModel, dropout, jit, bad input.

The oracle is a real diffusers UNet2DModel with every parameter randomised (diffusers leaves
GroupNorm at scale 1 / bias 0, which would hide a swapped scale and bias), saved with
save_pretrained and loaded back with our converter. Torch is NCHW, we are NHWC.
"""

from __future__ import annotations

import functools
import inspect
import math
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from diffusers.models.embeddings import get_timestep_embedding
from flax import nnx

from diffusax.convert.diffusers_unet import (
    diffusers_name,
    load_diffusers_unet,
    load_unet_params,
    unet_kwargs_from_diffusers,
)
from diffusax.models.layers import dropout, timestep_embedding
from diffusax.models.unet import UNet, count_params

# The DDPM CIFAR-10 model as diffusers' google/ddpm-cifar10-32 config describes it.
DDPM_CIFAR10 = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 256, 256),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 2,
    "attention_head_dim": None,
    "norm_eps": 1e-6,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
}

# Small configs: TF-style padding with one head; symmetric padding, 4 heads, class labels.
SMALL = {
    "uncond": {
        "sample_size": 16,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (32, 64),
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
        "layers_per_block": 2,
        "attention_head_dim": None,
        "norm_num_groups": 8,
        "norm_eps": 1e-6,
        "downsample_padding": 0,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
    },
    "class_cond": {
        "sample_size": 16,
        "in_channels": 2,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "down_block_types": ("AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D"),
        "layers_per_block": 1,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
        "num_class_embeds": 5,
    },
}

# A tiny model for the tests that do not need torch.
TINY = dict(
    in_channels=3,
    out_channels=3,
    ch=16,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(4,),
    resolution=8,
    norm_groups=4,
    dropout=0.5,
)


def randomise_torch(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a non-trivial random value with O(1) activations."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1:  # biases, norm scales (around 1) and norm shifts
                offset = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(offset + 0.2 * noise)
            else:
                p.copy_(noise / math.sqrt(math.prod(p.shape[1:])))
    return model.eval()


@functools.cache
def torch_case(name: str):
    """(torch model, our model loaded through save_pretrained -> load_diffusers_unet)."""
    config = DDPM_CIFAR10 if name == "ddpm_cifar10" else SMALL[name]
    torch.manual_seed(0)
    reference = randomise_torch(UNet2DModel(**config))
    with tempfile.TemporaryDirectory() as path:
        reference.save_pretrained(path)
        ours = load_diffusers_unet(path)
    return reference, ours


def case_inputs(name: str, batch: int = 2):
    config = DDPM_CIFAR10 if name == "ddpm_cifar10" else SMALL[name]
    rng = np.random.default_rng(1)
    size = config["sample_size"]
    x = rng.standard_normal((batch, size, size, config["in_channels"]), dtype=np.float32)
    t = np.array([0, 999, 500, 17][:batch])
    n = config.get("num_class_embeds")
    y = None if n is None else np.array([n - 1, 2, 0, 3][:batch])  # n - 1: our null label
    return x, t, y


def torch_forward(model: UNet2DModel, x, t, y) -> np.ndarray:
    with torch.no_grad():
        out = model(
            torch.from_numpy(x.transpose(0, 3, 1, 2)),  # NHWC -> NCHW
            torch.from_numpy(t),
            class_labels=None if y is None else torch.from_numpy(y),
        ).sample
    return out.numpy().transpose(0, 2, 3, 1)  # NCHW -> NHWC


@functools.cache
def jit_apply(model: UNet):
    """model(x, t, y, dropout_key=key) jitted the functional way; cached to compile once."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, x, t, y, key: nnx.merge(graphdef, state)(x, t, y, dropout_key=key))
    return functools.partial(fn, state)


def assert_parity(ours: np.ndarray, reference: np.ndarray):
    scale = np.abs(reference).max()
    assert scale > 0.1, "degenerate reference output"
    assert np.abs(ours - reference).max() < 1e-4 * scale


def random_unet(seed: int = 0, **kwargs) -> UNet:
    """A UNet with every parameter random (our init zeroes the output convs).

    Built abstractly and filled from numpy: jitted threefry sampling of every shape would
    take most of a minute to compile on CPU.
    """
    model = nnx.eval_shape(lambda: UNet(**kwargs, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            shape = var.get_value().shape
            noise = rng.standard_normal(shape, dtype=np.float32)
            if path[-1] == "scale":
                value = 1.0 + 0.2 * noise
            elif len(shape) == 1:
                value = 0.2 * noise
            else:
                value = noise / math.sqrt(math.prod(shape[:-1]))
            var.set_value(jnp.asarray(value))
    return model


@functools.cache
def tiny_model(**overrides) -> UNet:
    return random_unet(**{**TINY, **overrides})


# ---------------------------------------------------------------- embeddings and dropout


@pytest.mark.parametrize("flip,shift,dim", [(False, 1, 128), (True, 0, 33), (True, 1, 64)])
def test_timestep_embedding_matches_diffusers(flip, shift, dim):
    t = np.array([0.0, 1.0, 17.5, 999.0], np.float32)
    ours = timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip, freq_shift=shift)
    ref = get_timestep_embedding(
        torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift
    ).numpy()
    # Angles up to 999 rad carry float32 rounding of ~1e-4; a wrong formula is off by O(1).
    np.testing.assert_allclose(np.asarray(ours), ref, atol=3e-4)
    half = dim // 2  # at t=0: sin = 0, cos = 1
    cos0 = ours[0, :half] if flip else ours[0, half : 2 * half]
    np.testing.assert_array_equal(np.asarray(cos0), 1.0)


def test_dropout_is_unbiased_with_the_right_rate():
    rate, n = 0.3, 1_000_000
    out = np.asarray(dropout(jnp.ones(n), rate, jax.random.key(0)))
    keep_sd = math.sqrt(rate * (1 - rate) / n)  # fraction dropped ~ Binomial(n, rate) / n
    assert abs((out == 0).mean() - rate) < 5 * keep_sd
    mean_sd = math.sqrt(rate / (1 - rate) / n)  # per element var = rate / (1 - rate)
    assert abs(out.mean() - 1.0) < 5 * mean_sd
    np.testing.assert_array_equal(np.asarray(dropout(jnp.ones(3), rate, None)), 1.0)


# ---------------------------------------------------------------- parameter count


def test_ddpm_cifar10_parameter_count():
    # Our defaults are the DDPM CIFAR-10 model, i.e. google/ddpm-cifar10-32's config
    # (whose dropout is 0.0: an inference config; the paper trained with 0.1).
    kwargs = unet_kwargs_from_diffusers(DDPM_CIFAR10)
    defaults = {
        name: p.default
        for name, p in inspect.signature(UNet.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    assert {k: v for k, v in kwargs.items() if k in defaults} == {
        **{k: defaults[k] for k in kwargs if k in defaults},
        "dropout": 0.0,
    }
    reference, ours = torch_case("ddpm_cifar10")
    assert count_params(ours) == sum(p.numel() for p in reference.parameters())
    assert round(count_params(ours) / 1e6, 1) == 35.7  # Ho et al. 2020, CIFAR-10 model


# ---------------------------------------------------------------- parity with diffusers


@pytest.mark.parametrize("name", ["uncond", "class_cond"])
def test_parity_with_diffusers_small(name):
    reference, ours = torch_case(name)
    x, t, y = case_inputs(name)
    assert_parity(np.asarray(jit_apply(ours)(x, t, y, None)), torch_forward(reference, x, t, y))


def test_parity_with_diffusers_ddpm_cifar10():
    reference, ours = torch_case("ddpm_cifar10")
    x, t, y = case_inputs("ddpm_cifar10", batch=1)
    assert_parity(np.asarray(jit_apply(ours)(x, t, y, None)), torch_forward(reference, x, t, y))


class JitAndEagerAgree(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_diffusers(self):
        reference, ours = torch_case("class_cond")
        x, t, y = case_inputs("class_cond")
        graphdef, state = nnx.split(ours)
        apply = self.variant(lambda state, x, t, y: nnx.merge(graphdef, state)(x, t, y))
        assert_parity(np.asarray(apply(state, x, t, y)), torch_forward(reference, x, t, y))


def test_labels_change_output_and_none_means_null():
    _, ours = torch_case("class_cond")
    x, t, _ = case_inputs("class_cond")
    apply = jit_apply(ours)
    null = np.full(2, ours.num_classes)
    np.testing.assert_array_equal(apply(x, t, None, None), apply(x, t, null, None))
    assert not np.allclose(apply(x, t, np.array([0, 1]), None), apply(x, t, null, None))


# ---------------------------------------------------------------- converter


def test_converter_accepts_legacy_attention_names_and_checks_every_tensor():
    reference, ours = torch_case("uncond")
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    legacy = {
        k.replace("to_q.", "query.").replace("to_out.0.", "proj_attn."): v for k, v in state.items()
    }
    assert legacy.keys() != state.keys()
    model = nnx.eval_shape(
        lambda: UNet(**unet_kwargs_from_diffusers(SMALL["uncond"]), rngs=nnx.Rngs(0))
    )
    load_unet_params(model, legacy)
    for (path, a), (_, b) in zip(nnx.iter_graph(model), nnx.iter_graph(ours), strict=True):
        if isinstance(a, nnx.Param):
            np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(path))

    name = diffusers_name(("down_levels", 1, "attn_blocks", 0, "query", "kernel"))
    assert name == "down_blocks.1.attentions.0.to_q.weight"
    missing = {k: v for k, v in state.items() if k != "conv_out.bias"}
    with pytest.raises(ValueError, match=r"missing from the checkpoint: \['conv_out.bias'\]"):
        load_unet_params(model, missing)
    with pytest.raises(ValueError, match=r"not used by the model: \['extra.weight'\]"):
        load_unet_params(model, {**state, "extra.weight": np.zeros(3)})
    wrong = {**state, "conv_in.weight": np.zeros((32, 3, 5, 5), np.float32)}
    with pytest.raises(ValueError, match=r"shape mismatches.*conv_in\.weight"):
        load_unet_params(model, wrong)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D")}, "down_block_types"),
        ({"up_block_types": ("UpBlock2D", "UpBlock2D")}, "attention must be mirrored"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        ({"downsample_padding": 2}, "downsample_padding"),
        ({"block_out_channels": (32, 48)}, "block_out_channels"),
        ({"cross_attention_dim": 8}, "unsupported UNet2DModel config fields"),
        ({"_class_name": "UNet2DConditionModel"}, "_class_name"),
    ],
)
def test_converter_rejects_unsupported_configs(change, match):
    with pytest.raises(ValueError, match=match):
        unet_kwargs_from_diffusers({**SMALL["uncond"], **change})


def test_load_diffusers_unet_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_diffusers_unet(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_diffusers_unet(tmp_path)


# ---------------------------------------------------------------- our own behaviour


def test_output_and_dropout():
    reference, model = torch_case("class_cond")  # dropout=0.0 in its config
    x, t, y = case_inputs("class_cond")
    apply = jit_apply(model)
    out = apply(x, t, y, None)
    chex.assert_shape(out, (*x.shape[:-1], 4))
    chex.assert_type(out, jnp.float32)
    np.testing.assert_array_equal(apply(x, t, y, jax.random.key(1)), out)  # rate 0: no effect

    # The same parameters with dropout 0.5: a key switches dropout on, each key its own mask.
    config = unet_kwargs_from_diffusers(SMALL["class_cond"])
    dropped = nnx.eval_shape(lambda: UNet(**{**config, "dropout": 0.5}, rngs=nnx.Rngs(0)))
    load_unet_params(dropped, {k: v.numpy() for k, v in reference.state_dict().items()})
    apply = jit_apply(dropped)
    a, b = apply(x, t, y, jax.random.key(1)), apply(x, t, y, jax.random.key(2))
    assert not np.allclose(a, out, atol=1e-3) and not np.allclose(a, b, atol=1e-3)
    np.testing.assert_array_equal(a, apply(x, t, y, jax.random.key(1)))


def test_remat_changes_neither_output_nor_gradient():
    small = {**TINY, "ch_mult": (1,), "attn_resolutions": (8,), "dropout": 0.0}
    x = jax.random.normal(jax.random.key(0), (2, 8, 16, 3))  # non-square works too
    t = jnp.array([3, 300])

    def loss_and_grad(remat: bool):
        graphdef, state = nnx.split(random_unet(**small, remat=remat))

        def loss(state):
            return jnp.sum(nnx.merge(graphdef, state)(x, t) ** 2)

        return jax.jit(jax.value_and_grad(loss))(state)

    # Same maths, different summation order: equal to float32 rounding.
    value, grad = loss_and_grad(True)
    chex.assert_trees_all_close((value, grad), loss_and_grad(False), rtol=1e-4, atol=1e-5)
    assert value > 1.0  # a non-degenerate loss


def test_bad_inputs_raise_clear_errors():
    model = tiny_model()
    x, t = jnp.zeros((2, 8, 8, 3)), jnp.array([1, 2])
    with pytest.raises(ValueError, match="channels"):
        model(jnp.zeros((2, 3, 8, 8)), t)  # NCHW by mistake
    with pytest.raises(ValueError, match="multiple of 2"):
        model(jnp.zeros((2, 7, 8, 3)), t)
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.zeros((8, 8, 3)), t)
    with pytest.raises(ValueError, match="t must have shape"):
        model(x, jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match="num_classes=None"):
        model(x, t, jnp.array([0, 1]))
    with pytest.raises(ValueError, match="attn_resolutions"):
        UNet(**{**TINY, "attn_resolutions": (16,)}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="norm_groups"):
        nnx.eval_shape(lambda: UNet(**{**TINY, "norm_groups": 5}, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="resolution"):
        UNet(**{**TINY, "resolution": 9}, rngs=nnx.Rngs(0))
    _, cond = torch_case("class_cond")
    with pytest.raises(ValueError, match="integer labels"):
        cond(jnp.zeros((2, 16, 16, 2)), t, jnp.array([0.0, 1.0]))
