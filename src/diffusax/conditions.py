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

    def check(self, y, batch_size: int, field: str = "condition") -> None:
        """ValueError naming ``field`` unless ``y`` (numpy) is a valid condition batch."""
        leaves = {k: np.asarray(v) for k, v in _as_dict(y).items()}
        if self.kind == "label":
            labels = leaves["label"]
            if labels.shape != (batch_size,) or not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(
                    f"{field}: labels must be ({batch_size},) integers, got {labels.shape} "
                    f"{labels.dtype}"
                )
            bad = labels[(labels < 0) | (labels > self.num_classes)]
            if bad.size:
                raise ValueError(
                    f"{field}: label {int(bad[0])} is outside the {self.num_classes} classes "
                    f"(0..{self.num_classes - 1}; {self.num_classes} is the null label)"
                )
        elif self.kind == "text":
            shape = (batch_size, self.context_length)
            if leaves["tokens"].shape != shape or leaves["mask"].shape != shape:
                raise ValueError(
                    f"{field}: tokens and mask must be {shape}, got {leaves['tokens'].shape} "
                    f"and {leaves['mask'].shape}"
                )
        else:
            want = (batch_size, *self.embedding_shape)
            got = leaves["embedding"].shape
            if got != want:
                raise ValueError(
                    f"{field}: embeddings have shape {got[1:]} per example but the model takes "
                    f"{tuple(self.embedding_shape)} (config field 'condition.embedding_shape')"
                )


def _as_dict(y) -> dict:
    return y if isinstance(y, dict) else {"label" if np.ndim(y) == 1 else "embedding": y}


def concat(a, b):
    """Two condition batches stacked along the batch axis (guidance's [y, ∅])."""
    return jax.tree.map(lambda u, v: jnp.concatenate([u, v]), a, b)


def broadcast_null(null_row, y):
    """The null condition with ``y``'s batch size and dtypes."""
    return jax.tree.map(
        lambda n, v: jnp.broadcast_to(jnp.asarray(n, v.dtype), v.shape), null_row, y
    )


def take(y, rows):
    """Rows ``rows`` of a condition batch (numpy)."""
    return jax.tree.map(lambda v: np.asarray(v)[rows], y)


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
