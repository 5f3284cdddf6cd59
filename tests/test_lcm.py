"""Method "lcm": the lecture's objective, LCM distillation from a frozen teacher with an EMA
target, iCT, and LCM-LoRA, on a tiny U-Net over the bundled digits; `make eval`'s table.

The teacher is a real run of this project (a few steps of the tiny DDPM), read from its Orbax
checkpoint like any user's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from drills import helpers as dh

from diffusax import consistency, diffusion
from diffusax.config import ConfigError, load_experiment
from diffusax.methods import ddpm, lcm
from diffusax.train import loop
from diffusax.train.build import build

REPO = dh.REPO
LCM_EXP = REPO / "experiments" / "lcm_digits.py"
LORA_EXP = REPO / "experiments" / "lcm_lora_digits.py"
TINY = {k: v for k, v in dh.TINY.items() if not k.startswith("train.progress")}
STUDENT = dict(
    TINY,
    **dh.FEW_STEP_EVAL,
    **{
        "train.num_steps": 6,
        "train.checkpoint_every": 3,
        "lcm.num_ddim_timesteps": 10,
        "model.guidance_embed_dim": 16,
    },
)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny class-conditional DDPM trained for 8 steps (the teacher of every test here)."""
    workdir = tmp_path_factory.mktemp("lcm") / "teacher"
    over = dict(TINY, **{"train.num_steps": 8, "train.checkpoint_every": 8})
    loop.train(dh.config(over), str(workdir))
    return workdir


def student_cfg(teacher_dir, experiment=LCM_EXP, **changes):
    over = dict(STUDENT, **{"lcm.teacher": f"run:{teacher_dir}"})
    if experiment == LORA_EXP:
        over["model.guidance_embed_dim"] = 0
    over.update({k.replace("__", "."): v for k, v in changes.items()})
    return load_experiment(str(experiment), overrides=over)


batch_of = dh.labelled_batch


def test_student_starts_as_its_teacher_bitwise(teacher_dir):
    """The student is the teacher's tree plus a zero guidance layer: at initialisation, with
    any ω, its output equals the teacher's bitwise; the EMA target starts there too."""
    run = build(student_cfg(teacher_dir))
    state = run.init_state()
    frozen = run.frozen()
    student = state.params["student"]
    assert not np.any(np.asarray(student["guidance_proj"]["kernel"]))
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    t, y = jnp.array([0, 9, 19, 49]), jnp.array([1, 2, 3, 10])
    from flax import nnx

    out_s = nnx.merge(run.ctx.graphdefs["student"], student)(x, t, y, guidance=jnp.full(4, 0.7))
    out_t = run.ctx.apply_fn("teacher")(frozen["teacher"], x, t, y)
    np.testing.assert_array_equal(np.asarray(out_s), np.asarray(out_t))
    assert dh.differing_leaves(state.ema["target"], student) == []


