"""DiT: the paper's variant table, parity with diffusers' DiTTransformer2DModel (unguided and
guided), scan / remat / bf16 switches, adaLN-Zero initialisation, label dropout, bad input.

The parity oracle is a real diffusers DiTTransformer2DModel with every parameter randomised
(diffusers zero-initialises the adaLN modulations and the output, which would hide a swapped
shift/scale or a transposed projection), its per-block embedder copies then made equal (diffusers
keeps a timestep/label embedder in every block, where the paper shares one; the public
checkpoints were converted from one, so their copies are equal), saved with save_pretrained and loaded back with our converter. Torch is NCHW, we are
NHWC.
"""

from __future__ import annotations

import functools
import math
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel, Transformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from flax import nnx
from jax.extend import core as jax_core

from diffusax import losses, schedules
from diffusax.convert.diffusers_dit import (
    dit_kwargs_from_diffusers,
    load_diffusers_dit,
    load_dit_params,
)
from diffusax.models import make_apply_fn
from diffusax.models.dit import (
    VARIANTS,
    DiT,
    count_params,
    dit_flops,
    patchify,
    sincos_pos_embed_2d,
    unpatchify,
)
from diffusax.sampling import classifier_free_guidance

# Peebles & Xie 2023, Table 4 (256x256 images = 32x32x4 latents, learned sigma, 1000 classes):
# parameters in millions and "Gflops" (multiply-adds) of one forward pass.
TABLE_4 = {
    "S/8": (33, 0.36),
    "S/4": (33, 1.41),
    "S/2": (33, 6.06),
    "B/8": (131, 1.42),
    "B/4": (130, 5.56),
    "B/2": (130, 23.01),
    "L/8": (459, 5.01),
    "L/4": (458, 19.70),
    "L/2": (458, 80.71),
    "XL/8": (676, 7.39),
    "XL/4": (675, 29.05),
    "XL/2": (675, 118.64),
}

# Small diffusers DiTs: learned sigma with patch 2; fixed variance, patch 4, 3 channels.
SMALL = {
    "learned_sigma": dict(
        num_attention_heads=2,
        attention_head_dim=32,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=16,
        patch_size=2,
        num_embeds_ada_norm=10,  # 10 classes; the table has 11 rows, row 10 = null
    ),
    "fixed_sigma": dict(
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=3,
        num_layers=3,
        sample_size=16,
        patch_size=4,
        num_embeds_ada_norm=5,
    ),
}

# The public facebook/DiT-XL-2-256 transformer config (saved under the legacy class name).
DIT_XL_2_256 = {
    "_class_name": "Transformer2DModel",
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "attention_head_dim": 72,
    "cross_attention_dim": None,
    "dropout": 0.0,
    "in_channels": 4,
    "norm_elementwise_affine": False,
    "norm_num_groups": 32,
    "norm_type": "ada_norm_zero",
    "num_attention_heads": 16,
    "num_embeds_ada_norm": 1000,
    "num_layers": 28,
    "num_vector_embeds": None,
    "only_cross_attention": False,
    "out_channels": 8,
    "patch_size": 2,
    "sample_size": 32,
    "upcast_attention": False,
    "use_linear_projection": False,
}

EMBEDDER = ".norm1.emb."


