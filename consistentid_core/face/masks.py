"""The face region of a target photo as an inpainting mask: found, grown and feathered.

What the words mean (the node's help page and the README say the same):

* **support** — the pixels the mask may touch.  Outside the support the mask is exactly ``0.0``, so a
  composite with it leaves those pixels of the target bit for bit as they were.
* **box** route — insightface's box of the chosen face, ``x1, y1, x2, y2``, rounded outward to whole
  pixels (``floor(x1)`` … ``ceil(x2)``), then **grown** by ``grow`` px on every side: the support is
  the rectangle of columns ``floor(x1) - grow`` … ``ceil(x2) + grow - 1`` and rows likewise, clipped to
  the image.
* **parser** route — the face pixels of a BiSeNet parse (skin, brows, eyes, eyeglasses, ears, nose,
  mouth, lips; holes filled) that are connected to the chosen face's box, then **grown**: every pixel
  whose centre lies within ``grow`` px (Euclidean) of such a face pixel joins the support.  The parse
  runs on a square crop around the box (the box plus half its size on each side), so a small face in
  a large photo is parsed at the parser's full resolution.
* **feather** — the soft edge, *inside* the support: a pixel of the support at distance ``d`` px
  (Euclidean, centre to centre) from the nearest pixel outside it gets ``min(1, d / (feather + 1))``.
  ``d >= 1`` in the support, so every pixel of it is above 0; along a straight edge the outer
  ``feather`` px ramp through ``1/(feather+1) … feather/(feather+1)`` and the rest is 1, i.e. the
  full-strength part of the box route is the box grown by ``grow - feather`` px.  ``feather = 0``
  gives a hard 0/1 mask.  The image border is not an edge: a face cut by the border stays at full
  strength there.  Feathering never widens the support.

Nothing here imports ComfyUI.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from ..errors import FaceNotFoundError, FaceOptionError, InputImageError
from .analysis import analyze_face, to_rgb_uint8
from .labels import (
    LABEL_EYEGLASSES, LABEL_LEFT_BROW, LABEL_LEFT_EAR, LABEL_LEFT_EYE, LABEL_LOWER_LIP, LABEL_MOUTH, LABEL_NOSE,
    LABEL_RIGHT_BROW, LABEL_RIGHT_EAR, LABEL_RIGHT_EYE, LABEL_SKIN, LABEL_UPPER_LIP, _check_label_map,
)

logger = logging.getLogger("consistentid")

MASK_SOURCES = ("box", "parser")
DEFAULT_GROW = 24
DEFAULT_FEATHER = 16
MAX_GROW = 1024
MAX_FEATHER = 512
# The parser's labels that make up "the face" of the parser route (hair, neck, hat, cloth, jewellery left out).
FACE_LABELS: tuple[int, ...] = (
    LABEL_SKIN, LABEL_LEFT_BROW, LABEL_RIGHT_BROW, LABEL_LEFT_EYE, LABEL_RIGHT_EYE, LABEL_EYEGLASSES,
    LABEL_LEFT_EAR, LABEL_RIGHT_EAR, LABEL_NOSE, LABEL_MOUTH, LABEL_UPPER_LIP, LABEL_LOWER_LIP,
)
PARSE_CONTEXT = 0.5  # the parse crop: the box plus this fraction of its longer side on each side
LATENT_MULTIPLE = 8  # SD's VAE works on sides divisible by 8
PREVIEW_TINT = (255, 0, 0)
PREVIEW_ALPHA = 0.5
PREVIEW_BOX_COLOUR = (0, 255, 0)


# --- options ------------------------------------------------------------------------------------

def _whole_pixels(name: str, value: Any, largest: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float, np.floating)):
        raise FaceOptionError(f"{name} must be a whole number of pixels (0..{largest}), got {value!r}")
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value) or value != int(value):
            raise FaceOptionError(f"{name} must be a whole number of pixels (0..{largest}), got {value!r}")
    value = int(value)
    if not 0 <= value <= largest:
        raise FaceOptionError(f"{name} {value} px is out of range: use 0..{largest} px")
    return value


def check_grow_feather(grow: Any, feather: Any) -> tuple[int, int]:
    """``(grow, feather)`` as ints; FaceOptionError for negative, fractional, NaN or too large values."""
    return _whole_pixels("grow", grow, MAX_GROW), _whole_pixels("feather", feather, MAX_FEATHER)


def check_source(source: Any) -> str:
    if source not in MASK_SOURCES:
        raise FaceOptionError(f"source {source!r} is not one of {', '.join(MASK_SOURCES)}")
    return source


# --- supports -----------------------------------------------------------------------------------

def pixel_box(box: Any, height: int, width: int) -> tuple[int, int, int, int]:
    """A float box ``x1, y1, x2, y2`` rounded outward to whole pixels and clipped to the image
    (``x2``/``y2`` exclusive)."""
    x1, y1, x2, y2 = (float(v) for v in np.asarray(box, dtype=np.float64).reshape(4))
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise InputImageError(f"the face box {x1, y1, x2, y2} is not finite")
    left, top = max(0, math.floor(x1)), max(0, math.floor(y1))
    right, bottom = min(width, math.ceil(x2)), min(height, math.ceil(y2))
    return left, top, max(left, right), max(top, bottom)


def box_support(height: int, width: int, box: Any, grow: int) -> np.ndarray:
    """The box route's support: the box rounded outward, grown by ``grow`` px on each side, clipped."""
    left, top, right, bottom = pixel_box(box, height, width)
    support = np.zeros((height, width), dtype=bool)
    if right > left and bottom > top:
        support[max(0, top - grow):min(height, bottom + grow), max(0, left - grow):min(width, right + grow)] = True
    return support


