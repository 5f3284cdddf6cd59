"""FSDP: parameters, optimizer moments and EMA split over the mesh's `fsdp` axis.

- `fsdp_spec` splits the largest divisible dimension of every large enough array, and nothing
  when the axis has one device;
- the real training loop on 8 fake CPU devices (mesh data=2 x fsdp=4) keeps the train state
  sharded (each device holds a quarter of each large parameter, Adam moment and EMA leaf);
- a tiny DiT trained so gives the loss curve and parameters of the same run on one device, to
  float32 tolerance;
- its checkpoint restores bitwise onto another mesh (one device, or plain data parallelism);
- `--mode=interpolate` on that run writes a strip whose ends are the ordinary class samples.
"""

import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from PIL import Image

from diffusax import checkpoint, inference, methods, parallel
from diffusax.config import load_experiment
from diffusax.train import loop
from diffusax.train.build import build

REPO = Path(__file__).resolve().parents[1]
# Compiled programs shared with the other test files and subprocesses (see test_train.py).
JAX_CACHE = os.path.join(tempfile.gettempdir(), f"diffusax-test-jax-cache-{os.getuid()}")
if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", JAX_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# A 2-block DiT of width 32 on the bundled 8x8 digits (patch 2: 16 tokens).
TINY_DIT = {
    "model.depth": 2,
    "model.hidden_size": 32,
    "model.heads": 2,
    "diffusion.num_timesteps": 50,
    "optim.schedule": "constant",
    "optim.warmup_steps": 2,
    "train.batch_size": 16,
    "train.num_steps": 5,
    "train.checkpoint_every": 5,
    "train.log_every": 1,
    "train.grid_samples": 0,
    "train.progress": False,
    "sample.num_steps": 4,
    "sample.guidance_scale": 2.0,
    "sample.interpolate_classes": (3, 8),
    "sample.interpolate_steps": 5,
}


def tiny_dit(**changes):
    overrides = dict(TINY_DIT)
    overrides.update({k.replace("__", "."): v for k, v in changes.items()})
    return load_experiment("dit_s2_digits", overrides=overrides)


# ---------------------------------------------------------------------------- the rule


def test_fsdp_spec_splits_the_largest_divisible_dimension():
    assert parallel.fsdp_spec((256, 1024), 4) == P(None, "fsdp")
    assert parallel.fsdp_spec((1024, 256), 4) == P("fsdp", None)
    assert parallel.fsdp_spec((28, 1152, 4608), 4) == P(None, None, "fsdp")
    assert parallel.fsdp_spec((64, 64), 4) == P(None, "fsdp")  # ties: the last (outputs)
    assert parallel.fsdp_spec((1026, 64), 4) == P(None, "fsdp")  # 1026 is not divisible by 4
    assert parallel.fsdp_spec((1023, 3), 4) == P()  # no divisible dimension: replicated
    assert parallel.fsdp_spec((31, 32), 4) == P()  # below min_size: replicated
    assert parallel.fsdp_spec((31, 32), 4, min_size=1) == P(None, "fsdp")
    assert parallel.fsdp_spec((), 4) == P()  # scalars
    assert parallel.fsdp_spec((4096, 4096), 1) == P()  # fsdp = 1: plain data parallelism


def test_fsdp_shardings_of_a_whole_train_state():
    cfg = tiny_dit()
    mesh = parallel.make_mesh(2, 4)
    abstract = build(cfg).abstract
    shardings = parallel.fsdp_shardings(abstract, mesh)
    qkv = shardings.params["model"]["blocks"]["attn"]["qkv"]["kernel"]  # (depth, 32, 96)
    assert qkv.spec == P(None, None, "fsdp")
    adam = shardings.opt_state["model"][1][0]  # clip_by_global_norm, then ScaleByAdamState
    assert adam.mu["blocks"]["attn"]["qkv"]["kernel"].spec == qkv.spec
    assert adam.nu["blocks"]["attn"]["qkv"]["kernel"].spec == qkv.spec
    assert adam.count.spec == P()
    assert shardings.ema["ema"]["blocks"]["attn"]["qkv"]["kernel"].spec == qkv.spec
    assert shardings.step.spec == P()
    assert shardings.params["model"]["y_embedder"]["embedding"].spec == P()  # 11 x 32 < min_size
    replicated = parallel.fsdp_shardings(abstract, parallel.make_mesh(8, 1))
    assert all(s.is_fully_replicated for s in jax.tree.leaves(replicated))
    with pytest.raises(ValueError, match="no 'fsdp' axis"):
        parallel.fsdp_shardings(abstract, jax.make_mesh((8,), ("data",)))


# ---------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp")


@pytest.fixture(scope="module")
def fsdp_run(workdirs):
    """5 steps of the tiny DiT on 8 devices: data=2 x fsdp=4, and an EMA sample grid."""
    workdir = workdirs / "fsdp"
    cfg = tiny_dit(train__mesh_data=2, train__mesh_fsdp=4, train__grid_samples=8)
    return cfg, workdir, loop.train(cfg, str(workdir))


@pytest.fixture(scope="module")
def single_run(workdirs):
    return loop.train(tiny_dit(), str(workdirs / "single"), devices=jax.devices()[:1])


