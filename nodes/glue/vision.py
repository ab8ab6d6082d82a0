"""ComfyUI's CLIP vision model as the core's image encoder, checked to be ViT-H before it runs, and
the unified loader's cache of loaded CLIP vision files."""

from __future__ import annotations

import logging
import os
import threading

import torch

from ...consistentid_core.constants import CLIP_WIDTH
from ...consistentid_core.errors import ModelFileError
from ...consistentid_core.face.clip_features import KNOWN_WIDTHS
from ...consistentid_core.memo import ModelCache

logger = logging.getLogger("consistentid")

# Bounded: each entry is a ViT-H (about 1.2 GB in fp16) held for reuse by the unified loader; a host
# empties it when it frees memory (memo.release_model_caches).  ComfyUI's stock Load CLIP Vision node
# does not look here: it loads its own copy of the same file.
_CLIP_VISION_CACHE = ModelCache("CLIP vision", max_entries=2)
_CLIP_VISION_LOCK = threading.Lock()


def cached_clip_vision(path: str):
    """ComfyUI's CLIP vision model of a file, loaded once per (real path, size, modification time).

    Two unified loaders, or a re-run with other inputs, get the same object; a changed file is read again.
    """
    import comfy.clip_vision

    real = os.path.realpath(path)
    stat = os.stat(real)
    key = (real, stat.st_size, stat.st_mtime_ns)
    with _CLIP_VISION_LOCK:
        clip_vision = _CLIP_VISION_CACHE.get(key)
        if clip_vision is None:
            clip_vision = comfy.clip_vision.load(real)
            if clip_vision is None:
                raise ModelFileError(
                    f"{os.path.basename(real)}: ComfyUI does not recognise this file as a CLIP vision model; "
                    "ConsistentID needs CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors in models/clip_vision")
            _CLIP_VISION_CACHE[key] = clip_vision
            logger.info("loaded CLIP vision model %s", real)
        return clip_vision


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

