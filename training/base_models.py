"""The frozen models of a training run, read from local files only, and the architecture checks.

A base model is a diffusers folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, plus
``text_encoder_2/`` and ``tokenizer_2/`` for SDXL, ``scheduler/`` optional) or a single-file
checkpoint that diffusers can convert (its component configs come from ``base_model_config``
when they are not in the local Hugging Face cache).  The image encoder is CLIP ViT-H/14: a
``CLIPVisionModelWithProjection`` folder or the ``.safetensors`` file the ComfyUI clip_vision
folder holds.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from consistentid_core.face.clip_features import CLIP_TOKENS, CLIP_WIDTH, KNOWN_WIDTHS
from consistentid_core.errors import TrainingConfigError
from consistentid_core.model.layers import ARCH_LABEL, LAYOUTS, UNetLayout

logger = logging.getLogger("consistentid.training")

VIT_H_HEADS = 16
SD_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                "num_train_timesteps": 1000, "prediction_type": "epsilon"}


@dataclass
class BaseModels:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    image_encoder: torch.nn.Module
    scheduler: object
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object = None
    source: str = ""

    @property
    def family(self) -> str:
        """How the text is conditioned: "sdxl" (two encoders, pooled + time ids) or "sd15"."""
        return "sdxl" if self.text_encoder_2 is not None else "sd15"

    @property
    def layout(self) -> UNetLayout:
        return UNetLayout.from_diffusers_config(self.unet.config)

    def frozen(self):
        return [m for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2, self.image_encoder) if m is not None]


def describe_layout(layout: UNetLayout) -> str:
    arch = next((name for name, known in LAYOUTS.items() if known == layout), None)
    if arch:
        return f"{ARCH_LABEL[arch]} (cross_attention_dim {layout.cross_attention_dim})"
    return f"a custom UNet (cross_attention_dim {layout.cross_attention_dim}, channels {list(layout.block_out_channels)})"


def arch_of(layout: UNetLayout) -> str:
    return next((name for name, known in LAYOUTS.items() if known == layout), "custom")


def _from_folder(path: str) -> BaseModels:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    needed = ["unet", "vae", "text_encoder", "tokenizer"]
    missing = [name for name in needed if not os.path.isdir(os.path.join(path, name))]
    if missing:
        raise TrainingConfigError(f"base model folder {path} lacks {', '.join(missing)}/ (found {sorted(os.listdir(path))[:12]}); "
                                  "a diffusers-format folder has unet/, vae/, text_encoder/ and tokenizer/")

    def part(cls, name):
        return cls.from_pretrained(path, subfolder=name, local_files_only=True)

    second = os.path.isdir(os.path.join(path, "text_encoder_2"))
    scheduler_dir = os.path.join(path, "scheduler")
    scheduler = part(DDPMScheduler, "scheduler") if os.path.isdir(scheduler_dir) else DDPMScheduler(**SD_SCHEDULER)
    return BaseModels(
        unet=part(UNet2DConditionModel, "unet"),
        vae=part(AutoencoderKL, "vae"),
        text_encoder=part(CLIPTextModel, "text_encoder"),
        tokenizer=part(CLIPTokenizer, "tokenizer"),
        image_encoder=None,
        scheduler=scheduler,
        text_encoder_2=part(CLIPTextModelWithProjection, "text_encoder_2") if second else None,
        tokenizer_2=part(CLIPTokenizer, "tokenizer_2") if second else None,
        source=path,
    )


def _from_single_file(path: str, config: str | None) -> BaseModels:
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import safe_open

    is_xl = False
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as f:
            is_xl = any(k.startswith("conditioner.embedders.1.") for k in f.keys())
    cls = StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
    extra = {} if is_xl else {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = cls.from_single_file(path, config=config, local_files_only=True, **extra)
    except Exception as exc:  # diffusers raises many kinds here; what matters is which file and what to do
        raise TrainingConfigError(
            f"diffusers could not read the single-file checkpoint {path} ({type(exc).__name__}: {exc}). Without network "
            "access it needs the component configs: set base_model_config to a diffusers-format folder of the same "
            "architecture (its weights are not used), or convert the checkpoint to a diffusers folder"
        ) from exc
    return BaseModels(
        unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, image_encoder=None,
        scheduler=DDPMScheduler.from_config(pipe.scheduler.config), text_encoder_2=getattr(pipe, "text_encoder_2", None),
        tokenizer_2=getattr(pipe, "tokenizer_2", None), source=path,
    )


def _vit_h_config(state: dict):
    """A CLIPVisionConfig read off the weight shapes; only the head count (16 for ViT-H) is assumed."""
    from transformers import CLIPVisionConfig

    prefix = "vision_model."
    patch = state[prefix + "embeddings.patch_embedding.weight"]
    positions = state[prefix + "embeddings.position_embedding.weight"].shape[0]
    layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith(prefix + "encoder.layers."))
    width = int(patch.shape[0])
    projection = state.get("visual_projection.weight")
    return CLIPVisionConfig(
        hidden_size=width, num_hidden_layers=layers, num_attention_heads=VIT_H_HEADS,
        intermediate_size=int(state[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0]),
        patch_size=int(patch.shape[-1]), image_size=int(patch.shape[-1] * round((positions - 1) ** 0.5)),
        projection_dim=int(projection.shape[0]) if projection is not None else 1024, hidden_act="gelu", layer_norm_eps=1e-5,
    )


def load_image_encoder(path: str) -> torch.nn.Module:
    from transformers import CLIPVisionModelWithProjection

    if os.path.isdir(path):
        model = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True)
    elif os.path.isfile(path) and path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
        if "vision_model.embeddings.patch_embedding.weight" not in state:
            raise TrainingConfigError(f"image encoder {path} is not a CLIP vision model (no vision_model.* weights)")
        width = int(state["vision_model.embeddings.patch_embedding.weight"].shape[0])
        if width != CLIP_WIDTH:
            raise TrainingConfigError(_vision_message(path, width))
        model = CLIPVisionModelWithProjection(_vit_h_config(state))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if [k for k in missing if not k.endswith("position_ids")] or unexpected:
            raise TrainingConfigError(f"image encoder {path}: weights do not fit CLIP ViT-H (missing {missing[:3]}, unexpected {unexpected[:3]})")
    else:
        raise TrainingConfigError(f"image encoder not found: {path} (a CLIPVisionModelWithProjection folder or .safetensors file)")
    config = model.config
    tokens = (config.image_size // config.patch_size) ** 2 + 1
    if config.hidden_size != CLIP_WIDTH or tokens != CLIP_TOKENS:
        raise TrainingConfigError(_vision_message(path, config.hidden_size, tokens))
    return model


def _vision_message(path: str, width: int, tokens: int = CLIP_TOKENS) -> str:
    kind = KNOWN_WIDTHS.get(width, f"{width} wide")
    return (f"image encoder {path} is {kind} with {tokens} tokens; ConsistentID needs CLIP ViT-H/14 "
            f"({CLIP_TOKENS} tokens x {CLIP_WIDTH}), e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K")


def load_base_models(base_model: str, image_encoder: str, base_model_config: str | None = None) -> BaseModels:
    base_model = os.path.expanduser(base_model)
    if os.path.isdir(base_model):
        try:
            models = _from_folder(base_model)
        except (OSError, ValueError) as exc:
            raise TrainingConfigError(f"base model folder {base_model} could not be loaded ({exc})") from exc
    elif os.path.isfile(base_model):
        models = _from_single_file(base_model, base_model_config)
    else:
        raise TrainingConfigError(f"base model not found: {base_model} (a diffusers folder or a .safetensors checkpoint)")
    models.image_encoder = load_image_encoder(os.path.expanduser(image_encoder))
    for module in models.frozen():
        module.requires_grad_(False).eval()
    return models


def check_architecture(models: BaseModels, requested: str = "auto", init_layout: UNetLayout | None = None,
                       init_name: str = "") -> str:
    """The run's arch ("sd15", "sdxl" or "custom"), or TrainingConfigError naming what does not fit."""
    layout = models.layout
    arch = arch_of(layout)
    where = f"the base UNet in {models.source}"
    if requested not in ("auto", arch):
        wanted = ARCH_LABEL.get(requested, requested)
        raise TrainingConfigError(f"arch is {requested} ({wanted}) but {where} is {describe_layout(layout)}; "
                                  f"use a {wanted} base model or set arch to auto")
    if init_layout is not None and init_layout != layout:
        raise TrainingConfigError(f"{init_name} is a ConsistentID checkpoint for {describe_layout(init_layout)}, but {where} "
                                  f"is {describe_layout(layout)}; fine-tune it on the base model it was trained for")
    width = models.text_encoder.config.hidden_size
    if models.text_encoder_2 is not None:
        width += models.text_encoder_2.config.hidden_size
    if width != layout.cross_attention_dim:
        raise TrainingConfigError(f"the text encoder(s) of {models.source} give {width}-wide embeddings but {where} expects "
                                  f"cross_attention_dim {layout.cross_attention_dim}; the parts come from different models")
    wants_time_ids = models.unet.config.get("addition_embed_type") == "text_time"
    if wants_time_ids != (models.family == "sdxl"):
        raise TrainingConfigError(f"{where} {'needs' if wants_time_ids else 'does not take'} SDXL's pooled text and "
                                  f"time ids, but the base model {'lacks' if wants_time_ids else 'has'} a text_encoder_2")
    if arch == "custom" and layout.cross_attention_dim % 64:
        raise TrainingConfigError(f"{where} has cross_attention_dim {layout.cross_attention_dim}; ConsistentID's ID "
                                  "projection needs a multiple of 64")
    return arch
