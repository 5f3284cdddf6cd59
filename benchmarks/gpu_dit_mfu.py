"""DiT-XL/2 training throughput and model FLOPs utilisation (MFU) on the local GPUs.

    python benchmarks/gpu_dit_mfu.py                  # DiT-XL/2, global batch 256, all local
                                                      # GPUs (~100 s on one H100), writes
                                                      # benchmarks/results/dit_gpu_<chip>.json
    python benchmarks/gpu_dit_mfu.py --remat          # rematerialise the blocks instead of
                                                      # accumulating gradients
    python benchmarks/gpu_dit_mfu.py --dry-run        # S/8, batch 2, tiny matmuls: checks the
                                                      # script end to end on a CPU in ~30 s
    make bench-dit-gpu                                # the default run

What it measures (see benchmarks/README.md):

1. The chip's bf16 matmul peak: square `jnp.dot`s of bf16 matrices with float32 accumulation
   (and, as a second form, bf16 output), several sizes; the best TFLOP/s is the peak.
2. One train step of `experiments/dit_xl2.py` (default XL/2: 32x32x4 latents, 1000 classes,
   learned sigma) with bf16 compute and float32 parameters, blocks unrolled (`--scan`: one
   `lax.scan`), cuDNN flash attention: the hybrid loss (MSE on ε + L_vlb in bits/dim, 10% null
   labels), AdamW (lr 1e-4, no weight decay) and the EMA, as the DiT paper trains. The run is
   the one `diffusax.train.build.build` makes of that config (without its data: only the shapes
   it declares), the train loop's step jitted with donated state on a data-parallel mesh over
   every local device. When the per-device batch is larger than `--micro-batch`, the step
   accumulates gradients over micro-batches (`train.grad_accum_steps`: one `lax.scan`) before
   its one AdamW update: the same optimizer step with less memory.
3. images/s (median over timed repeats, compilation and warm-up excluded) and

       MFU = training FLOPs per image x images/s / (devices x peak FLOP/s),
       training FLOPs per image = 6 x forward multiply-adds = 3 x forward FLOPs,

   the forward multiply-adds being `diffusax.models.dit.dit_flops` (the paper's "Gflops",
   118.6 G for XL/2 at 256x256: 237 GFLOPs forward, 712 GFLOPs per trained image). The backward
   pass costs twice the forward; recomputation under `--remat` is not counted (model FLOPs,
   not hardware FLOPs). MFU is given against the measured peak and the vendor's spec peak.

Data is synthetic (unit-variance latents and random labels generated on the devices), so the
input pipeline is not measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time

# A benchmark owns the GPU: let XLA's allocator take 90% of it instead of its default 75%.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")

import harness  # the standard library only: no torch on the GPU machine
import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
# The model, loss, optimizer and EMA (DiT's recipe: its loss is ADM's mse + vb, vb in bits/dim)
# and the data's shapes (32x32x4 latents of 256x256 images, 1000 ImageNet labels).
EXPERIMENT = os.path.join(ROOT, "experiments", "dit_xl2.py")
NUM_BATCHES = 2  # distinct synthetic batches, cycled
TARGET_MFU = 0.5

# Dense bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s (without sparsity).
# Matched in order against jax's device_kind; --spec-tflops overrides.
SPEC_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
    ("B200", 2250.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)

FULL = dict(
    variant="XL/2", batch=256, steps=10, repeats=3, warmup=3, matmul_sizes=(4096, 8192, 16384)
)
DRY_RUN = dict(variant="S/8", batch=2, steps=2, repeats=1, warmup=1, matmul_sizes=(128, 256))
# Largest micro-batch tried first (images per device per forward/backward pass); halved until
# XLA's memory analysis of the compiled step fits FIT_FRACTION of the device's memory.
MICRO_BATCH = 128
MICRO_BATCH_REMAT = 256
FIT_FRACTION = 0.92


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny sizes (S/8, batch 2, small matmuls) to check the script runs, e.g. on CPU; "
        "records nothing unless --out is given",
    )
    p.add_argument("--variant", help=f"DiT variant (default {FULL['variant']})")
    p.add_argument(
        "--depth",
        type=int,
        default=None,
        help="override the variant's number of blocks (a shallower model for quick checks)",
    )
    p.add_argument(
        "--batch", type=int, help=f"global batch over all devices (default {FULL['batch']})"
    )
    p.add_argument(
        "--micro-batch",
        type=int,
        default=0,
        help="images per device per forward/backward pass; gradients are accumulated over "
        "per-device batch / micro-batch passes (default: the per-device batch capped at "
        f"{MICRO_BATCH}, or {MICRO_BATCH_REMAT} with --remat)",
    )
    p.add_argument("--remat", action="store_true", help="rematerialise each block (less memory)")
    p.add_argument(
        "--no-fused-attention",
        action="store_true",
        help="XLA attention instead of cuDNN flash attention",
    )
    p.add_argument("--float32", action="store_true", help="float32 compute instead of bf16")
    p.add_argument(
        "--scan",
        action="store_true",
        help="run the blocks as one lax.scan (compiles one block; ~30%% slower on an H200, "
        "whose stacked activations cost copies) instead of unrolled",
    )
    p.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="after timing, trace 2 steps with jax.profiler into DIR (Perfetto JSON) and "
        "print the device time per kernel group",
    )
    p.add_argument("--steps", type=int, help="train steps per timed repeat (default 10)")
    p.add_argument("--repeats", type=int, help="timed repeats (default 3)")
    p.add_argument("--warmup", type=int, help="untimed steps after compilation (default 3)")
    p.add_argument(
        "--matmul-sizes",
        type=int,
        nargs="+",
        help="square matmul sizes for the peak (default 4096 8192 16384)",
    )
    p.add_argument(
        "--spec-tflops",
        type=float,
        default=None,
        help="the chip's dense bf16 spec peak, TFLOP/s (default: from the device name)",
    )
    p.add_argument(
        "--tag",
        default="",
        help="recorded as dit_gpu_<chip>_TAG.json, so that an earlier run's JSON is kept",
    )
    p.add_argument(
        "--out",
        default=None,
        help="directory for the JSON and RESULTS_DIT_GPU.md (default benchmarks/results; a "
        "--dry-run writes nothing unless --out is given)",
    )
    args = p.parse_args(argv)
    defaults = DRY_RUN if args.dry_run else FULL
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("batch", "steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.depth is not None and args.depth < 1:
        p.error("--depth must be >= 1")
    if args.warmup < 0 or args.micro_batch < 0:
        p.error("--warmup and --micro-batch must be >= 0")
    if any(n < 1 for n in args.matmul_sizes):
        p.error("--matmul-sizes must be positive")
    return args


# ---------------------------------------------------------------------------------------------
# Pure arithmetic


def train_flops_per_image(forward_macs: float) -> float:
    """FLOPs of one trained image: forward 2·MACs, backward 2 x forward, so 6 x MACs."""
    return 6.0 * forward_macs


def mfu(images_per_s: float, flops_per_image: float, devices: int, peak_flops: float) -> float:
    """Model FLOPs utilisation: flops_per_image x images/s / (devices x peak FLOP/s)."""
    return flops_per_image * images_per_s / (devices * peak_flops)


def accumulation_steps(per_device_batch: int, micro_batch: int) -> int:
    """Number of micro-batches a device's rows are split into; raises unless it divides."""
    if micro_batch < 1 or per_device_batch % micro_batch:
        raise ValueError(
            f"--micro-batch={micro_batch} must divide the per-device batch {per_device_batch}"
        )
    return per_device_batch // micro_batch


