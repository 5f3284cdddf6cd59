"""Loss factories. Each returns a pure ``loss(params, batch, key) -> (scalar, metrics)``.

``apply_fn(params, x, t, y, dropout_key) -> output`` is the network with its graph bound (see
``diffusax.models.make_apply_fn``); ``batch`` is a dict with ``image`` (B, H, W, C) in [-1, 1]
and, for conditional models, ``label`` (B,) or the fields of a ``conditions.Condition``. The loss is jit-able and differentiable in params.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusax import diffusion
from diffusax.models.layers import drop_labels
from diffusax.schedules import Schedule, snr

PREDICTIONS = diffusion.PREDICTIONS


def min_snr_weight(snr_t, prediction: str, gamma: float):
    """Min-SNR-γ loss weight (Hang et al. 2023) expressed for each parametrisation.

    The x_0 loss is weighted by min(SNR_t, γ); the ε and v losses equal the x_0 loss times SNR_t
    and SNR_t + 1 respectively, so their weights are min(SNR_t, γ)/SNR_t and
    min(SNR_t, γ)/(SNR_t + 1).
    """
    clipped = jnp.minimum(snr_t, gamma)
    if prediction == "eps":
        return clipped / snr_t
    if prediction == "x0":
        return clipped
    if prediction == "v":
        return clipped / (snr_t + 1.0)
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


def make_diffusion_loss(
    apply_fn,
    sched: Schedule,
    *,
    prediction: str = "eps",
    var_type: str = "fixed_large",
    vlb_weight: float = 0.001,
    min_snr_gamma: float | None = None,
    label_drop_prob: float = 0.0,
    null_label: int | None = None,
    condition=None,
):
    """The denoising loss of DDPM and its relatives.

    Algorithm 1 of Ho et al. with ``prediction="eps"``: t ~ U{1..T}, ε ~ N(0, I),
    L_simple = ‖ε - ε_θ(√ᾱ_t x_0 + √(1-ᾱ_t) ε, t)‖² (mean over dimensions). ``prediction="x0"``
    regresses x_0 (the reconstruction loss), ``"v"`` regresses v = √ᾱ ε - √(1-ᾱ) x_0.

    With a learned variance (``var_type`` learned_range or learned) the network returns 2C
    channels and the loss is Improved DDPM's L_hybrid = L_simple + λ L_vlb (λ = ``vlb_weight``),
    where L_vlb is the bound's term at t in bits per dimension computed with the mean held fixed
    (stop-gradient), so that it trains only the variance, as in iDDPM and DiT.

    ``min_snr_gamma`` weights L_simple by Min-SNR-γ. ``label_drop_prob`` replaces labels by
    ``null_label`` at that rate so that one network learns both the conditional and the
    unconditional model used by classifier-free guidance. ``condition``
    (``conditions.Condition``) generalises the labels: the batch's condition (labels, caption
    tokens and mask, or embeddings) is dropped to the condition's null value at that rate.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
    if var_type not in diffusion.VAR_TYPES:
        raise ValueError(f"unknown var_type {var_type!r}; choose one of {diffusion.VAR_TYPES}")
    if label_drop_prob > 0 and null_label is None and condition is None:
        raise ValueError("label_drop_prob > 0 needs null_label (the unconditional class index)")
    learned_variance = var_type in diffusion.LEARNED_VAR_TYPES
    if learned_variance and prediction != "eps":
        # The hybrid loss's posterior mean is formed from ε̂ as in iDDPM; other pairs are untested.
        raise ValueError(f"a learned variance needs prediction='eps', got {prediction!r}")
    num_timesteps = sched.num_timesteps

    def loss_fn(params, batch, key):
        x0 = batch["image"]
        labels = batch.get("label") if condition is None else condition.from_batch(batch)
        t_key, noise_key, drop_key, label_key = jax.random.split(key, 4)
        t = jax.random.randint(t_key, (x0.shape[0],), 0, num_timesteps)  # (B,)
        noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
        xt = diffusion.q_sample(sched, x0, t, noise)
        if labels is not None and label_drop_prob > 0:
            if condition is None:
                labels = drop_labels(labels, label_key, label_drop_prob, null_label)
            else:
                labels = condition.drop(labels, label_key, label_drop_prob)
        out = apply_fn(params, xt, t, labels, drop_key).astype(jnp.float32)
        pred, var_out = diffusion.split_model_output(out, var_type)

        target = diffusion.prediction_target(sched, prediction, x0, noise, t)
        mse = diffusion.mean_flat((target - pred) ** 2)  # (B,)
        weight = 1.0
        if min_snr_gamma is not None:
            weight = min_snr_weight(snr(sched.alphas_cumprod[t]), prediction, min_snr_gamma)
        loss = weight * mse
        metrics = {"mse": jnp.mean(mse)}

        if learned_variance:
            frozen = jnp.concatenate([jax.lax.stop_gradient(pred), var_out], axis=-1)
            p = diffusion.p_mean_variance(
                sched, frozen, xt, t, prediction=prediction, var_type=var_type
            )
            vb_nats = diffusion.vlb_term(sched, p["mean"], p["logvar"], x0, xt, t)
            vb_bpd = vb_nats / (x0[0].size * jnp.log(2.0))  # (B,)
            loss = loss + vlb_weight * vb_bpd
            metrics["vb"] = jnp.mean(vb_bpd)
        loss = jnp.mean(loss)
        metrics["loss"] = loss
        return loss, metrics

    return loss_fn


def eps_prediction_loss(apply_fn, sched: Schedule, **kwargs):
    """DDPM's simple loss (Algorithm 1): regress the noise ε."""
    return make_diffusion_loss(apply_fn, sched, prediction="eps", **kwargs)


def reconstruction_loss(apply_fn, sched: Schedule, **kwargs):
    """Regress the clean sample x_0 from x_t."""
    return make_diffusion_loss(apply_fn, sched, prediction="x0", **kwargs)


def v_prediction_loss(apply_fn, sched: Schedule, **kwargs):
    """Regress v = √ᾱ_t ε - √(1-ᾱ_t) x_0 (Salimans & Ho 2022)."""
    return make_diffusion_loss(apply_fn, sched, prediction="v", **kwargs)


def hybrid_loss(apply_fn, sched: Schedule, *, vlb_weight: float = 0.001, **kwargs):
    """Improved DDPM's L_simple + λ L_vlb with a learned-range variance (as DiT trains)."""
    return make_diffusion_loss(
        apply_fn, sched, prediction="eps", var_type="learned_range", vlb_weight=vlb_weight, **kwargs
    )
