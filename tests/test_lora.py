"""LoRA adapters (diffusax.lora): exactness of a zero adapter, training the adapters alone, the
merge/unmerge, file and Orbax round trips, and parity with diffusers + PEFT.

The parity oracle is a tiny diffusers UNet2DConditionModel (random float32 weights) carrying a
random PEFT LoRA (r = 4, lora_alpha = 8, so scale 2; attention, 1x1-conv projections and 3x3
resnet convs) and copied into our UNetCondition with ``load_unet_cond_params``. One forward
pass of ours with the imported adapters merged equals diffusers' LoRA forward (unmerged, B(A x)
beside W x) to max |diff| < 1e-5 · max |output| (PARITY; outputs are about 2.5 at most, and
the measured max |diff| is 2.5e-6 to 2.7e-6, i.e. about 1e-6 relative: float32 rounding), for:
the file diffusers' ``save_lora_weights`` writes, a kohya file of the same factors at alpha 2
(scale 0.5) as diffusers loads it, and our ``export_peft`` file as ``unet.load_lora_adapter``
loads it.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from flax import nnx
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.numpy import save_file

from diffusax import lora
from diffusax.convert import diffusers_unet
from diffusax.convert.diffusers_unet_cond import (
    diffusers_name,
    load_unet_cond_params,
    unet_cond_kwargs_from_diffusers,
)
from diffusax.models import make_apply_fn
from diffusax.models.unet import UNet
from diffusax.models.unet_cond import UNetCondition
from diffusax.train.state import split_params
from tests.test_unet_cond import randomise_torch

PARITY = 1e-5  # max |ours - diffusers| / max |diffusers|; measured 0.9e-6 to 1.3e-6
EPS = float(np.finfo(np.float32).eps)

# ---------------------------------------------------------------- a tiny diffusax U-Net

# Attention projections (dense) and the first conv of every residual block (3x3 conv).
PATTERNS = [r"attn.*\.(query|key|value|proj_out)$", r"res_blocks\.\d+\.conv1$"]


@functools.cache
def tiny_unet():
    """(base params, the pure apply function, (x, t)) of an 8x8 two-level U-Net."""
    build = lambda: UNet(
        in_channels=3,
        out_channels=3,
        ch=16,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        resolution=8,
        dropout=0.0,
        norm_groups=8,
        rngs=nnx.Rngs(0),
    )
    graphdef, params = split_params(nnx.eval_shape(build))  # shapes only: numpy fills them
    rng = np.random.default_rng(0)

    def randomise(path, w):  # no zero-initialised layer may block the gradient
        noise = rng.standard_normal(w.shape, dtype=np.float32)
        if len(w.shape) == 1:  # biases, norm scales (around 1) and shifts
            return jnp.asarray((path[-1].key == "scale") + 0.2 * noise)
        return jnp.asarray(noise / np.sqrt(np.prod(w.shape[:-1])))

    params = jax.tree_util.tree_map_with_path(randomise, params)
    inputs = rng.standard_normal((2, 8, 8, 3), dtype=np.float32), np.array([5, 900])
    return params, make_apply_fn(graphdef), inputs


def fresh_tree(params, rank=2, seed=1):
    return split_params(lora.adapters_for(params, PATTERNS, rank, jax.random.key(seed)))[1]


def random_b(tree, seed=2):
    rng = np.random.default_rng(seed)
    return {
        k: {"A": ab["A"], "B": jnp.asarray(0.1 * rng.standard_normal(ab["B"].shape), jnp.float32)}
        for k, ab in tree.items()
    }


def same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def leaves(tree) -> dict:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_targets_adapter_shapes_and_peft_init():
    params, _, _ = tiny_unet()
    paths = lora.target_paths(params, PATTERNS)
    assert ("down_levels", 1, "attn_blocks", 0, "query", "kernel") in paths
    assert ("mid_res_1", "conv1", "kernel") not in paths  # mid_res_*: no res_blocks.<i>
    assert ("up_levels", 1, "res_blocks", 1, "conv1", "kernel") in paths
    tree = fresh_tree(params, rank=3)
    assert set(tree) == {lora.adapter_key(p) for p in paths}
    dense = tree["mid_attn__query"]
    conv = tree["up_levels__0__res_blocks__1__conv1"]  # kernel (3, 3, 48, 32)
    assert dense["A"].shape == (32, 3) and dense["B"].shape == (3, 32)
    assert conv["A"].shape == (3, 3, 48, 3) and conv["B"].shape == (3, 32)
    assert all(not jnp.any(ab["B"]) for ab in tree.values())
    # PEFT's default A: torch's kaiming_uniform_(a=sqrt(5)) on lora_A (r, in, kh, kw).
    reference = torch.empty(3, 48, 3, 3)
    torch.nn.init.kaiming_uniform_(reference, a=5**0.5, generator=torch.Generator().manual_seed(0))
    bound = 1 / np.sqrt(48 * 9)
    assert np.abs(conv["A"]).max() <= bound < 1.01 * float(reference.abs().max())
    assert np.abs(conv["A"]).max() > 0.95 * bound


def test_zero_b_leaves_every_output_unchanged_bitwise():
    params, apply_fn, (x, t) = tiny_unet()
    tree = fresh_tree(params)
    merged = lora.merge(params, tree, 2.0)
    assert all(
        same_bits(merged_leaf, leaves(params)[k]) for k, merged_leaf in leaves(merged).items()
    )
    reference = jax.jit(apply_fn)(params, x, t)
    # The merge inside the compiled forward too: XLA adds the exact zeros as well.
    fused = jax.jit(lambda p, a: apply_fn(lora.merge(p, a, 2.0), x, t))(params, tree)
    assert same_bits(fused, reference)


def test_gradient_reaches_the_adapters_only_and_a_step_leaves_the_base():
    params, apply_fn, (x, t) = tiny_unet()
    tree = fresh_tree(params)
    target = np.random.default_rng(3).standard_normal((2, 8, 8, 3), dtype=np.float32)
    base_before = jax.tree.map(np.array, params)
    optimizer = optax.adam(1e-2)

    def loss(tree, base):  # the base is a constant argument: it gets no gradient, no update
        return jnp.mean((apply_fn(lora.merge(base, tree, 2.0), x, t) - target) ** 2)

    @jax.jit
    def step(tree, opt_state, base):
        grads = jax.grad(loss)(tree, base)
        updates, opt_state = optimizer.update(grads, opt_state, tree)
        return optax.apply_updates(tree, updates), opt_state, grads

    new_tree, _, grads = step(tree, optimizer.init(tree), params)
    for key, g in grads.items():
        assert not jnp.any(g["A"]), key  # dL/dA = dL/dΔW · Bᵀ = 0 while B = 0
        assert jnp.any(g["B"]), key
        assert same_bits(new_tree[key]["A"], tree[key]["A"])  # Adam moves nothing without grad
        assert jnp.any(new_tree[key]["B"]), key
    assert all(
        same_bits(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(base_before))
    )
    # The trained adapters change exactly the targeted kernels of the merged tree.
    merged = leaves(lora.merge(params, new_tree, 2.0))
    changed = {k for k, v in merged.items() if not same_bits(v, leaves(params)[k])}
    targets = {
        jax.tree_util.keystr(tuple(map(jax.tree_util.DictKey, p)))
        for p in lora.target_paths(params, PATTERNS)
    }
    assert changed == targets


def test_merge_then_unmerge_restores_the_base_to_float32_rounding():
    params, _, _ = tiny_unet()
    tree = random_b(fresh_tree(params))
    merged = lora.merge(params, tree, 0.5)
    restored = lora.unmerge(merged, tree, 0.5)
    base, merged, restored = leaves(params), leaves(merged), leaves(restored)
    worst = 0.0
    for k, w in base.items():
        if same_bits(merged[k], w):
            assert same_bits(restored[k], w), k  # not adapted: untouched
            continue
        # Two roundings, of W + ΔW and of (W + ΔW) − ΔW, each ≤ eps/2 of its result (the same
        # ΔW both times): |error| ≤ eps · max(|W + ΔW|, |W|) over the kernel.
        err = float(np.abs(np.asarray(restored[k]) - np.asarray(w)).max())
        bound = EPS * max(float(np.abs(merged[k]).max()), float(np.abs(w).max()))
        assert err <= bound, (k, err, bound)
        worst = max(worst, err / bound)
    assert 0 < worst  # measured: up to 0.73 of the bound (3e-8 absolute), so not bitwise


def test_save_load_round_trip_bitwise_and_a_failed_write_keeps_the_old_file(tmp_path):
    params, _, _ = tiny_unet()
    tree = random_b(fresh_tree(params))
    path = tmp_path / "adapters.safetensors"
    lora.save_adapters(path, tree, rank=2, alpha=4.0, patterns=PATTERNS)
    back, meta = lora.load_adapters(path)
    assert meta == {"rank": 2, "alpha": 4.0, "patterns": PATTERNS}
    assert set(back) == set(tree)
    assert all(same_bits(back[k][n], tree[k][n]) for k in tree for n in "AB")
    with pytest.raises(Exception, match="dtype"):  # an array safetensors cannot store
        bad = {"x": {"A": np.asarray("a"), "B": np.zeros(1)}}
        lora.save_adapters(path, bad, rank=1, alpha=1, patterns="x")
    assert os.listdir(tmp_path) == ["adapters.safetensors"]  # no temp file left behind
    again, _ = lora.load_adapters(path)
    assert all(same_bits(again[k][n], tree[k][n]) for k in tree for n in "AB")


def test_orbax_round_trip_of_the_adapter_state(tmp_path):
    params, _, _ = tiny_unet()
    adapters = lora.adapters_for(params, PATTERNS, 2, jax.random.key(1))
    graphdef, tree = split_params(adapters)
    tree = random_b(tree)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", tree)
    checkpointer.wait_until_finished()
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
    restored = checkpointer.restore(tmp_path / "ckpt", target)
    assert jax.tree.structure(restored) == jax.tree.structure(tree)
    assert all(same_bits(a, b) for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree)))
    rebuilt = nnx.merge(graphdef, restored)
    assert isinstance(rebuilt, lora.Adapters) and set(rebuilt) == set(tree)


# ---------------------------------------------------------------- parity with diffusers + PEFT

UNET_CFG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16,
    attention_head_dim=2,
    norm_num_groups=8,
)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2"]
RANK, ALPHA = 4, 8


@functools.cache
def parity_case():
    """The diffusers U-Net with a random LoRA, its base copied into ours, and the outputs."""
    torch.manual_seed(0)
    unet = randomise_torch(UNet2DConditionModel(**UNET_CFG))
    base_state = {k: v.clone() for k, v in unet.state_dict().items()}
    model = nnx.eval_shape(
        lambda: UNetCondition(
            **unet_cond_kwargs_from_diffusers(dict(unet.config)), rngs=nnx.Rngs(0)
        )
    )
    load_unet_cond_params(model, {k: v.numpy() for k, v in base_state.items()})
    graphdef, base = split_params(model)
    # init_lora_weights=False: PEFT draws B at random too, so the adapter changes the output.
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=False, target_modules=TARGETS)
    unet.add_adapter(config)
    rng = np.random.default_rng(1)
    inputs = (
        rng.standard_normal((2, 8, 8, 4), dtype=np.float32),
        np.array([3, 700]),
        rng.standard_normal((2, 5, 16), dtype=np.float32),
    )

    def fresh_unet():
        fresh = UNet2DConditionModel(**UNET_CFG)
        fresh.load_state_dict(base_state)
        return fresh.eval()

    ours = jax.jit(lambda p, x, t, c: nnx.merge(graphdef, p)(x, t, context=c))
    return {
        "unet": unet,
        "fresh_unet": fresh_unet,
        "base": base,
        "ours": lambda params: np.asarray(ours(params, *inputs)),
        "torch": lambda model: torch_forward(model, *inputs),
        "factors": get_peft_model_state_dict(unet),
        "config": unet.peft_config["default"].to_dict(),
    }


def torch_forward(model, x, t, context) -> np.ndarray:
    with torch.no_grad():
        x, t, context = (torch.from_numpy(a) for a in (x.transpose(0, 3, 1, 2), t, context))
        out = model(x, t, context).sample
    return out.numpy().transpose(0, 2, 3, 1)


def assert_parity(ours, reference):
    scale = np.abs(reference).max()
    err = np.abs(ours - reference).max()
    assert scale > 0.1 and err < PARITY * scale, f"max abs diff {err:.3g} at scale {scale:.3g}"
    return err / scale


def test_peft_file_saved_by_diffusers_imports_to_diffusers_output(tmp_path):
    case = parity_case()
    expected = case["torch"](case["unet"])  # PEFT's unmerged forward, scale alpha / r = 2
    assert np.abs(expected - case["torch"](case["fresh_unet"]())).max() > 0.1  # LoRA matters
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=case["factors"], unet_lora_adapter_metadata=case["config"]
    )
    file = tmp_path / "pytorch_lora_weights.safetensors"
    with safe_open(file, "np") as f:  # diffusers keeps lora_alpha in a JSON header field only
        assert json.loads(f.metadata()["lora_adapter_metadata"])["unet.lora_alpha"] == ALPHA
    tree, scale = lora.import_lora(file, case["base"], diffusers_name)
    assert scale == 1.0 and len(tree) == len(case["factors"]) // 2
    assert tree["down_blocks__0__resnets__0__conv1"]["A"].shape == (3, 3, 16, RANK)  # 3x3 conv
    assert tree["down_blocks__0__attentions__0__proj_in"]["A"].shape == (1, 1, 16, RANK)
    assert_parity(case["ours"](lora.merge(case["base"], tree, scale)), expected)
    # Saved without the metadata, diffusers loads lora_alpha = r (scale 1), and so do we.
    bare = {f"unet.{k}": v.numpy() for k, v in case["factors"].items()}
    plain, _ = lora.import_lora(bare, case["base"], diffusers_name)
    assert all(np.allclose(2 * plain[k]["B"], tree[k]["B"], rtol=0, atol=0) for k in tree)


def kohya_state(factors, alpha) -> dict:
    """sd-scripts' names and keys for the same factors (lora_down = lora_A, lora_up = lora_B)."""
    state = {}
    for key, value in factors.items():
        module, role = key.rsplit(".", 2)[:2]
        name = "lora_unet_" + module.replace(".", "_")
        state[f"{name}.{'lora_down' if role == 'lora_A' else 'lora_up'}.weight"] = value.numpy()
        state[f"{name}.alpha"] = np.asarray(alpha, np.float32)
    return state


