"""The KL autoencoder of latent diffusion on the bundled 8x8 digits, with a patch discriminator.

No download. The digits are upsampled to 16x16 (bilinear) and encoded into 4x4x4 latents:
64 latent dimensions for 256 pixel dimensions (4x fewer). Two networks, two optimizers, two
updates per step (diffusax.methods.autoencoder): L1 + β KL, and from `disc_start` on the
adaptive-weighted hinge GAN of LDM.

    make train EXP=autoencoder_digits
    make eval EXP=autoencoder_digits     # PSNR, reconstruction FD, classifier accuracy,
                                         # runs/autoencoder_digits/eval/reconstructions.npz
"""

from experiments.base import get_base_config, shrink_for_runlocal


def get_config(arg=None):
    c = get_base_config()
    c.name = "autoencoder_digits"
    c.method = "autoencoder"
    c.data.name = "digits"
    c.data.num_levels = 17

    a = c.autoencoder
    a.image_size = 16
    a.block_out_channels = (16, 32, 32)  # 16 -> 8 -> 4: latents 4x4
    a.layers_per_block = 1
    a.latent_channels = 4
    a.norm_num_groups = 8
    a.mid_attention = False
    a.reconstruction = "l1"
    # β relative to a *mean* L1 (LDM's 1e-6 is relative to a sum over 256x256x3 pixels); small
    # enough that the latents keep what the classifier needs, large enough to keep them bounded.
    a.kl_weight = 1e-4
    a.disc_start = 500
    a.disc_weight = 0.5
    a.disc_channels = 16
    a.disc_layers = 1
    a.disc_norm_groups = 8

    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 100
    c.optim.schedule = "cosine"
    c.optim.grad_clip = 1.0
    c.disc_optim.learning_rate = 1e-3
    c.disc_optim.warmup_steps = 0
    c.disc_optim.grad_clip = 0.0

    # Measured (a 2-core CPU shared with other jobs: 22 min wall, 9.8 min of CPU time; about 6
    # minutes on a quiet one): held-out PSNR 32.0 dB at 16x16, reconstruction FD 1.3 in the
    # digits classifier's features, the classifier right on 98.0% of the reconstructions
    # (97.3% of the originals). After the CPU attention change (2026-12-02), on a fresh clone:
    # 2 min 59 s, PSNR 30.9 dB, FD 1.71, 97.7% of the reconstructions.
    c.train.batch_size = 64
    c.train.num_steps = 1000
    c.train.log_every = 50
    c.train.checkpoint_every = 250
    c.train.grid_samples = 0  # an autoencoder draws no samples; `make eval` reconstructs
    return c


def runlocal(c):
    """`--config.runlocal=True`: a few steps, the GAN on from step 2, to check that all runs."""
    shrink_for_runlocal(c)
    c.train.grid_samples = 0
    c.autoencoder.disc_start = 2
