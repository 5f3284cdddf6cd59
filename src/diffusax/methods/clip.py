"""CLIP (Radford et al. 2021): an image tower and a text tower trained together with the
symmetric InfoNCE loss on (image, caption) pairs (``diffusax.contrastive``); stage 1 of
unCLIP (DALL·E 2), whose prior and decoder condition on these embeddings.

    networks  {"clip": models.clip_towers.DualEncoder (image convnet, CLIP text transformer,
              text projection, learnable logit scale t)}, trainable
    groups    {"clip": optim};  no EMA (CLIP keeps none)
    update    loss = ½ [CE(L, arange) + CE(Lᵀ, arange)],  L = exp(min(t, t_max)) U Vᵀ, with U, V
              the L2-normalised embeddings of the batch's images (randomly shifted by up to
              clip.max_shift pixels) and captions
    sampling  none: CLIP draws no images (`make sample` is refused, naming the modes it runs)

The captions are the digits' own (``data.captions``: class plus measured thickness and slant,
drawn afresh every step), tokenized by the `text` section's tokenizer; they reach the batches
through ``condition.kind = "text"``, as for text-conditional diffusion. `make eval`
(``evaluate.clip_eval``) scores zero-shot classification and caption-to-image retrieval on the
held-out digits.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from diffusax import conditions, contrastive
from diffusax.config import ConfigError
from diffusax.methods import base

SECTION = "clip"


def build_dual_encoder(cfg, image_shape):
    """key -> ``DualEncoder`` for images of ``image_shape`` (H, W, C) and the `text` section."""
    from diffusax.models.clip_towers import DualEncoder

    c = cfg.clip
    text_kwargs = text_encoder_kwargs(cfg)

    def build(key):
        return DualEncoder(
            image_shape=tuple(image_shape),
            image_widths=tuple(c.image_widths),
            text_kwargs=text_kwargs,
            embed_dim=c.embed_dim,
            init_logit_scale=c.init_logit_scale,
            rngs=nnx.Rngs(params=key),
        )

    return build


def text_encoder_kwargs(cfg) -> dict:
    """``TextEncoder``'s arguments from the `text` section and the captions' tokenizer."""
    t = cfg.text
    tok = conditions.tokenizer_from_config(cfg)
    return dict(
        vocab_size=tok.vocab_size,
        width=t.width,
        layers=t.layers,
        heads=t.heads,
        mlp_dim=t.mlp_dim or 4 * t.width,
        context_length=t.context_length,
        eos_token_id=tok.eos_id,
    )


def random_shift(images, key, max_shift: int):
    """Each image translated by up to ``max_shift`` pixels each way, the border filled with -1
    (no ink): a random crop of the padded image, the one augmentation CLIP trains with. A shift
    keeps the stroke thickness and slant the captions name."""
    if max_shift == 0:
        return images
    n, h, w, c = images.shape
    p = max_shift
    padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=-1.0)
    corners = jax.random.randint(key, (n, 2), 0, 2 * p + 1)  # (B, 2) top-left of each crop
    crop = lambda image, at: jax.lax.dynamic_slice(image, (at[0], at[1], 0), (h, w, c))
    return jax.vmap(crop)(padded, corners)  # (B, H, W, C)


def make_loss(cfg, ctx):
    """loss(params, frozen, batch, key) -> (loss, metrics): InfoNCE over the batch's pairs."""
    max_scale, max_shift = cfg.clip.max_logit_scale, cfg.clip.max_shift

    def loss(params, frozen, batch, key):
        del frozen  # nothing is frozen
        model = ctx.module("clip", params["clip"])
        images = random_shift(batch["image"], key, max_shift)  # (B, H, W, C)
        image_features = model.encode_image(images)  # (B, D)
        text_features = model.encode_text(batch["tokens"], batch["mask"])  # (B, D)
        return contrastive.info_nce_loss(
            image_features, text_features, model.logit_scale[...], max_scale
        )

    return loss


