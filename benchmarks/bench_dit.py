"""DiT-S/2 and DiT-B/2 training speed and memory against diffusers' DiT, on CPU.

    .venv/bin/python benchmarks/bench_dit.py             # full run (~10-15 minutes on 2 quiet
                                                         # cores), writes benchmarks/results/
    .venv/bin/python benchmarks/bench_dit.py --quick     # smoke test (~4 min), writes nothing
    .venv/bin/python benchmarks/bench_dit.py --variants S/2 --batch 16
    make bench-dit                                       # the full run

For each variant (256x256 images = 32x32x4 latents, 1000 classes, learned sigma) it measures,
in one process and one run (see benchmarks/README.md):

- train images/s of one full step at the same batch: our `diffusax.models.dit.DiT` trained by
  `diffusax.train.step.make_train_step` (jitted with donation, compiled ahead of time) against
  diffusers' `DiTTransformer2DModel` trained in PyTorch eager mode. Both steps: draw t and ε,
  form x_t, 10% null labels, forward, MSE on ε (the first 4 of the 8 output channels), backward,
  AdamW (lr 1e-4, no weight decay), EMA 0.9999: the DiT recipe with the hybrid loss's small
  variance term left out;
- the ratio diffusax / diffusers of those rates (target: >= 1);
- peak memory of each framework's training, each in its own subprocess (so that neither
  framework's libraries nor caches count against the other): the growth of the resident set
  (the kernel's high-water mark, what ru_maxrss reports) over the process's size before the
  model was built, and, for JAX, the compiled step's `memory_analysis()`.

The two models are the same function: diffusers' random initialisation (its per-block copies of
the timestep/label embedder made equal first, see DESIGN.md) is converted with
`diffusax.convert.diffusers_dit.load_dit_params` and one forward pass must agree before anything
is timed. Timed repeats of the two frameworks alternate (A B B A ...) and the median is
reported; JAX compilation and warm-up steps are timed separately and excluded.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
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
# linear β from 1e-4 to 0.02 over 1000 steps, 10% null labels for classifier-free guidance.
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
    """Set every block's timestep/label embedder copy to block 0's (see DESIGN.md).

    diffusers' DiT gives each block its own embedder; the reference model (and our DiT) has one.
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
# diffusax: the DiT and the project's train step


class JaxTrainer:
    """Our DiT, trained by `make_train_step` jitted with donated state on a data-parallel mesh.

    With `state_dict` (a diffusers DiT's tensors) the weights are converted from it; without,
    the model is initialised randomly (the memory subprocess, which must not import torch).
    """

    def __init__(
        self,
        config: dict,
        batches: list[dict],
        *,
        state_dict=None,
        num_devices: int = 1,
        scan_blocks: bool = True,
        seed: int = SEED,
    ):
        import jax
        import jax.numpy as jnp
        import optax
        from flax import nnx

        from diffusax import losses, models, parallel, schedules
        from diffusax.convert.diffusers_dit import dit_kwargs_from_diffusers, load_dit_params
        from diffusax.models.dit import DiT
        from diffusax.train.optim import ema_init
        from diffusax.train.state import TrainState, split_params
        from diffusax.train.step import make_train_step

        self.jax = jax
        devices = jax.devices()[:num_devices]
        if len(devices) != num_devices:
            raise ValueError(f"asked for {num_devices} JAX devices, {len(jax.devices())} exist")
        kwargs = dict(
            dit_kwargs_from_diffusers(config),
            class_dropout_prob=0.0,  # labels are dropped in the loss, as build_model does
            scan_blocks=scan_blocks,
        )
        if state_dict is None:
            model = DiT(**kwargs, rngs=nnx.Rngs(params=seed))
        else:
            model = nnx.eval_shape(lambda: DiT(**kwargs, rngs=nnx.Rngs(params=seed)))
            load_dit_params(model, state_dict)  # raises unless every tensor maps
        self.num_params = models.count_params(model)
        self.graphdef, params = split_params(model)
        del model
        self.apply_fn = models.make_apply_fn(self.graphdef)

        def eps_apply(p, x, t, y, key):  # the ε half of the learned-sigma output
            return self.apply_fn(p, x, t, y, key)[..., :LATENT_CHANNELS]

        sched = schedules.schedule_from_config(
            "linear", NUM_TIMESTEPS, beta_start=BETAS[0], beta_end=BETAS[1]
        )
        loss_fn = losses.make_diffusion_loss(
            eps_apply,
            sched,
            prediction="eps",
            var_type="fixed_large",  # not a learned variance: MSE on ε only
            label_drop_prob=LABEL_DROP_PROB,
            null_label=NUM_CLASSES,
        )
        optimizer = optax.adamw(LEARNING_RATE, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
        step_fn = make_train_step(
            loss_fn, optimizer, ema_decay=EMA_DECAY, seed=seed, skip_nonfinite=False
        )
        self.mesh = parallel.make_mesh(devices=devices)
        repl, batch_sharding = parallel.replicated(self.mesh), parallel.batch_sharding(self.mesh)
        params = jax.device_put(params, repl)
        state = TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            ema=ema_init(params),
            bad_steps=jnp.zeros((), jnp.int32),
        )
        self.state_shardings = jax.tree.map(lambda _: repl, state)
        self.state = jax.device_put(state, self.state_shardings)
        self.step_fn = jax.jit(
            step_fn,
            in_shardings=(self.state_shardings, batch_sharding),
            out_shardings=(self.state_shardings, None),
            donate_argnums=0,
        )
        self.forward_fn = jax.jit(lambda p, x, t, y: self.apply_fn(p, x, t, y))
        self.batches = [jax.device_put(b, batch_sharding) for b in batches]
        self.compiled = None
        self.metrics = None
        self.steps_run = 0

    def compile(self) -> float:
        t0 = time.perf_counter()
        self.compiled = self.step_fn.lower(self.state, self.batches[0]).compile()
        return time.perf_counter() - t0

    def memory_analysis(self) -> dict | None:
        """The compiled step's buffers (XLA's memory_analysis), MB; None where unsupported."""
        try:
            m = self.compiled.memory_analysis()
        except (AttributeError, NotImplementedError, RuntimeError):
            return None
        if m is None:
            return None
        mb = lambda name: getattr(m, name, 0) / 2**20
        out = {
            "argument_mb": mb("argument_size_in_bytes"),
            "output_mb": mb("output_size_in_bytes"),
            "alias_mb": mb("alias_size_in_bytes"),
            "temp_mb": mb("temp_size_in_bytes"),
            "generated_code_mb": mb("generated_code_size_in_bytes"),
        }
        # Donated outputs reuse their argument's buffer, so aliases count once.
        out["live_mb"] = out["argument_mb"] + out["output_mb"] - out["alias_mb"] + out["temp_mb"]
        return out

    def train(self, steps: int):
        for _ in range(steps):
            batch = self.batches[self.steps_run % len(self.batches)]
            self.state, self.metrics = self.compiled(self.state, batch)
            self.steps_run += 1
        self.jax.block_until_ready((self.state, self.metrics))

    def forward(self, x_nhwc, t, labels):
        import numpy as np

        return np.asarray(self.forward_fn(self.state.params, x_nhwc, t, labels))

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


