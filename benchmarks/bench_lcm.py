"""Few-step students against their teacher on this CPU: images/s and quality, as a table.

    make train && make train EXP=lcm_digits [&& make train EXP=lcm_lora_digits] \
        [&& make train EXP=add_digits]
    make bench-lcm                     # records benchmarks/results/lcm_cpu.json, RESULTS_LCM.md
    make bench-lcm ARGS="--runs add_digits add_digits:add_digits_seed1"   # EXP:RUN_DIR_NAME

For each trained student run (lcm_digits, lcm_lora_digits, add_digits where present) it runs that
run's `make eval` (the method's ``evaluate``, ``diffusax.evaluate.few_step``; ADD's beside the
LCM student's own evaluation): the student at its step counts (LCM 1, 2, 4, 8; ADD 1, 2, 4) and the frozen
teacher with DDIM at the same counts and at 100 steps, each sampler compiled and run once, then
timed on a second run of the same 1000 images (steady state, compilation apart), and each scored
by the digits classifier's Fréchet distance and class agreement. The targets (1-step 5x better
than the teacher's 1-step DDIM; 2 and 4 steps near the 100-step teacher; 4 steps at least 20x the
100-step teacher's images/s; ADD: 1 step better than LCM's, 1 and 4 steps near the teacher) are
recorded with the numbers.
"""

from __future__ import annotations

import argparse
import os
import sys

import harness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
RUNS = ("lcm_digits", "lcm_lora_digits", "add_digits")
HEADER = (
    "# Few-step students on the digits (CPU)\n\n"
    "`make bench-lcm` (benchmarks/bench_lcm.py): images/s in steady state on 1000 images "
    "(compilation apart) and the Fréchet distance in the digits classifier's features on as "
    "many samples as the held-out split has (FD of held-out real digits in brackets).\n\n"
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--runs", nargs="*", default=list(RUNS), help="experiments to score (EXP or EXP:RUN_DIR)"
    )
    p.add_argument("--runs-dir", default=os.path.join(ROOT, "runs"))
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    os.chdir(ROOT)  # the experiments name their teacher as runs/ddpm_digits
    import jax

    from diffusax import methods
    from diffusax.config import load_experiment

    load = harness.LoadLog()
    load.mark("start")
    result = {
        "machine": harness.cpu_machine(),
        "versions": harness.versions("jax", "flax"),
        "devices": len(jax.devices()),
        "date": harness.utc_now(),
        "runs": {},
    }
    rows = [f"\n## {result['date']}, {result['machine']['cpu']['name']}\n"]
    for entry in args.runs:
        exp, _, run_name = entry.partition(":")
        name = run_name or exp
        workdir = os.path.join(args.runs_dir, name)
        if not os.path.isdir(os.path.join(workdir, "checkpoints")):
            print(f"skipping {name}: no run in {workdir} (make train EXP={exp})")
            continue
        cfg = load_experiment(exp)
        method = methods.get(cfg.method)
        report = method.evaluate(cfg, workdir)
        print(method.format_report(report))
        result["runs"][name] = report
        rows.append(
            f"\n### {name} (step {report['checkpoint_step']}, held-out "
            f"{report['fd_heldout_matched']:.3f})\n\n"
            "| model | sampler | steps | FD | class acc | images/s |\n|---|---|---|---|---|---|\n"
        )
        for r in report["rows"]:
            acc = "-" if r["class_accuracy"] is None else f"{100 * r['class_accuracy']:.1f}%"
            rows.append(
                f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['fd_matched']:.3f} | "
                f"{acc} | {r['images_per_second']:.0f} |\n"
            )
        rows.append(
            "\nTargets: "
            + ", ".join(f"{k}: {_fmt(v)}" for k, v in report["targets"].items())
            + "\n"
        )
    load.mark("end")
    result["load"] = load.summary()
    harness.warn_if_busy(load)
    if not result["runs"]:
        print("nothing to record: train a student first", file=sys.stderr)
        return 1
    paths = harness.save_results(
        result, args.out, "lcm_cpu.json", "RESULTS_LCM.md", HEADER, "".join(rows)
    )
    print("recorded", *paths)
    return 0


def _fmt(v):
    return f"{v:.3f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    sys.exit(main())