def grow_region(region: np.ndarray, grow: int) -> np.ndarray:
    """``region`` plus every pixel whose centre is within ``grow`` px (Euclidean) of one of its pixels."""
    region = np.asarray(region, dtype=bool)
    if grow == 0 or not region.any():
        return region.copy()
    outside = np.ascontiguousarray((~region).astype(np.uint8))
    distance = cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)  # to the nearest region pixel
    return region | (distance <= grow + 1e-3)


def feather_support(support: np.ndarray, feather: int) -> np.ndarray:
    """float32 mask: ``min(1, d / (feather + 1))`` inside ``support`` (``d`` the distance to the nearest
    pixel outside it, at least 1), exactly 0 outside; a hard 0/1 mask for ``feather`` 0."""
    support = np.asarray(support, dtype=bool)
    if feather == 0 or support.all() or not support.any():
        return support.astype(np.float32)
    distance = cv2.distanceTransform(np.ascontiguousarray(support.astype(np.uint8)), cv2.DIST_L2,
                                     cv2.DIST_MASK_PRECISE)
    mask = np.minimum(distance / np.float32(feather + 1), np.float32(1.0)).astype(np.float32)
    mask[~support] = 0.0  # distance is 0 there already; this makes "exactly 0 outside" independent of cv2
    return mask


def box_mask(height: int, width: int, box: Any, grow: int, feather: int) -> np.ndarray:
    """[height, width] float32 mask of the box route (see the module docstring)."""
    grow, feather = check_grow_feather(grow, feather)
    return feather_support(box_support(height, width, box, grow), feather)


