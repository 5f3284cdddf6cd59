"""The two towers of CLIP (Radford et al. 2021) at the size of the bundled 8x8 digits.

    model = DualEncoder(image_shape=(8, 8, 1), image_widths=(32, 64, 128), embed_dim=64,
                        text_kwargs=dict(vocab_size=..., width=64, layers=2, heads=4,
                                         mlp_dim=256, context_length=16, eos_token_id=2),
                        rngs=nnx.Rngs(0))
    f = model.encode_image(images)         # (B, 8, 8, 1) in [-1, 1] -> (B, 64), unnormalised
    g = model.encode_text(tokens, mask)    # (B, 16) ids, (B, 16) bool -> (B, 64), unnormalised
    t = model.logit_scale[...]             # the learnable log inverse temperature, ()

The image tower is a small convnet: a 3x3 convolution per width, the first at stride 1 and
each later one at stride 2 (8x8 -> 4x4 -> 2x2), GELU after each, then the flattened feature
map, layer-normed, through a linear projection into the joint space. Flattening rather than
pooling keeps where the ink is: the captions name a digit's slant. The text tower is
``text.TextEncoder`` (CLIP's text transformer); as in CLIP its final-normed state at the
end-of-text token goes through a bias-free linear ``text_projection``. The
contrastive loss (``diffusax.contrastive``) normalises both and scales by exp(logit_scale).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from diffusax.models.layers import check_nhwc, check_positive_int_seq, conv3x3, default_init
from diffusax.models.text import TextEncoder

__all__ = ["ConvImageEncoder", "DualEncoder"]


class ConvImageEncoder(nnx.Module):
    """images (B, H, W, C) -> features (B, embed_dim).

    Args:
      image_shape: (H, W, C) of the images; H and W divisible by 2^(len(widths) - 1).
      widths: output channels of each 3x3 convolution (the first keeps the size, each later
        one halves it).
      embed_dim: width of the joint embedding space.
    """

    def __init__(self, *, image_shape, widths, embed_dim: int, rngs: nnx.Rngs):
        check_positive_int_seq("image_widths", tuple(widths))
        h, w, c = (int(d) for d in image_shape)
        factor = 2 ** (len(widths) - 1)
        if h % factor or w % factor:
            raise ValueError(
                f"image_widths has {len(widths)} convolutions, {len(widths) - 1} of them halving: "
                f"the image size {h}x{w} must be divisible by {factor}"
            )
        self.in_channels = c
        chans = (c, *widths)
        self.convs = nnx.List(
            [
                conv3x3(chans[i], chans[i + 1], dtype=None, rngs=rngs, stride=1 if i == 0 else 2)
                for i in range(len(widths))
            ]
        )
        flat = (h // factor) * (w // factor) * widths[-1]
        self.norm = nnx.LayerNorm(flat, rngs=rngs)
        self.projection = nnx.Linear(flat, embed_dim, kernel_init=default_init, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        check_nhwc(images, self.in_channels, "image encoder")
        h = jnp.asarray(images, jnp.float32)
        for conv in self.convs:
            h = jax.nn.gelu(conv(h))  # (B, H / 2^i, W / 2^i, widths[i])
        h = h.reshape(h.shape[0], -1)  # (B, h * w * widths[-1])
        return self.projection(self.norm(h))  # (B, embed_dim)


class DualEncoder(nnx.Module):
    """CLIP's image and text towers projected into one embedding space, and its temperature.

    Args:
      image_shape, image_widths: the image tower (``ConvImageEncoder``).
      text_kwargs: keyword arguments of ``text.TextEncoder`` (vocab_size, width, layers, ...).
      embed_dim: width of the joint space.
      init_logit_scale: t at initialisation (CLIP: log(1 / 0.07)).
    """

    def __init__(
        self,
        *,
        image_shape,
        image_widths,
        text_kwargs: dict,
        embed_dim: int,
        init_logit_scale: float,
        rngs: nnx.Rngs,
    ):
        if not isinstance(embed_dim, int) or embed_dim < 1:
            raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}")
        self.image = ConvImageEncoder(
            image_shape=image_shape, widths=image_widths, embed_dim=embed_dim, rngs=rngs
        )
        self.text = TextEncoder(**text_kwargs, rngs=rngs)
        width = text_kwargs["width"]
        self.eos_token_id = int(text_kwargs["eos_token_id"])
        self.text_projection = nnx.Linear(
            width, embed_dim, use_bias=False, kernel_init=default_init, rngs=rngs
        )
        self.logit_scale = nnx.Param(jnp.asarray(init_logit_scale, jnp.float32))

    def encode_image(self, images: jax.Array) -> jax.Array:
        """(B, H, W, C) images in [-1, 1] -> (B, embed_dim) image features (unnormalised)."""
        return self.image(images)

    def encode_text(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """(B, L) token ids (and their mask) -> (B, embed_dim) text features (unnormalised):
        the final-normed state at the first end-of-text token through ``text_projection``.

        The pooling is done here, not by ``TextEncoder``'s own ``pooled``: with an end-of-text
        id of 2 (this project's tokenizers) that one follows transformers' legacy rule, the
        position of the largest id, which for these vocabularies is some word of the caption.
        Under causal attention a word's state sees only the words before it, and the class
        often comes later ("the digit 7"); only the end-of-text state sees the whole caption.
        """
        hidden, _ = self.text(tokens, mask=mask)  # (B, L, width)
        eos = jnp.argmax(jnp.asarray(tokens) == self.eos_token_id, axis=-1)  # (B,) first eos
        pooled = hidden[jnp.arange(hidden.shape[0]), eos]  # (B, width)
        return self.text_projection(pooled)  # (B, embed_dim)
