"""Stable Diffusion v1.5 (or any SD 1.x / 2.x in diffusers format) sampled in JAX.

The weights come from a local diffusers StableDiffusionPipeline folder, downloaded beforehand
(README: Stable Diffusion):

    huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir models/sd15 \\
        --include model_index.json "scheduler/*" "tokenizer/*" "*/config.json" \\
        text_encoder/model.safetensors unet/diffusion_pytorch_model.safetensors \\
        vae/diffusion_pytorch_model.safetensors
    make sample EXP=sd15 ARGS="--config.pretrained=models/sd15 \\
        --config.sample.prompt='a photograph of an astronaut riding a horse'"

This writes runs/sd15/samples/000_<prompt>.png ..., samples_grid.png and samples.npz (uint8
images, the prompts and the initial latents). Everything about the model comes from the folder:
the CLIP text encoder and tokenizer, the cross-attention U-Net, the VAE and its scaling factor,
and from scheduler/scheduler_config.json the β schedule, the prediction type (ε or v) and the
timesteps, spacing, offset and final ᾱ of the sampler chosen here (diffusers' rules for that
scheduler class). The `diffusion` section is not used, except that a `diffusion.prediction`
set explicitly must agree with the folder (`''`, the default here, follows it).

    --config.sample.sampler=ddim|dpm++2m|euler|euler_a    (ddim, 50 steps by default)
    --config.sample.num_steps=25 --config.sample.guidance_scale=7.5
    --config.sample.negative_prompt='blurry, low quality'
    --config.sample.num_samples=4            images per prompt; prompts separated by "|"
    --config.sample.height=512 --config.sample.width=768   (0: the U-Net's size, 512 for SD 1.x)
    --config.sample.noise=latents.npy        (N, H/8, W/8, 4) initial latents, NHWC
    --config.model.dtype=bfloat16            bf16 compute (parameters stay float32)
    --config.seed=1

The batch (sample.batch_size rows) is split over every device; on a 2-core CPU an SD 1.5 image
at 512x512 takes minutes per step. `make info EXP=sd15 ARGS=--config.pretrained=...` prints the
networks, schedule and timesteps without reading a weight.
"""

from experiments.base import get_base_config


def get_config(arg=None):
    c = get_base_config()
    c.name = "sd15"
    c.method = "stable_diffusion"
    c.pretrained = ""  # required: the pipeline folder
    c.model.name = "unet_cond"  # the cross-attention U-Net, built from the folder's config
    c.condition.kind = "text"  # CLIP's token states, built from the folder's text encoder
    c.diffusion.prediction = ""  # the scheduler config's prediction_type
    c.diffusion.schedule = "scaled_linear"  # for the record; the folder's schedule is used
    c.diffusion.beta_start = 0.00085
    c.diffusion.beta_end = 0.012
    c.sample.sampler = "ddim"
    c.sample.num_steps = 50
    c.sample.eta = 0.0
    c.sample.guidance_scale = 7.5
    c.sample.clip_x0 = 0.0  # latents are not in [-1, 1]
    c.sample.num_samples = 1  # per prompt
    c.sample.batch_size = 4
    c.sample.prompt = "a photograph of an astronaut riding a horse"
    return c
