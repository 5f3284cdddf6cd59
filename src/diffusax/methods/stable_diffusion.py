"""Stable Diffusion (Rombach et al. 2022) from a local diffusers pipeline folder: text to image
in JAX, equal to diffusers' StableDiffusionPipeline.

    τ_θ(y)   the CLIP text encoder's last hidden states of the 77 prompt tokens (no mask, as
             diffusers' pipeline: the padding tokens are part of the context)
    ε_θ      the cross-attention U-Net on z_t (B, H/8, W/8, 4), context τ_θ(y)
    guidance ε = ε(∅) + s (ε(y) − ε(∅)), ∅ the negative prompt's states ("" by default)
    sampler  DDIM, DPM-Solver++(2M), Euler or Euler ancestral on the timesteps, spacing, offset
             and final ᾱ of the folder's scheduler_config.json (``convert.diffusers_scheduler``),
             or LCM's multistep consistency sampler as LCMScheduler.from_config(that file):
             its β defaults, original_inference_steps grid and timestep_scaling
    decode   x = D(z / scaling_factor + shift_factor), clipped to [-1, 1]

``--config.lora=FILE`` merges a LoRA file into the U-Net once, at load time (diffusers'
``load_lora_weights`` then ``fuse_lora``): diffusers/PEFT keys (``unet.<module>.lora_A.weight``,
alpha from the header's lora_adapter_metadata, else alpha = r) or kohya keys
(``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``), as
``lora.import_lora`` reads them. With sampler "lcm" and a public LCM-LoRA for SD 1.5 this draws
in 4 steps, equal to StableDiffusionPipeline with ``LCMScheduler.from_config`` and
``load_lora_weights(FILE)``. Guidance as diffusers': none at guidance_scale 1 (one U-Net call per
step), classifier-free otherwise (an LCM-LoRA U-Net has no guidance embedding). The file is read
and checked against the folder's U-Net before any weight is read: a missing file, text-encoder
keys, modules the U-Net lacks and shape mismatches stop with an error naming field 'lora'.

The method trains nothing: `make sample` and `make info` run it. Everything is checked before
any weight is read or anything compiled (``convert.diffusers_pipeline``): a missing or
incomplete folder, another architecture (SDXL), a prediction type that contradicts the
scheduler config, an image size the VAE cannot halve, a noise file of the wrong shape, a LoRA
file that does not fit the U-Net; each error names the file or the config field, and the command
exits with status 2.

``sample.num_samples`` is the number of images per prompt (diffusers' num_images_per_prompt);
``--config.sample.noise=FILE.npy`` gives the initial latents (N, H/8, W/8, C), N a multiple of
the number of prompts, and then fixes every image exactly. Without it, image i starts from
N(0, I) drawn from ``fold_in(key(seed), i)``: the same images whatever the batch size. The
initial latents are stored in samples.npz (``noise``) so that a run can be repeated exactly.
The samplers that add noise between steps (euler_a, lcm) draw it per batch from ``batch_key``:
those images also depend on sample.batch_size and the number of devices.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re

import numpy as np

from diffusax import conditions
from diffusax.config import ConfigError
from diffusax.methods import base

SAMPLERS = ("ddim", "dpm++2m", "euler", "euler_a", "lcm")


@dataclasses.dataclass(frozen=True)
class LoraFile:
    """A LoRA file read and checked against the folder's U-Net (``lora.import_lora``)."""

    path: str
    adapters: dict  # {adapter key: {"A", "B"}}, our layout, each module's alpha / r folded in B
    scale: float  # the scale ``lora.merge`` takes (1.0: the per-module scales are in B)

    @property
    def ranks(self) -> list:
        return sorted({int(ab["A"].shape[-1]) for ab in self.adapters.values()})


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a sampling run needs, checked, before any weight is read."""

    folder: object  # convert.diffusers_pipeline.PipelineFolder
    sched: object  # schedules.Schedule of the scheduler config
    steps: object  # sampling.SamplingPlan: the visited timesteps and their ᾱ
    prediction: str  # eps | v | x0
    prompts: list  # one per image, prompt-major (each prompt's images together)
    negative_prompts: list
    latent_shape: tuple  # (h, w, c) of one image's latents
    noise: np.ndarray | None  # (N, h, w, c) from sample.noise, or None: drawn from the seed
    sampler_kwargs: dict = dataclasses.field(default_factory=dict)  # lcm: its scalings
    lora: LoraFile | None = None  # merged into the U-Net by ``load``


def _prompts(cfg) -> tuple[list, list]:
    prompts = conditions.split_prompts(cfg.sample.prompt)
    if not prompts:
        raise ConfigError(
            "config field 'sample.prompt' is empty: give the text to draw, e.g. "
            "--config.sample.prompt='a photo of an astronaut riding a horse' (several: 'a|b')"
        )
    negatives = conditions.split_prompts(cfg.sample.negative_prompt) or [""]
    return prompts, negatives


def _image_size(cfg, folder) -> tuple[int, int]:
    height = cfg.sample.height or folder.default_size
    width = cfg.sample.width or folder.default_size
    # The VAE halves the image at each of its levels and the U-Net halves the latents at each
    # of its levels but the last: both must divide exactly.
    multiple = folder.vae_scale * 2 ** (len(folder.unet_kwargs["block_out_channels"]) - 1)
    for field, value in (("sample.height", height), ("sample.width", width)):
        if value % multiple:
            raise ConfigError(
                f"config field '{field}' ({value}) must be a multiple of {multiple} (the VAE's "
                f"x{folder.vae_scale} and the U-Net's downsampling)"
            )
    return height, width


def _read_noise(path: str, latent_shape: tuple, num_prompts: int) -> np.ndarray:
    if not os.path.isfile(path):
        raise ConfigError(f"config field 'sample.noise': no file {path!r}")
    try:
        noise = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"config field 'sample.noise': {path} is not a .npy array: {e}") from e
    if noise.ndim != 4 or tuple(noise.shape[1:]) != tuple(latent_shape):
        raise ConfigError(
            f"config field 'sample.noise': {path} has shape {noise.shape}; expected (N, "
            f"{', '.join(map(str, latent_shape))}): N initial latents (H/8, W/8, channels), NHWC, "
            f"for sample.height x sample.width images"
        )
    if not np.issubdtype(noise.dtype, np.floating) or not np.all(np.isfinite(noise)):
        raise ConfigError(f"config field 'sample.noise': {path} must hold finite floats")
    if len(noise) % num_prompts:
        raise ConfigError(
            f"config field 'sample.noise': {path} holds {len(noise)} latents, not a multiple of "
            f"the {num_prompts} prompts"
        )
    return noise.astype(np.float32)


def _abstract_unet_params(folder) -> dict:
    """The pure dict of the folder's U-Net parameters as shapes (nothing allocated or read)."""
    return _abstract_unet_params_of(json.dumps(folder.unet_kwargs, sort_keys=True))


