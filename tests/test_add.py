"""Method "add" (adversarial diffusion distillation): its maths against direct computations,
R1 against finite differences, which update moves what, frozen networks that stay frozen,
8 devices against 1, bad configs, and a tiny run that trains, evaluates and samples.

The teacher is a real run of this project (a few steps of the tiny DDPM), read from its Orbax
checkpoint like any user's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from drills import helpers as dh
from flax import nnx

from diffusax import diffusion, methods, sampling
from diffusax.config import ConfigError, load_experiment
from diffusax.methods import add, ddpm, lcm
from diffusax.models.add_discriminator import FeatureHeads
from diffusax.train import loop
from diffusax.train.build import build, digest
from diffusax.train.step import make_train_step

ADD_EXP = dh.REPO / "experiments" / "add_digits.py"
TINY = {k: v for k, v in dh.TINY.items() if not k.startswith("train.progress")}
STUDENT = dict(
    TINY,
    **dh.FEW_STEP_EVAL,
    **{
        "train.num_steps": 4,
        "train.checkpoint_every": 4,
        "add.head_width": 8,
        "add.head_norm_groups": 4,
        "add.r1_gamma": 1.0,
        "add.compare_lcm": "",
        "disc_optim.warmup_steps": 4,
        "disc_optim.schedule": "constant",
    },
)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny class-conditional DDPM trained for 4 steps (the teacher of every test here)."""
    workdir = tmp_path_factory.mktemp("add") / "teacher"
    loop.train(
        dh.config(dict(TINY, **{"train.num_steps": 4, "train.checkpoint_every": 4})), str(workdir)
    )
    return workdir


def student_cfg(teacher_dir, **changes):
    over = dict(STUDENT, **{"add.teacher": f"run:{teacher_dir}"})
    over.update({k.replace("__", "."): v for k, v in changes.items()})
    return load_experiment(str(ADD_EXP), overrides=over)


batch_of = dh.labelled_batch


# --- the maths --------------------------------------------------------------------------------


def test_student_and_sampling_timesteps():
    np.testing.assert_array_equal(add.student_timesteps(1000, 4), [249, 499, 749, 999])
    assert add.sample_timesteps(1000, 4, 1).tolist() == [999]
    assert add.sample_timesteps(1000, 4, 2).tolist() == [499, 999]
    assert add.sample_timesteps(1000, 4, 4).tolist() == [249, 499, 749, 999]
    with pytest.raises(ValueError):
        add.sample_timesteps(1000, 4, 5)


def test_zero_terminal_snr_rescale():
    """Lin et al.'s rescale: √ᾱ' is affine in √ᾱ, keeps the first value, ends at exactly 0."""
    abar = np.asarray(ddpm.make_schedule(load_experiment("ddpm_digits")).alphas_cumprod, np.float64)
    new = add.rescale_zero_terminal_snr(abar)
    assert new[-1] == 0.0 and new[0] == pytest.approx(abar[0], rel=1e-12)
    a, b = np.sqrt(abar), np.sqrt(new)
    slope = (b[0] - b[-1]) / (a[0] - a[-1])
    np.testing.assert_allclose(b, b[-1] + slope * (a - a[-1]), atol=1e-12)
    assert np.all(np.diff(new) <= 0)  # still decreasing
    sched = add.teacher_schedule(
        load_experiment("ddpm_digits", overrides={"add.zero_terminal_snr": True})
    )
    np.testing.assert_allclose(np.asarray(sched.alphas_cumprod), new, atol=1e-6)


def test_distillation_weights():
    abar = jnp.array([0.9, 0.5, 0.01])
    np.testing.assert_allclose(add.distill_weight("exponential", abar), abar)
    np.testing.assert_allclose(
        add.distill_weight("sds", abar), np.sqrt(abar * (1 - abar)), rtol=1e-6
    )
    np.testing.assert_array_equal(add.distill_weight("uniform", abar), 1.0)


