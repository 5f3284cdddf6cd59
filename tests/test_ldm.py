"""Latent diffusion (method "ldm") through the one loop, on a real frozen autoencoder run.

A tiny autoencoder (`autoencoder_digits` at its 16x16, three 8-channel levels: 4x4x4
latents) is trained once per module into a tmp dir, and `ldm.vae = "run:<that dir>"` points
the LDM configs (`ldm_digits_text`, `ldm_digits`, shrunk by `runlocal` and smaller still) at
its real Orbax checkpoint. Checked: 8 devices equal one, a bitwise resume, the frozen
autoencoder recorded in the checkpoint and a resume against another refused, bad conditions
stopping before step 0 naming the field, guidance at scales 1 and 0, the measured dropout
rate of the null condition, and `make sample` with prompts and with a label.

Run time on 2 shared CPU cores: 3 min with JAX's persistent compilation cache warm
(tests/conftest.py), 5.5 min cold; about half of it is building runs (nnx traces the
networks' construction several times per build) and Orbax saves on 8 fake devices.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusax import checkpoint, conditions, inference, losses, sampling, schedules
from diffusax.conditions import Condition, encode_prompts
from diffusax.config import ConfigError, load_experiment
from diffusax.models.conditioned import ConditionedUNet
from diffusax.models.layers import drop_labels
from diffusax.train import loop
from diffusax.train.build import digest

REPO = Path(__file__).resolve().parents[1]

QUIET = {
    "train.async_checkpoint": False,
    "train.progress": False,
    "train.grid_samples": 0,
    "train.log_every": 1,
}

# The frozen autoencoder: the digits upsampled to 16x16 (autoencoder_digits' image_size, so
# that samples come out at the autoencoder's size, not the data's 8x8) -> 4x4x4 latents (two
# downsamplings), GroupNorm(4) of 8 channels,
# a one-layer 8-channel PatchGAN (on from step 2, runlocal's disc_start), a constant learning
# rate after the warmup (a run continued for a step compiles nothing new).
AE = {
    "runlocal": True,
    "optim.schedule": "constant",
    "autoencoder.image_size": 16,
    "autoencoder.block_out_channels": (8, 8, 8),
    "autoencoder.norm_num_groups": 4,
    "autoencoder.disc_channels": 8,
    "autoencoder.disc_norm_groups": 4,
    "train.num_steps": 2,
    "train.batch_size": 8,
    "train.checkpoint_every": 2,
    **QUIET,
}

# The denoiser on the 4x4x4 latents: one 8-channel level, cross-attention in the middle block
# only (the U-Net's construction and compilation dominate these tests), a one-layer 16-wide
# text encoder. A constant learning rate after the warmup, so a run of k steps is the prefix
# of a run of n (the programs do not depend on num_steps).
LDM = {
    "runlocal": True,
    "model.ch": 8,
    "model.ch_mult": (1,),
    "model.num_res_blocks": 1,
    "model.attn_resolutions": (),
    "model.num_heads": 1,
    "text.width": 16,
    "text.layers": 1,
    "text.heads": 2,
    "condition.class_dim": 16,
    "diffusion.num_timesteps": 50,
    "optim.schedule": "constant",
    "optim.warmup_steps": 2,
    "train.batch_size": 16,
    "train.num_steps": 4,
    "train.checkpoint_every": 2,
    "sample.num_steps": 3,
    "sample.num_samples": 6,
    "sample.batch_size": 8,
    **QUIET,
}


def ae_cfg(**changes):
    return load_experiment("autoencoder_digits", overrides={**AE, **changes})


def ldm_cfg(experiment: str, vae_dir, **changes):
    """``experiment`` (ldm_digits_text or ldm_digits) on the tiny autoencoder run ``vae_dir``:
    its ``autoencoder`` section is the autoencoder run's, field for field."""
    section = {f"autoencoder.{k}": v for k, v in ae_cfg().autoencoder.items()}
    over = {**section, **LDM, "ldm.vae": f"run:{vae_dir}", **changes}
    return load_experiment(experiment, overrides=over)


def host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(host(a)), jax.tree.leaves(host(b)), strict=True):
        np.testing.assert_array_equal(x, y)


def files_digest(root) -> dict:
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------------------------------------
# Runs shared by the tests


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("ldm")


