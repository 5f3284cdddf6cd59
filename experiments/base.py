"""Shared defaults of every experiment; also the schema that `diffusax.config.validate` checks.

An experiment file defines `get_config(arg=None)` that starts from `get_base_config()` and
overrides values. Every key a config may hold is declared here, so a misspelled key is an error.
"""

import math

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "experiment"
    c.seed = 0
    c.method = "ddpm"  # a method is a loss plus a sampler; see diffusax.methods
    # Shrinks the experiment so it runs to completion on a laptop CPU (big_vision's switch).
    c.runlocal = False
    # A local diffusers pipeline folder (model_index.json, text_encoder/, tokenizer/, unet/, vae/,
    # scheduler/) that method "stable_diffusion" samples from; downloaded beforehand.
    c.pretrained = ""

    c.data = ml_collections.ConfigDict()
    c.data.name = "digits"  # "digits" (bundled) or a TFDS dataset name, e.g. "cifar10"
    c.data.data_dir = ""  # TFDS data directory ("" = TFDS's default, ~/tensorflow_datasets)
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.image_key = "image"
    c.data.label_key = "label"  # "" for an unlabelled dataset
    c.data.random_flip = False
    c.data.num_levels = 256  # quantisation levels of the data, for bits per dimension
    # What the dataset holds, declared so that `make info` can describe a run before the data
    # is prepared: (H, W, C) of its images and its number of classes (() / 0 = not declared).
    # When the data is there, the loader checks these against it.
    c.data.image_shape = ()
    c.data.num_classes = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "unet"  # unet | dit
    c.model.variant = "XL/2"  # DiT only: S/B/L/XL at patch 2/4/8 (models.dit.VARIANTS)
    c.model.scan_blocks = True  # DiT only: the block stack as one lax.scan (compiles once)
    c.model.fused_attention = False  # DiT only: jax.nn.dot_product_attention's cuDNN kernel
    # DiT only: sizes that replace the variant's (0 = the variant's value; the patch size always
    # comes from the variant), for models smaller than the paper's table, e.g. on 8x8 digits.
    c.model.depth = 0
    c.model.hidden_size = 0
    c.model.heads = 0
    c.model.ch = 128
    c.model.ch_mult = (1, 2, 2, 2)
    c.model.num_res_blocks = 2
    c.model.attn_resolutions = (16,)
    c.model.num_heads = 1
    c.model.dropout = 0.1
    c.model.class_conditional = False
    c.model.remat = False
    c.model.dtype = "float32"  # computation dtype; parameters stay float32
    # U-Net only: > 0 conditions the network on a guidance scale w through the sin/cos features
    # of 1000·w of this width (LCM's w-conditioned student; method "lcm" sets it for its
    # student alone).
    c.model.guidance_embed_dim = 0
    # unet_cond only (the LDM / Stable Diffusion cross-attention U-Net): attn_resolutions are
    # the levels with transformer blocks (the middle always has one), num_heads their heads.
    c.model.transformer_layers = 1  # BasicTransformerBlocks per transformer
    c.model.linear_projection = False  # proj_in / proj_out: Linear (SD 2) or 1x1 conv (SD 1)

    # What the denoiser is conditioned on (diffusax.conditions), through τθ(y) and
    # cross-attention (model.name = "unet_cond"). "" = the U-Net / DiT's own class labels,
    # switched on by model.class_conditional.
    c.condition = ml_collections.ConfigDict()
    c.condition.kind = ""  # "" | label | text | embedding
    c.condition.class_dim = 64  # label: width of the class embedding τθ(y)
    # GLIDE: add τθ's pooled vector (class embedding, final text token, mean embedding) to the
    # timestep embedding, beside the cross-attention context.
    c.condition.pooled_to_temb = True
    # embedding: precomputed embeddings (CLIP, T5, ...) carried by the dataset: the TFDS
    # feature or latent-shard field `embedding_key`, of shape (D,) or (L, D) per example.
    c.condition.embedding_key = "embedding"
    c.condition.embedding_shape = ()

    # condition.kind = "text": a tokenizer over the captions and a CLIP-architecture text
    # encoder trained with the diffusion model (diffusax.models.text).
    c.text = ml_collections.ConfigDict()
    c.text.captions = "digits"  # what makes the captions (diffusax.data.captions)
    c.text.tokenizer = "words"  # words | chars
    c.text.context_length = 16  # tokens per caption, bos and eos included
    c.text.width = 64
    c.text.layers = 2
    c.text.heads = 4
    c.text.mlp_dim = 0  # 0 = 4 * width

    # Method "ldm": diffusion on z = scale_factor * E(x) of a frozen KL autoencoder, decoded
    # by it (diffusax.methods.ldm). Its architecture is the `autoencoder` section below.
    c.ldm = ml_collections.ConfigDict()
    # "run:DIR" (an `autoencoder` run of this project) or "diffusers:DIR" (a local AutoencoderKL
    # folder, e.g. stabilityai/sd-vae-ft-ema downloaded beforehand).
    c.ldm.vae = ""
    # Multiplies the latents so that they have about unit variance (0.18215 for the SD VAE);
    # `make eval EXP=autoencoder_digits` reports 1 / std of its latents.
    c.ldm.scale_factor = 1.0

    # Method "lcm": few-step consistency models distilled from (or trained without) a teacher
    # (diffusax.methods.lcm).
    c.lcm = ml_collections.ConfigDict()
    # lcm: latent consistency distillation (Luo et al. 2023) | lecture: the lecture's
    # L_rec + λ L_cons | ict: consistency training without a teacher (Song & Dhariwal 2023).
    c.lcm.objective = "lcm"
    # The frozen teacher: "run:DIR" (a ddpm run of this project; its EMA) or "diffusers:DIR"
    # (a local UNet2DModel folder, whose architecture `model` must match).
    c.lcm.teacher = ""
    # An experiment file that trains the teacher into the "run:DIR" above when that run has no
    # checkpoint yet ("" = refuse, naming the command that would train it).
    c.lcm.teacher_experiment = ""
    c.lcm.num_ddim_timesteps = 50  # the DDIM solver's grid: skipping interval k = T / 50
    # Guidance-augmented targets: ω ~ U[w_min, w_max] (the teacher guided at scale 1 + ω),
    # embedded into the student when model.guidance_embed_dim > 0.
    c.lcm.w_min = 0.0
    c.lcm.w_max = 1.0
    c.lcm.ema_decay = 0.95  # the EMA target network θ⁻ (full LCM only)
    c.lcm.loss = "l2"  # l2 | huber (√(d² + c²) - c)
    c.lcm.huber_c = 0.001
    c.lcm.sigma_data = 0.5
    # Clip x̂_0 to [-c, c] inside f and the teacher's DDIM step (0 = off; pixels in [-1, 1]: 1,
    # as the samplers' clip_x0; latents: 0). At the top of a cosine schedule ᾱ is ~1e-9 and an
    # unclipped x̂_0 = (z - √(1-ᾱ) ε̂)/√ᾱ is noise amplified ~10⁴ times.
    c.lcm.clip_x0 = 1.0
    c.lcm.timestep_scaling = 10.0
    # ε-prediction: the student reads its ε at ᾱ' = max(ᾱ_t, min_abar) (0 = off, the exact
    # x̂_0): at the top of a cosine schedule 1/√ᾱ ~ 2·10⁴ would amplify the network's error.
    c.lcm.min_abar = 0.0
    c.lcm.lecture_lambda = 1.0  # λ of the lecture's objective
    # ict: the doubling curriculum N(k) = min(s0·2^⌊k/K'⌋, s1) + 1 and lognormal noise levels.
    c.lcm.ict_s0 = 10
    c.lcm.ict_s1 = 1280
    c.lcm.ict_p_mean = -1.1
    c.lcm.ict_p_std = 2.0

    # Method "add": adversarial diffusion distillation (Sauer et al. 2023) of a frozen teacher
    # into a 1-to-4-step student (diffusax.methods.add). The discriminator's optimizer is the
    # `disc_optim` section (ADD's reference: Adam with b1 = 0).
    c.add = ml_collections.ConfigDict()
    # The frozen teacher: "run:DIR" (a ddpm run of this project; its EMA) or "diffusers:DIR"
    # (a local UNet2DModel folder, whose architecture `model` must match).
    c.add.teacher = ""
    # An experiment file that trains the teacher into the "run:DIR" above when that run has no
    # checkpoint yet ("" = refuse, naming the command that would train it).
    c.add.teacher_experiment = ""
    # The student's timesteps: the N trailing ones round(T - i·T/N) - 1 ({999, 749, 499, 249}
    # for T = 1000, N = 4); it samples with 1 to N of them.
    c.add.student_timesteps = 4
    c.add.teacher_guidance = 1.5  # the teacher's classifier-free guidance scale (1 = none)
    c.add.distill_lambda = 2.5  # λ of L_S = L_adv + λ L_distill
    # c(t) of L_distill = c(t)·mean((x̂_θ - x̂_teacher)²): exponential (= ᾱ_t) | sds | uniform.
    c.add.distill_weight = "exponential"
    # The R1 penalty γ/2·E‖∇_features D(x_real)‖², on the discriminator's input features.
    c.add.r1_gamma = 1e-5
    # The frozen feature network of the discriminator: "teacher" (the teacher U-Net's encoder)
    # or "run:DIR" (the encoder of another ddpm run with the same `model`). Never the
    # evaluation classifier, which would game the metric.
    c.add.features = "teacher"
    # The feature network sees the image noised at this (low-noise) timestep, with the null label.
    c.add.feature_timestep = 10
    c.add.head_width = 64  # hidden channels of each discriminator head
    c.add.head_norm_groups = 8  # GroupNorm groups of the heads (divides head_width)
    # Rescale the teacher's schedule to zero terminal SNR (Lin et al. 2024) for the re-noising
    # and its x̂_0; an ε-teacher is then not asked at the last timestep (ᾱ = 0).
    c.add.zero_terminal_snr = False
    # ε-prediction: the student reads its ε at ᾱ >= min_abar (0 = off), as lcm.min_abar.
    c.add.min_abar = 0.0
    c.add.clip_x0 = 1.0  # clip the teacher's x̂_0 (and sampled images) to [-c, c] (0 = off)
    # Clip the student's x̂_0 in training too. Off: the clip has zero gradient beyond ±c, so a
    # pixel the 1-step student overshoots (its x̂_0 is its ε error times 1/√ᾱ ~ 30) stays
    # saturated; a first run with it on gave binary, saturated 1-step digits (FD 175).
    c.add.clip_student = False
    # An LCM run ("run:DIR") whose own `make eval` rows are shown beside ADD's, and compared
    # at one step ("" = none).
    c.add.compare_lcm = ""
    # An EMA of the student, θ_ema ← d·θ_ema + (1 - d)·θ, which sampling and `make eval` then
    # use (0 = none: the student is sampled as trained, as the paper's reference does).
    c.add.ema_decay = 0.0

    # Method "clip": contrastive language-image pre-training on the captioned digits (Radford et
    # al. 2021; diffusax.methods.clip). Its text tower is the `text` section's encoder, read
    # through its pooled (end-of-text) state and a linear projection.
    c.clip = ml_collections.ConfigDict()
    c.clip.embed_dim = 64  # width of the joint image-text space
    c.clip.image_widths = (32, 64, 128)  # the image convnet: a 3x3 conv per width, later ones /2
    c.clip.init_logit_scale = math.log(1.0 / 0.07)  # t; the logits are scaled by exp(t)
    c.clip.max_logit_scale = math.log(100.0)  # exp(t) is clipped at 100
    # Random crops, CLIP's one augmentation: each image shifted by up to this many pixels.
    c.clip.max_shift = 0

    # Method "prior": unCLIP's diffusion prior (diffusax.methods.prior), a caption -> a CLIP
    # image embedding, over the frozen CLIP of a clip run. Its clip and text sections must be
    # that run's (they build the frozen encoder).
    c.prior = ml_collections.ConfigDict()
    c.prior.clip = "run:runs/clip_digits"  # the frozen CLIP: "run:DIR" of method clip
    # `make train` trains the CLIP first when it has no checkpoint ("" = never).
    c.prior.clip_experiment = "clip_digits"
    c.prior.width = 128  # the decoder-only transformer over [tokens, text, time, z_t, query]
    c.prior.layers = 4
    c.prior.heads = 4
    c.prior.mlp_dim = 0  # 0 = 4 * width
    c.prior.causal = True  # the paper's causal mask; False = full attention
    c.prior.num_timesteps = 1000  # of the cosine ᾱ schedule
    c.prior.drop_text = 0.1  # rate at which the caption is replaced by the learned null
    c.prior.sampler = "ddim"  # ddpm | ddim, over embeddings
    c.prior.num_steps = 25  # timesteps visited (trailing spacing)
    c.prior.eta = 0.0  # DDIM's η
    c.prior.guidance_scale = 1.0  # s of classifier-free guidance; 1 = the conditional prior
    c.prior.num_candidates = 2  # draws per caption; the closest to its text embedding is kept

    # Method "unclip": unCLIP's decoder (diffusax.methods.unclip), an image from a CLIP image
    # embedding and a caption, over the frozen CLIP (prior.clip) and the frozen prior run below;
    # its prior section must be that run's (it builds the frozen prior and samples it).
    c.unclip = ml_collections.ConfigDict()
    c.unclip.prior = "run:runs/prior_digits"  # the frozen prior: "run:DIR" of method prior
    # `make train` trains the prior first when it has no checkpoint ("" = never).
    c.unclip.prior_experiment = "prior_digits"
    c.unclip.drop_text = 0.5  # rate at which the caption is replaced by the empty one
    c.unclip.drop_image = 0.1  # rate at which the image embedding is the learned null
    c.unclip.variation_eta = 1.0  # DDIM's η of `--mode=variations`: > 0, so the draws differ
    c.unclip.num_variations = 8  # per source image
    # `--mode=variations`: the source image, an index into the held-out split or an image file
    # (PNG, JPEG, .npy; made grey and resized to the data's size).
    c.unclip.source = "heldout:0"
    c.unclip.num_sources = 4  # sources heldout:K, K+1, ... (one row each; "heldout:" only)
    # `--mode=interpolate`: the two held-out digits whose embeddings the walk joins
    # (sample.interpolate_steps frames).
    c.unclip.interpolate_indices = (0, 1)
    c.unclip.eval_variations = 300  # held-out digits whose variation `make eval` classifies

    # LoRA adapters (diffusax.lora): with rank > 0, method "lcm" trains only adapters on the
    # teacher (LCM-LoRA: no w-embedding, no separate target).
    c.adapters = ml_collections.ConfigDict()
    c.adapters.rank = 0
    c.adapters.alpha = 0.0  # 0 = rank: scale alpha / rank = 1
    # Regular expressions over the module paths ("down_levels.0.res_blocks.1.conv1"): the
    # linear and conv layers that get adapters.
    c.adapters.targets = (r"conv[12]$", "temb_proj", "query", "key", "value", "proj_out")
    # A LoRA file (PEFT / diffusers or kohya safetensors, e.g. a public LCM-LoRA) that method
    # "stable_diffusion" merges into the pipeline's U-Net before sampling.
    c.lora = ""

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.schedule = "linear"
    c.diffusion.num_timesteps = 1000
    c.diffusion.beta_start = 1e-4
    c.diffusion.beta_end = 0.02
    c.diffusion.prediction = "eps"  # eps | x0 | v; "" = the pretrained folder's scheduler config
    c.diffusion.var_type = "fixed_large"
    c.diffusion.vlb_weight = 0.001
    c.diffusion.min_snr_gamma = 0.0  # 0 = no Min-SNR weighting
    c.diffusion.label_drop_prob = 0.0  # > 0 trains the unconditional model for guidance

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adam"  # adam | adamw
    c.optim.learning_rate = 2e-4
    c.optim.warmup_steps = 5000
    c.optim.schedule = "constant"  # constant | cosine (after the linear warmup)
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip = 1.0  # global-norm clip; 0 = off
    c.optim.ema_decay = 0.9999

    # The discriminator's optimizer (methods "autoencoder" and "add"): the same fields as
    # `optim`, Adam(0.5, 0.9) as taming-transformers and LDM.
    c.disc_optim = c.optim.copy_and_resolve_references()
    c.disc_optim.b1 = 0.5
    c.disc_optim.b2 = 0.9

    # Method "autoencoder": the KL autoencoder of latent diffusion with a patch discriminator
    # (diffusax.methods.autoencoder). The architecture is Stable Diffusion's AutoencoderKL.
    c.autoencoder = ml_collections.ConfigDict()
    c.autoencoder.image_size = 0  # resize the images to this side first (0 = as they are)
    c.autoencoder.block_out_channels = (128, 256, 512, 512)  # one level each; 2^(n-1) smaller
    c.autoencoder.layers_per_block = 2
    c.autoencoder.latent_channels = 4
    c.autoencoder.norm_num_groups = 32
    c.autoencoder.mid_attention = True
    c.autoencoder.reconstruction = "l1"  # l1 | l2, a mean over every element
    c.autoencoder.kl_weight = 1e-6  # β; see diffusax.autoencoder_losses on its scale
    c.autoencoder.perceptual_weight = 0.0  # > 0: the frozen feature network below
    c.autoencoder.perceptual = ""  # "classifier:PATH": a digits classifier saved by `make eval`
    c.autoencoder.disc_start = 50_001  # the GAN terms are off before this step
    c.autoencoder.disc_weight = 0.5  # w_d (0 = no discriminator update at all)
    c.autoencoder.disc_channels = 64  # ndf of the PatchGAN
    c.autoencoder.disc_layers = 3
    c.autoencoder.disc_norm_groups = 32

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 128  # global, over all devices and hosts
    # Gradient accumulation: each device's rows pass in this many micro-batches whose mean
    # gradient makes one update (same step, a micro-batch's activation memory).
    c.train.grad_accum_steps = 1
    c.train.num_steps = 800_000
    c.train.log_every = 100
    c.train.checkpoint_every = 5000
    c.train.keep_checkpoints = 3
    c.train.async_checkpoint = True
    c.train.sample_every = 0  # write an EMA sample grid every N steps (0 = only at the end)
    c.train.grid_samples = 64
    c.train.nonfinite = "abort"  # abort | skip
    c.train.max_bad_steps = 10  # with "skip": abort after this many non-finite steps in a row
    c.train.mesh_data = -1  # devices on the data axis (-1 = all that the fsdp axis leaves)
    c.train.mesh_fsdp = 1
    c.train.progress = True

    c.sample = ml_collections.ConfigDict()
    c.sample.sampler = "ddpm"  # ddpm | ddim | dpm++2m | euler | euler_a | lcm | add
    c.sample.num_steps = 0  # 0 = every timestep of the schedule
    # Which num_steps timesteps: trailing | uniform | leading (sampling.timestep_subset).
    # DiT's FID uses the 250-step DDPM with "uniform" (Improved DDPM's respacing).
    c.sample.spacing = "trailing"
    c.sample.eta = 0.0
    c.sample.num_samples = 1000
    c.sample.batch_size = 500
    c.sample.guidance_scale = 1.0  # 1 = the conditional model, no guidance
    c.sample.clip_x0 = 1.0  # clip predicted x_0 to [-c, c]; 0 = off
    c.sample.label = -1  # -1 = cycle through the classes
    # condition.kind = "text": the prompt, or several separated by "|" (cycled); "" = prompts
    # naming the classes in turn ("the digit zero", ...), or sample.label's.
    c.sample.prompt = ""
    # Method "stable_diffusion": the guidance's unconditional branch ("" = the empty prompt; one,
    # or several separated by "|" and cycled with the prompts), the image size (0 = the U-Net's
    # sample_size times the VAE's downscaling: 512 for SD 1.x), and a .npy of initial latents
    # (N, H/8, W/8, 4), NHWC, that fixes the samples exactly (N images; "" = drawn from seed).
    c.sample.negative_prompt = ""
    c.sample.height = 0
    c.sample.width = 0
    c.sample.noise = ""
    # Classifier-free guidance on the first N output channels (-1 = all of them). DiT's reference
    # code guides 3 of the 4 latent channels; set 3 to reproduce its numbers.
    c.sample.guided_channels = -1
    # `--mode=interpolate`: walk linearly between these two classes' label embeddings.
    c.sample.interpolate_classes = (0, 1)
    c.sample.interpolate_steps = 8

    # Latent diffusion: train on latent shards made once by `--mode=latents` (`make latents`);
    # each step draws z = scale_factor * (mu + sigma * eps) from the stored moments, and samples
    # are decoded by the same VAE (diffusax.data.latents). Set sample.clip_x0 = 0: latents are
    # not in [-1, 1].
    c.latents = ml_collections.ConfigDict()
    c.latents.dir = ""  # the shards; "" = diffusion in pixel space
    # A local SD AutoencoderKL in diffusers format (a folder with config.json and
    # diffusion_pytorch_model.safetensors, e.g. stabilityai/sd-vae-ft-ema downloaded beforehand).
    # "tiny-random": a seeded random VAE for smoke tests (meaningless latents). For training and
    # sampling, "" means the VAE recorded in the shards' manifest.
    c.latents.vae = ""
    c.latents.scale_factor = 0.18215  # latents are multiplied by it (SD / DiT convention)
    # What `--mode=latents` encodes: a TFDS name, "folder:PATH" (a sub-folder per class) or
    # "digits". With data.random_flip the mirrored images are encoded too.
    c.latents.source = ""
    c.latents.source_dir = ""  # TFDS data directory of the source
    c.latents.source_split = "train"
    c.latents.image_size = 256  # images are centre-cropped and resized to this before encoding
    c.latents.shard_size = 1024  # examples per shard file
    c.latents.batch_size = 32  # examples per encoder call (x2 images with the mirrored views)
    # Encode missing shards when training starts (small sources only: runlocal's digits).
    c.latents.auto_encode = False

    c.eval = ml_collections.ConfigDict()
    c.eval.num_samples = 1000
    c.eval.bpd_examples = 256
    c.eval.classifier_steps = 1500
    # Text models: samples per class and asked bucket (thin / thick, left / right) of the
    # attribute agreement (evaluate.conditional).
    c.eval.attribute_per_class = 20
    # Methods "lcm" and "add": the step counts the student (and the teacher's DDIM) are scored
    # at, and the teacher's reference step count.
    c.eval.few_steps = (1, 2, 4, 8)
    c.eval.teacher_steps = 100
    # Method "clip": the zero-shot prompt of each class ({n}: its numeral, {word}: its name).
    c.eval.zero_shot_prompt = "a photo of the digit {n}"
    return c


def shrink_for_runlocal(c: ml_collections.ConfigDict) -> None:
    """The shared part of every experiment's `runlocal`: a few small steps, a few samples."""
    c.train.num_steps = min(c.train.num_steps, 20)
    c.train.batch_size = 16
    c.train.log_every = 5
    c.train.checkpoint_every = 10
    c.train.grid_samples = 16
    c.optim.warmup_steps = min(c.optim.warmup_steps, 5)
    c.sample.num_samples = 16
    c.sample.batch_size = 16
    c.sample.num_steps = 20
    c.eval.num_samples = 64
    c.eval.bpd_examples = 16
    c.eval.classifier_steps = 100


def runlocal(c: ml_collections.ConfigDict) -> None:
    """Default `--config.runlocal=True` for experiments that define no `runlocal` of their own."""
    shrink_for_runlocal(c)
