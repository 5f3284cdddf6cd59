"""A text encoder with the CLIP text architecture (Radford et al. 2021), as transformers'
`CLIPTextModel`: the conditioning text tower of Stable Diffusion v1.x (CLIP ViT-L/14).

    encoder = TextEncoder(vocab_size=49408, width=768, layers=12, heads=12, mlp_dim=3072,
                          context_length=77, eos_token_id=49407, rngs=nnx.Rngs(0))
    hidden, pooled = encoder(tokens)              # tokens (B, L) int -> (B, L, 768), (B, 768)
    hidden, pooled = encoder(tokens, mask=mask)   # mask (B, L): True = real token

Token and learned position embeddings feed a stack of pre-LN transformer blocks with causal
self-attention,

    x ← x + out_proj(Attention(LN₁(x)))          (causal; padded keys masked out)
    x ← x + fc2(act(fc1(LN₂(x))))                (act: quick_gelu x·σ(1.702x), or exact gelu)

and a final layer norm gives `hidden`. `pooled` is the final-normed hidden state at the
end-of-text token: the first position where tokens == eos_token_id, or, for the legacy
configurations with eos_token_id == 2 (which transformers keeps for checkpoints saved before
its PR #24773, Stable Diffusion v1's among them), the position of the largest id (CLIP's
end-of-text id 49407 is the largest of its vocabulary). A row without that token pools
position 0, as transformers does.

The parameter names mirror transformers' (`embeddings.token_embedding`, `encoder.layers.N.
self_attn.q_proj`, ...), so `diffusax.convert.transformers_clip` converts a checkpoint name by
name. There is no dropout: the encoder is a frozen conditioner.

`dtype` is the computation dtype of the matmuls (e.g. jnp.bfloat16); parameters, layer norms,
softmax and the residual stream stay float32, and both outputs are float32. Token ids are not
checked under jit (an out-of-range id would be clamped by the lookup): `check_tokens` checks
them on the host.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusax.models.layers import Dtype, check_positive_ints, dense

__all__ = ["ACTIVATIONS", "TextEncoder", "check_tokens"]

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # CLIP's
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact (erf)
}
embed_init = nnx.initializers.normal(stddev=0.02)
position_init = nnx.initializers.normal(stddev=0.01)
# The logit of a masked key (transformers' finfo(float32).min).
_MASKED = float(np.finfo(np.float32).min)


def _layer_norm(width: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm over the last axis in float32, two-pass variance (as PyTorch)."""
    return nnx.LayerNorm(width, epsilon=eps, use_fast_variance=False, dtype=jnp.float32, rngs=rngs)


def check_tokens(tokens, *, vocab_size: int, context_length: int | None = None) -> np.ndarray:
    """``tokens`` as a numpy int (B, L) array with every id in [0, vocab_size); ValueError
    naming the first bad id (and where it is) otherwise. Runs on the host, outside jit."""
    arr = np.asarray(tokens)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tokens must be (B, L) integer ids, got shape {arr.shape} {arr.dtype}")
    if context_length is not None and arr.shape[1] > context_length:
        raise ValueError(
            f"tokens has length {arr.shape[1]} > context_length={context_length}: shape {arr.shape}"
        )
    bad = np.argwhere((arr < 0) | (arr >= vocab_size))
    if bad.size:
        b, i = (int(v) for v in bad[0])
        raise ValueError(
            f"tokens holds id {int(arr[b, i])} at [{b}, {i}], outside [0, vocab_size="
            f"{vocab_size}) ({len(bad)} bad id(s) in all)"
        )
    return arr


