"""The benchmarks run: the GPU MFU script end to end on the CPU (its --dry-run path, with
gradient accumulation), its FLOP count against the paper, the CPU DiT benchmark's two trainers
on a tiny DiT (weights converted from diffusers into the built run's state, outputs equal, a
memory subprocess that loads only its own framework), and the digits benchmark's built run
against its diffusers U-Net.

The timings these produce are not measurements; the scripts themselves are run by
`make bench-dit` and `make bench-dit-gpu` (see benchmarks/README.md).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from diffusax.models.dit import dit_flops, resolve_variant

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCHMARKS)

import bench_dit  # noqa: E402
import gpu_dit_mfu  # noqa: E402
import harness  # noqa: E402

# A DiT small enough to train in a test, at the benchmark's 32x32x4 latents and 1000 classes.
TINY_DIFFUSERS_CONFIG = {
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 2,
    "sample_size": 32,
    "patch_size": 8,
    "num_embeds_ada_norm": 1000,
}


def run_script(args, timeout=240):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


# ---------------------------------------------------------------- the GPU script


def test_gpu_script_dry_run_records_a_consistent_result(tmp_path):
    out = run_script(
        [
            os.path.join(BENCHMARKS, "gpu_dit_mfu.py"),
            "--dry-run",
            "--depth=2",
            "--batch=4",
            "--micro-batch=2",  # two accumulated micro-batches
            f"--out={tmp_path}",
        ]
    )
    assert "DRY RUN" in out
    (json_name,) = [p for p in os.listdir(tmp_path) if p.endswith(".json")]
    r = json.loads((tmp_path / json_name).read_text())
    s = r["setup"]
    assert (s["variant"], s["depth"], s["global_batch"]) == ("S/8", 2, 4)
    assert (s["micro_batch"], s["accumulation_steps"]) == (2, 2)
    assert [a["micro_batch"] for a in s["micro_batch_attempts"]] == [2]
    assert math.isfinite(r["last_loss"]) and r["images_per_s"] > 0
    assert r["images_per_s"] == pytest.approx(4 / r["step_s"])

    macs = dit_flops(resolve_variant("S/8", depth=2))
    f = r["flops"]
    assert f["forward_macs_per_image"] == macs
    assert f["train_flops_per_image"] == 6 * macs
    # XLA's own count of the forward (matmuls plus elementwise work) is just above 2 x MACs.
    assert 1.0 <= f["xla_forward_flops_per_image"] / (2 * macs) < 1.05

    peak = r["matmul_peak"]["peak_tflops"] * 1e12
    assert peak == max(x["tflops"] for x in r["matmul_peak"]["all"]) * 1e12
    assert r["mfu_measured_peak"] == pytest.approx(6 * macs * r["images_per_s"] / peak)
    assert r["spec_peak_tflops"] is None and r["mfu_spec_peak"] is None  # a CPU has no spec

    # The state is params + two AdamW moments + EMA, float32, donated (aliased) in place.
    mem = r["memory"]["xla_memory_analysis"]
    assert mem["argument_gb"] * 2**30 >= 4 * 4 * r["params"]
    assert mem["alias_gb"] > 0.9 * mem["argument_gb"]

    table = (tmp_path / "RESULTS_DIT_GPU.md").read_text().splitlines()
    assert (
        table[-1].startswith("| ")
        and "S/8" in table[-1]
        and len(table) == len(gpu_dit_mfu.RESULTS_HEADER.splitlines()) + 1
    )


def test_train_flops_of_dit_xl2_match_the_paper():
    # Table 4: 118.64 G forward multiply-adds; training = 3 x (2 x MACs) FLOPs per image.
    per_image = gpu_dit_mfu.train_flops_per_image(dit_flops("XL/2"))
    assert per_image == pytest.approx(6 * 118.64e9, rel=1e-3)
    # 1000 images/s on one chip of 989 TFLOP/s would be 72% MFU.
    assert gpu_dit_mfu.mfu(1000.0, per_image, 1, 989e12) == pytest.approx(0.7197, abs=1e-3)
    assert gpu_dit_mfu.spec_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_dit_mfu.spec_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_dit_mfu.spec_peak_tflops("cpu") is None
    with pytest.raises(ValueError, match="micro-batch"):
        gpu_dit_mfu.accumulation_steps(32, 24)


def test_micro_batch_candidates_divide_and_halve():
    candidates = gpu_dit_mfu.micro_batch_candidates
    assert candidates(256, 0, remat=False) == [128, 64, 32, 16, 8, 4, 2, 1]
    assert candidates(256, 0, remat=True) == [256, 128, 64, 32, 16, 8, 4, 2, 1]
    assert candidates(96, 0, remat=False) == [96, 48, 24, 12, 6, 3, 1]
    assert candidates(160, 0, remat=False) == [80, 40, 20, 10, 5, 2, 1]
    assert candidates(2, 0, remat=False) == [2, 1]
    assert candidates(256, 128, remat=False) == [128]  # asked for: no other is tried
    with pytest.raises(ValueError, match="micro-batch"):
        candidates(256, 96, remat=False)


class _SizedCompiles:
    """Stands in for the GPU Trainer's compile, whose memory needs a GPU's allocator limit to
    matter: live memory = 10 GiB of state + 0.5 GiB per image of the micro-batch."""

    per_device = 256

    def __init__(self):
        self.compiled = []
        self.accum = None
        self.attempts = []

    def compile(self, micro_batch):
        self.compiled.append(micro_batch)
        self.accum = self.per_device // micro_batch
        self.attempts.append({"compile_s": 0.0})
        return {"live_gb": 10 + 0.5 * micro_batch}


@pytest.mark.parametrize(
    "limit_gb, compiled",
    [
        (90.0, [128]),
        (50.0, [128, 64]),
        (40.0, [128, 64, 32]),
        (None, [128]),
        (5.0, [128, 64, 32, 16, 8, 4, 2, 1]),
    ],
)
def test_compile_to_fit_takes_the_largest_micro_batch_that_fits(limit_gb, compiled):
    trainer = _SizedCompiles()
    args = gpu_dit_mfu.parse_args(["--batch=256"])
    if limit_gb == 5.0:  # 10 GiB of state never fits in 92% of 5
        with pytest.raises(gpu_dit_mfu.DoesNotFit, match="--remat"):
            gpu_dit_mfu.compile_to_fit(trainer, args, limit_gb)
    else:
        analysis = gpu_dit_mfu.compile_to_fit(trainer, args, limit_gb)
        assert analysis["live_gb"] == 10 + 0.5 * compiled[-1]
    assert trainer.compiled == compiled


# ---------------------------------------------------------------- the CPU benchmark


def test_cpu_benchmark_trainers_are_the_same_model_and_train():
    batches = bench_dit.make_batches(2, 2, seed=0)
    theirs = bench_dit.TorchTrainer(TINY_DIFFUSERS_CONFIG, batches, threads=1)
    ours = bench_dit.JaxTrainer(
        TINY_DIFFUSERS_CONFIG, batches, state_dict=theirs.state_dict_numpy()
    )
    parity = bench_dit.check_parity(ours, theirs, TINY_DIFFUSERS_CONFIG["num_layers"])
    assert parity["max_abs_diff"] <= 1e-4 * parity["output_scale"]
    assert parity["params_diffusers"] > parity["params_diffusax"]  # its embedder copies
    ours.compile()
    ours.train(2)
    theirs.train(2)
    assert math.isfinite(ours.last_loss()) and math.isfinite(theirs.last_loss())
    mem = ours.memory_analysis()
    assert mem["argument_mb"] * 2**20 >= 4 * 4 * ours.num_params  # params, moments, EMA
    # A diverging copy would break the parity check: a trained torch model no longer converts.
    with pytest.raises(ValueError, match="embedder"):
        bench_dit.JaxTrainer(TINY_DIFFUSERS_CONFIG, batches, state_dict=theirs.state_dict_numpy())


def test_memory_subprocess_loads_only_its_framework():
    spec = {
        "config": TINY_DIFFUSERS_CONFIG,
        "batch": 2,
        "cpu_devices": 1,
        "scan_blocks": True,
        "torch_threads": 1,
    }
    out = run_script(
        [
            os.path.join(BENCHMARKS, "bench_dit.py"),
            "--memory-child=diffusax",
            f"--spec={json.dumps(spec)}",
        ]
    )
    (line,) = [ln for ln in out.splitlines() if ln.startswith(bench_dit.MEMORY_PREFIX)]
    r = json.loads(line[len(bench_dit.MEMORY_PREFIX) :])
    assert r["modules"] == {"jax": True, "torch": False, "diffusers": False}
    assert r["setup_peak_growth_mb"] > 0 and math.isfinite(r["last_loss"])
    if r["peak_reset_supported"]:
        assert r["step_peak_growth_mb"] >= r["rss_before_steps_growth_mb"] > 0


def test_interleaved_timing_alternates_and_leads_each_repeat_with_an_untimed_step():
    events = []
    runs = {name: (lambda name=name: events.append(("timed", name))) for name in ("A", "B")}
    lead_in = {name: (lambda name=name: events.append(("lead", name))) for name in ("A", "B")}
    times = harness.interleaved(runs, 3, lead_in=lead_in)
    order = ["A", "B", "B", "A", "A", "B"]
    assert events == [e for name in order for e in (("lead", name), ("timed", name))]
    assert {name: len(t) for name, t in times.items()} == {"A": 3, "B": 3}
    events.clear()
    harness.interleaved(runs, 2)  # without lead-in steps: only the timed runs
    assert events == [("timed", name) for name in order[:4]]


# ---------------------------------------------------------------- the digits benchmark


def test_digits_benchmark_times_the_built_run_against_the_same_unet():
    import bench_digits
    import numpy as np
    import torch

    from diffusax import config as config_lib

    cfg = config_lib.load_experiment(os.path.join(ROOT, "experiments", "ddpm_digits.py"))
    ours = bench_digits.Ours(cfg, cfg.sample, num_devices=1)
    assert ours.run.cfg is cfg and set(ours.state.params) == {"model"}  # build's run, DDPM's
    theirs = bench_digits.Theirs(cfg, ours.image_shape, ours.num_classes, 20, cfg.seed)
    theirs.load_batches(ours.load_batches(2))
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, *ours.image_shape), dtype=np.float32)
    t = np.array([0, 10, 500, 999], np.int32)
    y = np.array([0, 3, 9, ours.num_classes], np.int32)  # the last: the null label
    parity = bench_digits.check_parity(ours, theirs, x, t, y)
    assert parity["max_abs_diff"] <= 1e-4 * parity["output_scale"]
    ours.compile_train()
    ours.train(2)
    theirs.train(2)
    assert int(ours.state.step) == 2 and math.isfinite(float(ours.metrics["loss"]))
    assert math.isfinite(float(theirs.loss.item()))
