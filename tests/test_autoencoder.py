"""KL autoencoder: parameter count, parity with diffusers' AutoencoderKL, latents, bad input.

The oracle is a real diffusers AutoencoderKL with every parameter randomised (diffusers leaves
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
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from flax import nnx

from diffusax.convert.diffusers_vae import (
    diffusers_name,
    load_diffusers_vae,
    load_vae_params,
    vae_kwargs_from_diffusers,
)
from diffusax.models.autoencoder import AutoencoderKL, DiagonalGaussian, count_params

# Stable Diffusion's VAE, as the stabilityai/sd-vae-ft-ema / ft-mse config.json describes it.
SD_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 256,
}

SMALL = {
    # The SD layout, shrunk.
    "sd_like": {
        "block_out_channels": (32, 64),
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "latent_channels": 4,
        "sample_size": 16,
    },
    # The switches newer VAEs use (no quant convs, a shift), no mid attention, 3 levels.
    "variant": {
        "in_channels": 2,
        "out_channels": 1,
        "block_out_channels": (16, 32, 32),
        "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3,
        "layers_per_block": 2,
        "norm_num_groups": 4,
        "latent_channels": 3,
        "sample_size": 16,
        "scaling_factor": 1.5,
        "shift_factor": 0.25,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": False,
    },
}


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
    """(torch model, our model loaded through save_pretrained -> load_diffusers_vae)."""
    torch.manual_seed(0)
    reference = randomise_torch(TorchAutoencoderKL(**SMALL[name]))
    with tempfile.TemporaryDirectory() as path:
        reference.save_pretrained(path)
        ours = load_diffusers_vae(path)
    return reference, ours


def images(name: str, batch: int = 2, size: int = 16) -> np.ndarray:
    channels = SMALL[name].get("in_channels", 3)
    rng = np.random.default_rng(1)
    return rng.uniform(-1, 1, (batch, size, size, channels)).astype(np.float32)


def latents(name: str, batch: int = 2, size: int = 4) -> np.ndarray:
    rng = np.random.default_rng(2)
    return rng.standard_normal((batch, size, size, SMALL[name]["latent_channels"]), np.float32)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


@functools.cache
def jitted(model: AutoencoderKL, method: str):
    """model.<method>(*args) jitted the functional way; cached so each compiles once."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, *args: getattr(nnx.merge(graphdef, state), method)(*args))
    return functools.partial(fn, state)


def assert_close(ours, expected, rel: float = 1e-5):
    """Equal to float32 rounding, relative to the largest entry."""
    expected = np.asarray(expected)
    assert np.abs(np.asarray(ours) - expected).max() <= rel * np.abs(expected).max()


def assert_parity(ours, reference: np.ndarray):
    scale = np.abs(reference).max()
    assert scale > 0.1, "degenerate reference output"
    assert np.abs(np.asarray(ours) - reference).max() < 1e-4 * scale


# ---------------------------------------------------------------- parameter count


