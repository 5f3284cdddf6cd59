"""DiT-S/2 and DiT-B/2 training speed and memory against diffusers' DiT, on CPU.

    .venv/bin/python benchmarks/bench_dit.py             # full run (~10-15 minutes on 2 quiet
                                                         # cores), writes benchmarks/results/
    .venv/bin/python benchmarks/bench_dit.py --quick     # smoke test (~4 min), writes nothing
    .venv/bin/python benchmarks/bench_dit.py --variants S/2 --batch 16
    make bench-dit                                       # the full run

For each variant (256x256 images = 32x32x4 latents, 1000 classes, learned sigma) it measures,
in one process and one run (see benchmarks/README.md):

- train images/s of one full step at the same batch: the run `diffusax.train.build.build`
  makes of `experiments/dit_xl2.py` resized to the variant (our `diffusax.models.dit.DiT`, the
  train loop's jitted, donated step, compiled ahead of time) against diffusers'
  `DiTTransformer2DModel` trained in PyTorch eager mode. Both steps: draw t and ε, form x_t,
  10% null labels, forward, MSE on ε (the first 4 of the 8 output channels), backward, AdamW
  (lr 1e-4, no weight decay), EMA 0.9999: the DiT recipe with the hybrid loss's small variance
  term left out (`diffusion.vlb_weight=0`);
- the ratio diffusax / diffusers of those rates (target: >= 1);
- peak memory of each framework's training, each in its own subprocess (so that neither
  framework's libraries nor caches count against the other): the growth of the resident set
  (the kernel's high-water mark, what ru_maxrss reports) over the process's size before the
  model was built, and, for JAX, the compiled step's `memory_analysis()`.

The two models are the same function: diffusers' random initialisation is converted with
`diffusax.convert.diffusers_dit.load_dit_params` into the run's train state, and one forward
pass must agree before anything is timed. diffusers' DiT keeps one copy of the timestep/label
embedder per block, where the reference DiT (and ours) has one shared embedder; the public
checkpoints hold equal copies, so the random model's copies are made equal to block 0's first. Timed repeats of the two frameworks alternate (A B B A ...) and the median is
reported; JAX compilation and warm-up steps are timed separately and excluded.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import time

import harness  # the standard library only

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
EXPERIMENT = os.path.join(ROOT, "experiments", "dit_xl2.py")  # the DiT recipe, resized below
os.environ["JAX_PLATFORMS"] = "cpu"  # a CPU benchmark, also on a machine with a GPU

# Frameworks are imported inside functions: a memory subprocess must load only its own.

VARIANTS = ("S/2", "B/2")
TARGET_RATIO = 1.0  # required train speed ratio diffusax / diffusers
NUM_CLASSES = 1000
LATENT_SIZE, LATENT_CHANNELS = 32, 4  # 256x256 images through Stable Diffusion's VAE
BATCH = 8
NUM_BATCHES = 4  # prepared before timing and cycled by both frameworks
SEED = 0
# The DiT recipe (Peebles & Xie 2023, section 5): AdamW, lr 1e-4, no weight decay, EMA 0.9999,
# linear β from 1e-4 to 0.02 over 1000 steps, 10% null labels for classifier-free guidance. The
# PyTorch side uses these; ours comes from EXPERIMENT, checked to hold the same (`recipe_check`).
LEARNING_RATE = 1e-4
EMA_DECAY = 0.9999
BETAS = (1e-4, 0.02)
NUM_TIMESTEPS = 1000
LABEL_DROP_PROB = 0.1

# Per variant: (timed repeats, train steps per repeat); warm-up steps excluded.
FULL = {"S/2": (9, 3), "B/2": (7, 1)}
QUICK = {"S/2": (2, 1), "B/2": (2, 1)}
WARMUP_STEPS = {"full": 2, "quick": 1}
MEMORY_STEPS = 3  # steady-state steps whose peak memory is measured (after one warm-up step)
MEMORY_PREFIX = "MEMORY_RESULT "


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny repeat counts, for a smoke test")
    p.add_argument(
        "--out",
        default=None,
        help="directory for dit_cpu.json and RESULTS_DIT.md (default: benchmarks/results for a "
        "full run; a --quick run writes nothing unless --out is given)",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        help=f"DiT variants to compare (default: {' '.join(VARIANTS)}); any key of "
        "diffusax.models.dit.VARIANTS works, e.g. S/8 for a fast check",
    )
    p.add_argument(
        "--tag",
        default="",
        help="recorded as dit_cpu[_Ndev]_TAG.json, so that an earlier run's JSON is kept",
    )
    p.add_argument("--batch", type=int, default=BATCH, help=f"train batch (default {BATCH})")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch.set_num_threads (default: the cores this process may use)",
    )
    p.add_argument(
        "--cpu-devices",
        type=int,
        default=1,
        help="JAX CPU devices (jax_num_cpu_devices); the batch is split over them by a "
        "data-parallel mesh, as train.loop does (default: 1)",
    )
    p.add_argument(
        "--unrolled",
        action="store_true",
        help="our DiT with its blocks unrolled (scan_blocks=False) instead of one lax.scan",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--memory-child", choices=("diffusax", "diffusers"), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)  # the memory child's JSON job
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error("--batch must be >= 1")
    if args.torch_threads < 1:
        p.error("--torch-threads must be >= 1")
    if args.cpu_devices < 1 or args.batch % args.cpu_devices:
        p.error("--cpu-devices must be >= 1 and divide --batch")
    if args.memory_child and not args.spec:
        p.error("--memory-child needs --spec")
    return args


# ---------------------------------------------------------------------------------------------
# Shared set-up (numpy only)


def diffusers_config(variant: str) -> dict:
    """The `DiTTransformer2DModel` config of DiT-`variant` at 256x256, learned sigma."""
    from diffusax.models.dit import resolve_variant

    s = resolve_variant(variant)
    return {
        "num_attention_heads": s["heads"],
        "attention_head_dim": s["hidden"] // s["heads"],
        "in_channels": LATENT_CHANNELS,
        "out_channels": 2 * LATENT_CHANNELS,  # ε and the variance interpolation
        "num_layers": s["depth"],
        "sample_size": LATENT_SIZE,
        "patch_size": s["patch"],
        "num_embeds_ada_norm": NUM_CLASSES,
    }


def make_batches(batch: int, count: int, seed: int) -> list[dict]:
    """`count` batches of unit-variance latents (B, 32, 32, 4) and labels (B,), NHWC numpy."""
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (batch, LATENT_SIZE, LATENT_SIZE, LATENT_CHANNELS)
    return [
        {
            "image": rng.standard_normal(shape, dtype=np.float32),
            "label": rng.integers(0, NUM_CLASSES, batch).astype(np.int32),
        }
        for _ in range(count)
    ]


# ---------------------------------------------------------------------------------------------
# Resident memory (Linux)


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float | None:
    """Resident set size now, MB."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def peak_rss_mb() -> float | None:
    """The resident set's high-water mark (VmHWM, the counter ru_maxrss reports), MB."""
    kb = _status_kb("VmHWM")
    return None if kb is None else kb / 1024


