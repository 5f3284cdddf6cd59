"""CLIP on the bundled digits: stage 1 of unCLIP (DALL·E 2). No download.

An image convnet and a CLIP-architecture text transformer learn one embedding space from
(digit, caption) pairs with the symmetric InfoNCE loss and a learnable temperature
(diffusax.methods.clip). The captions are those of ldm_digits_text: the class as a word or a
numeral, with the digit's own measured thickness and slant, phrased afresh every step ("a thick
seven leaning right", "the digit 7, thin", "7"); a word-level tokenizer over their vocabulary.

    make train EXP=clip_digits
    make eval EXP=clip_digits      # zero-shot accuracy and caption -> image recall@1 on the
                                   # 300 held-out digits (runs/clip_digits/eval/metrics.json)

Measured (2-core CPU, another job on it part of the time; training is deterministic, a rerun
gave the same numbers): `make train` 2 min 22 s (1500 steps of 256 pairs). Held-out zero-shot
accuracy 94.3% with "a photo of the digit {n}" (94.0% with 7 prompts per class; chance 10%).
Caption -> image retrieval among the 300 held-out digits: recall@1 14.0% (chance 0.33%), @5
47.7%, @10 67.0%, median rank 6; the best image has the caption's class for 100% of the
captions. A caption names its digit's class and at best the tercile of its thickness and slant,
so about 3 to 30 of the held-out images fit it equally. (64, 128, 256) image widths: 95.3% and
recall@1 14.0% in 5 min 1 s.
"""

from experiments.base import get_base_config, shrink_for_runlocal


def get_config(arg=None):
    c = get_base_config()
    c.name = "clip_digits"
    c.method = "clip"
    c.data.name = "digits"
    c.data.num_levels = 17
    # The batches carry caption tokens and masks with a text condition. config.validate ties a
    # text condition to the cross-attention U-Net's name; CLIP builds no U-Net and reads no
    # `model` field.
    c.condition.kind = "text"
    c.model.name = "unet_cond"
    # The text tower: the text section's defaults (words, 16 tokens, 2 blocks x 64 wide, 4 heads).
    c.clip.embed_dim = 64
    c.clip.image_widths = (32, 64, 128)  # 8x8 -> 4x4 -> 2x2
    c.clip.max_shift = 1  # the held-out digits are other writers': shifts help them

    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 100
    c.optim.schedule = "cosine"
    c.optim.grad_clip = 1.0

    # In-batch negatives: a larger batch is a harder task and a better gradient; 256 of the
    # 1497 training digits per step.
    c.train.batch_size = 256
    c.train.num_steps = 1500
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.grid_samples = 0  # CLIP draws no samples
    return c


def runlocal(c):
    """`--config.runlocal=True`: a few steps, to check that everything runs."""
    shrink_for_runlocal(c)
    c.train.grid_samples = 0
    c.text.width = 32
