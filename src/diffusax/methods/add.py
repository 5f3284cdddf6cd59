"""Adversarial diffusion distillation (ADD, Sauer et al. 2023): a 1-to-4-step student trained
against a discriminator and towards a frozen teacher.

    networks  {"teacher": frozen, "student": from the teacher, "discriminator": heads}
              (+ a frozen "features" U-Net when ``add.features`` is "run:DIR")
    groups    {"student": optim, "discriminator": disc_optim};  EMA "student" (optional)
    update 1  student:        L_S = -Σ_k E[D_k(x̂_θ)] + λ L_distill                (D fixed)
    update 2  discriminator:  L_D = Σ_k E[max(0, 1 - D_k(x))] + E[max(0, 1 + D_k(x̂_θ))]
                                    + γ/2 E‖∇_φ D(φ(x))‖²       with x̂_θ from the student just
                                                                  updated (stop_gradient)

The student's timesteps are the N trailing ones s_i = round(T - i T/N) - 1 (N =
``add.student_timesteps`` = 4: {999, 749, 499, 249} for T = 1000). A step draws s from them,
x_s = √ᾱ_s x_0 + √(1-ᾱ_s) ε, and the student's x̂_θ = x̂_0(F_θ(x_s, s, y)) (its ε read at
ᾱ ≥ ``add.min_abar``, as LCM's student: ``lcm.floored_x0``; unclipped in training unless
``add.clip_student``: a clipped pixel has no gradient, so a stroke pushed past ±1 would stay
there, and the discriminator is what should teach the range). The distillation target: x̂_θ
re-noised at a teacher timestep t ~ U{0..T-1} on the teacher's schedule (optionally rescaled to
zero terminal SNR, ``rescale_zero_terminal_snr``), x̂_t = √ᾱ'_t sg(x̂_θ) + √(1-ᾱ'_t) ε', and the
teacher's classifier-free-guided x̂_0 there at scale w = ``add.teacher_guidance``:
x̂_teacher = x̂_0(∅) + w (x̂_0(y) - x̂_0(∅)), clipped. L_distill = E_b[c(t) mean((x̂_θ - sg(x̂_teacher))²)]
with c(t) = ``distill_weight``.

The discriminator D is a frozen feature network φ (the teacher's own U-Net encoder,
``add.features`` = "teacher", or the encoder of another ddpm run of this project with the same
architecture, "run:DIR"; never the evaluation classifier of ``diffusax.evaluate``) at the fixed
timestep ``add.feature_timestep`` with the null label, on the image noised there, and
trainable heads, one per feature level, each with a class projection
(``models.add_discriminator``). D(x) = Σ_k mean_hw D_k(x) is its per-example score (for R1 and
the accuracies). The R1 penalty differentiates that score with respect to the features φ(x)
(the heads' inputs), not the discriminator's parameters or the pixels.

With ``add.ema_decay`` > 0 an EMA of the student (``emas`` "student") is what sampling and
`make eval` use; it only observes the student, so the training is the same either way.

Sampled by the "add" sampler (``sampling.renoise_step``): denoise to x̂_0, re-noise to the next
of K ≤ N of the student's timesteps (``sample_timesteps``). `make eval` is ``evaluate.few_step``.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from diffusax import diffusion, sampling, schedules
from diffusax.config import ConfigError
from diffusax.methods import base, ddpm, lcm

SECTION = "add"
DISTILL_WEIGHTS = ("exponential", "sds", "uniform")


# ---------------------------------------------------------------------------------------------
# The maths, as pure functions


def student_timesteps(num_timesteps: int, n: int) -> np.ndarray:
    """The student's N timesteps, ascending: round(T - i T/N) - 1, i = 0..N-1 ({249, 499, 749,
    999} for T = 1000, N = 4; ``sampling.timestep_subset``'s "trailing" spacing)."""
    return sampling.timestep_subset(num_timesteps, n, "trailing")


