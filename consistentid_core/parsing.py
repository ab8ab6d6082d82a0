"""Face parsing: BiSeNet label maps, the official region masks and the masked region images.

The region logic follows the official pipeline closely because the FacialEncoder was trained on
exactly these inputs: the whole photo squashed to a square for parsing, filled outer contours per
label (so "Face" covers the eyes, nose and mouth it encloses), only the first of each left/right
pair kept, and the masks upscaled with bicubic resampling onto the full, uncropped frame.

Label ids are the CelebAMask-HQ order used by the 19-class BiSeNet (``79999_iter.pth``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image

from .errors import InputImageError, ModelFileError

logger = logging.getLogger("consistentid")

# --- labels ------------------------------------------------------------------------------------

LABEL_BACKGROUND = 0
LABEL_SKIN = 1
LABEL_LEFT_BROW = 2
LABEL_RIGHT_BROW = 3
LABEL_LEFT_EYE = 4
LABEL_RIGHT_EYE = 5
LABEL_EYEGLASSES = 6
LABEL_LEFT_EAR = 7
LABEL_RIGHT_EAR = 8
LABEL_EARRING = 9
LABEL_NOSE = 10
LABEL_MOUTH = 11
LABEL_UPPER_LIP = 12
LABEL_LOWER_LIP = 13
LABEL_NECK = 14
LABEL_NECKLACE = 15
LABEL_CLOTH = 16
LABEL_HAIR = 17
LABEL_HAT = 18

NUM_LABELS = 19

# Names of the labels that ConsistentID uses are the official ones (they are the region keys the
# caption alignment looks up, so they must match exactly).  The official table mislabels several
# unused classes; here those carry their true CelebAMask-HQ meaning instead.
LABEL_NAMES: dict[int, str] = {
    LABEL_BACKGROUND: "Background",
    LABEL_SKIN: "Face",
    LABEL_LEFT_BROW: "Left_Eyebrow",
    LABEL_RIGHT_BROW: "Right_Eyebrow",
    LABEL_LEFT_EYE: "Left_Eye",
    LABEL_RIGHT_EYE: "Right_Eye",
    LABEL_EYEGLASSES: "Eyeglasses",
    LABEL_LEFT_EAR: "Left_Ear",
    LABEL_RIGHT_EAR: "Right_Ear",
    LABEL_EARRING: "Earring",
    LABEL_NOSE: "Nose",
    LABEL_MOUTH: "Mouth",
    LABEL_UPPER_LIP: "Upper_Lip",
    LABEL_LOWER_LIP: "Lower_Lip",
    LABEL_NECK: "Neck",
    LABEL_NECKLACE: "Necklace",
    LABEL_CLOTH: "Cloth",
    LABEL_HAIR: "Hair",
    LABEL_HAT: "Hat",
}

WITHOUT_BACKGROUND = "WithoutBackground"

# The official key_list.  Its own order does not decide the output order: selection walks the
# masks in ascending label order, so eyes (4, 5) come before ears (7, 8).
KEY_LIST: tuple[str, ...] = (
    "Face", "Left_Ear", "Right_Ear", "Left_Eye", "Right_Eye", "Nose", "Upper_Lip", "Lower_Lip",
)

MAX_REGIONS = 5

REGION_GROUPS: dict[str, str] = {
    "Face": "face",
    "Left_Eye": "eye",
    "Right_Eye": "eye",
    "Left_Ear": "ear",
    "Right_Ear": "ear",
    "Nose": "nose",
    "Upper_Lip": "lip",
    "Lower_Lip": "lip",
}

# Ascending-label order of the groups, i.e. the slot order the official selection produces.
GROUP_ORDER: tuple[str, ...] = ("face", "eye", "ear", "nose", "lip")

# OpenAI CLIP normalisation; an image filled with the mean colour normalises to all zeros, which
# is what the official code feeds for padded region slots and for the unconditional features.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Official parse resolutions: the whole photo is squashed to this square before BiSeNet.
PARSE_SIZE_SD15 = 512
PARSE_SIZE_SDXL = 1280


def region_group(name: str) -> str:
    """The pair-merged group of an official region name: ``region_group("Left_Eye") == "eye"``."""
    try:
        return REGION_GROUPS[name]
    except KeyError:
        raise KeyError(
            f"{name!r} is not a ConsistentID facial region; known regions: {', '.join(REGION_GROUPS)}"
        ) from None


# --- masks -------------------------------------------------------------------------------------

def _check_label_map(label_map: np.ndarray) -> np.ndarray:
    if not isinstance(label_map, np.ndarray) or label_map.ndim != 2:
        shape = getattr(label_map, "shape", type(label_map).__name__)
        raise InputImageError(f"A face-parsing label map must be a 2-D array (H, W); got {shape}.")
    if label_map.size == 0:
        raise InputImageError("The face-parsing label map is empty (0 pixels).")
    if label_map.dtype != np.uint8:
        if label_map.min() < 0 or label_map.max() > 255:
            raise InputImageError(
                f"Face-parsing labels must lie in 0..{NUM_LABELS - 1}; "
                f"found values {label_map.min()}..{label_map.max()}."
            )
        label_map = label_map.astype(np.uint8)
    # findContours needs a C-contiguous buffer.
    return np.ascontiguousarray(label_map)


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


# --- preview -----------------------------------------------------------------------------------

# Own palette: background black, the face parts ConsistentID uses in strong distinct hues,
# everything else in muted tones so the used regions stand out in a preview.
PALETTE = np.array(
    [
        (0, 0, 0),        # background
        (230, 180, 140),  # skin / Face
        (120, 90, 60),    # left brow
        (150, 110, 70),   # right brow
        (0, 120, 255),    # left eye
        (0, 200, 255),    # right eye
        (160, 160, 160),  # eyeglasses
        (255, 120, 0),    # left ear
        (255, 200, 0),    # right ear
        (200, 160, 60),   # earring
        (0, 210, 90),     # nose
        (110, 20, 60),    # mouth interior
        (255, 0, 110),    # upper lip
        (200, 0, 200),    # lower lip
        (170, 140, 120),  # neck
        (180, 180, 90),   # necklace
        (90, 110, 140),   # cloth
        (100, 60, 30),    # hair
        (120, 120, 60),   # hat
    ],
    dtype=np.uint8,
)


def colorize_labels(label_map: np.ndarray) -> np.ndarray:
    """Label map -> HxWx3 uint8 colour image with :data:`PALETTE`; unknown ids render white."""
    label_map = _check_label_map(label_map)
    lut = np.full((256, 3), 255, dtype=np.uint8)
    lut[:NUM_LABELS] = PALETTE
    return lut[label_map]


def overlay(image_rgb_uint8: np.ndarray, label_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the colourised labels over the image; background pixels keep the photo unchanged.

    A label map of another size (parse resolution) is stretched to the image with nearest
    neighbour, the inverse of how the photo was squashed for parsing.
    """
    img = np.asarray(image_rgb_uint8)
    if img.ndim != 3 or img.shape[2] != 3:
        raise InputImageError(f"overlay needs an HxWx3 RGB image, got shape {img.shape}.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in 0..1, got {alpha}.")
    label_map = _check_label_map(label_map)
    h, w = img.shape[:2]
    if label_map.shape != (h, w):
        label_map = cv2.resize(label_map, (w, h), interpolation=cv2.INTER_NEAREST)
    colours = colorize_labels(label_map).astype(np.float32)
    base = img.astype(np.float32)
    blended = base * (1.0 - alpha) + colours * alpha
    fg = (label_map != LABEL_BACKGROUND)[..., None]
    out = np.where(fg, blended, base)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# --- parser inference --------------------------------------------------------------------------

