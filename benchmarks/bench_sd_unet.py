"""Stable Diffusion v1.5 U-Net: seconds per call, diffusax against diffusers, on CPU.

    .venv/bin/python benchmarks/bench_sd_unet.py              # full run, writes results/
    .venv/bin/python benchmarks/bench_sd_unet.py --quick      # smoke test, writes nothing
    .venv/bin/python benchmarks/bench_sd_unet.py --dtype bfloat16   # our compute in bf16
    JAX_PLATFORMS=cuda python benchmarks/bench_sd_unet.py --no-diffusers --batch 1 2 8 \\
        --calls 10 --peak-tflops 989                          # ours alone, where torch is missing
    make bench-sd                                             # the full run

The SD v1.x U-Net (860M parameters, 64x64x4 latents = 512x512 images, CLIP context
(B, 77, 768)) at random initialisation: no weights are needed, the time does not depend on
them. Ours is `diffusax.models.unet_cond.UNetCondition` built from the diffusers config by
`diffusax.convert.diffusers_unet_cond.unet_cond_kwargs_from_diffusers`, called as
`model(x, t, context=ctx)` (x NHWC, t int32) through `nnx.split` / a jitted `nnx.merge`,
compiled ahead of time per batch. Theirs is diffusers' `UNet2DConditionModel(**config)` in eval
mode under `torch.inference_mode`, float32, torch's default threads. Per batch (default 1: a
sampler step without guidance; 2: a guided step, the conditional and unconditional rows of one
image in one call) each is called once to warm up, then the repeats of the two alternate
(`harness.interleaved`, each timed repeat after one untimed call of its own framework unless
`--no-lead-in`) and the medians give seconds per call and the ratio diffusers / diffusax
(> 1: diffusax faster). Also recorded: our compile time, XLA's FLOPs per call
(`compiled.cost_analysis()`), MFU against `--peak-tflops`, and the device's
`memory_stats()["peak_bytes_in_use"]` (None on CPU). JAX runs on one device (JAX_PLATFORMS
defaults to cpu; a comparison with diffusers requires it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import harness  # the standard library only

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax is imported (inside functions)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")

SD_V1_PARAMS = 859_520_964  # the SD v1.5 U-Net's parameter count
# --quick: the same architecture, narrow and at 32x32 latents: a smoke test, not a measurement.
QUICK_CHANGES = {"block_out_channels": [32, 64, 64, 64], "sample_size": 32}
CONTEXT_LEN = 77
BATCHES = (1, 2)
REPEATS = 5
SEED = 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small U-Net, 1 repeat; records nothing")
    p.add_argument("--repeats", type=int, help=f"timed repeats (default {REPEATS}; --quick 1)")
    p.add_argument("--calls", type=int, default=1, help="U-Net calls per timed repeat (1)")
    p.add_argument(
        "--batch", type=int, nargs="+", default=list(BATCHES), help="batches (default: 1 2)"
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="ours")
    p.add_argument("--no-diffusers", action="store_true", help="time diffusax alone (no torch)")
    p.add_argument(
        "--lead-in",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one untimed call of the same framework before each timed repeat (default on)",
    )
    p.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s, for MFU")
    p.add_argument("--out", help="results directory (default benchmarks/results; --quick: none)")
    p.add_argument("--tag", default="", help="recorded as sd_unet_PLATFORM_TAG.json")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else REPEATS)
    if args.repeats < 1 or args.calls < 1 or min(args.batch) < 1:
        p.error("--repeats, --calls and --batch must be >= 1")
    return args


def case_name(batch: int) -> str:
    return {1: "no guidance", 2: "guidance (cond + uncond)"}.get(batch, f"batch {batch}")


def make_inputs(config: dict, batch: int, seed: int = SEED) -> dict:
    """x (B, H, W, 4) NHWC, t (B,) int32, context (B, 77, 768), float32 numpy. At batch 2 the
    two rows are one latent with two contexts, as in a guided step."""
    import numpy as np

    rng = np.random.default_rng(seed + batch)
    size, rows = config["sample_size"], 1 if batch == 2 else batch
    x = rng.standard_normal((rows, size, size, config["in_channels"]), dtype=np.float32)
    ctx = rng.standard_normal((batch, CONTEXT_LEN, config["cross_attention_dim"]))
    return {
        "x": np.repeat(x, batch // rows, axis=0),
        "t": np.full((batch,), 500, np.int32),
        "context": ctx.astype(np.float32),
    }


def _flops_of(cost) -> float | None:
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else None
    return float(cost["flops"]) if isinstance(cost, dict) and cost.get("flops") else None


def peak_bytes() -> int | None:
    """The first JAX device's peak bytes in use, where the backend reports it (not on CPU)."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    return stats.get("peak_bytes_in_use")


