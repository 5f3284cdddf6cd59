"""Scale switches of the DiT: with `model.scan_blocks=True` the XL/2 train step compiles quickly
because its 28 blocks are one `lax.scan`, and `make info` counts a scanned model's blocks all
the same.

The compile test lowers and compiles the real train step of `experiments/dit_xl2.py`
(value_and_grad of the hybrid loss, AdamW, EMA; bf16 compute) with its blocks scanned, for
32x32x4 latents and 1000 classes, from abstract shapes only: no 675M parameters are allocated.
The experiment itself trains with unrolled blocks (faster steps on GPUs, see its docstring),
whose compilation takes about 2 minutes of CPU time on 2 cores: too long for the suite.
"""

import os
import re
import time

import jax
import jax.numpy as jnp
import pytest

from diffusax import models
from diffusax.config import load_experiment
from diffusax.models.dit import dit_flops
from diffusax.train.build import build

# experiments/dit_xl2.py: 256x256 images as 32x32x4 latents, 1000 classes.
LATENT_SHAPE, NUM_CLASSES, BATCH = (32, 32, 4), 1000, 2


def test_dit_xl2_train_step_compiles_in_under_a_minute():
    # bf16 compute, AdamW, learned Σ; the compile-once switch on
    # The seed is a constant of the program: a fresh one makes sure that nothing comes from the
    # session's persistent compilation cache, and the huge threshold that nothing goes into it.
    nonce = int.from_bytes(os.urandom(4), "little") >> 1
    cfg = load_experiment("dit_xl2", overrides={"model.scan_blocks": True, "seed": nonce})
    run = build(cfg, require_data=False)  # the shapes dit_xl2 declares; no shards needed
    assert run.data.image_shape == LATENT_SHAPE and run.data.num_classes == NUM_CLASSES
    abstract = run.abstract  # shapes only
    n_params = sum(x.size for x in jax.tree.leaves(abstract.params))
    assert abs(n_params - 675.1e6) < 0.5e6  # DiT-XL/2 (Table 4: 675M)
    step = run.step_fn
    batch = {
        "image": jax.ShapeDtypeStruct((BATCH, *LATENT_SHAPE), jnp.float32),
        "label": jax.ShapeDtypeStruct((BATCH,), jnp.int32),
    }
    threshold = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        compiled = jax.jit(step, donate_argnums=0).lower(abstract, {}, batch).compile()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", threshold)
    print(f"DiT-XL/2 train step: lowered and compiled in {wall:.1f} s wall, {cpu:.1f} s CPU")
    # The CPU time is this process's own work; the wall time also counts whatever else the
    # machine runs (on a quiet 2-core machine the two agree, about 5 s).
    assert cpu < 60, f"compiling the DiT-XL/2 train step took {cpu:.1f} s of CPU time"
    out_state, _ = compiled.out_info
    assert out_state.params["model"]["blocks"]["mlp"]["fc1"]["kernel"].shape == (28, 1152, 4608)


@pytest.mark.parametrize("scan", [True, False])
def test_info_counts_every_block_of_a_scanned_dit(scan):
    """XLA's cost analysis counts a loop body once; `make info` must count all the blocks."""
    from diffusax.main import describe_run

    cfg = load_experiment("dit_s2_digits", overrides={"model.scan_blocks": scan})
    out = describe_run(cfg)
    gmacs = float(re.search(r"^forward GMACs: ([\d.]+)", out, re.M).group(1))
    sizes = dict(
        depth=cfg.model.depth, hidden=cfg.model.hidden_size, heads=cfg.model.heads, patch=2
    )
    expected = dit_flops(sizes, 8, 1, learn_sigma=False) / 1e9  # matrix multiply-adds only
    assert expected <= gmacs < 1.05 * expected  # plus norms, softmax, activations


def test_forward_flops_falls_back_to_the_compiled_cost_analysis(monkeypatch):
    """Backends whose lowered program has no cost analysis (seen on a GPU machine with jax
    0.11) get the compiled program's; with neither, `make info` says unknown."""
    from flax import nnx

    from diffusax.models.dit import DiT

    def build():
        return DiT(
            depth=1,
            hidden=32,
            heads=2,
            patch=2,
            input_size=8,
            in_channels=1,
            num_classes=10,
            rngs=nnx.Rngs(0),
        )

    abstract = nnx.eval_shape(build)
    graphdef = nnx.split(abstract)[0]
    args = (graphdef, abstract, (8, 8, 1), 10)
    expected = models.forward_flops(*args)
    assert expected > 0
    monkeypatch.setattr(jax.stages.Lowered, "cost_analysis", lambda self: None)
    assert models.forward_flops(*args) == pytest.approx(expected, rel=0.05)
    monkeypatch.setattr(jax.stages.Compiled, "cost_analysis", lambda self: [{}])
    assert models.forward_flops(*args) is None
