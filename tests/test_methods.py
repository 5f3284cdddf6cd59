"""The general method machinery: registry, trainable groups (whole networks and LoRA subsets),
frozen trees beside the state, several updates per step, the non-finite policy over the whole
state, and checkpoints that keep frozen trees out and refuse the old layout.

A toy method registered here has three networks on the 8x8 digits: a trainable "student"
regressing a frozen "teacher", and an "adapted" LoRA layer whose adapters alone train (its
base is frozen), with its own optimizer and a second update.
"""

import hashlib
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from diffusax import checkpoint, methods
from diffusax.config import ConfigError, load_experiment
from diffusax.methods import Ema, GradUpdate, Group, Network
from diffusax.train import loop
from diffusax.train.build import build
from diffusax.train.optim import EmaState
from diffusax.train.state import split_params

TEACHER_SEED = {"value": 7}  # changed by a test to give the teacher other weights
LOADS = {"teacher": 0}  # how often the frozen teacher was read


def linear(key):
    return nnx.Linear(64, 10, rngs=nnx.Rngs(params=key))


def adapted(key):
    base = nnx.Linear(64, 10, rngs=nnx.Rngs(params=jax.random.fold_in(key, 1)))
    return nnx.LoRA(64, 2, 10, base_module=base, rngs=nnx.Rngs(params=key))


def load_teacher():
    LOADS["teacher"] += 1
    return split_params(linear(jax.random.key(TEACHER_SEED["value"])))[1]


class Toy(methods.Method):
    name = "toy_frozen_lora"

    def networks(self, cfg, data):
        return {
            "student": Network(build=linear),
            "teacher": Network(
                build=linear, trainable=False, source="test:teacher", load=load_teacher
            ),
            "adapted": Network(build=adapted),
        }

    def groups(self, cfg):
        return {
            "student": Group("student"),
            "adapter": Group("adapted", optim="optim", subset=nnx.LoRAParam),
        }

    def emas(self, cfg):
        return {"ema": Ema("student", 0.9)}

    def updates(self, cfg, ctx):
        def flat(batch):
            return batch["image"].reshape(batch["image"].shape[0], -1)  # (B, 64)

        def distill(params, frozen, batch, key):
            x = flat(batch)
            student = ctx.module("student", ctx.network_params("student", params, frozen))
            teacher = ctx.module("teacher", frozen["teacher"])
            loss = jnp.mean((student(x) - teacher(x)) ** 2)
            return loss, {"loss": loss}

        def classify(params, frozen, batch, key):
            model = ctx.module("adapted", ctx.network_params("adapted", params, frozen))
            logits = model(flat(batch))
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
            return loss, {"loss": loss}

        return [GradUpdate("student", distill), GradUpdate("adapter", classify, "adapter/")]

    def sample_params(self, state, frozen, cfg):
        return state.ema["ema"]

    def sample_network(self, cfg):
        return "student"


methods.register(Toy())

SMALL = {
    "runlocal": True,
    "method": "toy_frozen_lora",
    "train.num_steps": 4,
    "train.checkpoint_every": 2,
    "train.grid_samples": 0,
    "train.progress": False,
    "train.async_checkpoint": False,
    "optim.warmup_steps": 0,
    "optim.learning_rate": 1e-2,
}


def toy_cfg(**overrides):
    return load_experiment("ddpm_digits", overrides={**SMALL, **overrides})


def host_leaves(tree):
    return [np.asarray(jax.device_get(x)) for x in jax.tree.leaves(tree)]


def files_digest(root) -> dict:
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("toy") / "run"
    cfg = toy_cfg()
    fresh = build(cfg)  # the frozen trees as a fresh build loads them
    before = host_leaves(fresh.frozen())
    result = loop.train(cfg, str(workdir))
    return cfg, workdir, result, before


def test_registry_finds_methods_and_names_unknown_ones():
    assert methods.get("ddpm").name == "ddpm"
    assert "ddpm" in methods.names() and "toy_frozen_lora" in methods.names()
    with pytest.raises(ConfigError, match=r"'method' is 'ddmp'.*did you mean 'ddpm'"):
        methods.get("ddmp")
    with pytest.raises(ConfigError, match=r"config field 'method' is 'nope'"):
        load_experiment("ddpm_digits", overrides={"method": "nope"})


def test_a_subset_group_has_gradients_moments_and_emas_for_its_leaves_only():
    run = build(toy_cfg())
    adapter = run.abstract.params["adapter"]
    assert sorted(adapter) == ["lora_a", "lora_b"]  # 2 of the network's 4 arrays
    assert len(jax.tree.leaves(adapter)) == 2
    adam = run.abstract.opt_state["adapter"][1][0]  # clip, then ScaleByAdamState
    assert len(jax.tree.leaves(adam.mu)) == len(jax.tree.leaves(adam.nu)) == 2
    assert set(run.abstract.ema) == {"ema"}  # the student's only
    assert sorted(run.frozen()["adapted"]["base_module"]) == ["bias", "kernel"]
    # The gradient the step takes for the group: exactly the subset's leaves.
    update = run.method.updates(run.cfg, run.ctx)[1]
    state, frozen = run.init_state(), run.frozen()
    batch = {"image": jnp.ones((8, 8, 8, 1)), "label": jnp.arange(8) % 10}
    grads = jax.grad(lambda g: update.loss({**state.params, "adapter": g}, frozen, batch, None)[0])(
        state.params["adapter"]
    )
    assert len(jax.tree.leaves(grads)) == 2
    assert float(jnp.abs(grads["lora_b"]).sum()) > 0  # B = 0 at init: dL/dB is not zero