def spec_peak_tflops(device_kind: str) -> float | None:
    """The vendor's dense bf16 peak for a jax device_kind, or None for an unknown chip."""
    for name, tflops in SPEC_BF16_TFLOPS:
        if name.lower() in device_kind.lower():
            return tflops
    return None


# ---------------------------------------------------------------------------------------------
# The chip's matmul peak


def measure_matmul_peak(sizes, device, seconds_per_size: float = 1.0) -> dict:
    """Best TFLOP/s of n x n x n bf16 matmuls on one device (2n³ FLOPs each).

    Two forms per size: float32 accumulation and output (`preferred_element_type`), and bf16
    output (float32 accumulation inside the kernel, as the model's layers). Each is timed over
    enough back-to-back calls to last about `seconds_per_size`, three times; the best counts.
    """
    forms = {
        "f32_out": jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)),
        "bf16_out": jax.jit(lambda a, b: jnp.dot(a, b)),
    }
    results = []
    for n in sizes:
        key_a, key_b = jax.random.split(jax.random.key(n))
        a = jax.device_put(jax.random.normal(key_a, (n, n), jnp.bfloat16), device)
        b = jax.device_put(jax.random.normal(key_b, (n, n), jnp.bfloat16), device)
        for form, fn in forms.items():
            fn(a, b).block_until_ready()  # compile and warm up
            t0 = time.perf_counter()
            fn(a, b).block_until_ready()
            one = max(time.perf_counter() - t0, 1e-6)
            calls = max(2, min(1000, int(seconds_per_size / 3 / one)))
            best = math.inf
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(calls):  # queued back to back; each output freed when replaced
                    out = fn(a, b)
                out.block_until_ready()  # one stream: the last done means all done
                best = min(best, time.perf_counter() - t0)
            del out
            results.append(
                {"n": n, "form": form, "calls": calls, "tflops": 2 * n**3 * calls / best / 1e12}
            )
        del a, b
    best = max(results, key=lambda r: r["tflops"])
    return {"peak_tflops": best["tflops"], "best": best, "all": results}


