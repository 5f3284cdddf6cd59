"""Guidance and DiT-style sampling as a config selects them.

- `sample.guided_channels`: -1 guides every output channel, N the first N (the others keep the
  conditional output), checked against a model whose guided output is known by hand;
- label weights: a one-hot weight vector is the label, a mixture the mixed embedding, and the
  guided branch of a mixture is the one-hot null label;
- `sample.sampler=ddpm sample.num_steps=250 sample.spacing=uniform` is DiT's FID sampler: it
  visits Improved DDPM's respaced timesteps, and each respaced step with a learned-range variance
  is the step of diffusers' DDPMScheduler on the same timesteps;
- the config fields are validated, naming the field.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusax import config as config_lib
from diffusax import gaussian, methods, sampling, schedules
from diffusax.config import ConfigError, check_runtime, load_experiment
from diffusax.models.dit import DiT
from diffusax.models.layers import embed_labels
from diffusax.models.unet import UNet

# ---------------------------------------------------------------------------- guided channels

# x_0-predictions of a fake 3-class model on 2-channel images: row y for label y, row 3 = null.
TABLE = jnp.array([[0.2, -0.1], [0.4, 0.3], [-0.3, 0.5], [-0.2, 0.1]])


def table_apply(params, x, t, y):
    """The x_0 prediction TABLE[y] (int labels) or w TABLE (label weights), at every pixel."""
    del params, t
    rows = TABLE[y] if jnp.issubdtype(y.dtype, jnp.integer) else y @ TABLE  # (B, 2)
    return jnp.broadcast_to(rows[:, None, None, :], x.shape)


def one_step_cfg(**sample):
    """DDIM with one step and x_0-prediction: the sample is the (guided) x_0 prediction itself."""
    overrides = {
        "diffusion.prediction": "x0",
        "diffusion.num_timesteps": 10,
        "sample.sampler": "ddim",
        "sample.num_steps": 1,
        "sample.clip_x0": 0.0,
        "sample.guidance_scale": 1.5,
    }
    overrides.update({f"sample.{k}": v for k, v in sample.items()})
    return load_experiment("ddpm_digits", overrides=overrides)


def generate_one_step(cfg, labels):
    sched = methods.make_schedule(cfg)
    generate = methods.make_generate(cfg, table_apply, sched, 3, (2, 2, 2))
    return np.asarray(generate({}, labels, jax.random.key(0)))[:, 0, 0, :]  # (B, 2)


def guided_by_hand(cond, scale, channels):
    """u + s (c - u) on the first ``channels`` channels, the conditional c on the others."""
    null = np.asarray(TABLE[3])
    out = np.array(cond, np.float32)
    out[:, :channels] = null[:channels] + scale * (out[:, :channels] - null[:channels])
    return out


def test_guidance_covers_every_channel_by_default_and_the_first_n_on_request():
    labels = jnp.array([0, 1, 2, 1], jnp.int32)
    cond = np.asarray(TABLE)[np.asarray(labels)]
    every = generate_one_step(one_step_cfg(), labels)
    np.testing.assert_allclose(every, guided_by_hand(cond, 1.5, 2), atol=1e-6)
    first = generate_one_step(one_step_cfg(guided_channels=1), labels)
    np.testing.assert_allclose(first, guided_by_hand(cond, 1.5, 1), atol=1e-6)
    assert np.abs(first - every).max() > 0.1  # channel 1 tells the two apart
    unguided = generate_one_step(one_step_cfg(guidance_scale=1.0, guided_channels=1), labels)
    np.testing.assert_allclose(unguided, cond, atol=1e-6)


def test_label_weights_are_guided_against_the_one_hot_null_label():
    weights = jnp.array([[0.5, 0.5, 0.0, 0.0], [0.0, 0.25, 0.75, 0.0]])  # (B, num_classes + 1)
    cond = np.asarray(weights @ TABLE)
    np.testing.assert_allclose(
        generate_one_step(one_step_cfg(), weights), guided_by_hand(cond, 1.5, 2), atol=1e-6
    )


# ---------------------------------------------------------------------------- label weights


def test_embed_labels_is_the_row_or_the_weighted_sum_of_rows():
    embed = nnx.Embed(11, 6, rngs=nnx.Rngs(0))
    table = np.asarray(embed.embedding[...])
    onehot = jax.nn.one_hot(jnp.array([3, 10]), 11)
    np.testing.assert_array_equal(embed_labels(embed, onehot), table[[3, 10]])
    lam = 0.3
    mixed = embed_labels(embed, (1 - lam) * onehot[:1] + lam * jax.nn.one_hot(jnp.array([5]), 11))
    np.testing.assert_allclose(mixed[0], (1 - lam) * table[3] + lam * table[5], rtol=1e-6)
    bf16 = nnx.Embed(11, 6, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))  # rounds as the lookup does
    np.testing.assert_array_equal(
        embed_labels(bf16, onehot), embed_labels(bf16, jnp.array([3, 10]))
    )


@pytest.mark.parametrize("family", ["dit", "unet"])
def test_a_one_hot_weight_vector_is_the_label(family):
    if family == "dit":
        model = DiT(depth=1, hidden=32, heads=2, patch=2, input_size=8, in_channels=1,
                    num_classes=10, learn_sigma=False, rngs=nnx.Rngs(0))  # fmt: skip
    else:
        model = UNet(in_channels=1, out_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                     attn_resolutions=(), resolution=8, num_classes=10, norm_groups=8,
                     rngs=nnx.Rngs(0))  # fmt: skip
    # A fresh model's label embedding reaches the output only through zero-initialised layers:
    # perturb every parameter so that the label matters.
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit  # one program: eager ops would compile one kernel per parameter shape
    def perturb(params):
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        noisy = [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
        return jax.tree.unflatten(treedef, noisy)

    params = perturb(params)
    model = jax.jit(lambda x, t, y: nnx.merge(graphdef, params, rest)(x, t, y))
    x = jax.random.normal(jax.random.key(2), (3, 8, 8, 1))
    t = jnp.array([5, 500, 900])
    labels = jnp.array([0, 7, 10])  # 10: the null label
    out = model(x, t, labels)
    np.testing.assert_allclose(model(x, t, jax.nn.one_hot(labels, 11)), out, atol=1e-5)
    assert np.abs(model(x, t, jnp.array([1, 7, 10])) - out).max() > 1e-3
    with pytest.raises(ValueError, match="label weights"):
        model(x, t, jnp.ones((3, 10)))  # the null column is missing


# ---------------------------------------------------------------------------- DiT's sampler


def improved_ddpm_space_timesteps(num_timesteps, count):
    """Improved DDPM's space_timesteps(T, str(count)) for one section, as its code does it."""
    frac_stride = (num_timesteps - 1) / (count - 1)
    cur, taken = 0.0, []
    for _ in range(count):
        taken.append(round(cur))
        cur += frac_stride
    return sorted(set(taken))


