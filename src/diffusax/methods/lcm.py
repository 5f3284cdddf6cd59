"""Few-step consistency models: latent consistency distillation (Luo et al. 2023), the lecture's
consistency objective, improved consistency training (Song & Dhariwal 2023), and LCM-LoRA.

The student is a consistency function of the teacher's architecture and prediction type,

    f_θ(z, t) = c_skip(t) z + c_out(t) x̂_0(F_θ(z, t)),   (``consistency.boundary_scalings``)

with σ_data = 0.5 and timestep scaling 10, so that f(z, 0) = z exactly. It is sampled by the
multistep consistency sampler (sampler "lcm": denoise to f, re-noise to the next timestep of
LCM's 50-step grid). ``lcm.objective`` chooses the loss:

- "lcm" (latent consistency distillation): n ~ U{0..N-1} on the DDIM grid t_n = (n+1)k - 1,
  k = T/N (N = ``lcm.num_ddim_timesteps``); z_t = √ᾱ_t z_0 + √(1-ᾱ_t) ε; ω ~ U[w_min, w_max];
  one DDIM step of the frozen teacher, guided at scale 1 + ω (x̂_0 and ε̂ each guided), from t to
  s = max(t - k, 0): ẑ_s = √ᾱ_s x̂_0^ω + √(1-ᾱ_s) ε̂^ω; the loss is d(f_θ(z_t, t, ω), f_θ⁻(ẑ_s, s, ω))
  with d the mean squared error or the Huber-like √((a-b)² + c²) - c (mean over elements), and
  θ⁻ the EMA target (``lcm.ema_decay``). ω enters the student through ``model.guidance_embed_dim``
  (the sin/cos features of 1000 ω); the student starts as the teacher (the new layer is zero).
- "lecture": L = E‖f_θ(z_t, t) - z_0‖² + λ E‖f_θ(z_t, t) - f_θ(z_s, s)‖², s < t, with independent
  noises for z_t and z_s, as the lecture states it (gradients through both terms; ‖·‖² is a mean
  over dimensions). With independent noises z_s is not on z_t's ODE trajectory, so its
  consistency term pulls f towards E[z_0 | ...] rather than along a trajectory: kept as stated.
- "ict": consistency training without a teacher on Karras' σ grid (σ_min 0.002, σ_max 80,
  ρ = 7) with the doubling curriculum N(k) = min(s0 2^⌊k/K'⌋, s1) + 1, K' = ⌊K/(log2(s1/s0)+1)⌋,
  lognormal noise levels p(σ_i) ∝ erf((log σ_{i+1} - P_mean)/(√2 P_std)) - erf((log σ_i -
  P_mean)/(√2 P_std)), the pseudo-Huber distance √(‖a-b‖² + c²) - c with c = 0.00054 √d, weight
  1/(σ_{i+1} - σ_i), and the target θ⁻ = stop_grad(θ). A level σ is the VP point ᾱ = 1/(1+σ²),
  at the (fractional) timestep of the training schedule with that ᾱ.

With ``adapters.rank`` > 0 (LCM-LoRA) only LoRA adapters on the frozen teacher train: the
student is merge(teacher, adapters); there is no ω-embedding, and the target is the student
itself under stop_gradient (no separate network).
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from diffusax import consistency, diffusion
from diffusax.config import ConfigError
from diffusax.methods import base, ddpm

OBJECTIVES = ("lcm", "lecture", "ict")
LOSSES = ("l2", "huber")
KARRAS = dict(sigma_min=0.002, sigma_max=80.0, rho=7.0)


# ---------------------------------------------------------------------------------------------
# The maths, as pure functions


def distance(a, b, kind: str, c: float):
    """LCM's distance between consistency outputs: the mean squared error, or the mean of
    √((a-b)² + c²) - c over elements (``kind`` "huber", as diffusers' LCM scripts)."""
    if kind == "l2":
        return jnp.mean((a - b) ** 2)
    return jnp.mean(jnp.sqrt((a - b) ** 2 + c**2) - c)


def guided(cond, uncond, w):
    """cond + ω (cond - uncond), ω (B,) broadcast: classifier-free guidance at scale 1 + ω."""
    w = w.reshape((-1,) + (1,) * (cond.ndim - 1))
    return cond + w * (cond - uncond)


def ddim_solver_step(x0, eps, abar_s):
    """One deterministic DDIM step to ᾱ_s from the (guided) x̂_0 and ε̂: √ᾱ_s x̂_0 + √(1-ᾱ_s) ε̂."""
    abar_s = abar_s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.sqrt(abar_s) * x0 + jnp.sqrt(1.0 - abar_s) * eps


def lecture_terms(f_t, f_s, x0):
    """(L_rec, L_cons) of the lecture: E‖f(z_t,t) - z_0‖², E‖f(z_t,t) - f(z_s,s)‖² (means)."""
    rec = jnp.mean(diffusion.mean_flat((f_t - x0) ** 2))
    cons = jnp.mean(diffusion.mean_flat((f_t - f_s) ** 2))
    return rec, cons


def ict_num_scales(step, total_steps: int, s0: int, s1: int):
    """N(k) = min(s0 · 2^⌊k/K'⌋, s1) + 1, K' = ⌊K / (log2(s1/s0) + 1)⌋ (at least 1)."""
    k_prime = max(int(total_steps // (math.log2(s1 / s0) + 1)), 1)
    doublings = jnp.minimum(step // k_prime, 30)
    return jnp.minimum(s0 * 2**doublings, s1) + 1


def karras_sigmas(num_scales, max_scales: int, sigma_min, sigma_max, rho):
    """σ_i = (σ_min^{1/ρ} + i/(N-1) (σ_max^{1/ρ} - σ_min^{1/ρ}))^ρ for i < max_scales (entries
    i ≥ N are past σ_max and never drawn). ``num_scales`` N may be traced."""
    i = jnp.arange(max_scales, dtype=jnp.float32)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + i / (num_scales - 1) * (hi - lo)) ** rho


def ict_level_logits(sigmas, num_scales, p_mean, p_std):
    """log p(i) of the pair (σ_i, σ_{i+1}), i < N - 1 (the lognormal mass between them)."""
    cdf = jax.scipy.special.erf((jnp.log(sigmas) - p_mean) / (math.sqrt(2.0) * p_std))
    mass = cdf[1:] - cdf[:-1]  # (max_scales - 1,)
    valid = jnp.arange(mass.shape[0]) < num_scales - 1
    return jnp.where(valid & (mass > 0), jnp.log(jnp.maximum(mass, 1e-30)), -jnp.inf)


def x0_at(prediction: str, z, abar, out):
    """x̂_0 from a network output at z = √ᾱ x_0 + √(1-ᾱ) ε, ᾱ (B,) given directly."""
    a = jnp.sqrt(abar).reshape((-1,) + (1,) * (z.ndim - 1))
    s = jnp.sqrt(1.0 - abar).reshape(a.shape)
    if prediction == "eps":
        return (z - s * out) / a
    if prediction == "x0":
        return out
    return a * z - s * out  # v = √ᾱ ε - √(1-ᾱ) x_0


def floored_x0(z, abar, out, min_abar: float):
    """The student's x̂_0 from its ε-output when that ε is read at ᾱ' = max(ᾱ, min_abar):
    (z - √(1-ᾱ') F)/√ᾱ'. Below the floor (the top timesteps of a cosine schedule, ᾱ_999 =
    2.4e-9) the exact (z - √(1-ᾱ) F)/√ᾱ multiplies F's error by 1/√ᾱ ~ 2·10⁴, beyond what a
    network can learn, so a 1-step sample could not be sharp; with the floor, F learns
    (z - √ᾱ' x_0)/√(1-ᾱ'), and above it nothing changes (the student still starts as the
    teacher there). ``abar`` (B,) or scalar."""
    return x0_at("eps", z, jnp.maximum(jnp.asarray(abar, jnp.float32), min_abar), out)


def timestep_of_abar(abar, sched_abar):
    """The fractional timestep where the schedule's ᾱ (decreasing) equals ``abar``: linear in
    log SNR between the two neighbouring timesteps, clamped to [0, T-1]."""
    log_snr = np.log(np.asarray(sched_abar, np.float64)) - np.log1p(-np.asarray(sched_abar))
    x = jnp.log(abar) - jnp.log1p(-abar)
    # jnp.interp needs increasing abscissae: log SNR falls with t.
    steps = jnp.arange(len(log_snr), dtype=jnp.float32)
    return jnp.interp(-x, jnp.asarray(-log_snr, jnp.float32), steps)


# ---------------------------------------------------------------------------------------------
# The method


class LCM(ddpm.DDPM):
    """networks {"teacher" (frozen), "student" | "lora"}; EMA {"target"} for full LCM."""

    name = "lcm"
    param_sections = ("model", "adapters")

    # -- config ---------------------------------------------------------------------------

    def validate(self, cfg):
        super().validate(cfg)
        c, a = cfg.lcm, cfg.adapters
        if c.objective not in OBJECTIVES:
            raise ConfigError(f"config field 'lcm.objective' must be one of {OBJECTIVES}")
        if c.teacher and not c.teacher.startswith(("run:", "diffusers:")):
            raise ConfigError(
                f"config field 'lcm.teacher' must be 'run:DIR' or 'diffusers:DIR', got "
                f"{c.teacher!r}"
            )
        if (c.objective == "lcm" or a.rank) and not c.teacher:
            why = "LoRA adapters need a base" if a.rank else "distillation needs a teacher"
            raise ConfigError(f"config field 'lcm.teacher' is empty: {why} ('run:DIR')")
        T = cfg.diffusion.num_timesteps
        if not 1 <= c.num_ddim_timesteps <= T or T % c.num_ddim_timesteps:
            raise ConfigError(
                f"config field 'lcm.num_ddim_timesteps' must divide diffusion.num_timesteps="
                f"{T}, got {c.num_ddim_timesteps}"
            )
        if not 0 <= c.w_min <= c.w_max:
            raise ConfigError(
                f"config fields 'lcm.w_min' / 'lcm.w_max' need 0 <= w_min <= w_max, got "
                f"{c.w_min} / {c.w_max}"
            )
        base.check_fields(cfg, "lcm", positive=("huber_c", "sigma_data", "timestep_scaling"))
        base.check_fields(
            cfg, "lcm", unit_interval=("ema_decay", "min_abar"), non_negative=("lecture_lambda",)
        )
        if c.loss not in LOSSES:
            raise ConfigError(f"config field 'lcm.loss' must be one of {LOSSES}, got {c.loss!r}")
        if not 1 <= c.ict_s0 <= c.ict_s1:
            raise ConfigError("config fields 'lcm.ict_s0' / 'lcm.ict_s1' need 1 <= s0 <= s1")
        base.check_fields(cfg, "lcm", positive=("ict_p_std",))
        if cfg.diffusion.var_type in diffusion.LEARNED_VAR_TYPES:
            raise ConfigError(
                "config field 'diffusion.var_type': a consistency model has no variance output"
            )
        if a.rank < 0 or (a.rank and not a.targets):
            raise ConfigError("config field 'adapters.rank' must be >= 0, with adapters.targets")
        embed = cfg.model.guidance_embed_dim
        if embed and a.rank:
            raise ConfigError(
                "config field 'model.guidance_embed_dim' must be 0 with LoRA adapters "
                "(LCM-LoRA keeps the teacher's architecture: no ω-embedding)"
            )
        if embed and cfg.model.name != "unet":
            raise ConfigError("config field 'model.guidance_embed_dim' applies to model 'unet'")
        if embed and c.objective != "lcm":
            raise ConfigError(
                f"config field 'model.guidance_embed_dim' is {embed}: only objective 'lcm' "
                f"has a guidance scale ω to embed (lcm.objective is {c.objective!r})"
            )

    def prepare(self, cfg):
        train_teacher_if_missing(self.name, cfg.lcm.teacher, cfg.lcm.teacher_experiment)

    # -- networks -------------------------------------------------------------------------

    def _lora(self, cfg) -> bool:
        return cfg.adapters.rank > 0

    def networks(self, cfg, data):
        from diffusax.train.state import model_builder

        shape = self.model_shape(cfg, data)
        cond = ddpm.condition_of(cfg, data)
        teacher_cfg = cfg.copy_and_resolve_references()
        teacher_cfg.model.guidance_embed_dim = 0
        nets = {}
        if cfg.lcm.teacher:
            nets["teacher"] = base.Network(
                build=model_builder(teacher_cfg, shape, data.num_classes, cond),
                trainable=False,
                source=cfg.lcm.teacher,
                load=teacher_loader(cfg.lcm.teacher, cfg.lcm.teacher_experiment),
            )
        if self._lora(cfg):
            nets["lora"] = base.Network(build=adapters_builder(cfg, nets["teacher"].build))
        else:
            start = nets["teacher"].load if "teacher" in nets else None
            nets["student"] = base.Network(
                build=model_builder(cfg, shape, data.num_classes, cond),
                source=cfg.lcm.teacher,
                init_from=start,
            )
        return nets

    def groups(self, cfg):
        name = "lora" if self._lora(cfg) else "student"
        return {name: base.Group(name, optim="optim")}

    def emas(self, cfg):
        if self._lora(cfg) or cfg.lcm.objective != "lcm":
            return {}  # LCM-LoRA and iCT: the target is the student under stop_gradient
        return {"target": base.Ema("student", cfg.lcm.ema_decay)}

    def sample_params(self, state, frozen, cfg):
        if "lora" in state.params:
            return merged_params(frozen["teacher"], state.params["lora"], adapter_scale(cfg))
        return state.ema["target"] if "target" in state.ema else state.params["student"]

    def sample_network(self, cfg):
        return "teacher" if self._lora(cfg) else "student"

    # -- the loss -------------------------------------------------------------------------

    def updates(self, cfg, ctx):
        objective = cfg.lcm.objective
        make = {"lcm": self._distillation_loss, "lecture": self._lecture_loss}
        loss = make.get(objective, self._ict_loss)(cfg, ctx)
        group = "lora" if self._lora(cfg) else "student"
        return [
            base.GradUpdate(group, loss, with_ema=objective == "lcm", with_step=objective == "ict")
        ]

    def _parts(self, cfg, ctx):
        """(student(params, frozen) -> apply(x, t, y, ω), consistency f(out, z, t), the
        condition's (y of a batch, null of y))."""
        sched = ddpm.make_schedule(cfg)
        c = cfg.lcm
        prediction = cfg.diffusion.prediction
        lora = self._lora(cfg)
        scale = adapter_scale(cfg)
        embed = cfg.model.guidance_embed_dim > 0
        student_net = "teacher" if lora else "student"
        graphdef = ctx.graphdefs[student_net]

        def student(params, frozen):
            from flax import nnx

            if lora:
                tree = merged_params(frozen["teacher"], params["lora"], scale)
            else:
                tree = params["student"]

            def apply(x, t, y, w):
                model = nnx.merge(graphdef, tree)
                return model(x, t, y, guidance=w if embed else None)

            return apply

        floor = prediction == "eps" and c.min_abar > 0

        def f(out, z, t, abar=None):
            """f(z, t) from the network output at z; ``abar`` (B,) for a fractional t."""
            if floor:
                a = sched.alphas_cumprod[t] if abar is None else abar
                x0 = floored_x0(z, a, out, c.min_abar)
            elif abar is None:
                x0, _ = diffusion.x0_eps_from_prediction(sched, prediction, z, t, out)
            else:
                x0 = x0_at(prediction, z, abar, out)
            if c.clip_x0:
                x0 = jnp.clip(x0, -c.clip_x0, c.clip_x0)
            return consistency.consistency_function(
                z, t, x0, sigma_data=c.sigma_data, timestep_scaling=c.timestep_scaling
            )

        cond = ddpm.condition_of(cfg, ctx.data)
        classes = ctx.data.num_classes

        def labels_of(batch):
            return batch.get("label") if cond is None else cond.from_batch(batch)

        def null_of(y):
            if cond is not None:
                return jax.tree.map(jnp.asarray, cond.null(jax.tree.leaves(y)[0].shape[0]))
            return jnp.full_like(y, classes)

        if cond is None and not cfg.model.class_conditional:
            labels_of = lambda batch: None
        return sched, student, f, labels_of, null_of

    def _distillation_loss(self, cfg, ctx):
        sched, student, f, labels_of, null_of = self._parts(cfg, ctx)
        c = cfg.lcm
        T = cfg.diffusion.num_timesteps
        grid = jnp.asarray(consistency.lcm_origin_timesteps(T, c.num_ddim_timesteps))
        k = T // c.num_ddim_timesteps
        teacher = ctx.apply_fn("teacher")
        prediction = cfg.diffusion.prediction
        lora = self._lora(cfg)

        def loss(params, frozen, batch, key, ema):
            x0 = batch["image"]
            y = labels_of(batch)
            n = x0.shape[0]
            k_idx, k_noise, k_w = jax.random.split(key, 3)
            t = grid[jax.random.randint(k_idx, (n,), 0, grid.shape[0])]  # (B,)
            s = jnp.maximum(t - k, 0)  # (B,)
            noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
            z_t = diffusion.q_sample(sched, x0, t, noise)
            w = jax.random.uniform(k_w, (n,), minval=c.w_min, maxval=c.w_max)
            f_student = f(student(params, frozen)(z_t, t, y, w), z_t, t)

            # The teacher's guided DDIM step from t to s (no gradient: frozen).
            if y is None:
                out = teacher(frozen["teacher"], z_t, t, None)
                x0_g, eps_g = diffusion.x0_eps_from_prediction(sched, prediction, z_t, t, out)
            else:
                from diffusax import conditions

                both = teacher(
                    frozen["teacher"],
                    jnp.concatenate([z_t, z_t]),
                    jnp.concatenate([t, t]),
                    conditions.concat(y, null_of(y)),
                )
                x0_2, eps_2 = diffusion.x0_eps_from_prediction(
                    sched, prediction, jnp.concatenate([z_t, z_t]), jnp.concatenate([t, t]), both
                )
                x0_g = guided(*jnp.split(x0_2, 2), w)
                eps_g = guided(*jnp.split(eps_2, 2), w)
            if c.clip_x0:  # as the teacher's DDIM sampler: x̂_0 clipped, ε̂ recomputed from it
                x0_g = jnp.clip(x0_g, -c.clip_x0, c.clip_x0)
                eps_g = diffusion.eps_from_x0(sched, z_t, t, x0_g)
            z_s = ddim_solver_step(x0_g, eps_g, sched.alphas_cumprod[s])
            z_s = jax.lax.stop_gradient(z_s)

            target_params = params if lora else {"student": ema["target"]}
            out_s = student(target_params, frozen)(z_s, s, y, w)
            f_target = jax.lax.stop_gradient(f(out_s, z_s, s))
            value = distance(f_student, f_target, c.loss, c.huber_c)
            return value, {"loss": value, "target_gap": jnp.mean(jnp.abs(f_student - f_target))}

        return loss

    def _lecture_loss(self, cfg, ctx):
        sched, student, f, labels_of, _ = self._parts(cfg, ctx)
        T = cfg.diffusion.num_timesteps
        lam = cfg.lcm.lecture_lambda

        def loss(params, frozen, batch, key):
            x0 = batch["image"]
            y = labels_of(batch)
            n = x0.shape[0]
            k_t, k_s, k_e1, k_e2 = jax.random.split(key, 4)
            t = jax.random.randint(k_t, (n,), 1, T)  # s < t needs t >= 1
            s = jax.random.randint(k_s, (n,), 0, t)
            z_t = diffusion.q_sample(sched, x0, t, jax.random.normal(k_e1, x0.shape))
            z_s = diffusion.q_sample(sched, x0, s, jax.random.normal(k_e2, x0.shape))
            apply = student(params, frozen)
            f_t = f(apply(z_t, t, y, None), z_t, t)
            f_s = f(apply(z_s, s, y, None), z_s, s)
            rec, cons = lecture_terms(f_t, f_s, x0)
            value = rec + lam * cons
            return value, {"loss": value, "rec": rec, "cons": cons}

        return loss

    def _ict_loss(self, cfg, ctx):
        sched, student, f, labels_of, _ = self._parts(cfg, ctx)
        c = cfg.lcm
        total = cfg.train.num_steps
        max_scales = c.ict_s1 + 1
        sched_abar = np.asarray(sched.alphas_cumprod)

        def loss(params, frozen, batch, key, step):
            x0 = batch["image"]
            y = labels_of(batch)
            n = x0.shape[0]
            num_scales = ict_num_scales(step, total, c.ict_s0, c.ict_s1)
            sigmas = karras_sigmas(num_scales, max_scales, **KARRAS)
            logits = ict_level_logits(sigmas, num_scales, c.ict_p_mean, c.ict_p_std)
            k_i, k_e = jax.random.split(key)
            i = jax.random.categorical(k_i, logits, shape=(n,))  # (B,)
            sigma_lo, sigma_hi = sigmas[i], sigmas[i + 1]
            noise = jax.random.normal(k_e, x0.shape)
            apply = student(params, frozen)

            def point(sigma):
                abar = 1.0 / (1.0 + sigma**2)
                b = (-1,) + (1,) * (x0.ndim - 1)
                z = jnp.sqrt(abar).reshape(b) * (x0 + sigma.reshape(b) * noise)
                return z, timestep_of_abar(abar, sched_abar), abar

            z_hi, t_hi, a_hi = point(sigma_hi)
            z_lo, t_lo, a_lo = point(sigma_lo)
            f_hi = f(apply(z_hi, t_hi, y, None), z_hi, t_hi, a_hi)
            f_lo = jax.lax.stop_gradient(f(apply(z_lo, t_lo, y, None), z_lo, t_lo, a_lo))
            dims = x0[0].size
            c_huber = 0.00054 * math.sqrt(dims)
            d = jnp.sqrt(jnp.sum((f_hi - f_lo).reshape(n, -1) ** 2, axis=1) + c_huber**2)
            weight = 1.0 / (sigma_hi - sigma_lo)
            value = jnp.mean(weight * (d - c_huber))
            return value, {"loss": value, "num_scales": num_scales.astype(jnp.float32)}

        return loss

    # -- sampling -------------------------------------------------------------------------

    def make_sampler(self, run, sample_cfg, *, clip: bool = True):
        cfg = run.cfg
        s = sample_cfg.copy_and_resolve_references()
        embed = cfg.model.guidance_embed_dim > 0
        w = s.guidance_scale - 1.0
        if embed:  # ω goes into the network, not through a second, unconditional call
            s.guidance_scale = 1.0
        graphdef = run.ctx.graphdefs[self.sample_network(cfg)]

        def network(params, x, t, y, dropout_key):
            from flax import nnx

            guidance = jnp.full((x.shape[0],), w, jnp.float32) if embed else None
            return nnx.merge(graphdef, params)(x, t, y, guidance=guidance, dropout_key=dropout_key)

        return student_generate(
            self, run, s, network, cfg.lcm.min_abar, lcm_sampler_kwargs(cfg, s), clip=clip
        )

    def teacher_sampler(self, run, sample_cfg):
        return teacher_generate(self, run, sample_cfg)

    def describe(self, cfg):
        c, a = cfg.lcm, cfg.adapters
        what = f"LoRA rank {a.rank}" if a.rank else f"EMA target {c.ema_decay}"
        return (
            f"{self.name}  (objective={c.objective}, teacher={c.teacher or 'none'}, {what}, "
            f"ω ~ U[{c.w_min}, {c.w_max}], {c.loss} loss, N={c.num_ddim_timesteps})"
        )

    def evaluate(self, cfg, workdir):
        from diffusax.evaluate import few_step

        return few_step.evaluate(cfg, workdir)

    def format_report(self, report):
        from diffusax.evaluate import few_step

        return few_step.format_report(report)


def train_teacher_if_missing(method: str, teacher: str, experiment: str):
    """Before a distillation trains: train the teacher "run:DIR" first when it has no
    checkpoint and ``experiment`` names the experiment that makes it."""
    if not teacher.startswith("run:") or not experiment:
        return
    run_dir = teacher[len("run:") :]
    ckpts = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(ckpts) and os.listdir(ckpts):
        return
    from diffusax import config as config_lib
    from diffusax.train import loop

    teacher_cfg = config_lib.load_experiment(experiment)
    print(f"{method}: the teacher {run_dir} has no checkpoint: training it first ({experiment})")
    result = loop.train(teacher_cfg, run_dir)
    if result.stopped_by is not None:
        raise ConfigError(f"the teacher's training ({experiment}) was stopped; run it again")


def student_generate(method, run, sample_cfg, network, min_abar, sampler_kwargs, *, clip=True):
    """``ddpm.make_generate`` of a few-step student (LCM, ADD): ``network(params, x, t, y,
    dropout_key)`` gives its raw output. With an ε student and ``min_abar`` > 0 that output is
    turned into the student's own x̂_0 as in training (``floored_x0``) and handed to the sampler
    as an "x0" prediction."""
    cfg = run.cfg
    sched = ddpm.make_schedule(cfg)
    floor = cfg.diffusion.prediction == "eps" and min_abar > 0

    def apply_fn(params, x, t, y=None, dropout_key=None):
        out = network(params, x, t, y, dropout_key)
        return floored_x0(x, sched.alphas_cumprod[t], out, min_abar) if floor else out

    if floor:
        cfg = cfg.copy_and_resolve_references()
        cfg.diffusion.prediction = "x0"
    return ddpm.make_generate(
        cfg,
        apply_fn,
        sched,
        run.data.num_classes,
        method.model_shape(cfg, run.data),
        sample_cfg=sample_cfg,
        mesh=run.mesh,
        condition=ddpm.condition_of(cfg, run.data),
        clip=clip,
        sampler_kwargs=sampler_kwargs,
    )


def teacher_generate(method, run, sample_cfg):
    """The frozen teacher's own generate (DDIM or another sampler of ``sample_cfg``), on the
    run's schedule (the one it was trained on)."""
    cfg = run.cfg
    return ddpm.make_generate(
        cfg,
        run.ctx.apply_fn("teacher"),
        ddpm.make_schedule(cfg),
        run.data.num_classes,
        method.model_shape(cfg, run.data),
        sample_cfg=sample_cfg,
        mesh=run.mesh,
        condition=ddpm.condition_of(cfg, run.data),
    )


def lcm_sampler_kwargs(cfg, sample_cfg) -> dict:
    """The consistency scalings the "lcm" sampler takes ({} for the other samplers)."""
    if sample_cfg.sampler != "lcm":
        return {}
    return dict(
        sigma_data=cfg.lcm.sigma_data,
        timestep_scaling=cfg.lcm.timestep_scaling,
        lcm_origin_steps=cfg.lcm.num_ddim_timesteps,  # the grid the student was trained on
    )


def adapter_scale(cfg) -> float:
    a = cfg.adapters
    return (a.alpha or a.rank) / a.rank if a.rank else 1.0


def merged_params(base_tree, adapter_tree, scale):
    from diffusax import lora

    return lora.merge(base_tree, adapter_tree, scale)


def adapters_builder(cfg, teacher_build):
    """key -> the LoRA adapters on the teacher's kernels that ``adapters.targets`` selects."""
    from flax import nnx

    from diffusax import lora
    from diffusax.train.state import split_params

    a = cfg.adapters

    def build(key):
        _, abstract = split_params(nnx.eval_shape(lambda: teacher_build(key)))
        return lora.adapters_for(abstract, tuple(a.targets), a.rank, key)

    return build


def teacher_loader(source: str, experiment: str = ""):
    """The teacher's parameter tree from "run:DIR" (its EMA) or "diffusers:DIR" (UNet2DModel)."""
    kind, path = source.split(":", 1)
    if kind == "diffusers":

        def load():
            from diffusax.convert.diffusers_unet import load_diffusers_unet
            from diffusax.train.state import split_params

            return split_params(load_diffusers_unet(path))[1]

        return load
    from diffusax.train.build import load_from_run

    read = load_from_run(path)

    def load():
        try:
            return read()
        except FileNotFoundError as e:
            hint = f"make train EXP={os.path.splitext(os.path.basename(experiment))[0]}"
            raise FileNotFoundError(
                f"{e} (the teacher {source!r}; {hint + ' makes it' if experiment else ''})"
            ) from e

    return load


base.register(LCM())
