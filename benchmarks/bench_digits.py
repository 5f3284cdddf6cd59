"""Speed of the default experiment (`ddpm_digits`) against the same model in diffusers, on CPU.

    .venv/bin/python benchmarks/bench_digits.py            # full run (~6-8 minutes on 2 quiet
                                                           # cores), writes benchmarks/results/
    .venv/bin/python benchmarks/bench_digits.py --quick    # smoke test (~1 min), writes nothing
    .venv/bin/python benchmarks/bench_digits.py --cpu-devices 1   # the whole batch on one device
    make bench                                             # the full run

What it measures, in one process and one run (see benchmarks/README.md):

- train steps/s at batch 128 of the bundled digits: the jitted train step of the run that
  `diffusax.train.build.build` makes of the experiment, as the train loop runs it (split over
  one JAX CPU device per core, as `python -m diffusax.main` does by default), against a PyTorch step on diffusers'
  `UNet2DModel` with the same architecture, loss, optimizer, clipping and EMA;
- samples/s of 1000-step DDPM ancestral sampling at batch 100, classifier-free guidance off:
  the method's sampler, `methods.make_generate` (one jitted `lax.scan`), against a loop of 1000 `UNet2DModel` calls
  under `torch.inference_mode` stepped by diffusers' `DDPMScheduler`;
- one network forward at the sampling batch for both (a diagnostic: sampling minus forwards is
  the per-step overhead of the sampler).

The two networks are checked to be the same function first: the diffusers weights are loaded
into our U-Net with `diffusax.convert.diffusers_unet` and the outputs must agree. Timed repeats
of the two frameworks alternate (A B B A ...) and the median is reported; compilation (JAX) and
the first eager calls (PyTorch) are timed separately and excluded. The share of the cores other
processes used is recorded with every timed repeat, because a busy machine distorts the numbers
(PyTorch's spinning OpenMP threads suffer most from sharing cores).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["JAX_PLATFORMS"] = "cpu"  # a CPU benchmark, also on a machine with a GPU

import harness  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import DDPMScheduler, UNet2DModel  # noqa: E402
from flax import nnx  # noqa: E402

from diffusax import config as config_lib  # noqa: E402
from diffusax import methods, parallel  # noqa: E402
from diffusax.convert.diffusers_unet import load_unet_params  # noqa: E402
from diffusax.train.build import build  # noqa: E402
from diffusax.train.state import split_params  # noqa: E402

EXPERIMENT = "ddpm_digits"
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
TARGETS = {"train": 1.0, "sample": 2.0}  # required speed ratio diffusax / diffusers

# Repeat counts: (timed train repeats, train steps per repeat, sample repeats, sampling steps).
FULL = dict(train_repeats=11, train_steps=10, sample_repeats=3, sample_steps=1000)
QUICK = dict(train_repeats=2, train_steps=3, sample_repeats=1, sample_steps=20)
SAMPLE_BATCH = 100
WARMUP_STEPS = 3
FORWARD_CALLS = 10  # forwards per timed repeat of the forward diagnostic


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny repeat counts, for a smoke test")
    p.add_argument(
        "--out",
        default=None,
        help="directory for digits_cpu.json and RESULTS.md (default: benchmarks/results for a "
        "full run; a --quick run writes nothing unless --out is given)",
    )
    p.add_argument(
        "--tag",
        default="",
        help="recorded as digits_cpu[_Ndev]_TAG.json, so that an earlier run's JSON is kept",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch.set_num_threads (default: the cores this process may use)",
    )
    p.add_argument("--sample-batch", type=int, default=SAMPLE_BATCH)
    p.add_argument(
        "--cpu-devices",
        type=int,
        default=0,
        help="JAX CPU devices (jax_num_cpu_devices); the batches are split over them by the "
        "data-parallel mesh, as train.loop splits them over all devices (default 0: one per "
        "core, the most that divide the sampling batch, as `diffusax.main` chooses)",
    )
    args = p.parse_args(argv)
    if args.torch_threads < 1:
        p.error("--torch-threads must be >= 1")
    if args.sample_batch < 1:
        p.error("--sample-batch must be >= 1")
    if args.cpu_devices == 0:
        cores = len(os.sched_getaffinity(0))
        args.cpu_devices = max(d for d in range(1, cores + 1) if args.sample_batch % d == 0)
    if args.cpu_devices < 1 or args.sample_batch % args.cpu_devices:
        p.error("--cpu-devices must be >= 1 and divide --sample-batch")
    return args


# ---------------------------------------------------------------------------------------------
# diffusax: the train step and the sampler exactly as the train loop builds them


class Ours:
    """The run `diffusax.train.build.build` makes of the experiment, as the train loop runs it:
    mesh, state born in its shardings, the jitted donated step, the method's sampler."""

    def __init__(self, cfg, sample_cfg, num_devices: int = 1):
        self.run = run = build(cfg, devices=harness.jax_devices(num_devices))
        self.cfg, self.mesh, self.source = cfg, run.mesh, run.source
        self.num_classes, self.image_shape = run.data.num_classes, tuple(run.data.image_shape)
        self.state = run.init_state()
        self.train_step = run.train_step
        self.generate = run.method.make_sampler(run, sample_cfg)
        apply_fn = run.ctx.apply_fn("model")
        repl, batch = parallel.replicated(run.mesh), parallel.batch_sharding(run.mesh)
        self.forward = jax.jit(
            lambda p, x, t, y: apply_fn(p, x, t, y),
            in_shardings=(repl, batch, batch, batch),
            out_shardings=batch,
        )
        self.batches = None
        self.metrics = None
        self.steps_run = 0

    def load_batches(self, count: int):
        loader = self.run.loader(0)
        self.batches = [loader.batch(i) for i in range(count)]  # sharded jax.Arrays
        return [{k: np.asarray(v) for k, v in b.items()} for b in self.batches]

    def compile_train(self) -> float:
        self.train_step, seconds = harness.compile_step(self.run, self.state, self.batches[0])
        return seconds

    def compile_generate(self, labels, key) -> float:
        t0 = time.perf_counter()
        self.generate = self.generate.lower(self.ema_params(), labels, key).compile()
        return time.perf_counter() - t0

    def ema_params(self):
        return self.run.sample_params(self.state)

    def train(self, steps: int):
        frozen = self.run.frozen()
        for _ in range(steps):
            batch = self.batches[self.steps_run % len(self.batches)]
            self.state, self.metrics = self.train_step(self.state, frozen, batch)
            self.steps_run += 1
        jax.block_until_ready((self.state, self.metrics))

    def sample(self, labels, key):
        return jax.block_until_ready(self.generate(self.ema_params(), labels, key))


