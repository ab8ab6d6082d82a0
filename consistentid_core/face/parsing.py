"""Face parsing: from a BiSeNet label map to the official region masks and the masked region images.

The region logic follows the official pipeline closely because the FacialEncoder was trained on
exactly these inputs: the whole photo squashed to a square for parsing (``parser.parse_image``),
filled outer contours per label (so "Face" covers the eyes, nose and mouth it encloses), only the
first of each left/right pair kept, and the masks upscaled with bicubic resampling onto the full,
uncropped frame.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image

from ..constants import CLIP_MEAN, MAX_REGIONS
from ..errors import InputImageError
from .labels import (
    GROUP_ORDER, KEY_LIST, LABEL_BACKGROUND, LABEL_NAMES, NUM_LABELS, WITHOUT_BACKGROUND, _check_label_map, region_group,
)

logger = logging.getLogger("consistentid")


# --- masks -------------------------------------------------------------------------------------


def _filled_mask(binary: np.ndarray) -> np.ndarray:
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = np.zeros_like(binary)
    cv2.drawContours(out, contours, -1, 255, thickness=cv2.FILLED)
    return out


def label_masks(label_map: np.ndarray) -> dict[str, np.ndarray]:
    """Filled-contour masks of every label present, as uint8 0/255 arrays at parse resolution.

    Order: ``WithoutBackground`` first (when label 0 is present), then every present label in
    ascending id order.  For a map that holds every class that is WithoutBackground, Background,
    Face, Left_Eyebrow, Right_Eyebrow, Left_Eye, Right_Eye, Eyeglasses, Left_Ear, Right_Ear,
    Earring, Nose, Mouth, Upper_Lip, Lower_Lip, Neck, Necklace, Cloth, Hair, Hat; restricted to the
    names ConsistentID uses this is the spec's sequence WithoutBackground, Background, Face,
    Left_Eye, Right_Eye, Left_Ear, Right_Ear, Nose, Upper_Lip, Lower_Lip.

    Only outer contours are drawn, filled, so enclosed holes become part of the mask.
    ``WithoutBackground`` is the inverse of the filled background mask (the official code uses it
    only in training).
    """
    label_map = _check_label_map(label_map)
    present = np.unique(label_map)
    if int(present[-1]) >= NUM_LABELS:
        raise InputImageError(
            f"Face-parsing labels must lie in 0..{NUM_LABELS - 1}; found {int(present[-1])}. "
            "Is the parser a 19-class CelebAMask-HQ BiSeNet?"
        )
    masks: dict[str, np.ndarray] = {}
    for value in present:
        value = int(value)
        filled = _filled_mask((label_map == value).astype(np.uint8) * 255)
        if value == LABEL_BACKGROUND:
            masks[WITHOUT_BACKGROUND] = 255 - filled
        masks[LABEL_NAMES[value]] = filled
    return masks


def select_regions(masks: dict) -> dict:
    """The official key selection: at most one mask per group, in ascending-label order.

    Walks ``masks`` in its own order (ascending labels when it comes from :func:`label_masks`),
    keeps names from the official key list and, for the paired names (Eye, Ear, Lip), only the
    first one met.  The result is ordered Face, Left_Eye (or Right_Eye), Left_Ear (or Right_Ear),
    Nose, Upper_Lip (or Lower_Lip); absent parts are simply missing.
    """
    kept: dict = {}
    seen_pairs: set[str] = set()
    for name, mask in masks.items():
        if name not in KEY_LIST:
            continue
        if "_" in name:
            suffix = name.split("_", 1)[1]
            if suffix in seen_pairs:
                continue
            seen_pairs.add(suffix)
        kept[name] = mask
    return kept


@dataclass
class RegionMasks:
    """Kept regions of one image: official names in slot order and their stacked 0/255 masks."""

    names: list[str]
    masks: np.ndarray  # [K, H, W] uint8, K <= MAX_REGIONS

    def as_dict(self) -> dict[str, np.ndarray]:
        return {name: self.masks[i] for i, name in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)


def group_masks(label_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """[5, height, width] float32 masks in 0..1, one per group of :data:`GROUP_ORDER` (face, eye, ear,
    nose, lip; a kept pair shares its slot, a missing group stays empty), resized from the parse size
    to the photo's with bicubic filtering, as the region images are."""
    slots = np.zeros((len(GROUP_ORDER), height, width), dtype=np.float32)
    for name, mask in region_masks(label_map).as_dict().items():
        resized = Image.fromarray(mask).resize((width, height), Image.BICUBIC)
        slots[GROUP_ORDER.index(region_group(name))] = np.asarray(resized, dtype=np.float32) / 255
    return slots


