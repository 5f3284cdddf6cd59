"""Stable Diffusion from a diffusers pipeline folder: equal to diffusers' StableDiffusionPipeline.

The oracle is a real, tiny StableDiffusionPipeline built from diffusers and transformers classes
(a two-level cross-attention U-Net, a two-level VAE, a two-layer CLIP text encoder, every
parameter randomised so that a swapped scale or a dropped bias shows; a byte-level BPE tokenizer
written to disk) and saved with `save_pretrained`. diffusax loads that folder, as `make sample
EXP=sd15 ARGS=--config.pretrained=DIR` does, and from the same initial latents with DDIM (η = 0),
guidance and negative prompts produces diffusers' images: max |ours − diffusers| < 2e-4 on
[0, 1] images (measured about 1e-6). The text-encoder states and one U-Net call agree to float32
rounding too. Bad folders and noise files stop before compiling, naming the file or field.

LCM-LoRA (``--config.lora=FILE --config.sample.sampler=lcm``): a random LoRA on the LCM-LoRA's
modules (attention, feed-forward, 1x1 projections, resnet and resampler convs, time projections),
written as diffusers' save_lora_weights does (PEFT keys, lora_alpha in the header) and in kohya's
format, against the pipeline with LCMScheduler.from_config and load_lora_weights (unfused). The
fresh noise LCMScheduler.step adds between steps is replaced, in diffusers, by the noise our
sampler draws (``step_noise``); a 1-step run draws none. max |ours − diffusers| < 2e-4 on [0, 1]
images, measured about 1e-6.
"""

from __future__ import annotations

import copy
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
    LCMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.schedulers import scheduling_lcm
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.numpy import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffusax.config import ConfigError, load_experiment
from diffusax.methods import stable_diffusion as sd
from diffusax.methods.ddpm import padded_batch_size
from diffusax.parallel import make_mesh
from tests.test_clip_tokenizer import write_vocab_and_merges
from tests.test_lora import kohya_state
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


# ---------------------------------------------------------------- LCM-LoRA

# The modules the public LCM-LoRA for SD 1.5 adapts (PEFT target_modules of its training script).
LCM_LORA_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
]


@pytest.fixture(scope="module")
def lora_files(folder, tmp_path_factory):
    """{"peft": diffusers' save_lora_weights file (r 4, lora_alpha 8: scale 2), "kohya": the
    same factors in kohya's format at alpha 2 (scale 0.5)} and the number of modules."""
    _, pipe = folder
    unet = copy.deepcopy(pipe.unet)  # the fixture's pipeline stays without adapters
    torch.manual_seed(4)  # init_lora_weights=False: B random too, so the LoRA shows
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=LCM_LORA_TARGETS)
    unet.add_adapter(config)
    factors = get_peft_model_state_dict(unet)
    out = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=factors, unet_lora_adapter_metadata=config.to_dict()
    )
    save_file(kohya_state(factors, alpha=2.0), out / "kohya.safetensors")
    files = {"peft": out / "pytorch_lora_weights.safetensors", "kohya": out / "kohya.safetensors"}
    return files, len(factors) // 2


def step_noise(cfg, num_steps: int, n: int) -> list:
    """The noise our lcm sampler adds after each of diffusers' steps 0..K-2 (NHWC, n rows): scan
    step i = K-1-c draws N(0, I) of the padded batch from fold_in(split(batch key)[1], i)."""
    batch = padded_batch_size(min(cfg.sample.batch_size, n), make_mesh().size)
    _, steps_key = jax.random.split(sd.batch_key(cfg, 0))
    draw = lambda i: jax.random.normal(jax.random.fold_in(steps_key, i), (batch, 8, 8, 4))
    return [np.asarray(draw(num_steps - 1 - c))[:n] for c in range(num_steps - 1)]


