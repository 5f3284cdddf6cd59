"""Training a KL autoencoder with a PatchGAN (issue 11): the discriminator and the loss terms.

The discriminator is checked against taming-transformers' `NLayerDiscriminator`, written out
below in torch line by line as taming has it (with `norm_layer=nn.GroupNorm` in place of
BatchNorm), weights copied across; the losses against their equations evaluated by hand.
Every model is tiny: the file runs in about 40 s on 2 CPU cores (mostly compilation).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from diffusax import autoencoder_losses as L
from diffusax.evaluate.classifier import FeatureClassifier
from diffusax.models.autoencoder import AutoencoderKL, DiagonalGaussian
from diffusax.models.discriminator import NLayerDiscriminator, logits_shape
from diffusax.models.layers import count_params


def _rngs(seed: int) -> nnx.Rngs:
    """Rngs on the "rbg" PRNG: threefry's per-shape initialisers take ~30 s to compile for a
    tiny autoencoder on 2 cores, rbg's a few; the values of the weights do not matter here."""
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


# ---------------------------------------------------------------------------------------------
# Discriminator


def taming_nlayer_discriminator(input_nc, ndf, n_layers, norm_layer):
    """taming.modules.discriminator.model.NLayerDiscriminator, as a torch nn.Sequential."""
    # taming: use_bias = norm_layer != nn.BatchNorm2d. Here GroupNorm takes BatchNorm's place
    # (no conv bias in front of it) and no norm at all keeps the biases.
    use_bias = norm_layer is None
    norm = (lambda c: torch.nn.Identity()) if norm_layer is None else norm_layer
    kw, padw = 4, 1
    seq = [
        torch.nn.Conv2d(input_nc, ndf, kernel_size=kw, stride=2, padding=padw),
        torch.nn.LeakyReLU(0.2, True),
    ]
    nf_mult = 1
    for n in range(1, n_layers):
        nf_mult_prev, nf_mult = nf_mult, min(2**n, 8)
        seq += [
            torch.nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kw, 2, padw, bias=use_bias),
            norm(ndf * nf_mult),
            torch.nn.LeakyReLU(0.2, True),
        ]
    nf_mult_prev, nf_mult = nf_mult, min(2**n_layers, 8)
    seq += [
        torch.nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kw, 1, padw, bias=use_bias),
        norm(ndf * nf_mult),
        torch.nn.LeakyReLU(0.2, True),
    ]
    seq += [torch.nn.Conv2d(ndf * nf_mult, 1, kernel_size=kw, stride=1, padding=padw)]
    return torch.nn.Sequential(*seq)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (GroupNorm's scale 1 / offset 0 would hide a swap)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen) + (1.0 if p.ndim == 1 else 0.0))


def _copy_torch_to_nnx(seq: torch.nn.Sequential, disc: NLayerDiscriminator) -> None:
    """Load the torch Sequential's weights into our discriminator (OIHW -> HWIO)."""
    convs = [m for m in seq if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in seq if isinstance(m, torch.nn.GroupNorm)]
    ours_conv = [disc.conv_in, *[b.conv for b in disc.blocks], disc.block_out.conv, disc.conv_out]
    ours_norm = [b.norm for b in [*disc.blocks, disc.block_out] if b.norm is not None]
    assert len(convs) == len(ours_conv) and len(norms) == len(ours_norm)
    for t, o in zip(convs, ours_conv):
        o.kernel[...] = jnp.asarray(t.weight.detach().numpy().transpose(2, 3, 1, 0))
        assert (t.bias is None) == (o.bias is None)
        if t.bias is not None:
            o.bias[...] = jnp.asarray(t.bias.detach().numpy())
    for t, o in zip(norms, ours_norm):
        o.scale[...] = jnp.asarray(t.weight.detach().numpy())
        o.bias[...] = jnp.asarray(t.bias.detach().numpy())


@pytest.mark.parametrize(
    "norm, n_layers, size",
    [("group", 2, 16), ("none", 1, 8), ("group", 3, 24)],
)
def test_discriminator_matches_taming(norm, n_layers, size):
    ndf, groups = 8, 4
    norm_layer = (
        functools.partial(torch.nn.GroupNorm, groups, eps=1e-5) if norm == "group" else None
    )
    ref = taming_nlayer_discriminator(3, ndf, n_layers, norm_layer)
    _randomise(ref, seed=n_layers)
    ours = NLayerDiscriminator(
        in_channels=3, ndf=ndf, n_layers=n_layers, norm=norm, norm_groups=groups,
        rngs=_rngs(0),
    )  # fmt: skip
    assert count_params(ours) == sum(p.numel() for p in ref.parameters())
    _copy_torch_to_nnx(ref, ours)
    x = np.random.default_rng(1).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(ours(jnp.asarray(x)))
    side = size // 2**n_layers - 2
    assert got.shape == expected.shape == (2, side, side, 1)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_discriminator_shapes_and_ldm_size():
    """LDM's discriminator (ndf 64, 3 layers) on 256x256: 30x30 logits, taming's 2.77M params."""
    disc = nnx.eval_shape(lambda: NLayerDiscriminator(rngs=_rngs(0)))
    assert count_params(disc) == 2_765_633  # = taming's with BatchNorm (same affine params)
    graphdef, state = nnx.split(disc)
    out = jax.eval_shape(
        lambda s, x: nnx.merge(graphdef, s)(x), state, jax.ShapeDtypeStruct((2, 256, 256, 3), "f4")
    )
    assert out.shape == (2, 30, 30, 1) and out.dtype == jnp.float32
    assert logits_shape((256, 256), 3) == (30, 30)
    assert logits_shape((8, 16), 1) == (2, 6)


def test_discriminator_digits_output_and_init():
    disc = NLayerDiscriminator(in_channels=1, ndf=16, n_layers=1, norm_groups=8, rngs=_rngs(0))
    out = disc(jnp.zeros((5, 8, 8, 1), jnp.bfloat16))
    assert out.shape == (5, 2, 2, 1) and out.dtype == jnp.float32
    kernels = [disc.conv_in.kernel[...], disc.block_out.conv.kernel[...]]
    for k in kernels:  # taming's init: N(0, 0.02^2)
        assert abs(float(jnp.std(k)) - 0.02) < 0.004 and abs(float(jnp.mean(k))) < 0.004
    assert disc.block_out.conv.bias is None  # no conv bias in front of a norm
    assert float(jnp.abs(disc.conv_out.bias[...]).max()) == 0.0
    # Parameters only: nothing besides nnx.Param (no BatchNorm running statistics).
    _, params, rest = nnx.split(disc, nnx.Param, ...)
    assert jax.tree.leaves(rest) == []
    assert jax.tree.leaves(params)


def test_discriminator_bad_arguments():
    with pytest.raises(ValueError, match="multiples of 4 and at least 12"):
        logits_shape((8, 8), 2)
    disc = NLayerDiscriminator(in_channels=1, ndf=8, n_layers=2, norm_groups=4, rngs=_rngs(0))
    with pytest.raises(ValueError, match="at least 12"):
        disc(jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(ValueError, match=r"NHWC \(B, H, W, 1\)"):
        disc(jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(ValueError, match="norm_groups=3"):
        NLayerDiscriminator(ndf=8, n_layers=1, norm_groups=3, rngs=_rngs(0))
    with pytest.raises(ValueError, match="norm must be one of"):
        NLayerDiscriminator(norm="batch", rngs=_rngs(0))
    with pytest.raises(ValueError, match="n_layers must be a positive int"):
        NLayerDiscriminator(n_layers=0, rngs=_rngs(0))


# ---------------------------------------------------------------------------------------------
# Loss terms


def test_hinge_and_generator_losses_on_known_logits():
    real = jnp.array([2.0, 0.5, -1.0, 1.0])
    fake = jnp.array([-2.0, 0.0, 0.5, -0.5])
    # relu(1 - real) = [0, .5, 2, 0] -> mean .625;  relu(1 + fake) = [0, 1, 1.5, .5] -> .75
    np.testing.assert_allclose(L.hinge_d_loss(real, fake), 0.5 * (0.625 + 0.75), rtol=1e-6)
    np.testing.assert_allclose(L.generator_loss(fake), 0.5, rtol=1e-6)  # -mean(fake)
    # PatchGAN maps: means over batch and patches alike; zero logits give 1.
    assert float(L.hinge_d_loss(jnp.zeros((2, 3, 3, 1)), jnp.zeros((2, 3, 3, 1)))) == 1.0
    assert float(L.hinge_d_loss(jnp.full((2, 2), 3.0), jnp.full((2, 2), -1.0))) == 0.0
    # The hinge's gradients: -1/(2N) per real logit inside the margin, +1/(2N) per fake one.
    g_real, g_fake = jax.grad(L.hinge_d_loss, argnums=(0, 1))(real, fake)
    np.testing.assert_allclose(g_real, [0, -0.125, -0.125, 0])
    np.testing.assert_allclose(g_fake, [0, 0.125, 0.125, 0.125])


def test_reconstruction_and_kl_losses():
    x = jnp.array([[0.5, -1.0], [1.0, 0.0]])
    x_rec = jnp.array([[0.0, -1.0], [0.0, 0.5]])
    np.testing.assert_allclose(L.reconstruction_loss(x, x_rec, "l1"), (0.5 + 0 + 1 + 0.5) / 4)
    np.testing.assert_allclose(L.reconstruction_loss(x, x_rec, "l2"), (0.25 + 0 + 1 + 0.25) / 4)
    with pytest.raises(ValueError, match="must be one of"):
        L.reconstruction_loss(x, x_rec, "l3")
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(3, 2, 2, 4)).astype(np.float32)
    logvar = rng.normal(size=(3, 2, 2, 4)).astype(np.float32)
    per_example = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1 - logvar, axis=(1, 2, 3))
    got = L.kl_loss(DiagonalGaussian(jnp.asarray(mean), jnp.asarray(logvar)))
    np.testing.assert_allclose(got, per_example.mean(), rtol=1e-5)  # sum over z, mean over B


def test_adopt_weight():
    assert float(L.adopt_weight(0.5, 9, 10)) == 0.0
    assert float(L.adopt_weight(0.5, 10, 10)) == 0.5
    steps = jnp.arange(8, 12)
    np.testing.assert_array_equal(L.adopt_weight(2.0, steps, 10), [0, 0, 2, 2])


def test_leaf_helpers():
    tree = {"decoder": {"conv_out": {"kernel": 1, "bias": 2}, "conv_in": {"kernel": 3}}, "e": 4}
    new = L.replace_leaf(tree, ("decoder", "conv_out", "kernel"), 10)
    assert new["decoder"]["conv_out"] == {"kernel": 10, "bias": 2}
    assert tree["decoder"]["conv_out"]["kernel"] == 1  # the original is untouched
    assert new["decoder"]["conv_in"] is tree["decoder"]["conv_in"]  # off-path subtrees shared
    assert L.get_leaf(new, ("decoder", "conv_out", "kernel")) == 10
    with pytest.raises(KeyError, match=r"no key 'conv_last' at \('decoder',\)"):
        L.replace_leaf(tree, ("decoder", "conv_last", "kernel"), 0)


# ---------------------------------------------------------------------------------------------
# The adaptive weight, on a tiny autoencoder and discriminator


def _init(build):
    """(graphdef, pure-dict params) of the module ``build()``."""
    graphdef, params = nnx.split(build(), nnx.Param)
    return graphdef, nnx.to_pure_dict(params)


@functools.cache
def _tiny_models():
    vg, vp = _init(
        lambda: AutoencoderKL(
            in_channels=1, out_channels=1, block_out_channels=(4, 8), layers_per_block=1,
            latent_channels=2, norm_num_groups=4, sample_size=8, mid_block_add_attention=False,
            rngs=_rngs(0),
        )
    )  # fmt: skip
    dg, dp = _init(
        lambda: NLayerDiscriminator(in_channels=1, ndf=4, n_layers=1, norm_groups=2, rngs=_rngs(1))
    )
    return vg, vp, dg, dp


def test_last_layer_path_is_the_decoders_conv_out():
    vg, vp, _, _ = _tiny_models()
    vae = nnx.merge(vg, vp)
    kernel = L.get_leaf(vp, L.DECODER_LAST_LAYER)
    assert kernel.shape == (3, 3, 4, 1)  # 3x3, the decoder's last width -> 1 image channel
    assert vae.decoder.conv_out.kernel[...] is kernel


def test_adaptive_weight_is_the_gradient_norm_ratio():
    """λ = ‖∇_W L_rec‖ / (‖∇_W L_gen‖ + 1e-4) with W decoder.conv_out's kernel, by hand."""
    vg, vp, dg, dp = _tiny_models()
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 1)), jnp.float32)
    z = jax.jit(lambda p: nnx.merge(vg, p).encode(x).sample(jax.random.key(0, impl="rbg")))(vp)

    def decode(p):
        return nnx.merge(vg, p).decode(z)

    def rec_of_params(p):
        return L.reconstruction_loss(x, decode(p), "l1")

    def gen_of_params(p):
        return L.generator_loss(nnx.merge(dg, dp)(decode(p)))

    def weight(vp):
        sg = jax.lax.stop_gradient(vp)
        kernel = L.get_leaf(sg, L.DECODER_LAST_LAYER)
        with_kernel = functools.partial(L.replace_leaf, sg, L.DECODER_LAST_LAYER)
        return L.adaptive_weight(
            lambda k: rec_of_params(with_kernel(k)), lambda k: gen_of_params(with_kernel(k)), kernel
        )

    @jax.jit  # one compilation for everything (op-by-op dispatch is slow on 2 cores)
    def run(vp):
        # By hand: the gradient over every parameter, then its decoder.conv_out.kernel leaf.
        g_rec = jax.grad(rec_of_params)(vp)["decoder"]["conv_out"]["kernel"]
        g_gen = jax.grad(gen_of_params)(vp)["decoder"]["conv_out"]["kernel"]
        # No gradient flows through λ, even when it multiplies a loss of the same parameters.
        through = jax.grad(lambda p: weight(p) * jax.lax.stop_gradient(gen_of_params(p)))(vp)
        return g_rec, g_gen, weight(vp), through

    g_rec, g_gen, lam, through = run(vp)
    expected = np.sqrt(np.sum(np.square(g_rec))) / (np.sqrt(np.sum(np.square(g_gen))) + 1e-4)
    assert 0 < expected < 1e4
    assert lam.shape == () and lam.dtype == jnp.float32
    np.testing.assert_allclose(lam, expected, rtol=1e-5)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(through))