def reset_peak_rss() -> bool:
    """Return freed heap to the system (glibc malloc_trim), then reset VmHWM to the current RSS.

    Without the trim, memory freed after compilation or set-up would stay resident and be
    counted as the train step's.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# diffusers: the model trained the way diffusers' training examples do


def equalise_embedder_copies(model) -> None:
    """Set every block's timestep/label embedder copy to block 0's.

    diffusers' DiTTransformer2DModel gives each block its own copy of the timestep/label
    embedder; the reference DiT (and ours) has one, shared by all blocks. The public DiT
    checkpoints converted to diffusers hold equal copies, so equal copies are the model both
    implement; a random diffusers model draws them independently.
    """
    import torch

    first = model.transformer_blocks[0].norm1.emb.state_dict()
    with torch.no_grad():
        for block in model.transformer_blocks[1:]:
            for name, value in block.norm1.emb.state_dict().items():
                value.copy_(first[name])


class TorchTrainer:
    """diffusers' DiTTransformer2DModel, one PyTorch eager train step per call."""

    def __init__(self, config: dict, batches: list[dict], threads: int, seed: int = SEED):
        import numpy as np
        import torch
        from diffusers import DDPMScheduler, DiTTransformer2DModel

        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.torch = torch
        self.model = DiTTransformer2DModel(**config)
        equalise_embedder_copies(self.model)
        self.model.train()
        self.scheduler = DDPMScheduler(
            num_train_timesteps=NUM_TIMESTEPS,
            beta_schedule="linear",
            beta_start=BETAS[0],
            beta_end=BETAS[1],
        )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        kw = dict(lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        try:  # the fused CPU kernel is PyTorch's fastest AdamW; the foreach one otherwise
            self.optimizer = torch.optim.AdamW(self.params, fused=True, **kw)
            self.optimizer_name = "torch.optim.AdamW(fused=True)"
        except (RuntimeError, TypeError):
            self.optimizer = torch.optim.AdamW(self.params, foreach=True, **kw)
            self.optimizer_name = "torch.optim.AdamW(foreach=True)"
        self.ema = [p.detach().clone() for p in self.params]
        self.generator = torch.Generator().manual_seed(seed)
        self.batches = [
            (
                torch.from_numpy(b["image"].transpose(0, 3, 1, 2).copy()),  # NHWC -> NCHW
                torch.from_numpy(b["label"].astype(np.int64)),
            )
            for b in batches
        ]
        self.loss = None
        self.steps_run = 0

    def state_dict_numpy(self) -> dict:
        return {k: v.detach().numpy().copy() for k, v in self.model.state_dict().items()}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

    def state_bytes(self) -> int:
        """Parameters, gradients, AdamW's two moments and the EMA, float32: 5 copies."""
        return 5 * 4 * self.num_params()

    def step(self, x0, labels):
        torch, gen = self.torch, self.generator
        b = x0.shape[0]
        t = torch.randint(0, NUM_TIMESTEPS, (b,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = self.scheduler.add_noise(x0, noise, t)
        drop = torch.rand(b, generator=gen) < LABEL_DROP_PROB
        labels = torch.where(drop, NUM_CLASSES, labels)  # NUM_CLASSES: the null label
        out = self.model(xt, timestep=t, class_labels=labels).sample  # (B, 2C, H, W)
        loss = torch.nn.functional.mse_loss(out[:, :LATENT_CHANNELS], noise)  # ε half
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():  # θ_ema ← θ_ema + (1 - decay)(θ - θ_ema)
            torch._foreach_lerp_(self.ema, self.params, 1.0 - EMA_DECAY)
        return loss

    def train(self, steps: int):
        for _ in range(steps):
            x0, labels = self.batches[self.steps_run % len(self.batches)]
            self.loss = self.step(x0, labels)
            self.steps_run += 1

    def forward(self, x_nhwc, t, labels):
        """One eval-mode forward, NHWC numpy in and out."""
        import numpy as np

        torch = self.torch
        self.model.eval()
        with torch.inference_mode():
            out = self.model(
                torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))),
                timestep=torch.from_numpy(t.astype(np.int64)),
                class_labels=torch.from_numpy(labels.astype(np.int64)),
            ).sample
        self.model.train()
        return out.numpy().transpose(0, 2, 3, 1)  # NCHW -> NHWC

    def last_loss(self) -> float:
        return float(self.loss.item())


