"""Latent consistency distillation of the default digits model (the `ddpm_digits` teacher).

The student has the teacher's U-Net and starts as it, plus an embedding of the guidance scale
ω (LCM's w-conditioning); it learns to jump from any timestep of a 50-step DDIM grid to the
teacher's guided solution. Sampled in 1 to 8 steps by the multistep consistency sampler.

    make train                        # the teacher, runs/ddpm_digits (made here if missing)
    make train EXP=lcm_digits
    make sample EXP=lcm_digits ARGS='--config.sample.num_steps=2'
    make eval EXP=lcm_digits          # FD and class accuracy at 1, 2, 4, 8 steps vs the teacher
"""

from experiments import ddpm_digits
from experiments.base import shrink_for_runlocal


def get_config(arg=None):
    c = ddpm_digits.get_config(arg)  # the teacher's data, U-Net and schedule
    c.name = "lcm_digits"
    c.method = "lcm"
    c.lcm.objective = "lcm"
    c.lcm.teacher = "run:runs/ddpm_digits"
    c.lcm.teacher_experiment = "ddpm_digits"
    c.model.guidance_embed_dim = 64
    # The teacher samples best at guidance 1.5 (ω = 0.5); the student learns ω in [0, 1].
    c.lcm.w_min = 0.0
    c.lcm.w_max = 1.0
    c.lcm.loss = "huber"
    c.lcm.ema_decay = 0.95
    # The teacher's cosine schedule ends at ᾱ_999 = 2.4e-9: the student reads its ε at
    # ᾱ >= 1e-3 (which changes t = 979 and 999 of the grid: ᾱ_979 = 9.7e-4), so that its 1-step
    # x̂_0 is not its error times 2·10⁴.
    c.lcm.min_abar = 1e-3

    c.optim.learning_rate = 2e-4
    c.optim.warmup_steps = 100
    c.optim.schedule = "cosine"
    c.train.batch_size = 64
    c.train.num_steps = 1500
    c.train.checkpoint_every = 500

    c.sample.sampler = "lcm"
    c.sample.num_steps = 4
    c.sample.guidance_scale = 1.5
    return c


def runlocal(c):
    shrink_for_runlocal(c)
    c.model.ch = 16
    c.sample.num_steps = 2