def test_adaptive_weight_clip_and_eps():
    w = jnp.ones((3,))
    # ‖∇(2 Σw)‖ = 2√3; a constant GAN loss has no gradient: 2√3 / 1e-4 = 34641 -> clipped 1e4.
    lam = L.adaptive_weight(lambda k: 2 * jnp.sum(k), lambda k: jnp.zeros(()), w)
    assert float(lam) == 1e4
    lam = L.adaptive_weight(lambda k: jnp.sum(k), lambda k: 3 * jnp.sum(k), w, eps=0.0)
    np.testing.assert_allclose(lam, 1 / 3, rtol=1e-6)
    lam = L.adaptive_weight(lambda k: jnp.sum(k), lambda k: jnp.sum(k), w, max_weight=0.5)
    np.testing.assert_allclose(lam, 0.5)


# ---------------------------------------------------------------------------------------------
# The perceptual stand-in


def test_perceptual_loss_with_the_digits_classifier_features():
    graphdef, params = _init(lambda: FeatureClassifier((8, 8, 1), 10, rngs=_rngs(0)))

    @jax.jit
    def features(x):
        return nnx.merge(graphdef, params).features(x)

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, (6, 8, 8, 1)), jnp.float32)
    x_rec = jnp.asarray(rng.uniform(-1, 1, (6, 8, 8, 1)), jnp.float32)
    assert float(L.perceptual_loss(features, x, x)) == pytest.approx(0.0, abs=1e-10)
    fx, fr = np.asarray(features(x)), np.asarray(features(x_rec))
    ux = fx / np.linalg.norm(fx, axis=-1, keepdims=True)
    ur = fr / np.linalg.norm(fr, axis=-1, keepdims=True)
    expected = np.mean(np.sum((ux - ur) ** 2, axis=-1))
    got = L.perceptual_loss(features, x, x_rec)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert 0 < float(got) <= 2.0  # ReLU features: unit vectors in the positive orthant
    # Normalised: scaling the features changes nothing.
    np.testing.assert_allclose(
        L.perceptual_loss(lambda v: 7.0 * features(v), x, x_rec), got, rtol=1e-5
    )
    # The gradient reaches the reconstruction, not the original.
    grad = jax.jit(jax.grad(lambda a, b: L.perceptual_loss(features, a, b), argnums=(0, 1)))
    g_x, g_rec = grad(x, x_rec)
    assert float(jnp.abs(g_x).max()) == 0.0 and float(jnp.abs(g_rec).max()) > 0.0
