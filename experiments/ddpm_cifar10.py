"""DDPM on CIFAR-10, the paper's recipe (Ho et al. 2020, appendix B).

35.7M-parameter U-Net (ch 128, mult (1,2,2,2), 2 res blocks, attention at 16x16, dropout 0.1),
linear β 1e-4..0.02 with T = 1000, Adam 2e-4 with 5000 warmup steps, batch 128, gradient clip 1,
EMA 0.9999, random horizontal flips, 800k steps. Needs `cifar10` prepared in TFDS (array_record):

    python -c "import tensorflow_datasets as tfds; \\
        tfds.builder('cifar10', data_dir='DIR').download_and_prepare(file_format='array_record')"
    make train EXP=ddpm_cifar10 ARGS='--config.data.data_dir=DIR'

Check the setup on a laptop with `ARGS='--config.runlocal=True'`.
"""

from experiments.base import get_base_config, shrink_for_runlocal


def get_config(arg=None):
    c = get_base_config()
    c.name = "ddpm_cifar10"
    c.data.name = "cifar10"
    c.data.image_shape = (32, 32, 3)  # declared: `make info` works before the download
    c.data.num_classes = 10
    c.data.random_flip = True
    c.data.num_levels = 256

    c.model.ch = 128
    c.model.ch_mult = (1, 2, 2, 2)
    c.model.num_res_blocks = 2
    c.model.attn_resolutions = (16,)
    c.model.num_heads = 1
    c.model.dropout = 0.1
    c.model.class_conditional = False

    c.diffusion.schedule = "linear"
    c.diffusion.num_timesteps = 1000
    c.diffusion.beta_start = 1e-4
    c.diffusion.beta_end = 0.02
    c.diffusion.prediction = "eps"
    c.diffusion.var_type = "fixed_large"

    c.optim.name = "adam"
    c.optim.learning_rate = 2e-4
    c.optim.warmup_steps = 5000
    c.optim.schedule = "constant"
    c.optim.grad_clip = 1.0
    c.optim.ema_decay = 0.9999

    c.train.batch_size = 128
    c.train.num_steps = 800_000
    c.train.log_every = 100
    c.train.checkpoint_every = 10_000
    c.train.sample_every = 50_000
    c.train.grid_samples = 64

    c.sample.sampler = "ddpm"
    c.sample.num_steps = 0  # all 1000 steps, as the paper samples
    c.sample.num_samples = 50_000
    c.sample.batch_size = 500
    c.eval.num_samples = 10_000
    return c


def runlocal(c):
    """A tiny U-Net for a few steps, still on cifar10 (it must be prepared locally)."""
    shrink_for_runlocal(c)
    c.model.ch = 32
    c.model.ch_mult = (1, 2)
    c.model.attn_resolutions = ()