@pytest.fixture(scope="module")
def vae(root):
    """(workdir, TrainResult) of the tiny autoencoder run (one device: fewer fake devices to
    step through on 2 cores)."""
    workdir = root / "autoencoder"
    result = loop.train(ae_cfg(), str(workdir), devices=jax.devices()[:1])
    assert sorted(result.losses) == [0, 1]
    return workdir, result


@pytest.fixture(scope="module")
def text_runs(root, vae):
    """The text model for 4 steps on one device (checkpoints at 2 and 4) and on all 8 (one
    checkpoint, at 4: Orbax saves ~800 replicated arrays slice by slice, seconds each on 8
    fake devices)."""
    vae_dir, _ = vae
    cfg = ldm_cfg("ldm_digits_text", vae_dir)
    single = loop.train(cfg, str(root / "text_single"), devices=jax.devices()[:1])
    once = cfg.copy_and_resolve_references()
    once.train.checkpoint_every = 4
    sharded = loop.train(once, str(root / "text_sharded"))
    return cfg, root, single, sharded


def test_the_configs_are_the_tiny_ones(text_runs, vae):
    cfg, _, single, sharded = text_runs
    assert cfg.method == "ldm" and cfg.condition.kind == "text"
    assert cfg.autoencoder == ae_cfg().autoencoder
    assert (cfg.model.ch, cfg.text.width, cfg.text.layers, cfg.train.batch_size) == (8, 16, 1, 16)
    # The denoiser works on the autoencoder's 4x4x4 latents, the autoencoder on the 8x8
    # digits upsampled to 16x16.
    _, vae_shape, z_shape = single.run.method._shapes(cfg, single.run.data)
    assert single.run.data.image_shape == (8, 8, 1)
    assert vae_shape == (16, 16, 1) and z_shape == (4, 4, 4)
    assert single.run.mesh.size == 1 and sharded.run.mesh.size == 8


# ---------------------------------------------------------------------------------------------
# 2. Eight devices equal one


# The biases that add a per-channel constant to the U-Net's residual stream. At model.ch 8 every
# GroupNorm has one channel per group (norm_num_groups = min(32, ch)) and removes such a
# constant; the stream's other consumers are residual sums and 1x1 shortcuts, which keep it a
# constant, up to norm_out. So their gradient is exactly 0 in theory and rounding noise in
# practice, which Adam's g / (sqrt(v) + eps) turns into steps of a fraction of lr whose sign
# and size follow the noise: the two runs' values are noise, compared at noise level.
RESIDUAL_BIAS = re.compile(r"^unet\.(conv_in|.*\.conv2|.*\.shortcut|.*\.proj_out)\.bias$")


def test_text_model_on_eight_devices_equals_one(text_runs):
    """The same losses and parameters (and EMA), to float32 rounding.

    The 8-device step sums the gradient of 2 rows per device in a cross-device all-reduce, the
    1-device step of 16 rows in one reduction: the same terms added in another order, a few
    float32 ulps apart. Measured after 4 steps: the losses agree to 7e-8 relative; every leaf
    with a gradient to within 7% of rtol 1e-5 + atol 1e-6 (the atol a floor for weights near
    zero), a margin of 14x, while a real difference (another batch, key or split of the noise)
    moves the losses by percents and a weight by ~lr = 1e-3. The 9 RESIDUAL_BIAS leaves
    (values up to 6e-4, all noise) differ by up to 1e-6; they are held to 1e-5 absolute, 1% of
    one Adam step.
    """
    _, _, single, sharded = text_runs
    steps = sorted(single.losses)
    assert steps == sorted(sharded.losses) == [0, 1, 2, 3]
    np.testing.assert_allclose(
        [sharded.losses[s] for s in steps], [single.losses[s] for s in steps], rtol=1e-5, atol=1e-6
    )
    for tree in ("params", "ema"):
        a = jax.tree_util.tree_flatten_with_path(host(getattr(sharded.state, tree)))[0]
        b = jax.tree.leaves(host(getattr(single.state, tree)))
        assert len(a) == len(b) > 100
        noise = 0
        for (path, x), y in zip(a, b, strict=True):
            name = checkpoint.param_name(path).split(".", 1)[1]  # without "model." / "ema."
            if RESIDUAL_BIAS.match(name):
                noise += 1
                np.testing.assert_allclose(x, y, rtol=0, atol=1e-5, err_msg=f"{tree} {name}")
                continue
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=f"{tree} {name}")
        assert noise == 9  # conv_in, 5 resnets' conv2, 2 shortcuts, the middle's proj_out
    np.testing.assert_array_equal(host(sharded.state.step), 4)