@functools.lru_cache(maxsize=4)
def _abstract_unet_params_of(unet_kwargs_json: str) -> dict:
    from flax import nnx

    from diffusax.models.unet_cond import UNetCondition
    from diffusax.train.state import split_params

    kwargs = {
        k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(unet_kwargs_json).items()
    }
    build = lambda: UNetCondition(**kwargs, rngs=nnx.Rngs(0))
    return split_params(nnx.eval_shape(build))[1]  # tracing the constructor takes a second


def _read_lora(path: str, folder) -> LoraFile:
    """The LoRA file's adapters for the folder's U-Net; ConfigError naming field 'lora' and the
    file unless every key fits (``lora.import_lora``'s checks, on the U-Net's shapes)."""
    from safetensors import SafetensorError

    from diffusax import lora
    from diffusax.convert.diffusers_unet_cond import diffusers_name

    if not os.path.isfile(path):
        raise ConfigError(f"config field 'lora': no file {path!r}")
    try:
        adapters, scale = lora.import_lora(path, _abstract_unet_params(folder), diffusers_name)
    except (OSError, SafetensorError) as e:
        raise ConfigError(f"config field 'lora': {path} is not a safetensors LoRA file: {e}") from e
    except ValueError as e:  # text-encoder keys, modules the U-Net lacks, shapes, ...
        raise ConfigError(
            f"config field 'lora': {path}, for the U-Net of {folder.path}: {e}"
        ) from e
    return LoraFile(path, adapters, scale)


