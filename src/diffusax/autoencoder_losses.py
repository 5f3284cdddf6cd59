"""The loss terms of a KL autoencoder trained as in latent diffusion, as pure functions.

LDM's `LPIPSWithDiscriminator` (Rombach et al. 2022; Esser et al. 2021 for the GAN part)
trains the autoencoder on

    L_vae  = L_rec + w_p · L_perc + β · L_KL + f(step) · λ · w_d · L_gen
    L_disc = f(step) · L_hinge

with f(step) = 1 from `disc_start` on and 0 before, w_d the discriminator weight, and λ the
adaptive weight that balances the GAN gradient against the reconstruction gradient at the
decoder's last layer (`adaptive_weight`). All functions here are jit-able and differentiable;
images are NHWC in [-1, 1], logits any shape (the PatchGAN's (B, h, w, 1) map).

Scale. LDM sums the reconstruction term over pixels and divides by the batch size; here it is
a mean over every element, so LDM's β = 1e-6 corresponds to β · (H · W · C) here (LDM's
KL weight relative to its summed reconstruction). The KL is LDM's: summed over the latent's
dimensions, averaged over the batch. The adaptive weight λ is scale-free in L_rec only up to
that choice: λ ∝ ‖∇L_rec‖, so it is the mean-based L_rec that the GAN term is balanced against.

Perceptual term. LDM uses LPIPS (VGG16 features with learned linear heads) on natural
images. VGG features mean little on 8x8 digits, so `perceptual_loss` takes any frozen feature
function; this project's stand-in is the digits classifier's penultimate layer
(`diffusax.evaluate.classifier.FeatureClassifier.features`). It is not LPIPS: one layer, no
learned per-channel weights. LPIPS itself (VGG weights + lin heads from a file) is left out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from diffusax.models.autoencoder import DiagonalGaussian

__all__ = [
    "DECODER_LAST_LAYER",
    "RECONSTRUCTION_KINDS",
    "adaptive_weight",
    "adopt_weight",
    "generator_loss",
    "get_leaf",
    "hinge_d_loss",
    "kl_loss",
    "perceptual_loss",
    "reconstruction_loss",
    "replace_leaf",
]

RECONSTRUCTION_KINDS = ("l1", "l2")
# The path, in AutoencoderKL's pure-dict parameter tree, of the kernel LDM's adaptive weight
# differentiates at: `decoder.conv_out`, the decoder's last 3x3 conv (the image it outputs).
DECODER_LAST_LAYER = ("decoder", "conv_out", "kernel")
ADAPTIVE_EPS = 1e-4  # LDM's ε in λ = ‖∇L_rec‖ / (‖∇L_GAN‖ + ε)
ADAPTIVE_MAX = 1e4  # LDM clamps λ to [0, 1e4]


def reconstruction_loss(x: jax.Array, x_rec: jax.Array, kind: str = "l1") -> jax.Array:
    """Mean over every element of |x - x̂| ("l1") or (x - x̂)² ("l2"); a scalar."""
    diff = x.astype(jnp.float32) - x_rec.astype(jnp.float32)
    if kind == "l1":
        return jnp.mean(jnp.abs(diff))
    if kind == "l2":
        return jnp.mean(jnp.square(diff))
    raise ValueError(f"reconstruction loss must be one of {RECONSTRUCTION_KINDS}, got {kind!r}")


def kl_loss(posterior: DiagonalGaussian) -> jax.Array:
    """KL(q(z|x) || N(0, I)) summed over the latent's dimensions, averaged over the batch:

    L_KL = 1/B Σ_b 1/2 Σ_i (μ² + σ² - 1 - log σ²)   (`DiagonalGaussian.kl`, as LDM).
    """
    return jnp.mean(posterior.kl())


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """The discriminator's hinge loss (taming / LDM):

    L_hinge = 1/2 (mean(relu(1 - D(x))) + mean(relu(1 + D(x̂)))),

    the means over every logit (batch and patches). 0 once D(x) >= 1 and D(x̂) <= -1; 1 for
    all-zero logits.
    """
    loss_real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
    loss_fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
    return 0.5 * (loss_real + loss_fake)


def generator_loss(logits_fake: jax.Array) -> jax.Array:
    """The autoencoder's adversarial loss: L_gen = -mean(D(x̂)) over every logit."""
    return -jnp.mean(logits_fake.astype(jnp.float32))