# ---------------------------------------------------------------------------------------------
# 3. Bitwise resume through a real checkpoint


def test_text_model_resume_through_a_real_checkpoint_is_bitwise(text_runs, tmp_path):
    """4 steps straight (the one-device run) against 2, stop, and a resume to 4 in a new
    process's worth of objects (a new build, the state, data position and frozen autoencoder
    read back from disk). One device: the 8-device restore is exercised by the test below."""
    cfg, _, straight, _ = text_runs
    one = jax.devices()[:1]
    half = cfg.copy_and_resolve_references()
    half.train.num_steps = 2  # checkpoint_every 2: the checkpoint lands at the stop
    first = loop.train(half, str(tmp_path / "resumed"), devices=one)
    assert sorted(first.losses) == [0, 1]
    assert [first.losses[s] for s in (0, 1)] == [straight.losses[s] for s in (0, 1)]
    second = loop.train(cfg, str(tmp_path / "resumed"), devices=one)  # restores step 2
    assert second.start_step == 2 and sorted(second.losses) == [2, 3]
    for s in (2, 3):
        assert second.losses[s] == straight.losses[s], s
    assert_trees_equal(second.state, straight.state)  # params, Adam moments, EMA, step


def test_the_tokenizer_is_saved_with_the_run_and_another_is_refused(text_runs, tmp_path):
    """The run's tokenizer.json is the config's tokenizer; a copy of the run whose saved
    vocabulary differs (two words swapped: same size, other ids) is refused by sampling and by
    a resume, naming the file, and the refused resume leaves the run's files as they were."""
    from diffusax.data.tokenizer import Tokenizer

    cfg, root, _, _ = text_runs
    saved = Tokenizer.load(root / "text_single" / conditions.TOKENIZER_FILE)
    assert saved == conditions.tokenizer_from_config(cfg)
    run = tmp_path / "run"
    shutil.copytree(root / "text_single", run)
    vocab = list(saved.vocab)
    vocab[0], vocab[1] = vocab[1], vocab[0]
    Tokenizer(saved.kind, vocab).save(run / conditions.TOKENIZER_FILE)
    before = files_digest(run)
    with pytest.raises(ValueError, match=r"tokenizer\.json: the run was trained with"):
        inference.load_trained(cfg, str(run))
    more = cfg.copy_and_resolve_references()
    more.train.num_steps = 6
    with pytest.raises(ValueError, match=r"tokenizer\.json: the run was trained with"):
        loop.train(more, str(run), devices=jax.devices()[:1])
    assert files_digest(run) == before


# ---------------------------------------------------------------------------------------------
# 4. The frozen autoencoder: recorded, not saved, and a resume against another refused


@pytest.fixture(scope="module")
def other_vae(root, vae):
    """Another autoencoder run: a copy of the first trained one step further (other weights,
    the same architecture; the same programs, so nothing new to compile)."""
    vae_dir, _ = vae
    workdir = root / "autoencoder_other"
    shutil.copytree(vae_dir, workdir)
    more = loop.train(ae_cfg(**{"train.num_steps": 3}), str(workdir), devices=jax.devices()[:1])
    assert more.start_step == 2 and sorted(more.losses) == [2]
    return workdir


def test_frozen_autoencoder_is_recorded_not_saved_and_another_is_refused(
    text_runs, vae, other_vae, tmp_path
):
    _, root, _, sharded = text_runs
    vae_dir, vae_result = vae
    workdir = root / "text_sharded"
    with checkpoint.Checkpointer(
        workdir / "checkpoints", save_every=1, keep=10, async_save=False
    ) as ckpt:
        step = ckpt.latest_step()
        saved = ckpt._manager.metadata(step).item_metadata[checkpoint.STATE_ITEM]
        tree = getattr(saved, "tree", saved)
        extra = loop._saved_extra(ckpt, step)
    assert step == 4
    # Saved: the denoiser's parameters, Adam state and EMA; nothing of the autoencoder.
    assert sorted(tree["params"]) == ["model"] and sorted(tree["ema"]) == ["ema"]
    names = [checkpoint.param_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert names and not [n for n in names if "vae" in n or "encoder.down" in n]
    # Recorded: the source and the digest of the weights the autoencoder run trained.
    record = extra["frozen"]
    assert record == {
        "vae": {"source": f"run:{vae_dir}", "digest": digest(vae_result.state.params["vae"])}
    }
    assert record == sharded.run.frozen_record()

    # A resume against another autoencoder run stops before touching the checkpoint.
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    on_disk = files_digest(copy)
    more = ldm_cfg("ldm_digits_text", other_vae, **{"train.num_steps": 6})
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"frozen weights \(vae: ") as e:
        loop.train(more, str(copy))
    assert f"run:{vae_dir}" in str(e.value) and f"run:{other_vae}" in str(e.value)
    assert files_digest(copy) == on_disk  # nothing written