def test_kohya_file_imports_to_what_diffusers_makes_of_it(tmp_path):
    case = parity_case()
    file = tmp_path / "kohya.safetensors"
    save_file(kohya_state(case["factors"], alpha=2.0), file)  # scale 2 / 4 = 0.5
    # What pipe.load_lora_weights(file) does, without building a pipeline: kohya names -> PEFT.
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(file))
    expected_model = case["fresh_unet"]()
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, expected_model)
    assert expected_model.peft_config["default_0"].lora_alpha == 2.0
    expected = case["torch"](expected_model)
    tree, scale = lora.import_lora(file, case["base"], diffusers_name)
    assert_parity(case["ours"](lora.merge(case["base"], tree, scale)), expected)
    # Alpha is per module: one module at alpha = r keeps scale 1, the others 0.5.
    mixed = kohya_state(case["factors"], alpha=2.0)
    one = "lora_unet_down_blocks_0_resnets_0_conv1"
    mixed[f"{one}.alpha"] = np.asarray(RANK, np.float32)
    mixed_tree, _ = lora.import_lora(mixed, case["base"], diffusers_name)
    for key, ab in tree.items():
        factor = 2.0 if key == "down_blocks__0__resnets__0__conv1" else 1.0
        assert np.array_equal(mixed_tree[key]["B"], factor * ab["B"]), key


