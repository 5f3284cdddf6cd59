"""DDPM-style denoising diffusion (ε / x_0 / v prediction, hybrid loss): one network, one
optimizer, one EMA, one gradient update per step; sampled with DDPM, DDIM or DPM-Solver++ and
classifier-free guidance. Pixel space, or latent space through latent shards (`latents.dir`).

The schedule, loss and generator factories below are shared by the methods that denoise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusax import conditions, diffusion, losses, parallel, sampling, schedules
from diffusax.conditions import sample_labels
from diffusax.config import ConfigError
from diffusax.methods import base


class DDPM(base.Method):
    """networks {"model"}, groups {"model": optim}, EMAs {"ema": model, optim.ema_decay}."""

    name = "ddpm"

    def validate(self, cfg):
        if not cfg.diffusion.prediction:
            raise ConfigError(
                f"config field 'diffusion.prediction' is '' (a pretrained folder's); method "
                f"{self.name!r} trains its own model: choose one of {list(diffusion.PREDICTIONS)}"
            )
        conditions.validate(cfg)

    def model_shape(self, cfg, data) -> tuple:
        """The (H, W, C) the denoiser works at: the images (latent methods: their latents)."""
        return data.image_shape

    def networks(self, cfg, data):
        from diffusax.train.state import model_builder

        shape = self.model_shape(cfg, data)
        build = model_builder(cfg, shape, data.num_classes, condition_of(cfg, data))
        return {"model": base.Network(build=build)}

    def groups(self, cfg):
        return {"model": base.Group("model", optim="optim")}

    def emas(self, cfg):
        return {"ema": base.Ema("model", cfg.optim.ema_decay)}

    def denoising_loss(self, cfg, ctx):
        """loss(model params, batch, key): ``make_loss`` of this run."""
        return make_loss(
            cfg,
            ctx.apply_fn("model"),
            make_schedule(cfg),
            ctx.data.num_classes,
            condition_of(cfg, ctx.data),
        )

    def updates(self, cfg, ctx):
        loss = self.denoising_loss(cfg, ctx)
        return [
            base.GradUpdate(
                "model", lambda params, frozen, batch, key: loss(params["model"], batch, key)
            )
        ]

    def sample_params(self, state, frozen, cfg):
        return state.ema["ema"]

    def sample_network(self, cfg):
        return "model"

    def make_sampler(self, run, sample_cfg, *, clip: bool = True):
        return make_generate(
            run.cfg,
            run.ctx.apply_fn("model"),
            make_schedule(run.cfg),
            run.data.num_classes,
            self.model_shape(run.cfg, run.data),
            sample_cfg=sample_cfg,
            mesh=run.mesh,
            condition=condition_of(run.cfg, run.data),
            clip=clip,
        )

    def sample_conditions(self, run, num, sample_cfg):
        return sample_conditions(run.cfg, run.data, num, sample_cfg)

    def describe_sampler(self, cfg):
        s = cfg.sample
        steps = s.num_steps or cfg.diffusion.num_timesteps
        return f"{s.sampler}, {steps} steps, guidance {s.guidance_scale}"

    def forward_flops(self, run):
        from flax import nnx

        from diffusax import models
        from diffusax.train.state import model_builder, model_graphdef

        cfg, spec = run.cfg, run.data
        shape = self.model_shape(cfg, spec)
        build = run.networks["model"].build
        if cfg.model.name == "dit" and cfg.model.scan_blocks:
            # XLA's cost analysis counts a loop's body once: count a scanned DiT's blocks
            # unrolled.
            unrolled = cfg.copy_and_resolve_references()
            unrolled.model.scan_blocks = False
            build = model_builder(unrolled, shape, spec.num_classes)
        abstract = nnx.eval_shape(lambda: build(run.init_key))
        graphdef = model_graphdef(build, run.init_key)
        cond = condition_of(cfg, spec)
        y = None if cond is None else cond.spec(1)  # one example's condition
        flops = models.forward_flops(graphdef, abstract, shape, spec.num_classes, y)
        return {"model": flops}

    def describe(self, cfg):
        d = cfg.diffusion
        return (
            f"{self.name}  (prediction={d.prediction}, var_type={d.var_type}, "
            f"T={d.num_timesteps}, {d.schedule} betas)"
        )


def make_schedule(cfg) -> schedules.Schedule:
    d = cfg.diffusion
    kwargs = {}
    if d.schedule != "cosine":
        kwargs = dict(beta_start=d.beta_start, beta_end=d.beta_end)
    return schedules.schedule_from_config(d.schedule, d.num_timesteps, **kwargs)


def make_loss(cfg, apply_fn, sched, num_classes, condition=None):
    """loss(params, batch, key) -> (loss, metrics): the denoising loss of ``cfg.diffusion``."""
    d = cfg.diffusion
    return losses.make_diffusion_loss(
        apply_fn,
        sched,
        prediction=d.prediction,
        var_type=d.var_type,
        vlb_weight=d.vlb_weight,
        min_snr_gamma=d.min_snr_gamma or None,
        label_drop_prob=d.label_drop_prob,
        null_label=num_classes if cfg.model.class_conditional else None,
        condition=condition,
    )


def make_generate(
    cfg,
    apply_fn,
    sched,
    num_classes,
    image_shape,
    *,
    sample_cfg=None,
    mesh=None,
    condition=None,
    clip: bool = True,
    sampler_kwargs=None,
    shared_noise: bool = False,
):
    """A jitted ``generate(params, labels, key) -> images in [-1, 1]`` for one batch.

    ``sample_cfg`` (default ``cfg.sample``) chooses the sampler, its step count and spacing, η,
    guidance and x_0 clipping. Guidance runs the conditional and unconditional model in one
    batched call, on every output channel or the first ``guided_channels``. ``labels`` are (B,)
    class indices or (B, num_classes + 1) float label weights (``layers.embed_labels``), whose
    unconditional branch is the one-hot null label. With ``mesh`` the batch is split over its
    devices (the batch size must divide evenly); without, replicated parameters would make every
    device compute the whole batch. Latent models (``latents.dir``) sample latents, which are
    decoded to images by the shards' VAE (``latents.make_decoder``) before they are returned.
    With a ``condition`` (``conditions.Condition``), ``labels`` is that condition's batch (a
    pytree: caption tokens and mask, or embeddings) and guidance pairs it with its null.
    ``clip=False`` returns the samples unclipped (latents, decoded by the caller).
    ``sampler_kwargs``: further keywords of ``sampling.sample`` (the "lcm" sampler's scalings).
    ``shared_noise``: every row starts from the same x_T (a walk between conditions, whose
    frames then differ only by their condition).
    """
    decode = None
    if cfg.latents.dir:
        from diffusax.data import latents

        decode = latents.make_decoder(cfg, mesh)
    s = sample_cfg or cfg.sample
    d = cfg.diffusion
    learned = d.var_type in diffusion.LEARNED_VAR_TYPES
    conditional = cfg.model.class_conditional or condition is not None

    def generate(params, labels, key):
        net = lambda x, t, y: apply_fn(params, x, t, y)
        if conditional and s.guidance_scale != 1.0:
            null = num_classes
            if condition is not None:
                null = condition.null_row()
            elif jnp.issubdtype(labels.dtype, jnp.floating):  # label weights: a one-hot null
                null = jax.nn.one_hot(num_classes, num_classes + 1, dtype=labels.dtype)
            net = sampling.classifier_free_guidance(
                net,
                s.guidance_scale,
                null_label=null,
                learned_variance=learned,
                guided_channels=None if s.guided_channels == -1 else s.guided_channels,
            )
        model_fn = sampling.bind_condition(net, labels)
        rows = conditions.batch_size_of(labels) if labels is not None else s.batch_size
        shape = (rows, *image_shape)
        noise_shape = (1, *image_shape) if shared_noise else shape
        x_T = jax.random.normal(jax.random.fold_in(key, 1), noise_shape, jnp.float32)
        x_T = jnp.broadcast_to(x_T, shape)
        if mesh is not None:
            x_T = jax.lax.with_sharding_constraint(x_T, parallel.batch_sharding(mesh))
        x = sampling.sample(
            model_fn,
            sched,
            shape,
            key,
            sampler=s.sampler,
            num_steps=s.num_steps or None,
            spacing=s.spacing,
            prediction=d.prediction,
            var_type=d.var_type,
            eta=s.eta,
            clip_x0=s.clip_x0 or None,
            x_T=x_T,
            **(sampler_kwargs or {}),
        )
        # latents are not in [-1, 1]
        return x if (decode or not clip) else jnp.clip(x, -1.0, 1.0)

    if decode is None:
        return jax.jit(generate)
    generate_latents = jax.jit(generate)
    return lambda params, labels, key: decode(generate_latents(params, labels, key))


def padded_batch_size(batch_size: int, num_devices: int) -> int:
    """The batch size rounded up to a multiple of the device count."""
    return -(-batch_size // num_devices) * num_devices


def generate_many(
    generate, params, num: int, batch_size: int, num_classes, key, label=-1, conditions=None
):
    """Draw ``num`` samples in batches of ``batch_size``; returns (images, labels) as numpy.

    Every call has the same batch size (the last batch's labels are padded), so the sampler
    compiles once. ``conditions`` (a condition batch of ``num`` rows, numpy: see
    ``sample_conditions``) replaces the labels; ``labels`` is then returned as None.
    """
    labels = sample_labels(num, num_classes, label) if conditions is None else conditions
    images = []
    for i, start in enumerate(range(0, num, batch_size)):
        batch_labels = None
        if labels is not None:

            def rows(v):
                chunk = np.asarray(v)[start : start + batch_size]
                return jnp.asarray(_pad_rows(chunk, batch_size))

            batch_labels = jax.tree.map(rows, labels)
        out = generate(params, batch_labels, jax.random.fold_in(key, i))
        images.append(parallel.to_host(out)[: min(batch_size, num - start)])
    return np.concatenate(images), (labels if conditions is None else None)


def _pad_rows(chunk, rows: int):
    """``chunk`` with its rows repeated cyclically up to ``rows`` (as ``np.resize`` does for
    a vector)."""
    if len(chunk) >= rows:
        return chunk
    return chunk[np.arange(rows) % len(chunk)]


# ---------------------------------------------------------------------------------------------
# Conditions (``conditions``): condition.kind = label | text | embedding


def condition_of(cfg, data):
    """The run's ``conditions.Condition`` (None: the network's own class labels, if any)."""
    return conditions.from_config(cfg, data.dataset_classes)


def sample_conditions(cfg, data, num: int, sample_cfg):
    """(the condition batch of ``num`` samples or None, {"labels": ..., "prompts": ...}).

    Labels: ``sample.label``, or the classes in turn. Text: ``sample.prompt`` (cycled), or
    prompts naming the requested classes (``captions.class_prompts``, their phrasings in turn).
    Embeddings: the held-out split's, in order.
    """
    cond = condition_of(cfg, data)
    classes = data.dataset_classes if cond is not None else data.num_classes
    labels = sample_labels(num, classes, sample_cfg.label)
    if cond is None or cond.kind == "label":
        return labels, ({} if labels is None else {"labels": labels})
    if cond.kind == "text":
        from diffusax.data import captions

        prompts = conditions.split_prompts(sample_cfg.prompt)
        meta = {}
        if prompts:
            prompts = [prompts[i % len(prompts)] for i in range(num)]
        else:
            prompts = []
            for i, label in enumerate(labels):
                options = captions.class_prompts(int(label))
                prompts.append(options[(i // classes) % len(options)])
            meta["labels"] = labels
        tokens, mask = conditions.encode_prompts(cfg, prompts)
        meta["prompts"] = np.asarray(prompts)
        return {"tokens": tokens, "mask": mask}, meta
    # Embeddings: those of the held-out split's examples in turn (a user's own embeddings go
    # to methods.generate_many(conditions=...)).
    from diffusax.train.build import open_split

    held_out = open_split(cfg, cfg.data.eval_split)
    rows = np.arange(num) % len(held_out)
    batch = held_out.read(rows)
    meta = {"heldout_indices": rows}
    if "label" in batch:
        meta["labels"] = batch["label"]
    return batch["embedding"], meta


base.register(DDPM())
