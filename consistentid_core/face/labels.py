"""The 19 labels of the face parser and what ConsistentID calls them, and how a label map is drawn.

Label ids are the CelebAMask-HQ order used by the 19-class BiSeNet (``79999_iter.pth``).
"""

from __future__ import annotations

import cv2
import numpy as np

from ..errors import InputImageError

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



def region_group(name: str) -> str:
    """The pair-merged group of an official region name: ``region_group("Left_Eye") == "eye"``."""
    try:
        return REGION_GROUPS[name]
    except KeyError:
        raise KeyError(
            f"{name!r} is not a ConsistentID facial region; known regions: {', '.join(REGION_GROUPS)}"
        ) from None


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


# --- pictures of a label map ------------------------------------------------------------------

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