# ---------------------------------------------------------------------------------------------
# 5. Bad conditions stop before step 0, naming the field

LONG_PROMPT = " ".join(["a thick seven leaning right"] * 4)  # 20 words; the context holds 14

BAD_CONDITIONS = [
    pytest.param(
        "ldm_digits_text",
        {"sample.prompt": LONG_PROMPT},
        r"sample\.prompt.*20 tokens.*context of 16.*'text\.context_length'",
        id="prompt-longer-than-the-context",
    ),
    pytest.param(
        "ldm_digits_text",
        {"sample.prompt": "a purple seven"},
        r"sample\.prompt.*'purple'",
        id="unknown-word",
    ),
    pytest.param(
        "ldm_digits",
        {"sample.label": 12},
        r"'sample\.label' \(12\) is not a class",
        id="label-outside-the-classes",
    ),
    pytest.param(
        "ldm_digits_text",
        {"text.context_length": 6},
        r"'text\.context_length' \(6\) is too short for the digits captions",
        id="captions-longer-than-the-context",
    ),
]


@pytest.mark.parametrize(("experiment", "changes", "message"), BAD_CONDITIONS)
def test_bad_conditions_stop_before_step_zero_naming_the_field(
    experiment, changes, message, tmp_path
):
    """As `make train` loads it (load_experiment validates) and as a program hands a config to
    the loop (``train`` validates first): a ConfigError naming the field, and no workdir."""
    # No autoencoder run there: reading it would raise FileNotFoundError, not the ConfigError.
    vae_dir = tmp_path / "no_autoencoder"
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        loop.train(ldm_cfg(experiment, vae_dir, **changes), str(workdir))
    good = ldm_cfg(experiment, vae_dir)
    bad = good.copy_and_resolve_references()
    for key, value in changes.items():
        section, field = key.split(".")
        bad[section][field] = value
    with pytest.raises(ConfigError, match=message):
        loop.train(bad, str(workdir))
    assert not workdir.exists()  # no checkpoint directory, no metrics: no step ran