def test_export_peft_loads_in_diffusers_with_our_scale(tmp_path):
    case = parity_case()
    tree, _ = lora.import_lora(
        {f"unet.{k}": v.numpy() for k, v in case["factors"].items()}, case["base"], diffusers_name
    )
    file = tmp_path / "exported.safetensors"
    lora.export_peft(file, tree, 0.5, diffusers_name)
    with safe_open(file, "np") as f:
        key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
        assert f.get_slice(key).get_shape() == [RANK, 16]
        conv = "unet.up_blocks.1.resnets.0.conv2.lora_B.weight"
        assert f.get_slice(conv).get_shape() == [16, RANK, 1, 1]
    loaded = case["fresh_unet"]()
    loaded.load_lora_adapter(str(file), prefix="unet")  # plain: no header read, alpha = r
    expected = case["torch"](loaded)
    assert_parity(case["ours"](lora.merge(case["base"], tree, 0.5)), expected)
    back, _ = lora.import_lora(file, case["base"], diffusers_name)  # the scale baked into B
    assert all(np.array_equal(back[k]["B"], 0.5 * tree[k]["B"]) for k in tree)


# ---------------------------------------------------------------- errors


DIT_PATTERNS = [r"attn\.(qkv|proj)$", r"mlp\.fc[12]$"]


