"""Face detection and the ArcFace identity embedding (insightface ``buffalo_l``).

What upstream ConsistentID does (spec section 2.2): ``FaceAnalysis(name="buffalo_l")``,
``prepare(ctx_id=0, det_size=(640, 640))`` for SD1.5 and ``(512, 512)`` for SDXL, then
``faces[0].normed_embedding`` (512 values, L2-normalised) of the first detection, in detector
(score) order.  This module reproduces that and adds what ComfyUI users need around it:

* **Colour order.**  insightface expects a BGR array (it swaps to RGB itself when it builds the
  network input).  The official SD1.5 pipeline nevertheless passes ``np.array(pil_rgb_image)``,
  i.e. RGB: a quirk, but the released SD1.5 weights saw these embeddings at inference (their
  training data used BGR).  The SDXL pipeline passes BGR.  ``color_order`` is therefore one of
  ``"official"`` (the default: ``"rgb"`` for sd15, ``"bgr"`` for sdxl, bit-compatible with the
  official pipelines), ``"rgb"`` or ``"bgr"`` (the "correct" insightface input).  The images
  handed to :func:`detect_faces` are always RGB; the option only says what insightface gets.
* **Detection-size fallback.**  When nothing is found at the official size, smaller sizes are
  tried (steps of 64 down to 320): large faces that fill the frame are often missed at 640.
* **Face selection** among several detections: ``first`` (official), ``largest``,
  ``highest_score`` or ``index:N``.
* Finding, checking and loading the model pack (never downloading) is in ``insightface_models``.

Nothing here imports ComfyUI; insightface and onnxruntime are imported lazily.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np

from ..constants import ARCHS, ID_DIM, OFFICIAL_COLOR_ORDER, OFFICIAL_DET_SIZE
from ..errors import FaceNotFoundError, FaceOptionError, InputImageError, ModelFileError

logger = logging.getLogger("consistentid")

# Where no official pipeline applies (a pose photo for the keypoints): insightface's own defaults.
INSIGHTFACE_DET_SIZE = 640
INSIGHTFACE_COLOR_ORDER = "bgr"
MIN_FALLBACK_DET_SIZE = 320
DET_SIZE_STEP = 64
DET_SIZE_MULTIPLE = 32  # SCRFD's coarsest stride: the detector input must be a multiple of it
MIN_DET_SIZE = 64
MAX_DET_SIZE = 2048

COLOR_ORDERS = ("official", "rgb", "bgr")

FACE_SELECT_MODES = ("first", "largest", "highest_score")
FACE_SELECT_HELP = "first, largest, highest_score or index:N (N counted from 0 in detector order)"

MIN_IMAGE_SIDE = 64
MAX_IMAGE_SIDE = 4096





# --------------------------------------------------------------------------------------------
# Detected faces and face selection
# --------------------------------------------------------------------------------------------


@dataclass
class DetectedFace:
    """One detection in image pixel coordinates.

    ``bbox`` float32 [4] ``x1, y1, x2, y2``; ``det_score`` the detector confidence; ``kps``
    float32 [5, 2] (eyes, nose tip, mouth corners) or None; ``normed_embedding`` float32 [512]
    (L2 norm 1) or None when no recognition model ran.
    """

    bbox: np.ndarray
    det_score: float
    kps: np.ndarray | None = None
    normed_embedding: np.ndarray | None = None

    @classmethod
    def from_insightface(cls, face: Any) -> "DetectedFace":
        bbox = np.asarray(_attr(face, "bbox"), dtype=np.float32).reshape(4)
        score = float(_attr(face, "det_score"))
        kps = _attr(face, "kps")
        if kps is not None:
            kps = np.asarray(kps, dtype=np.float32).reshape(-1, 2)
        embedding = _attr(face, "embedding")
        normed = None
        if embedding is not None:
            raw = np.asarray(embedding, dtype=np.float64).reshape(-1)
            if raw.size != ID_DIM:
                raise ModelFileError(
                    f"the insightface recognition model produced a {raw.size}-value embedding; "
                    f"ConsistentID needs the {ID_DIM}-value ArcFace embedding of buffalo_l "
                    f"(w600k_r50.onnx). Use the buffalo_l model folder."
                )
            norm = float(np.linalg.norm(raw))
            if np.isfinite(norm) and norm > 0.0:
                normed = (raw / norm).astype(np.float32)
            else:
                logger.warning("the face embedding is zero or not finite; treating it as missing")
        return cls(bbox=bbox, det_score=score, kps=kps, normed_embedding=normed)

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = (float(v) for v in self.bbox)
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)


def _attr(face: Any, name: str):
    value = getattr(face, name, None)
    if value is None and isinstance(face, dict):
        value = face.get(name)
    return value


class FaceSelection(NamedTuple):
    """A parsed ``face_select`` value: ``mode`` is first/largest/highest_score/index."""

    mode: str
    index: int | None = None

    def __str__(self) -> str:
        return f"index:{self.index}" if self.mode == "index" else self.mode


_INDEX_RE = re.compile(r"^index\s*:\s*(\S*)$")


def parse_face_select(text: str | FaceSelection) -> FaceSelection:
    """Validate a ``face_select`` value; raise :class:`FaceOptionError` with the accepted forms."""
    if isinstance(text, FaceSelection):
        return text
    if not isinstance(text, str):
        raise FaceOptionError(f"face_select must be text ({FACE_SELECT_HELP}), got {type(text).__name__}")
    value = text.strip().lower()
    if value in FACE_SELECT_MODES:
        return FaceSelection(value)
    match = _INDEX_RE.match(value)
    if match:
        number = match.group(1)
        if re.fullmatch(r"\d+", number):
            return FaceSelection("index", int(number))
        raise FaceOptionError(
            f"face_select {text!r}: after 'index:' put a face number counted from 0 "
            f"(for example index:0 or index:1), not {number!r}"
        )
    raise FaceOptionError(f"face_select {text!r} is not valid; use {FACE_SELECT_HELP}")


def select_face(faces: Sequence[DetectedFace], how: str | FaceSelection = "first") -> tuple[int, DetectedFace]:
    """Pick one face; return ``(index in detector order, face)``.

    Raises FaceNotFoundError when ``faces`` is empty or ``index:N`` is out of range.
    """
    selection = parse_face_select(how)
    count = len(faces)
    if count == 0:
        raise FaceNotFoundError("no face was detected in the reference image")
    if selection.mode == "first":
        index = 0
    elif selection.mode == "largest":
        index = max(range(count), key=lambda i: (faces[i].area, -i))
    elif selection.mode == "highest_score":
        index = max(range(count), key=lambda i: (faces[i].det_score, -i))
    else:
        index = int(selection.index)
        if index >= count:
            raise FaceNotFoundError(
                f"face_select index:{index} asks for face number {index} (counted from 0), "
                f"but only {count} face{'s' if count != 1 else ''} "
                f"{'were' if count != 1 else 'was'} found in the reference image; "
                f"use index:0 to index:{count - 1}, or 'largest'"
            )
    return index, faces[index]


# --------------------------------------------------------------------------------------------
# Options: architecture, detection size, colour order
# --------------------------------------------------------------------------------------------


def _check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise FaceOptionError(f"architecture {arch!r} is not one of {', '.join(ARCHS)}")
    return arch


def official_det_size(arch: str | None) -> int:
    """The official pipeline's detection size; insightface's default when ``arch`` is None."""
    return INSIGHTFACE_DET_SIZE if arch is None else OFFICIAL_DET_SIZE[_check_arch(arch)]


def validate_det_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise FaceOptionError(f"det_size must be a whole number of pixels, got {size!r}")
    size = int(size)
    if size % DET_SIZE_MULTIPLE or not MIN_DET_SIZE <= size <= MAX_DET_SIZE:
        raise FaceOptionError(
            f"det_size {size} is not usable: the detector needs a multiple of {DET_SIZE_MULTIPLE} "
            f"between {MIN_DET_SIZE} and {MAX_DET_SIZE} (official: 640 for SD1.5, 512 for SDXL)"
        )
    return size


def detection_sizes(first: int) -> list[int]:
    """``first``, then smaller sizes in steps of 64 down to 320 (640 -> 640..320; 512 -> 512..320)."""
    first = validate_det_size(first)
    sizes = [first]
    size = first - DET_SIZE_STEP
    while size >= MIN_FALLBACK_DET_SIZE:
        sizes.append(size)
        size -= DET_SIZE_STEP
    return sizes


def resolve_color_order(color_order: str, arch: str | None) -> str:
    """``official`` -> ``rgb`` for sd15 (the upstream quirk), ``bgr`` for sdxl and for no architecture
    (insightface's own order); others as given."""
    order = str(color_order).strip().lower()
    if order not in COLOR_ORDERS:
        raise FaceOptionError(f"color_order {color_order!r} is not one of {', '.join(COLOR_ORDERS)}")
    if order == "official":
        return INSIGHTFACE_COLOR_ORDER if arch is None else OFFICIAL_COLOR_ORDER[_check_arch(arch)]
    return order


# --------------------------------------------------------------------------------------------
# Input images
# --------------------------------------------------------------------------------------------


def to_rgb_uint8(image: Any) -> np.ndarray:
    """Normalise one image to a contiguous H x W x 3 uint8 RGB array.

    Accepts H x W, H x W x 1 (grey, repeated), H x W x 3, H x W x 4 (alpha dropped) and a
    leading batch axis of 1; uint8, uint16 (scaled by 1/257), bool, other integers in 0..255,
    and floats in 0..1 (ComfyUI's IMAGE range; floats up to 255 are read as 0..255 with a
    warning).  torch tensors are accepted too.  Sides must be 64..4096 px.
    """
    if hasattr(image, "detach") and hasattr(image, "cpu"):
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise InputImageError(
            f"reference image has shape {tuple(array.shape)}; expected one image as height x width "
            f"(grey) or height x width x 1/3/4 channels (channels last)"
        )
    height, width = int(array.shape[0]), int(array.shape[1])
    if min(height, width) < MIN_IMAGE_SIDE:
        raise InputImageError(
            f"reference image is {width}x{height} px; face detection needs at least "
            f"{MIN_IMAGE_SIDE} px on each side (upscale or use a larger crop)"
        )
    if max(height, width) > MAX_IMAGE_SIDE:
        raise InputImageError(
            f"reference image is {width}x{height} px; sides above {MAX_IMAGE_SIDE} px are refused "
            f"because detection works at 640 px or less and a larger image only costs memory "
            f"(downscale it first)"
        )
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] == 4:
        array = array[:, :, :3]
    return np.ascontiguousarray(_to_uint8(array))