def sample_timesteps(num_timesteps: int, n: int, k: int) -> np.ndarray:
    """K ≤ N of the student's timesteps, ascending, for K-step sampling: the descending grid's
    entries ⌊j N/K + 1/2⌋, j = 0..K-1, so that every K starts at T-1 (K = 1: {999}; K = 2:
    {999, 499}; K = 4: all four)."""
    if not 1 <= k <= n:
        raise ValueError(f"ADD samples with 1 to {n} steps (its student's timesteps), got {k}")
    grid = student_timesteps(num_timesteps, n)[::-1]  # descending
    picked = grid[[int(j * n / k + 0.5) for j in range(k)]]  # round half up
    return np.sort(picked)


def rescale_zero_terminal_snr(alphas_cumprod) -> np.ndarray:
    """ᾱ with zero terminal SNR (Lin et al. 2024, Algorithm 1): with a_t = √ᾱ_t,
    a'_t = (a_t - a_T) · a_1 / (a_1 - a_T), ᾱ'_t = a'_t². The first ᾱ is kept, the last becomes 0,
    and a' is affine in a (float64)."""
    a = np.sqrt(np.asarray(alphas_cumprod, np.float64))
    first, last = a[0], a[-1]
    return ((a - last) * first / (first - last)) ** 2


def teacher_schedule(cfg) -> schedules.Schedule:
    """The teacher's schedule: the run's, or rescaled to zero terminal SNR (betas from the
    ratios of the rescaled ᾱ, the last one 1)."""
    sched = ddpm.make_schedule(cfg)
    if not cfg.add.zero_terminal_snr:
        return sched
    abar = rescale_zero_terminal_snr(sched.alphas_cumprod)
    betas = 1.0 - abar / np.append(1.0, abar[:-1])
    return schedules.make_schedule(betas)


def distill_weight(kind: str, abar):
    """c(t) of L_distill from ᾱ_t (of the teacher's schedule):

    exponential  c = ᾱ_t (ADD's choice: little weight where the teacher sees mostly noise);
    sds          c = √ᾱ_t √(1-ᾱ_t): score distillation sampling with DreamFusion's w(t) = 1-ᾱ_t,
                 since its gradient w(t)(ε̂ - ε) ∂x/∂θ, with ε̂ - ε = √ᾱ_t (x - x̂_0)/√(1-ᾱ_t) at
                 x_t = √ᾱ x + √(1-ᾱ) ε, is that of w(t)√ᾱ_t/(2√(1-ᾱ_t)) ‖x - sg(x̂_0)‖² (the 1/2
                 and the mean over pixels are constants, absorbed by λ);
    uniform      c = 1.
    """
    abar = jnp.asarray(abar, jnp.float32)
    if kind == "exponential":
        return abar
    if kind == "sds":
        return jnp.sqrt(abar * (1.0 - abar))
    if kind == "uniform":
        return jnp.ones_like(abar)
    raise ValueError(f"unknown distillation weighting {kind!r}; choose one of {DISTILL_WEIGHTS}")


def disc_score(logits) -> jax.Array:
    """D(x) per example: Σ_k mean over positions of head k's logits (B, h_k, w_k) -> (B,)."""
    return sum(jnp.mean(lg.reshape(lg.shape[0], -1), axis=1) for lg in logits)


def hinge_disc_loss(real_logits, fake_logits) -> jax.Array:
    """Σ_k E[max(0, 1 - D_k(x))] + E[max(0, 1 + D_k(x̂))], means over examples and positions."""
    return sum(
        jnp.mean(jax.nn.relu(1.0 - r)) + jnp.mean(jax.nn.relu(1.0 + f))
        for r, f in zip(real_logits, fake_logits, strict=True)
    )


def generator_adv_loss(fake_logits) -> jax.Array:
    """-Σ_k E[D_k(x̂)] (the student's adversarial term)."""
    return -sum(jnp.mean(f) for f in fake_logits)


def r1_penalty(score_fn, features, gamma: float) -> jax.Array:
    """γ/2 · E_b ‖∇_φ D(φ)_b‖², the gradient of the per-example score ``score_fn(features)``
    (B,) with respect to the features φ (a list of (B, ...) maps; ‖·‖² sums over all of them).
    Examples do not interact in D, so the gradient of Σ_b D_b gives every example's own."""
    grads = jax.grad(lambda f: jnp.sum(score_fn(f)))(features)
    sq = sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in grads)  # (B,)
    return 0.5 * gamma * jnp.mean(sq)


