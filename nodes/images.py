"""Conversions between ComfyUI IMAGE/MASK tensors and the numpy images the core works on."""

from __future__ import annotations

import numpy as np
import torch


def image_batch_to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """IMAGE [B,H,W,C] float 0..1 -> B arrays H x W x C uint8 (C as given; the core normalises channels)."""
    if images.ndim == 3:
        images = images[None]
    arrays = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return [a for a in arrays]


def uint8_to_image_batch(arrays: list[np.ndarray]) -> torch.Tensor:
    """Same-size H x W x 3 uint8 arrays -> IMAGE [B,H,W,3] float32."""
    return torch.from_numpy(np.stack(arrays)).float() / 255.0