def _to_uint8(array: np.ndarray) -> np.ndarray:
    dtype = array.dtype
    if dtype == np.uint8:
        return array
    if dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if dtype == np.uint16:
        return ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if np.issubdtype(dtype, np.integer):
        lo, hi = int(array.min()), int(array.max())
        if lo < 0 or hi > 255:
            raise InputImageError(
                f"reference image of type {dtype} has values {lo}..{hi}; expected 0..255"
            )
        return array.astype(np.uint8)
    if np.issubdtype(dtype, np.floating):
        values = array.astype(np.float32)
        if not np.all(np.isfinite(values)):
            raise InputImageError("reference image contains NaN or infinite values")
        lo, hi = float(values.min()), float(values.max())
        if lo < -1e-3 or hi > 255.0 + 1e-3:
            raise InputImageError(
                f"reference image of type {dtype} has values {lo:.3g}..{hi:.3g}; expected 0..1"
            )
        if hi > 1.0 + 1e-3:
            logger.warning("float reference image has values up to %.3g; reading it as 0..255, not 0..1", hi)
            scale = 1.0
        else:
            scale = 255.0
        return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    raise InputImageError(f"reference image has unsupported element type {dtype}")


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------


def detect_faces(
    analysis: Any,
    image_rgb: np.ndarray,
    det_size: int | None = None,
    color_order: str = "official",
    arch: str | None = "sd15",
    fallback: bool = True,
    *,
    det_thresh: float = 0.5,
) -> tuple[list[DetectedFace], int | None]:
    """Detect faces and compute their ID embeddings.

    ``analysis`` is an insightface ``FaceAnalysis`` (or anything with ``prepare`` and ``get``).
    ``image_rgb`` is normalised with :func:`to_rgb_uint8`.  ``det_size`` None means the
    official size of ``arch``.  For each size of :func:`detection_sizes` (only the first when
    ``fallback`` is False) this calls ``analysis.prepare(ctx_id=0, det_size=(s, s))`` and
    ``analysis.get(img)``, and stops at the first size that finds a face.

    Returns ``(faces in detector order, size that found them)``, or ``([], None)``.
    """
    if arch is not None:
        _check_arch(arch)
    image = to_rgb_uint8(image_rgb)
    order = resolve_color_order(color_order, arch)
    first = official_det_size(arch) if det_size is None else det_size
    sizes = detection_sizes(first) if fallback else [validate_det_size(first)]
    fed = image if order == "rgb" else np.ascontiguousarray(image[:, :, ::-1])
    for size in sizes:
        prepare_kwargs: dict[str, Any] = {"ctx_id": 0, "det_size": (size, size)}
        if det_thresh != 0.5:  # insightface's default; only passed when changed
            prepare_kwargs["det_thresh"] = float(det_thresh)
        analysis.prepare(**prepare_kwargs)
        raw = analysis.get(fed)
        if raw:
            faces = [DetectedFace.from_insightface(face) for face in raw]
            if size != sizes[0]:
                logger.info(
                    "no face at det_size %d; found %d at det_size %d (tried %s)",
                    sizes[0], len(faces), size, ", ".join(str(s) for s in sizes[: sizes.index(size) + 1]),
                )
            else:
                logger.debug("found %d face(s) at det_size %d", len(faces), size)
            return faces, size
    logger.info(
        "no face found at det_size %s (colour order %s)", ", ".join(str(s) for s in sizes), order
    )
    return [], None