# ---------------------------------------------------------------------------------------------
# The train step


def micro_batch_candidates(per_device: int, requested: int, remat: bool) -> list[int]:
    """Micro-batches to try, largest first: the one asked for, or divisors of the per-device
    batch from the largest under the cap down, halving (compiled until one fits in memory)."""
    if requested:
        accumulation_steps(per_device, requested)  # raises unless it divides
        return [requested]
    out, cap = [], min(per_device, MICRO_BATCH_REMAT if remat else MICRO_BATCH)
    while cap >= 1:
        size = max(d for d in range(1, cap + 1) if per_device % d == 0)
        if size not in out:
            out.append(size)
        cap = size // 2
    return out


def experiment_config(args, *, fused_attention: bool, accum: int = 1):
    """`experiments/dit_xl2.py` with this run's variant, batch, precision and block layout, and
    `accum` micro-batches per device (`train.grad_accum_steps`); its data is not read (the
    batches are synthetic), only its declared shapes (32x32x4 latents, 1000 classes)."""
    from diffusax import config as config_lib

    return config_lib.load_experiment(
        EXPERIMENT,
        overrides={
            "model.variant": args.variant,
            "model.depth": args.depth or 0,  # 0: the variant's
            "model.scan_blocks": args.scan,
            "model.remat": args.remat,
            "model.fused_attention": fused_attention,
            "model.dtype": "float32" if args.float32 else "bfloat16",
            "train.batch_size": args.batch,
            "train.grad_accum_steps": accum,
        },
    )


