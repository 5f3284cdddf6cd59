"""Class-conditional latent diffusion on the bundled digits, in autoencoder_digits' latents.

L_LDM = E ‖ε − ε_θ(z_t, t, τ_θ(y))‖² with z = E(x) from the frozen autoencoder of
`autoencoder_digits` (4x4x4 latents of the digits upsampled to 16x16) and τ_θ(y) a class
embedding that feeds the cross-attention U-Net (diffusax.methods.ldm). Samples are decoded by the
autoencoder. Train the autoencoder first:

    make train EXP=autoencoder_digits
    make train EXP=ldm_digits
    make sample EXP=ldm_digits ARGS=--config.sample.label=7
    make eval EXP=ldm_digits            # Fréchet distance and class agreement, as ddpm_digits'

Measured on a fresh clone, quiet 2-core CPU: `make train` 10 min 20 s (after a 56 s `make
install`), then FD 5.49 on 1000 samples (ddpm_digits: 3.54 on 1000), the classifier agreeing with
the requested class on 97.6% of them.
"""

from experiments import autoencoder_digits
from experiments.base import get_base_config, shrink_for_runlocal


def get_config(arg=None):
    c = get_base_config()
    c.name = "ldm_digits"
    c.method = "ldm"
    c.data.name = "digits"
    c.data.num_levels = 17

    # The frozen autoencoder: autoencoder_digits' architecture and its run's weights.
    c.autoencoder = autoencoder_digits.get_config().autoencoder
    c.ldm.vae = "run:runs/autoencoder_digits"
    c.ldm.scale_factor = 1.0  # its latents' std is 0.995 (`make eval EXP=autoencoder_digits`)

    c.condition.kind = "label"
    c.model.name = "unet_cond"
    # One level at the latents' 4x4: one ResNet + transformer block down, two up, and the
    # middle's (0.9M parameters). A 4x4 latent needs no second level (3x3 convolutions and
    # attention already see all of it), and on CPU the step's cost is parameters x positions.
    c.model.ch = 64
    c.model.ch_mult = (1,)
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = (4,)
    c.model.num_heads = 4
    c.model.dropout = 0.0
    c.diffusion.label_drop_prob = 0.1
    c.diffusion.schedule = "cosine"
    c.diffusion.min_snr_gamma = 5.0

    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 200
    c.optim.schedule = "cosine"
    c.optim.ema_decay = 0.995

    c.train.batch_size = 128
    c.train.num_steps = 2000
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.grid_samples = 100

    c.sample.sampler = "ddim"
    c.sample.num_steps = 100
    c.sample.num_samples = 1000
    c.sample.batch_size = 1000
    c.sample.guidance_scale = 1.5
    # Latents are not in [-1, 1], but x̂_0 must still be clipped: the cosine schedule ends at
    # ᾱ_T ≈ 0, where x̂_0 = (z_t - √(1-ᾱ) ε̂) / √ᾱ amplifies ε̂'s error without bound (unclipped,
    # the samples' latents reached std 1500). 5 bounds them to the data's range (|z| <= 4.6).
    c.sample.clip_x0 = 5.0
    return c


def runlocal(c):
    """`--config.runlocal=True`: a few steps, to check that everything runs."""
    shrink_for_runlocal(c)
    c.model.ch = 16