class Ours:
    """Our UNetCondition, random init, one jitted merge-and-call per batch, AOT-compiled."""

    def __init__(self, config: dict, dtype: str):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from diffusax.convert.diffusers_unet_cond import unet_cond_kwargs_from_diffusers
        from diffusax.models.layers import count_params
        from diffusax.models.unet_cond import UNetCondition

        self.jax, self.jnp = jax, jnp
        kwargs = unet_cond_kwargs_from_diffusers(config)
        compute = {"float32": None, "bfloat16": jnp.bfloat16}[dtype]
        model = UNetCondition(**kwargs, dtype=compute, rngs=nnx.Rngs(0))
        self.num_params = count_params(model)
        self.graphdef, self.state = nnx.split(model)
        del model

        def forward(state, x, t, context):
            return nnx.merge(self.graphdef, state)(x, t, context=context)

        self.forward = jax.jit(forward)
        self.compiled, self.inputs = {}, {}

    def compile(self, batch: int, inputs: dict) -> tuple[float, float | None]:
        """(seconds to lower and compile for this batch, XLA's FLOPs per call)."""
        self.inputs[batch] = [self.jnp.asarray(inputs[k]) for k in ("x", "t", "context")]
        t0 = time.perf_counter()
        lowered = self.forward.lower(self.state, *self.inputs[batch])
        self.compiled[batch] = compiled = lowered.compile()
        seconds = time.perf_counter() - t0
        flops = _flops_of(compiled.cost_analysis())
        return seconds, flops if flops is not None else _flops_of(lowered.cost_analysis())

    def call(self, batch: int, calls: int = 1):
        for _ in range(calls):
            out = self.compiled[batch](self.state, *self.inputs[batch])
        self.jax.block_until_ready(out)


class Theirs:
    """diffusers' UNet2DConditionModel, random init, eval mode, float32, inference mode."""

    def __init__(self, config: dict):
        import torch
        from diffusers import UNet2DConditionModel

        torch.manual_seed(SEED)
        self.torch = torch
        self.model = UNet2DConditionModel(**config).eval()
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.inputs = {}

    def prepare(self, batch: int, inputs: dict):
        torch = self.torch
        self.inputs[batch] = (
            torch.from_numpy(inputs["x"].transpose(0, 3, 1, 2).copy()),  # NHWC -> NCHW
            torch.from_numpy(inputs["t"].astype("int64")),
            torch.from_numpy(inputs["context"]),
        )

    def call(self, batch: int, calls: int = 1):
        x, t, ctx = self.inputs[batch]
        with self.torch.inference_mode():
            for _ in range(calls):
                out = self.model(x, t, encoder_hidden_states=ctx).sample
        return out