def adopt_weight(weight, step, start) -> jax.Array:
    """f(step) · weight with f = 1 from step `start` on, 0 before (LDM's `adopt_weight`)."""
    return jnp.where(jnp.asarray(step) >= start, jnp.asarray(weight, jnp.float32), 0.0)


def adaptive_weight(
    rec_loss_fn: Callable[[jax.Array], jax.Array],
    gan_loss_fn: Callable[[jax.Array], jax.Array],
    last_layer: jax.Array,
    *,
    eps: float = ADAPTIVE_EPS,
    max_weight: float = ADAPTIVE_MAX,
) -> jax.Array:
    """LDM's adaptive GAN weight at the decoder's last layer W (`last_layer`):

    λ = stop_gradient(clip(‖∇_W L_rec‖₂ / (‖∇_W L_gen‖₂ + ε), 0, max_weight)),

    ‖·‖₂ the Frobenius norm over the whole kernel, ε = 1e-4, max_weight = 1e4.

    `rec_loss_fn(W)` and `gan_loss_fn(W)` are the two losses as functions of that kernel
    alone: the rest of the network fixed (build them on stop-gradient parameters with
    `replace_leaf(params, DECODER_LAST_LAYER, W)`, so that only the path from W to the loss is
    differentiated). For the GAN term this includes the discriminator: L_gen(D(decode(z; W))).
    LDM's L_rec here is its whole "nll" term: reconstruction plus the perceptual term, no KL.
    The result is a float32 scalar and has no gradient.
    """
    last_layer = jax.lax.stop_gradient(last_layer)
    g_rec = jax.grad(rec_loss_fn)(last_layer)
    g_gan = jax.grad(gan_loss_fn)(last_layer)
    ratio = jnp.linalg.norm(g_rec.ravel()) / (jnp.linalg.norm(g_gan.ravel()) + eps)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, max_weight)).astype(jnp.float32)


def get_leaf(tree, path: Sequence[str]):
    """tree[path[0]][path[1]]...; KeyError naming the missing key and the path."""
    node = tree
    for i, key in enumerate(path):
        try:
            node = node[key]
        except (KeyError, TypeError, IndexError) as e:
            raise KeyError(
                f"no key {key!r} at {tuple(path[:i])} in the parameter tree (path {tuple(path)})"
            ) from e
    return node


def replace_leaf(tree, path: Sequence[str], value):
    """A copy of the nested-dict `tree` with the leaf at `path` replaced by `value`.

    Only the dicts along the path are copied; every other subtree is shared.
    """
    if not path:
        return value
    head, *rest = path
    get_leaf(tree, path)  # a clear KeyError for a wrong path
    out = dict(tree)
    out[head] = replace_leaf(tree[head], rest, value)
    return out


def _unit(f: jax.Array, eps: float) -> jax.Array:
    """f / (‖f‖₂ + eps) over the last axis."""
    return f / (jnp.linalg.norm(f, axis=-1, keepdims=True) + eps)


def perceptual_loss(
    features_fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    x_rec: jax.Array,
    *,
    eps: float = 1e-10,
) -> jax.Array:
    """Distance of normalised features, averaged over the batch:

    L_perc = 1/B Σ_b ‖ φ(x_b)/‖φ(x_b)‖ - φ(x̂_b)/‖φ(x̂_b)‖ ‖₂²,

    φ = `features_fn` (B, ...) -> (B, ..., D), normalised over its last axis (LPIPS's
    channel normalisation; any axes between batch and features, e.g. spatial positions, are
    averaged). In [0, 4]; [0, 2] for non-negative (ReLU) features. For digits φ is the frozen
    digits classifier's `features` (a stand-in for LPIPS; see the module docstring). The
    gradient flows to x̂ only: the features of the original are stop-gradient.
    """
    f_x = jax.lax.stop_gradient(_unit(features_fn(x).astype(jnp.float32), eps))
    f_r = _unit(features_fn(x_rec).astype(jnp.float32), eps)
    d = jnp.sum(jnp.square(f_x - f_r), axis=-1)  # (B, ...)
    return jnp.mean(d)
