"""The unCLIP diffusion prior on the bundled digits: stage 2 of DALL·E 2. No download.

A causal transformer learns to sample the frozen CLIP image embedding of a digit from its
caption (diffusax.methods.prior): x_0 prediction under a cosine ᾱ schedule, the caption dropped
for a learned null 10% of the time for classifier-free guidance, an EMA; sampled by DDIM over
the 64-wide embeddings, best of 2 by similarity to the caption's text embedding. The captions
are clip_digits' (class, thickness, slant; drawn afresh every step).

    make train EXP=clip_digits     # the frozen CLIP, runs/clip_digits (made here if missing)
    make train EXP=prior_digits
    make eval EXP=prior_digits     # cosine to held-out digits of the prompted class vs random
                                   # pairs, class agreement (runs/prior_digits/eval/metrics.json)

Measured (2-core CPU, another training on one core throughout): `make train` 5 min 45 s
(2000 steps of 128 captions, ~6 steps/s; the same prior 128 wide ran at 2.4 steps/s, 14 min);
`make eval` 54 s. Over 500 prompts naming only a class ("7", "seven", "the digit 7", ...;
ddim, 25 steps, guidance 2, best of 2): the mean cosine between a sampled embedding and the
CLIP image embeddings of the 300 held-out digits of the prompted class is 0.760 (to the other
classes' digits 0.066), against 0.153 for random pairs of held-out digits and 0.687 for pairs
of one class (guided samples sit nearer their class's centre than a real digit does); class
agreement (zero-shot class of the sampled embedding) 100%, the nearest held-out image's class
100%. Unguided: 0.758, 100%, 99.6%. The prompt's own text embedding scores 0.613: this small
CLIP's text and image embeddings lie closer than a large CLIP's do.
"""

from experiments import clip_digits
from experiments.base import shrink_for_runlocal


def get_config(arg=None):
    c = clip_digits.get_config(arg)  # the CLIP's data, captions, towers: they build it frozen
    c.name = "prior_digits"
    c.method = "prior"
    c.prior.clip = "run:runs/clip_digits"
    c.prior.clip_experiment = "clip_digits"
    c.prior.width = 64  # 128 wide: 2.4 steps/s here, 14 min for 2000 steps
    c.prior.layers = 4
    c.prior.heads = 4
    c.prior.drop_text = 0.1
    c.prior.sampler = "ddim"
    c.prior.num_steps = 25
    c.prior.guidance_scale = 2.0
    c.prior.num_candidates = 2

    c.optim.learning_rate = 3e-4
    c.optim.warmup_steps = 100
    c.optim.schedule = "cosine"
    c.optim.grad_clip = 1.0
    c.optim.ema_decay = 0.999

    c.train.batch_size = 128
    c.train.num_steps = 2000
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.grid_samples = 0  # the prior draws embeddings, not images
    c.eval.num_samples = 500
    return c


def runlocal(c):
    """`--config.runlocal=True`: a few steps over a runlocal CLIP (trained first if missing)."""
    clip_digits.runlocal(c)  # the runlocal CLIP's towers
    shrink_for_runlocal(c)
    c.train.grid_samples = 0
    c.prior.clip = "run:runs/clip_digits_runlocal"
    c.prior.width = 32
    c.prior.layers = 1
    c.prior.heads = 2
    c.prior.num_steps = 5
    c.eval.num_samples = 50
