"""The embedded default: a small class-conditional DDPM on scikit-learn's 8x8 digits.

No download. On a 2-core CPU it trains in under 10 minutes:

    make train                                   # = make train EXP=ddpm_digits
    make sample EXP=ddpm_digits ARGS='--config.sample.sampler=ddim --config.sample.num_steps=50'
    make eval EXP=ddpm_digits
"""

from experiments.base import get_base_config, shrink_for_runlocal


def get_config(arg=None):
    c = get_base_config()
    c.name = "ddpm_digits"
    c.data.name = "digits"
    c.data.num_levels = 17  # the digits' pixels take the values 0..16

    c.model.ch = 32
    c.model.ch_mult = (1, 2)
    c.model.num_res_blocks = 2
    c.model.attn_resolutions = (4,)
    c.model.num_heads = 4
    c.model.dropout = 0.0
    c.model.class_conditional = True
    c.diffusion.label_drop_prob = 0.1
    # 8x8 images: the linear schedule destroys them within the first few hundred steps; the
    # cosine schedule (Nichol & Dhariwal 2021) spreads the signal over all T, and Min-SNR-5
    # weighting (Hang et al. 2023) keeps the low-noise steps from dominating the loss.
    c.diffusion.schedule = "cosine"
    c.diffusion.min_snr_gamma = 5.0

    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 200
    c.optim.schedule = "cosine"
    c.optim.ema_decay = 0.995  # 0.999 would still hold 0.999**1800 = 17% of the initial weights

    c.train.batch_size = 128
    c.train.num_steps = 1800  # split over one JAX device per core: ~6 minutes on 2 CPU cores
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.grid_samples = 100

    # DDIM with 100 steps: 1000 samples in about a minute and a half on 2 CPU cores.
    c.sample.sampler = "ddim"
    c.sample.num_steps = 100
    c.sample.num_samples = 1000
    c.sample.batch_size = 1000
    c.sample.guidance_scale = 1.5
    return c


def runlocal(c):
    """`--config.runlocal=True`: a few steps, to check that everything runs."""
    shrink_for_runlocal(c)
    c.model.ch = 16
