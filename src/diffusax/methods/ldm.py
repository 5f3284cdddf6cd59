"""Latent diffusion (Rombach et al. 2022): DDPM on the latents of a frozen KL autoencoder.

    L_LDM = E_{E(x), y, ε, t} ‖ε − ε_θ(z_t, t, τ_θ(y))‖²,   z = s · E(x)

    networks  {"model": the denoiser (with τ_θ), trainable; "vae": the autoencoder, frozen}
    groups    {"model": optim};  EMAs {"ema": model}
    update    z = s (μ + σ ε') from the frozen encoder's posterior at the images, then the
              denoising loss of ``ddpm`` on z (with the condition's dropout for guidance)
    sampling  the ``ddpm`` sampler on the latent shape, decoded by the frozen decoder: x = D(z / s)

The autoencoder (``ldm.vae``) is "run:DIR", a run of this project's ``autoencoder`` method
(its architecture is this config's ``autoencoder`` section; the weights its latest checkpoint's
``params.vae``), or "diffusers:DIR", a local diffusers AutoencoderKL folder (the SD VAE). The
checkpoint records its source and digest, and a resume against other autoencoder weights is
refused. ``s`` is ``ldm.scale_factor``. Images are resized to the autoencoder's resolution
(``autoencoder.image_size``) before encoding, as the autoencoder was trained.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

from diffusax.config import ConfigError
from diffusax.methods import autoencoder as ae
from diffusax.methods import base
from diffusax.methods.ddpm import DDPM


def vae_network(cfg, data) -> tuple[base.Network, tuple]:
    """(the frozen autoencoder network, the (H, W, C) it encodes)."""
    spec = cfg.ldm.vae
    kind, _, path = spec.partition(":")
    if kind == "run":
        shape = ae.model_shape(cfg, data)
        from diffusax.train.build import load_from_run

        load = load_from_run(path, ("params", "vae"))
        return base.Network(ae.build_vae(cfg, shape), False, spec, load), shape
    from flax import nnx

    from diffusax.convert import diffusers_vae
    from diffusax.models.autoencoder import AutoencoderKL

    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ConfigError(f"config field 'ldm.vae': no diffusers AutoencoderKL folder at {path!r}")
    with open(config_file) as f:  # the weights are read once, by load()
        kwargs = diffusers_vae.vae_kwargs_from_diffusers(json.load(f))
    shape = (*ae.model_shape(cfg, data)[:2], kwargs["in_channels"])

    def build(key):
        return AutoencoderKL(**kwargs, rngs=nnx.Rngs(params=key))

    def load():
        from diffusax.train.state import split_params

        return split_params(diffusers_vae.load_diffusers_vae(path))[1]

    return base.Network(build, False, spec, load), shape


_LATENT_SHAPES: dict = {}  # (vae spec, autoencoder section, image shape) -> latent shape


def latent_shape(cfg, vae_shape, vae_network_built) -> tuple:
    """(h, w, latent channels) of the autoencoder's latents for images of ``vae_shape``
    (built abstractly once per autoencoder: the method asks at every stage of a build)."""
    from flax import nnx

    key = (cfg.ldm.vae, repr(cfg.autoencoder.to_dict()), tuple(vae_shape))
    if key not in _LATENT_SHAPES:
        abstract = nnx.eval_shape(lambda: vae_network_built.build(jax.random.key(0)))
        _LATENT_SHAPES[key] = tuple(abstract.latent_shape(vae_shape))
    return _LATENT_SHAPES[key]


class LDM(DDPM):
    name = "ldm"
    param_sections = ("model", "condition", "text")
    pixel_bound = False

    def validate(self, cfg):
        super().validate(cfg)
        kind, _, path = cfg.ldm.vae.partition(":")
        if kind not in ("run", "diffusers") or not path:
            raise ConfigError(
                f"config field 'ldm.vae' is {cfg.ldm.vae!r}: give 'run:DIR' (an autoencoder run "
                f"of this project, e.g. run:runs/autoencoder_digits) or 'diffusers:DIR' (a "
                f"local diffusers AutoencoderKL folder)"
            )
        if not cfg.ldm.scale_factor > 0:
            raise ConfigError(
                f"config field 'ldm.scale_factor' must be > 0, got {cfg.ldm.scale_factor!r}"
            )
        if cfg.latents.dir:
            raise ConfigError(
                "config field 'latents.dir': method 'ldm' encodes with its frozen autoencoder "
                "(ldm.vae); latent shards train with method 'ddpm' and latents.dir"
            )

    def _shapes(self, cfg, data):
        vae, vae_shape = vae_network(cfg, data)
        return vae, vae_shape, latent_shape(cfg, vae_shape, vae)

    def model_shape(self, cfg, data):
        return self._shapes(cfg, data)[2]  # the denoiser works on the latents

    def networks(self, cfg, data):
        return {**super().networks(cfg, data), "vae": self._shapes(cfg, data)[0]}

    def updates(self, cfg, ctx):
        _, vae_shape, _ = self._shapes(cfg, ctx.data)
        inner = self.denoising_loss(cfg, ctx)
        scale = cfg.ldm.scale_factor

        def loss(params, frozen, batch, key):
            z_key, key = jax.random.split(key)
            vae = ctx.module("vae", frozen["vae"])
            x = ae.resize(batch["image"], vae_shape[0])  # (B, S, S, C)
            z = scale * vae.encode(x).sample(z_key)  # (B, h, w, c)
            return inner(params["model"], dict(batch, image=z), key)

        return [base.GradUpdate("model", loss)]

    def sample_params(self, state, frozen, cfg):
        return {"model": state.ema["ema"], "vae": frozen["vae"]}

    def make_sampler(self, run, sample_cfg):
        core = super().make_sampler(run, sample_cfg, clip=False)  # latents, unclipped
        scale = run.cfg.ldm.scale_factor

        @jax.jit
        def decode(vae_params, z):
            images = run.ctx.module("vae", vae_params).decode(z / scale)  # (B, S, S, C)
            return jnp.clip(images, -1.0, 1.0)

        return lambda params, y, key: decode(params["vae"], core(params["model"], y, key))

    def describe(self, cfg):
        kind = cfg.condition.kind or ("label" if cfg.model.class_conditional else "none")
        return (
            f"{self.name}  (z = {cfg.ldm.scale_factor} E(x) of the frozen {cfg.ldm.vae}; "
            f"condition {kind}; {super().describe(cfg).split('(', 1)[1]}"
        )


base.register(LDM())