# ---------------------------------------------------------------------------------------------
# diffusax: the run `build` makes of the DiT experiment

# The DDPM method with its DiT in diffusers' numerical conventions (timestep frequencies shifted
# by 1, the pre-MLP layer norm's epsilon from diffusers' norm_eps), so that the converted
# diffusers model is the same function; the parameters, their shapes and the cost are the
# config's DiT's. Registered on first use (`register_method`).
METHOD = "ddpm_bench_diffusers_dit"
CONVENTIONS = ("mlp_ratio", "freq_shift", "norm_eps", "mlp_norm_eps")


def register_method(conventions: dict) -> None:
    """Register METHOD (once) for DiTs built with these diffusers `conventions`."""
    from diffusax import methods
    from diffusax.methods.ddpm import DDPM

    existing = methods.registered(METHOD)
    if existing is not None:
        if existing.conventions != conventions:
            raise ValueError(
                f"{METHOD} is registered for {existing.conventions}, not {conventions}"
            )
        return

    class DiffusersConventionDDPM(DDPM):
        name = METHOD

        def __init__(self):
            self.conventions = dict(conventions)

        def networks(self, cfg, data):
            from flax import nnx

            from diffusax import diffusion, models
            from diffusax.models.dit import DiT

            m, (size, _, channels) = cfg.model, data.image_shape

            def build(key):
                return DiT(
                    variant=m.variant,
                    depth=m.depth or None,
                    hidden=m.hidden_size or None,
                    heads=m.heads or None,
                    input_size=size,
                    in_channels=channels,
                    num_classes=data.num_classes,
                    learn_sigma=cfg.diffusion.var_type in diffusion.LEARNED_VAR_TYPES,
                    class_dropout_prob=0.0,  # labels are dropped in the loss, as build_model does
                    fused_attention=m.fused_attention,
                    scan_blocks=m.scan_blocks,
                    remat=m.remat,
                    dtype=models.DTYPES[m.dtype],
                    rngs=nnx.Rngs(params=key),
                    **self.conventions,
                )

            return {"model": methods.Network(build=build)}

    methods.register(DiffusersConventionDDPM())


