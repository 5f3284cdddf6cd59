"""The unCLIP decoder (DALL·E 2, Ramesh et al. 2022): stage 3, an image embedding -> an image,
and the whole text -> prior -> decoder pipeline.

    networks  {"model": models.unclip_decoder.UnclipDecoder, trainable;
               "clip": the frozen DualEncoder of the clip run (prior.clip);
               "prior": the frozen EMA of the prior run (unclip.prior)}
    groups    {"model": optim};  EMA {"ema": model, optim.ema_decay}
    update    e = u(x), the unit CLIP image embedding of the batch's image; the caption is
              replaced by the empty one with p = unclip.drop_text (0.5 in the paper) and e by
              the decoder's learned null with p = unclip.drop_image (0.1), independently; then
              ``ddpm``'s denoising loss on the pixels
    sampling  text:        caption -> the prior's e (best of prior.num_candidates) -> decoder
              variations:  image -> its e -> the decoder with the empty caption, DDIM at
                           η = unclip.variation_eta, so the draws differ
              interpolate: a spherical walk between two images' e, one shared x_T, η = 0
              each guided against the null of both: ε̂ = ε̂(∅, ∅) + s (ε̂(y, e) − ε̂(∅, ∅))

The decoder trains on real images' embeddings: the prior is only used to sample. `make train`
trains the prior run first when it has no checkpoint (which trains the CLIP first when it has
none), so one command runs all three stages, each a run of the one loop.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from diffusax import conditions, contrastive, losses
from diffusax.config import ConfigError
from diffusax.methods import base
from diffusax.methods import prior as prior_method
from diffusax.methods.ddpm import DDPM, make_generate, make_schedule, sample_conditions

SECTION = "unclip"
PRIOR_KEY = 40_000_003  # folded into a sampling key for the prior's draws


# ---------------------------------------------------------------------------------------------
# The condition and the maths, as pure functions


@dataclasses.dataclass(frozen=True)
class DecoderCondition:
    """The decoder's condition: a caption and an image embedding (``UnclipDecoder``'s dict),
    in the interface ``losses`` and ``make_generate`` use for ``conditions.Condition``."""

    text: conditions.Condition
    embed_dim: int
    kind: str = "unclip"

    def from_batch(self, batch: dict) -> dict:
        keys = ("tokens", "mask", "image_embedding", "image_null")
        return dict(zip(("tokens", "mask", "image", "image_null"), (batch[k] for k in keys)))

    def null_row(self) -> dict:
        """One example's null: the empty caption and the flag for the learned null image."""
        text = self.text.null_row()
        return {
            "tokens": text["tokens"],
            "mask": text["mask"],
            "image": np.zeros((self.embed_dim,), np.float32),
            "image_null": np.bool_(True),
        }

    spec = conditions.Condition.spec  # the shapes of null_row's leaves, with a batch axis


def decoder_condition(tokens, mask, image_embedding) -> dict:
    """The decoder's condition of captions (B, L) and unit image embeddings (B, D)."""
    rows = image_embedding.shape[0]
    return {
        "tokens": tokens,
        "mask": jnp.asarray(mask, bool),
        "image": image_embedding,
        "image_null": jnp.zeros((rows,), bool),
    }


def drop_conditions(y: dict, key, *, text_rate: float, image_rate: float, text_null: dict):
    """(y with the caption replaced by ``text_null`` (one example's {"tokens", "mask"}) where a
    Bernoulli(``text_rate``) draw says so and ``image_null`` set where an independent
    Bernoulli(``image_rate``) draw says so, (text dropped (B,), image dropped (B,)))."""
    key_text, key_image = jax.random.split(key)
    rows = y["tokens"].shape[0]
    no_text = jax.random.bernoulli(key_text, text_rate, (rows,))  # (B,)
    no_image = jax.random.bernoulli(key_image, image_rate, (rows,))  # (B,)
    tokens = jnp.where(no_text[:, None], jnp.asarray(text_null["tokens"]), y["tokens"])
    mask = jnp.where(no_text[:, None], jnp.asarray(text_null["mask"]), y["mask"])
    out = dict(y, tokens=tokens, mask=mask, image_null=y["image_null"] | no_image)
    return out, (no_text, no_image)