# ---------------------------------------------------------------------------------------------
# The method


class ADD(ddpm.DDPM):
    """networks {"teacher" (frozen), "student", "discriminator" (heads)} (+ "features")."""

    name = "add"
    param_sections = ("model", SECTION)

    # -- config ---------------------------------------------------------------------------

    def validate(self, cfg):
        super().validate(cfg)
        a = cfg.add
        if not a.teacher:
            raise ConfigError("config field 'add.teacher' is empty: distillation needs a teacher")
        if not a.teacher.startswith(("run:", "diffusers:")):
            raise ConfigError(
                f"config field 'add.teacher' must be 'run:DIR' or 'diffusers:DIR', got "
                f"{a.teacher!r}"
            )
        if a.features != "teacher" and not a.features.startswith("run:"):
            raise ConfigError(
                f"config field 'add.features' must be 'teacher' (its U-Net encoder) or "
                f"'run:DIR' (a ddpm run of this project with the same U-Net), got "
                f"{a.features!r}"
            )
        if a.distill_weight not in DISTILL_WEIGHTS:
            raise ConfigError(
                f"config field 'add.distill_weight' must be one of {DISTILL_WEIGHTS}, got "
                f"{a.distill_weight!r}"
            )
        if cfg.model.name != "unet":
            raise ConfigError(
                f"config field 'model.name' is {cfg.model.name!r}: ADD's discriminator reads "
                f"the features of a U-Net encoder ('unet')"
            )
        if cfg.condition.kind not in ("", "label"):
            raise ConfigError(
                f"config field 'condition.kind' is {cfg.condition.kind!r}: method 'add' "
                f"conditions on class labels (or nothing)"
            )
        if cfg.model.guidance_embed_dim:
            raise ConfigError(
                "config field 'model.guidance_embed_dim' must be 0: the ADD student has no "
                "guidance embedding (the teacher's guidance is distilled into it)"
            )
        if cfg.diffusion.var_type in diffusion.LEARNED_VAR_TYPES:
            raise ConfigError(
                "config field 'diffusion.var_type': the ADD student has no variance output"
            )
        T = cfg.diffusion.num_timesteps
        if not 1 <= a.student_timesteps <= T:
            raise ConfigError(
                f"config field 'add.student_timesteps' must be in 1..{T}, got {a.student_timesteps}"
            )
        if not 0 <= a.feature_timestep < T:
            raise ConfigError(
                f"config field 'add.feature_timestep' must be in 0..{T - 1}, got "
                f"{a.feature_timestep}"
            )
        base.check_fields(cfg, SECTION, positive=("head_width", "head_norm_groups"))
        base.check_fields(
            cfg,
            SECTION,
            non_negative=("distill_lambda", "r1_gamma", "teacher_guidance", "clip_x0"),
            unit_interval=("min_abar", "ema_decay"),
        )
        if a.head_width % a.head_norm_groups:
            raise ConfigError(
                f"config field 'add.head_norm_groups' ({a.head_norm_groups}) must divide "
                f"add.head_width ({a.head_width})"
            )
        if a.zero_terminal_snr and cfg.diffusion.prediction == "x0":
            raise ConfigError(
                "config field 'add.zero_terminal_snr': an x0-predicting teacher at ᾱ = 0 has "
                "no ε (use an ε or v teacher)"
            )
        if cfg.sample.sampler == "add" and not 1 <= cfg.sample.num_steps <= a.student_timesteps:
            raise ConfigError(
                f"config field 'sample.num_steps' must be in 1..{a.student_timesteps} "
                f"(add.student_timesteps) for sampler 'add', got {cfg.sample.num_steps}"
            )

    def prepare(self, cfg):
        lcm.train_teacher_if_missing(self.name, cfg.add.teacher, cfg.add.teacher_experiment)

    # -- networks -------------------------------------------------------------------------

    def networks(self, cfg, data):
        from flax import nnx

        from diffusax.models.add_discriminator import FeatureHeads, unet_feature_channels
        from diffusax.train.build import load_from_run
        from diffusax.train.state import model_builder

        a = cfg.add
        shape = self.model_shape(cfg, data)
        build_unet = model_builder(cfg, shape, data.num_classes, ddpm.condition_of(cfg, data))
        teacher = base.Network(
            build=build_unet,
            trainable=False,
            source=a.teacher,
            load=lcm.teacher_loader(a.teacher, a.teacher_experiment),
        )
        nets = {
            "teacher": teacher,
            "student": base.Network(build=build_unet, source=a.teacher, init_from=teacher.load),
        }
        channels = unet_feature_channels(cfg.model.ch, tuple(cfg.model.ch_mult))
        nets["discriminator"] = base.Network(
            build=lambda key: FeatureHeads(
                channels,
                width=a.head_width,
                num_classes=data.num_classes,
                norm_groups=a.head_norm_groups,
                rngs=nnx.Rngs(params=key),
            )
        )
        if a.features != "teacher":
            nets["features"] = base.Network(
                build=build_unet,
                trainable=False,
                source=a.features,
                load=load_from_run(a.features[len("run:") :]),
            )
        return nets

    def groups(self, cfg):
        return {
            "student": base.Group("student", optim="optim"),
            "discriminator": base.Group("discriminator", optim="disc_optim"),
        }

    def emas(self, cfg):
        # ADD's reference samples the student as trained; an EMA (add.ema_decay > 0) averages
        # out the step-to-step swing that the adversarial game leaves in a 1-step generator.
        d = cfg.add.ema_decay
        return {"student": base.Ema("student", d)} if d > 0 else {}

    def sample_params(self, state, frozen, cfg):
        return state.ema["student"] if "student" in state.ema else state.params["student"]

    def sample_network(self, cfg):
        return "student"

    # -- the losses -----------------------------------------------------------------------

    def _parts(self, cfg, ctx):
        """The pieces both losses use: (student x̂_θ, features φ, heads D, labels of a batch)."""
        from flax import nnx

        from diffusax.models.add_discriminator import unet_encoder_features

        a = cfg.add
        sched = ddpm.make_schedule(cfg)
        prediction = cfg.diffusion.prediction
        grid = jnp.asarray(student_timesteps(cfg.diffusion.num_timesteps, a.student_timesteps))
        student_apply = ctx.apply_fn("student")
        feature_net = "teacher" if a.features == "teacher" else "features"
        classes = ctx.data.num_classes
        t_feat = a.feature_timestep

        def labels_of(batch):
            return batch["label"] if classes else None

        def student_x0(student_params, x0, y, key):
            """(x̂_θ, s) of a batch: s from the student's grid, x_s = q(x_s | x_0)."""
            k_s, k_e = jax.random.split(key)
            s = grid[jax.random.randint(k_s, (x0.shape[0],), 0, grid.shape[0])]  # (B,)
            x_s = diffusion.q_sample(sched, x0, s, jax.random.normal(k_e, x0.shape))
            out = student_apply(student_params, x_s, s, y)
            if prediction == "eps" and a.min_abar > 0:
                x_hat = lcm.floored_x0(x_s, sched.alphas_cumprod[s], out, a.min_abar)
            else:
                x_hat, _ = diffusion.x0_eps_from_prediction(sched, prediction, x_s, s, out)
            if a.clip_student and a.clip_x0:
                x_hat = jnp.clip(x_hat, -a.clip_x0, a.clip_x0)
            return x_hat, s  # (B, H, W, C), (B,)

        def features(frozen, x, key):
            """φ(x): the frozen encoder at timestep t_feat, null label, on x noised there."""
            net = nnx.merge(ctx.graphdefs[feature_net], frozen[feature_net])
            t = jnp.full((x.shape[0],), t_feat, jnp.int32)
            x_t = diffusion.q_sample(sched, x, t, jax.random.normal(key, x.shape))
            return unet_encoder_features(net, x_t, t, None)  # None: the null label

        def heads(disc_params, feats, y):
            return ctx.module("discriminator", disc_params)(feats, y)

        return student_x0, features, heads, labels_of

    def updates(self, cfg, ctx):
        a = cfg.add
        student_x0, features, heads, labels_of = self._parts(cfg, ctx)
        t_sched = teacher_schedule(cfg)
        teacher = ctx.apply_fn("teacher")
        prediction = cfg.diffusion.prediction
        T = cfg.diffusion.num_timesteps
        # ᾱ'_{T-1} = 0 under zero terminal SNR: an ε-teacher's x̂_0 = x/√ᾱ' is undefined there.
        t_max = T - 1 if (a.zero_terminal_snr and prediction == "eps") else T
        classes = ctx.data.num_classes

        def teacher_target(frozen, x_hat, y, key):
            """(the teacher's guided x̂_0 at x̂_t, t): no gradient (frozen, stop_gradient)."""
            k_t, k_e = jax.random.split(key)
            n = x_hat.shape[0]
            t = jax.random.randint(k_t, (n,), 0, t_max)  # (B,)
            x_t = diffusion.q_sample(
                t_sched, jax.lax.stop_gradient(x_hat), t, jax.random.normal(k_e, x_hat.shape)
            )
            if y is None:
                out = teacher(frozen["teacher"], x_t, t, None)
                x0_t, _ = diffusion.x0_eps_from_prediction(t_sched, prediction, x_t, t, out)
            else:
                both_x, both_t = jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t])
                null = jnp.full_like(y, classes)
                out = teacher(frozen["teacher"], both_x, both_t, jnp.concatenate([y, null]))
                x0_2, _ = diffusion.x0_eps_from_prediction(t_sched, prediction, both_x, both_t, out)
                cond, uncond = jnp.split(x0_2, 2)
                x0_t = uncond + a.teacher_guidance * (cond - uncond)
            if a.clip_x0:
                x0_t = jnp.clip(x0_t, -a.clip_x0, a.clip_x0)
            return jax.lax.stop_gradient(x0_t), t

        def student_loss(params, frozen, batch, key):
            x0 = batch["image"]
            y = labels_of(batch)
            k_student, k_teacher, k_feat = jax.random.split(key, 3)
            x_hat, _ = student_x0(params["student"], x0, y, k_student)
            target, t = teacher_target(frozen, x_hat, y, k_teacher)
            c = distill_weight(a.distill_weight, t_sched.alphas_cumprod[t])  # (B,)
            distill = jnp.mean(c * diffusion.mean_flat((x_hat - target) ** 2))
            fake = heads(
                jax.lax.stop_gradient(params["discriminator"]), features(frozen, x_hat, k_feat), y
            )
            adv = generator_adv_loss(fake)
            loss = adv + a.distill_lambda * distill
            return loss, {"loss": loss, "adv": adv, "distill": distill}

        def disc_loss(params, frozen, batch, key):
            x0 = batch["image"]
            y = labels_of(batch)
            k_student, k_real, k_fake = jax.random.split(key, 3)
            student = jax.lax.stop_gradient(params["student"])  # as update 1 left it
            x_hat, _ = student_x0(student, x0, y, k_student)
            f_real = jax.lax.stop_gradient(features(frozen, x0, k_real))
            f_fake = jax.lax.stop_gradient(features(frozen, jax.lax.stop_gradient(x_hat), k_fake))
            disc = params["discriminator"]
            real, fake = heads(disc, f_real, y), heads(disc, f_fake, y)
            hinge = hinge_disc_loss(real, fake)
            r1 = jnp.zeros(())
            if a.r1_gamma > 0:
                r1 = r1_penalty(lambda f: disc_score(heads(disc, f, y)), f_real, a.r1_gamma)
            loss = hinge + r1
            s_real, s_fake = disc_score(real), disc_score(fake)
            return loss, {
                "loss": loss,
                "hinge": hinge,
                "r1": r1,
                "acc_real": jnp.mean((s_real > 0).astype(jnp.float32)),
                "acc_fake": jnp.mean((s_fake < 0).astype(jnp.float32)),
            }

        return [
            base.GradUpdate("student", student_loss),
            base.GradUpdate("discriminator", disc_loss, "disc/"),
        ]

    # -- sampling -------------------------------------------------------------------------

    def make_sampler(self, run, sample_cfg, *, clip: bool = True):
        cfg = run.cfg
        s = sample_cfg.copy_and_resolve_references()
        kwargs = {}
        if s.sampler == "add":
            k = int(s.num_steps) or cfg.add.student_timesteps
            T = cfg.diffusion.num_timesteps
            kwargs["timesteps"] = sample_timesteps(T, cfg.add.student_timesteps, k)
            s.num_steps = 0  # the timesteps above instead
        graphdef = run.ctx.graphdefs["student"]

        def network(params, x, t, y, dropout_key):
            from flax import nnx

            return nnx.merge(graphdef, params)(x, t, y, dropout_key=dropout_key)

        return lcm.student_generate(self, run, s, network, cfg.add.min_abar, kwargs, clip=clip)

    def teacher_sampler(self, run, sample_cfg):
        return lcm.teacher_generate(self, run, sample_cfg)

    def describe(self, cfg):
        a = cfg.add
        T = cfg.diffusion.num_timesteps
        grid = student_timesteps(T, a.student_timesteps)[::-1].tolist()
        return (
            f"{self.name}  (teacher={a.teacher}, features={a.features} at t={a.feature_timestep},"
            f" student timesteps {grid}, λ={a.distill_lambda} × {a.distill_weight}-weighted "
            f"distillation, teacher guidance {a.teacher_guidance}, R1 γ={a.r1_gamma}"
            + (", zero terminal SNR" if a.zero_terminal_snr else "")
            + ")"
        )

    def describe_sampler(self, cfg):
        s = cfg.sample
        if s.sampler != "add":
            return super().describe_sampler(cfg)
        steps = sample_timesteps(
            cfg.diffusion.num_timesteps, cfg.add.student_timesteps, int(s.num_steps)
        )
        return f"add, {len(steps)} steps at {steps[::-1].tolist()}, guidance {s.guidance_scale}"

    def evaluate(self, cfg, workdir):
        from diffusax.evaluate import few_step

        lcm_rows = _lcm_rows(cfg.add.compare_lcm)
        return few_step.evaluate(
            cfg,
            workdir,
            targets_fn=lambda rows, floor, teacher_steps: add_targets(
                rows, floor, teacher_steps, lcm_rows
            ),
            extra_rows=lcm_rows,
            teacher_guidance=cfg.add.teacher_guidance,  # the teacher at its own guidance
        )

    def format_report(self, report):
        from diffusax.evaluate import few_step

        return few_step.format_report(report)