def experiment_config(config: dict, batch: int, scan_blocks: bool = True):
    """`experiments/dit_xl2.py` resized to the diffusers DiT `config`, data-less, float32.

    The sizes become model.variant (its patch) with explicit model.depth / hidden_size / heads,
    the latents data.image_shape / data.num_classes (no data is read: the batches are random);
    diffusion.vlb_weight=0 trains ε alone, as the PyTorch step.
    """
    from diffusax import config as config_lib
    from diffusax.convert.diffusers_dit import dit_kwargs_from_diffusers

    kw = dit_kwargs_from_diffusers(config)  # raises for a config our DiT cannot represent
    register_method({k: kw[k] for k in CONVENTIONS})
    size, channels = kw["input_size"], kw["in_channels"]
    cfg = config_lib.load_experiment(
        EXPERIMENT,
        overrides={
            "method": METHOD,
            "model.variant": f"S/{kw['patch']}",  # the patch size; the other sizes follow
            "model.depth": kw["depth"],
            "model.hidden_size": kw["hidden"],
            "model.heads": kw["heads"],
            "model.scan_blocks": scan_blocks,
            "model.dtype": "float32",
            "model.fused_attention": False,
            "data.image_shape": (size, size, channels),
            "data.num_classes": kw["num_classes"],
            "diffusion.var_type": "learned_range" if kw["learn_sigma"] else "fixed_large",
            "diffusion.vlb_weight": 0.0,
            "train.batch_size": batch,
        },
    )
    recipe_check(cfg)
    return cfg


def recipe_check(cfg) -> None:
    """The experiment trains with the recipe the PyTorch step is written with."""
    d, o = cfg.diffusion, cfg.optim
    ours = (
        (o.name, o.learning_rate, o.b1, o.b2, o.eps, o.weight_decay, o.grad_clip, o.ema_decay),
        (o.warmup_steps, o.schedule),
        (d.schedule, d.num_timesteps, d.beta_start, d.beta_end, d.prediction),
        (d.label_drop_prob, d.min_snr_gamma),
    )
    theirs = (
        ("adamw", LEARNING_RATE, 0.9, 0.999, 1e-8, 0.0, 0.0, EMA_DECAY),
        (0, "constant"),
        ("linear", NUM_TIMESTEPS, *BETAS, "eps"),
        (LABEL_DROP_PROB, 0.0),
    )
    if ours != theirs:
        raise ValueError(f"{EXPERIMENT} no longer holds the benchmark's recipe: {ours} != {theirs}")


class JaxTrainer:
    """Our DiT: the run `diffusax.train.build.build` makes of `experiment_config(config)`, its
    state born in its shardings on a data-parallel mesh, its jitted donated step AOT-compiled.

    With `state_dict` (a diffusers DiT's tensors) the parameters (and the EMA) are converted from
    it; without, they are the run's initialisation (the memory subprocess, which must not
    import torch).
    """

    def __init__(
        self,
        config: dict,
        batches: list[dict],
        *,
        state_dict=None,
        num_devices: int = 1,
        scan_blocks: bool = True,
    ):
        import jax
        from flax import nnx

        from diffusax import parallel
        from diffusax.convert.diffusers_dit import load_dit_params
        from diffusax.train.build import build
        from diffusax.train.state import init_state, split_params

        self.jax = jax
        cfg = experiment_config(config, len(batches[0]["image"]), scan_blocks)
        devices = harness.jax_devices(num_devices)
        self.run = run = build(cfg, devices=devices, require_data=False)
        if state_dict is None:
            self.state = run.init_state()
        else:
            model = nnx.eval_shape(lambda: run.networks["model"].build(run.init_key))
            load_dit_params(model, state_dict)  # raises unless every tensor maps
            params = {"model": split_params(model)[1]}
            del model
            born = lambda p: init_state(p, run.optimizers, run.emas)  # EMA = the parameters
            self.state = jax.jit(born, out_shardings=run.shardings)(params)
        self.num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(run.abstract.params))
        apply_fn = run.ctx.apply_fn("model")
        self.forward_fn = jax.jit(lambda p, x, t, y: apply_fn(p, x, t, y))
        self.batches = [jax.device_put(b, parallel.batch_sharding(run.mesh)) for b in batches]
        self.compiled = None
        self.metrics = None
        self.steps_run = 0

    def compile(self) -> float:
        self.compiled, seconds = harness.compile_step(self.run, self.state, self.batches[0])
        return seconds

    def memory_analysis(self) -> dict | None:
        """The compiled step's buffers (XLA's memory_analysis), MB; None where unsupported."""
        return harness.memory_analysis(self.compiled, "mb")

    def train(self, steps: int):
        frozen = self.run.frozen()
        for _ in range(steps):
            batch = self.batches[self.steps_run % len(self.batches)]
            self.state, self.metrics = self.compiled(self.state, frozen, batch)
            self.steps_run += 1
        self.jax.block_until_ready((self.state, self.metrics))

    def forward(self, x_nhwc, t, labels):
        import numpy as np

        return np.asarray(self.forward_fn(self.state.params["model"], x_nhwc, t, labels))

    def last_loss(self) -> float:
        return float(self.metrics["loss"])