def sharded_leaves(tree):
    return [x for x in jax.tree.leaves(tree) if not x.sharding.is_fully_replicated]


def test_the_train_state_is_sharded_over_fsdp(fsdp_run):
    _, workdir, result = fsdp_run
    state = result.state
    fc1 = state.params["model"]["blocks"]["mlp"]["fc1"]["kernel"]  # (2, 32, 128): 128 split in 4
    assert dict(fc1.sharding.mesh.shape) == {"data": 2, "fsdp": 4}
    assert fc1.shape == (2, 32, 128)
    assert {s.data.shape for s in fc1.addressable_shards} == {(2, 32, 32)}
    # Each device holds a quarter of every sharded leaf, in params, Adam moments and EMA alike.
    for tree in (state.params, state.opt_state, state.ema):
        leaves = sharded_leaves(tree)
        assert leaves, "nothing is sharded"
        for x in leaves:
            assert x.addressable_shards[0].data.size * 4 == x.size
    assert len(sharded_leaves(state.opt_state)) == 2 * len(sharded_leaves(state.params))
    assert len(sharded_leaves(state.ema)) == len(sharded_leaves(state.params))
    assert state.step.sharding.is_fully_replicated
    assert (workdir / "samples" / "grid.png").exists()  # sampled from the sharded EMA


def test_fsdp_and_single_device_training_agree(fsdp_run, single_run):
    _, _, sharded = fsdp_run
    assert (
        single_run.state.params["model"]["blocks"]["mlp"]["fc1"]["kernel"].sharding.mesh.size == 1
    )
    steps = sorted(sharded.losses)
    assert steps == sorted(single_run.losses) == list(range(TINY_DIT["train.num_steps"]))
    np.testing.assert_allclose(
        [single_run.losses[s] for s in steps], [sharded.losses[s] for s in steps], rtol=1e-5
    )
    for a, b in zip(
        jax.tree.leaves(single_run.state.params), jax.tree.leaves(sharded.state.params), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_a_fsdp_checkpoint_restores_bitwise_onto_other_meshes(fsdp_run):
    cfg, workdir, result = fsdp_run
    abstract = build(cfg).abstract
    for mesh in (parallel.make_mesh(1, 1, devices=jax.devices()[:1]), parallel.make_mesh(8, 1)):
        shardings = parallel.fsdp_shardings(abstract, mesh)
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
        with checkpoint.Checkpointer(
            os.path.join(workdir, "checkpoints"), save_every=1, keep=10, async_save=False
        ) as ckpt:
            restored = ckpt.restore(target)
        assert restored.step == TINY_DIT["train.num_steps"]
        for x, y in zip(
            jax.tree.leaves(restored.state), jax.tree.leaves(result.state), strict=True
        ):
            assert x.sharding.mesh.size == mesh.size and x.sharding.is_fully_replicated
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------- interpolation


def test_interpolation_ends_are_the_class_samples(fsdp_run):
    """The strip starts at class a's sample and ends at class b's, for the same noise; the
    samples in between differ from both."""
    cfg, workdir, _ = fsdp_run
    trained = inference.load_trained(cfg, str(workdir))
    # Five steps leave the adaLN layers, through which the label acts, near their zero init:
    # perturb the restored parameters so that the two classes' samples differ.
    leaves, treedef = jax.tree.flatten(trained.params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    trained = dataclasses.replace(trained, params=jax.tree.unflatten(treedef, leaves))
    key = jax.random.key(7)
    strip = inference.interpolate(trained, 3, 8, 5, key)
    assert strip.shape == (5, 8, 8, 1)
    s = cfg.sample.copy_and_resolve_references()
    s.batch_size = 1
    generate = methods.make_generate(
        cfg, trained.apply_fn, trained.sched, 10, (8, 8, 1), sample_cfg=s
    )
    for row, label in ((0, 3), (-1, 8)):
        expected = np.asarray(generate(trained.params, jnp.array([label]), key))[0]
        np.testing.assert_allclose(strip[row], expected, atol=1e-5)
    assert np.abs(strip[0] - strip[-1]).max() > 0.1  # the two classes' samples differ
    assert np.abs(strip[2] - strip[0]).max() > 1e-3  # and the strip moves between them
    assert np.abs(strip[2] - strip[-1]).max() > 1e-3
    with pytest.raises(ValueError, match="interpolate_classes"):
        inference.interpolate(trained, 3, 10, 5, key)


def test_interpolate_mode_writes_a_strip(fsdp_run):
    """`python -m diffusax.main --mode=interpolate` on one device, from the 8-device run."""
    _, workdir, _ = fsdp_run
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=JAX_CACHE)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    env.pop("XLA_FLAGS", None)
    flags = [f"--config.{k}={v}" for k, v in TINY_DIT.items()]
    cmd = [
        sys.executable,
        "-m",
        "diffusax.main",
        "--config=experiments/dit_s2_digits.py",
        f"--workdir={workdir}",
        "--mode=interpolate",
        "--cpu_devices=1",
        *flags,
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    path = workdir / "samples" / "interpolate_3_8.png"
    assert f"wrote {path}" in done.stdout
    with Image.open(path) as image:  # one row of 5 padded 8x8 images, enlarged
        width, height = image.size
    assert width / height == pytest.approx((5 * 9 + 1) / (1 * 9 + 1))
