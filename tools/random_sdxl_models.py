"""Random-weight SDXL files with the real layouts: a whole checkpoint and an InstantID-style ControlNet.

A random SDXL base model (UNet 2.6 B parameters, CLIP-L and OpenCLIP bigG text encoders, VAE)
does not fit twice in 24 GB in fp32, so everything here is drawn tensor by tensor and stored in
fp16: the checkpoint is about 7 GB on disk, and ComfyUI loads it with its half-precision options
(``--bf16-unet``; its text encoders are fp16 on the CPU anyway).  Like the SD1.5 builders in
``tools/random_models.py`` the files are built once into the test-model cache.

``sdxl_checkpoint`` needs ComfyUI set up in this process (it converts and saves through
ComfyUI's own code, as ``random_models.sd15_checkpoint`` does).
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch

from tools.random_models import (
    SD15_TEXT_CONFIG,
    SD15_VAE_CONFIG,
    UNET_CONFIGS,
    _clip_like_state,
    _fan_in_state,
    _meta_state,
    cached_file,
    comfy_unet,
    place,
)

# OpenCLIP ViT-bigG/14's text tower as transformers describes it (the SDXL base 1.0 text_encoder_2/).
SDXL_CLIP_G_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 1280,
}
# InstantID's ControlNet is a diffusers ControlNetModel of the SDXL UNet's encoder half.
SDXL_CONTROLNET_CONFIG = {
    key: UNET_CONFIGS["sdxl"][key] for key in (
        "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "block_out_channels",
        "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps",
        "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim", "use_linear_projection",
        "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim")
}
SDXL_CONTROLNET_CONFIG["conditioning_channels"] = 3


def sdxl_text_and_vae_states(seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, dict[str, torch.Tensor]]:
    """Random transformers/diffusers state dicts of SDXL's CLIP-L and bigG text encoders and its VAE."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def text_shapes(build):
        return {k: v for k, v in _meta_state(build).items() if not k.endswith("position_ids")}

    return {
        "vae": _fan_in_state(_meta_state(lambda: AutoencoderKL(**SD15_VAE_CONFIG)), seed + 1, dtype),
        "clip_l": _clip_like_state(text_shapes(lambda: CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))), seed + 2,
                                   dtype),
        "clip_g": _clip_like_state(
            text_shapes(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_CLIP_G_CONFIG))), seed + 3, dtype),
    }


def _write_sdxl_checkpoint(tmp: Path, seed: int = 0) -> None:
    import comfy.model_management
    import comfy.sd

    # The UNet is built by ComfyUI from SDXL's config and filled in place (comfy_unet), so only
    # one copy of its 5 GB ever exists; the text encoders and the VAE go through their loaders.
    model = comfy_unet("sdxl", seed, dtype=torch.float16)
    states = sdxl_text_and_vae_states(seed)
    clip = comfy.sd.load_text_encoder_state_dicts([states.pop("clip_l"), states.pop("clip_g")],
                                                  clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    vae = comfy.sd.VAE(sd=states.pop("vae"), dtype=torch.float16)
    gc.collect()
    comfy.sd.save_checkpoint(str(tmp), model, clip, vae, metadata={"cid_test_model": json.dumps({"seed": seed})})
    del model, clip, vae
    comfy.model_management.cleanup_models()
    comfy.model_management.soft_empty_cache()
    gc.collect()


def sdxl_checkpoint(path) -> Path:
    """A complete random SDXL base checkpoint in the single-file layout, fp16 safetensors (about 7 GB).

    ``model.diffusion_model.*`` (UNet), ``conditioner.embedders.0.transformer.text_model.*`` (CLIP-L),
    ``conditioner.embedders.1.model.*`` (bigG, OpenCLIP names) and ``first_stage_model.*`` (VAE):
    written by ``comfy.sd.save_checkpoint`` from the diffusers layouts, so CheckpointLoaderSimple
    recognises it as SDXL.  The first build takes a few minutes and about 8 GB of memory.
    """
    return place(cached_file("sdxl_checkpoint", ".safetensors", _write_sdxl_checkpoint), path)


def _write_instantid_controlnet(tmp: Path, seed: int = 5) -> None:
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    state = _fan_in_state(_meta_state(lambda: ControlNetModel(**SDXL_CONTROLNET_CONFIG)), seed, torch.float16)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})


def instantid_controlnet(path) -> Path:
    """An SDXL ControlNet in diffusers' layout (InstantID's ``diffusion_pytorch_model.safetensors``),
    random fp16 weights, about 2.5 GB; ComfyUI's ControlNetLoader converts the names itself."""
    return place(cached_file("instantid_controlnet", ".safetensors", _write_instantid_controlnet), path)


__all__ = ["SDXL_CLIP_G_CONFIG", "SDXL_CONTROLNET_CONFIG", "instantid_controlnet", "sdxl_checkpoint",
           "sdxl_text_and_vae_states"]