def diffusers_lcm_images(path, lora_file, latents, num_steps, guidance, noise, monkeypatch):
    """StableDiffusionPipeline with LCMScheduler.from_config(its config) and
    load_lora_weights(lora_file) (None: no LoRA), LCMScheduler.step's fresh noise replaced by
    ``noise`` (one NHWC array per step but the last); images in [0, 1]."""
    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    if lora_file is not None:
        pipe.load_lora_weights(str(lora_file))
    given = iter(noise)

    def randn_tensor(shape, generator=None, device=None, dtype=None, **_):
        z = torch.from_numpy(next(given).transpose(0, 3, 1, 2).copy())
        assert tuple(shape) == tuple(z.shape), (shape, z.shape)
        return z.to(dtype)

    with monkeypatch.context() as m, torch.no_grad():
        m.setattr(scheduling_lcm, "randn_tensor", randn_tensor)
        images = pipe(
            PROMPTS,
            negative_prompt=NEGATIVES,
            num_inference_steps=num_steps,
            guidance_scale=guidance,
            latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
            output_type="np",
        ).images
    assert next(given, None) is None  # every step but the last drew its noise
    return images


def lcm_config(path, lora_file, num_steps, guidance, **overrides):
    return sd_config(
        path,
        **{
            "lora": str(lora_file),
            "sample.sampler": "lcm",
            "sample.num_steps": num_steps,
            "sample.guidance_scale": guidance,
            **overrides,
        },
    )


@pytest.mark.parametrize(
    "fmt, num_steps, guidance", [("kohya", 4, 1.0), ("peft", 4, 1.0), ("peft", 1, 1.5)]
)
def test_lcm_lora_images_equal_diffusers(folder, lora_files, monkeypatch, fmt, num_steps, guidance):
    """LCMScheduler's timesteps (999, 759, 499, 259) and boundary scalings from the folder's
    scheduler config, the LoRA fused into the U-Net at load; guidance 1: one U-Net branch, as
    diffusers (no negative prompt used); 1.5: classifier-free guidance."""
    path, _ = folder
    files, modules = lora_files
    cfg = lcm_config(path, files[fmt], num_steps, guidance)
    ours = sd.load(cfg)
    assert len(ours.plan.lora.adapters) == modules
    if num_steps == 4:
        np.testing.assert_array_equal(ours.plan.steps.timesteps, [259, 499, 759, 999])
    latents = initial_latents()
    noise = step_noise(cfg, num_steps, len(latents))
    theirs = diffusers_lcm_images(
        path, files[fmt], latents, num_steps, guidance, noise, monkeypatch
    )
    plain = diffusers_lcm_images(path, None, latents, num_steps, guidance, noise, monkeypatch)
    assert np.abs(theirs - plain).max() > 0.05  # the LoRA changes the images
    mine = sd.draw(ours, cfg, make_mesh(), latents)  # [-1, 1]
    assert mine.shape == theirs.shape == (2, 16, 16, 3)
    diff = np.abs((mine + 1) / 2 - theirs).max()
    print(f"lcm {fmt} {num_steps} steps guidance {guidance}: max |ours - diffusers| = {diff:.2e}")
    assert diff < 2e-4, diff