# ---------------------------------------------------------------------------------------------
# The comparison: parity, then interleaved timing


def check_parity(ours: JaxTrainer, theirs: TorchTrainer, depth: int) -> dict:
    """One forward of both on the same inputs must agree, and the parameter counts match."""
    import numpy as np

    rng = np.random.default_rng(SEED + 1)
    x = rng.standard_normal((2, LATENT_SIZE, LATENT_SIZE, LATENT_CHANNELS), dtype=np.float32)
    t = np.array([10, 900], np.int32)
    y = np.array([3, NUM_CLASSES], np.int32)  # a class and the null label
    out_ours, out_theirs = ours.forward(x, t, y), theirs.forward(x, t, y)
    scale = float(np.abs(out_theirs).max())
    diff = float(np.abs(out_ours - out_theirs).max())
    if not scale > 1e-3 or diff > 1e-4 * scale:
        raise RuntimeError(
            f"the diffusers model is not our model: max |diff| {diff:.3g} at output scale "
            f"{scale:.3g}; the comparison would not be fair"
        )
    # diffusers holds `depth` copies of the embedder where we hold one.
    emb = theirs.model.transformer_blocks[0].norm1.emb
    copies = (depth - 1) * sum(p.numel() for p in emb.parameters())
    if theirs.num_params() - copies != ours.num_params:
        raise RuntimeError(
            f"parameter counts differ: diffusax {ours.num_params}, diffusers "
            f"{theirs.num_params()} of which {copies} in per-block embedder copies"
        )
    return {
        "max_abs_diff": diff,
        "output_scale": scale,
        "params_diffusax": ours.num_params,
        "params_diffusers": theirs.num_params(),
        "params_diffusers_embedder_copies": copies,
    }


def compare_variant(variant: str, args, counts, warmup: int) -> dict:
    """Parity, compile, warm-up and interleaved timing of one variant."""
    config = diffusers_config(variant)
    batches = make_batches(args.batch, NUM_BATCHES, SEED)
    t0 = time.perf_counter()
    theirs = TorchTrainer(config, batches, args.torch_threads)
    ours = JaxTrainer(
        config,
        batches,
        state_dict=theirs.state_dict_numpy(),
        num_devices=args.cpu_devices,
        scan_blocks=not args.unrolled,
    )
    parity = check_parity(ours, theirs, config["num_layers"])
    setup_s = time.perf_counter() - t0
    print(
        f"{variant}: parity max |diff| {parity['max_abs_diff']:.2e} (scale "
        f"{parity['output_scale']:.2f}); {parity['params_diffusax'] / 1e6:.1f}M parameters "
        f"(diffusers {parity['params_diffusers'] / 1e6:.1f}M with its embedder copies)",
        flush=True,
    )
    compile_s = ours.compile()
    print(f"{variant}: compiled the train step in {compile_s:.1f} s", flush=True)
    warm = {
        "diffusax_s": harness.elapsed(lambda: ours.train(warmup)),
        "diffusers_s": harness.elapsed(lambda: theirs.train(warmup)),
        "steps": warmup,
    }
    repeats, steps = counts
    times = harness.interleaved(
        {"diffusax": lambda: ours.train(steps), "diffusers": lambda: theirs.train(steps)},
        repeats,
        lead_in={"diffusax": lambda: ours.train(1), "diffusers": lambda: theirs.train(1)},
    )
    train = {name: harness.rate_summary(s, steps * args.batch) for name, s in times.items()}
    for name, trainer in (("diffusax", ours), ("diffusers", theirs)):
        train[name]["last_loss"] = trainer.last_loss()
        train[name]["ms_per_step_median"] = (
            1e3 * statistics.median(train[name]["seconds_repeats"]) / steps
        )
        if not train[name]["last_loss"] == train[name]["last_loss"]:  # NaN
            raise RuntimeError(f"{variant}: {name} training produced a NaN loss")
    ratio = train["diffusax"]["per_s_median"] / train["diffusers"]["per_s_median"]
    result = {
        "variant": variant,
        "diffusers_config": config,
        "parity": parity,
        "setup_s": setup_s,
        "compile_s": compile_s,
        "warmup": warm,
        "repeats": repeats,
        "steps_per_repeat": steps,
        "images_per_s": train,
        "ratio": ratio,
        "target_met": ratio >= TARGET_RATIO,
        "others_cpu_share_median": harness.median_share(train["diffusax"], train["diffusers"]),
        "diffusers_optimizer": theirs.optimizer_name,
        "jax_memory_analysis": ours.memory_analysis(),
        "state_mb": {
            "diffusax": 5 * 4 * ours.num_params / 2**20,  # params, grads, 2 moments, EMA
            "diffusers": theirs.state_bytes() / 2**20,
        },
    }
    print(
        f"{variant}: diffusax {train['diffusax']['per_s_median']:.2f} images/s, diffusers "
        f"{train['diffusers']['per_s_median']:.2f} images/s, ratio {ratio:.2f}",
        flush=True,
    )
    return result  # both trainers are freed here (gc.collect in the caller)


