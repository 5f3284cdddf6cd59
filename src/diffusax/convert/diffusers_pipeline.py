"""A local diffusers Stable Diffusion pipeline folder -> the configs and weights diffusax uses.

The folder is what `StableDiffusionPipeline.save_pretrained` writes (and what a download of
`runwayml/stable-diffusion-v1-5`, or any SD 1.x / 2.x in diffusers format, holds):

    model_index.json                      the pipeline class and its components
    text_encoder/  config.json, model.safetensors (or pytorch_model.bin)   CLIPTextModel
    tokenizer/     vocab.json, merges.txt (or tokenizer.json), tokenizer_config.json   CLIPTokenizer
    unet/          config.json, diffusion_pytorch_model.safetensors         UNet2DConditionModel
    vae/           config.json, diffusion_pytorch_model.safetensors         AutoencoderKL
    scheduler/     scheduler_config.json                                    β schedule, prediction

``read_pipeline_folder`` checks all of it before any weight is read or anything compiled:
every file is there, the architecture is one this project runs (not SDXL, whose second text
encoder and added time conditioning it does not have), and the parts fit each other (the
U-Net's cross-attention width is the text encoder's, its input channels the VAE's latents).
Every error is a ``PipelineFolderError`` (a ValueError) naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import json
import os

from diffusax.convert import common, diffusers_unet_cond, diffusers_vae, transformers_clip

# The pipeline classes whose folders hold exactly these components.
PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
# Weights each component folder may hold, in order of preference.
_WEIGHTS = {
    "text_encoder": (transformers_clip.WEIGHTS_NAME, "pytorch_model.bin"),
    "unet": (common.WEIGHTS_NAME, "diffusion_pytorch_model.bin"),
    "vae": (common.WEIGHTS_NAME, "diffusion_pytorch_model.bin"),
}


class PipelineFolderError(ValueError):
    """A pretrained folder that cannot be sampled; the message names the file and field."""


@dataclasses.dataclass(frozen=True)
class PipelineFolder:
    """The checked configs of a pipeline folder (nothing heavy is read)."""

    path: str
    unet: dict  # unet/config.json
    vae: dict  # vae/config.json
    text_encoder: dict  # text_encoder/config.json
    scheduler: dict  # scheduler/scheduler_config.json
    unet_kwargs: dict  # UNetCondition(**unet_kwargs)
    vae_kwargs: dict  # AutoencoderKL(**vae_kwargs)
    text_kwargs: dict  # TextEncoder(**text_kwargs)

    def component(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def vae_scale(self) -> int:
        """How many times smaller the latents are than the images: 2^(levels - 1) (8 for SD)."""
        return 2 ** (len(self.vae_kwargs["block_out_channels"]) - 1)

    @property
    def default_size(self) -> int:
        """The side the U-Net was trained at, in pixels: sample_size x vae_scale (512 for
        SD 1.x, 768 for SD 2.x-768)."""
        size = self.unet.get("sample_size") or 64
        return (size[0] if isinstance(size, (list, tuple)) else size) * self.vae_scale

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.get("scaling_factor", 0.18215))

    @property
    def shift_factor(self) -> float:
        return float(self.vae.get("shift_factor") or 0.0)


def _read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise PipelineFolderError(f"the pretrained folder has no {what}: {path} is missing")
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PipelineFolderError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(value, dict):
        raise PipelineFolderError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def _check_weights(path: str, component: str) -> None:
    folder = os.path.join(path, component)
    if not any(os.path.isfile(os.path.join(folder, w)) for w in _WEIGHTS[component]):
        names = " or ".join(_WEIGHTS[component])
        raise PipelineFolderError(f"the pretrained folder's {component}/ has no weights: {names}")


def _kwargs(file: str, convert, config: dict) -> dict:
    try:
        return convert(config)
    except ValueError as e:  # the converter names the field; say which file holds it
        raise PipelineFolderError(f"{file}: {e}") from e


def read_pipeline_folder(path: str) -> PipelineFolder:
    """Check a Stable Diffusion pipeline folder and return its configs; PipelineFolderError
    (FileNotFoundError-like messages included) naming the file and field otherwise."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise PipelineFolderError(
            f"config field 'pretrained': no folder at {path!r} (a local diffusers pipeline "
            f"folder, e.g. a download of runwayml/stable-diffusion-v1-5)"
        )
    index_file = os.path.join(path, "model_index.json")
    index = _read_json(index_file, "model_index.json")
    cls = index.get("_class_name")
    if (
        "XL" in str(cls)
        or "text_encoder_2" in index
        or os.path.isdir(os.path.join(path, "text_encoder_2"))
    ):
        raise PipelineFolderError(
            f"{index_file}: _class_name={cls!r} with text_encoder_2 is Stable Diffusion XL, "
            f"which this project does not run (two text encoders, added time conditioning); "
            f"give an SD 1.x / 2.x folder"
        )
    if cls not in PIPELINE_CLASSES:
        raise PipelineFolderError(
            f"{index_file}: _class_name={cls!r}; supported: {list(PIPELINE_CLASSES)}"
        )
    for component in ("text_encoder", "tokenizer", "unet", "vae", "scheduler"):
        if not os.path.isdir(os.path.join(path, component)):
            raise PipelineFolderError(
                f"the pretrained folder {path} has no {component}/ (model_index.json lists "
                f"text_encoder, tokenizer, unet, vae and scheduler)"
            )
    tokenizer = os.path.join(path, "tokenizer")
    if not os.path.isfile(os.path.join(tokenizer, "tokenizer.json")):  # else: a transformers-5 save
        for name in ("vocab.json", "merges.txt"):
            if not os.path.isfile(os.path.join(tokenizer, name)):
                raise PipelineFolderError(
                    f"the pretrained folder has no tokenizer/{name}: "
                    f"{os.path.join(tokenizer, name)} is missing"
                )
    file = lambda *parts: os.path.join(path, *parts)
    unet = _read_json(file("unet", "config.json"), "unet/config.json")
    vae = _read_json(file("vae", "config.json"), "vae/config.json")
    text = _read_json(file("text_encoder", "config.json"), "text_encoder/config.json")
    scheduler = _read_json(
        file("scheduler", "scheduler_config.json"), "scheduler/scheduler_config.json"
    )
    for component in _WEIGHTS:
        _check_weights(path, component)
    if unet.get("addition_embed_type") == "text_time":
        raise PipelineFolderError(
            f"{file('unet', 'config.json')}: addition_embed_type='text_time' is the SDXL U-Net, "
            f"which this project does not run; give an SD 1.x / 2.x folder"
        )
    unet_kwargs = _kwargs(
        file("unet", "config.json"), diffusers_unet_cond.unet_cond_kwargs_from_diffusers, unet
    )
    vae_kwargs = _kwargs(file("vae", "config.json"), diffusers_vae.vae_kwargs_from_diffusers, vae)
    text_kwargs = _kwargs(
        file("text_encoder", "config.json"), transformers_clip.clip_text_kwargs_from_config, text
    )
    folder = PipelineFolder(path, unet, vae, text, scheduler, unet_kwargs, vae_kwargs, text_kwargs)
    _check_parts_fit(folder)
    return folder