# ---------------------------------------------------------------------------------------------
# diffusers: the same network, trained and sampled the way diffusers' examples do


def diffusers_config(cfg, image_shape, num_classes) -> dict:
    """The `UNet2DModel` config of our U-Net for ``cfg.model`` (the converter's mapping, inverted).

    Our `num_classes=N` has N + 1 label rows (the last is the null label): diffusers'
    `num_class_embeds=N+1`. Our `downsample_padding="asymmetric"` (the U-Net's default) is
    diffusers' `downsample_padding=0`; our sinusoidal embedding defaults are
    `flip_sin_to_cos=False, freq_shift=1`.
    """
    m = cfg.model
    size, _, channels = image_shape
    widths = [m.ch * mult for mult in m.ch_mult]
    attn = [size // 2**level in tuple(m.attn_resolutions) for level in range(len(widths))]
    # diffusers has one head size for every attention layer; ours has one head count.
    attn_widths = {w for w, a in zip(widths, attn) if a} | {widths[-1]}  # + the middle block
    head_dims = {w // m.num_heads for w in attn_widths}
    if len(head_dims) != 1 or any(w % m.num_heads for w in attn_widths):
        raise ValueError(
            f"config field 'model.num_heads'={m.num_heads} gives attention layers of widths "
            f"{sorted(attn_widths)} different head sizes; diffusers needs one head size"
        )
    return {
        "sample_size": size,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": tuple(widths),
        "down_block_types": tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        "up_block_types": tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1]),
        "layers_per_block": m.num_res_blocks,
        "attention_head_dim": head_dims.pop(),
        "norm_num_groups": min(32, m.ch),  # as diffusax.models.build_model
        "norm_eps": 1e-6,
        "downsample_padding": 0,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "dropout": m.dropout,
        "num_class_embeds": num_classes + 1 if m.class_conditional else None,
    }