def plan(cfg) -> Plan:
    """Read and check the folder, the scheduler config, the prompts and the noise file."""
    from diffusax.convert import diffusers_pipeline, diffusers_scheduler

    if not cfg.pretrained:
        raise ConfigError(
            "config field 'pretrained' is empty: give a local diffusers pipeline folder, e.g. "
            "--config.pretrained=models/sd15 (README: Stable Diffusion from diffusers weights)"
        )
    try:
        folder = diffusers_pipeline.read_pipeline_folder(cfg.pretrained)
    except diffusers_pipeline.PipelineFolderError as e:
        raise ConfigError(str(e)) from e
    scheduler_file = folder.component(os.path.join("scheduler", "scheduler_config.json"))
    sampler = cfg.sample.sampler
    try:
        # sampler "lcm" reads the β fields as LCMScheduler does (its defaults differ).
        sched = diffusers_scheduler.schedule_from_scheduler_config(folder.scheduler, sampler)
        prediction = diffusers_scheduler.prediction_from_scheduler_config(folder.scheduler)
    except ValueError as e:
        raise ConfigError(f"{scheduler_file}: {e}") from e
    asked = cfg.diffusion.prediction
    if asked and asked != prediction:
        raise ConfigError(
            f"config field 'diffusion.prediction' is {asked!r}, but {scheduler_file} says "
            f"prediction_type={folder.scheduler.get('prediction_type', 'epsilon')!r} "
            f"({prediction!r}): leave the field '' to follow the folder"
        )
    num_steps = cfg.sample.num_steps or 50
    try:
        steps = diffusers_scheduler.plan_from_scheduler_config(
            sched, folder.scheduler, sampler, num_steps
        )
        sampler_kwargs = (
            diffusers_scheduler.lcm_scalings_from_scheduler_config(folder.scheduler)
            if sampler == "lcm"
            else {}
        )
    except ValueError as e:
        raise ConfigError(f"config field 'sample.num_steps' / {scheduler_file}: {e}") from e
    height, width = _image_size(cfg, folder)
    latent_shape = (
        height // folder.vae_scale,
        width // folder.vae_scale,
        folder.vae_kwargs["latent_channels"],
    )
    prompts, negatives = _prompts(cfg)
    noise = None
    per_prompt = cfg.sample.num_samples
    if cfg.sample.noise:
        noise = _read_noise(cfg.sample.noise, latent_shape, len(prompts))
        per_prompt = len(noise) // len(prompts)
    rows = [i for i in range(len(prompts)) for _ in range(per_prompt)]  # prompt-major
    adapters = _read_lora(cfg.lora, folder) if cfg.lora else None
    return Plan(
        folder=folder,
        sched=sched,
        steps=steps,
        prediction=prediction,
        prompts=[prompts[i] for i in rows],
        negative_prompts=[negatives[i % len(negatives)] for i in rows],
        latent_shape=latent_shape,
        noise=noise,
        sampler_kwargs=sampler_kwargs,
        lora=adapters,
    )


@dataclasses.dataclass
class Pipeline:
    """The loaded networks (split: graphdefs and parameters), the tokenizer and the plan."""

    plan: Plan
    tokenizer: object
    graphdefs: dict
    params: dict