def face_id_embedding(face: DetectedFace) -> np.ndarray:
    """The 512-value L2-normalised ArcFace embedding of ``face`` (float32)."""
    if face.normed_embedding is None:
        raise ModelFileError(
            "the detected face has no ID embedding: no insightface recognition model ran "
            "(buffalo_l needs w600k_r50.onnx next to det_10g.onnx)"
        )
    return face.normed_embedding


@dataclass
class FaceIDResult:
    """What :func:`analyze_face` found: the chosen face, its index and all detections."""

    face: DetectedFace
    index: int
    faces: list[DetectedFace]
    det_size: int
    color_order: str

    @property
    def embedding(self) -> np.ndarray:
        return face_id_embedding(self.face)


def analyze_face(
    analysis: Any,
    image: Any,
    arch: str | None,
    *,
    det_size: int | None = None,
    color_order: str = "official",
    face_select: str | FaceSelection = "first",
    fallback: bool = True,
    source: str = "the reference image",
) -> FaceIDResult:
    """Detect, select and embed one face; raise FaceNotFoundError (with what was tried) if none.

    ``arch`` None: a photo outside the official pipelines (a pose photo), detected with insightface's
    own defaults (640 px, BGR).

    What to do when no face is found (zeros as upstream, skip, or stop) is the caller's choice.
    """
    selection = parse_face_select(face_select)
    order = resolve_color_order(color_order, arch)
    faces, used = detect_faces(analysis, image, det_size, color_order, arch, fallback)
    if not faces:
        first = official_det_size(arch) if det_size is None else det_size
        tried = detection_sizes(first) if fallback else [first]
        raise FaceNotFoundError(
            f"no face found in {source} (detection sizes tried: {', '.join(str(s) for s in tried)}; "
            f"colour order {order}). Use a clearer, frontal, well-lit face that fills a good part of the image"
        )
    try:
        index, face = select_face(faces, selection)
    except FaceNotFoundError as exc:
        raise FaceNotFoundError(f"{source}: {exc}") from None
    return FaceIDResult(face=face, index=index, faces=faces, det_size=int(used), color_order=order)

# Model-pack handling lives in insightface_models; these names stay importable from here.
from .insightface_models import (  # noqa: E402,F401
    DEFAULT_MODEL_NAME,
    OPTIONAL_MODEL_FILES,
    PROVIDER_CHOICES,
    REQUIRED_MODEL_FILES,
    clear_face_analysis_cache,
    find_insightface_model_dir,
    get_face_analysis,
    load_face_analysis,
    resolve_providers,
)