def _check_parts_fit(f: PipelineFolder) -> None:
    """The U-Net reads the text encoder's states and the VAE's latents, and predicts one value
    per latent channel; the U-Net of a text-to-image pipeline has no class labels."""
    unet_file = os.path.join(f.path, "unet", "config.json")
    width, context = f.text_kwargs["width"], f.unet_kwargs["cross_attention_dim"]
    if width != context:
        raise PipelineFolderError(
            f"{unet_file}: cross_attention_dim={context}, but text_encoder/config.json "
            f"hidden_size={width}: the U-Net cannot read this text encoder's states"
        )
    latent = f.vae_kwargs["latent_channels"]
    for field, value in (
        ("in_channels", f.unet_kwargs["in_channels"]),
        ("out_channels", f.unet_kwargs["out_channels"]),
    ):
        if value != latent:
            raise PipelineFolderError(
                f"{unet_file}: {field}={value}, but vae/config.json latent_channels={latent} "
                f"(an inpainting or learned-variance U-Net is not a text-to-image one)"
            )
    for field in ("num_class_embeds", "pooled_dim"):
        if f.unet_kwargs.get(field):
            raise PipelineFolderError(
                f"{unet_file}: the U-Net takes {field}={f.unet_kwargs[field]} (class labels / "
                f"a pooled vector), which a Stable Diffusion pipeline does not give it"
            )


def load_models(folder: PipelineFolder, *, dtype=None) -> dict:
    """{"text_encoder", "unet", "vae"}: the three networks with their converted weights
    (abstractly built, then filled: no random initialisation); ``dtype`` is the computation
    dtype (parameters stay float32)."""
    return {
        "text_encoder": transformers_clip.load_transformers_clip_text(
            folder.component("text_encoder"), dtype=dtype
        ),
        "unet": diffusers_unet_cond.load_diffusers_unet_cond(folder.component("unet"), dtype=dtype),
        "vae": diffusers_vae.load_diffusers_vae(folder.component("vae"), dtype=dtype),
    }