class Trainer:
    """The run `diffusax.train.build.build` makes of the experiment: its train state born
    replicated on the data-parallel mesh over ``devices``, and its step compiled."""

    def __init__(self, args, devices, *, fused_attention: bool):
        from diffusax import parallel

        self.args, self.devices = args, list(devices)
        self.per_device = args.batch // len(self.devices)
        # cuDNN attention is used only on GPU (`dit._attention_implementation`).
        self.fused_attention = fused_attention and jax.default_backend() == "gpu"
        self._fused = fused_attention
        first = micro_batch_candidates(self.per_device, args.micro_batch, args.remat)[0]
        self.run = self._build(accumulation_steps(self.per_device, first))
        self.mesh = self.run.mesh
        self.num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(self.run.abstract.params))
        t0 = time.perf_counter()
        self.state = jax.block_until_ready(self.run.init_state())
        self.init_s = time.perf_counter() - t0
        self.batch_sharding = parallel.batch_sharding(self.mesh)
        shape, classes = self.run.data.image_shape, self.run.data.num_classes
        self.batches = [
            self._synthetic_batch(i, (args.batch, *shape), classes, self.batch_sharding)
            for i in range(NUM_BATCHES)
        ]
        self.step = None
        self.micro_batch = self.accum = None
        self.compile_s = 0.0  # all compilations, the ones that did not fit included
        self.attempts = []
        self.metrics = None
        self.steps_run = 0

    def _build(self, accum: int):
        from diffusax.train.build import build

        cfg = experiment_config(self.args, fused_attention=self._fused, accum=accum)
        return build(cfg, devices=self.devices, require_data=False)

    def compile(self, micro_batch: int) -> dict | None:
        """Compile the step for this micro-batch; returns its memory analysis (or None).

        Another micro-batch is another run (`train.grad_accum_steps`) of the same state."""
        accum = accumulation_steps(self.per_device, micro_batch)
        if accum != self.run.cfg.train.grad_accum_steps:
            self.run = self._build(accum)
        self.step = None  # free the previous executable first
        self.step, seconds = harness.compile_step(self.run, self.state, self.batches[0])
        self.compile_s += seconds
        self.micro_batch, self.accum = micro_batch, accum
        analysis = self.memory_analysis()
        self.attempts.append({"micro_batch": micro_batch, "compile_s": seconds, **(analysis or {})})
        return analysis

    @staticmethod
    def _synthetic_batch(index: int, shape: tuple, classes: int, sharding) -> dict:
        """Unit-variance latents (B, 32, 32, 4) and labels (B,), generated sharded."""

        def make(key):
            k_image, k_label = jax.random.split(key)
            return {
                "image": jax.random.normal(k_image, shape, jnp.float32),
                "label": jax.random.randint(k_label, shape[:1], 0, classes, jnp.int32),
            }

        return jax.jit(make, out_shardings=sharding)(jax.random.key(1000 + index))

    def train(self, steps: int):
        frozen = self.run.frozen()
        for _ in range(steps):
            batch = self.batches[self.steps_run % len(self.batches)]
            self.state, self.metrics = self.step(self.state, frozen, batch)
            self.steps_run += 1
        jax.block_until_ready((self.state, self.metrics))

    def memory_analysis(self) -> dict | None:
        return harness.memory_analysis(self.step, "gb")


class DoesNotFit(RuntimeError):
    """No candidate micro-batch's step fits in the device memory."""


def compile_to_fit(trainer: Trainer, args, limit_gb: float | None) -> dict | None:
    """Compile with the largest candidate micro-batch whose step fits the device memory.

    XLA's memory analysis of the compiled step (arguments + outputs - aliases + temporaries)
    must stay under FIT_FRACTION of the allocator's limit; without a limit (CPU) the first
    candidate is taken. Raises when none fits.
    """
    candidates = micro_batch_candidates(trainer.per_device, args.micro_batch, args.remat)
    for micro_batch in candidates:
        analysis = trainer.compile(micro_batch)
        live = analysis["live_gb"] if analysis else None
        print(
            f"compiled micro-batch {micro_batch} x {trainer.accum} in "
            f"{trainer.attempts[-1]['compile_s']:.1f} s: XLA live memory "
            + (f"{live:.1f} GiB" if live is not None else "unknown")
            + (f" of {limit_gb:.1f}" if limit_gb else ""),
            flush=True,
        )
        if live is None or not limit_gb or live <= FIT_FRACTION * limit_gb:
            return analysis
    raise DoesNotFit(
        f"the step needs {live:.1f} GiB per device at micro-batch {candidates[-1]} but "
        f"{limit_gb:.1f} GiB are available: lower --micro-batch or add --remat"
    )


