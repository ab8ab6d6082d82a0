"""Pictures for people: which face was used, and which regions were cut out of it."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from .pipeline import ReferenceAnalysis
from .labels import overlay
from .parsing import region_images

CHOSEN = (40, 220, 60)
OTHER = (220, 50, 50)


def _draw_faces(image: np.ndarray, ref: ReferenceAnalysis) -> np.ndarray:
    out = image.copy()
    thickness = max(2, round(max(out.shape[:2]) / 160))
    for i, face in enumerate(ref.faces):
        x1, y1, x2, y2 = (int(round(v)) for v in face.bbox)
        colour = CHOSEN if i == ref.face_index else OTHER
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, thickness)
        cv2.putText(out, str(i), (x1, max(0, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX, thickness / 3, colour, thickness)
    return out


def reference_preview(ref: ReferenceAnalysis, height: int = 384) -> np.ndarray:
    """[photo with face boxes (chosen one green) | parse overlay | region images], one row, uint8 RGB."""
    tiles = [_draw_faces(ref.image, ref), overlay(ref.image, ref.label_map)]
    tiles += [np.asarray(img) for img in region_images(Image.fromarray(ref.image), ref.regions)]
    scaled = []
    for tile in tiles:
        h, w = tile.shape[:2]
        scaled.append(cv2.resize(tile, (max(1, round(w * height / h)), height), interpolation=cv2.INTER_AREA))
    return np.concatenate(scaled, axis=1)


def stack_previews(previews: list[np.ndarray]) -> np.ndarray:
    """Rows of different widths padded with black into one image."""
    width = max(p.shape[1] for p in previews)
    rows = [np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0))) for p in previews]
    return np.concatenate(rows, axis=0)
