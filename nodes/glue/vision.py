"""ComfyUI's CLIP vision model as the core's image encoder, checked to be ViT-H before it runs."""

from __future__ import annotations

import torch

from ...consistentid_core.constants import CLIP_WIDTH
from ...consistentid_core.errors import ModelFileError
from ...consistentid_core.face.clip_features import KNOWN_WIDTHS


def check_clip_vision(clip_vision) -> None:
    """Refuses a CLIP vision model other than ViT-H before running it (a bigG pass is expensive)."""
    vision = getattr(getattr(clip_vision, "model", None), "vision_model", None)
    embeddings = getattr(vision, "embeddings", None)
    cls_embed = getattr(embeddings, "class_embedding", None)
    width = None if cls_embed is None else int(cls_embed.shape[0])
    layers = len(getattr(getattr(vision, "encoder", None), "layers", []))
    if width != CLIP_WIDTH or layers != 32:
        kind = KNOWN_WIDTHS.get(width, "an unknown image encoder")
        raise ModelFileError(
            f"the CLIP vision model given is {kind} (width {width}, {layers} layers), not ViT-H/14; ConsistentID needs "
            "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors (the SD1.5 IP-Adapter image encoder) from models/clip_vision"
        )


def comfy_vision_encoder(clip_vision):
    """pixels [N,3,224,224] (already normalised) -> penultimate hidden states, through ComfyUI's model manager."""
    import comfy.model_management

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        comfy.model_management.load_model_gpu(clip_vision.patcher)
        out = clip_vision.model(pixel_values=pixels.to(clip_vision.load_device), intermediate_output=-2)
        return out[1]

    return encode