def test_r1_equals_finite_differences():
    """γ/2 E‖∇_φ D(φ)‖² of ``r1_penalty`` against central differences of the heads' score in
    every feature element (float32, small features)."""
    heads = FeatureHeads((3, 4), width=4, num_classes=10, norm_groups=2, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(heads)
    k1, k2 = jax.random.split(jax.random.key(1))
    feats = [jax.random.normal(k1, (2, 4, 4, 3)), jax.random.normal(k2, (2, 2, 2, 4))]
    y = jnp.array([3, 7])
    score = lambda f: add.disc_score(nnx.merge(graphdef, params)(f, y))
    gamma = 0.3
    got = float(add.r1_penalty(score, feats, gamma))

    flat, unravel = jax.flatten_util.ravel_pytree(feats)
    h = 1e-2
    eye = jnp.eye(flat.size)
    f_of = jax.jit(jax.vmap(lambda v: score(unravel(v))))
    plus, minus = f_of(flat + h * eye), f_of(flat - h * eye)  # (n, B)
    grad = (plus - minus) / (2 * h)  # (n, B): ∂D_b/∂φ_i (only the example's own φ counts)
    want = 0.5 * gamma * float(np.mean(np.sum(np.asarray(grad) ** 2, axis=0)))
    assert got > 0
    np.testing.assert_allclose(got, want, rtol=2e-3)


def test_renoise_sampler_step():
    """The "add" sampler: x̂_0, then √ᾱ_prev x̂_0 + √(1-ᾱ_prev) z; x̂_0 itself at the last step."""
    sched = sampling.respace(
        ddpm.make_schedule(load_experiment("ddpm_digits")), np.array([499, 999])
    )
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    x0 = jnp.tanh(jax.random.normal(jax.random.key(1), x.shape))
    z = jax.random.normal(jax.random.key(2), x.shape)
    x_prev, got_x0 = sampling.renoise_step(sched, x0, x, 1, z, prediction="x0")
    a = float(sched.alphas_cumprod_prev[1])
    np.testing.assert_allclose(got_x0, x0)
    np.testing.assert_allclose(x_prev, np.sqrt(a) * x0 + np.sqrt(1 - a) * z, atol=1e-6)
    last, _ = sampling.renoise_step(sched, x0, x, 0, z, prediction="x0")
    np.testing.assert_array_equal(last, x0)


# --- the method -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("add.teacher", ""),
        ("add.features", "classifier:runs/x/eval/classifier_digits.npz"),
        ("add.distill_weight", "exponentail"),
        ("add.head_norm_groups", 3),
        ("add.feature_timestep", 50),
        ("add.r1_gamma", -1.0),
        ("add.ema_decay", 1.0),
        ("sample.num_steps", 5),
    ],
)
def test_bad_config_is_refused_naming_the_field(teacher_dir, field, value):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build(student_cfg(teacher_dir, **{field.replace(".", "__"): value}))


