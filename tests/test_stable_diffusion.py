"""Stable Diffusion from a diffusers pipeline folder: equal to diffusers' StableDiffusionPipeline.

The oracle is a real, tiny StableDiffusionPipeline built from diffusers and transformers classes
(a two-level cross-attention U-Net, a two-level VAE, a two-layer CLIP text encoder, every
parameter randomised so that a swapped scale or a dropped bias shows; a byte-level BPE tokenizer
written to disk) and saved with `save_pretrained`. diffusax loads that folder, as `make sample
EXP=sd15 ARGS=--config.pretrained=DIR` does, and from the same initial latents with DDIM (η = 0),
guidance and negative prompts produces diffusers' images: max |ours − diffusers| < 2e-4 on
[0, 1] images (measured about 1e-6). The text-encoder states and one U-Net call agree to float32
rounding too. Bad folders and noise files stop before compiling, naming the file or field.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffusax.config import ConfigError, load_experiment
from diffusax.methods import stable_diffusion as sd
from diffusax.parallel import make_mesh
from tests.test_clip_tokenizer import write_vocab_and_merges
from tests.test_unet_cond import randomise_torch

REPO = Path(__file__).resolve().parents[1]

PROMPTS = ["a photo of a cat", "an astronaut riding a horse, oil painting"]
NEGATIVES = ["blurry", ""]
STEPS, GUIDANCE = 4, 3.0

UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=2,
    norm_num_groups=8,
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=16,
)
# Stable Diffusion's scheduler, as DDIM: scaled-linear β, steps_offset 1, final ᾱ = ᾱ_0.
SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def build_pipeline(path: Path) -> StableDiffusionPipeline:
    """The tiny random pipeline, saved to ``path`` and loaded back."""
    tok_dir = path.parent / f"{path.name}-vocab"
    tok_dir.mkdir()
    write_vocab_and_merges(tok_dir)
    tokenizer = CLIPTokenizer(
        str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77
    )
    torch.manual_seed(0)
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    pipe = StableDiffusionPipeline(
        vae=randomise_torch(AutoencoderKL(**VAE), seed=1),
        text_encoder=randomise_torch(text, seed=2),
        tokenizer=tokenizer,
        unet=randomise_torch(UNet2DConditionModel(**UNET), seed=3),
        scheduler=DDIMScheduler(**SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    # The oracle is the pipeline as a user holds it: loaded from the folder. (An in-memory
    # scheduler remembers which fields took their defaults, and another class's from_config
    # then takes its own defaults for them; the folder's file states every field.)
    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd") / "tiny-sd"
    return path, build_pipeline(path)


def sd_config(path, **overrides):
    base = {
        "pretrained": str(path),
        "sample.prompt": "|".join(PROMPTS),
        "sample.negative_prompt": "|".join(NEGATIVES),
        "sample.num_steps": STEPS,
        "sample.guidance_scale": GUIDANCE,
        "sample.batch_size": 2,
    }
    return load_experiment("sd15", overrides={**base, **overrides})


def initial_latents(n: int = 2) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 8, 8, 4)).astype(np.float32)  # NHWC


def diffusers_images(pipe, latents: np.ndarray) -> np.ndarray:
    """diffusers' images (N, H, W, 3) in [0, 1] from the NHWC initial latents."""
    with torch.no_grad():
        out = pipe(
            PROMPTS,
            negative_prompt=NEGATIVES,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
            output_type="np",
        )
    return out.images


@pytest.fixture(scope="module")
def loaded(folder):
    path, _ = folder
    cfg = sd_config(path)
    return cfg, sd.load(cfg)


# ---------------------------------------------------------------- equality with diffusers


def test_text_encoder_states_equal_diffusers(folder, loaded):
    _, pipe = folder
    _, ours = loaded
    with torch.no_grad():
        theirs, theirs_neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True, NEGATIVES)
    text = jax.jit(lambda p, ids: sd.merged(ours, "text_encoder", p)(ids)[0])
    for prompts, reference in ((PROMPTS, theirs), (NEGATIVES, theirs_neg)):
        ids = ours.tokenizer.encode(prompts)
        np.testing.assert_array_equal(
            ids, pipe.tokenizer(prompts, padding="max_length", truncation=True).input_ids
        )
        states = np.asarray(text(ours.params["text_encoder"], ids))
        np.testing.assert_allclose(states, reference.numpy(), atol=2e-5, rtol=0)


def test_one_unet_call_equals_diffusers(folder, loaded):
    _, pipe = folder
    _, ours = loaded
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    context = rng.standard_normal((2, 77, 32)).astype(np.float32)
    t = np.array([981, 1], np.int32)
    unet = jax.jit(lambda p, x, t, c: sd.merged(ours, "unet", p)(x, t, context=c))
    mine = np.asarray(unet(ours.params["unet"], x, t, context))
    with torch.no_grad():
        theirs = pipe.unet(
            torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
            torch.from_numpy(t.astype(np.int64)),
            encoder_hidden_states=torch.from_numpy(context),
        ).sample.numpy()
    np.testing.assert_allclose(mine, theirs.transpose(0, 2, 3, 1), atol=1e-4 * np.abs(theirs).max())