def _fill_holes(binary: np.ndarray) -> np.ndarray:
    contours, _ = cv2.findContours(binary.astype(np.uint8) * 255, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    filled = np.zeros(binary.shape, dtype=np.uint8)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled.astype(bool) | binary


def face_region(label_map: np.ndarray, box: Any, source: str = "the target image") -> np.ndarray:
    """Bool [H, W]: the :data:`FACE_LABELS` pixels of ``label_map`` (holes filled) in the connected
    pieces that reach into ``box``; FaceNotFoundError naming ``source`` when there are none."""
    labels = _check_label_map(label_map)
    height, width = labels.shape
    face = _fill_holes(np.isin(labels, FACE_LABELS))
    count, pieces = cv2.connectedComponents(face.astype(np.uint8), connectivity=8)
    left, top, right, bottom = pixel_box(box, height, width)
    touching = np.unique(pieces[top:bottom, left:right])
    touching = touching[touching != 0]
    if count <= 1 or touching.size == 0:
        raise FaceNotFoundError(
            f"the face parser found no face pixels (skin, eyes, nose, mouth...) in the face box "
            f"{left},{top}-{right},{bottom} of {source}; use source 'box', or check the face parser file"
        )
    return np.isin(pieces, touching)


def parser_mask(label_map: np.ndarray, box: Any, grow: int, feather: int, source: str = "the target image") -> np.ndarray:
    """[H, W] float32 mask of the parser route from a label map of the photo's size (see the module docstring)."""
    grow, feather = check_grow_feather(grow, feather)
    return feather_support(grow_region(face_region(label_map, box, source), grow), feather)


def parse_crop(height: int, width: int, box: Any) -> tuple[int, int, int, int]:
    """The square around ``box`` (plus :data:`PARSE_CONTEXT` of its longer side on each side), clipped."""
    x1, y1, x2, y2 = (float(v) for v in np.asarray(box, dtype=np.float64).reshape(4))
    side = max(x2 - x1, y2 - y1) * (1.0 + 2.0 * PARSE_CONTEXT)
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    left, top = max(0, math.floor(cx - side / 2)), max(0, math.floor(cy - side / 2))
    right, bottom = min(width, math.ceil(cx + side / 2)), min(height, math.ceil(cy + side / 2))
    return left, top, max(left + 1, right), max(top + 1, bottom)


def parse_face_labels(parser: Any, image_rgb: np.ndarray, box: Any, parse_size: int) -> np.ndarray:
    """uint8 [H, W] label map of the photo: the crop around ``box`` parsed at ``parse_size`` and put back
    (nearest neighbour), background elsewhere."""
    from PIL import Image

    from .parser import parse_image

    height, width = image_rgb.shape[:2]
    left, top, right, bottom = parse_crop(height, width, box)
    crop = np.ascontiguousarray(image_rgb[top:bottom, left:right])
    labels = parse_image(parser, Image.fromarray(crop), parse_size)
    full = np.zeros((height, width), dtype=np.uint8)
    full[top:bottom, left:right] = cv2.resize(labels, (right - left, bottom - top), interpolation=cv2.INTER_NEAREST)
    return full


# --- one photo ----------------------------------------------------------------------------------

@dataclass
class FaceMask:
    """The mask of one photo and what it was made from."""

    mask: np.ndarray  # [H, W] float32 in 0..1, exactly 0 outside the support
    box: tuple[float, float, float, float]  # the chosen face's insightface box
    face_index: int  # in detector order
    faces_found: int


def face_mask(analysis: Any, image: Any, *, source: str = "box", grow: int = DEFAULT_GROW,
              feather: int = DEFAULT_FEATHER, face_select: str = "largest", parser: Any = None,
              parse_size: int = 512, image_name: str = "the target image") -> FaceMask:
    """Detect the faces of ``image`` with insightface's own defaults (640 px, BGR), pick one with
    ``face_select`` and make its mask by ``source`` (``parser`` needs ``parser``, a BiSeNet).

    FaceNotFoundError naming ``image_name`` when no face is found; FaceOptionError for bad options.
    """
    source = check_source(source)
    grow, feather = check_grow_feather(grow, feather)
    if source == "parser" and parser is None:
        raise FaceOptionError("source 'parser' needs a face parser: connect Load Face Parser (ConsistentID) to "
                              "face_parser, or use source 'box'")
    rgb = to_rgb_uint8(image)
    height, width = rgb.shape[:2]
    found = analyze_face(analysis, rgb, None, face_select=face_select, source=image_name)
    box = tuple(float(v) for v in found.face.bbox)
    if source == "box":
        mask = box_mask(height, width, box, grow, feather)
    else:
        mask = parser_mask(parse_face_labels(parser, rgb, box, parse_size), box, grow, feather, image_name)
    if not mask.any():
        raise FaceNotFoundError(f"the face box {box} of {image_name} lies outside the image")
    if height % LATENT_MULTIPLE or width % LATENT_MULTIPLE:
        logger.warning(
            "%s is %dx%d px: the VAE works on sides divisible by %d, so an inpainted face comes back from a "
            "centred crop, stretched by a few pixels (pixels outside the mask stay exact); crop or scale the "
            "photo to multiples of %d for an exact fit", image_name, width, height, LATENT_MULTIPLE, LATENT_MULTIPLE)
    logger.info("face mask of %s: face %d of %d, %s route, grow %d px, feather %d px, %d px inside",
                image_name, found.index, len(found.faces), source, grow, feather, int(np.count_nonzero(mask)))
    return FaceMask(mask=mask, box=box, face_index=found.index, faces_found=len(found.faces))


def mask_preview(image_rgb: np.ndarray, mask: np.ndarray, box: Any = None) -> np.ndarray:
    """The photo with the mask tinted red (by its value) and the face box outlined green; uint8 RGB."""
    rgb = to_rgb_uint8(image_rgb).astype(np.float32)
    alpha = (np.asarray(mask, dtype=np.float32) * PREVIEW_ALPHA)[..., None]
    tinted = rgb * (1.0 - alpha) + np.asarray(PREVIEW_TINT, dtype=np.float32) * alpha
    out = np.clip(np.rint(tinted), 0, 255).astype(np.uint8)
    if box is not None:
        left, top, right, bottom = pixel_box(box, *out.shape[:2])
        if right > left and bottom > top:
            cv2.rectangle(out, (left, top), (right - 1, bottom - 1), PREVIEW_BOX_COLOUR, 2)
    return out
