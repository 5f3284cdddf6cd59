"""Adversarial diffusion distillation of the default digits model (the `ddpm_digits` teacher).

The student has the teacher's U-Net and starts as it; it learns, at the 4 trailing timesteps
{999, 749, 499, 249}, to give in one step an image that the discriminator (the teacher's frozen
encoder features and trainable class-projection heads) cannot tell from a real digit and that
the guided teacher, shown it re-noised, would keep. Sampled in 1, 2 or 4 steps (denoise,
re-noise).

    make train                        # the teacher, runs/ddpm_digits (made here if missing)
    make train EXP=add_digits
    make sample EXP=add_digits ARGS='--config.sample.num_steps=1'
    make eval EXP=add_digits          # FD and class accuracy at 1, 2, 4 steps vs the teacher
"""

from experiments import ddpm_digits
from experiments.base import shrink_for_runlocal


def get_config(arg=None):
    c = ddpm_digits.get_config(arg)  # the teacher's data, U-Net and schedule
    c.name = "add_digits"
    c.method = "add"
    c.add.teacher = "run:runs/ddpm_digits"
    c.add.teacher_experiment = "ddpm_digits"
    c.add.teacher_guidance = 1.5  # the teacher samples best at 1.5
    c.add.distill_lambda = 2.5
    c.add.distill_weight = "exponential"
    # The teacher's cosine schedule ends at ᾱ_999 = 2.4e-9: the ADD student reads its ε at
    # ᾱ >= 0.05, so that its 1-step x̂_0 is not its error times 2·10⁴. Measured at 600 steps
    # (disc lr 1e-3): floor 1e-3 (LCM's, error x32) left the 1-step digits speckled noise (FD
    # 246); 0.05 (x4.4) gave FD 46.5; 0.25 gave 56.0 and a worse 4-step student (29.3 vs 14.5).
    c.add.min_abar = 0.05
    c.add.features = "teacher"
    c.add.feature_timestep = 10
    c.add.head_width = 64
    c.add.r1_gamma = 1e-4
    c.add.compare_lcm = "run:runs/lcm_digits"
    # Sample an EMA of the student, not the student as trained: the adversarial game leaves the
    # 1-step generator swinging from step to step. Measured on one 1200-step run (seed 0; FD on
    # 300 at 1 / 4 steps): as trained 50.7 / 20.9; EMA 0.99: 34.6 / 12.5; 0.995: 33.6 / 10.9;
    # 0.998: 50.0 / 10.1 (its window, ~500 steps, still holds the early, teacher-like student).
    c.add.ema_decay = 0.995
    c.model.dropout = 0.0

    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 100
    c.optim.schedule = "constant"
    # The discriminator: Adam with b1 = 0 (ADD's reference; StyleGAN-T), b2 = 0.99.
    c.disc_optim = c.optim.copy_and_resolve_references()
    # 1e-3: at 1e-4 the heads stayed near chance (hinge 5.2 of 6, every score > 0) and the
    # 4-step student ended at FD 25.7; at 1e-3, 12.0 (600 steps, floor 1e-3).
    c.disc_optim.learning_rate = 1e-3
    c.disc_optim.b1 = 0.0
    c.disc_optim.b2 = 0.99
    c.train.batch_size = 64
    c.train.num_steps = 1200
    c.train.log_every = 50
    c.train.checkpoint_every = 400

    c.sample.sampler = "add"
    c.sample.num_steps = 4
    c.sample.guidance_scale = 1.0  # the guidance is distilled into the student
    c.eval.few_steps = (1, 2, 4)
    return c


def runlocal(c):
    shrink_for_runlocal(c)
    c.model.ch = 16
    c.sample.num_steps = 2