SCHEDULER_CLASSES = {
    "ddim": DDIMScheduler,
    "dpm++2m": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}


@pytest.mark.parametrize("sampler", list(SCHEDULER_CLASSES))
def test_guided_images_equal_diffusers(folder, loaded, sampler):
    """The whole pipeline: prompts and negative prompts, 4 steps of each deterministic sampler
    on the timesteps diffusers gives it from the folder's scheduler config (DDIM: SD's leading
    spacing with steps_offset 1 and final ᾱ = ᾱ_0; DPM-Solver++ and Euler: linspace, Euler at
    fractional timesteps), guidance 3, VAE decode."""
    path, pipe = folder
    cfg, ours = loaded
    if sampler != "ddim":
        cfg = sd_config(path, **{"sample.sampler": sampler})
        ours = sd.Pipeline(sd.plan(cfg), ours.tokenizer, ours.graphdefs, ours.params)
    latents = initial_latents()
    scheduler = pipe.scheduler
    pipe.scheduler = SCHEDULER_CLASSES[sampler].from_config(scheduler.config)
    try:
        theirs = diffusers_images(pipe, latents)
    finally:
        pipe.scheduler = scheduler
    mine = sd.draw(ours, cfg, make_mesh(), latents)  # [-1, 1]
    assert mine.shape == theirs.shape == (2, 16, 16, 3)
    diff = np.abs((mine + 1) / 2 - theirs).max()
    print(f"{sampler}: max |ours - diffusers| = {diff:.2e}")
    assert diff < 2e-4, diff
    assert np.abs(theirs - theirs[::-1]).max() > 0.05  # the two prompts' images differ


