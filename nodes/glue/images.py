"""Conversions between ComfyUI IMAGE/MASK tensors and the numpy images the core works on."""

from __future__ import annotations

import numpy as np
import torch

from ...consistentid_core.errors import InputImageError
from ...consistentid_core.face.analysis import MAX_IMAGE_SIDE


def check_image_batch(images: torch.Tensor, what: str = "image") -> torch.Tensor:
    """The batch as [B,H,W,C]; InputImageError for a size the face step refuses anyway.

    Checked on the shape alone, before any pixel is converted: an 8000 x 8000 batch would
    otherwise cost a float copy and a uint8 copy of every image before the size check refused it.
    """
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise InputImageError(f"the {what} input has shape {list(images.shape)}; an IMAGE is [batch, height, width, "
                              "channels]: connect an IMAGE output")
    count, height, width = int(images.shape[0]), int(images.shape[1]), int(images.shape[2])
    if max(height, width) > MAX_IMAGE_SIDE:
        subject = "reference image" if what == "image" else what  # the core's wording for the same refusal
        raise InputImageError(
            f"{subject} is {width}x{height} px; sides above {MAX_IMAGE_SIDE} px are refused because detection works "
            f"at 640 px or less and a larger image only costs memory (all {count} image(s) of the batch refused "
            "before conversion): downscale it first, e.g. with ComfyUI's 'Upscale Image' node set to a smaller size"
        )
    return images


def image_batch_to_uint8(images: torch.Tensor, what: str = "image") -> list[np.ndarray]:
    """IMAGE [B,H,W,C] float 0..1 -> B arrays H x W x C uint8 (C as given; the core normalises channels).

    Images are converted one at a time (peak memory one float copy of one image, not of the
    batch); NaN/Inf pixels are refused by index, since clamping would make them black and the
    face step would then report "no face found".
    """
    images = check_image_batch(images, what)
    total = int(images.shape[0])
    arrays = []
    for index in range(total):
        image = images[index].detach().float().cpu()
        bad = int((~torch.isfinite(image)).sum())
        if bad:
            raise InputImageError(
                f"{what} {index} of {total} has NaN/Inf pixels ({bad} values); fix or replace the node that made it "
                "(pixel values must lie in 0..1)"
            )
        arrays.append((image.clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    return arrays


def uint8_to_image_batch(arrays: list[np.ndarray]) -> torch.Tensor:
    """Same-size H x W x 3 uint8 arrays -> IMAGE [B,H,W,3] float32."""
    return torch.from_numpy(np.stack(arrays)).float() / 255.0
