"""The diffusion prior of unCLIP (DALL·E 2, Ramesh et al. 2022, §2.2): stage 2, a caption ->
a CLIP image embedding, for the decoder (stage 3) to turn into an image.

    networks  {"clip": the frozen DualEncoder of a clip run (prior.clip = "run:DIR"),
               "prior": models.prior_transformer.PriorTransformer}, trainable
    groups    {"prior": optim};  EMA {"ema": prior, optim.ema_decay}, which is sampled
    update    z_0 = √D · u(x),  u = the unit CLIP image embedding of the batch's image
              t ~ U{0..T-1}, ε ~ N(0, I), z_t = √ᾱ_t z_0 + √(1-ᾱ_t) ε     (cosine ᾱ)
              n ~ Bernoulli(prior.drop_text) per example: the caption -> the learned null
              loss = E ‖ẑ_0(z_t, t, caption or null) - z_0‖² / D      (x_0 prediction, MSE)
    sampling  DDPM or DDIM over embeddings (prior.sampler, prior.num_steps) in lax.scan, guided
              ẑ_0 = ẑ_0(∅) + s (ẑ_0(y) - ẑ_0(∅)), s = prior.guidance_scale; K =
              prior.num_candidates draws per caption, keeping the one of largest cosine with
              the caption's CLIP text embedding (the paper's "sample two ... and keep the one
              with the higher dot product"); the result is returned as a unit vector.

The caption reaches the prior as the paper's sequence: the frozen text tower's final token
states, its (unit) text embedding √D-scaled like z, the time, z_t, and a learned query.

Why z_0 = √D · u, not standardised embeddings (diffusers' UnCLIP / Karlo keep a per-coordinate
clip_mean and clip_std): a unit vector scaled by √D has a mean squared coordinate of exactly 1,
the scale of the unit-variance noise the ᾱ schedule is designed for, whatever the CLIP (lucidrains'
DALLE2-pytorch does the same, its ``image_embed_scale = dim ** 0.5``). Standardising needs
statistics of a training pass kept beside the run, which must change whenever the CLIP does;
and the decoder and the candidate selection only use the direction. The embeddings the decoder
gets (``sample_image_embeddings``) are unit vectors, as ``image_embeddings`` of real images.

The decoder stage calls ``sample_image_embeddings(clip, prior, tokens, mask, key, ...)`` inside
its own jitted function, or ``load_sampler(cfg, workdir)`` for a trained prior run.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusax import contrastive, diffusion, sampling, schedules
from diffusax.config import ConfigError
from diffusax.methods import base
from diffusax.methods import clip as clip_method

SECTION = "prior"
SAMPLERS = ("ddpm", "ddim")
CLIP_PATH = ("params", "clip")  # where a clip run's checkpoint keeps the dual encoder


# ---------------------------------------------------------------------------------------------
# The maths, as pure functions


def embedding_scale(dim: int) -> float:
    """√D: z = √D · u has mean squared coordinate 1 for a unit u of D coordinates."""
    return math.sqrt(dim)


def image_embeddings(clip_model, images):
    """(B, H, W, C) images in [-1, 1] -> (B, D) unit CLIP image embeddings u(x)."""
    return contrastive.l2_normalize(clip_model.encode_image(images))


def text_condition(clip_model, tokens, mask) -> dict:
    """What the prior reads of a caption: {"states": the text tower's final token states (B, L,
    W), "mask": (B, L) bool, "text": the unit CLIP text embedding (B, D), "null": (B,) False}.

    ``encode_text`` runs the text tower again on the same tokens; under jit XLA's common
    subexpression elimination computes it once."""
    states, _ = clip_model.text(tokens, mask=mask)  # (B, L, W)
    text = contrastive.l2_normalize(clip_model.encode_text(tokens, mask))  # (B, D)
    mask = jnp.asarray(mask, bool)
    null = jnp.zeros((mask.shape[0],), bool)
    return {"states": states, "mask": mask, "text": text, "null": null}


def null_condition_row(context_length: int, text_width: int, embed_dim: int) -> dict:
    """One example's null caption, as ``text_condition`` lays it out: ``null`` True makes the
    prior read its learned null tokens and null text embedding; the other values are ignored."""
    return {
        "states": np.zeros((context_length, text_width), np.float32),
        "mask": np.ones((context_length,), bool),
        "text": np.zeros((embed_dim,), np.float32),
        "null": np.bool_(True),
    }


def prior_apply(prior_model):
    """``net(z_t, t, cond) -> ẑ_0``: the prior over ``text_condition``'s dict, with the unit
    text embedding √D-scaled into the prior's space."""
    scale = embedding_scale(prior_model.embed_dim)

    def net(z_t, t, cond):
        return prior_model(z_t, t, cond["states"], cond["mask"], scale * cond["text"], cond["null"])

    return net