def build_trainer(args, devices, limit_gb) -> tuple[Trainer, dict | None, str | None]:
    """(trainer compiled to fit, its memory analysis, the error that forced XLA attention).

    Any failure to build or compile with cuDNN attention is retried once with XLA's attention
    (a genuine bug fails again there); the first error is printed and recorded.
    """
    fused, error = not args.no_fused_attention, None
    if fused:
        trainer = None
        try:
            trainer = Trainer(args, devices, fused_attention=True)
            return trainer, compile_to_fit(trainer, args, limit_gb), None
        except DoesNotFit:
            raise
        except Exception as err:  # cuDNN attention unsupported here: XLA's, with the error
            error = f"{type(err).__name__}: {str(err)[:2000]}"
        trainer = None  # free its train state before building the next
        gc.collect()
        print(f"warning: with cuDNN attention: {error[:300]}; retrying with XLA attention")
    trainer = Trainer(args, devices, fused_attention=False)
    return trainer, compile_to_fit(trainer, args, limit_gb), error


def xla_forward_flops(variant: str, depth: int | None, shape, classes) -> float | None:
    """XLA's count of one forward's FLOPs (unrolled float32 model, lowered, not compiled)."""
    from flax import nnx

    from diffusax import models
    from diffusax.models.dit import DiT

    try:
        abstract = nnx.eval_shape(
            lambda: DiT(variant=variant, depth=depth, scan_blocks=False, rngs=nnx.Rngs(0))
        )  # a while loop would be counted once, so the blocks are unrolled here
        graphdef = nnx.split(abstract)[0]
        return models.forward_flops(graphdef, abstract, tuple(shape), classes)
    except Exception:  # a diagnostic only
        return None


def device_peak_memory_gb(devices) -> float | None:
    peaks = []
    for d in devices:
        try:
            stats = d.memory_stats() or {}
        except (AttributeError, NotImplementedError, RuntimeError):
            stats = {}
        if "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"] / 2**30)
    return max(peaks) if peaks else None


def device_memory_limit_gb(device) -> float | None:
    try:
        stats = device.memory_stats() or {}
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    return stats["bytes_limit"] / 2**30 if "bytes_limit" in stats else None


# ---------------------------------------------------------------------------------------------
# Where the device time goes