class Clip(base.Method):
    name = "clip"
    param_sections = (SECTION, "text")
    pixel_bound = False
    modes = ("train", "eval", "info")  # no sampler: it draws no images

    def validate(self, cfg):
        if cfg.condition.kind != "text":
            raise ConfigError(
                f"config field 'condition.kind' is {cfg.condition.kind!r}: method 'clip' trains "
                f"on (image, caption) pairs, which the batches carry with condition.kind='text'"
            )
        c = cfg.clip
        base.check_fields(
            cfg, SECTION, positive=("embed_dim", "max_logit_scale"), non_negative=("max_shift",)
        )
        widths = tuple(c.image_widths)
        if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ConfigError(
                f"config field 'clip.image_widths' must be a non-empty tuple of positive ints, "
                f"got {widths!r}"
            )
        if not math.isfinite(c.init_logit_scale) or c.init_logit_scale > c.max_logit_scale:
            raise ConfigError(
                f"config field 'clip.init_logit_scale' ({c.init_logit_scale!r}) must be finite "
                f"and at most clip.max_logit_scale ({c.max_logit_scale!r})"
            )
        self.zero_shot_prompts(cfg)  # every prompt tokenizes, or a ConfigError naming it
        conditions.validate(cfg)  # the text tower's sizes and the captions' fit

    def zero_shot_prompts(self, cfg) -> list[str]:
        """The prompt of each class from ``eval.zero_shot_prompt`` ({n}: numeral, {word}: name)."""
        from diffusax.data import captions

        template = cfg.eval.zero_shot_prompt
        try:
            prompts = [
                template.format(n=c, word=captions.NUMBER_WORDS[c])
                for c in range(len(captions.NUMBER_WORDS))
            ]
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(
                f"config field 'eval.zero_shot_prompt' ({template!r}) must be a format string "
                f"with only {{n}} and {{word}}: {e!r}"
            ) from e
        if len(set(prompts)) < len(prompts):
            raise ConfigError(
                f"config field 'eval.zero_shot_prompt' ({template!r}) must name the class "
                f"with {{n}} or {{word}}"
            )
        tok = conditions.tokenizer_from_config(cfg)
        try:
            tok.encode(prompts, cfg.text.context_length, field="eval.zero_shot_prompt")
        except ValueError as e:
            raise ConfigError(str(e)) from e
        return prompts

    def networks(self, cfg, data):
        h, w = data.image_shape[:2]
        halvings = len(cfg.clip.image_widths) - 1
        if h % 2**halvings or w % 2**halvings:
            raise ConfigError(
                f"config field 'clip.image_widths' has {halvings + 1} convolutions, {halvings} "
                f"of them halving the image: {data.name!r} images of {h}x{w} are not divisible "
                f"by {2**halvings}"
            )
        return {"clip": base.Network(build=build_dual_encoder(cfg, data.image_shape))}

    def groups(self, cfg):
        return {"clip": base.Group("clip", optim="optim")}

    def updates(self, cfg, ctx):
        return [base.GradUpdate("clip", make_loss(cfg, ctx))]

    def sample_params(self, state, frozen, cfg):
        return state.params["clip"]

    def sample_network(self, cfg):
        return "clip"

    def sample_to_disk(self, cfg, workdir):
        raise ConfigError(
            "method 'clip' draws no samples (it embeds images and captions): train it with "
            "`make train`, score it with `make eval`"
        )

    def evaluate(self, cfg, workdir):
        from diffusax.evaluate import clip_eval

        return clip_eval.evaluate(cfg, workdir)

    def format_report(self, report):
        from diffusax.evaluate import clip_eval

        return clip_eval.format_report(report)

    def describe(self, cfg):
        c, t = cfg.clip, cfg.text
        return (
            f"{self.name}  (symmetric InfoNCE, learnable temperature from exp(t) = "
            f"{math.exp(c.init_logit_scale):.3g}, at most {math.exp(c.max_logit_scale):.3g}; "
            f"image convnet {tuple(c.image_widths)}, text transformer {t.layers} x {t.width} "
            f"over {t.tokenizer}; joint space {c.embed_dim}; images shifted by up to "
            f"{c.max_shift} px)"
        )


base.register(Clip())
