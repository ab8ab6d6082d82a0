"""CLIP ViT-H inputs and feature checks for the identity and region streams.

Preprocessing follows Hugging Face's ``CLIPImageProcessor`` defaults with PIL (shortest edge to
224 with bicubic, centre crop, /255, OpenAI mean/std), which is what the official pipeline used;
ComfyUI's own tensor preprocessing differs slightly and rounds to 8 bits, so the unconditional
"zero image" is fed as an exact zero tensor here.  The vision model itself is any callable
``pixels [N,3,224,224] -> penultimate hidden states [N,257,1280]``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image

from ..errors import ModelFileError
from ..constants import CLIP_MEAN, CLIP_SIZE, CLIP_STD, CLIP_TOKENS, CLIP_WIDTH

VisionEncoder = Callable[[torch.Tensor], torch.Tensor]

KNOWN_WIDTHS = {768: "ViT-B", 1024: "ViT-L", 1280: "ViT-H", 1664: "ViT-bigG"}


def clip_pixel_values(image: Image.Image, size: int = CLIP_SIZE) -> torch.Tensor:
    """One RGB PIL image -> normalised [3, size, size] float32 tensor."""
    image = image.convert("RGB")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    image = image.resize((new_w, new_h), resample=Image.BICUBIC, reducing_gap=None)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    image = image.crop((left, top, left + size, top + size))
    pixels = np.asarray(image, dtype=np.float64) * (1 / 255)
    pixels = pixels.astype(np.float32)
    pixels = (pixels - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def zero_pixel_values(count: int = 1, size: int = CLIP_SIZE) -> torch.Tensor:
    """The official unconditional input: an all-zero normalised tensor (the CLIP mean colour)."""
    return torch.zeros(count, 3, size, size)


def check_vision_features(features: torch.Tensor, count: int, source: str = "the CLIP vision model") -> torch.Tensor:
    """Refuses anything but ViT-H/14 penultimate states, naming the model that was given."""
    if features.ndim != 3 or features.shape[0] != count:
        raise ModelFileError(f"{source} returned features of shape {list(features.shape)} for {count} images")
    tokens, width = int(features.shape[1]), int(features.shape[2])
    if (tokens, width) != (CLIP_TOKENS, CLIP_WIDTH):
        kind = KNOWN_WIDTHS.get(width, f"a {width}-wide encoder")
        raise ModelFileError(
            f"{source} is {kind} ({tokens} tokens x {width}); ConsistentID needs CLIP ViT-H/14 "
            f"({CLIP_TOKENS} x {CLIP_WIDTH}), e.g. CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors in models/clip_vision"
        )
    return features


def encode_pixels(encoder: VisionEncoder, pixels: torch.Tensor, chunk: int = 8, source: str = "the CLIP vision model") -> torch.Tensor:
    """Runs the encoder in chunks (a photo plus 5 regions per reference adds up) and checks the result."""
    outputs = []
    with torch.no_grad():
        for start in range(0, pixels.shape[0], chunk):
            outputs.append(encoder(pixels[start : start + chunk]).float().cpu())
    return check_vision_features(torch.cat(outputs), pixels.shape[0], source)