def test_dit_sampler_visits_improved_ddpm_respaced_timesteps():
    """`ddpm`, 250 steps, uniform spacing, learned-range variance: the chain over
    space_timesteps(1000, "250"); the default trailing spacing is another chain."""
    cfg = load_experiment(
        "ddpm_digits",
        overrides={
            "diffusion.schedule": "linear",
            "diffusion.var_type": "learned_range",
            "sample.sampler": "ddpm",
            "sample.num_steps": 250,
            "sample.spacing": "uniform",
            "sample.guidance_scale": 1.0,
        },
    )
    sched = methods.make_schedule(cfg)

    def apply_fn(params, x, t, y):  # ε and a variance output that both depend on t
        tt = t[:, None, None, None].astype(jnp.float32) / 1000.0
        return jnp.concatenate([0.3 * x + tt, jnp.cos(7.0 * tt) * jnp.ones_like(x)], axis=-1)

    labels = jnp.array([0, 1], jnp.int32)
    key = jax.random.key(3)
    images = methods.make_generate(cfg, apply_fn, sched, 10, (4, 4, 1))({}, labels, key)
    x_T = jax.random.normal(jax.random.fold_in(key, 1), (2, 4, 4, 1))

    def run(**steps):
        return jnp.clip(
            sampling.sample(
                lambda x, t: apply_fn({}, x, t, labels), sched, x_T.shape, key,
                sampler="ddpm", var_type="learned_range", clip_x0=1.0, x_T=x_T, **steps,
            ),
            -1.0, 1.0,
        )  # fmt: skip

    expected = run(timesteps=improved_ddpm_space_timesteps(1000, 250))
    np.testing.assert_allclose(images, expected, atol=1e-6)
    trailing = run(num_steps=250, spacing="trailing")
    assert np.abs(np.asarray(images) - np.asarray(trailing)).max() > 1e-3


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_respaced_learned_range_ddpm_steps_as_diffusers():
    """Each of the 250 respaced steps equals diffusers' DDPMScheduler(variance_type=
    'learned_range') stepping over the same timesteps with the same noise: the respaced β
    and β̃ bound the learned variance, the network sees the original timestep."""
    torch = pytest.importorskip("torch")
    from diffusers import DDPMScheduler

    data = gaussian.GaussianData(mean=jnp.array([0.3, -0.4]), cov=jnp.diag(jnp.array([0.5, 0.1])))
    sched = schedules.schedule_from_config("linear", 1000)
    steps = np.asarray(improved_ddpm_space_timesteps(1000, 250))
    sub = sampling.respace(sched, steps)
    eps_fn = gaussian.oracle_model_fn(data, sched)

    def model_fn(x, i):  # the network at original timestep steps[i], learned variance in range
        t = jnp.full((x.shape[0],), int(steps[i]), jnp.int32)
        v = gaussian.learned_range_output(data, sub, jnp.full((x.shape[0],), i, jnp.int32))
        return jnp.concatenate([eps_fn(x, t), v], axis=-1)

    ref = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        variance_type="learned_range",
        clip_sample=False,
    )
    ref.set_timesteps(timesteps=[int(t) for t in steps[::-1]])
    # Step by step from the same x (the two float32 chains would drift apart over 250 steps).
    x = jax.random.normal(jax.random.key(4), (16, 2))
    for i in range(len(steps) - 1, -1, -1):
        t = int(steps[i])
        assert t == int(ref.timesteps[len(steps) - 1 - i])
        out = model_fn(x, i)
        x_ref = ref.step(
            torch.from_numpy(np.array(out)),
            t,
            torch.from_numpy(np.array(x)),
            generator=torch.Generator().manual_seed(i),
        ).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        x, _ = sampling.ddpm_step(
            sub, out, x, i, jnp.asarray(noise.numpy()), var_type="learned_range"
        )
        np.testing.assert_allclose(x, x_ref.numpy(), rtol=1e-5, atol=1e-5, err_msg=f"step {i}")


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"sample.guided_channels": 0}, r"'sample\.guided_channels' must be -1"),
        ({"sample.guided_channels": -2}, r"'sample\.guided_channels' must be -1"),
        ({"sample.interpolate_classes": (1,)}, r"'sample\.interpolate_classes' must be two"),
        ({"sample.interpolate_classes": (-1, 2)}, r"'sample\.interpolate_classes' must be two"),
        ({"sample.interpolate_steps": 1}, r"'sample\.interpolate_steps' must be >= 2"),
        ({"sample.spacing": "even"}, r"'sample\.spacing' is 'even'; choose one of"),
    ],
)
def test_guidance_fields_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment("ddpm_digits", overrides=overrides)


def test_guided_channels_cannot_exceed_the_image_channels():
    cfg = load_experiment("ddpm_digits", overrides={"sample.guided_channels": 2})
    with pytest.raises(ConfigError, match=r"'sample\.guided_channels' \(2\) exceeds the 1"):
        check_runtime(cfg, (8, 8, 1), 10, 8)
    check_runtime(cfg, (8, 8, 3), 10, 8)


def test_the_dit_size_overrides_are_validated():
    with pytest.raises(ConfigError, match=r"'model\.heads'.*heads=5 must divide hidden=128"):
        load_experiment("dit_s2_digits", overrides={"model.heads": 5})
    with pytest.raises(ConfigError, match=r"'model\.depth' must be >= 0"):
        load_experiment("dit_s2_digits", overrides={"model.depth": -1})
    cfg = load_experiment("dit_s2_digits", overrides={"model.depth": 0, "model.hidden_size": 0})
    config_lib.validate(cfg)  # 0 = S/2's own 12 blocks of width 384 (heads: 2 divides it)