def tiny_dits():
    """A 2-block DiT with scanned blocks and the same network unrolled: random weights (no
    zero-initialised layer), the unrolled tree sliced from the scanned one."""
    from diffusax.models.dit import DiT

    kwargs = dict(depth=2, hidden=32, heads=2, patch=2, input_size=8, in_channels=4)
    kwargs["num_classes"] = 10
    g_scan, scanned = split_params(nnx.eval_shape(lambda: DiT(**kwargs, rngs=nnx.Rngs(0))))
    g_unrolled, unrolled = split_params(
        nnx.eval_shape(lambda: DiT(**kwargs, scan_blocks=False, rngs=nnx.Rngs(0)))
    )
    rng = np.random.default_rng(0)

    def randomise(path, w):
        noise = rng.standard_normal(w.shape, dtype=np.float32)
        if len(w.shape) == 1:
            return jnp.asarray(0.2 * noise)
        return jnp.asarray(noise / np.sqrt(w.shape[-2]))

    scanned = jax.tree_util.tree_map_with_path(randomise, scanned)

    def slice_of(path, _):
        keys = [getattr(k, "key", getattr(k, "idx", k)) for k in path]
        if keys[0] == "blocks":  # ("blocks", i, ...) <- ("blocks", ...)[i]
            leaf = functools.reduce(lambda t, k: t[k], [keys[0], *keys[2:]], scanned)
            return leaf[keys[1]]
        return functools.reduce(lambda t, k: t[k], keys, scanned)

    unrolled = jax.tree_util.tree_map_with_path(slice_of, unrolled)
    x = rng.standard_normal((2, 8, 8, 4), dtype=np.float32)
    inputs = (x, np.array([5, 900]), np.array([1, 7]))
    return (make_apply_fn(g_scan), scanned), (make_apply_fn(g_unrolled), unrolled), inputs