def measure(batch: int, ours: Ours, theirs: Theirs | None, args, config: dict) -> dict:
    inputs = make_inputs(config, batch)
    compile_s, flops = ours.compile(batch, inputs)
    print(f"batch {batch}: compiled in {compile_s:.1f} s", flush=True)
    runs = {"diffusax": lambda: ours.call(batch, args.calls)}
    lead = {"diffusax": lambda: ours.call(batch)}
    if theirs is not None:
        theirs.prepare(batch, inputs)
        runs["diffusers"] = lambda: theirs.call(batch, args.calls)
        lead["diffusers"] = lambda: theirs.call(batch)
    warmup = {name: harness.elapsed(fn) for name, fn in lead.items()}
    times = harness.interleaved(runs, args.repeats, lead_in=lead if args.lead_in else None)
    summary = {name: harness.rate_summary(t, args.calls) for name, t in times.items()}
    for s in summary.values():  # per_s_median: U-Net calls per second
        s["s_per_call_median"] = statistics.median(s["seconds_repeats"]) / args.calls
    ours_s = summary["diffusax"]["s_per_call_median"]
    ratio = summary["diffusers"]["s_per_call_median"] / ours_s if theirs else None
    tflops = flops / ours_s / 1e12 if flops else None
    result = {
        "batch": batch,
        "case": case_name(batch),
        "compile_s": compile_s,
        "warmup_s": warmup,
        "calls": summary,
        "ratio": ratio,
        "flops_per_call": flops,
        "tflops_per_s": tflops,
        "mfu": tflops / args.peak_tflops if tflops and args.peak_tflops else None,
        "peak_bytes_in_use": peak_bytes(),  # cumulative over the process so far
        "others_cpu_share_median": harness.median_share(*summary.values()),
    }
    line = f"batch {batch}: diffusax {ours_s:.3f} s/call"
    if ratio is not None:
        line += f", diffusers {summary['diffusers']['s_per_call_median']:.3f} s, ratio {ratio:.2f}"
    print(line, flush=True)
    return result


def run(args) -> dict:
    import jax

    from diffusax.convert.diffusers_unet_cond import SD_V1_UNET_CONFIG as SD_V1

    config = {**SD_V1, **QUICK_CHANGES} if args.quick else SD_V1
    backend = jax.default_backend()
    if not args.no_diffusers and backend != "cpu":
        raise SystemExit(f"the comparison with diffusers runs on CPU, JAX is on {backend}")
    load = harness.LoadLog()
    load.mark("start")
    harness.warn_if_busy(load)
    t_start = time.perf_counter()
    ours = Ours(config, args.dtype)
    theirs = None if args.no_diffusers else Theirs(config)
    setup_s = time.perf_counter() - t_start
    if theirs is not None and theirs.num_params != ours.num_params:
        raise RuntimeError(f"parameters: diffusax {ours.num_params}, diffusers {theirs.num_params}")
    if config is SD_V1 and ours.num_params != SD_V1_PARAMS:
        raise RuntimeError(f"{ours.num_params} parameters, not SD v1.5's {SD_V1_PARAMS}")
    print(f"{ours.num_params:,} parameters; set-up {setup_s:.0f} s", flush=True)
    cases = {}
    for batch in args.batch:
        cases[str(batch)] = measure(batch, ours, theirs, args, config)
        load.mark(f"batch {batch}")
    shares = {k: c["others_cpu_share_median"] for k, c in cases.items()}
    device = jax.devices()[0]
    return {
        "benchmark": "SD v1.5 U-Net per call: diffusax UNetCondition vs diffusers "
        "UNet2DConditionModel" + ("" if theirs else " (diffusax alone)"),
        "date": harness.utc_now(),
        "quick": args.quick,
        "wall_s": time.perf_counter() - t_start,
        "machine": {**harness.cpu_machine(), "jax_backend": backend, "device": device.device_kind},
        "versions": harness.versions("jax", "flax", "torch", "diffusers"),
        "threads": harness.cpu_threads(1) if theirs else {"jax_cpu_devices": 1},
        "load": load.record(shares),
        "setup": {
            "diffusers_config": config,
            "latents": [config["sample_size"], config["sample_size"], config["in_channels"]],
            "context": [CONTEXT_LEN, config["cross_attention_dim"]],
            "params": ours.num_params,
            "dtype_diffusax": args.dtype,
            "dtype_diffusers": "float32",
            "setup_s": setup_s,
            "repeats": args.repeats,
            "calls_per_repeat": args.calls,
            "lead_in": args.lead_in,
            "peak_tflops": args.peak_tflops,
            "statistic": "median over interleaved repeats (A B, B A, ...), after one warm-up "
            "call each; compile excluded",
        },
        "cases": cases,
    }


