"""Model families, built from a config, and the pure apply function the losses call.

model = build_model(cfg.model, image_shape=(8, 8, 1), num_classes=10,
                    learned_variance=False, rngs=nnx.Rngs(0))
graphdef, params = nnx.split(model, nnx.Param)
apply_fn = make_apply_fn(graphdef)      # apply_fn(params, x, t, y, dropout_key)
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from diffusax.models.dit import VARIANTS as DIT_VARIANTS
from diffusax.models.dit import DiT, resolve_variant
from diffusax.models.layers import count_params
from diffusax.models.unet import UNet

DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def _unet_side_factor(model_cfg) -> tuple[int, str]:
    return 2 ** (len(model_cfg.ch_mult) - 1), (
        f"config field 'model.ch_mult' has {len(model_cfg.ch_mult)} levels, so the U-Net needs "
        f"square images whose side is divisible by {2 ** (len(model_cfg.ch_mult) - 1)}"
    )


def _dit_side_factor(model_cfg) -> tuple[int, str]:
    patch = resolve_variant(model_cfg.variant)["patch"]
    return patch, (
        f"config field 'model.variant' ({model_cfg.variant}) has patch size {patch}: it needs "
        f"square images whose side is divisible by {patch}"
    )


def _build_unet(model_cfg, *, height, channels, out_channels, num_classes, learned, rngs):
    return UNet(
        in_channels=channels,
        out_channels=out_channels,
        ch=model_cfg.ch,
        ch_mult=tuple(model_cfg.ch_mult),
        num_res_blocks=model_cfg.num_res_blocks,
        attn_resolutions=tuple(model_cfg.attn_resolutions),
        resolution=height,
        dropout=model_cfg.dropout,
        num_classes=num_classes if model_cfg.class_conditional else None,
        num_heads=model_cfg.num_heads,
        norm_groups=min(32, model_cfg.ch),
        guidance_embed_dim=model_cfg.guidance_embed_dim,
        remat=model_cfg.remat,
        dtype=DTYPES[model_cfg.dtype],
        rngs=rngs,
    )


def _build_dit(model_cfg, *, height, channels, out_channels, num_classes, learned, rngs):
    return DiT(
        variant=model_cfg.variant,
        # explicit sizes replace the variant's (0 or absent = the variant's value)
        depth=model_cfg.get("depth", 0) or None,
        hidden=model_cfg.get("hidden_size", 0) or None,
        heads=model_cfg.get("heads", 0) or None,
        input_size=height,
        in_channels=channels,
        num_classes=num_classes if model_cfg.class_conditional else None,
        learn_sigma=learned,
        # Labels are dropped for guidance in one place: the loss (diffusion.label_drop_prob).
        class_dropout_prob=0.0,
        fused_attention=model_cfg.fused_attention,
        scan_blocks=model_cfg.scan_blocks,
        remat=model_cfg.remat,
        dtype=DTYPES[model_cfg.dtype],
        rngs=rngs,
    )


def unet_cond_kwargs(model_cfg, *, height, channels, out_channels) -> dict:
    """``unet_cond.UNetCondition``'s arguments from the config's ``model`` section (without the
    context width, which the condition encoder sets)."""
    levels = len(model_cfg.ch_mult)
    return dict(
        in_channels=channels,
        out_channels=out_channels,
        block_out_channels=tuple(model_cfg.ch * m for m in model_cfg.ch_mult),
        layers_per_block=model_cfg.num_res_blocks,
        attention_levels=tuple(
            height // 2**i in tuple(model_cfg.attn_resolutions) for i in range(levels)
        ),
        transformer_layers=model_cfg.transformer_layers,
        num_heads=model_cfg.num_heads,
        use_linear_projection=model_cfg.linear_projection,
        norm_num_groups=min(32, model_cfg.ch),
        dropout=model_cfg.dropout,
        remat=model_cfg.remat,
    )


def _build_unet_cond(
    model_cfg, *, height, channels, out_channels, num_classes, learned, rngs, conditioning
):
    from diffusax.models.conditioned import ConditionedUNet

    unet_kwargs = unet_cond_kwargs(
        model_cfg, height=height, channels=channels, out_channels=out_channels
    )
    return ConditionedUNet(
        unet_kwargs=unet_kwargs, dtype=DTYPES[model_cfg.dtype], rngs=rngs, **conditioning
    )


# The denoising network families `config.model.name` chooses from:
# name -> (builder, (model_cfg -> (the factor the image side must divide by, why))).
FAMILIES = {
    "unet": (_build_unet, _unet_side_factor),
    "dit": (_build_dit, _dit_side_factor),
    "unet_cond": (_build_unet_cond, _unet_side_factor),
}


def _family(model_cfg):
    if model_cfg.name not in FAMILIES:
        raise ValueError(
            f"config field 'model.name': unknown model {model_cfg.name!r}; choose one of "
            f"{list(FAMILIES)}"
        )
    return FAMILIES[model_cfg.name]


def check_image_shape(model_cfg, image_shape: tuple) -> None:
    """Raise ValueError naming the field when the model cannot take images of this shape."""
    height, width, _ = image_shape
    factor, why = _family(model_cfg)[1](model_cfg)
    if height != width or height % factor:
        raise ValueError(f"{why}; the data has {height}x{width}")


def build_model(
    model_cfg,
    *,
    image_shape,
    num_classes,
    learned_variance: bool,
    rngs: nnx.Rngs,
    conditioning: dict | None = None,
):
    """The network named by ``model_cfg.name`` for images of ``image_shape`` (H, W, C).

    ``conditioning`` (``conditions.encoder_kwargs``): the condition encoder, given exactly when
    ``model_cfg.name == 'unet_cond'`` (config.validate requires a condition.kind for it and
    refuses one for any other family); None builds the family's own class conditioning.
    """
    check_image_shape(model_cfg, tuple(image_shape))
    height, _, channels = image_shape
    out_channels = 2 * channels if learned_variance else channels
    kwargs = dict(
        height=height,
        channels=channels,
        out_channels=out_channels,
        num_classes=num_classes,
        learned=learned_variance,
        rngs=rngs,
    )
    if conditioning is not None:
        kwargs["conditioning"] = conditioning
    return _family(model_cfg)[0](model_cfg, **kwargs)


def make_apply_fn(graphdef):
    """apply_fn(params, x, t, y, dropout_key) -> output: the network as a pure function.

    ``nnx.merge`` inside the traced function costs nothing at run time: it only rebuilds the
    Python object while tracing.
    """

    def apply_fn(params, x, t, y=None, dropout_key=None):
        model = nnx.merge(graphdef, params)
        return model(x, t, y, dropout_key=dropout_key)

    return apply_fn


def forward_flops(graphdef, abstract_model, image_shape, num_classes, y=None) -> float | None:
    """FLOPs of one forward pass on one example, from XLA's cost analysis (nothing is run).

    The lowered program's analysis is used where the backend gives one (CPU does); otherwise
    the compiled program's. None when neither reports FLOPs.
    """
    import jax

    params = nnx.state(abstract_model)
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    if y is None:  # else: the condition of one example, as ShapeDtypeStructs
        y = jax.ShapeDtypeStruct((1,), jnp.int32) if num_classes else None
    apply_fn = make_apply_fn(graphdef)
    lowered = jax.jit(lambda p, x, t, y: apply_fn(p, x, t, y)).lower(params, x, t, y)
    flops = _flops_of(lowered.cost_analysis())
    return flops if flops is not None else _flops_of(lowered.compile().cost_analysis())


def _flops_of(cost) -> float | None:
    if isinstance(cost, (list, tuple)):  # older jax returns one dict per computation
        cost = cost[0] if cost else None
    if not isinstance(cost, dict) or cost.get("flops") is None:
        return None
    return float(cost["flops"])


__all__ = [
    "DIT_VARIANTS",
    "FAMILIES",
    "DiT",
    "UNet",
    "build_model",
    "check_image_shape",
    "count_params",
    "forward_flops",
    "make_apply_fn",
]
