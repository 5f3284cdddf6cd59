"""What the benchmarks share: machine and version records, load and interleaved timing, results.

    import harness
    load = harness.LoadLog(); load.mark("start"); harness.warn_if_busy(load)
    times = harness.interleaved({"a": run_a, "b": run_b}, repeats, lead_in={...})
    summary = {name: harness.rate_summary(t, items) for name, t in times.items()}
    harness.save_results(result, out_dir, "x.json", "RESULTS_X.md", HEADER, rows)

Only the standard library is imported here: a benchmark sets its environment (JAX_PLATFORMS,
XLA_PYTHON_CLIENT_MEM_FRACTION) before jax starts, the GPU benchmark runs where torch and
diffusers are not installed, and the DiT memory subprocesses load one framework each. The
functions that describe a framework import it when called.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import statistics
import time

# Environment variables that change threading; recorded with the results.
THREAD_ENV = (
    "XLA_FLAGS",
    "OMP_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
    "MKL_NUM_THREADS",
)
# A phase counts as quiet when other processes used under this share of the cores meanwhile.
QUIET_SHARE = 0.1


# ---------------------------------------------------------------------------------------------
# Machine and versions


def cpu_info() -> dict:
    """Model name, family/model numbers and the vector extensions, from /proc/cpuinfo."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model", "flags") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break  # the first processor is enough
    except OSError:
        pass
    flags = fields.get("flags", "").split()
    return {
        "name": fields.get("model name") or platform.processor() or "unknown",
        "family_model": f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}",
        "vector_isa": [
            f for f in flags if f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")
        ],
    }


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


def cpu_machine() -> dict:
    """The record of a CPU benchmark's machine."""
    return {
        "cpu": cpu_info(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "platform": platform.platform(),
    }


def versions(*modules: str) -> dict:
    """{"python": ..., module: its __version__ (None if absent)} for the modules named."""
    out = {"python": platform.python_version()}
    for name in modules:
        try:
            out[name] = importlib.import_module(name).__version__
        except (ImportError, AttributeError):
            out[name] = None
    return out


def cpu_threads(jax_cpu_devices: int) -> dict:
    """Threads of both frameworks on a CPU (imports torch: CPU comparisons only)."""
    import torch

    return {
        "torch": torch.get_num_threads(),
        "torch_interop": torch.get_num_interop_threads(),
        "jax": "XLA:CPU default (its intra-op pool spans the usable cores)",
        "jax_cpu_devices": jax_cpu_devices,
        "env": {k: os.environ.get(k, "") for k in THREAD_ENV},
    }


def jax_devices(count: int) -> list:
    """The first ``count`` JAX devices; raises when there are fewer."""
    import jax

    devices = jax.devices()[:count]
    if len(devices) != count:
        raise ValueError(f"asked for {count} JAX devices, {len(jax.devices())} exist")
    return devices


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Machine load


class LoadLog:
    """os.getloadavg() at named points, to state how busy the machine was."""

    def __init__(self):
        self.points = []

    def mark(self, phase: str):
        one, five, fifteen = os.getloadavg()
        self.points.append({"phase": phase, "load_1m": one, "load_5m": five, "load_15m": fifteen})

    def summary(self) -> dict:
        ones = [p["load_1m"] for p in self.points]
        return {"max_load_1m": max(ones), "median_load_1m": statistics.median(ones)}

    def record(self, others_cpu_share: dict) -> dict:
        """The results' "load": every point, the summary, the others' CPU share per phase and
        whether every phase was quiet."""
        shares = list(others_cpu_share.values())
        return {
            "points": self.points,
            **self.summary(),
            "others_cpu_share": others_cpu_share,
            "quiet": all(s is not None and s < QUIET_SHARE for s in shares),
        }


def warn_if_busy(load: LoadLog) -> None:
    """Warn when the first point's 1-minute load says other processes share the cores."""
    cores = usable_cores()
    first = load.points[0]["load_1m"]
    if first > max(1.0, cores - 0.5):
        print(
            f"warning: the 1-minute load average is {first:.1f} on {cores} cores; other "
            "processes will distort the numbers. On a shared machine PyTorch's spinning OpenMP "
            "threads slow down most (OMP_WAIT_POLICY=PASSIVE limits that).",
            flush=True,
        )


def warn_if_not_quiet(quiet: bool) -> None:
    if not quiet:
        print(
            "WARNING: other processes were using the cores while this ran; the numbers (above "
            "all PyTorch's) are distorted. Rerun on a quiet machine."
        )


def cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds used by every process, CPU seconds used by this one), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(
                int, f.readline().split()[1:9]
            )
    except (OSError, ValueError):
        return None
    own = os.times()
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return busy, own.user + own.system