def load(cfg, checked: Plan | None = None) -> Pipeline:
    """``plan(cfg)``, then the tokenizer and the three networks' converted weights, with the
    plan's LoRA merged into the U-Net's (W + scale·ΔW, once: as diffusers' fuse_lora)."""
    import jax.numpy as jnp
    from flax import nnx

    from diffusax.convert import diffusers_pipeline
    from diffusax.data.clip_tokenizer import ClipTokenizer

    checked = checked or plan(cfg)
    folder = checked.folder
    try:
        tokenizer = ClipTokenizer.from_folder(folder.component("tokenizer"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"config field 'pretrained': {e}") from e
    if tokenizer.max_length > folder.text_kwargs["context_length"]:
        raise ConfigError(
            f"{folder.component('tokenizer')}: model_max_length={tokenizer.max_length} exceeds "
            f"text_encoder/config.json max_position_embeddings="
            f"{folder.text_kwargs['context_length']}"
        )
    dtype = jnp.bfloat16 if cfg.model.dtype == "bfloat16" else None
    models = diffusers_pipeline.load_models(folder, dtype=dtype)
    graphdefs, params = {}, {}
    for name, model in models.items():
        graphdefs[name], params[name] = nnx.split(model)
    if checked.lora is not None:
        import jax

        from diffusax import lora

        unet = params["unet"]
        merge = jax.jit(lora.merge)  # one program; the kernels it does not adapt pass through
        fused = merge(nnx.to_pure_dict(unet), checked.lora.adapters, checked.lora.scale)
        nnx.replace_by_pure_dict(unet, fused)
    return Pipeline(checked, tokenizer, graphdefs, params)


def merged(pipe: Pipeline, name: str, params):
    """The network ``name`` ("text_encoder", "unet", "vae") with ``params`` (inside jit)."""
    from flax import nnx

    return nnx.merge(pipe.graphdefs[name], params)


def make_generate(pipe: Pipeline, cfg, mesh):
    """A jitted ``generate(params, prompt_ids, negative_ids, x_T, key) -> images in [-1, 1]``
    for one batch (B rows, B a multiple of the mesh size): encode both prompts, sample the
    latents with guidance, decode them."""
    import jax
    import jax.numpy as jnp

    from diffusax import parallel, sampling

    p, s, folder = pipe.plan, cfg.sample, pipe.plan.folder
    scale, shift = folder.scaling_factor, folder.shift_factor
    sharding = parallel.batch_sharding(mesh)

    def generate(params, prompt_ids, negative_ids, x_T, key):
        text, unet, vae = (merged(pipe, k, params[k]) for k in ("text_encoder", "unet", "vae"))
        context = text(prompt_ids)[0]  # (B, 77, D) last hidden states
        net = lambda x, t, ctx: unet(x, t, context=ctx)  # (B, h, w, c)
        if s.guidance_scale != 1.0:
            # The negative prompts' states are the unconditional branch, row by row.
            net = sampling.classifier_free_guidance(
                net, s.guidance_scale, null_label=text(negative_ids)[0]
            )
        x_T = jax.lax.with_sharding_constraint(x_T, sharding)
        z = sampling.sample(
            sampling.bind_condition(net, context),
            p.sched,
            x_T.shape,
            key,
            sampler=s.sampler,
            plan=p.steps,
            prediction=p.prediction,
            eta=s.eta,
            x_T=x_T,
            **p.sampler_kwargs,  # lcm: sigma_data, timestep_scaling
        )  # (B, h, w, c)
        images = vae.decode(z / scale + shift)  # (B, H, W, 3)
        return jnp.clip(images, -1.0, 1.0)

    return jax.jit(generate)


def initial_noise(cfg, checked: Plan) -> np.ndarray:
    """(N, h, w, c): the noise file's latents, or image i's N(0, I) from fold_in(seed key, i)."""
    import jax

    if checked.noise is not None:
        return checked.noise
    key = jax.random.fold_in(jax.random.key(cfg.seed), 10_000_019)
    draw = jax.jit(
        jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), checked.latent_shape))
    )
    return np.asarray(draw(np.arange(len(checked.prompts))))


def batch_key(cfg, i: int):
    """The key ``generate`` gets for batch i: ``sampling.sample`` draws the noise of its step j
    (euler_a, lcm) from fold_in(split(key)[1], j), for the whole (padded) batch."""
    import jax

    return jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), 20_000_003), i)


def draw(pipe: Pipeline, cfg, mesh, noise: np.ndarray) -> np.ndarray:
    """The images (N, H, W, 3) in [-1, 1] of every prompt row, in batches of
    ``sample.batch_size`` (padded to the mesh; the last batch repeats rows)."""
    import jax

    from diffusax import parallel
    from diffusax.methods.ddpm import padded_batch_size

    p = pipe.plan
    n = len(p.prompts)
    batch = padded_batch_size(min(cfg.sample.batch_size, n), mesh.size)
    generate = make_generate(pipe, cfg, mesh)
    prompt_ids = pipe.tokenizer.encode(p.prompts)  # (N, 77)
    negative_ids = pipe.tokenizer.encode(p.negative_prompts)
    sharding = parallel.batch_sharding(mesh)
    out = []
    for i, start in enumerate(range(0, n, batch)):
        rows = np.arange(start, start + batch) % n  # the last batch wraps around
        args = [jax.device_put(a[rows], sharding) for a in (prompt_ids, negative_ids, noise)]
        images = generate(pipe.params, *args, batch_key(cfg, i))
        out.append(parallel.to_host(images)[: min(batch, n - start)])
    return np.concatenate(out)


def _slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:40] or "empty"