def slerp(a, b, weights):
    """Unit vectors a, b (D,) and weights (N,) in [0, 1] -> (N, D): the points of the great
    circle from a to b at those fractions of the angle (Shoemake's slerp)."""
    a, b = contrastive.l2_normalize(a), contrastive.l2_normalize(b)
    theta = jnp.arccos(jnp.clip(jnp.dot(a, b), -1.0, 1.0))
    w = jnp.asarray(weights, jnp.float32)[:, None]  # (N, 1)
    sin = jnp.sin(theta)
    # Near-parallel vectors: the linear walk is the limit (and avoids 0 / 0).
    lerp = (1 - w) * a + w * b
    arc = (jnp.sin((1 - w) * theta) * a + jnp.sin(w * theta) * b) / jnp.where(sin > 1e-6, sin, 1)
    return contrastive.l2_normalize(jnp.where(sin > 1e-6, arc, lerp))


# ---------------------------------------------------------------------------------------------
# The networks


def condition_of(cfg, data) -> DecoderCondition:
    return DecoderCondition(conditions.from_config(cfg, data.dataset_classes), cfg.clip.embed_dim)


def build_decoder(cfg, image_shape, text: conditions.Condition):
    """key -> ``UnclipDecoder`` with the config's U-Net (``model``) and text encoder (``text``)."""
    from flax import nnx

    from diffusax import diffusion, models
    from diffusax.models.unclip_decoder import UnclipDecoder

    height, _, channels = image_shape
    learned = cfg.diffusion.var_type in diffusion.LEARNED_VAR_TYPES
    out_channels = 2 * channels if learned else channels
    unet_kwargs = models.unet_cond_kwargs(
        cfg.model, height=height, channels=channels, out_channels=out_channels
    )
    text_kwargs = conditions.encoder_kwargs(cfg, text)["text_kwargs"]

    def build(key):
        models.check_image_shape(cfg.model, tuple(image_shape))
        return UnclipDecoder(
            embed_dim=cfg.clip.embed_dim,
            unet_kwargs=unet_kwargs,
            text_kwargs=text_kwargs,
            bos_id=text.bos_id,
            dtype=models.DTYPES[cfg.model.dtype],
            rngs=nnx.Rngs(params=key),
        )

    return build


def prior_run_dir(cfg) -> str:
    return cfg.unclip.prior[len("run:") :]


def has_checkpoint(run_dir: str) -> bool:
    ckpts = os.path.join(run_dir, "checkpoints")
    return os.path.isdir(ckpts) and bool(os.listdir(ckpts))


def train_prior_if_missing(cfg) -> None:
    """`make train`: train the prior run first when it has no checkpoint and
    ``unclip.prior_experiment`` names the experiment that makes it (which trains its CLIP
    first when that has none)."""
    experiment = cfg.unclip.prior_experiment
    if not experiment or has_checkpoint(prior_run_dir(cfg)):
        return
    from diffusax import config as config_lib
    from diffusax.train import loop

    prior_cfg = config_lib.load_experiment(experiment, overrides={"runlocal": cfg.runlocal})
    prior_method.train_clip_if_missing(prior_cfg)
    print(f"unclip: the prior {cfg.unclip.prior} has no checkpoint: training it ({experiment})")
    result = loop.train(prior_cfg, prior_run_dir(cfg))
    if result.stopped_by is not None:
        raise ConfigError(f"the prior's training ({experiment}) was stopped; run it again")


def prior_loader(cfg):
    from diffusax.train.build import load_from_run

    read = load_from_run(prior_run_dir(cfg))  # its EMA, which the prior samples with

    def load():
        try:
            return read()
        except FileNotFoundError as e:
            name = os.path.splitext(os.path.basename(cfg.unclip.prior_experiment))[0]
            hint = f": make train EXP={name} makes it" if name else ""
            raise FileNotFoundError(f"{e} (the prior {cfg.unclip.prior!r}{hint})") from e

    return load