def median_share(*summaries: dict) -> float | None:
    """The median others' CPU share over every repeat of the ``rate_summary``s given."""
    shares = [x for s in summaries for x in s["others_cpu_share_repeats"]]
    return statistics.median(shares) if shares else None


# ---------------------------------------------------------------------------------------------
# Timing


def timed(fn) -> tuple[float, float | None]:
    """(wall seconds of fn(), share of the cores other processes used meanwhile, in [0, 1]).

    The share is (CPU time of all processes - ours) / (wall time x cores), from /proc/stat:
    0 on a quiet machine; it measures contention directly, where the load average (a 1-minute
    mean that counts our own threads too) only hints at it.
    """
    before = cpu_seconds()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    after = cpu_seconds()
    if before is None or after is None:
        return wall, None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return wall, min(max(others / (wall * usable_cores()), 0.0), 1.0)


def elapsed(fn) -> float:
    return timed(fn)[0]


def interleaved(runs: dict, repeats: int, lead_in: dict | None = None) -> dict[str, list[tuple]]:
    """Time each of ``runs`` (name -> fn) ``repeats`` times, alternating the order (ABBA...).

    ``lead_in`` (name -> fn) runs untimed right before each timed repeat of that name: a train
    step, so that every timed step follows a step of its own framework, as in a training run.
    Without it the first step after the other framework's repeat pays for memory that the host
    reclaimed meanwhile: on the development VM a DiT-S/2 step after a 7 s pause took 3.9-4.8 s
    instead of 2.2-2.6 s (freed pages come back through fresh page faults), which made the
    repeats that follow the other framework ~30% slower than the rest.

    Returns name -> [(seconds, others' CPU share), ...] (see ``timed``).
    """
    names = list(runs)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            if lead_in:
                lead_in[name]()
            times[name].append(timed(runs[name]))
    return times


def rate_summary(repeats: list[tuple], items: int) -> dict:
    """Median rate (items per second) over timed repeats, with every repeat and its load."""
    seconds = [s for s, _ in repeats]
    others = [o for _, o in repeats if o is not None]
    rates = [items / s for s in seconds]
    return {
        "per_s_median": statistics.median(rates),
        "per_s_repeats": rates,
        "seconds_repeats": seconds,
        "items_per_repeat": items,
        "others_cpu_share_repeats": others,
        "others_cpu_share_median": statistics.median(others) if others else None,
    }


def compile_step(run, state, batch):
    """(``run.train_step`` compiled ahead of time for these arguments, seconds it took)."""
    t0 = time.perf_counter()
    compiled = run.train_step.lower(state, run.frozen(), batch).compile()
    return compiled, time.perf_counter() - t0


def memory_analysis(compiled, unit: str = "mb") -> dict | None:
    """XLA's memory_analysis of a compiled function in MB ("mb") or GiB ("gb"), keys suffixed
    with the unit; ``live`` = arguments + outputs - aliases + temporaries (donated outputs reuse
    their argument's buffer, so aliases count once). None where the backend gives none."""
    try:
        m = compiled.memory_analysis()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    if m is None:
        return None
    scale = {"mb": 2**20, "gb": 2**30}[unit]
    fields = ("argument", "output", "alias", "temp", "generated_code")
    out = {f"{f}_{unit}": getattr(m, f"{f}_size_in_bytes", 0) / scale for f in fields}
    a = lambda f: out[f"{f}_{unit}"]
    out[f"live_{unit}"] = a("argument") + a("output") - a("alias") + a("temp")
    return out


# ---------------------------------------------------------------------------------------------
# Recording


def percent(share) -> str:
    return "?" if share is None else f"{100 * share:.0f}%"


def mb(value) -> str:
    return "?" if value is None else f"{value:.0f} MB"


def save_results(result: dict, out_dir: str, json_name: str, md_name: str, header: str, rows: str):
    """``result`` as ``json_name`` (replaced atomically) and ``rows`` appended to ``md_name``
    (created with ``header``), both in ``out_dir``; returns the two paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, json_name)
    tmp = json_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    os.replace(tmp, json_path)
    md_path = os.path.join(out_dir, md_name)
    new = not os.path.exists(md_path)
    with open(md_path, "a") as f:
        if new:
            f.write(header)
        f.write(rows)
    return json_path, md_path
