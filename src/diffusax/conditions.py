"""What a denoiser is conditioned on, as one kind of object: its batch fields, null value and
dropout.

    cond = Condition("label", num_classes=10)
    y = cond.from_batch(batch)                  # (B,) int labels
    y = cond.drop(y, key, 0.1)                  # each row replaced by the null with p = 0.1
    null = cond.null_row()                      # what classifier-free guidance pairs y with

Kinds (``KINDS``) and the value ``y`` each passes to the network:

    label      int (B,) class indices; null: the extra class ``num_classes``
    text       {"tokens": int32 (B, L), "mask": bool (B, L)}; null: the empty caption
               [bos, eos, pad, ...] (``data.tokenizer``)
    embedding  float (B, D) or (B, L, D) precomputed embeddings (CLIP, T5, ...) read from the
               dataset; null: zeros

The losses (``losses.make_diffusion_loss``), guidance (``sampling.classifier_free_guidance``)
and the condition encoders (``models.conditioned``) all take ``y`` in this form. A label
condition's dropout draws exactly what ``layers.drop_labels`` draws, so class-conditional DDPM
is unchanged by it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("label", "text", "embedding")

# The batch fields of each kind (the data sources and latent shards produce these names).
BATCH_KEYS = {"label": ("label",), "text": ("tokens", "mask"), "embedding": ("embedding",)}


@dataclasses.dataclass(frozen=True)
class Condition:
    """A condition kind and the sizes its values have (see the module docstring)."""

    kind: str
    num_classes: int | None = None  # label
    context_length: int = 0  # text: tokens per caption, bos and eos included
    bos_id: int = 1  # text
    eos_id: int = 2  # text
    pad_id: int = 0  # text
    embedding_shape: tuple = ()  # embedding: (D,) or (L, D)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown condition kind {self.kind!r}; choose one of {KINDS}")
        if self.kind == "label" and not (self.num_classes or 0) >= 1:
            raise ValueError("a label condition needs num_classes >= 1")
        if self.kind == "text" and self.context_length < 2:
            raise ValueError("a text condition needs context_length >= 2 (bos and eos)")
        if self.kind == "embedding" and len(self.embedding_shape) not in (1, 2):
            raise ValueError(
                f"an embedding condition needs embedding_shape (D,) or (L, D), got "
                f"{tuple(self.embedding_shape)}"
            )

    @property
    def width(self) -> int | None:
        """The embedding width D (embedding kind only)."""
        return int(self.embedding_shape[-1]) if self.kind == "embedding" else None

    def from_batch(self, batch: dict):
        """The condition ``y`` of a batch dict (None when the batch holds none)."""
        if self.kind == "text":
            if "tokens" not in batch:
                return None
            return {"tokens": batch["tokens"], "mask": batch["mask"]}
        key = BATCH_KEYS[self.kind][0]
        return batch.get(key)

    def null_row(self):
        """The null condition of one example (no batch axis), as numpy."""
        if self.kind == "label":
            return np.int32(self.num_classes)
        if self.kind == "text":
            tokens = np.full((self.context_length,), self.pad_id, np.int32)
            tokens[:2] = (self.bos_id, self.eos_id)
            return {"tokens": tokens, "mask": np.arange(self.context_length) < 2}
        return np.zeros(tuple(self.embedding_shape), np.float32)

    def spec(self, batch_size: int = 1):
        """The shapes and dtypes of ``batch_size`` examples' condition (``jax.ShapeDtypeStruct``
        leaves), for tracing a network without values."""
        return jax.tree.map(
            lambda n: jax.ShapeDtypeStruct((batch_size, *np.shape(n)), np.asarray(n).dtype),
            self.null_row(),
        )

    def null(self, batch_size: int):
        """The null condition of ``batch_size`` examples."""
        return jax.tree.map(
            lambda n: np.broadcast_to(n, (batch_size, *np.shape(n))).copy(), self.null_row()
        )

    def drop(self, y, key, rate: float):
        """Each example's condition replaced by the null with probability ``rate`` (training
        for classifier-free guidance). One Bernoulli draw per example, shape (B,)."""
        batch = jax.tree.leaves(y)[0].shape[0]
        drop = jax.random.bernoulli(key, rate, (batch,))  # (B,)

        def where(null, v):
            mask = drop.reshape((batch,) + (1,) * (v.ndim - 1))
            return jnp.where(mask, jnp.asarray(null, v.dtype), v)

        return jax.tree.map(where, self.null_row(), y)


def concat(a, b):
    """Two condition batches stacked along the batch axis (guidance's [y, ∅])."""
    return jax.tree.map(lambda u, v: jnp.concatenate([u, v]), a, b)


def broadcast_null(null_row, y):
    """The null condition with ``y``'s batch size and dtypes."""
    return jax.tree.map(
        lambda n, v: jnp.broadcast_to(jnp.asarray(n, v.dtype), v.shape), null_row, y
    )


def batch_size_of(y) -> int:
    return int(jax.tree.leaves(y)[0].shape[0])


# ---------------------------------------------------------------------------------------------
# From a config (``condition`` and ``text`` sections)


def from_config(cfg, num_classes: int | None) -> Condition | None:
    """The condition of ``cfg.condition.kind``; None for "" (the U-Net / DiT's own class
    labels, chosen by ``model.class_conditional``, as before conditions had a kind)."""
    kind = cfg.condition.kind
    if not kind:
        return None
    if kind == "label":
        return Condition("label", num_classes=num_classes)
    if kind == "text":
        tok = tokenizer_from_config(cfg)
        return Condition(
            "text",
            context_length=cfg.text.context_length,
            bos_id=tok.bos_id,
            eos_id=tok.eos_id,
            pad_id=tok.pad_id,
        )
    return Condition("embedding", embedding_shape=tuple(cfg.condition.embedding_shape))


def tokenizer_from_config(cfg):
    """The captions' tokenizer (``text.tokenizer`` words | chars over ``text.captions``)."""
    from diffusax.data import tokenizer

    return tokenizer.from_captions(cfg.text.tokenizer)


TOKENIZER_FILE = "tokenizer.json"


def keep_tokenizer_with_run(cfg, workdir: str, *, write: bool) -> None:
    """A text run's tokenizer is saved with it, as ``workdir/tokenizer.json``: training writes
    it when the run starts (``write``), and every later start, sample or eval checks that the
    tokenizer the config builds is that one, so a checkpoint is never read with another
    vocabulary. ValueError (exit 2) naming the file when they differ."""
    if cfg.condition.kind != "text":
        return
    import os

    from diffusax.data.tokenizer import Tokenizer

    path = os.path.join(workdir, TOKENIZER_FILE)
    built = tokenizer_from_config(cfg)
    if not os.path.exists(path):
        if write:
            built.save(path)
        return  # a run from before tokenizers were saved: nothing to check against
    saved = Tokenizer.load(path)
    if saved != built:
        raise ValueError(
            f"{path}: the run was trained with a {saved!r} but the config builds a {built!r} "
            f"(text.tokenizer={cfg.text.tokenizer!r}, text.captions={cfg.text.captions!r}): its "
            f"checkpoint's token embeddings belong to the saved vocabulary"
        )


def encoder_kwargs(cfg, condition: Condition) -> dict:
    """What ``models.conditioned.ConditionedUNet`` needs besides the U-Net's own arguments."""
    out = {
        "condition": condition,
        "class_dim": cfg.condition.class_dim,
        "pooled_to_temb": cfg.condition.pooled_to_temb,
    }
    if condition.kind == "text":
        t = cfg.text
        out["text_kwargs"] = dict(
            vocab_size=tokenizer_from_config(cfg).vocab_size,
            width=t.width,
            layers=t.layers,
            heads=t.heads,
            mlp_dim=t.mlp_dim or 4 * t.width,
            context_length=t.context_length,
            eos_token_id=condition.eos_id,
        )
    return out


# ---------------------------------------------------------------------------------------------
# Checks of the config, prompts and the labels to sample


def validate(cfg) -> None:
    """ConfigError naming the field for a condition this config cannot train or sample with."""
    from diffusax.config import ConfigError

    kind = cfg.condition.kind
    if kind == "embedding" and len(tuple(cfg.condition.embedding_shape)) not in (1, 2):
        raise ConfigError(
            f"config field 'condition.embedding_shape' must be (D,) or (L, D) for "
            f"condition.kind='embedding', got {tuple(cfg.condition.embedding_shape)}"
        )
    if kind == "text":
        t = cfg.text
        for name in ("context_length", "width", "layers", "heads"):
            if not t[name] > 0:
                raise ConfigError(f"config field 'text.{name}' must be > 0, got {t[name]!r}")
        if t.width % t.heads:
            raise ConfigError(
                f"config field 'text.heads' ({t.heads}) must divide text.width ({t.width})"
            )
        _check_captions_fit(cfg)
        prompts = split_prompts(cfg.sample.prompt)
        if prompts:
            encode_prompts(cfg, prompts)
    elif cfg.sample.prompt:
        raise ConfigError(
            f"config field 'sample.prompt' needs a text-conditional model (condition.kind="
            f"'text'), not condition.kind={kind!r}"
        )


def split_prompts(prompt: str) -> list[str]:
    """``sample.prompt``: one prompt, or several separated by "|"."""
    return [p.strip() for p in prompt.split("|")] if prompt.strip() else []


def encode_prompts(cfg, prompts):
    """(tokens, mask) of ``prompts``; ConfigError naming 'sample.prompt' for an unknown word or
    character, or a prompt longer than the text encoder's context."""
    from diffusax.config import ConfigError

    tok = tokenizer_from_config(cfg)
    try:
        return tok.encode(prompts, cfg.text.context_length, field="sample.prompt")
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _check_captions_fit(cfg) -> None:
    """Every training caption must fit the text encoder's context."""
    from diffusax.config import ConfigError
    from diffusax.data import captioned

    tok = tokenizer_from_config(cfg)
    try:
        texts = [*captioned.longest_captions(), *captioned.random_captions()]
        tok.encode(texts, cfg.text.context_length, field="text.captions")
    except ValueError as e:
        raise ConfigError(
            f"config field 'text.context_length' ({cfg.text.context_length}) is too short for "
            f"the {cfg.text.captions} captions: {e}"
        ) from e


def sample_labels(num: int, num_classes: int | None, label: int = -1):
    """Labels for a batch of samples: one class, or the classes in turn (0, 1, ..., 0, 1, ...)."""
    if num_classes is None:
        return None
    if label >= 0:
        return np.full((num,), label, np.int32)
    return (np.arange(num) % num_classes).astype(np.int32)
