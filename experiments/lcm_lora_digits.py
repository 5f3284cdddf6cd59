"""LCM-LoRA on the digits: consistency distillation of the `ddpm_digits` teacher into LoRA
adapters alone (no ω-embedding, no separate target network); the teacher stays frozen and out
of the checkpoint, which holds the adapters only.

    make train EXP=lcm_lora_digits
    make eval EXP=lcm_lora_digits
"""

from experiments import lcm_digits


def get_config(arg=None):
    c = lcm_digits.get_config(arg)
    c.name = "lcm_lora_digits"
    c.model.guidance_embed_dim = 0
    c.adapters.rank = 16
    c.adapters.alpha = 16.0
    # No ω input: the adapters learn one guidance scale, the teacher's 1.5.
    c.lcm.w_min = 0.5
    c.lcm.w_max = 0.5
    c.optim.learning_rate = 1e-3
    c.sample.guidance_scale = 1.0  # the guidance is distilled into the adapters
    return c


runlocal = lcm_digits.runlocal