# ---------------------------------------------------------------------------------------------
# Peak memory, one subprocess per framework


def import_framework(framework: str) -> None:
    """Import every module one framework's trainer uses (and none of the other's)."""
    modules = {
        "diffusax": (
            "jax",
            "flax.nnx",
            "optax",
            "diffusax.config",
            "diffusax.convert.diffusers_dit",
            "diffusax.methods",
            "diffusax.train.build",
        ),
        "diffusers": ("torch", "diffusers"),
    }[framework]
    for name in modules:
        importlib.import_module(name)


def memory_child(framework: str, spec: dict) -> dict:
    """In a fresh process: build one framework's trainer, train, report its memory.

    rss_baseline: the resident set after imports and data, before the model exists.
    setup_peak: the high-water mark over building the model and optimizer (JAX: and compiling)
      and one warm-up step, which allocates PyTorch's gradients and AdamW moments.
    step_peak: the high-water mark over `MEMORY_STEPS` further steps, after freed memory is
      returned to the system and the mark reset. Both are reported as growth over the baseline.
    """
    if framework == "diffusax" and spec["cpu_devices"] > 1:
        import jax

        jax.config.update("jax_num_cpu_devices", spec["cpu_devices"])
    import_framework(framework)  # the libraries count in the baseline, not in the growth
    batches = make_batches(spec["batch"], NUM_BATCHES, SEED)
    baseline = rss_mb()
    if framework == "diffusax":
        trainer = JaxTrainer(
            spec["config"],
            batches,
            num_devices=spec["cpu_devices"],
            scan_blocks=spec["scan_blocks"],
        )
        trainer.compile()
    else:
        trainer = TorchTrainer(spec["config"], batches, spec["torch_threads"])
    trainer.train(1)
    setup_peak = peak_rss_mb()
    reset = reset_peak_rss()
    after_reset = rss_mb()
    trainer.train(MEMORY_STEPS)
    step_peak = peak_rss_mb()
    out = {
        "framework": framework,
        "rss_baseline_mb": baseline,
        "setup_peak_growth_mb": setup_peak - baseline,
        "step_peak_growth_mb": (step_peak - baseline) if reset else None,
        "rss_before_steps_growth_mb": after_reset - baseline,
        "peak_rss_mb": max(setup_peak, step_peak),
        "peak_reset_supported": reset,
        "last_loss": trainer.last_loss(),
        "modules": {name: name in sys.modules for name in ("jax", "torch", "diffusers")},
    }
    if framework == "diffusax":
        out["memory_analysis"] = trainer.memory_analysis()
    return out


def measure_memory(variant: str, args, framework: str) -> dict:
    spec = {
        "config": diffusers_config(variant),
        "batch": args.batch,
        "cpu_devices": args.cpu_devices,
        "scan_blocks": not args.unrolled,
        "torch_threads": args.torch_threads,
    }
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", framework]
    cmd += ["--spec", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MEMORY_PREFIX)]
    if proc.returncode or not lines:
        raise RuntimeError(
            f"the {framework} memory subprocess for {variant} failed ({proc.returncode}):\n"
            + proc.stderr[-3000:]
        )
    return json.loads(lines[-1][len(MEMORY_PREFIX) :])