def test_each_update_moves_only_its_group(teacher_dir):
    """The student's update leaves the discriminator bitwise unchanged, the discriminator's
    leaves the student unchanged; each moves its own group. The student's EMA (add.ema_decay)
    follows the student after every step, and is what sampling uses."""
    decay = 0.5
    cfg = student_cfg(teacher_dir, add__ema_decay=decay)
    run = build(cfg, devices=jax.devices()[:1])
    assert sorted(run.emas) == ["student"]
    state = run.init_state()
    frozen = run.frozen()
    batch = batch_of(run)
    student_update, disc_update = run.method.updates(cfg, run.ctx)
    for update, moved, kept in (
        (student_update, "student", "discriminator"),
        (disc_update, "discriminator", "student"),
    ):
        step = jax.jit(
            make_train_step([update], run.optimizers, run.emas, seed=0, skip_nonfinite=False)
        )
        mid = step(state, frozen, batch)[0]
        new, metrics = step(mid, frozen, batch)  # lr > 0 at the 2nd
        assert bool(metrics["finite"])
        assert dh.differing_leaves(new.params[kept], state.params[kept]) == []
        assert dh.differing_leaves(new.opt_state[kept], state.opt_state[kept]) == []
        assert dh.differing_leaves(new.params[moved], state.params[moved]) != []
        want = jax.tree.map(
            lambda e, p: decay * e + (1 - decay) * p, mid.ema["student"], new.params["student"]
        )
        for a, b in zip(jax.tree.leaves(new.ema["student"]), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert run.sample_params(new) is new.ema["student"]


def test_student_starts_as_its_teacher_and_the_loss_terms(teacher_dir):
    """At initialisation the student is the teacher bitwise; the distillation term of the
    student's loss equals a direct computation from the same draws."""
    cfg = student_cfg(teacher_dir, add__distill_weight="sds")
    run = build(cfg, devices=jax.devices()[:1])
    state, frozen = run.init_state(), run.frozen()
    assert dh.differing_leaves(state.params["student"], frozen["teacher"]) == []
    batch = batch_of(run)
    key = jax.random.key(4)
    loss_fn = run.method.updates(cfg, run.ctx)[0].loss
    value, m = loss_fn(state.params, frozen, batch, key)
    np.testing.assert_allclose(float(value), float(m["adv"]) + 2.5 * float(m["distill"]), rtol=1e-5)

    sched = ddpm.make_schedule(cfg)
    apply = run.ctx.apply_fn("teacher")
    x0, y = batch["image"], batch["label"]
    k_student, k_teacher, _ = jax.random.split(key, 3)
    k_s, k_e = jax.random.split(k_student)
    grid = jnp.asarray(add.student_timesteps(50, 4))
    s = grid[jax.random.randint(k_s, (16,), 0, 4)]
    x_s = diffusion.q_sample(sched, x0, s, jax.random.normal(k_e, x0.shape))
    out = apply(state.params["student"], x_s, s, y)
    x_hat = lcm.floored_x0(x_s, sched.alphas_cumprod[s], out, cfg.add.min_abar)  # unclipped
    k_t, k_e2 = jax.random.split(k_teacher)
    t = jax.random.randint(k_t, (16,), 0, 50)
    x_t = diffusion.q_sample(sched, x_hat, t, jax.random.normal(k_e2, x0.shape))
    cond = diffusion.x0_from_eps(sched, x_t, t, apply(frozen["teacher"], x_t, t, y))
    uncond = diffusion.x0_from_eps(
        sched, x_t, t, apply(frozen["teacher"], x_t, t, jnp.full_like(y, 10))
    )
    target = np.clip(np.asarray(uncond + 1.5 * (cond - uncond)), -1, 1)
    abar = np.asarray(sched.alphas_cumprod)[np.asarray(t)]
    c = np.sqrt(abar * (1 - abar))
    want = np.mean(c * np.mean((np.asarray(x_hat) - target) ** 2, axis=(1, 2, 3)))
    np.testing.assert_allclose(float(m["distill"]), want, rtol=1e-4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, teacher_dir):
    """The same tiny ADD run on 8 fake devices and on one (its own teacher as a separate
    "run:DIR" feature network in both)."""
    root = tmp_path_factory.mktemp("add_runs")
    cfg = student_cfg(teacher_dir, add__features=f"run:{teacher_dir}")
    sharded = loop.train(cfg, str(root / "sharded"))
    single = loop.train(cfg, str(root / "single"), devices=jax.devices()[:1])
    return cfg, root, sharded, single


def test_eight_devices_equal_one(runs):
    _, _, sharded, single = runs
    assert sharded.run.mesh.size == 8 and single.run.mesh.size == 1
    steps = sorted(single.losses)
    assert steps == sorted(sharded.losses) == list(range(4))
    np.testing.assert_allclose(
        [sharded.losses[s] for s in steps], [single.losses[s] for s in steps], rtol=1e-4
    )
    for group in ("student", "discriminator"):
        for a, b in zip(
            jax.tree.leaves(jax.device_get(sharded.state.params[group])),
            jax.tree.leaves(jax.device_get(single.state.params[group])),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


def test_teacher_and_features_never_change(runs, teacher_dir):
    """After training, the frozen trees the steps read are bitwise what a fresh load reads
    from the teacher's checkpoint; the checkpoint holds the student and the discriminator heads
    only, with both Adam states, and the student's EMA."""
    cfg, root, sharded, single = runs
    fresh = build(cfg, devices=jax.devices()[:1]).frozen()
    for result in (sharded, single):
        frozen = result.run.frozen()
        assert sorted(frozen) == ["features", "teacher"]
        for name in ("teacher", "features"):
            assert digest(frozen[name]) == digest(fresh[name]), name
    over = STUDENT | {"add.teacher": f"run:{teacher_dir}", "add.features": f"run:{teacher_dir}"}
    restored = dh.restore(root / "sharded", over, experiment=ADD_EXP)
    assert sorted(restored.state.params) == ["discriminator", "student"]
    assert sorted(restored.state.opt_state) == ["discriminator", "student"]
    assert sorted(restored.state.ema) == ["student"]  # add_digits samples the student's EMA


def test_trains_evaluates_and_samples(runs, teacher_dir):
    """`make eval`'s rows for the student at 1 and 2 steps beside the teacher's; the 1-step
    sample is the student's clipped x̂_0 at T-1 from x_T."""
    cfg, root, sharded, _ = runs
    report = methods.get("add").evaluate(cfg, str(root / "sharded"))
    got = {(r["model"], r["steps"]) for r in report["rows"]}
    assert got == {("student", 1), ("student", 2), ("teacher", 1), ("teacher", 2), ("teacher", 5)}
    for r in report["rows"]:
        assert np.isfinite(r["fd_matched"]) and r["images_per_second"] > 0
    assert {"allowed_fd", "1_steps_near_teacher", "2_steps_near_teacher"} <= set(report["targets"])
    assert "student" in methods.get("add").format_report(report)

    run = sharded.run
    s = cfg.sample.copy_and_resolve_references()
    s.num_steps = 1
    generate = run.method.make_sampler(run, s)
    params = sharded.state.params["student"]
    labels, key = jnp.arange(8) % 10, jax.random.key(2)
    images = np.asarray(generate(params, labels, key))
    x_T = jax.random.normal(jax.random.fold_in(key, 1), images.shape)
    t = jnp.full((8,), 49)
    out = run.ctx.apply_fn("student")(params, x_T, t, labels)
    sched = ddpm.make_schedule(cfg)
    want = np.clip(
        np.asarray(lcm.floored_x0(x_T, sched.alphas_cumprod[t], out, cfg.add.min_abar)), -1, 1
    )
    np.testing.assert_allclose(images, want, atol=1e-5)