def lr_lambda(optim_cfg, num_steps: int):
    """Our schedule (`optim.make_lr_schedule`) as a multiplier of the peak rate, for LambdaLR."""
    warmup = optim_cfg.warmup_steps
    decay = max(num_steps, warmup + 1) - warmup

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        if optim_cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, decay) / decay))
        return 1.0

    return factor


class Theirs:
    def __init__(self, cfg, image_shape, num_classes, sample_steps: int, seed: int):
        torch.manual_seed(seed)
        self.cfg = cfg
        self.unet_config = diffusers_config(cfg, image_shape, num_classes)
        self.model = UNet2DModel(**self.unet_config)
        d, o = cfg.diffusion, cfg.optim
        self.scheduler = DDPMScheduler(
            num_train_timesteps=d.num_timesteps,
            beta_schedule="linear",
            beta_start=d.beta_start,
            beta_end=d.beta_end,
            variance_type="fixed_large",
            clip_sample=cfg.sample.clip_x0 > 0,
            clip_sample_range=cfg.sample.clip_x0 or 1.0,
            prediction_type="epsilon",
            timestep_spacing="trailing",  # our default spacing; all T steps at 1000 anyway
        )
        self.sample_scheduler = copy.deepcopy(self.scheduler)
        self.sample_scheduler.set_timesteps(sample_steps)
        params = list(self.model.parameters())
        kw = dict(lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps)
        try:  # the fused CPU kernel is PyTorch's fastest Adam; the foreach one otherwise
            self.optimizer = torch.optim.Adam(params, fused=True, **kw)
            self.optimizer_name = "torch.optim.Adam(fused=True)"
        except (RuntimeError, TypeError):
            self.optimizer = torch.optim.Adam(params, foreach=True, **kw)
            self.optimizer_name = "torch.optim.Adam(foreach=True)"
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(o, cfg.train.num_steps)
        )
        self.params = params
        self.ema = [p.detach().clone() for p in params]
        self.generator = torch.Generator().manual_seed(seed)
        self.null_label = num_classes
        self.batches = None
        self.loss = None
        self.steps_run = 0

    def load_batches(self, numpy_batches):
        self.batches = [
            (
                torch.from_numpy(b["image"].transpose(0, 3, 1, 2).copy()),  # NHWC -> NCHW
                torch.from_numpy(b["label"].astype(np.int64)),
            )
            for b in numpy_batches
        ]

    def train_step(self, x0, labels):
        """ε-prediction loss with label dropout, Adam, global-norm clip, EMA: as our step."""
        cfg, gen = self.cfg, self.generator
        b = x0.shape[0]
        t = torch.randint(0, cfg.diffusion.num_timesteps, (b,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = self.scheduler.add_noise(x0, noise, t)
        drop = torch.rand(b, generator=gen) < cfg.diffusion.label_drop_prob
        labels = torch.where(drop, self.null_label, labels)
        self.model.train()
        loss = F.mse_loss(self.model(xt, t, class_labels=labels).sample, noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip)
        self.optimizer.step()
        self.lr_schedule.step()
        with torch.no_grad():  # θ_ema ← θ_ema + (1 - decay)(θ - θ_ema)
            torch._foreach_lerp_(self.ema, self.params, 1.0 - cfg.optim.ema_decay)
        return loss

    def train(self, steps: int):
        for _ in range(steps):
            x0, labels = self.batches[self.steps_run % len(self.batches)]
            self.loss = self.train_step(x0, labels)
            self.steps_run += 1

    @torch.inference_mode()
    def sample(self, labels: torch.Tensor, shape, seed: int):
        """DDPM ancestral sampling with diffusers' DDPMScheduler, one network call per step."""
        self.model.eval()
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(shape, generator=gen)
        for t in self.sample_scheduler.timesteps:
            eps = self.model(x, t, class_labels=labels).sample
            x = self.sample_scheduler.step(eps, t, x, generator=gen).prev_sample
        return x.clamp(-1.0, 1.0)

    @torch.inference_mode()
    def forward(self, x, t, labels):
        self.model.eval()
        return self.model(x, t, class_labels=labels).sample


# ---------------------------------------------------------------------------------------------
# The same network in both frameworks


def check_parity(ours: Ours, theirs: Theirs, x_nhwc, t, labels) -> dict:
    """Load the diffusers weights into our U-Net and compare one forward; raise if they differ."""
    model = nnx.eval_shape(lambda: ours.run.networks["model"].build(jax.random.key(0)))
    state_dict = {k: v.detach().numpy() for k, v in theirs.model.state_dict().items()}
    load_unet_params(model, state_dict)  # raises unless every tensor maps onto a parameter
    _, params = split_params(model)
    out_ours = np.asarray(ours.forward(params, x_nhwc, t, labels))
    out_theirs = (
        theirs.forward(
            torch.from_numpy(np.asarray(x_nhwc).transpose(0, 3, 1, 2).copy()),
            torch.from_numpy(np.asarray(t, np.int64)),
            torch.from_numpy(np.asarray(labels, np.int64)),
        )
        .numpy()
        .transpose(0, 2, 3, 1)
    )  # NCHW -> NHWC
    scale = float(np.abs(out_theirs).max())
    diff = float(np.abs(out_ours - out_theirs).max())
    if not scale > 1e-3 or diff > 1e-4 * scale:
        raise RuntimeError(
            f"the diffusers model is not our model: max |diff| {diff:.3g} at output scale "
            f"{scale:.3g}; the comparison would not be fair"
        )
    n_ours = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    n_theirs = sum(p.numel() for p in theirs.model.parameters())
    if n_ours != n_theirs:
        raise RuntimeError(f"parameter counts differ: diffusax {n_ours}, diffusers {n_theirs}")
    return {"max_abs_diff": diff, "output_scale": scale, "params": n_ours}


# ---------------------------------------------------------------------------------------------


def run(args) -> dict:
    counts = QUICK if args.quick else FULL
    torch.set_num_threads(args.torch_threads)
    load = harness.LoadLog()
    load.mark("start")
    harness.warn_if_busy(load)
    t_start = time.perf_counter()

    cfg = config_lib.load_experiment(EXPERIMENT)
    sample_cfg = cfg.sample.copy_and_resolve_references()
    with sample_cfg.unlocked():
        sample_cfg.sampler = "ddpm"
        steps = counts["sample_steps"]
        sample_cfg.num_steps = 0 if steps == cfg.diffusion.num_timesteps else steps  # 0: all T
        sample_cfg.guidance_scale = 1.0  # one network call per step in both frameworks
        sample_cfg.batch_size = args.sample_batch

    ours = Ours(cfg, sample_cfg, args.cpu_devices)
    theirs = Theirs(cfg, ours.image_shape, ours.num_classes, counts["sample_steps"], cfg.seed)
    n_batches = -(-len(ours.source) // cfg.train.batch_size)  # one epoch, cycled by both
    theirs.load_batches(ours.load_batches(n_batches))

    # Sampling inputs, shared: labels cycle through the classes.
    labels_np = methods.sample_labels(args.sample_batch, ours.num_classes)
    labels_jax, labels_torch = jnp.asarray(labels_np), torch.from_numpy(labels_np.astype(np.int64))
    sample_shape_nchw = (args.sample_batch, ours.image_shape[2], *ours.image_shape[:2])
    rng = np.random.default_rng(cfg.seed)
    x_fwd = rng.standard_normal((args.sample_batch, *ours.image_shape), dtype=np.float32)
    t_fwd = rng.integers(0, cfg.diffusion.num_timesteps, args.sample_batch).astype(np.int32)
    y_fwd = labels_np.copy()
    y_fwd[::7] = ours.num_classes  # some null labels too
    x_fwd_t = torch.from_numpy(x_fwd.transpose(0, 3, 1, 2).copy())
    t_fwd_t = torch.from_numpy(t_fwd.astype(np.int64))
    y_fwd_t = torch.from_numpy(y_fwd.astype(np.int64))

    compile_s = {}
    t0 = time.perf_counter()
    parity = check_parity(ours, theirs, x_fwd, t_fwd, y_fwd)
    compile_s["forward_first_call_incl_parity"] = time.perf_counter() - t0
    print(
        f"parity: max |diff| {parity['max_abs_diff']:.2e} (scale {parity['output_scale']:.2f}), "
        f"{parity['params']} parameters in both",
        flush=True,
    )
    load.mark("parity")

    # --- training
    compile_s["train_step"] = ours.compile_train()
    print(f"compiled the train step in {compile_s['train_step']:.1f} s", flush=True)
    warmup = {
        "diffusax_s": harness.elapsed(lambda: ours.train(WARMUP_STEPS)),
        "diffusers_s": harness.elapsed(lambda: theirs.train(WARMUP_STEPS)),
        "steps": WARMUP_STEPS,
    }
    load.mark("train warmup")
    n = counts["train_steps"]
    times = harness.interleaved(
        {"diffusax": lambda: ours.train(n), "diffusers": lambda: theirs.train(n)},
        counts["train_repeats"],
        lead_in={"diffusax": lambda: ours.train(1), "diffusers": lambda: theirs.train(1)},
    )
    load.mark("train")
    train = {name: harness.rate_summary(s, n) for name, s in times.items()}
    train["diffusax"]["last_loss"] = float(ours.metrics["loss"])
    train["diffusers"]["last_loss"] = float(theirs.loss.item())
    train["ratio"] = train["diffusax"]["per_s_median"] / train["diffusers"]["per_s_median"]
    train["warmup"] = warmup
    print(
        f"train: diffusax {train['diffusax']['per_s_median']:.2f} steps/s, diffusers "
        f"{train['diffusers']['per_s_median']:.2f} steps/s, ratio {train['ratio']:.2f}",
        flush=True,
    )

    # --- one forward at the sampling batch (diagnostic)
    params = ours.ema_params()
    fwd_ours = lambda: [ours.forward(params, x_fwd, t_fwd, y_fwd) for _ in range(FORWARD_CALLS)][
        -1
    ].block_until_ready()
    fwd_theirs = lambda: [theirs.forward(x_fwd_t, t_fwd_t, y_fwd_t) for _ in range(FORWARD_CALLS)]
    fwd_ours(), fwd_theirs()  # warm up at these weights
    times = harness.interleaved({"diffusax": fwd_ours, "diffusers": fwd_theirs}, 3)
    forward = {name: harness.rate_summary(s, FORWARD_CALLS) for name, s in times.items()}
    for name in forward:
        forward[name]["ms_per_forward_median"] = 1e3 / forward[name]["per_s_median"]
    forward["batch"] = args.sample_batch
    load.mark("forward")

    # --- sampling
    key = jax.random.key(cfg.seed + 1)
    compile_s["generate"] = ours.compile_generate(labels_jax, key)
    print(
        f"compiled the {counts['sample_steps']}-step sampler in {compile_s['generate']:.1f} s",
        flush=True,
    )
    first = {
        "diffusax_s": harness.elapsed(lambda: ours.sample(labels_jax, key)),
        "diffusers_s": harness.elapsed(
            lambda: theirs.sample(labels_torch, sample_shape_nchw, cfg.seed)
        ),
    }
    load.mark("sample warmup")
    outputs = {}

    def sample_ours():
        outputs["diffusax"] = np.asarray(ours.sample(labels_jax, key))

    def sample_theirs():
        outputs["diffusers"] = theirs.sample(labels_torch, sample_shape_nchw, cfg.seed).numpy()

    times = harness.interleaved(
        {"diffusax": sample_ours, "diffusers": sample_theirs}, counts["sample_repeats"]
    )
    load.mark("sample")
    sample = {name: harness.rate_summary(s, args.sample_batch) for name, s in times.items()}
    for name, out in outputs.items():
        if not np.all(np.isfinite(out)):
            raise RuntimeError(f"{name} sampling produced non-finite values")
        sample[name]["ms_per_step_median"] = (
            1e3 * statistics.median(sample[name]["seconds_repeats"]) / counts["sample_steps"]
        )
    sample["ratio"] = sample["diffusax"]["per_s_median"] / sample["diffusers"]["per_s_median"]
    sample["first_call"] = first
    sample["steps"] = counts["sample_steps"]
    sample["batch"] = args.sample_batch
    print(
        f"sample: diffusax {sample['diffusax']['per_s_median']:.2f} samples/s, diffusers "
        f"{sample['diffusers']['per_s_median']:.2f} samples/s, ratio {sample['ratio']:.2f}",
        flush=True,
    )

    # Median share of the cores that other processes used while each phase was timed.
    phases = {"train": train, "forward": forward, "sample": sample}
    contention = {p: harness.median_share(s["diffusax"], s["diffusers"]) for p, s in phases.items()}

    return {
        "benchmark": f"{EXPERIMENT}: diffusax vs diffusers UNet2DModel, CPU",
        "date": harness.utc_now(),
        "quick": args.quick,
        "wall_s": time.perf_counter() - t_start,
        "machine": harness.cpu_machine(),
        "versions": harness.versions("jax", "flax", "optax", "torch", "diffusers"),
        "threads": {
            **harness.cpu_threads(args.cpu_devices),
            "jax_devices": [str(d) for d in jax.devices()],
        },
        "load": load.record(contention),
        "setup": {
            "experiment": EXPERIMENT,
            "train_batch": cfg.train.batch_size,
            "train_steps_per_repeat": counts["train_steps"],
            "train_repeats": counts["train_repeats"],
            "data": "the bundled digits, one epoch of batches prepared before timing, cycled",
            "diffusers_train_step": (
                "DDPMScheduler.add_noise, label dropout, MSE on ε, backward, "
                f"clip_grad_norm_({cfg.optim.grad_clip}), {theirs.optimizer_name} with a "
                "LambdaLR warmup-cosine schedule, EMA by torch._foreach_lerp_"
            ),
            "diffusax_train_step": (
                "diffusax.train.build.build(cfg).train_step, the step train.loop runs (the "
                f"method's updates, shardings on a {args.cpu_devices}-device mesh, donated "
                "state), AOT-compiled"
            ),
            "sampler": "DDPM ancestral, fixed_large variance, x0 clipped to [-1, 1], no guidance",
            "diffusax_sampler": (
                "the method's make_sampler: diffusax.methods.make_generate (jitted lax.scan "
                "over all steps), batch split over the mesh"
            ),
            "diffusers_sampler": (
                "Python loop: UNet2DModel forward + DDPMScheduler.step per step, "
                "torch.inference_mode"
            ),
            "sample_batch": args.sample_batch,
            "sample_steps": counts["sample_steps"],
            "sample_repeats": counts["sample_repeats"],
            "statistic": "median over interleaved repeats (order alternates A B, B A, ...; train "
            "repeats each follow one untimed step of their own framework)",
        },
        "model": {"diffusers_config": theirs.unet_config, "parity": parity},
        "compile_s": compile_s,
        "train_steps_per_s": train,
        "forward_per_s": forward,
        "samples_per_s": sample,
        "targets": {
            "train_ratio_min": TARGETS["train"],
            "sample_ratio_min": TARGETS["sample"],
            "train_met": train["ratio"] >= TARGETS["train"],
            "sample_met": sample["ratio"] >= TARGETS["sample"],
        },
    }


# ---------------------------------------------------------------------------------------------
# Recording

RESULTS_HEADER = """# Benchmark results

Rows are appended by `benchmarks/bench_digits.py` (full runs only); the latest run's details are
in `digits_cpu.json`. Ratios are diffusax / diffusers (higher is better for diffusax); targets:
train >= 1, 1000-step sampling >= 2. "Others' CPU" is the median share of the cores that other
processes used while the train / sampling repeats were timed (from /proc/stat): a run is quiet
(yes) when both are under 10%; numbers from a busy machine are distorted, PyTorch's most.

| date (UTC) | CPU | cores | torch threads | JAX devices | others' CPU train / sample | quiet | train steps/s diffusax | diffusers | ratio | samples/s diffusax | diffusers | ratio | compile s (train / sample) |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def results_row(r: dict) -> str:
    tr, sa, ld = r["train_steps_per_s"], r["samples_per_s"], r["load"]
    cells = [
        r["date"][:16].replace("T", " "),
        r["machine"]["cpu"]["name"],
        str(r["machine"]["usable_cores"]),
        str(r["threads"]["torch"]),
        str(r["threads"]["jax_cpu_devices"]),
        " / ".join(harness.percent(ld["others_cpu_share"][p]) for p in ("train", "sample")),
        "yes" if ld["quiet"] else "**no**",
        f"{tr['diffusax']['per_s_median']:.2f}",
        f"{tr['diffusers']['per_s_median']:.2f}",
        f"**{tr['ratio']:.2f}**",
        f"{sa['diffusax']['per_s_median']:.2f}",
        f"{sa['diffusers']['per_s_median']:.2f}",
        f"**{sa['ratio']:.2f}**",
        f"{r['compile_s']['train_step']:.0f} / {r['compile_s']['generate']:.0f}",
    ]
    return "| " + " | ".join(cells) + " |\n"


def write_results(result: dict, out_dir: str, tag: str = "") -> tuple[str, str]:
    """digits_cpu.json (digits_cpu_Ndev.json with N JAX devices; _TAG before .json with a tag),
    replaced atomically, and one appended row of RESULTS.md."""
    devices = result["threads"]["jax_cpu_devices"]
    name = "digits_cpu" if devices == 1 else f"digits_cpu_{devices}dev"
    name += f"_{tag}.json" if tag else ".json"
    row = results_row(result)
    return harness.save_results(result, out_dir, name, "RESULTS.md", RESULTS_HEADER, row)


def print_summary(r: dict) -> None:
    tr, sa, fw = r["train_steps_per_s"], r["samples_per_s"], r["forward_per_s"]
    ld = r["load"]
    print()
    print(f"{r['benchmark']}{'  (QUICK: smoke test, not a measurement)' if r['quick'] else ''}")
    print(
        f"machine: {r['machine']['cpu']['name']}, {r['machine']['usable_cores']} usable cores, "
        f"torch threads {r['threads']['torch']}, JAX: XLA default threads, "
        f"{r['threads']['jax_cpu_devices']} CPU device(s)"
    )
    shares = ld["others_cpu_share"]
    print(
        f"other processes used {harness.percent(shares['train'])} (train), "
        f"{harness.percent(shares['sample'])} (sampling) of the cores; load 1m median "
        f"{ld['median_load_1m']:.1f} max {ld['max_load_1m']:.1f}"
    )
    print(f"{'':28s}{'diffusax':>12s}{'diffusers':>12s}{'ratio':>8s}{'target':>8s}")
    print(
        f"{'train steps/s (batch 128)':28s}{tr['diffusax']['per_s_median']:12.2f}"
        f"{tr['diffusers']['per_s_median']:12.2f}{tr['ratio']:8.2f}{'>= 1':>8s}"
    )
    label = f"samples/s ({sa['steps']} steps)"
    print(
        f"{label:28s}{sa['diffusax']['per_s_median']:12.2f}"
        f"{sa['diffusers']['per_s_median']:12.2f}{sa['ratio']:8.2f}{'>= 2':>8s}"
    )
    print(
        f"{'ms / sampling step':28s}{sa['diffusax']['ms_per_step_median']:12.1f}"
        f"{sa['diffusers']['ms_per_step_median']:12.1f}"
    )
    label = f"ms / forward (batch {fw['batch']})"
    print(
        f"{label:28s}"
        f"{fw['diffusax']['ms_per_forward_median']:12.1f}"
        f"{fw['diffusers']['ms_per_forward_median']:12.1f}"
    )
    print(
        f"compile: train step {r['compile_s']['train_step']:.1f} s, sampler "
        f"{r['compile_s']['generate']:.1f} s; whole run {r['wall_s']:.0f} s"
    )
    harness.warn_if_not_quiet(ld["quiet"])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_devices > 1:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)  # before the backend starts
    os.chdir(ROOT)  # experiments/ are found relative to the repository root
    result = run(args)
    print_summary(result)
    out = args.out or (None if args.quick else RESULTS_DIR)
    if out:
        for path in write_results(result, out, args.tag):
            print(f"wrote {os.path.relpath(path, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