# ---------------------------------------------------------------------------------------------
# The run


def run(args) -> dict:
    mode = "quick" if args.quick else "full"
    counts = QUICK if args.quick else FULL
    load = harness.LoadLog()
    load.mark("start")
    harness.warn_if_busy(load)
    t_start = time.perf_counter()
    variants = {}
    for variant in args.variants:
        variant_counts = counts.get(variant, counts["S/2"])
        variants[variant] = compare_variant(variant, args, variant_counts, WARMUP_STEPS[mode])
        gc.collect()
        load.mark(variant)
    if not args.no_memory:
        for variant in args.variants:
            variants[variant]["memory"] = {
                name: measure_memory(variant, args, name) for name in ("diffusax", "diffusers")
            }
            m = variants[variant]["memory"]
            print(
                f"{variant}: peak memory growth during steps: diffusax "
                f"{harness.mb(m['diffusax']['step_peak_growth_mb'])}, diffusers "
                f"{harness.mb(m['diffusers']['step_peak_growth_mb'])}",
                flush=True,
            )
    shares = {name: v["others_cpu_share_median"] for name, v in variants.items()}
    return {
        "benchmark": "DiT training: diffusax vs diffusers DiTTransformer2DModel, CPU",
        "date": harness.utc_now(),
        "quick": args.quick,
        "wall_s": time.perf_counter() - t_start,
        "machine": harness.cpu_machine(),
        "versions": harness.versions("jax", "flax", "optax", "torch", "diffusers"),
        "threads": harness.cpu_threads(args.cpu_devices),
        "load": load.record(shares),
        "setup": {
            "batch": args.batch,
            "latents": [LATENT_SIZE, LATENT_SIZE, LATENT_CHANNELS],
            "num_classes": NUM_CLASSES,
            "scan_blocks": not args.unrolled,
            "data": f"{NUM_BATCHES} batches of N(0, 1) latents and random labels, prepared "
            "before timing and cycled by both",
            "loss": "MSE between ε and the first 4 output channels (the learned-sigma half is "
            "output but not trained; diffusax: diffusion.vlb_weight=0, its L_vlb only a "
            "metric); t ~ U{0..999}, linear β 1e-4..0.02, 10% null labels",
            "experiment": "experiments/dit_xl2.py resized to the variant, float32, no data "
            "(build(cfg, require_data=False)); DiT in diffusers' conventions (method "
            f"{METHOD})",
            "optimizer": f"AdamW lr {LEARNING_RATE}, betas (0.9, 0.999), eps 1e-8, no weight "
            f"decay; EMA {EMA_DECAY}; no gradient clipping",
            "diffusax_train_step": "diffusax.train.build.build(cfg).train_step, the train "
            "loop's step (+ grad norm metric): jax.jit with the state in its shardings "
            "(replicated) on a data-parallel mesh, donate_argnums=0, AOT-compiled",
            "diffusers_train_step": "eager PyTorch: DDPMScheduler.add_noise, model.train(), "
            "F.mse_loss, backward, AdamW.step, EMA by torch._foreach_lerp_",
            "warmup_steps": WARMUP_STEPS[mode],
            "statistic": "median over interleaved repeats (order alternates A B, B A, ...; each "
            "repeat follows one untimed step of its own framework)",
            "memory": "each framework in its own subprocess: growth of the resident set's "
            "high-water mark (VmHWM, as ru_maxrss) over the RSS before the model was built; "
            f"step peak = over {MEMORY_STEPS} steps after one warm-up step, freed heap "
            "trimmed and the mark reset; JAX also XLA's memory_analysis of the step",
        },
        "variants": variants,
        "target_ratio_min": TARGET_RATIO,
    }


# ---------------------------------------------------------------------------------------------
# Recording

