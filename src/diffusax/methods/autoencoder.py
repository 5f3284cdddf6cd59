"""The KL autoencoder of latent diffusion, trained as LDM trains it: two networks, two
optimizers, two gradient updates per step.

    networks  {"vae": AutoencoderKL, "disc": PatchGAN}  (+ a frozen "perceptual" feature network
              when autoencoder.perceptual_weight > 0)
    groups    {"vae": optim, "disc": disc_optim}
    update 1  vae:  L_rec + w_p L_perc + β L_KL + f(step) · λ · w_d · L_gen   (D fixed)
    update 2  disc: f(step) · L_hinge(D(x), D(x̂))   with x̂ from the vae just updated
    f(step) = 1 from autoencoder.disc_start on; λ = ‖∇L_rec‖ / (‖∇L_gen‖ + 1e-4) at the decoder's
    last layer (`autoencoder_losses.adaptive_weight`).

The images are resized to autoencoder.image_size (bilinear) before encoding, so a small
dataset can be trained at a larger resolution (the bundled 8x8 digits at 16x16). Evaluated by
`make eval` (`diffusax.evaluate.reconstruction`): held-out PSNR, the reconstructions' Fréchet
distance and class accuracy in the digits classifier, reconstructions.npz.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from diffusax import autoencoder_losses as L
from diffusax.config import ConfigError
from diffusax.methods import base

SECTION = "autoencoder"


def resize(images, size: int):
    """(B, h, w, C) -> (B, size, size, C), bilinear (identity when already that size)."""
    b, h, w, c = images.shape
    if (h, w) == (size, size):
        return images
    return jax.image.resize(images, (b, size, size, c), "bilinear")


def model_shape(cfg, data) -> tuple:
    """The (H, W, C) the autoencoder works at."""
    size = cfg.autoencoder.image_size or data.image_shape[0]
    return (size, size, data.image_shape[-1])


def build_vae(cfg, shape):
    a = cfg.autoencoder
    from diffusax.models.autoencoder import AutoencoderKL

    def build(key):
        return AutoencoderKL(
            in_channels=shape[-1],
            out_channels=shape[-1],
            block_out_channels=tuple(a.block_out_channels),
            layers_per_block=a.layers_per_block,
            latent_channels=a.latent_channels,
            norm_num_groups=a.norm_num_groups,
            sample_size=shape[0],
            mid_block_add_attention=a.mid_attention,
            rngs=nnx.Rngs(params=key),
        )

    return build


def build_disc(cfg, shape):
    a = cfg.autoencoder
    from diffusax.models.discriminator import NLayerDiscriminator

    def build(key):
        return NLayerDiscriminator(
            in_channels=shape[-1],
            ndf=a.disc_channels,
            n_layers=a.disc_layers,
            norm_groups=a.disc_norm_groups,
            rngs=nnx.Rngs(params=key),
        )

    return build


class Autoencoder(base.Method):
    name = "autoencoder"
    param_sections = (SECTION,)

    def validate(self, cfg):
        a = cfg.autoencoder
        if a.reconstruction not in L.RECONSTRUCTION_KINDS:
            raise ConfigError(
                f"config field 'autoencoder.reconstruction' is {a.reconstruction!r}; choose one "
                f"of {list(L.RECONSTRUCTION_KINDS)}"
            )
        base.check_fields(
            cfg,
            SECTION,
            positive=("layers_per_block", "latent_channels", "norm_num_groups", "disc_layers"),
            non_negative=(
                "image_size",
                "kl_weight",
                "perceptual_weight",
                "disc_weight",
                "disc_start",
                "disc_channels",
            ),
        )
        if not a.block_out_channels or min(a.block_out_channels) < 1:
            raise ConfigError(
                f"config field 'autoencoder.block_out_channels' must hold positive ints, got "
                f"{tuple(a.block_out_channels)!r}"
            )
        bad = [c for c in a.block_out_channels if c % a.norm_num_groups]
        if bad:
            raise ConfigError(
                f"config field 'autoencoder.norm_num_groups' ({a.norm_num_groups}) must divide "
                f"every entry of autoencoder.block_out_channels {tuple(a.block_out_channels)}"
            )
        if a.disc_weight > 0 and a.disc_channels % a.disc_norm_groups:
            raise ConfigError(
                f"config field 'autoencoder.disc_norm_groups' ({a.disc_norm_groups}) must divide "
                f"autoencoder.disc_channels ({a.disc_channels})"
            )
        if a.perceptual_weight > 0 and not a.perceptual:
            raise ConfigError(
                "config field 'autoencoder.perceptual_weight' > 0 needs autoencoder.perceptual: "
                "'classifier:PATH', a digits classifier saved by `make eval` "
                "(runs/EXP/eval/classifier_digits.npz)"
            )

    def networks(self, cfg, data):
        shape = model_shape(cfg, data)
        factor = 2 ** (len(cfg.autoencoder.block_out_channels) - 1)
        if shape[0] % factor:
            raise ConfigError(
                f"config field 'autoencoder.block_out_channels' has "
                f"{len(cfg.autoencoder.block_out_channels)} levels: the image side "
                f"({shape[0]}, autoencoder.image_size) must be divisible by {factor}"
            )
        nets = {
            "vae": base.Network(build=build_vae(cfg, shape)),
            "disc": base.Network(build=build_disc(cfg, shape)),
        }
        if cfg.autoencoder.perceptual_weight > 0:
            nets["perceptual"] = _perceptual_network(cfg, data)
        return nets

    def groups(self, cfg):
        return {"vae": base.Group("vae", optim="optim"), "disc": base.Group("disc", "disc_optim")}

    def updates(self, cfg, ctx):
        a = cfg.autoencoder
        size = model_shape(cfg, ctx.data)[0]
        weight_p = a.perceptual_weight

        def rec_terms(frozen, x, x_rec):
            rec = L.reconstruction_loss(x, x_rec, a.reconstruction)
            if weight_p > 0:
                clf = ctx.module("perceptual", frozen["perceptual"])
                # The classifier sees the data's own resolution.
                small = ctx.data.image_shape[0]
                features = lambda im: clf.features(resize(im, small))
                rec = rec + weight_p * L.perceptual_loss(features, x, x_rec)
            return rec

        def vae_loss(params, frozen, batch, key, step):
            x = resize(batch["image"], size)  # (B, S, S, C)
            vae = ctx.module("vae", params["vae"])
            posterior = vae.encode(x)
            z = posterior.sample(key)  # (B, S/f, S/f, latent_channels)
            x_rec = vae.decode(z)  # (B, S, S, C)
            rec = rec_terms(frozen, x, x_rec)
            kl = L.kl_loss(posterior)
            loss = rec + a.kl_weight * kl
            metrics = {"rec": rec, "kl": kl}
            if a.disc_weight > 0:
                disc = ctx.module("disc", jax.lax.stop_gradient(params["disc"]))
                frozen_vae = jax.lax.stop_gradient(params["vae"])
                z_fixed = jax.lax.stop_gradient(z)

                def decode_with(kernel):  # the decoder as a function of its last layer only
                    tree = L.replace_leaf(frozen_vae, L.DECODER_LAST_LAYER, kernel)
                    return ctx.module("vae", tree).decode(z_fixed)

                def adversarial(_):
                    gen = L.generator_loss(disc(x_rec))
                    lam = L.adaptive_weight(
                        lambda k: rec_terms(frozen, x, decode_with(k)),
                        lambda k: L.generator_loss(disc(decode_with(k))),
                        L.get_leaf(frozen_vae, L.DECODER_LAST_LAYER),
                    )
                    return a.disc_weight * lam * gen, gen, lam

                off = lambda _: (jnp.zeros(()), jnp.zeros(()), jnp.zeros(()))
                gan, gen, lam = jax.lax.cond(step >= a.disc_start, adversarial, off, None)
                loss = loss + gan
                metrics.update(gen=gen, adaptive_weight=lam)
            return loss, dict(metrics, loss=loss)

        def disc_loss(params, frozen, batch, key, step):
            x = resize(batch["image"], size)
            vae = ctx.module("vae", jax.lax.stop_gradient(params["vae"]))  # as update 1 left it
            x_rec = vae.decode(vae.encode(x).sample(key))
            disc = ctx.module("disc", params["disc"])
            hinge = lambda _: L.hinge_d_loss(disc(x), disc(x_rec))
            loss = jax.lax.cond(step >= a.disc_start, hinge, lambda _: jnp.zeros(()), None)
            return loss, {"loss": loss}

        updates = [base.GradUpdate("vae", vae_loss, with_step=True)]
        if a.disc_weight > 0:
            updates.append(base.GradUpdate("disc", disc_loss, "disc/", with_step=True))
        return updates

    def sample_params(self, state, frozen, cfg):
        return state.params["vae"]

    def sample_network(self, cfg):
        return "vae"

    def evaluate(self, cfg, workdir):
        from diffusax.evaluate import reconstruction

        return reconstruction.evaluate(cfg, workdir)

    def format_report(self, report):
        from diffusax.evaluate import reconstruction

        return reconstruction.format_report(report)

    def describe(self, cfg):
        a = cfg.autoencoder
        return (
            f"{self.name}  ({a.reconstruction} + {a.kl_weight} KL"
            + (f" + {a.perceptual_weight} perceptual" if a.perceptual_weight else "")
            + (
                f" + {a.disc_weight} adaptive-weighted hinge GAN from step {a.disc_start}"
                if a.disc_weight
                else ""
            )
            + f"; images at {a.image_size or 'the data size'})"
        )


def _perceptual_network(cfg, data):
    """The frozen digits classifier whose features make the perceptual term."""
    from diffusax.evaluate import classifier

    source = cfg.autoencoder.perceptual
    if not source.startswith("classifier:"):
        raise ConfigError(
            f"config field 'autoencoder.perceptual' is {source!r}; give 'classifier:PATH' (a "
            f"classifier saved by `make eval`)"
        )
    path = source.removeprefix("classifier:")
    classes = data.dataset_classes or 10
    return base.Network(
        build=lambda key: classifier.FeatureClassifier(
            data.image_shape, classes, rngs=nnx.Rngs(params=key)
        ),
        trainable=False,
        source=source,
        load=lambda: classifier.load_params(path, data.image_shape, classes),
    )


base.register(Autoencoder())
