"""The autoencoder method through the one loop: two optimizers each changing only its own
network, 8 devices equal to one, a bitwise resume through a real Orbax checkpoint, `make eval`'s
files, and its config errors. (The SIGKILL drill is in test_drills_kill.py.)"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from drills import helpers as dh

from diffusax import methods
from diffusax.config import ConfigError, load_experiment
from diffusax.evaluate import reconstruction
from diffusax.train import loop
from diffusax.train.build import build
from diffusax.train.step import make_train_step

OVER = dict(dh.TINY_AUTOENCODER, **{"train.grid_samples": 0, "train.async_checkpoint": False})


def ae_cfg(**changes):
    return load_experiment("autoencoder_digits", overrides={**OVER, **changes})


def host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(host(a)), jax.tree.leaves(host(b)), strict=True):
        np.testing.assert_array_equal(x, y)


def test_each_optimizer_changes_only_its_own_network():
    # The GAN on from the first step, no warmup: both updates move their network at step 0.
    cfg = ae_cfg(**{"autoencoder.disc_start": 0, "optim.warmup_steps": 0})
    run = build(cfg, devices=jax.devices()[:1])
    vae_update, disc_update = run.method.updates(cfg, run.ctx)
    assert (vae_update.group, disc_update.group) == ("vae", "disc")
    batch = {
        "image": jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (16, 8, 8, 1)), jnp.float32),
        "label": jnp.zeros((16,), jnp.int32),
    }
    frozen = run.frozen()

    def step_with(updates, state):
        fn = make_train_step(updates, run.optimizers, {}, seed=cfg.seed, skip_nonfinite=False)
        return jax.jit(fn)(state, frozen, batch)

    state = run.init_state()
    both, metrics = step_with([vae_update, disc_update], state)
    assert float(metrics["disc/loss"]) > 0 and float(metrics["adaptive_weight"]) > 0
    only_vae, _ = step_with([vae_update], run.init_state())
    # The vae update moves the vae (and its Adam state), never the discriminator ...
    assert_trees_equal(only_vae.params["disc"], state.params["disc"])
    assert_trees_equal(only_vae.opt_state["disc"], state.opt_state["disc"])
    assert not np.allclose(
        host(only_vae.params["vae"])["decoder"]["conv_out"]["kernel"],
        host(state.params["vae"])["decoder"]["conv_out"]["kernel"],
    )
    # ... and in the two-update step the vae is exactly what its own update made of it,
    assert_trees_equal(both.params["vae"], only_vae.params["vae"])
    # while the discriminator update changes the discriminator alone.
    only_disc, _ = step_with([disc_update], only_vae._replace(step=state.step))
    assert_trees_equal(only_disc.params["vae"], only_vae.params["vae"])
    assert not np.allclose(
        host(only_disc.params["disc"])["conv_in"]["kernel"],
        host(state.params["disc"])["conv_in"]["kernel"],
    )


def test_no_discriminator_before_disc_start():
    cfg = ae_cfg(**{"autoencoder.disc_start": 100})
    run = build(cfg, devices=jax.devices()[:1])
    state = run.init_state()
    batch = {"image": jnp.zeros((16, 8, 8, 1)), "label": jnp.zeros((16,), jnp.int32)}
    new, metrics = jax.jit(run.step_fn)(state, run.frozen(), batch)
    assert float(metrics["disc/loss"]) == 0.0 and float(metrics["gen"]) == 0.0
    assert_trees_equal(new.params["disc"], state.params["disc"])  # zero gradients: no move


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("autoencoder")
    cfg = ae_cfg(**{"train.num_steps": 6, "train.checkpoint_every": 3})
    sharded = loop.train(cfg, str(root / "sharded"))  # 8 fake devices
    single = loop.train(cfg, str(root / "single"), devices=jax.devices()[:1])
    return cfg, root, sharded, single


def test_eight_devices_equal_one(runs):
    _, _, sharded, single = runs
    assert sharded.run.mesh.size == 8 and single.run.mesh.size == 1
    steps = sorted(single.losses)
    assert steps == sorted(sharded.losses) == list(range(6))
    np.testing.assert_allclose(
        [sharded.losses[s] for s in steps], [single.losses[s] for s in steps], rtol=2e-5
    )
    for a, b in zip(
        jax.tree.leaves(host(sharded.state.params)),
        jax.tree.leaves(host(single.state.params)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_resume_through_a_real_checkpoint_is_bitwise(runs, tmp_path):
    cfg, _root, sharded, _ = runs
    half = ae_cfg(**{"train.num_steps": 3, "train.checkpoint_every": 3})
    first = loop.train(half, str(tmp_path / "resumed"))
    assert sorted(first.losses) == [0, 1, 2]
    second = loop.train(cfg, str(tmp_path / "resumed"))  # restores step 3 from disk
    assert second.start_step == 3 and sorted(second.losses) == [3, 4, 5]
    for s in (3, 4, 5):
        assert second.losses[s] == sharded.losses[s]
    assert_trees_equal(second.state, sharded.state)


def test_eval_writes_the_reconstructions(runs):
    _cfg, root, _, _ = runs
    workdir = str(root / "sharded")
    metrics = methods.get("autoencoder").evaluate(ae_cfg(**{"eval.classifier_steps": 100}), workdir)
    for key in ("psnr", "fd_reconstructions", "accuracy_reconstructions", "accuracy_originals"):
        assert np.isfinite(metrics[key]), key
    assert 0 <= metrics["accuracy_reconstructions"] <= 1
    with np.load(os.path.join(workdir, "eval", "reconstructions.npz")) as npz:
        assert sorted(npz.files) == ["labels", "originals", "reconstructions"]
        assert npz["originals"].dtype == npz["reconstructions"].dtype == np.uint8
        assert npz["originals"].shape == npz["reconstructions"].shape == (300, 8, 8, 1)
        assert npz["labels"].shape == (300,)
    assert "PSNR" in reconstruction.format_report(metrics)


def test_the_classifier_sees_upsampled_images_exactly_as_they_were():
    from diffusax.methods.autoencoder import resize

    x = np.random.default_rng(1).uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32)
    up = np.asarray(resize(x, 16))  # (4, 16, 16, 1)
    np.testing.assert_allclose(reconstruction.to_data_size(up, (8, 8, 1)), x, atol=1e-5)
    blurred = np.asarray(jax.image.resize(up, (4, 8, 8, 1), "linear", antialias=True))
    assert np.abs(blurred - x).max() > 0.05  # a plain downsampling would not give them back


def test_upsampled_training_keeps_4x_fewer_latent_dimensions():
    cfg = load_experiment("autoencoder_digits")
    run = build(cfg, devices=jax.devices()[:1])
    from flax import nnx

    model = nnx.eval_shape(lambda: run.networks["vae"].build(run.init_key))
    h, w, c = model.latent_shape((16, 16, 1))
    assert cfg.autoencoder.image_size == 16 and 16 * 16 * 1 >= 4 * h * w * c


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"autoencoder.reconstruction": "l3"}, r"'autoencoder\.reconstruction' is 'l3'"),
        ({"autoencoder.norm_num_groups": 3}, r"'autoencoder\.norm_num_groups' \(3\) must divide"),
        ({"autoencoder.kl_weight": -1.0}, r"'autoencoder\.kl_weight' must be >= 0"),
        ({"autoencoder.perceptual_weight": 0.1}, r"'autoencoder\.perceptual_weight' > 0 needs"),
        ({"autoencoder.image_size": 9}, r"'autoencoder\.block_out_channels' has 2 levels"),
    ],
)
def test_bad_autoencoder_fields_name_the_field(changes, message):
    with pytest.raises(ConfigError, match=message):
        build(ae_cfg(**changes))