def test_sd_vae_parameter_count_and_defaults():
    kwargs = vae_kwargs_from_diffusers(SD_VAE)
    defaults = {
        name: p.default
        for name, p in inspect.signature(AutoencoderKL.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    assert kwargs == {k: defaults[k] for k in kwargs}  # our defaults are the SD VAE
    ours = nnx.eval_shape(lambda: AutoencoderKL(rngs=nnx.Rngs(0)))  # no allocation
    with torch.device("meta"):  # nor on the torch side
        config = {k: v for k, v in SD_VAE.items() if not k.startswith("_")}
        reference = TorchAutoencoderKL(**config)
    assert count_params(ours) == sum(p.numel() for p in reference.parameters())
    assert round(count_params(ours) / 1e6, 2) == 83.65


# ---------------------------------------------------------------- parity with diffusers


def test_encoder_moments_match_diffusers():
    reference, ours = torch_case("sd_like")
    x = images("sd_like")
    with torch.no_grad():
        dist = reference.encode(nchw(x)).latent_dist
    q = jitted(ours, "encode")(x)
    chex.assert_shape(q.mean, (2, 8, 8, 4))
    assert_parity(q.mean, nhwc(dist.mean))
    assert_parity(q.logvar, nhwc(dist.logvar))


def test_decoder_matches_diffusers():
    reference, ours = torch_case("sd_like")
    z = latents("sd_like")
    with torch.no_grad():
        expected = nhwc(reference.decode(nchw(z)).sample)
    out = jitted(ours, "decode")(z)
    chex.assert_shape(out, (2, 8, 8, 3))
    chex.assert_type(out, jnp.float32)
    assert_parity(out, expected)


def test_variant_reconstruction_matches_diffusers():
    reference, ours = torch_case("variant")
    assert ours.quant_conv is None and ours.encoder.mid.attn is None
    assert (ours.scaling_factor, ours.shift_factor) == (1.5, 0.25)
    x = images("variant", size=12)  # any multiple of f = 4, not only sample_size
    with torch.no_grad():
        expected = nhwc(reference(nchw(x), sample_posterior=False).sample)
    out = jitted(ours, "__call__")(x)
    chex.assert_shape(out, (2, 12, 12, 1))
    assert_parity(out, expected)


class JitAndEagerAgree(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_reconstruction_matches_diffusers(self):
        reference, ours = torch_case("sd_like")
        x = images("sd_like", batch=1)
        with torch.no_grad():
            expected = nhwc(reference(nchw(x), sample_posterior=False).sample)
        graphdef, state = nnx.split(ours)
        apply = self.variant(lambda state, x: nnx.merge(graphdef, state)(x))
        assert_parity(apply(state, x), expected)


def test_bfloat16_compute_stays_close_and_returns_float32():
    _, ours = torch_case("sd_like")
    state = nnx.state(ours)
    bf16 = nnx.eval_shape(
        lambda: AutoencoderKL(
            **vae_kwargs_from_diffusers(SMALL["sd_like"]), dtype=jnp.bfloat16, rngs=nnx.Rngs(0)
        )
    )
    nnx.update(bf16, state)
    assert jax.tree.leaves(nnx.state(bf16))[0].dtype == jnp.float32  # params stay float32
    z = latents("sd_like")
    out = jitted(bf16, "decode")(z)
    chex.assert_type(out, jnp.float32)
    expected = np.asarray(jitted(ours, "decode")(z))
    err = np.abs(np.asarray(out) - expected).max() / np.abs(expected).max()
    assert 1e-5 < err < 0.1  # bf16 rounding shows, but the output is the same function


# ---------------------------------------------------------------- latents and the Gaussian


def test_scaled_latents_and_sampling():
    _, ours = torch_case("variant")  # scaling 1.5, shift 0.25
    s, b = ours.scaling_factor, ours.shift_factor
    x, z_s = images("variant"), latents("variant")
    key = jax.random.key(3)

    def everything(vae: AutoencoderKL, x, z_s, key):
        return {
            "q": vae.encode(x),
            "mode": vae.encode_latents(x),
            "sample": vae.encode_latents(x, key),
            "other_sample": vae.encode_latents(x, jax.random.key(4)),
            "scaled": vae.latent_distribution(x),  # what a latent shard stores
            "decoded_latents": vae.decode_latents(z_s),
            "decoded": vae.decode(z_s / s + b),
        }

    graphdef, state = nnx.split(ours)
    out = jax.jit(lambda state, *args: everything(nnx.merge(graphdef, state), *args))(
        state, x, z_s, key
    )  # one compilation for all of it
    q, eps = out["q"], jax.random.normal(key, out["q"].mean.shape)

    assert_close(out["mode"], s * (q.mean - b))
    assert_close(out["sample"], s * (q.mean + q.std * eps - b))
    assert np.abs(out["sample"] - out["other_sample"]).max() > 0.1 * np.abs(out["sample"]).max()
    assert_close(out["scaled"].std, s * q.std)
    stored = DiagonalGaussian.from_mean_std(out["scaled"].mean, out["scaled"].std)
    assert_close(stored.sample(key), out["sample"])
    assert_close(out["decoded_latents"], out["decoded"])
    assert ours.latent_shape((16, 24, 2)) == (4, 6, 3)


def test_diagonal_gaussian_matches_ldm():
    rng = np.random.default_rng(0)
    moments = rng.standard_normal((2, 3, 5, 8)).astype(np.float32)
    moments[..., 4:] *= 3.0
    moments[0, 0, 0, 4:6] = [60.0, -60.0]  # outside [-30, 20]: clipped
    other_moments = rng.standard_normal((2, 3, 5, 8)).astype(np.float32)
    x = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)

    q, p = DiagonalGaussian.from_moments(moments), DiagonalGaussian.from_moments(other_moments)
    ref = DiagonalGaussianDistribution(nchw(moments))
    ref_p = DiagonalGaussianDistribution(nchw(other_moments))
    assert float(q.logvar[0, 0, 0, 0]) == 20.0 and float(q.logvar[0, 0, 0, 1]) == -30.0
    for ours, theirs in [(q.mean, ref.mean), (q.logvar, ref.logvar), (q.std, ref.std)]:
        np.testing.assert_allclose(ours, nhwc(theirs), rtol=1e-6)
    np.testing.assert_array_equal(q.mode(), q.mean)
    np.testing.assert_allclose(q.kl(), ref.kl().numpy(), rtol=1e-5)
    np.testing.assert_allclose(q.kl(p), ref.kl(ref_p).numpy(), rtol=1e-5)
    np.testing.assert_allclose(q.nll(x), ref.nll(nchw(x)).numpy(), rtol=1e-5)
    np.testing.assert_allclose(p.kl(p), 0.0, atol=1e-4)

    # affine(a, b) is the law of a (z - b): for a > 0 the same noise maps through exactly.
    key, b = jax.random.key(0), 0.5
    assert_close(p.affine(2.5, b).sample(key), 2.5 * (p.sample(key) - b))
    flipped = p.affine(-2.5, b)
    assert_close(flipped.mean, -2.5 * (p.mean - b))
    assert_close(flipped.std, 2.5 * p.std)


def test_samples_have_the_stated_moments():
    mean, std, n = jnp.array([1.0, -2.0]), jnp.array([0.5, 3.0]), 200_000
    q = DiagonalGaussian.from_mean_std(
        jnp.broadcast_to(mean, (n, 2)), jnp.broadcast_to(std, (n, 2))
    )
    z = np.asarray(q.sample(jax.random.key(0)))
    # 5 standard errors: of the mean, std / sqrt(n); of the variance, var * sqrt(2 / n).
    assert np.all(np.abs(z.mean(0) - mean) < 5 * std / math.sqrt(n))
    assert np.all(np.abs(z.var(0) - std**2) < 5 * std**2 * math.sqrt(2 / n))


# ---------------------------------------------------------------- converter


def test_converter_accepts_legacy_attention_names_and_lists_every_problem():
    reference, ours = torch_case("sd_like")
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    legacy = {
        k.replace("to_q.", "query.")
        .replace("to_k.", "key.")
        .replace("to_v.", "value.")
        .replace("to_out.0.", "proj_attn."): v
        for k, v in state.items()
    }
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    model = nnx.eval_shape(
        lambda: AutoencoderKL(**vae_kwargs_from_diffusers(SMALL["sd_like"]), rngs=nnx.Rngs(0))
    )
    load_vae_params(model, legacy)
    for (path, a), (_, b) in zip(nnx.iter_graph(model), nnx.iter_graph(ours), strict=True):
        if isinstance(a, nnx.Param):
            np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(path))

    name = diffusers_name(("decoder", "up_blocks", 0, "resample", "conv", "kernel"))
    assert name == "decoder.up_blocks.0.upsamplers.0.conv.weight"
    broken = {k: v for k, v in state.items() if k != "decoder.conv_out.bias"}
    broken["extra.weight"] = np.zeros(3, np.float32)
    broken["quant_conv.weight"] = np.zeros((8, 8, 3, 3), np.float32)
    with pytest.raises(ValueError) as info:
        load_vae_params(model, broken)
    message = str(info.value)
    assert "missing from the checkpoint: ['decoder.conv_out.bias']" in message
    assert "not used by the model: ['extra.weight', 'quant_conv.weight']" in message
    assert "shape mismatches: ['quant_conv.weight" in message


@pytest.mark.parametrize(
    "change,match",
    [
        ({"_class_name": "VQModel"}, "_class_name"),
        ({"down_block_types": ["DownEncoderBlock2D", "DownBlock2D"]}, "down_block_types"),
        ({"up_block_types": ["UpDecoderBlock2D"]}, "up_block_types has 1 entries"),
        ({"act_fn": "gelu"}, "act_fn"),
        ({"latents_mean": [0.1] * 4}, "latents_mean"),
        ({"norm_type": "spatial"}, "unsupported AutoencoderKL config fields"),
        ({"sample_size": [16, 32]}, "sample_size"),
    ],
)
def test_converter_rejects_unsupported_configs(change, match):
    with pytest.raises(ValueError, match=match):
        vae_kwargs_from_diffusers({**SMALL["sd_like"], **change})


def test_load_diffusers_vae_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_diffusers_vae(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_diffusers_vae(tmp_path)


# ---------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    _, model = torch_case("sd_like")
    with pytest.raises(ValueError, match="channels"):
        model.encode(jnp.zeros((2, 3, 16, 16)))  # NCHW by mistake
    with pytest.raises(ValueError, match="multiple of the downsampling factor 2"):
        model.encode(jnp.zeros((2, 15, 16, 3)))
    with pytest.raises(ValueError, match="NHWC"):
        model.encode_latents(jnp.zeros((16, 16, 3)))
    with pytest.raises(ValueError, match="latent_channels=4"):
        model.decode_latents(jnp.zeros((2, 4, 4, 3)))
    small = vae_kwargs_from_diffusers(SMALL["sd_like"])
    for change, match in [
        ({"norm_num_groups": 12}, "norm_num_groups=12 must divide"),
        ({"block_out_channels": ()}, "block_out_channels"),
        ({"latent_channels": 0}, "latent_channels"),
        ({"scaling_factor": 0.0}, "scaling_factor"),
        ({"sample_size": 15}, "sample_size"),
    ]:
        with pytest.raises(ValueError, match=match):
            nnx.eval_shape(
                lambda change=change: AutoencoderKL(**{**small, **change}, rngs=nnx.Rngs(0))
            )