# ---------------------------------------------------------------------------------------------
# The method


class Unclip(DDPM):
    name = "unclip"
    param_sections = ("model", "text", "clip", SECTION)
    pixel_bound = False  # its bound would be conditional on embeddings the held-out set lacks
    modes = ("train", "sample", "eval", "info", "interpolate", "variations")

    def validate(self, cfg):
        super().validate(cfg)  # the diffusion fields, the text condition and prompts
        prior_method.Prior().validate(cfg)  # the CLIP's and the prior's fields
        u = cfg.unclip
        if not u.prior.startswith("run:") or not prior_run_dir(cfg):
            raise ConfigError(
                f"config field 'unclip.prior' must be 'run:DIR' (a run of method 'prior'), got "
                f"{u.prior!r}"
            )
        base.check_fields(cfg, SECTION, unit_interval=("drop_text", "drop_image"))
        base.check_fields(cfg, SECTION, non_negative=("variation_eta",))
        if cfg.sample.guidance_scale != 1.0 and u.drop_text == 0 and u.drop_image == 0:
            raise ConfigError(
                f"config field 'sample.guidance_scale' is {cfg.sample.guidance_scale}: guidance "
                f"needs the null conditions trained, unclip.drop_text or unclip.drop_image > 0"
            )
        if len(tuple(u.interpolate_indices)) != 2:
            raise ConfigError(
                f"config field 'unclip.interpolate_indices' must be two held-out indices, got "
                f"{tuple(u.interpolate_indices)}"
            )
        if not u.num_variations >= 1:
            raise ConfigError(
                f"config field 'unclip.num_variations' must be >= 1, got {u.num_variations!r}"
            )

    def prepare(self, cfg):
        train_prior_if_missing(cfg)

    def networks(self, cfg, data):
        text = conditions.from_config(cfg, data.dataset_classes)
        return {
            "model": base.Network(build_decoder(cfg, data.image_shape, text)),
            "clip": base.Network(
                build=prior_method.clip_method.build_dual_encoder(cfg, data.image_shape),
                trainable=False,
                source=cfg.prior.clip,
                load=prior_method.clip_loader(cfg),
            ),
            "prior": base.Network(
                build=prior_method.build_prior(cfg),
                trainable=False,
                source=cfg.unclip.prior,
                load=prior_loader(cfg),
            ),
        }

    def updates(self, cfg, ctx):
        d, u = cfg.diffusion, cfg.unclip
        cond = condition_of(cfg, ctx.data)
        inner = losses.make_diffusion_loss(
            ctx.apply_fn("model"),
            make_schedule(cfg),
            prediction=d.prediction,
            var_type=d.var_type,
            vlb_weight=d.vlb_weight,
            min_snr_gamma=d.min_snr_gamma or None,
            condition=cond,  # dropped here, not by the loss: two nulls at their own rates
        )
        text_null = cond.text.null_row()

        def loss(params, frozen, batch, key):
            drop_key, key = jax.random.split(key)
            clip_model = ctx.module("clip", frozen["clip"])
            e = jax.lax.stop_gradient(prior_method.image_embeddings(clip_model, batch["image"]))
            y = decoder_condition(batch["tokens"], batch["mask"], e)
            y, (no_text, no_image) = drop_conditions(
                y, drop_key, text_rate=u.drop_text, image_rate=u.drop_image, text_null=text_null
            )
            fields = {
                "image": batch["image"],
                "tokens": y["tokens"],
                "mask": y["mask"],
                "image_embedding": y["image"],
                "image_null": y["image_null"],
            }
            value, metrics = inner(params["model"], fields, key)
            rates = {"text_null_rate": jnp.mean(no_text), "image_null_rate": jnp.mean(no_image)}
            return value, {**metrics, **rates}

        return [base.GradUpdate("model", loss)]

    def sample_params(self, state, frozen, cfg):
        return {"model": state.ema["ema"], "clip": frozen["clip"], "prior": frozen["prior"]}

    def decoder_sampler(self, run, sample_cfg, *, shared_noise: bool = False):
        """The jitted ``generate(decoder params, decoder condition, key) -> images``."""
        return make_generate(
            run.cfg,
            run.ctx.apply_fn("model"),
            make_schedule(run.cfg),
            None,
            run.data.image_shape,
            sample_cfg=sample_cfg,
            mesh=run.mesh,
            condition=condition_of(run.cfg, run.data),
            shared_noise=shared_noise,
        )

    def make_sampler(self, run, sample_cfg):
        """Text to image: ``generate(params, {"tokens", "mask"}, key)``."""
        decode = self.decoder_sampler(run, sample_cfg)
        sched, settings = prior_method.make_schedule(run.cfg), prior_method.sampling_of(run.cfg)

        @jax.jit
        def generate(params, y, key):
            clip_model = run.ctx.module("clip", params["clip"])
            prior_model = run.ctx.module("prior", params["prior"])
            e = prior_method.sample_image_embeddings(
                clip_model,
                prior_model,
                y["tokens"],
                y["mask"],
                jax.random.fold_in(key, PRIOR_KEY),
                sched=sched,
                settings=settings,
            )
            return decode(params["model"], decoder_condition(y["tokens"], y["mask"], e), key)

        return generate

    def make_image_sampler(self, run, sample_cfg, *, shared_noise: bool = False):
        """Image embeddings to images with the empty caption: ``generate(params, e (B, D),
        key)`` (variations, interpolations)."""
        decode = self.decoder_sampler(run, sample_cfg, shared_noise=shared_noise)
        text_null = condition_of(run.cfg, run.data).text.null_row()

        @jax.jit
        def generate(params, e, key):
            rows = e.shape[0]
            tokens = jnp.broadcast_to(
                jnp.asarray(text_null["tokens"]), (rows, len(text_null["tokens"]))
            )
            mask = jnp.broadcast_to(jnp.asarray(text_null["mask"]), tokens.shape)
            return decode(params["model"], decoder_condition(tokens, mask, e), key)

        return generate

    def sample_conditions(self, run, num, sample_cfg):
        return sample_conditions(run.cfg, run.data, num, sample_cfg)  # captions (a text condition)

    def variations_to_disk(self, cfg, workdir):
        from diffusax.evaluate import unclip_eval

        return unclip_eval.variations_to_disk(cfg, workdir)

    def interpolate_to_disk(self, cfg, workdir):
        from diffusax.evaluate import unclip_eval

        return unclip_eval.interpolate_to_disk(cfg, workdir)

    def evaluate(self, cfg, workdir):
        from diffusax.evaluate import unclip_eval

        return unclip_eval.evaluate(cfg, workdir)

    def format_report(self, report):
        from diffusax.evaluate import unclip_eval

        return unclip_eval.format_report(report)

    def forward_flops(self, run):
        from flax import nnx

        from diffusax import models
        from diffusax.train.state import model_graphdef

        build = run.networks["model"].build
        abstract = nnx.eval_shape(lambda: build(run.init_key))
        y = condition_of(run.cfg, run.data).spec(1)
        flops = models.forward_flops(
            model_graphdef(build, run.init_key), abstract, run.data.image_shape, None, y
        )
        return {"model": flops}

    def describe(self, cfg):
        u = cfg.unclip
        return (
            f"{self.name}  (unCLIP decoder on the CLIP {cfg.prior.clip}'s image embeddings and "
            f"captions, prior {u.prior}; caption -> empty at {u.drop_text}, embedding -> null at "
            f"{u.drop_image}; {super().describe(cfg).split('(', 1)[1]}"
        )

    def describe_sampler(self, cfg):
        return (
            f"prior: {prior_method.Prior().describe_sampler(cfg)}; decoder: "
            f"{super().describe_sampler(cfg)}"
        )


base.register(Unclip())
