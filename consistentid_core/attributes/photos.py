"""Extrinsic attributes (FlexID): which parts of a photo carry styling rather than identity.

Hair, eyeglasses, hat, earrings and necklace come from the 19-class parse of an *attribute
photo*, plus the face outline for face shape.  Each is cut into its own picture, encoded by CLIP
ViT-H and kept in :class:`AttributeEmbeds`; the trainable branch that turns these features into
attribute tokens lives in :mod:`.attribute_branch`.

Choices, and why:

* Accessories and hair use the raw label pixels, not filled contours: hair often forms a closed
  ring around the face, and filling its outline would hand the identity's eyes and mouth to the
  attribute branch, the very leak the branch exists to avoid.
* The face outline is drawn as a white silhouette on black.  Its job is the head shape; the
  pixels inside it are the identity, which the ID branch already carries.
* Pictures are loose square crops around each region by default, not full frames as the
  FacialEncoder's regions are: CLIP sees 224 px, so an earring in a full frame would be a few
  pixels, and the margin keeps the surrounding hairline and head shape FlexID describes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from PIL import Image

from ..face.clip_features import CLIP_TOKENS, CLIP_WIDTH, VisionEncoder, clip_pixel_values, encode_pixels, zero_pixel_values
from ..constants import PARSE_SIZE
from ..errors import EmbedsError, InputImageError
from ..face.analysis import to_rgb_uint8
from ..progress import Progress, each_with_progress
from ..face.labels import LABEL_EARRING, LABEL_EYEGLASSES, LABEL_HAIR, LABEL_HAT, LABEL_LEFT_BROW, LABEL_LEFT_EYE, LABEL_LOWER_LIP, LABEL_MOUTH, LABEL_NECKLACE, LABEL_NOSE, LABEL_RIGHT_BROW, LABEL_RIGHT_EYE, LABEL_SKIN, LABEL_UPPER_LIP, NUM_LABELS
from ..face.parser import parse_image

logger = logging.getLogger("consistentid")

FACE_OUTLINE = "face_outline"
EXTRINSIC_LABELS: dict[str, tuple[int, ...]] = {
    "hair": (LABEL_HAIR,),
    "eyeglasses": (LABEL_EYEGLASSES,),
    "hat": (LABEL_HAT,),
    "earrings": (LABEL_EARRING,),
    "necklace": (LABEL_NECKLACE,),
}
# Skin with everything it encloses; glasses count as face so their frames do not dent the outline.
FACE_OUTLINE_LABELS = (
    LABEL_SKIN, LABEL_LEFT_BROW, LABEL_RIGHT_BROW, LABEL_LEFT_EYE, LABEL_RIGHT_EYE, LABEL_EYEGLASSES,
    LABEL_NOSE, LABEL_MOUTH, LABEL_UPPER_LIP, LABEL_LOWER_LIP,
)
ATTRIBUTE_NAMES: tuple[str, ...] = tuple(EXTRINSIC_LABELS) + (FACE_OUTLINE,)
"""Slot order of every attribute tensor; the branch learns one embedding per slot, so it is fixed."""

# BiSeNet scatters stray pixels of rare classes; below this share of the frame a region is noise.
MIN_AREA_FRACTION = 0.0005
CROP_MARGIN = 0.15
CROP_MODES = ("crop", "full")

NO_ATTRIBUTES_MESSAGE = (
    "the attribute photo shows no hair, glasses, hat, earrings or necklace; the attribute branch is skipped"
)


def _label_array(label_map) -> np.ndarray:
    arr = np.asarray(label_map)
    if arr.ndim != 2 or arr.size == 0:
        raise InputImageError(f"An attribute label map must be a non-empty 2-D array (H, W); got shape {arr.shape}.")
    if arr.min() < 0 or arr.max() >= NUM_LABELS:
        raise InputImageError(
            f"Face-parsing labels must lie in 0..{NUM_LABELS - 1}; found {arr.min()}..{arr.max()}. "
            "Is the parser a 19-class CelebAMask-HQ BiSeNet?"
        )
    return arr.astype(np.uint8)


def _filled(binary: np.ndarray) -> np.ndarray:
    contours, _ = cv2.findContours(np.ascontiguousarray(binary), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = np.zeros_like(binary)
    cv2.drawContours(out, contours, -1, 255, thickness=cv2.FILLED)
    return out


def attribute_regions(label_map, min_fraction: float = MIN_AREA_FRACTION) -> dict[str, np.ndarray]:
    """{name: uint8 0/255 mask at parse resolution} of the attributes present, in :data:`ATTRIBUTE_NAMES` order."""
    labels = _label_array(label_map)
    min_pixels = max(1, int(round(min_fraction * labels.size)))
    regions: dict[str, np.ndarray] = {}
    for name in ATTRIBUTE_NAMES:
        wanted = FACE_OUTLINE_LABELS if name == FACE_OUTLINE else EXTRINSIC_LABELS[name]
        binary = np.isin(labels, wanted).astype(np.uint8) * 255
        if int(np.count_nonzero(binary)) < min_pixels:
            continue
        regions[name] = _filled(binary) if name == FACE_OUTLINE else binary
    return regions


def has_extrinsic(names) -> bool:
    """The face outline alone is no attribute: nearly every face photo has one, and a face shape from
    another photo is what the released weights already give (region mixing of the "face" region)."""
    return any(name in EXTRINSIC_LABELS for name in names)


def _square_box(mask: np.ndarray, margin: float) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask > 127)
    if len(xs) == 0:
        h, w = mask.shape
        return 0, 0, w, h
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    side = max(x1 - x0, y1 - y0) * (1.0 + 2.0 * margin)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    half = max(side, 1.0) / 2.0
    # Square, because CLIP's preprocessing centre-crops to a square and would cut a long box.
    return int(round(cx - half)), int(round(cy - half)), int(round(cx + half)), int(round(cy + half))


def attribute_images(image: Image.Image, masks: dict, mode: str = "crop", margin: float = CROP_MARGIN) -> list[Image.Image]:
    """One picture per mask, in the dict's order: the region on black (silhouette for the face outline).

    ``mode="crop"`` cuts a square around the region with ``margin`` of its size on each side (the
    part past the frame is black); ``mode="full"`` keeps the whole frame like the official regions.
    """
    if mode not in CROP_MODES:
        raise ValueError(f"attribute image mode must be one of {CROP_MODES}, got {mode!r}")
    if not isinstance(image, Image.Image) or image.width == 0 or image.height == 0:
        raise InputImageError(f"The attribute photo must be a non-empty PIL image, got {image!r}.")
    image = image.convert("RGB")
    black = Image.new("RGB", image.size, (0, 0, 0))
    white = Image.new("RGB", image.size, (255, 255, 255))
    out = []
    for name, mask in masks.items():
        mask_img = Image.fromarray(np.ascontiguousarray(np.asarray(mask, dtype=np.uint8)), mode="L")
        if mask_img.size != image.size:
            # Bicubic like the official region images: the soft edge is what CLIP saw there too.
            mask_img = mask_img.resize(image.size, Image.BICUBIC)
        picture = Image.composite(white if name == FACE_OUTLINE else image, black, mask_img)
        if mode == "crop":
            picture = picture.crop(_square_box(np.asarray(mask_img), margin))
        out.append(picture)
    return out


@dataclass
class AttributeEmbeds:
    """CLIP ViT-H penultimate features of the attribute pictures of N attribute photos.

    ``features`` [N, S, 257, 1280] with S = len(:data:`ATTRIBUTE_NAMES`) slots in that order (an
    absent attribute's slot holds zeros), ``valid`` [N, S] marks the present ones, ``uncond``
    [1, 257, 1280] are the features of the zero (CLIP-mean) image, from which the branch makes its
    unconditional tokens.  In memory only; nothing saves it yet.
    """

    features: torch.Tensor
    valid: torch.Tensor
    uncond: torch.Tensor
    sources: list[str] = field(default_factory=list)
    names: tuple[str, ...] = ATTRIBUTE_NAMES

    def __post_init__(self) -> None:
        self.names = tuple(self.names)
        if self.names != ATTRIBUTE_NAMES:
            raise EmbedsError(f"AttributeEmbeds slots are {list(self.names)}; this version knows {list(ATTRIBUTE_NAMES)}.")
        slots = len(ATTRIBUTE_NAMES)
        if self.features.ndim != 4 or tuple(self.features.shape[1:]) != (slots, CLIP_TOKENS, CLIP_WIDTH):
            raise EmbedsError(
                f"AttributeEmbeds.features has shape {list(self.features.shape)}, expected "
                f"[N, {slots}, {CLIP_TOKENS}, {CLIP_WIDTH}] (CLIP ViT-H features per attribute slot)."
            )
        n = int(self.features.shape[0])
        if n < 1:
            raise EmbedsError("AttributeEmbeds hold no attribute photo.")
        if tuple(self.valid.shape) != (n, slots) or self.valid.dtype != torch.bool:
            raise EmbedsError(f"AttributeEmbeds.valid is {list(self.valid.shape)} {self.valid.dtype}, "
                              f"expected [{n}, {slots}] torch.bool.")
        if tuple(self.uncond.shape) != (1, CLIP_TOKENS, CLIP_WIDTH):
            raise EmbedsError(f"AttributeEmbeds.uncond has shape {list(self.uncond.shape)}, "
                              f"expected [1, {CLIP_TOKENS}, {CLIP_WIDTH}].")
        if self.sources and len(self.sources) != n:
            raise EmbedsError(f"AttributeEmbeds has {n} photos but {len(self.sources)} source names.")

    @property
    def num_photos(self) -> int:
        return int(self.features.shape[0])

    def present(self, row: int = 0) -> list[str]:
        return [name for name, ok in zip(self.names, self.valid[row].tolist()) if ok]

    @property
    def usable_rows(self) -> torch.Tensor:
        """[N] bool: photos showing at least one extrinsic attribute (see :func:`has_extrinsic`)."""
        extrinsic = torch.tensor([name in EXTRINSIC_LABELS for name in self.names], device=self.valid.device)
        return (self.valid & extrinsic).any(dim=1)

    def skip_message(self) -> str | None:
        """Why the attribute branch cannot use these embeds, or None when it can."""
        return None if bool(self.usable_rows.any()) else NO_ATTRIBUTES_MESSAGE

    def to(self, device=None, dtype: torch.dtype | None = None) -> AttributeEmbeds:
        return AttributeEmbeds(self.features.to(device=device, dtype=dtype), self.valid.to(device=device),
                               self.uncond.to(device=device, dtype=dtype), list(self.sources), self.names)


def encode_attributes(image: Image.Image, label_map, encoder: VisionEncoder, *, mode: str = "crop",
                      min_fraction: float = MIN_AREA_FRACTION, source: str = "") -> AttributeEmbeds | None:
    """Parse masks -> attribute pictures -> CLIP features; None (and a logged warning) without attributes.

    ``encoder`` maps normalised pixels [K, 3, 224, 224] to ViT-H penultimate states [K, 257, 1280].
    """
    regions = attribute_regions(label_map, min_fraction)
    if not has_extrinsic(regions):
        logger.warning("%s%s", f"{source}: " if source else "", NO_ATTRIBUTES_MESSAGE)
        return None
    pictures = attribute_images(image, regions, mode)
    pixels = torch.cat([torch.stack([clip_pixel_values(p) for p in pictures]), zero_pixel_values(1)])
    encoded = encode_pixels(encoder, pixels, source="the CLIP vision model (attribute photo)")
    features = torch.zeros(1, len(ATTRIBUTE_NAMES), CLIP_TOKENS, CLIP_WIDTH)
    valid = torch.zeros(1, len(ATTRIBUTE_NAMES), dtype=torch.bool)
    for picture_index, name in enumerate(regions):
        slot = ATTRIBUTE_NAMES.index(name)
        features[0, slot] = encoded[picture_index]
        valid[0, slot] = True
    logger.info("attribute photo %s: %s", source or "<image>", ", ".join(regions))
    return AttributeEmbeds(features, valid, encoded[-1:].clone(), [source] if source else [])


def encode_attribute_photos(photos, face_parser, encoder: VisionEncoder, arch: str, *, mode: str = "crop",
                            progress: Progress | None = None) -> AttributeEmbeds | None:
    """Attribute features of every photo (uint8 arrays or PIL images), parsed at the official size of
    ``arch``, in one :class:`AttributeEmbeds`; photos showing no attribute are left out (logged), and
    None comes back when none shows one."""
    rows = []
    for index, photo in each_with_progress(photos, progress):
        picture = Image.fromarray(to_rgb_uint8(photo))
        labels = parse_image(face_parser, picture, PARSE_SIZE[arch])
        encoded = encode_attributes(picture, labels, encoder, mode=mode, source=f"attribute image {index}")
        if encoded is not None:
            rows.append(encoded)
    if not rows:
        return None
    return AttributeEmbeds(torch.cat([r.features for r in rows]), torch.cat([r.valid for r in rows]), rows[0].uncond,
                           [s for r in rows for s in r.sources])