def test_make_sample_with_an_unknown_word_exits_2_naming_it(tmp_path):
    """`python -m diffusax.main --mode=sample` as `make sample` runs it: status 2, one line."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    workdir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "diffusax.main",
        "--config=experiments/ldm_digits_text.py",
        f"--workdir={workdir}",
        "--mode=sample",
        "--config.runlocal=True",
        f"--config.ldm.vae=run:{tmp_path / 'autoencoder'}",
        "--config.sample.prompt=3|a purple seven",
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "config error: sample.prompt[1]: prompt 'a purple seven'" in done.stderr
    assert "'purple'" in done.stderr and "Traceback" not in done.stderr
    assert not workdir.exists()


# ---------------------------------------------------------------------------------------------
# 6. Guidance at scale 1 is the conditional model, at scale 0 the unconditional one


def test_guidance_at_scale_one_and_zero_on_a_text_conditioned_unet(text_runs):
    """The text run's ConditionedUNet (``model_builder``'s), its parameters made random: the
    trained ones are 4 Adam steps from the zero-initialised output convolution, whose output
    would barely depend on the caption."""
    cfg, _, single, _ = text_runs
    run = single.run
    trained = host(single.state.params["model"])
    model = nnx.merge(run.ctx.graphdefs["model"], trained)
    assert isinstance(model, ConditionedUNet) and model.condition.kind == "text"
    cond = model.condition
    assert cond == conditions.from_config(cfg, 10)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda p: p + 0.3 * rng.normal(size=p.shape).astype(p.dtype), trained)
    apply_fn = run.ctx.apply_fn("model")

    tokens, mask = encode_prompts(cfg, ["a thick seven leaning right", "3", "the digit four", ""])
    y = {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask)}
    null = cond.null_row()
    x = jnp.asarray(rng.normal(size=(4, 4, 4, 4)), jnp.float32)
    t = jnp.asarray([0, 10, 25, 49], jnp.int32)

    @jax.jit
    def outputs(params, x, t, y):
        net = lambda x, t, y: apply_fn(params, x, t, y)
        guided = lambda s: sampling.classifier_free_guidance(net, s, null_label=null)(x, t, y)
        y_null = conditions.broadcast_null(null, y)
        # What guidance evaluates: one call on the doubled batch [x, x] with [y, ∅].
        both = net(jnp.concatenate([x, x]), jnp.concatenate([t, t]), conditions.concat(y, y_null))
        return net(x, t, y), net(x, t, y_null), both, guided(1.0), guided(0.0), guided(3.0)

    cond_out, null_out, both, g1, g0, g3 = (np.asarray(o) for o in outputs(params, x, t, y))
    assert cond_out.shape == (4, 4, 4, 4)
    # The caption matters (else the checks below would be empty): rows 0..2 differ from the
    # null caption; row 3 *is* the null caption, "".
    np.testing.assert_array_equal(tokens[3], null["tokens"])
    gap = np.abs(cond_out - null_out).reshape(4, -1).max(axis=1)
    assert (gap[:3] > 1e-2).all() and gap[3] == 0.0, gap
    # Against the doubled batch's own halves c, u: out = u + s (c - u) is u exactly at s = 0
    # (0 · (c - u) = 0) and c up to the two roundings of that sum at s = 1,
    # |fl(u + fl(c - u)) - c| <= eps (|c| + |u|).
    c, u = np.split(both, 2)
    eps = np.finfo(np.float32).eps
    np.testing.assert_array_equal(g0, u)
    assert (np.abs(g1 - c) <= eps * (np.abs(c) + np.abs(u))).all()
    # Against the network called on the batch of 4 alone: the same, plus XLA's other blocking
    # of a batch of 8 (measured: 2e-6 at most on outputs of magnitude ~1, about 20 ulps).
    np.testing.assert_allclose(g1, cond_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g0, null_out, rtol=1e-5, atol=1e-5)
    # And the scale is used: s = 3 extrapolates, u + 3 (c - u).
    np.testing.assert_allclose(g3, u + 3 * (c - u), rtol=1e-6, atol=1e-6)
    assert np.abs(g3 - c).max() > 1e-2


# ---------------------------------------------------------------------------------------------
# 7. The measured null-condition rate of the dropout is the configured one

ROWS, RATE = 20_000, 0.1
SE = np.sqrt(RATE * (1 - RATE) / ROWS)  # 0.0021: the standard error of the measured share


def _captions(rows: int, context_length: int = 16):
    """``rows`` random non-null captions (the tokenizer's ids, 1..5 words)."""
    rng = np.random.default_rng(0)
    tokens = np.zeros((rows, context_length), np.int32)
    mask = np.zeros((rows, context_length), bool)
    lengths = rng.integers(1, 6, rows)
    for i, n in enumerate(lengths):
        tokens[i, : n + 2] = [1, *rng.integers(3, 40, n), 2]
        mask[i, : n + 2] = True
    return {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask)}


def _is_null_caption(y, cond):
    null = cond.null_row()
    return np.all(np.asarray(y["tokens"]) == null["tokens"], axis=1) & np.all(
        np.asarray(y["mask"]) == null["mask"], axis=1
    )


def test_text_dropout_rate_is_the_configured_one():
    cond = Condition("text", context_length=16)
    y = _captions(ROWS)
    assert not _is_null_caption(y, cond).any()
    dropped = cond.drop(y, jax.random.key(3), RATE)
    null = _is_null_caption(dropped, cond)
    assert abs(null.mean() - RATE) < 4 * SE, null.mean()
    # The rows kept are untouched, token and mask alike.
    for k in ("tokens", "mask"):
        np.testing.assert_array_equal(np.asarray(dropped[k])[~null], np.asarray(y[k])[~null])
    assert dropped["tokens"].dtype == jnp.int32 and dropped["mask"].dtype == jnp.bool_