def _module_device_dtype(net: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in net.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def parse_image(net: torch.nn.Module, image: Image.Image, size: int) -> np.ndarray:
    """Run a 19-class BiSeNet on the whole image squashed to ``size`` x ``size``.

    Exactly the official preprocessing: PIL bilinear resize of the full frame (aspect ratio is
    ignored, there is no face crop), scale to 0..1, ImageNet normalisation, first network output,
    argmax over classes.  The input follows the device and dtype of the net's first parameter;
    the official parser runs in fp32, and fp16 can flip near-tied pixels.  The net should be in
    eval mode (BatchNorm); that is left to whoever loaded it.
    """
    if size <= 0:
        raise ValueError(f"Parse size must be positive, got {size}.")
    image = _as_rgb(image)
    resized = image.resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    x = ((x - mean) / std).unsqueeze(0)
    device, dtype = _module_device_dtype(net)
    if net.training:
        logger.warning("The face parser is in training mode; its BatchNorm layers will misbehave.")
    with torch.no_grad():
        out = net(x.to(device=device, dtype=dtype))
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[0] != 1 \
                or out.shape[1] != NUM_LABELS or tuple(out.shape[2:]) != (size, size):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelFileError(
                f"The face parser returned {shape}, expected (1, {NUM_LABELS}, {size}, {size}). "
                "Use the 19-class BiSeNet face_parsing.pth (79999_iter.pth)."
            )
        labels = out[0].argmax(dim=0)
    return labels.to(torch.uint8).cpu().numpy()