def x0_loss(predicted, z0):
    """E ‖ẑ_0 - z_0‖² / D: the mean over the batch and the D coordinates."""
    return jnp.mean(diffusion.mean_flat((predicted - z0) ** 2))


def prior_loss(predict, sched, z0, key, drop_rate: float):
    """(loss, metrics) of the x_0-prediction prior on targets ``z0`` (B, D).

    ``predict(z_t, t, null) -> ẑ_0``; ``null`` (B,) bool marks the examples whose caption is
    replaced by the null condition, drawn Bernoulli(``drop_rate``). Keys: t, ε and the drop
    from ``split(key, 3)`` in that order.
    """
    key_t, key_eps, key_null = jax.random.split(key, 3)
    b = z0.shape[0]
    t = jax.random.randint(key_t, (b,), 0, sched.num_timesteps)  # (B,)
    eps = jax.random.normal(key_eps, z0.shape, z0.dtype)  # (B, D)
    z_t = diffusion.q_sample(sched, z0, t, eps)  # (B, D)
    null = jax.random.bernoulli(key_null, drop_rate, (b,))  # (B,)
    predicted = predict(z_t, t, null)  # (B, D)
    loss = x0_loss(predicted, z0)
    cosine = jnp.sum(contrastive.l2_normalize(predicted) * contrastive.l2_normalize(z0), -1)
    return loss, {"loss": loss, "null_rate": jnp.mean(null), "cosine": jnp.mean(cosine)}


def select_candidates(candidates, text):
    """(K, B, D) candidates, (B, D) text embeddings -> (B, D): for each caption the candidate
    with the largest cosine similarity to its text embedding (the first on a tie)."""
    cos = jnp.sum(contrastive.l2_normalize(candidates) * contrastive.l2_normalize(text)[None], -1)
    best = jnp.argmax(cos, axis=0)  # (B,)
    return jnp.take_along_axis(candidates, best[None, :, None], axis=0)[0]  # (B, D)


class Sampling(NamedTuple):
    """How embeddings are drawn (``sampling_of(cfg)`` reads the prior section)."""

    sampler: str = "ddim"  # ddpm | ddim
    num_steps: int = 25  # of the training schedule's timesteps (trailing spacing)
    guidance_scale: float = 1.0  # s; 1 = the conditional prior
    eta: float = 0.0  # DDIM's η
    num_candidates: int = 2  # K draws per caption, the closest to its text embedding kept


def sampling_of(cfg, **changes) -> Sampling:
    p = cfg.prior
    return Sampling(p.sampler, p.num_steps, p.guidance_scale, p.eta, p.num_candidates)._replace(
        **changes
    )


def sample_from_condition(prior_model, cond: dict, key, *, sched, settings: Sampling):
    """(B, D) unit image embeddings for ``text_condition``'s ``cond``: K candidates per
    caption drawn in one batch (candidate k of caption b is row k·B + b), each ẑ_0 guided, the
    closest to the caption's text embedding kept."""
    k, b = settings.num_candidates, cond["text"].shape[0]
    dim = prior_model.embed_dim
    net = prior_apply(prior_model)
    if settings.guidance_scale != 1.0:
        null = null_condition_row(prior_model.context_length, prior_model.text_width, dim)
        net = sampling.classifier_free_guidance(net, settings.guidance_scale, null_label=null)
    tiled = jax.tree.map(lambda v: jnp.concatenate([v] * k), cond)  # (K·B, ...)
    z = sampling.sample(
        sampling.bind_condition(net, tiled),
        sched,
        (k * b, dim),
        key,
        sampler=settings.sampler,
        num_steps=settings.num_steps,
        prediction="x0",
        var_type="fixed_small",  # σ² = β̃, the posterior variance (UnCLIP's prior scheduler)
        eta=settings.eta,
    )  # (K·B, D)
    best = select_candidates(z.reshape(k, b, dim), cond["text"])  # (B, D)
    return contrastive.l2_normalize(best)