def test_lecture_objective_terms_equal_a_direct_computation(teacher_dir):
    """L_rec and L_cons of the method's loss, recomputed from the same draws with numpy's
    c_skip / c_out and the network applied directly."""
    cfg = student_cfg(teacher_dir, lcm__objective="lecture", model__guidance_embed_dim=0)
    run = build(cfg)
    state = run.init_state()
    frozen = run.frozen()
    batch = batch_of(run)
    key = jax.random.key(3)
    (loss_fn,) = [u.loss for u in run.method.updates(cfg, run.ctx)]
    value, metrics = loss_fn(state.params, frozen, batch, key)

    sched = ddpm.make_schedule(cfg)
    x0 = batch["image"]
    n = x0.shape[0]
    k_t, k_s, k_e1, k_e2 = jax.random.split(key, 4)
    t = jax.random.randint(k_t, (n,), 1, cfg.diffusion.num_timesteps)
    s = jax.random.randint(k_s, (n,), 0, t)
    assert np.all(np.asarray(s) < np.asarray(t))
    abar = np.asarray(sched.alphas_cumprod, np.float64)
    eps1 = np.asarray(jax.random.normal(k_e1, x0.shape), np.float64)
    eps2 = np.asarray(jax.random.normal(k_e2, x0.shape), np.float64)
    x0n = np.asarray(x0, np.float64)
    apply = run.ctx.apply_fn("student")

    def f(tt, eps):
        a = abar[np.asarray(tt)][:, None, None, None]
        z = np.sqrt(a) * x0n + np.sqrt(1 - a) * eps
        out = np.asarray(
            apply(state.params["student"], jnp.asarray(z, jnp.float32), tt, batch["label"]),
            np.float64,
        )
        af = np.maximum(a, cfg.lcm.min_abar)  # the student reads its ε at ᾱ >= lcm.min_abar
        x0_hat = np.clip((z - np.sqrt(1 - af) * out) / np.sqrt(af), -1, 1)  # lcm.clip_x0 = 1
        scaled = 10.0 * np.asarray(tt, np.float64)[:, None, None, None]
        c_skip = 0.25 / (scaled**2 + 0.25)
        c_out = scaled / np.sqrt(scaled**2 + 0.25)
        return c_skip * z + c_out * x0_hat

    f_t, f_s = f(t, eps1), f(s, eps2)
    rec = np.mean((f_t - x0n) ** 2)
    cons = np.mean((f_t - f_s) ** 2)
    np.testing.assert_allclose(float(metrics["rec"]), rec, rtol=2e-4)
    np.testing.assert_allclose(float(metrics["cons"]), cons, rtol=2e-4)
    np.testing.assert_allclose(float(value), rec + cfg.lcm.lecture_lambda * cons, rtol=2e-4)


def test_one_step_sample_is_the_students_f_at_the_top_timestep(teacher_dir):
    """The lcm sampler's 1-step image is clip(f(x_T, T-1, ω)) of the loss's f, with the student's
    ε read at the floored ᾱ (ᾱ_49 of the tiny cosine schedule is below lcm.min_abar)."""
    cfg = student_cfg(teacher_dir, sample__num_steps=1, sample__guidance_scale=1.5)
    run = build(cfg)
    sched = ddpm.make_schedule(cfg)
    top = cfg.diffusion.num_timesteps - 1
    assert float(sched.alphas_cumprod[top]) < cfg.lcm.min_abar < float(sched.alphas_cumprod[0])
    state = run.init_state()
    params = jax.tree.map(lambda a: a + 0.01, state.params["student"])  # guidance_proj not 0
    generate = run.method.make_sampler(run, cfg.sample)
    labels, key = jnp.arange(8) % 10, jax.random.key(2)
    images = np.asarray(generate(params, labels, key))

    from flax import nnx

    x_T = jax.random.normal(jax.random.fold_in(key, 1), images.shape)
    t = jnp.full((8,), top)
    out = nnx.merge(run.ctx.graphdefs["student"], params)(x_T, t, labels, guidance=jnp.full(8, 0.5))
    x0_hat = lcm.floored_x0(x_T, sched.alphas_cumprod[t], out, cfg.lcm.min_abar)
    want = consistency.consistency_function(x_T, t, jnp.clip(x0_hat, -1, 1))
    np.testing.assert_allclose(images, np.clip(np.asarray(want), -1, 1), atol=1e-5)
    exact = diffusion.x0_eps_from_prediction(sched, "eps", x_T, t, out)[0]
    assert np.abs(np.clip(np.asarray(exact), -1, 1) - images).max() > 0.1  # the floor acts