# Kernel-name fragments, first match wins: matrix products, attention, the rest.
KERNEL_GROUPS = (
    ("attention", ("cudnn", "flash", "fmha", "sdpa", "attention")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma", "dot")),
    ("triton", ("triton",)),
    ("copy / transpose", ("copy", "transpose", "memcpy", "memset", "dynamic_update_slice")),
)


def kernel_group(name: str) -> str:
    lowered = name.lower()
    for group, fragments in KERNEL_GROUPS:
        if any(f in lowered for f in fragments):
            return group
    return "other fusions"


def summarize_trace(events: list[dict], steps: int) -> dict:
    """Device time per kernel and per group from Chrome/Perfetto trace events.

    Kernel events are the complete ('X') events on the GPU process's stream threads (one per
    launch); on a backend without them (CPU) every event of a device process counts.
    """
    process, thread = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            process[e["pid"]] = str(e.get("args", {}).get("name", ""))
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            thread[(e["pid"], e.get("tid"))] = str(e.get("args", {}).get("name", ""))
    devices = {pid for pid, name in process.items() if "gpu" in name.lower()}
    complete = [e for e in events if e.get("ph") == "X" and e.get("pid") in devices]
    kernels = [e for e in complete if "stream" in thread.get((e["pid"], e.get("tid")), "").lower()]
    if not devices:  # CPU: XLA's own threads (not Python's)
        kernels = [
            e
            for e in events
            if e.get("ph") == "X" and "xla" in thread.get((e.get("pid"), e.get("tid")), "").lower()
        ]
    kernels = kernels or complete
    per_name: dict[str, float] = {}
    for e in kernels:
        per_name[e["name"]] = per_name.get(e["name"], 0.0) + float(e.get("dur", 0.0)) / 1e3
    total = sum(per_name.values())
    groups: dict[str, float] = {}
    for name, ms in per_name.items():
        groups[kernel_group(name)] = groups.get(kernel_group(name), 0.0) + ms
    top = sorted(per_name.items(), key=lambda kv: -kv[1])[:40]
    return {
        "steps": steps,
        "kernel_ms_per_step": total / steps,
        "groups_ms_per_step": {g: ms / steps for g, ms in sorted(groups.items())},
        "top_kernels_ms_per_step": [(name[:160], ms / steps) for name, ms in top],
        "launches_per_step": len(kernels) / steps,
    }


def profile_steps(trainer, log_dir: str, steps: int) -> dict | None:
    """Trace `steps` train steps into log_dir and summarize the device time (None if no trace)."""
    import glob
    import gzip

    t0 = time.perf_counter()
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        trainer.train(steps)
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    paths = sorted(glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True))
    if not paths:
        print(f"profile: no trace file under {log_dir}")
        return None
    with gzip.open(paths[-1], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    summary = {"trace": paths[-1], "wall_ms_per_step": wall_ms, **summarize_trace(events, steps)}
    print(
        f"profile: {summary['kernel_ms_per_step']:.1f} ms of kernels per step "
        f"({summary['launches_per_step']:.0f} launches), {wall_ms:.1f} ms wall per traced step"
    )
    for group, ms in summary["groups_ms_per_step"].items():
        print(f"  {group:>18}: {ms:8.1f} ms")
    for name, ms in summary["top_kernels_ms_per_step"][:30]:
        print(f"  {ms:8.2f} ms  {name[:110]}")
    return summary


# ---------------------------------------------------------------------------------------------
# The run


def run(args) -> dict:
    from diffusax.diffusion import LEARNED_VAR_TYPES
    from diffusax.models.dit import dit_flops, resolve_variant

    t_start = time.perf_counter()
    devices = jax.local_devices()
    kind = devices[0].device_kind
    print(f"{len(devices)} x {kind} ({jax.default_backend()}), jax {jax.__version__}", flush=True)

    peak = measure_matmul_peak(args.matmul_sizes, devices[0])
    print(
        f"bf16 matmul peak: {peak['peak_tflops']:.1f} TFLOP/s (n={peak['best']['n']}, "
        f"{peak['best']['form']})",
        flush=True,
    )
    spec = args.spec_tflops or spec_peak_tflops(kind)

    limit = device_memory_limit_gb(devices[0])
    trainer, analysis, fused_error = build_trainer(args, devices, limit)
    print(
        f"DiT-{args.variant}: {trainer.num_params / 1e6:.1f}M parameters; init "
        f"{trainer.init_s:.1f} s, compile {trainer.compile_s:.1f} s; batch {args.batch} = "
        f"{len(devices)} devices x {trainer.accum} micro-batches x {trainer.micro_batch}",
        flush=True,
    )

    warmup_s = harness.elapsed(lambda: trainer.train(args.warmup))
    seconds = [harness.elapsed(lambda: trainer.train(args.steps)) for _ in range(args.repeats)]
    loss = float(trainer.metrics["loss"])
    profile = profile_steps(trainer, args.profile, steps=2) if args.profile else None
    if not math.isfinite(loss):
        raise RuntimeError(f"training produced a non-finite loss ({loss})")
    step_s = statistics.median(seconds) / args.steps
    images_per_s = args.batch / step_s

    data, d, o = trainer.run.data, trainer.run.cfg.diffusion, trainer.run.cfg.optim
    sizes = resolve_variant(args.variant, depth=args.depth)
    learned = d.var_type in LEARNED_VAR_TYPES
    macs = dit_flops(sizes, data.image_shape[0], data.image_shape[2], learn_sigma=learned)
    per_image = train_flops_per_image(macs)
    xla_flops = xla_forward_flops(args.variant, args.depth, data.image_shape, data.num_classes)
    depth_note = f" (depth {args.depth})" if args.depth else ""
    measured_mfu = mfu(images_per_s, per_image, len(devices), peak["peak_tflops"] * 1e12)
    spec_mfu = mfu(images_per_s, per_image, len(devices), spec * 1e12) if spec else None
    return {
        "benchmark": f"DiT-{args.variant}{depth_note} training throughput and MFU",
        "date": harness.utc_now(),
        "dry_run": args.dry_run,
        "wall_s": time.perf_counter() - t_start,
        "machine": {
            "backend": jax.default_backend(),
            "device_kind": kind,
            "devices": len(devices),
            "processes": jax.process_count(),
            "platform": platform.platform(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        },
        "versions": harness.versions("jax", "jaxlib", "flax"),
        "setup": {
            "variant": args.variant,
            "depth": sizes["depth"],
            "global_batch": args.batch,
            "per_device_batch": trainer.per_device,
            "micro_batch": trainer.micro_batch,
            "accumulation_steps": trainer.accum,
            "micro_batch_attempts": trainer.attempts,
            "compute_dtype": "float32" if args.float32 else "bfloat16",
            "param_dtype": "float32",
            "scan_blocks": args.scan,
            "remat": args.remat,
            "fused_attention": trainer.fused_attention,
            "fused_attention_error": fused_error,
            "experiment": "experiments/dit_xl2.py, built without its data (its declared shapes)",
            "loss": f"hybrid: MSE on ε + {d.vlb_weight:g} L_vlb ({d.var_type.replace('_', ' ')}), "
            f"{100 * d.label_drop_prob:.0f}% null labels",
            "optimizer": f"AdamW lr {o.learning_rate:.0e}, ".replace("e-0", "e-")
            + (f"weight decay {o.weight_decay:g}" if o.weight_decay else "no weight decay")
            + f", EMA {o.ema_decay:g}, "
            + (f"clip {o.grad_clip:g}" if o.grad_clip else "no clipping"),
            "data": "synthetic N(0, 1) latents and random labels, generated on the devices",
            "steps_per_repeat": args.steps,
            "repeats": args.repeats,
            "warmup_steps": args.warmup,
        },
        "params": trainer.num_params,
        "matmul_peak": peak,
        "spec_peak_tflops": spec,
        "init_s": trainer.init_s,
        "compile_s": trainer.compile_s,
        "warmup_s": warmup_s,
        "seconds_repeats": seconds,
        "step_s": step_s,
        "images_per_s": images_per_s,
        "images_per_s_per_device": images_per_s / len(devices),
        "last_loss": loss,
        "flops": {
            "forward_macs_per_image": macs,
            "forward_flops_per_image": 2 * macs,
            "train_flops_per_image": per_image,
            "xla_forward_flops_per_image": xla_flops,
            "model_tflops_per_s": per_image * images_per_s / 1e12,
        },
        "profile": profile,
        "mfu_measured_peak": measured_mfu,
        "mfu_spec_peak": spec_mfu,
        "target_mfu": TARGET_MFU,
        "memory": {
            "xla_memory_analysis": analysis,
            "device_limit_gb": limit,
            "device_peak_gb": device_peak_memory_gb(devices),
        },
    }


# ---------------------------------------------------------------------------------------------
# Recording

RESULTS_HEADER = """# DiT benchmark results (GPU)

Rows are appended by `benchmarks/gpu_dit_mfu.py` (full runs only); each run's details are in
`dit_gpu_<chip>.json`. MFU = 6 x forward multiply-adds per image x images/s / (devices x peak),
against the bf16 matmul peak measured in the same run and against the vendor's spec peak.
Target: 50% on an H100.

| date (UTC) | chip | devices | variant | batch (micro x accum) | blocks | remat | XLA flags | images/s | step s | peak TFLOP/s measured / spec | MFU measured | MFU spec | device peak GiB | compile s |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def results_row(r: dict) -> str:
    s, m = r["setup"], r["memory"]
    spec = r["spec_peak_tflops"]
    cells = [
        r["date"][:16].replace("T", " "),
        r["machine"]["device_kind"],
        str(r["machine"]["devices"]),
        s["variant"],
        f"{s['global_batch']} ({s['micro_batch']} x {s['accumulation_steps']})",
        "scan" if s["scan_blocks"] else "unrolled",
        "yes" if s["remat"] else "no",
        r["machine"]["xla_flags"] or "-",
        f"{r['images_per_s']:.1f}",
        f"{r['step_s']:.3f}",
        f"{r['matmul_peak']['peak_tflops']:.0f} / {spec:.0f}" if spec else "?",
        f"**{100 * r['mfu_measured_peak']:.1f}%**",
        f"{100 * r['mfu_spec_peak']:.1f}%" if r["mfu_spec_peak"] is not None else "?",
        f"{m['device_peak_gb']:.1f}" if m["device_peak_gb"] is not None else "?",
        f"{r['compile_s']:.0f}",
    ]
    return "| " + " | ".join(cells) + " |\n"


def write_results(result: dict, out_dir: str, tag: str = "") -> tuple[str, str]:
    """dit_gpu_<chip>.json (dit_gpu_<chip>_TAG.json with a tag), replaced atomically, and one
    appended row of RESULTS_DIT_GPU.md."""
    chip = re.sub(r"[^a-z0-9]+", "_", result["machine"]["device_kind"].lower()).strip("_")
    name = f"dit_gpu_{chip or 'unknown'}" + (f"_{tag}.json" if tag else ".json")
    row = results_row(result)
    return harness.save_results(result, out_dir, name, "RESULTS_DIT_GPU.md", RESULTS_HEADER, row)


def print_summary(r: dict) -> None:
    s, f = r["setup"], r["flops"]
    print()
    print(f"{r['benchmark']}{'  (DRY RUN: not a measurement)' if r['dry_run'] else ''}")
    print(
        f"{r['machine']['devices']} x {r['machine']['device_kind']}; batch {s['global_batch']} "
        f"({s['micro_batch']} per pass x {s['accumulation_steps']} accumulated per device), "
        f"{s['compute_dtype']} compute, remat {s['remat']}, cuDNN attention "
        f"{s['fused_attention']}"
    )
    print(
        f"images/s {r['images_per_s']:.1f} ({r['images_per_s_per_device']:.1f} per device), "
        f"step {1e3 * r['step_s']:.1f} ms, loss {r['last_loss']:.4f}"
    )
    print(
        f"training FLOPs per image {f['train_flops_per_image'] / 1e9:.1f} G (6 x "
        f"{f['forward_macs_per_image'] / 1e9:.2f} G forward multiply-adds); model "
        f"{f['model_tflops_per_s']:.1f} TFLOP/s"
    )
    spec = r["spec_peak_tflops"]
    print(
        f"MFU {100 * r['mfu_measured_peak']:.1f}% of the measured bf16 peak "
        f"({r['matmul_peak']['peak_tflops']:.1f} TFLOP/s per device)"
        + (f", {100 * r['mfu_spec_peak']:.1f}% of the spec peak ({spec:.0f})" if spec else "")
        + f"; target {100 * TARGET_MFU:.0f}%"
    )
    m = r["memory"]
    if m["device_peak_gb"] is not None:
        print(f"device peak memory {m['device_peak_gb']:.1f} GiB of {m['device_limit_gb']:.1f}")
    print(f"compile {r['compile_s']:.1f} s; whole run {r['wall_s']:.0f} s")


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, os.path.join(ROOT, "src"))  # runs from a checkout without installing
    result = run(args)
    print_summary(result)
    out = args.out or (None if args.dry_run else RESULTS_DIR)
    if out:
        for path in write_results(result, out, args.tag):
            print(f"wrote {os.path.relpath(path, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