def sample_image_embeddings(clip_model, prior_model, tokens, mask, key, *, sched, settings):
    """Captions -> image embeddings: (B, L) token ids and (B, L) masks -> (B, D) unit vectors
    in the CLIP image embedding space (as ``image_embeddings`` of real images).

    Pure: call it inside ``jax.jit`` with modules merged there (``nnx.merge``), or through
    ``load_sampler``. ``sched``: ``make_schedule(cfg)``; ``settings``: ``sampling_of(cfg)``.
    """
    cond = text_condition(clip_model, tokens, mask)
    return sample_from_condition(prior_model, cond, key, sched=sched, settings=settings)


def make_schedule(cfg) -> schedules.Schedule:
    """The prior's cosine ᾱ schedule (Improved DDPM's, as the paper's prior)."""
    return schedules.schedule_from_config("cosine", cfg.prior.num_timesteps)


# ---------------------------------------------------------------------------------------------
# The networks


def build_prior(cfg):
    """key -> ``PriorTransformer`` for the config's CLIP (clip.embed_dim, the text section)."""
    from flax import nnx

    from diffusax.models.prior_transformer import PriorTransformer

    p, t = cfg.prior, cfg.text

    def build(key):
        return PriorTransformer(
            embed_dim=cfg.clip.embed_dim,
            text_width=t.width,
            context_length=t.context_length,
            width=p.width,
            layers=p.layers,
            heads=p.heads,
            mlp_dim=p.mlp_dim,
            causal=p.causal,
            rngs=nnx.Rngs(params=key),
        )

    return build


def clip_run_dir(cfg) -> str:
    return cfg.prior.clip[len("run:") :]


def clip_loader(cfg):
    """The frozen CLIP's parameters from the clip run, whose tokenizer must be the config's."""
    from diffusax import conditions
    from diffusax.train.build import load_from_run

    run_dir = clip_run_dir(cfg)
    read = load_from_run(run_dir, CLIP_PATH)

    def load():
        try:
            tree = read()
        except FileNotFoundError as e:
            name = os.path.splitext(os.path.basename(cfg.prior.clip_experiment))[0]
            hint = f": make train EXP={name} makes it" if name else ""
            raise FileNotFoundError(f"{e} (the CLIP {cfg.prior.clip!r}{hint})") from e
        # Its token embeddings belong to the vocabulary it was trained with.
        conditions.keep_tokenizer_with_run(cfg, run_dir, write=False)
        return tree

    return load


def train_clip_if_missing(cfg) -> None:
    """`make train`: train the CLIP run first when it has no checkpoint and
    ``prior.clip_experiment`` names the experiment that makes it (at this run's runlocal)."""
    experiment = cfg.prior.clip_experiment
    ckpts = os.path.join(clip_run_dir(cfg), "checkpoints")
    if not experiment or (os.path.isdir(ckpts) and os.listdir(ckpts)):
        return
    from diffusax import config as config_lib
    from diffusax.train import loop

    clip_cfg = config_lib.load_experiment(experiment, overrides={"runlocal": cfg.runlocal})
    print(f"prior: the CLIP {cfg.prior.clip} has no checkpoint: training it first ({experiment})")
    result = loop.train(clip_cfg, clip_run_dir(cfg))
    if result.stopped_by is not None:
        raise ConfigError(f"the CLIP's training ({experiment}) was stopped; run it again")


# ---------------------------------------------------------------------------------------------
# The method