def test_distillation_trains_evaluates_and_samples(teacher_dir, tmp_path):
    """A few steps of full LCM: the EMA target moves by its decay, the checkpoint holds the
    student, its target and no teacher; `make eval`'s rows and targets are all there."""
    cfg = student_cfg(teacher_dir)
    workdir = tmp_path / "student"
    loop.train(cfg, str(workdir))
    restored = dh.restore(
        workdir, STUDENT | {"lcm.teacher": f"run:{teacher_dir}"}, experiment=LCM_EXP
    )
    assert sorted(restored.state.params) == ["student"]
    assert sorted(restored.state.ema) == ["target"]
    from diffusax import methods

    report = methods.get("lcm").evaluate(cfg, str(workdir))
    got = {(r["model"], r["steps"]) for r in report["rows"]}
    assert got == {("student", 1), ("student", 2), ("teacher", 1), ("teacher", 2), ("teacher", 5)}
    for r in report["rows"]:
        assert np.isfinite(r["fd_matched"]) and r["images_per_second"] > 0
    assert set(report["targets"]) >= {"one_step_5x_better", "4_steps_20x_faster"} - {
        "4_steps_20x_faster"
    }
    text = methods.get("lcm").format_report(report)
    assert "student" in text and "teacher" in text


def test_distillation_loss_uses_the_guided_teacher_step_and_the_target(teacher_dir):
    """With the student equal to its target and ω = 0, the LCM loss is d(f(z_t, t), f(ẑ_s, s))
    where ẑ_s is the teacher's conditional DDIM step: recomputed here from the same draws."""
    cfg = student_cfg(teacher_dir, lcm__w_min=0.0, lcm__w_max=0.0, lcm__loss="l2")
    run = build(cfg)
    state = run.init_state()
    frozen = run.frozen()
    batch = batch_of(run)
    key = jax.random.key(5)
    (update,) = run.method.updates(cfg, run.ctx)
    assert update.with_ema
    value, _ = update.loss(state.params, frozen, batch, key, ema=state.ema)

    sched = ddpm.make_schedule(cfg)
    grid = consistency.lcm_origin_timesteps(50, 10)
    x0 = batch["image"]
    k_idx, k_noise, _ = jax.random.split(key, 3)
    t = jnp.asarray(grid)[jax.random.randint(k_idx, (16,), 0, len(grid))]
    s = jnp.maximum(t - 5, 0)
    z_t = diffusion.q_sample(sched, x0, t, jax.random.normal(k_noise, x0.shape))
    teacher = run.ctx.apply_fn("teacher")
    x0_t, eps_t = diffusion.x0_eps_from_prediction(
        sched, "eps", z_t, t, teacher(frozen["teacher"], z_t, t, batch["label"])
    )
    x0_t = jnp.clip(x0_t, -1, 1)  # lcm.clip_x0 = 1, ε̂ recomputed from the clipped x̂_0
    eps_t = diffusion.eps_from_x0(sched, z_t, t, x0_t)
    a_s = sched.alphas_cumprod[s][:, None, None, None]
    z_s = jnp.sqrt(a_s) * x0_t + jnp.sqrt(1 - a_s) * eps_t

    def f(z, tt):
        out = teacher(frozen["teacher"], z, tt, batch["label"])  # student = target = teacher
        af = jnp.maximum(sched.alphas_cumprod[tt], cfg.lcm.min_abar)[:, None, None, None]
        x0_hat = (z - jnp.sqrt(1 - af) * out) / jnp.sqrt(af)  # ε read at ᾱ >= lcm.min_abar
        return consistency.consistency_function(z, tt, jnp.clip(x0_hat, -1, 1))

    want = jnp.mean((f(z_t, t) - f(z_s, s)) ** 2)
    np.testing.assert_allclose(float(value), float(want), rtol=1e-4)


def test_ict_trains_without_a_teacher(tmp_path):
    over = dict(
        STUDENT, **{"lcm.objective": "ict", "lcm.teacher": "", "model.guidance_embed_dim": 0}
    )
    cfg = load_experiment(str(LCM_EXP), overrides=over)
    run = build(cfg)
    assert "teacher" not in run.networks
    result = loop.train(cfg, str(tmp_path / "ict"))
    assert result.stopped_by is None