RESULTS_HEADER = """# Stable Diffusion v1.5 U-Net results

Rows are appended by `benchmarks/bench_sd_unet.py` (full runs only); the latest run's details
are in `sd_unet_cpu.json` (`sd_unet_gpu.json` for a `--no-diffusers` run on a GPU, whose rows
have "-" for diffusers). One row per batch: batch 1 is a sampler step without guidance, batch
2 a guided step (conditional and unconditional rows of one image in one call). 64x64x4 latents,
context (B, 77, 768), random init, 859,520,964 parameters. Seconds per U-Net call (median over
interleaved repeats); ratio = diffusers s / diffusax s (> 1: diffusax faster). diffusax dtype is
our compute dtype (diffusers is float32). "Others' CPU" is the median share of the cores other
processes used while the repeats ran: quiet (yes) under 10%. Compile: ours, seconds.

| date (UTC) | CPU | cores | JAX device | torch threads | batch | dtype | others' CPU | quiet | s/call diffusax | diffusers | ratio | GFLOP/call | compile s |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def results_rows(r: dict) -> str:
    rows = []
    for c in r["cases"].values():
        theirs = c["calls"].get("diffusers")
        cells = [
            r["date"][:16].replace("T", " "),
            r["machine"]["cpu"]["name"],
            str(r["machine"]["usable_cores"]),
            r["machine"]["device"],
            str(r["threads"].get("torch", "-")),
            str(c["batch"]),
            r["setup"]["dtype_diffusax"],
            harness.percent(c["others_cpu_share_median"]),
            "yes" if r["load"]["quiet"] else "**no**",
            f"{c['calls']['diffusax']['s_per_call_median']:.3f}",
            f"{theirs['s_per_call_median']:.3f}" if theirs else "-",
            f"**{c['ratio']:.2f}**" if c["ratio"] else "-",
            f"{c['flops_per_call'] / 1e9:.0f}" if c["flops_per_call"] else "?",
            f"{c['compile_s']:.0f}",
        ]
        rows.append("| " + " | ".join(cells) + " |\n")
    return "".join(rows)


def print_summary(r: dict) -> None:
    print()
    print(f"{r['benchmark']}{'  (QUICK: smoke test, not a measurement)' if r['quick'] else ''}")
    s, m = r["setup"], r["machine"]
    print(
        f"machine: {m['cpu']['name']}, {m['usable_cores']} usable cores, JAX {m['jax_backend']} "
        f"(1 device), torch threads {r['threads'].get('torch', '-')}; latents {s['latents']}, "
        f"{s['params']:,} parameters, diffusax {s['dtype_diffusax']}"
    )
    head = ("batch", "case", "diffusax s", "diffusers s", "ratio", "calls/s", "GFLOP", "MFU")
    print(f"{head[0]:>5s} {head[1]:26s}" + "".join(f"{h:>12s}" for h in head[2:]))
    for c in r["cases"].values():
        ours, theirs = c["calls"]["diffusax"], c["calls"].get("diffusers")
        fmt = lambda v, f: "-" if v is None else format(v, f)
        print(
            f"{c['batch']:5d} {c['case']:26s}{ours['s_per_call_median']:12.3f}"
            f"{fmt(theirs and theirs['s_per_call_median'], '.3f'):>12s}"
            f"{fmt(c['ratio'], '.2f'):>12s}{ours['per_s_median']:12.2f}"
            f"{fmt(c['flops_per_call'] and c['flops_per_call'] / 1e9, '.0f'):>12s}"
            f"{fmt(c['mfu'] and 100 * c['mfu'], '.1f'):>12s}"
        )
        peak = c["peak_bytes_in_use"]
        print(
            f"      compile {c['compile_s']:.1f} s, others' CPU "
            f"{harness.percent(c['others_cpu_share_median'])}"
            + (f", peak device memory {peak / 2**30:.2f} GiB" if peak else "")
        )
    print(f"whole run {r['wall_s']:.0f} s")
    harness.warn_if_not_quiet(r["load"]["quiet"])


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    print_summary(result)
    out = args.out or (None if args.quick else RESULTS_DIR)
    if out:
        name = f"sd_unet_{result['machine']['jax_backend']}"
        name += f"_{args.tag}.json" if args.tag else ".json"
        rows = results_rows(result)
        for path in harness.save_results(result, out, name, "RESULTS_SD.md", RESULTS_HEADER, rows):
            print(f"wrote {os.path.relpath(path, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