def compare_variant(variant: str, args, counts, warmup: int, helpers) -> dict:
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
        "diffusax_s": helpers.elapsed(lambda: ours.train(warmup)),
        "diffusers_s": helpers.elapsed(lambda: theirs.train(warmup)),
        "steps": warmup,
    }
    repeats, steps = counts
    times = helpers.interleaved(
        {"diffusax": lambda: ours.train(steps), "diffusers": lambda: theirs.train(steps)},
        repeats,
        lead_in={"diffusax": lambda: ours.train(1), "diffusers": lambda: theirs.train(1)},
    )
    train = {name: helpers.rate_summary(s, steps * args.batch) for name, s in times.items()}
    for name, trainer in (("diffusax", ours), ("diffusers", theirs)):
        train[name]["last_loss"] = trainer.last_loss()
        train[name]["ms_per_step_median"] = (
            1e3 * statistics.median(train[name]["seconds_repeats"]) / steps
        )
        if not train[name]["last_loss"] == train[name]["last_loss"]:  # NaN
            raise RuntimeError(f"{variant}: {name} training produced a NaN loss")
    ratio = train["diffusax"]["per_s_median"] / train["diffusers"]["per_s_median"]
    shares = [
        x for name in ("diffusax", "diffusers") for x in train[name]["others_cpu_share_repeats"]
    ]
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
        "others_cpu_share_median": statistics.median(shares) if shares else None,
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
            "diffusax.convert.diffusers_dit",
            "diffusax.losses",
            "diffusax.train.step",
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