def test_ict_curriculum_and_levels():
    """N(k) doubles from s0 to s1 over K steps; the level weights are a distribution over the
    N - 1 intervals of Karras' grid."""
    n = [int(lcm.ict_num_scales(k, 600, 10, 1280)) for k in (0, 74, 75, 150, 599)]
    assert n == [11, 11, 21, 41, 1281]
    sig = lcm.karras_sigmas(21, 1281, **lcm.KARRAS)
    np.testing.assert_allclose(float(sig[0]), 0.002, rtol=1e-5)
    np.testing.assert_allclose(float(sig[20]), 80.0, rtol=1e-5)
    logits = lcm.ict_level_logits(sig, 21, -1.1, 2.0)
    p = np.exp(np.asarray(logits))
    assert np.all(p[20:] == 0) and np.all(p[:20] > 0)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"lcm.objective": "distill"}, "lcm.objective"),
        ({"lcm.teacher": ""}, "lcm.teacher"),
        ({"lcm.teacher": "runs/x"}, "lcm.teacher"),
        ({"lcm.num_ddim_timesteps": 7}, "lcm.num_ddim_timesteps"),
        ({"lcm.w_min": 2.0}, "lcm.w_min"),
        ({"lcm.loss": "l1"}, "lcm.loss"),
        ({"lcm.min_abar": 1.0}, "lcm.min_abar"),
        ({"adapters.rank": 4}, "model.guidance_embed_dim"),
        ({"diffusion.var_type": "learned_range"}, "diffusion.var_type"),
    ],
)
def test_bad_config_is_refused_naming_the_field(changes, field, tmp_path):
    over = dict(STUDENT, **{"lcm.teacher": f"run:{tmp_path}"})
    over.update(changes)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build(load_experiment(str(LCM_EXP), overrides=over))


def test_missing_teacher_names_the_command(tmp_path):
    cfg = load_experiment(
        str(LCM_EXP), overrides=dict(STUDENT, **{"lcm.teacher": f"run:{tmp_path}"})
    )
    run = build(cfg)
    with pytest.raises(FileNotFoundError, match="make train EXP=ddpm_digits"):
        run.frozen()


def test_lcm_lora_trains_the_adapters_alone(teacher_dir, tmp_path):
    """LCM-LoRA: the train state holds adapters only (the teacher is frozen and not
    checkpointed); at initialisation (B = 0) the merged student is the teacher bitwise; after
    training only A/B moved, the teacher's tree is unchanged, and the student differs."""
    cfg = student_cfg(teacher_dir, LORA_EXP, adapters__rank=2)
    run = build(cfg)
    assert sorted(run.networks) == ["lora", "teacher"]
    state = run.init_state()
    frozen = run.frozen()
    teacher_before = jax.tree.map(np.asarray, frozen["teacher"])
    assert sorted(state.params) == ["lora"] and state.ema == {}
    merged = run.sample_params(state)
    assert dh.differing_leaves(merged, frozen["teacher"]) == []
    workdir = tmp_path / "lora"
    loop.train(cfg, str(workdir))
    over = dict(STUDENT, **{"lcm.teacher": f"run:{teacher_dir}", "model.guidance_embed_dim": 0})
    over["adapters.rank"] = 2
    restored = dh.restore(workdir, over, experiment=LORA_EXP)
    assert sorted(restored.state.params) == ["lora"]
    leaves = jax.tree_util.tree_leaves_with_path(restored.state.params["lora"])
    assert leaves and all(
        "A" in jax.tree_util.keystr(p) or "B" in jax.tree_util.keystr(p) for p, _ in leaves
    )
    assert dh.differing_leaves(run.frozen()["teacher"], teacher_before) == []
    from diffusax import lora

    host = lambda tree: jax.tree.map(np.asarray, tree)
    trained = lora.merge(host(frozen["teacher"]), host(restored.state.params["lora"]), 1.0)
    assert dh.differing_leaves(trained, teacher_before) != []