def test_frozen_trees_never_change_and_are_not_donated(toy_run):
    _cfg, _, result, before = toy_run
    frozen = result.run.frozen()
    assert all(not x.is_deleted() for x in jax.tree.leaves(frozen))  # not donated
    after = host_leaves(frozen)
    assert len(after) == len(before) == 4  # teacher kernel, bias; adapted base kernel, bias
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)
    # The trainable parts moved, in both updates.
    init = result.run.init_params(result.run.init_key)
    assert not np.allclose(init["student"]["kernel"], result.state.params["student"]["kernel"])
    assert not np.allclose(init["adapter"]["lora_b"], result.state.params["adapter"]["lora_b"])
    assert sorted(result.losses) == [0, 1, 2, 3]


def test_frozen_trees_are_absent_from_the_checkpoint(toy_run):
    _, workdir, result, _ = toy_run
    ckpt_dir = workdir / "checkpoints"
    with checkpoint.Checkpointer(ckpt_dir, save_every=1, keep=10, async_save=False) as ckpt:
        step = ckpt.latest_step()
        saved = ckpt._manager.metadata(step).item_metadata[checkpoint.STATE_ITEM]
        tree = getattr(saved, "tree", saved)
    names = [checkpoint.param_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert step == 4 and names
    assert not [n for n in names if "teacher" in n or "base_module" in n]
    assert sorted(tree["params"]) == ["adapter", "student"]
    record = loop._saved_extra(ckpt, step)["frozen"]
    assert sorted(record) == ["adapted", "teacher"]
    assert record["teacher"]["source"] == "test:teacher"
    assert record == result.run.frozen_record()


def test_later_updates_log_under_their_prefix(toy_run):
    _cfg, _, result, _ = toy_run
    run = result.run
    loader = run.loader(0)
    try:
        _, metrics = run.train_step(run.init_state(), run.frozen(), next(loader))
    finally:
        loader.close()
    assert {"loss", "grad_norm", "adapter/loss", "adapter/grad_norm", "finite"} <= set(metrics)


def test_skip_keeps_every_group_optimizer_state_and_ema(toy_run):
    _cfg, _, _, _ = toy_run
    run = build(toy_cfg(**{"train.nonfinite": "skip"}))
    state = run.init_state()
    before = host_leaves(state)
    batch = {
        "image": jnp.full((16, 8, 8, 1), jnp.nan),
        "label": jnp.zeros((16,), jnp.int32),
    }
    new, metrics = jax.jit(run.step_fn)(state, run.frozen(), batch)
    assert not bool(metrics["finite"]) and int(new.bad_steps) == 1 and int(new.step) == 1
    after = host_leaves(new._replace(step=state.step, bad_steps=state.bad_steps))
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


def test_resume_against_other_frozen_weights_stops_naming_them(toy_run, tmp_path):
    _cfg, workdir, _, _ = toy_run
    copy = tmp_path / "copy"
    os.system(f"cp -r {workdir} {copy}")
    on_disk = files_digest(copy / "checkpoints")
    more = toy_cfg(**{"train.num_steps": 6})
    TEACHER_SEED["value"] = 8
    try:
        with pytest.raises(checkpoint.CheckpointMismatchError, match=r"frozen weights \(teacher"):
            loop.train(more, str(copy))
    finally:
        TEACHER_SEED["value"] = 7
    assert files_digest(copy / "checkpoints") == on_disk  # nothing written
    loads = LOADS["teacher"]
    result = loop.train(more, str(copy))  # the same teacher resumes
    assert result.start_step == 4 and sorted(result.losses) == [4, 5]
    assert LOADS["teacher"] == loads + 1  # read once per run


class OldTrainState(NamedTuple):
    """The state layout before methods had several networks (one tree, ``ema.params``)."""

    step: jax.Array
    params: dict
    opt_state: object
    ema: EmaState
    bad_steps: jax.Array


def test_a_checkpoint_of_the_old_layout_is_refused_and_kept(tmp_path):
    cfg = load_experiment(
        "ddpm_digits",
        overrides={"runlocal": True, "train.num_steps": 4, "train.progress": False},
    )
    run = build(cfg)
    params = jax.jit(run.init_params)(run.init_key)["model"]
    old = OldTrainState(
        jnp.asarray(2, jnp.int32),
        params,
        run.optimizers["model"].init(params),
        EmaState(params),
        jnp.zeros((), jnp.int32),
    )
    ckpt_dir = tmp_path / "run" / "checkpoints"
    with checkpoint.Checkpointer(ckpt_dir, save_every=1, keep=3, async_save=False) as ckpt:
        ckpt.save(2, old, {"data": {"step": 2}, "model_config": {}}, force=True)
    on_disk = files_digest(ckpt_dir)
    with pytest.raises(checkpoint.CheckpointMismatchError, match="predates the new state layout"):
        loop.train(cfg, str(tmp_path / "run"))
    assert files_digest(ckpt_dir) == on_disk  # never overwritten, no new run over it
    assert isinstance(checkpoint.CheckpointMismatchError("x"), ValueError)  # main: exit 2