def test_dit_adapters_on_scanned_blocks_equal_per_block_adapters():
    """LoRA on a DiT: one (A, B) pair per block on the scanned (L, in, out) kernels is the same
    network as the unrolled DiT with each block's pair; zero B changes nothing, bitwise."""
    (scan_fn, scanned), (unrolled_fn, unrolled), (x, t, y) = tiny_dits()
    reference = jax.jit(scan_fn)(scanned, x, t, y)
    np.testing.assert_allclose(unrolled_fn(unrolled, x, t, y), reference, atol=1e-5)
    tree = split_params(lora.adapters_for(scanned, DIT_PATTERNS, 3, jax.random.key(1)))[1]
    assert sorted(tree) == ["blocks__attn__proj", "blocks__attn__qkv", "blocks__mlp__fc1",
                            "blocks__mlp__fc2"]  # fmt: skip
    assert tree["blocks__attn__qkv"]["A"].shape == (2, 32, 3)
    assert tree["blocks__attn__qkv"]["B"].shape == (2, 3, 96)
    assert same_bits(jax.jit(scan_fn)(lora.merge(scanned, tree, 2.0), x, t, y), reference)

    tree = random_b(tree)
    per_block = {
        key.replace("blocks__", f"blocks__{i}__"): {"A": ab["A"][i], "B": ab["B"][i]}
        for key, ab in tree.items()
        for i in range(2)
    }
    ours = scan_fn(lora.merge(scanned, tree, 2.0), x, t, y)
    want = unrolled_fn(lora.merge(unrolled, per_block, 2.0), x, t, y)
    assert np.abs(np.asarray(ours) - np.asarray(reference)).max() > 1e-2  # the adapters act
    np.testing.assert_allclose(ours, want, atol=1e-5)
    with pytest.raises(ValueError, match=r"scanned blocks.*model\.scan_blocks=False"):
        lora.export_peft("/nonexistent.safetensors", tree, 1.0, str)