class Embeddings(nnx.Module):
    """token_embedding[tokens] + position_embedding[0 .. L-1]."""

    def __init__(self, vocab_size: int, width: int, context_length: int, *, rngs: nnx.Rngs):
        self.token_embedding = nnx.Embed(vocab_size, width, embedding_init=embed_init, rngs=rngs)
        self.position_embedding = nnx.Embed(
            context_length, width, embedding_init=position_init, rngs=rngs
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        length = tokens.shape[1]
        positions = self.position_embedding.embedding[:length].astype(jnp.float32)  # (L, D)
        return self.token_embedding(tokens).astype(jnp.float32) + positions[None]  # (B, L, D)


class SelfAttention(nnx.Module):
    """Multi-head attention softmax(q kᵀ / sqrt(d)) v over the visible keys, with separate
    q/k/v projections.

    The logits and the softmax are float32 whatever the computation dtype."""

    def __init__(self, width: int, heads: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.heads = heads
        self.q_proj = dense(width, width, dtype=dtype, rngs=rngs)
        self.k_proj = dense(width, width, dtype=dtype, rngs=rngs)
        self.v_proj = dense(width, width, dtype=dtype, rngs=rngs)
        self.out_proj = dense(width, width, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, visible: jax.Array) -> jax.Array:
        b, n, d = x.shape
        heads = (b, n, self.heads, d // self.heads)
        q = self.q_proj(x).reshape(heads)  # (B, L, N, d/N)
        k = self.k_proj(x).reshape(heads)  # (B, L, N, d/N)
        v = self.v_proj(x).reshape(heads)  # (B, L, N, d/N)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        logits = jnp.where(visible, logits * (d // self.heads) ** -0.5, _MASKED)  # (B, N, L, L)
        weights = jax.nn.softmax(logits, axis=-1)  # (B, N, L, L)
        # A query that sees no key (left padding) attends to nothing: zero output, as torch's
        # scaled_dot_product_attention (transformers' default) gives.
        weights = jnp.where(visible.any(axis=-1, keepdims=True), weights, 0.0).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)  # (B, L, N, d/N)
        return self.out_proj(out.reshape(b, n, d)).astype(jnp.float32)  # (B, L, D)


class Mlp(nnx.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, width: int, inner: int, activation: str, *, dtype: Dtype, rngs: nnx.Rngs):
        self.activation = activation
        self.fc1 = dense(width, inner, dtype=dtype, rngs=rngs)
        self.fc2 = dense(inner, width, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = ACTIVATIONS[self.activation](self.fc1(x))  # (B, L, M)
        return self.fc2(h).astype(jnp.float32)  # (B, L, D)


class EncoderLayer(nnx.Module):
    """Pre-LN block: x + attn(LN₁(x)), then + mlp(LN₂(x))."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_dim: int,
        *,
        activation: str,
        eps: float,
        dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.layer_norm1 = _layer_norm(width, eps, rngs)
        self.self_attn = SelfAttention(width, heads, dtype=dtype, rngs=rngs)
        self.layer_norm2 = _layer_norm(width, eps, rngs)
        self.mlp = Mlp(width, mlp_dim, activation, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, visible: jax.Array) -> jax.Array:
        x = x + self.self_attn(self._in(self.layer_norm1(x)), visible)  # (B, L, D)
        return x + self.mlp(self._in(self.layer_norm2(x)))  # (B, L, D) float32 residual stream

    def _in(self, h: jax.Array) -> jax.Array:
        return h if self.dtype is None else h.astype(self.dtype)


class Encoder(nnx.Module):
    """`n_layers` EncoderLayers applied in turn, as `encoder.layers.N`."""

    def __init__(self, n_layers: int, width: int, heads: int, mlp_dim: int, *, rngs, **kwargs):
        self.layers = nnx.List(
            [EncoderLayer(width, heads, mlp_dim, rngs=rngs, **kwargs) for _ in range(n_layers)]
        )

    def __call__(self, x: jax.Array, visible: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x, visible)  # (B, L, D)
        return x


class TextEncoder(nnx.Module):
    """CLIP text transformer: tokens (B, L) -> (hidden (B, L, width), pooled (B, width)).

    Args:
      vocab_size: rows of the token table.
      width: hidden width (transformers' hidden_size).
      layers: number of transformer blocks (num_hidden_layers).
      heads: attention heads; must divide width (num_attention_heads).
      mlp_dim: inner width of each block's MLP (intermediate_size).
      context_length: longest token sequence (max_position_embeddings).
      eos_token_id: the end-of-text id whose position is pooled; 2 selects the legacy rule
        (the position of the largest id), as transformers does.
      activation: "quick_gelu" (CLIP's, x·σ(1.702x)) or "gelu" (exact).
      layer_norm_eps: epsilon of every layer norm.
      dtype: computation dtype of the matmuls; parameters and outputs stay float32.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        width: int,
        layers: int,
        heads: int,
        mlp_dim: int,
        context_length: int,
        eos_token_id: int,
        activation: str = "quick_gelu",
        layer_norm_eps: float = 1e-5,
        dtype: Dtype = None,
        rngs: nnx.Rngs,
    ):
        check_positive_ints(
            vocab_size=vocab_size,
            width=width,
            layers=layers,
            heads=heads,
            mlp_dim=mlp_dim,
            context_length=context_length,
        )
        if width % heads:
            raise ValueError(f"heads={heads} must divide width={width}")
        if not isinstance(eos_token_id, int) or isinstance(eos_token_id, bool):
            raise ValueError(f"eos_token_id must be an int, got {eos_token_id!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        if not layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be positive, got {layer_norm_eps!r}")
        self.vocab_size = vocab_size
        self.width = width
        self.context_length = context_length
        self.eos_token_id = eos_token_id
        self.embeddings = Embeddings(vocab_size, width, context_length, rngs=rngs)
        self.encoder = Encoder(
            layers,
            width,
            heads,
            mlp_dim,
            activation=activation,
            eps=layer_norm_eps,
            dtype=dtype,
            rngs=rngs,
        )
        self.final_layer_norm = _layer_norm(width, layer_norm_eps, rngs)

    def __call__(
        self, tokens: jax.Array, mask: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """tokens: (B, L) int ids, L <= context_length; mask: optional (B, L), True (or
        nonzero) = a real token, False = padding that no position attends to.

        Returns (hidden (B, L, width), pooled (B, width)), both float32. A position that sees
        no real token (left padding before the first real one) gets a zero attention output,
        as with transformers' default (SDPA) attention; its hidden state carries no meaning.
        """
        tokens, mask = self._check_inputs(tokens, mask)
        b, length = tokens.shape
        causal = jnp.tril(jnp.ones((length, length), bool))  # (L, L) query i sees keys <= i
        visible = causal[None, None]  # (1, 1, L, L)
        if mask is not None:
            visible = visible & mask[:, None, None, :]  # (B, 1, L, L)
        h = self.embeddings(tokens)  # (B, L, D)
        h = self.encoder(h, visible)  # (B, L, D)
        hidden = self.final_layer_norm(h).astype(jnp.float32)  # (B, L, D)
        pooled = hidden[jnp.arange(b), self._eos_positions(tokens)]  # (B, D)
        return hidden, pooled

    def _eos_positions(self, tokens: jax.Array) -> jax.Array:
        """(B,) position pooled in each row (transformers' two rules; first match wins)."""
        if self.eos_token_id == 2:  # legacy configs: end-of-text is the largest id
            return jnp.argmax(tokens, axis=-1)
        return jnp.argmax(tokens == self.eos_token_id, axis=-1)

    def check_tokens(self, tokens) -> np.ndarray:
        """Host-side check of ``tokens`` (shape, dtype, length and every id in the vocabulary),
        which jit cannot do; returns them as a numpy array."""
        return check_tokens(tokens, vocab_size=self.vocab_size, context_length=self.context_length)

    def _check_inputs(self, tokens, mask):
        """Shape and dtype checks at trace time, naming the argument."""
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"tokens must be (B, L) integer ids, got shape {tokens.shape} {tokens.dtype}"
            )
        if not 1 <= tokens.shape[1] <= self.context_length:
            raise ValueError(
                f"tokens has length {tokens.shape[1]}; it must be in [1, context_length="
                f"{self.context_length}]: shape {tokens.shape}"
            )
        if mask is None:
            return tokens, None
        mask = jnp.asarray(mask)
        if mask.shape != tokens.shape:
            raise ValueError(f"mask must have the shape of tokens {tokens.shape}, got {mask.shape}")
        if mask.dtype != jnp.bool_:
            if not jnp.issubdtype(mask.dtype, jnp.integer):
                raise ValueError(f"mask must be bool (True = real token), got {mask.dtype}")
            mask = mask != 0
        return tokens, mask