def _helpers():
    """bench_digits: the timing, load, machine and results helpers of the first benchmark
    (imported late: the memory subprocesses must load only their own framework)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_digits

    return bench_digits


def run(args) -> dict:
    import diffusers
    import flax
    import jax
    import optax
    import torch

    helpers = _helpers()

    mode = "quick" if args.quick else "full"
    counts = QUICK if args.quick else FULL
    load = helpers.LoadLog()
    load.mark("start")
    cores = len(os.sched_getaffinity(0))
    if load.points[0]["load_1m"] > max(1.0, cores - 0.5):
        print(
            f"warning: the 1-minute load average is {load.points[0]['load_1m']:.1f} on {cores} "
            "cores; other processes will distort the numbers. On a shared machine PyTorch's "
            "spinning OpenMP threads slow down most (OMP_WAIT_POLICY=PASSIVE limits that).",
            flush=True,
        )
    t_start = time.perf_counter()
    variants = {}
    for variant in args.variants:
        variant_counts = counts.get(variant, counts["S/2"])
        variants[variant] = compare_variant(
            variant, args, variant_counts, WARMUP_STEPS[mode], helpers
        )
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
                f"{_mb(m['diffusax']['step_peak_growth_mb'])}, diffusers "
                f"{_mb(m['diffusers']['step_peak_growth_mb'])}",
                flush=True,
            )
    shares = [v["others_cpu_share_median"] for v in variants.values()]
    return {
        "benchmark": "DiT training: diffusax vs diffusers DiTTransformer2DModel, CPU",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "wall_s": time.perf_counter() - t_start,
        "machine": {
            "cpu": helpers.cpu_info(),
            "cpu_count": os.cpu_count(),
            "usable_cores": cores,
            "platform": platform.platform(),
        },
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "flax": flax.__version__,
            "optax": optax.__version__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
        },
        "threads": {
            "torch": torch.get_num_threads(),
            "torch_interop": torch.get_num_interop_threads(),
            "jax": "XLA:CPU default (its intra-op pool spans the usable cores)",
            "jax_cpu_devices": args.cpu_devices,
            "env": {k: os.environ.get(k, "") for k in helpers.THREAD_ENV},
        },
        "load": {
            "points": load.points,
            **load.summary(),
            "others_cpu_share": dict(zip(variants, shares)),
            "quiet": all(s is not None and s < helpers.QUIET_SHARE for s in shares),
        },
        "setup": {
            "batch": args.batch,
            "latents": [LATENT_SIZE, LATENT_SIZE, LATENT_CHANNELS],
            "num_classes": NUM_CLASSES,
            "scan_blocks": not args.unrolled,
            "data": f"{NUM_BATCHES} batches of N(0, 1) latents and random labels, prepared "
            "before timing and cycled by both",
            "loss": "MSE between ε and the first 4 output channels (the learned-sigma half is "
            "output but not trained); t ~ U{0..999}, linear β 1e-4..0.02, 10% null labels",
            "optimizer": f"AdamW lr {LEARNING_RATE}, betas (0.9, 0.999), eps 1e-8, no weight "
            f"decay; EMA {EMA_DECAY}; no gradient clipping",
            "diffusax_train_step": "diffusax.train.step.make_train_step (+ grad norm metric), "
            "jax.jit with replicated state on a data-parallel mesh, donate_argnums=0, "
            "AOT-compiled",
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


def _mb(value) -> str:
    return "?" if value is None else f"{value:.0f} MB"


def _percent(share) -> str:
    return "?" if share is None else f"{100 * share:.0f}%"


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
            _percent(v["others_cpu_share_median"]),
            "yes" if r["load"]["quiet"] else "**no**",
            f"{v['images_per_s']['diffusax']['per_s_median']:.2f}",
            f"{v['images_per_s']['diffusers']['per_s_median']:.2f}",
            f"**{v['ratio']:.2f}**",
            _mb(peak("diffusax")).removesuffix(" MB"),
            _mb(peak("diffusers")).removesuffix(" MB"),
            f"{v['compile_s']:.0f}",
        ]
        rows.append("| " + " | ".join(cells) + " |\n")
    return "".join(rows)


def write_results(result: dict, out_dir: str) -> tuple[str, str]:
    """dit_cpu.json (dit_cpu_Ndev.json with N JAX devices), replaced atomically, and one
    appended row per variant in RESULTS_DIT.md."""
    devices = result["threads"]["jax_cpu_devices"]
    name = "dit_cpu.json" if devices == 1 else f"dit_cpu_{devices}dev.json"
    return _helpers().save_results(
        result, out_dir, name, "RESULTS_DIT.md", RESULTS_HEADER, results_rows(result)
    )


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
            f"{'>= ' + format(TARGET_RATIO, 'g'):>8s}{_percent(v['others_cpu_share_median']):>12s}"
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
                    f"{label:24s}{_mb(mem['diffusax'][key]).removesuffix(' MB'):>12s}"
                    f"{_mb(mem['diffusers'][key]).removesuffix(' MB'):>12s}"
                )
        analysis = v["jax_memory_analysis"]
        if analysis:
            print(
                f"  XLA memory_analysis: live {analysis['live_mb']:.0f} MB (arguments "
                f"{analysis['argument_mb']:.0f}, temp {analysis['temp_mb']:.0f}); "
                f"compile {v['compile_s']:.1f} s"
            )
    print(f"whole run {r['wall_s']:.0f} s")
    if not r["load"]["quiet"]:
        print(
            "WARNING: other processes were using the cores while this ran; the numbers (above "
            "all PyTorch's) are distorted. Rerun on a quiet machine."
        )


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
        for path in write_results(result, out):
            print(f"wrote {os.path.relpath(path, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
