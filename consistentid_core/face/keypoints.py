"""The 5-point face keypoint picture that InstantID-style ControlNets take as their condition.

Black canvas; the two eyes, both mouth corners joined to the nose by coloured sticks (dimmed),
and a coloured dot per point: left eye red, right eye green, nose blue, mouth corners yellow and
magenta — the convention those ControlNets were trained on.
"""

from __future__ import annotations

import math

from typing import Any

import cv2
import numpy as np

from .analysis import analyze_face, to_rgb_uint8

POINT_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
STICKS = ((0, 2), (1, 2), (3, 2), (4, 2))  # every point joined to the nose
STICK_WIDTH = 4
STICK_DIMMING = 0.6
DOT_RADIUS = 10


def draw_face_keypoints(kps: np.ndarray, width: int, height: int) -> np.ndarray:
    """``kps`` [5, 2] pixel coordinates -> H x W x 3 uint8 RGB picture."""
    kps = np.asarray(kps, dtype=np.float64).reshape(5, 2)
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for a, b in STICKS:
        (xa, ya), (xb, yb) = kps[a], kps[b]
        length = math.hypot(xa - xb, ya - yb)
        angle = math.degrees(math.atan2(ya - yb, xa - xb))
        centre = (int(round((xa + xb) / 2)), int(round((ya + yb) / 2)))
        polygon = cv2.ellipse2Poly(centre, (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, POINT_COLOURS[a])
    canvas = (canvas * STICK_DIMMING).astype(np.uint8)
    for (x, y), colour in zip(kps, POINT_COLOURS):
        cv2.circle(canvas, (int(round(x)), int(round(y))), DOT_RADIUS, colour, -1)
    return canvas


def pose_keypoints(analysis: Any, image: Any, face_select: str = "largest", color_order: str = "bgr",
                   source: str = "the pose photo") -> np.ndarray:
    """The keypoint picture of one face of a pose photo, the photo's size; FaceNotFoundError naming
    ``source`` when it shows none.  A pose photo is not a reference photo: insightface runs with its
    own defaults (640 px, BGR for ``official``), whatever the base model."""
    rgb = to_rgb_uint8(image)
    found = analyze_face(analysis, rgb, None, color_order=color_order, face_select=face_select, source=source)
    return draw_face_keypoints(found.face.kps, rgb.shape[1], rgb.shape[0])
