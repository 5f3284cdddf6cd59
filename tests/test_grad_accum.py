"""Gradient accumulation (`train.grad_accum_steps`): the same optimizer step from micro-batches.

On a loss without randomness the accumulated step equals the whole-batch step to float32
rounding; the micro-batch layout does not depend on the mesh, so the real loop gives the same
loss curve on 8 devices and on one; a count that does not divide each device's rows is refused
before anything is compiled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_train import tiny

from diffusax import parallel
from diffusax.config import ConfigError
from diffusax.methods import Ema, GradUpdate
from diffusax.train import loop
from diffusax.train.optim import ema_init
from diffusax.train.state import TrainState
from diffusax.train.step import make_train_step, split_micro_batches


def linear_problem():
    """A least-squares loss whose gradient depends on every row, and its parameters."""

    def loss_fn(params, batch, key):
        del key  # deterministic, so that split and whole batches see the same function
        pred = batch["image"].reshape(batch["image"].shape[0], -1) @ params["w"]  # (B, 1)
        loss = jnp.mean((pred[:, 0] - batch["label"]) ** 2)
        return loss, {"loss": loss, "mean_label": jnp.mean(batch["label"])}

    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.standard_normal((16, 2, 2, 3), dtype=np.float32)),
        "label": jnp.asarray(rng.standard_normal(16, dtype=np.float32)),
    }
    params = {"w": jnp.asarray(rng.standard_normal((12, 1), dtype=np.float32))}
    return loss_fn, batch, params


def test_accumulated_step_equals_the_whole_batch_step():
    loss_fn, batch, params = linear_problem()
    optimizer = optax.adamw(1e-2, weight_decay=0.0)
    mesh = parallel.make_mesh()  # the 8 fake CPU devices: 2 rows each
    repl, rows = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    batch = jax.device_put(batch, rows)
    state = TrainState(
        jnp.zeros((), jnp.int32),
        {"w": params},
        {"w": optimizer.init(params)},
        {"ema": ema_init(params).params},
        jnp.zeros(()),
    )
    shardings = jax.tree.map(lambda _: repl, state)
    update = GradUpdate("w", lambda p, frozen, batch, key: loss_fn(p["w"], batch, key))

    def one_step(accum):
        step = make_train_step(
            [update],
            {"w": optimizer},
            {"ema": Ema("w", 0.9)},
            seed=0,
            skip_nonfinite=False,
            accum_steps=accum,
            mesh=mesh,
        )
        step = jax.jit(step, in_shardings=(shardings, repl, rows), out_shardings=(shardings, repl))
        return step(jax.device_put(state, shardings), {}, batch)

    whole, whole_metrics = one_step(1)
    split, split_metrics = one_step(2)
    assert int(split.step) == 1
    for name in ("loss", "mean_label", "grad_norm"):  # metrics: the mean over micro-batches
        np.testing.assert_allclose(split_metrics[name], whole_metrics[name], rtol=1e-5)
    split_w, whole_w = split.params["w"], whole.params["w"]  # the group "w"
    np.testing.assert_allclose(split_w["w"], whole_w["w"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(split.ema["ema"]["w"], whole.ema["ema"]["w"], rtol=1e-6)
    assert not np.allclose(split_w["w"], params["w"])  # the step did move the weights


def test_micro_batches_take_every_nth_row_and_stay_on_their_devices():
    mesh = parallel.make_mesh()  # 8 devices
    x = jax.device_put(jnp.arange(32.0), parallel.batch_sharding(mesh))  # 4 rows per device
    micro = jax.jit(lambda b: split_micro_batches(b, 2, mesh))(x)
    np.testing.assert_array_equal(micro, np.arange(32.0).reshape(16, 2).T)  # rows k, k+2, ...
    for shard in micro.addressable_shards:  # device d holds rows 4d..4d+3 before and after
        d = mesh.devices.flat[:].tolist().index(shard.device)
        np.testing.assert_array_equal(
            np.sort(np.asarray(shard.data).ravel()), np.arange(4 * d, 4 * d + 4)
        )


def test_loop_with_accumulation_gives_the_same_curve_on_8_devices_and_on_one(tmp_path):
    cfg = tiny(train__grad_accum_steps=2, train__num_steps=3, train__checkpoint_every=3)
    sharded = loop.train(cfg, str(tmp_path / "sharded"))
    single = loop.train(cfg, str(tmp_path / "single"), devices=jax.devices()[:1])
    assert sorted(sharded.losses) == sorted(single.losses) == [0, 1, 2]
    np.testing.assert_allclose(
        [single.losses[s] for s in range(3)], [sharded.losses[s] for s in range(3)], rtol=1e-5
    )
    assert all(np.isfinite(sharded.losses[s]) for s in range(3))


def test_accumulation_that_does_not_divide_the_rows_is_refused(tmp_path):
    cfg = tiny(train__grad_accum_steps=4)  # 16 rows over 8 devices: 2 each
    with pytest.raises(ConfigError, match=r"'train\.grad_accum_steps' \(4\).*2 rows"):
        loop.train(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        tiny(train__grad_accum_steps=0)