def region_masks(label_map: np.ndarray) -> RegionMasks:
    """Label map -> kept region masks (:func:`label_masks` followed by :func:`select_regions`)."""
    label_map = _check_label_map(label_map)
    kept = select_regions(label_masks(label_map))
    names = list(kept)
    if names:
        stacked = np.stack([kept[n] for n in names])
    else:
        stacked = np.zeros((0,) + label_map.shape, dtype=np.uint8)
    return RegionMasks(names=names, masks=stacked)


# --- region images -----------------------------------------------------------------------------

def _as_rgb(image) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise InputImageError(f"Expected a PIL image, got {type(image).__name__}.")
    if image.width == 0 or image.height == 0:
        raise InputImageError(f"The image has no pixels ({image.width}x{image.height}).")
    return image if image.mode == "RGB" else image.convert("RGB")


def _as_mask_image(mask) -> Image.Image:
    if isinstance(mask, Image.Image):
        return mask if mask.mode == "L" else mask.convert("L")
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise InputImageError(f"A region mask must be 2-D (H, W); got shape {arr.shape}.")
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr), mode="L")


def region_images(image: Image.Image, masks: dict) -> list[Image.Image]:
    """Full-frame masked copies of ``image``, one per mask, in the dict's order.

    Each mask is resized from parse resolution to the image size with bicubic resampling (what
    PIL's ``resize`` picks by default for "L" images, passed explicitly so a Pillow change cannot
    alter it), which gives soft edges; then ``Image.composite(image, black, mask)``.  There is no
    crop to the region's bounding box, matching what the FacialEncoder saw in training.
    """
    image = _as_rgb(image)
    black = Image.new("RGB", image.size, (0, 0, 0))
    out = []
    for mask in masks.values():
        mask_img = _as_mask_image(mask)
        if mask_img.size != image.size:
            mask_img = mask_img.resize(image.size, Image.BICUBIC)
        out.append(Image.composite(image, black, mask_img))
    return out


def _size_hw(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    width, height = size
    return int(height), int(width)


def clip_mean_image(size) -> torch.Tensor:
    """An image filled with the CLIP mean colour: float32 [H, W, 3] in 0..1.

    ``size`` is an int (square) or ``(width, height)`` as in PIL.  After CLIP normalisation this
    is the all-zero tensor the official code uses for padded regions and unconditional features,
    provided the encoder does not quantise it to 8 bits first.
    """
    h, w = _size_hw(size)
    if h <= 0 or w <= 0:
        raise InputImageError(f"Image size must be positive, got {w}x{h}.")
    colour = torch.tensor(CLIP_MEAN, dtype=torch.float32)
    return colour.expand(h, w, 3).clone()


def pil_to_tensor_hwc(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float32 [H, W, 3] in 0..1 (the image layout ComfyUI passes around)."""
    arr = np.asarray(_as_rgb(image), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy())


def pad_regions(
    regions: list, image_size, count: int = MAX_REGIONS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack region images and pad them to ``count`` slots with CLIP-mean images.

    ``regions`` holds PIL images or float [H, W, 3] tensors of one size; ``image_size`` is
    ``(width, height)`` (or an int) and is what the padding uses, so no regions at all is fine.
    Returns ``(images [count, H, W, 3] float32 in 0..1, valid [count] bool)``, real regions first.
    """
    if len(regions) > count:
        raise ValueError(f"{len(regions)} regions given, at most {count} fit.")
    h, w = _size_hw(image_size)
    filler = clip_mean_image((w, h))
    slots = []
    for i, region in enumerate(regions):
        t = pil_to_tensor_hwc(region) if isinstance(region, Image.Image) else region.float()
        if tuple(t.shape) != (h, w, 3):
            raise InputImageError(
                f"Region image {i} has shape {tuple(t.shape)}, expected ({h}, {w}, 3) "
                "(region images are full-frame, the size of the reference image)."
            )
        slots.append(t.to(filler.device))
    slots.extend(filler for _ in range(count - len(regions)))
    valid = torch.zeros(count, dtype=torch.bool)
    valid[: len(regions)] = True
    return torch.stack(slots), valid