def test_make_sample_with_an_lcm_lora_writes_diffusers_images(folder, lora_files, tmp_path):
    """The issue's command: --config.lora=FILE --config.sample.sampler=lcm, 4 steps, guidance 1."""
    path, _ = folder
    files, _ = lora_files
    latents = initial_latents()
    noise_file = tmp_path / "noise.npy"
    np.save(noise_file, latents)
    proc = run_main(
        tmp_path / "run",
        f"--config.pretrained={path}",
        f"--config.lora={files['kohya']}",
        "--config.sample.sampler=lcm",
        "--config.sample.num_steps=4",
        "--config.sample.guidance_scale=1",
        f"--config.sample.prompt={'|'.join(PROMPTS)}",
        f"--config.sample.negative_prompt={'|'.join(NEGATIVES)}",
        f"--config.sample.noise={noise_file}",
        "--config.sample.batch_size=2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "run" / "samples"
    saved = np.load(out / "samples.npz")
    cfg = lcm_config(path, files["kohya"], 4, 1.0)
    with pytest.MonkeyPatch.context() as monkeypatch:
        theirs = diffusers_lcm_images(
            path, files["kohya"], latents, 4, 1.0, step_noise(cfg, 4, 2), monkeypatch
        )
    assert np.abs(saved["images"].astype(np.float32) - np.round(theirs * 255)).max() <= 1
    assert len(list(out.glob("0*.png"))) == 2


def write_lora(tmp_path, state: dict) -> Path:
    file = tmp_path / "bad.safetensors"
    save_file({k: np.asarray(v, np.float32) for k, v in state.items()}, file)
    return file


Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # (32, 32) in the tiny U-Net
BAD_LORAS = [
    (
        {
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": np.zeros(
                (4, 32)
            ),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": np.zeros(
                (32, 4)
            ),
        },
        r"text-encoder keys.*lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    ),
    (
        {
            "unet.down_blocks.3.resnets.0.conv1.lora_A.weight": np.zeros((4, 32, 3, 3)),
            "unet.down_blocks.3.resnets.0.conv1.lora_B.weight": np.zeros((32, 4, 1, 1)),
        },
        r"unknown modules for this base: unet\.down_blocks\.3\.resnets",
    ),
    (
        {
            f"unet.{Q}.lora_A.weight": np.zeros((4, 64)),
            f"unet.{Q}.lora_B.weight": np.zeros((32, 4)),
        },
        r"shape mismatches: unet\..*to_q: \(4, 64\), \(32, 4\) for kernel \(32, 32\)",
    ),
]


@pytest.mark.parametrize("state, message", BAD_LORAS)
def test_a_lora_file_that_does_not_fit_the_unet_is_refused(folder, tmp_path, state, message):
    path, _ = folder
    file = write_lora(tmp_path, state)
    cfg = sd_config(path, lora=str(file))
    with pytest.raises(
        ConfigError, match=r"config field 'lora': .*bad\.safetensors, for the U-Net"
    ):
        sd.plan(cfg)
    with pytest.raises(ConfigError, match=message):
        sd.plan(cfg)


def test_a_missing_or_unreadable_lora_file_is_refused(folder, tmp_path):
    path, _ = folder
    with pytest.raises(ConfigError, match=r"config field 'lora': no file .*nowhere\.safetensors"):
        sd.plan(sd_config(path, lora=str(tmp_path / "nowhere.safetensors")))
    junk = tmp_path / "lora.bin"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match=r"'lora': .*lora\.bin is not a safetensors LoRA file"):
        sd.plan(sd_config(path, lora=str(junk)))


def test_the_command_line_refuses_a_bad_lora_file_before_compiling(folder, tmp_path):
    path, _ = folder
    file = write_lora(tmp_path, BAD_LORAS[0][0])
    proc = run_main(
        tmp_path / "run",
        f"--config.pretrained={path}",
        f"--config.lora={file}",
        "--config.sample.sampler=lcm",
        "--config.sample.num_steps=4",
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config field 'lora'" in proc.stderr and "bad.safetensors" in proc.stderr
    assert "text-encoder keys" in proc.stderr
    assert not (tmp_path / "run").exists()


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


def test_make_info_names_the_lora_file_and_the_lcm_timesteps(folder, lora_files):
    path, _ = folder
    files, modules = lora_files
    text = sd.StableDiffusion().describe_run(lcm_config(path, files["peft"], 4, 1.0))
    assert f"lora: {files['peft']}, {modules} U-Net modules adapted (rank 4)" in text
    assert "sampler: lcm, 4 steps, guidance 1.0" in text
    assert "timesteps [999.0, 759.0, 499.0, 259.0]" in text


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
