"""Check that a ddpm_digits run is bitwise the same before and after a change of the code.

    python benchmarks/ddpm_bitwise.py --before 99b5fde [--steps 50]

Checks out ``--before`` (a git revision) into a temporary worktree, runs ``ddpm_digits`` for
``--steps`` steps with the code of that revision and with the working tree's, each in its own
process with the device split `diffusax.main` uses (one JAX CPU device per core), and compares
every loss and every parameter and EMA array byte for byte. Records
benchmarks/results/ddpm_bitwise_<before>.json. The state layouts differ (one tree and
``ema.params`` before the method redesign, groups and EMAs by name after), so each run saves
the DDPM network's parameters and EMA as flat arrays by their path inside the network.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run inside each checkout (its src/ first on sys.path); argv: output .npz, workdir, steps,
# the checkout (whose diffusax must be the one imported).
RECORD = r"""
import sys
import numpy as np
out, workdir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
from diffusax import parallel
parallel.use_cpu_cores(128, 0)  # ddpm_digits' batch over one device per core, as diffusax.main
import jax
import diffusax
from diffusax import config as config_lib
from diffusax.train import loop
import os
checkout = os.path.realpath(sys.argv[4])
assert os.path.realpath(diffusax.__file__).startswith(checkout), diffusax.__file__
cfg = config_lib.load_experiment("ddpm_digits", overrides={
    "train.num_steps": steps, "train.grid_samples": 0, "train.progress": False})
res = loop.train(cfg, workdir)
st = jax.device_get(res.state)
grouped = isinstance(st.ema, dict)  # after the redesign: {group: tree}, {ema name: tree}
params = st.params["model"] if grouped else st.params
ema = st.ema["ema"] if grouped else st.ema.params
flat = lambda tree, prefix: {
    prefix + jax.tree_util.keystr(p): np.asarray(x)
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
arrays = {**flat(params, "params"), **flat(ema, "ema")}
arrays["losses"] = np.array([res.losses[k] for k in sorted(res.losses)], np.float32)
np.savez(out, **arrays)
print(jax.device_count(), "devices")
"""


def record(checkout: str, out: str, workdir: str, steps: int) -> str:
    env = dict(os.environ, PYTHONPATH=os.path.join(checkout, "src") + os.pathsep + checkout)
    done = subprocess.run(
        [sys.executable, "-c", RECORD, out, workdir, str(steps), checkout],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise SystemExit(f"run in {checkout} failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="git revision of the code before")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = os.path.join(tmp, "before")
        subprocess.run(
            ["git", "worktree", "add", "--detach", old, args.before], cwd=ROOT, check=True
        )
        try:
            devices = record(old, os.path.join(tmp, "a.npz"), os.path.join(tmp, "wa"), args.steps)
            record(ROOT, os.path.join(tmp, "b.npz"), os.path.join(tmp, "wb"), args.steps)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", old], cwd=ROOT, check=False)
        a, b = np.load(os.path.join(tmp, "a.npz")), np.load(os.path.join(tmp, "b.npz"))
        same_names = sorted(a.files) == sorted(b.files)
        differing = [k for k in a.files if k not in b.files or a[k].tobytes() != b[k].tobytes()]
        result = {
            "before": args.before,
            "after": subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
            ).stdout.strip()
            + " + working tree",
            "steps": args.steps,
            "devices": devices,
            "arrays_compared": len(a.files),
            "same_array_names": same_names,
            "differing_arrays": differing,
            "bitwise_equal": same_names and not differing,
            "last_loss": float(b["losses"][-1]),
        }
    path = os.path.join(ROOT, "benchmarks", "results", f"ddpm_bitwise_{args.before}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0 if result["bitwise_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