RESULTS_HEADER = """# DiT benchmark results (CPU)

Rows are appended by `benchmarks/bench_dit.py` (full runs only); the latest run's details are in
`dit_cpu.json`. Train images/s of one full step (forward, MSE on ε, backward, AdamW, EMA) at the
same batch; the ratio is diffusax / diffusers (target >= 1). Memory: peak resident-set growth
during train steps, each framework in its own process. "Others' CPU" is the median share of the
cores that other processes used while the repeats were timed: a run is quiet (yes) under 10%.

| date (UTC) | CPU | cores | torch threads | JAX devices | variant | batch | others' CPU | quiet | images/s diffusax | diffusers | ratio | step peak MB diffusax | diffusers | compile s |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def results_rows(r: dict) -> str:
    rows = []
    for variant, v in r["variants"].items():
        mem = v.get("memory", {})
        peak = lambda name: mem.get(name, {}).get("step_peak_growth_mb")
        cells = [
            r["date"][:16].replace("T", " "),
            r["machine"]["cpu"]["name"],
            str(r["machine"]["usable_cores"]),
            str(r["threads"]["torch"]),
            str(r["threads"]["jax_cpu_devices"]),
            variant,
            str(r["setup"]["batch"]),
            harness.percent(v["others_cpu_share_median"]),
            "yes" if r["load"]["quiet"] else "**no**",
            f"{v['images_per_s']['diffusax']['per_s_median']:.2f}",
            f"{v['images_per_s']['diffusers']['per_s_median']:.2f}",
            f"**{v['ratio']:.2f}**",
            harness.mb(peak("diffusax")).removesuffix(" MB"),
            harness.mb(peak("diffusers")).removesuffix(" MB"),
            f"{v['compile_s']:.0f}",
        ]
        rows.append("| " + " | ".join(cells) + " |\n")
    return "".join(rows)


def write_results(result: dict, out_dir: str, tag: str = "") -> tuple[str, str]:
    """dit_cpu.json (dit_cpu_Ndev.json with N JAX devices; _TAG before .json with a tag),
    replaced atomically, and one appended row per variant in RESULTS_DIT.md."""
    devices = result["threads"]["jax_cpu_devices"]
    name = "dit_cpu" if devices == 1 else f"dit_cpu_{devices}dev"
    name += f"_{tag}.json" if tag else ".json"
    rows = results_rows(result)
    return harness.save_results(result, out_dir, name, "RESULTS_DIT.md", RESULTS_HEADER, rows)


def print_summary(r: dict) -> None:
    print()
    print(f"{r['benchmark']}{'  (QUICK: smoke test, not a measurement)' if r['quick'] else ''}")
    print(
        f"machine: {r['machine']['cpu']['name']}, {r['machine']['usable_cores']} usable cores, "
        f"torch threads {r['threads']['torch']}, JAX: XLA default threads, "
        f"{r['threads']['jax_cpu_devices']} CPU device(s); batch {r['setup']['batch']}"
    )
    print(
        f"{'':24s}{'diffusax':>12s}{'diffusers':>12s}{'ratio':>8s}{'target':>8s}{'others CPU':>12s}"
    )
    for variant, v in r["variants"].items():
        ips = v["images_per_s"]
        print(
            f"{'DiT-' + variant + ' images/s':24s}{ips['diffusax']['per_s_median']:12.2f}"
            f"{ips['diffusers']['per_s_median']:12.2f}{v['ratio']:8.2f}"
            f"{'>= ' + format(TARGET_RATIO, 'g'):>8s}{harness.percent(v['others_cpu_share_median']):>12s}"
        )
        print(
            f"{'  ms / step':24s}{ips['diffusax']['ms_per_step_median']:12.0f}"
            f"{ips['diffusers']['ms_per_step_median']:12.0f}"
        )
        mem = v.get("memory")
        if mem:
            for key, label in (
                ("step_peak_growth_mb", "  peak MB, steps"),
                ("setup_peak_growth_mb", "  peak MB, set-up"),
            ):
                print(
                    f"{label:24s}{harness.mb(mem['diffusax'][key]).removesuffix(' MB'):>12s}"
                    f"{harness.mb(mem['diffusers'][key]).removesuffix(' MB'):>12s}"
                )
        analysis = v["jax_memory_analysis"]
        if analysis:
            print(
                f"  XLA memory_analysis: live {analysis['live_mb']:.0f} MB (arguments "
                f"{analysis['argument_mb']:.0f}, temp {analysis['temp_mb']:.0f}); "
                f"compile {v['compile_s']:.1f} s"
            )
    print(f"whole run {r['wall_s']:.0f} s")
    harness.warn_if_not_quiet(r["load"]["quiet"])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        result = memory_child(args.memory_child, json.loads(args.spec))
        print(MEMORY_PREFIX + json.dumps(result), flush=True)
        return 0
    if args.cpu_devices > 1:
        import jax

        jax.config.update("jax_num_cpu_devices", args.cpu_devices)  # before the backend starts
    result = run(args)
    print_summary(result)
    out = args.out or (None if args.quick else RESULTS_DIR)
    if out:
        for path in write_results(result, out, args.tag):
            print(f"wrote {os.path.relpath(path, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