def test_label_dropout_rate_is_the_configured_one_and_drop_labels_bitwise():
    cond = Condition("label", num_classes=10)
    labels = jnp.asarray(np.arange(ROWS) % 10, jnp.int32)
    key = jax.random.key(4)
    dropped = np.asarray(cond.drop(labels, key, RATE))
    assert abs((dropped == 10).mean() - RATE) < 4 * SE
    # What DDPM's label path (layers.drop_labels) draws, bit for bit.
    old = np.asarray(drop_labels(labels, key, RATE, 10))
    np.testing.assert_array_equal(dropped, old)
    assert dropped.dtype == old.dtype


def test_the_loss_drops_the_condition_at_the_configured_rate():
    """Through ``make_diffusion_loss``: an x_0-predicting "network" that returns 1 on the rows
    whose condition is the null and 0 elsewhere, on x_0 = 0: each row's error is 1 or 0, so
    the loss is the share of rows the loss fed the null condition."""
    sched = schedules.schedule_from_config("linear", 50, beta_start=1e-4, beta_end=0.02)
    image = jnp.zeros((ROWS, 1, 1, 1), jnp.float32)
    text = Condition("text", context_length=16)
    label = Condition("label", num_classes=10)
    null_tokens = jnp.asarray(text.null_row()["tokens"])

    def text_net(params, x, t, y, key):
        null = jnp.all(y["tokens"] == null_tokens, axis=1)  # (B,)
        return jnp.broadcast_to(null[:, None, None, None], x.shape).astype(x.dtype)

    def label_net(params, x, t, y, key):
        return jnp.broadcast_to((y == 10)[:, None, None, None], x.shape).astype(x.dtype)

    def share(net, batch, **kw):
        loss = losses.make_diffusion_loss(net, sched, prediction="x0", label_drop_prob=RATE, **kw)
        value, metrics = jax.jit(loss)(None, batch, jax.random.key(5))
        assert float(metrics["loss"]) == float(value)
        return float(value)

    y = _captions(ROWS)
    got = share(text_net, {"image": image, **y}, condition=text)
    assert abs(got - RATE) < 4 * SE, got
    labels = jnp.asarray(np.arange(ROWS) % 10, jnp.int32)
    batch = {"image": image, "label": labels}
    got = share(label_net, batch, condition=label)
    assert abs(got - RATE) < 4 * SE, got
    # The same draw as DDPM's label path (null_label, no condition).
    assert share(label_net, batch, null_label=10) == got
    # No dropout: no row is null.
    loss = losses.make_diffusion_loss(text_net, sched, prediction="x0", condition=text)
    assert float(jax.jit(loss)(None, {"image": image, **y}, jax.random.key(5))[0]) == 0.0


# ---------------------------------------------------------------------------------------------
# 8. `make sample` with prompts, and with a label


def test_sample_to_disk_with_prompts(text_runs):
    cfg, root, _, _ = text_runs
    workdir = root / "text_single"  # trained on one device, sampled on all 8
    sample = cfg.copy_and_resolve_references()
    sample.sample.prompt = "7|the digit three"
    path = inference.sample_to_disk(sample, str(workdir))
    assert path == str(workdir / "samples" / "samples.npz")
    with np.load(path) as npz:
        assert sorted(npz.files) == ["images", "prompts"]
        images, prompts = npz["images"], npz["prompts"]
    assert images.dtype == np.uint8 and images.shape == (6, 16, 16, 1)  # the autoencoder's
    assert list(prompts) == ["7", "the digit three"] * 3
    assert (workdir / "samples" / "samples_grid.png").is_file()


@pytest.fixture(scope="module")
def label_run(root, vae):
    vae_dir, _ = vae
    cfg = ldm_cfg("ldm_digits", vae_dir, **{"train.num_steps": 1})
    workdir = root / "labels"
    result = loop.train(cfg, str(workdir), devices=jax.devices()[:1])
    assert sorted(result.losses) == [0]
    return cfg, workdir


def test_sample_to_disk_with_a_label(label_run):
    cfg, workdir = label_run
    assert cfg.condition.kind == "label"
    sample = cfg.copy_and_resolve_references()
    sample.sample.label = 3
    path = inference.sample_to_disk(sample, str(workdir))
    with np.load(path) as npz:
        assert sorted(npz.files) == ["images", "labels"]
        images, labels = npz["images"], npz["labels"]
    assert images.dtype == np.uint8 and images.shape == (6, 16, 16, 1)
    np.testing.assert_array_equal(labels, np.full(6, 3))