def test_target_errors_name_the_patterns_and_the_path():
    params = {
        "blocks": {"mlp": {"kernel": jnp.zeros((2, 3, 4))}},  # scanned blocks: allowed
        "conv3d": {"kernel": jnp.zeros((2, 2, 2, 3, 4))},
        "head": {"kernel": jnp.zeros((3, 4))},
    }
    with pytest.raises(ValueError, match=r"\['nothing_here'\] match no"):
        lora.target_paths(params, ["nothing_here"])
    with pytest.raises(ValueError, match=r"conv3d.*\(2, 2, 2, 3, 4\)"):
        lora.target_paths(params, [r"conv3d", r"head"])
    assert lora.target_paths(params, "head") == [("head", "kernel")]
    assert lora.target_paths(params, "mlp") == [("blocks", "mlp", "kernel")]
    with pytest.raises(ValueError, match=r"do not have.*tail"):
        lora.merge(params, {"tail": {"A": jnp.zeros((3, 1)), "B": jnp.zeros((1, 4))}}, 1.0)


def test_import_errors_name_every_key_that_does_not_fit():
    params, _, _ = tiny_unet()
    name_of = diffusers_unet.diffusers_name
    z = np.zeros
    q = "unet.mid_block.attentions.0.to_q"  # a (32, 32) dense kernel
    state = {
        "unet.down_blocks.9.resnets.0.conv1.lora_A.weight": z((4, 16, 3, 3)),
        "unet.down_blocks.9.resnets.0.conv1.lora_B.weight": z((16, 4, 1, 1)),
        "lora_unet_down_blocks_7_resnets_0_conv2.lora_down.weight": z((4, 16, 3, 3)),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": z((4, 8)),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": z((4, 8)),
        f"{q}.lora_A.weight": z((4, 31)),  # in = 32
        f"{q}.lora_B.weight": z((32, 4)),
        "unet.mid_block.attentions.0.to_k.lora_A.weight": z((4, 32)),  # no lora_B
        "unet.conv_in.lora_magnitude_vector": z(16),  # DoRA: neither format
    }
    with pytest.raises(ValueError) as info:
        lora.import_lora(state, params, name_of)
    message = str(info.value)
    for key in state:
        if "to_q" not in key and "to_k" not in key:
            assert key in message, key
    assert "text-encoder" in message and "(4, 31), (32, 4) for kernel (32, 32)" in message
    assert "mid_block.attentions.0.to_k" in message and "partner" in message
    with pytest.raises(ValueError, match=r"neither format: model\.weight"):
        lora.import_lora({"model.weight": z((2, 2))}, params, name_of)
    with pytest.raises(ValueError, match="empty"):
        lora.import_lora({}, params, name_of)
    # A good module imports; without a prefix too.
    ok = {"mid_block.attentions.0.to_q.lora_A.weight": z((2, 32)), f"{q}.lora_B.weight": z((32, 2))}
    tree, _ = lora.import_lora(ok, params, name_of)
    assert set(tree) == {"mid_attn__query"}


def test_load_adapters_refuses_another_format(tmp_path):
    file = tmp_path / "other.safetensors"
    save_file({"unet.x.lora_A.weight": np.zeros((1, 1), np.float32)}, file)
    with pytest.raises(ValueError, match="not a diffusax LoRA file"):
        lora.load_adapters(file)