class Prior(base.Method):
    name = "prior"
    # The prior's own sizes, and the CLIP's, which set its input widths.
    param_sections = (SECTION, "clip", "text")
    pixel_bound = False
    modes = ("train", "eval", "info")  # it draws embeddings, not images

    def validate(self, cfg):
        clip_method.Clip().validate(cfg)  # condition.kind = text, the CLIP's and text fields
        p = cfg.prior
        if not p.clip.startswith("run:") or not p.clip[len("run:") :]:
            raise ConfigError(
                f"config field 'prior.clip' must be 'run:DIR' (a run of method 'clip'), got "
                f"{p.clip!r}"
            )
        base.check_fields(
            cfg,
            SECTION,
            positive=("width", "layers", "heads", "num_timesteps", "num_steps", "num_candidates"),
            non_negative=("mlp_dim", "eta", "guidance_scale"),
            unit_interval=("drop_text",),
        )
        if p.width % p.heads:
            raise ConfigError(
                f"config field 'prior.heads' ({p.heads}) must divide prior.width ({p.width})"
            )
        if p.sampler not in SAMPLERS:
            raise ConfigError(f"config field 'prior.sampler' must be one of {SAMPLERS}")
        if p.num_steps > p.num_timesteps:
            raise ConfigError(
                f"config field 'prior.num_steps' ({p.num_steps}) must be at most "
                f"prior.num_timesteps ({p.num_timesteps})"
            )
        if p.eta and p.sampler != "ddim":
            raise ConfigError("config field 'prior.eta' applies only to prior.sampler='ddim'")
        if not math.isfinite(p.guidance_scale):
            raise ConfigError("config field 'prior.guidance_scale' must be finite")
        if p.guidance_scale != 1.0 and p.drop_text == 0:
            raise ConfigError(
                f"config field 'prior.guidance_scale' is {p.guidance_scale}: guidance needs "
                f"the null condition trained, prior.drop_text > 0"
            )

    def prepare(self, cfg):
        train_clip_if_missing(cfg)

    def networks(self, cfg, data):
        return {
            "clip": base.Network(
                build=clip_method.build_dual_encoder(cfg, data.image_shape),
                trainable=False,
                source=cfg.prior.clip,
                load=clip_loader(cfg),
            ),
            "prior": base.Network(build=build_prior(cfg)),
        }

    def groups(self, cfg):
        return {"prior": base.Group("prior", optim="optim")}

    def emas(self, cfg):
        return {"ema": base.Ema("prior", cfg.optim.ema_decay)}

    def updates(self, cfg, ctx):
        sched, rate = make_schedule(cfg), cfg.prior.drop_text

        def loss(params, frozen, batch, key):
            clip_model = ctx.module("clip", frozen["clip"])
            prior_model = ctx.module("prior", params["prior"])
            scale = embedding_scale(prior_model.embed_dim)
            z0 = scale * image_embeddings(clip_model, batch["image"])  # (B, D)
            cond = text_condition(clip_model, batch["tokens"], batch["mask"])
            net = prior_apply(prior_model)
            predict = lambda z_t, t, null: net(z_t, t, dict(cond, null=null))
            return prior_loss(predict, sched, z0, key, rate)

        return [base.GradUpdate("prior", loss)]

    def sample_params(self, state, frozen, cfg):
        return state.ema["ema"]

    def sample_network(self, cfg):
        return "prior"

    def sample_to_disk(self, cfg, workdir):
        raise ConfigError(
            "method 'prior' draws image embeddings, not images: score it with `make eval`; "
            "the decoder stage samples it through methods.prior.sample_image_embeddings"
        )

    def evaluate(self, cfg, workdir):
        from diffusax.evaluate import prior_eval

        return prior_eval.evaluate(cfg, workdir)

    def format_report(self, report):
        from diffusax.evaluate import prior_eval

        return prior_eval.format_report(report)

    def describe(self, cfg):
        p = cfg.prior
        return (
            f"{self.name}  (unCLIP prior over the CLIP {p.clip}: {'causal' if p.causal else 'full'}"
            f" transformer {p.layers} x {p.width}, {p.heads} heads; x_0 prediction, cosine ᾱ, "
            f"T={p.num_timesteps}; caption -> learned null at {p.drop_text})"
        )

    def describe_sampler(self, cfg):
        p = cfg.prior
        return (
            f"{p.sampler}, {p.num_steps} steps, guidance {p.guidance_scale}, best of "
            f"{p.num_candidates} by text similarity"
        )


def make_sampler_fn(run, settings: Sampling | None = None):
    """A jitted ``fn(params, tokens, mask, key) -> (B, D) unit image embeddings`` of a built
    prior run; ``params`` = {"clip": the CLIP's tree, "prior": the prior's (its EMA)}."""
    cfg = run.cfg
    sched, settings = make_schedule(cfg), settings or sampling_of(cfg)

    @jax.jit
    def fn(params, tokens, mask, key):
        clip_model = run.ctx.module("clip", params["clip"])
        prior_model = run.ctx.module("prior", params["prior"])
        return sample_image_embeddings(
            clip_model, prior_model, tokens, mask, key, sched=sched, settings=settings
        )

    return fn


def load_sampler(cfg, workdir: str, *, devices=None, settings: Sampling | None = None):
    """(fn, params) of the trained prior run in ``workdir``: ``fn(params, tokens, mask, key)``
    gives unit image embeddings, sampled with the prior's EMA and the frozen CLIP."""
    from diffusax import inference

    trained = inference.load_trained(cfg, workdir, devices=devices)
    params = {"clip": trained.run.frozen()["clip"], "prior": trained.params}
    return make_sampler_fn(trained.run, settings), params


base.register(Prior())