class StableDiffusion(base.Method):
    name = "stable_diffusion"
    param_sections = ()
    modes = ("sample", "info")

    def validate(self, cfg):
        if cfg.sample.sampler not in SAMPLERS:
            raise ConfigError(
                f"config field 'sample.sampler' is {cfg.sample.sampler!r}; method "
                f"'stable_diffusion' samples with one of {list(SAMPLERS)}"
            )
        if cfg.sample.eta and cfg.sample.sampler != "ddim":
            raise ConfigError(
                f"config field 'sample.eta' ({cfg.sample.eta}) applies to sampler 'ddim' only"
            )
        _prompts(cfg)

    def sample_to_disk(self, cfg, workdir: str) -> str:
        """samples/NNN_<prompt>.png, a grid, and samples.npz: uint8 ``images``, ``prompts``,
        ``negative_prompts`` and the initial latents ``noise`` (N, h, w, c)."""
        import jax

        from diffusax import image_io, parallel

        checked = plan(cfg)  # every check before the weights are read
        pipe = load(cfg, checked)
        mesh = parallel.make_mesh()
        noise = initial_noise(cfg, checked)
        images = draw(pipe, cfg, mesh, noise)
        out_dir = os.path.join(workdir, "samples")
        path = os.path.join(out_dir, "samples.npz")
        if jax.process_index() != 0:
            return path
        os.makedirs(out_dir, exist_ok=True)
        u8 = image_io.to_uint8(images)
        for i, (image, prompt) in enumerate(zip(u8, checked.prompts)):
            image_io.save_png(os.path.join(out_dir, f"{i:03d}_{_slug(prompt)}.png"), image)
        image_io.save_npz(
            path,
            images=u8,
            prompts=np.asarray(checked.prompts),
            negative_prompts=np.asarray(checked.negative_prompts),
            noise=noise,
        )
        image_io.save_grid(os.path.join(out_dir, "samples_grid.png"), images[:16])
        return path

    def describe_run(self, cfg) -> str:
        """`make info`: the folder's networks, schedule, sampling plan and LoRA file (read and
        checked); no network weights read."""
        import jax
        from flax import nnx

        from diffusax import models
        from diffusax.models.autoencoder import AutoencoderKL
        from diffusax.models.text import TextEncoder
        from diffusax.models.unet_cond import UNetCondition

        p = plan(cfg)
        f = p.folder
        lines = [f"experiment: {cfg.name}", f"method: {self.describe(cfg)}"]
        total = 0
        for name, cls, kwargs in (
            ("text_encoder", TextEncoder, f.text_kwargs),
            ("unet", UNetCondition, f.unet_kwargs),
            ("vae", AutoencoderKL, f.vae_kwargs),
        ):
            build = lambda cls=cls, kwargs=kwargs: cls(**kwargs, rngs=nnx.Rngs(0))
            count = models.count_params(nnx.eval_shape(build))
            total += count
            lines.append(f"network {name}: {cls.__name__}, {count} parameters, frozen ({f.path})")
        lines.append(f"parameters: {total}")
        if p.lora is not None:
            lines.append(
                f"lora: {p.lora.path}, {len(p.lora.adapters)} U-Net modules adapted (rank "
                f"{'/'.join(map(str, p.lora.ranks))}), merged into the U-Net at load"
            )
        h, w, c = p.latent_shape
        default = "scaled_linear" if cfg.sample.sampler == "lcm" else "linear"  # LCMScheduler's
        betas = f.scheduler.get("beta_schedule", default)
        lines += [
            f"schedule: T={p.sched.num_timesteps}, {betas} betas, prediction {p.prediction}",
            f"images: {h * f.vae_scale}x{w * f.vae_scale}, latents {h}x{w}x{c}, scaling factor "
            f"{f.scaling_factor}",
            f"sampler: {self.describe_sampler(cfg)}; timesteps "
            f"{np.round(p.steps.timesteps[::-1], 3).tolist()}",
            f"prompts: {len(p.prompts)} images of {len(set(p.prompts))} prompt(s)",
            f"devices: {jax.device_count()} {jax.devices()[0].platform}",
        ]
        return "\n".join(lines)

    def describe(self, cfg):
        return f"{self.name}  (pretrained diffusers pipeline {cfg.pretrained})"

    def describe_sampler(self, cfg):
        s = cfg.sample
        text = f"{s.sampler}, {s.num_steps or 50} steps, guidance {s.guidance_scale}"
        if s.guidance_scale == 1.0:
            text += " (none: the conditional U-Net alone)"
        return text


base.register(StableDiffusion())