def test_make_sample_writes_diffusers_images_from_a_noise_file(folder, tmp_path):
    """`python -m diffusax.main --mode=sample` on the folder, as a user runs it."""
    path, pipe = folder
    latents = initial_latents()
    noise_file = tmp_path / "noise.npy"
    np.save(noise_file, latents)
    proc = run_main(
        tmp_path / "run",
        f"--config.pretrained={path}",
        f"--config.sample.prompt={'|'.join(PROMPTS)}",
        f"--config.sample.negative_prompt={'|'.join(NEGATIVES)}",
        f"--config.sample.noise={noise_file}",
        f"--config.sample.num_steps={STEPS}",
        f"--config.sample.guidance_scale={GUIDANCE}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "run" / "samples"
    saved = np.load(out / "samples.npz")
    assert saved["prompts"].tolist() == PROMPTS
    assert saved["negative_prompts"].tolist() == NEGATIVES
    np.testing.assert_array_equal(saved["noise"], latents)
    theirs = np.round(diffusers_images(pipe, latents) * 255)
    assert np.abs(saved["images"].astype(np.float32) - theirs).max() <= 1
    pngs = sorted(p.name for p in out.glob("0*.png"))
    assert pngs == ["000_a_photo_of_a_cat.png", "001_an_astronaut_riding_a_horse_oil_painting.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(out / pngs[0])), saved["images"][0])


def run_main(workdir, *flags, mode="sample"):
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # conftest's cache and 8 CPU devices carry over
    cmd = [
        sys.executable,
        "-m",
        "diffusax.main",
        "--config=experiments/sd15.py",
        f"--workdir={workdir}",
        f"--mode={mode}",
        *flags,
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


# ---------------------------------------------------------------- bad folders and inputs


def broken_copy(path: Path, tmp_path: Path, edit) -> Path:
    """A copy of the pipeline folder (weights linked, not copied) changed by ``edit``."""
    copy = tmp_path / "broken"
    shutil.copytree(path, copy, copy_function=os.link)
    edit(copy)
    return copy


def edit_json(file: Path, **changes):
    data = json.loads(file.read_text())
    data.update(changes)
    file.unlink()  # it is a hard link to the original: write a new file
    file.write_text(json.dumps(data))


BAD_FOLDERS = [
    (lambda d: shutil.rmtree(d / "unet"), r"has no unet/"),
    (
        lambda d: (d / "unet" / "diffusion_pytorch_model.safetensors").unlink(),
        r"unet/ has no weights",
    ),
    # transformers 5 saves tokenizer.json (read in place of vocab.json and merges.txt)
    (lambda d: (d / "tokenizer" / "tokenizer.json").unlink(), r"no tokenizer/vocab\.json"),
    (lambda d: (d / "model_index.json").unlink(), r"no model_index\.json"),
    (lambda d: (d / "scheduler" / "scheduler_config.json").unlink(), r"scheduler_config\.json"),
    (lambda d: (d / "text_encoder_2").mkdir(), r"Stable Diffusion XL"),
    (
        lambda d: edit_json(d / "unet" / "config.json", addition_embed_type="text_time"),
        r"unet/config\.json: addition_embed_type='text_time' is the SDXL U-Net",
    ),
    (
        lambda d: edit_json(d / "unet" / "config.json", cross_attention_dim=64),
        r"unet/config\.json: cross_attention_dim=64, but text_encoder/config\.json hidden_size=32",
    ),
    (
        lambda d: edit_json(d / "vae" / "config.json", latent_channels=8),
        r"in_channels=4, but vae/config\.json latent_channels=8",
    ),
    (
        lambda d: edit_json(d / "scheduler" / "scheduler_config.json", beta_schedule="exotic"),
        r"scheduler_config\.json: .*beta_schedule",
    ),
]


@pytest.mark.parametrize("edit, message", BAD_FOLDERS)
def test_a_bad_folder_is_refused_naming_the_file(folder, tmp_path, edit, message):
    path, _ = folder
    with pytest.raises(ConfigError, match=message):
        sd.plan(sd_config(broken_copy(path, tmp_path, edit)))


def test_missing_folder_and_empty_fields_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"'pretrained': no folder at"):
        sd.plan(sd_config(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"config field 'pretrained' is empty"):
        sd.plan(load_experiment("sd15"))
    with pytest.raises(ConfigError, match=r"'sample\.prompt' is empty"):
        sd_config(tmp_path, **{"sample.prompt": ""})
    with pytest.raises(
        ConfigError, match=r"'sample\.sampler' is 'ddpm'; method 'stable_diffusion'"
    ):
        sd_config(tmp_path, **{"sample.sampler": "ddpm"})


def test_a_prediction_that_contradicts_the_scheduler_config_is_refused(folder, tmp_path):
    """An SD 2-style folder whose scheduler says v-prediction, run with prediction=eps."""
    path, _ = folder
    edit = lambda d: edit_json(
        d / "scheduler" / "scheduler_config.json", prediction_type="v_prediction"
    )
    copy = broken_copy(path, tmp_path, edit)
    assert sd.plan(sd_config(copy)).prediction == "v"  # '' follows the folder
    with pytest.raises(ConfigError, match=r"'diffusion\.prediction' is 'eps', but .*v_prediction"):
        sd.plan(sd_config(copy, **{"diffusion.prediction": "eps"}))


@pytest.mark.parametrize(
    "shape, overrides, message",
    [
        ((2, 16, 16, 4), {}, r"has shape \(2, 16, 16, 4\); expected \(N, 8, 8, 4\)"),
        ((2, 8, 8, 3), {}, r"expected \(N, 8, 8, 4\)"),
        ((8, 8, 4), {}, r"expected \(N, 8, 8, 4\)"),
        ((3, 8, 8, 4), {}, r"3 latents, not a multiple of the 2 prompts"),
        ((2, 16, 8, 4), {"sample.height": 32}, None),  # 32x16 images: fits
    ],
)
def test_noise_files_of_the_wrong_shape_are_refused(folder, tmp_path, shape, overrides, message):
    path, _ = folder
    noise = tmp_path / "noise.npy"
    np.save(noise, np.zeros(shape, np.float32))
    cfg = sd_config(path, **{"sample.noise": str(noise), **overrides})
    if message is None:
        assert sd.plan(cfg).latent_shape == (16, 8, 4)
        return
    with pytest.raises(ConfigError, match=r"config field 'sample\.noise': .*noise\.npy"):
        sd.plan(cfg)
    with pytest.raises(ConfigError, match=message):
        sd.plan(cfg)


def test_make_info_describes_the_folder_without_reading_weights(folder):
    path, _ = folder
    text = sd.StableDiffusion().describe_run(sd_config(path))
    assert "network unet: UNetCondition" in text and "frozen" in text
    assert "prediction eps" in text and "images: 16x16, latents 8x8x4" in text
    # SD's DDIM timesteps: leading spacing, steps_offset 1 (diffusers: 751, 501, 251, 1).
    assert "timesteps [751.0, 501.0, 251.0, 1.0]" in text


def test_image_sizes_the_networks_cannot_halve_are_refused(folder):
    path, _ = folder
    with pytest.raises(ConfigError, match=r"'sample\.width' \(18\) must be a multiple of 4"):
        sd.plan(sd_config(path, **{"sample.width": 18}))


def test_the_command_line_exits_2_before_compiling(folder, tmp_path):
    path, _ = folder
    noise = tmp_path / "noise.npy"
    np.save(noise, np.zeros((2, 5, 5, 4), np.float32))
    proc = run_main(
        tmp_path / "run", f"--config.pretrained={path}", f"--config.sample.noise={noise}"
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "sample.noise" in proc.stderr and "noise.npy" in proc.stderr
    proc = run_main(tmp_path / "run", f"--config.pretrained={path}", mode="train")
    assert proc.returncode == 2 and "runs --mode sample / info, not 'train'" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_bfloat16_compute_stays_close_to_float32(folder):
    """`--config.model.dtype=bfloat16`: the three networks compute in bf16 (parameters stay
    float32); the images stay close to the float32 ones."""
    path, _ = folder
    latents = initial_latents()
    images = {}
    for dtype in ("float32", "bfloat16"):
        cfg = sd_config(path, **{"model.dtype": dtype})
        images[dtype] = sd.draw(sd.load(cfg), cfg, make_mesh(), latents)
    diff = np.abs(images["bfloat16"] - images["float32"])
    assert 0 < diff.max() < 0.1 and diff.mean() < 0.02, (diff.max(), diff.mean())