def _lcm_rows(source: str) -> list[dict]:
    """The student rows of an LCM run's own `make eval` (``add.compare_lcm`` = "run:DIR"), as
    model "lcm" ([] when it is not set or that run has not been evaluated)."""
    if not source:
        return []
    path = os.path.join(source.removeprefix("run:"), "eval", "metrics.json")
    if not os.path.exists(path):
        print(f"add: no {path}; run `make eval` of that LCM run to compare with it")
        return []
    with open(path) as f:
        rows = json.load(f).get("rows", [])
    return [dict(r, model="lcm") for r in rows if r.get("model") == "student"]


def add_targets(rows, floor: float, teacher_steps: int, lcm_rows=()) -> dict:
    """ADD's targets on the matched-size Fréchet distances: the 1-step and the 4-step student
    within 25% of the teacher at ``teacher_steps``, or no further above it than held-out real
    digits are above the training digits (``floor``), whichever allows more; and the 1-step
    student better than the 1-step LCM student (its own `make eval`, when given)."""

    def _row(rows, model, steps):
        return next((r for r in rows if r["model"] == model and r["steps"] == steps), None)

    out = {}
    ref = _row(rows, "teacher", teacher_steps)
    if ref:
        allowed = max(1.25 * ref["fd_matched"], ref["fd_matched"] + floor)
        out["allowed_fd"] = allowed
        for k in (1, 2, 4):
            r = _row(rows, "student", k)
            if r:
                out[f"{k}_steps_near_teacher"] = bool(r["fd_matched"] <= allowed)
    s1 = _row(rows, "student", 1)
    l1 = _row(list(lcm_rows), "lcm", 1)
    if s1 and l1:
        out["one_step_better_than_lcm"] = bool(s1["fd_matched"] < l1["fd_matched"])
    return out


base.register(ADD())