def randomise_torch(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random with O(1) activations; then every block's embedder copy set to
    block 0's (the public checkpoints have equal copies)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(0.2 * noise if p.ndim == 1 else noise / math.sqrt(math.prod(p.shape[1:])))
        state = model.state_dict()
        for key, value in state.items():
            if EMBEDDER in key:
                value.copy_(state["transformer_blocks.0." + key.split(".", 2)[2]])
    return model.eval()


@functools.cache
def torch_case(name: str):
    """(torch model, its numpy state dict, our model unrolled, our model scanned)."""
    torch.manual_seed(0)
    reference = randomise_torch(DiTTransformer2DModel(**SMALL[name]))
    with tempfile.TemporaryDirectory() as path:
        reference.save_pretrained(path)
        unrolled = load_diffusers_dit(path, scan_blocks=False)
        scanned = load_diffusers_dit(path, scan_blocks=True)
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    return reference, state, unrolled, scanned


def case_inputs(name: str, batch: int = 3):
    config = SMALL[name]
    rng = np.random.default_rng(1)
    size, n = config["sample_size"], config["num_embeds_ada_norm"]
    x = rng.standard_normal((batch, size, size, config["in_channels"]), dtype=np.float32)
    t = np.array([0, 999, 500, 17][:batch])
    y = np.array([n, 2, 0, 3][:batch])  # n: the null label
    return x, t, y


def torch_forward(model, x, t, y) -> np.ndarray:
    with torch.no_grad():
        out = model(
            torch.from_numpy(np.array(x).transpose(0, 3, 1, 2)),  # NHWC -> NCHW
            timestep=torch.from_numpy(np.array(t)),
            class_labels=torch.from_numpy(np.array(y)),
        ).sample
    return out.numpy().transpose(0, 2, 3, 1)  # NCHW -> NHWC


@functools.cache
def jit_apply(model: DiT):
    """model(x, t, y, dropout_key=key) jitted the functional way; cached to compile once."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, x, t, y, key: nnx.merge(graphdef, state)(x, t, y, dropout_key=key))
    return functools.partial(fn, state)


def assert_parity(ours, reference, rtol: float = 1e-5):
    ours, reference = np.asarray(ours), np.asarray(reference)
    scale = np.abs(reference).max()
    assert scale > 0.1, "degenerate reference output"
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() < rtol * scale


def from_state(name: str, **overrides) -> DiT:
    """Our DiT for a SMALL config with the torch case's parameters and extra DiT arguments."""
    kwargs = dit_kwargs_from_diffusers(SMALL[name])
    model = nnx.eval_shape(lambda: DiT(**kwargs, **overrides, rngs=nnx.Rngs(0)))
    load_dit_params(model, torch_case(name)[1])
    return model


def dot_macs(jaxpr) -> int:
    """Multiply-adds of every dot_general in a jaxpr, sub-jaxprs included (scans × length)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)
        repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else [value]:
                if isinstance(sub, jax_core.ClosedJaxpr):
                    total += repeat * dot_macs(sub.jaxpr)
                elif isinstance(sub, jax_core.Jaxpr):
                    total += repeat * dot_macs(sub)
    return total


# ---------------------------------------------------------------- the variant table


def test_variant_table_matches_table_4():
    sizes = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    assert sorted(VARIANTS) == sorted(TABLE_4)
    for name, (params_m, gflops) in TABLE_4.items():
        size, patch = name.split("/")
        assert VARIANTS[name] == dict(
            zip(("depth", "hidden", "heads"), sizes[size], strict=True)
        ) | {"patch": int(patch)}
        model = nnx.eval_shape(lambda name=name: DiT(variant=name, rngs=nnx.Rngs(0)))
        assert round(count_params(model) / 1e6) == params_m, name
        # The analytic count is exactly the multiply-adds of the model's matrix products...
        graphdef, state = nnx.split(model)
        x = jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32)
        t = jax.ShapeDtypeStruct((1,), jnp.int32)
        jaxpr = jax.make_jaxpr(lambda s, x, t: nnx.merge(graphdef, s)(x, t, t))(state, x, t)
        assert dot_macs(jaxpr.jaxpr) == dit_flops(name), name
        # ...and agrees with the paper to its rounding (±0.005) plus 0.02%: the paper's
        # counter is unpublished and differs by a few million multiply-adds (0.0186 G of
        # 118.64 for XL/2); a missing adaLN term (6·D²·depth, 0.19%) would fail.
        assert abs(dit_flops(name) / 1e9 - gflops) <= 0.005 + 2e-4 * gflops, name
    assert round(count_params(model)) == 674_834_720  # XL/2; +294,912 fixed pos-embed = 675.13M


def test_flops_of_the_512_model():
    # Table 4: DiT-XL/2 at 512x512 (64x64 latents), 524.60 Gflops.
    assert abs(dit_flops("XL/2", input_size=64) / 1e9 - 524.60) <= 0.005 + 2e-4 * 524.60
    assert dit_flops({"depth": 1, "hidden": 8, "heads": 2, "patch": 2}, 4, 1) > 0
    with pytest.raises(ValueError, match="not divisible"):
        dit_flops("XL/8", input_size=36)


# ---------------------------------------------------------------- pure pieces


def test_patchify_roundtrip_and_layout():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    tokens = patchify(x, 2)
    chex.assert_shape(tokens, (2, 6, 12))
    # Token 1 is row 0, column 1: pixels (0..1, 2..3), flattened as (p, p, C).
    np.testing.assert_array_equal(tokens[0, 1], x[0, 0:2, 2:4].reshape(-1))
    np.testing.assert_array_equal(unpatchify(tokens, 2, 4, 6), x)


@pytest.mark.parametrize("dim,grid", [(64, 8), (1152, 16)])
def test_sincos_pos_embed_matches_diffusers(dim, grid):
    ref = get_2d_sincos_pos_embed(dim, grid, base_size=grid, output_type="pt").numpy()
    np.testing.assert_allclose(sincos_pos_embed_2d(dim, grid), ref, atol=1e-6)


# ---------------------------------------------------------------- parity with diffusers


@pytest.mark.parametrize("name", ["learned_sigma", "fixed_sigma"])
def test_parity_with_diffusers(name):
    reference, _, unrolled, scanned = torch_case(name)
    x, t, y = case_inputs(name)
    expected = torch_forward(reference, x, t, y)
    channels = SMALL[name].get("out_channels") or SMALL[name]["in_channels"]
    assert expected.shape == (*x.shape[:-1], channels)
    assert_parity(jit_apply(unrolled)(x, t, y, None), expected)
    if name == "learned_sigma":
        assert_parity(jit_apply(scanned)(x, t, y, None), expected)
        null = jit_apply(unrolled)(x, t, np.full(3, 10), None)
        np.testing.assert_allclose(jit_apply(unrolled)(x, t, None, None), null, atol=1e-5)


def test_guided_parity_with_diffusers():
    """Classifier-free guidance (scale 4, first 3 of 4 channels as DiT guides, variance from
    the conditional branch) on both networks: one call on [x, x] with labels [y, null]."""
    reference, _, ours, _ = torch_case("learned_sigma")
    x, t, y = case_inputs("learned_sigma")
    y = np.array([1, 2, 9])
    null = SMALL["learned_sigma"]["num_embeds_ada_norm"]
    guide = functools.partial(
        classifier_free_guidance, null_label=null, learned_variance=True, guided_channels=3
    )
    ours_guided = guide(lambda x, t, y: jit_apply(ours)(x, t, y, None), 4.0)
    torch_guided = guide(lambda x, t, y: jnp.asarray(torch_forward(reference, x, t, y)), 4.0)
    args = jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)
    expected = np.asarray(torch_guided(*args))
    assert_parity(ours_guided(*args), expected)
    conditional = torch_forward(reference, x, t, y)
    assert np.abs(expected[..., :3] - conditional[..., :3]).max() > 0.1  # guidance bites
    # The variance half is the conditional branch's (batched with the null half: rounding).
    np.testing.assert_allclose(expected[..., 3:], conditional[..., 3:], atol=1e-5)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # diffusers' legacy-class notice
def test_converter_loads_the_legacy_class_and_checks_embedder_copies():
    torch.manual_seed(0)
    legacy = Transformer2DModel(
        **SMALL["learned_sigma"],
        norm_type="ada_norm_zero",
        activation_fn="gelu-approximate",
        attention_bias=True,
        norm_elementwise_affine=False,
    )
    state = {k: v.numpy() for k, v in legacy.state_dict().items()}
    model = from_state("learned_sigma", scan_blocks=False)
    with pytest.raises(ValueError, match=r"copies .* differ.*transformer_blocks\.1\.norm1\.emb"):
        load_dit_params(model, state)  # a random legacy model has unequal copies
    randomise_torch(legacy, seed=3)
    with tempfile.TemporaryDirectory() as path:
        legacy.save_pretrained(path)
        ours = load_diffusers_dit(path)
    x, t, y = case_inputs("learned_sigma")
    assert_parity(jit_apply(ours)(x, t, y, None), torch_forward(legacy, x, t, y))


def test_converter_checks_every_tensor():
    _, state, _, _ = torch_case("learned_sigma")
    model = from_state("learned_sigma")
    missing = {k: v for k, v in state.items() if k != "proj_out_2.bias"}
    with pytest.raises(
        ValueError, match=r"missing from the checkpoint: \['final_layer/linear/bias"
    ):
        load_dit_params(model, missing)
    with pytest.raises(ValueError, match=r"not used by the model: \['extra.weight'\]"):
        load_dit_params(model, {**state, "extra.weight": np.zeros(3)})
    wrong = {**state, "pos_embed.proj.weight": np.zeros((64, 4, 3, 3), np.float32)}
    with pytest.raises(ValueError, match=r"shape mismatches.*x_embedder/kernel"):
        load_dit_params(model, wrong)


def test_public_config_is_dit_xl_2():
    kwargs = dit_kwargs_from_diffusers(DIT_XL_2_256)
    assert {k: kwargs[k] for k in VARIANTS["XL/2"]} == VARIANTS["XL/2"]
    assert kwargs | {"freq_shift": 0.0, "mlp_norm_eps": None} == {
        **VARIANTS["XL/2"],
        "input_size": 32,
        "in_channels": 4,
        "num_classes": 1000,
        "learn_sigma": True,
        "mlp_ratio": 4.0,
        "freq_shift": 0.0,
        "norm_eps": 1e-6,
        "mlp_norm_eps": None,
    }
    assert (kwargs["freq_shift"], kwargs["mlp_norm_eps"]) == (1.0, 1e-5)  # diffusers' port


@pytest.mark.parametrize(
    "change,match",
    [
        ({"norm_type": "ada_norm"}, "norm_type"),
        ({"activation_fn": "geglu"}, "activation_fn"),
        ({"out_channels": 5}, "out_channels"),
        ({"norm_elementwise_affine": True}, "norm_elementwise_affine"),
        ({"cross_attention_dim": 8}, "cross_attention_dim"),
        ({"sample_size": 128}, "interpolation_scale"),
        ({"caption_channels": 8, "_class_name": "DiTTransformer2DModel"}, "config fields"),
        ({"_class_name": "UNet2DModel"}, "_class_name"),
    ],
)
def test_converter_rejects_unsupported_configs(change, match):
    with pytest.raises(ValueError, match=match):
        dit_kwargs_from_diffusers({**DIT_XL_2_256, **change})


def test_load_diffusers_dit_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_diffusers_dit(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_diffusers_dit(tmp_path)


# ---------------------------------------------------------------- scale switches


def _loss_and_grad(model: DiT):
    x, t, y = case_inputs("learned_sigma")
    graphdef, state = nnx.split(model)

    def loss(state):
        return jnp.mean(nnx.merge(graphdef, state)(x, t, y) ** 2)

    return jax.jit(jax.value_and_grad(loss))(state)


def _flat_grads(grads, depth: int) -> dict[tuple, np.ndarray]:
    """Gradients keyed by their unrolled-layout path (scanned blocks split along axis 0)."""
    out = {}
    for path, value in nnx.to_flat_state(grads):
        value = np.asarray(value[...])
        if path[0] == "blocks" and not isinstance(path[1], int):  # stacked (scanned) blocks
            out.update({(path[0], i, *path[1:]): value[i] for i in range(depth)})
        else:
            out[path] = value
    return out


def test_scan_and_remat_change_neither_output_nor_gradients():
    _, _, unrolled, _ = torch_case("learned_sigma")
    value, grads = _loss_and_grad(unrolled)
    assert value > 0.1
    reference = _flat_grads(grads, unrolled.depth)
    for model in [
        from_state("learned_sigma", scan_blocks=True, remat=True),
        from_state("learned_sigma", scan_blocks=False, remat=True),
    ]:
        v, g = _loss_and_grad(model)
        # Same maths, different summation order: equal to float32 rounding.
        chex.assert_trees_all_close(
            (v, _flat_grads(g, model.depth)), (value, reference), rtol=1e-5, atol=1e-6
        )


def test_bfloat16_compute_stays_close():
    _, _, ours, _ = torch_case("learned_sigma")
    bf16 = from_state("learned_sigma", dtype=jnp.bfloat16, fused_attention=True)
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {
        jnp.dtype(jnp.float32)
    }
    x, t, y = case_inputs("learned_sigma")
    full, half = np.asarray(jit_apply(ours)(x, t, y, None)), jit_apply(bf16)(x, t, y, None)
    chex.assert_type(half, jnp.float32)
    err = np.abs(np.asarray(half) - full).max() / np.abs(full).max()
    assert 1e-4 < err < 3e-2  # bf16 really used (8-bit mantissa), and close


# ---------------------------------------------------------------- initialisation


def test_adaln_zero_init_outputs_zero_and_follows_dit():
    kwargs = dict(depth=2, hidden=128, heads=2, patch=2, input_size=8, num_classes=10)
    model = DiT(**kwargs, rngs=nnx.Rngs(0))  # scanned blocks (the default)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    t, y = jnp.array([3, 900]), jnp.array([1, 7])
    graphdef, state = nnx.split(model)

    def loss(state):
        out = nnx.merge(graphdef, state)(x, t, y)
        return jnp.sum(out * x.sum()), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
    chex.assert_shape(out, (2, 8, 8, 8))
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    # Only the final projection gets a gradient at initialisation.
    nonzero = {p for p, v in nnx.to_flat_state(grads) if np.any(np.asarray(v[...]) != 0)}
    assert nonzero == {("final_layer", "linear", "kernel"), ("final_layer", "linear", "bias")}

    def std(a):
        return float(np.std(np.asarray(a[...])))

    d = 128
    for zero in [model.final_layer.linear, model.final_layer.modulation, model.blocks.modulation]:
        np.testing.assert_array_equal(zero.kernel[...], 0.0)
        np.testing.assert_array_equal(zero.bias[...], 0.0)
    for layer, fan_in, fan_out in [
        (model.blocks.attn.qkv, d, 3 * d),
        (model.blocks.mlp.fc2, 4 * d, d),
        (model.x_embedder, 2 * 2 * 4, d),
    ]:  # xavier uniform: variance 2 / (fan_in + fan_out); 5-sigma bounds on the sample std
        expected, n = math.sqrt(2 / (fan_in + fan_out)), layer.kernel[...].size
        assert abs(std(layer.kernel) / expected - 1) < 5 * math.sqrt(0.4 / n), layer
        np.testing.assert_array_equal(layer.bias[...], 0.0)
    for table in [model.y_embedder.embedding, model.t_embedder.mlp_1.kernel]:
        assert abs(std(table) / 0.02 - 1) < 5 * math.sqrt(0.5 / table[...].size)
    qkv = np.asarray(model.blocks.attn.qkv.kernel[...])
    assert not np.allclose(qkv[0], qkv[1])  # each block drawn independently

    # The same Rngs give the same weights with unrolled blocks.
    unrolled = DiT(**kwargs, scan_blocks=False, rngs=nnx.Rngs(0))
    for i, block in enumerate(unrolled.blocks):
        np.testing.assert_array_equal(block.attn.qkv.kernel[...], qkv[i])
    np.testing.assert_array_equal(
        unrolled.y_embedder.embedding[...], model.y_embedder.embedding[...]
    )


# ---------------------------------------------------------------- label dropout


def test_label_dropout_rate_and_null_label():
    n, rate = 400, 0.5
    model = from_state("learned_sigma", class_dropout_prob=rate)
    apply = jit_apply(model)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 16, 16, 4), dtype=np.float32)
    t = rng.integers(0, 1000, n)
    y = rng.integers(0, 10, n)
    cond, null = apply(x, t, y, None), apply(x, t, np.full(n, 10), None)
    dropped = apply(x, t, y, jax.random.key(1))
    is_null = np.all(np.isclose(dropped, null, atol=1e-5), axis=(1, 2, 3))
    is_cond = np.all(np.isclose(dropped, cond, atol=1e-5), axis=(1, 2, 3))
    assert np.all(is_null ^ is_cond)  # each example is either dropped or kept, whole
    assert abs(is_null.mean() - rate) < 5 * math.sqrt(rate * (1 - rate) / n)
    other = apply(x, t, y, jax.random.key(2))
    assert not np.array_equal(dropped, other)  # each key its own mask


def test_hybrid_loss_trains_the_learned_sigma_head():
    """The 2C output feeds the hybrid loss (ε MSE + λ·VLB on the variance interpolation)."""
    model = from_state("learned_sigma")
    graphdef, params = nnx.split(model, nnx.Param)
    loss_fn = losses.hybrid_loss(
        make_apply_fn(graphdef), schedules.schedule_from_config("linear", 1000)
    )
    x, _, y = case_inputs("learned_sigma")
    batch = {"image": jnp.tanh(jnp.asarray(x)), "label": jnp.asarray(y)}
    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        params, batch, jax.random.key(0)
    )
    assert np.isfinite(loss) and metrics["vb"] > 0
    final = np.asarray(grads["final_layer"]["linear"]["kernel"][...])
    assert np.abs(final[:, 4::8]).max() > 0  # a variance channel's weights get a gradient


# ---------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"did you mean 'XL/2'"):
        DiT(variant="DiT-XL/2", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"unknown DiT variant 'M/2'"):
        DiT(variant="M/2", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="not divisible by the patch size 8"):
        DiT(variant="S/8", input_size=36, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="heads=3 must divide hidden=64"):
        DiT(depth=1, hidden=64, heads=3, patch=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"explicit \['heads', 'patch'\]"):
        DiT(depth=1, hidden=64, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="class_dropout_prob"):
        DiT(variant="S/8", class_dropout_prob=1.0, rngs=nnx.Rngs(0))

    small = dict(depth=1, hidden=32, heads=2, patch=2, input_size=8)
    model = nnx.eval_shape(lambda: DiT(**small, num_classes=4, rngs=nnx.Rngs(0)))
    x, t = jnp.zeros((2, 8, 8, 4)), jnp.array([1, 2])
    out = nnx.eval_shape(lambda: DiT(**small, num_classes=4, rngs=nnx.Rngs(0))(x, 5))
    chex.assert_shape(out, (2, 8, 8, 8))  # a scalar t is broadcast
    with pytest.raises(ValueError, match="channels"):
        model(jnp.zeros((2, 4, 8, 8)), t)  # NCHW by mistake
    with pytest.raises(ValueError, match="input_size=8"):
        model(jnp.zeros((2, 16, 16, 4)), t)
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.zeros((8, 8, 4)), t)
    with pytest.raises(ValueError, match="t must have shape"):
        model(x, jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match="integer labels"):
        model(x, t, jnp.array([0.0, 1.0]))
    small["patch"] = 4
    out = nnx.eval_shape(lambda: DiT(**small, num_classes=None, rngs=nnx.Rngs(0))(x, t))
    chex.assert_shape(out, (2, 8, 8, 8))
    uncond = nnx.eval_shape(lambda: DiT(**small, num_classes=None, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="num_classes=None"):
        uncond(x, t, jnp.array([0, 1]))
