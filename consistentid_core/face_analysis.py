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
* **Model folder checks** that name every searched folder, the files found there and the usual
  mistakes (a folder nested one level too deep, a zip that was never extracted, a missing
  ``models`` level), instead of insightface's bare ``assert 'detection' in self.models``.
* **No downloads.**  insightface 2.1 uses ``name`` as the model folder as is when it is an
  existing directory, and otherwise calls its downloader.  :func:`load_face_analysis` only ever
  passes an absolute path to a directory it has checked.
* **Provider choice** (auto/CPU/CUDA/ROCm/CoreML/DirectML) that falls back to CPU with a
  warning instead of failing, and logs what it chose.

Nothing here imports ComfyUI; insightface and onnxruntime are imported lazily.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np

from .errors import FaceNotFoundError, InputImageError, MissingDependencyError, ModelFileError

logger = logging.getLogger("consistentid")

ARCHS = ("sd15", "sdxl")
ID_DIM = 512

OFFICIAL_DET_SIZE = {"sd15": 640, "sdxl": 512}
MIN_FALLBACK_DET_SIZE = 320
DET_SIZE_STEP = 64
DET_SIZE_MULTIPLE = 32  # SCRFD's coarsest stride: the detector input must be a multiple of it
MIN_DET_SIZE = 64
MAX_DET_SIZE = 2048

COLOR_ORDERS = ("official", "rgb", "bgr")
OFFICIAL_COLOR_ORDER = {"sd15": "rgb", "sdxl": "bgr"}

FACE_SELECT_MODES = ("first", "largest", "highest_score")
FACE_SELECT_HELP = "first, largest, highest_score or index:N (N counted from 0 in detector order)"

MIN_IMAGE_SIDE = 64
MAX_IMAGE_SIDE = 4096

DEFAULT_MODEL_NAME = "buffalo_l"
# Files a model pack must have for detection and recognition (the only tasks used here).
REQUIRED_MODEL_FILES = {
    "buffalo_l": {"detection": "det_10g.onnx", "recognition": "w600k_r50.onnx"},
    "antelopev2": {"detection": "scrfd_10g_bnkps.onnx", "recognition": "glintr100.onnx"},
}
OPTIONAL_MODEL_FILES = {
    "buffalo_l": ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx"),
    "antelopev2": ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx"),
}
ALLOWED_MODULES = ("detection", "recognition")

PROVIDER_CHOICES = ("auto", "CPU", "CUDA", "ROCm", "CoreML", "DirectML")
_PROVIDER_NAMES = {
    "CPU": "CPUExecutionProvider",
    "CUDA": "CUDAExecutionProvider",
    "ROCm": "ROCMExecutionProvider",
    "CoreML": "CoreMLExecutionProvider",
    "DirectML": "DmlExecutionProvider",
}
_AUTO_PREFERENCE = ("CUDA", "ROCm", "CoreML", "DirectML")
_CPU = "CPUExecutionProvider"

_INSTALL_HINT = "pip install insightface onnxruntime (or onnxruntime-gpu for CUDA)"


class FaceOptionError(InputImageError, ValueError):
    """An option of the face step (face_select, colour order, det_size, provider, arch) is invalid."""


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


def official_det_size(arch: str) -> int:
    return OFFICIAL_DET_SIZE[_check_arch(arch)]


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


def resolve_color_order(color_order: str, arch: str) -> str:
    """``official`` -> ``rgb`` for sd15 (the upstream quirk), ``bgr`` for sdxl; others as given."""
    order = str(color_order).strip().lower()
    if order not in COLOR_ORDERS:
        raise FaceOptionError(f"color_order {color_order!r} is not one of {', '.join(COLOR_ORDERS)}")
    if order == "official":
        return OFFICIAL_COLOR_ORDER[_check_arch(arch)]
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
    arch: str = "sd15",
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
    arch: str,
    *,
    det_size: int | None = None,
    color_order: str = "official",
    face_select: str | FaceSelection = "first",
    fallback: bool = True,
    source: str = "reference image",
) -> FaceIDResult:
    """Detect, select and embed one face; raise FaceNotFoundError (with what was tried) if none.

    What to do when no face is found (zeros as upstream, skip, or stop) is the caller's choice.
    """
    selection = parse_face_select(face_select)
    order = resolve_color_order(color_order, arch)
    faces, used = detect_faces(analysis, image, det_size, color_order, arch, fallback)
    if not faces:
        first = official_det_size(arch) if det_size is None else det_size
        tried = detection_sizes(first) if fallback else [first]
        raise FaceNotFoundError(
            f"no face found in the {source} (detection sizes tried: {', '.join(str(s) for s in tried)}; "
            f"colour order {order}). Use a clearer, frontal, well-lit face that fills a good part of the image"
        )
    try:
        index, face = select_face(faces, selection)
    except FaceNotFoundError as exc:
        raise FaceNotFoundError(f"{source}: {exc}") from None
    return FaceIDResult(face=face, index=index, faces=faces, det_size=int(used), color_order=order)


# --------------------------------------------------------------------------------------------
# Model folders
# --------------------------------------------------------------------------------------------


def _listing(path: str, limit: int = 20) -> str:
    try:
        entries = sorted(os.listdir(path))
    except OSError:
        return "(cannot be read)"
    if not entries:
        return "(empty)"
    shown = [e + ("/" if os.path.isdir(os.path.join(path, e)) else "") for e in entries[:limit]]
    more = f", ... ({len(entries) - limit} more)" if len(entries) > limit else ""
    return ", ".join(shown) + more


def _onnx_files(path: str) -> list[str]:
    try:
        return sorted(e for e in os.listdir(path) if e.lower().endswith(".onnx") and os.path.isfile(os.path.join(path, e)))
    except OSError:
        return []


def _missing_required(folder: str, name: str) -> list[str]:
    """Required files absent or empty in ``folder``; for unknown packs, 'any .onnx' if none."""
    required = REQUIRED_MODEL_FILES.get(name)
    if required is None:
        return [] if _onnx_files(folder) else ["*.onnx"]
    missing = []
    for filename in required.values():
        path = os.path.join(folder, filename)
        if not os.path.isfile(path):
            missing.append(filename)
        elif os.path.getsize(path) == 0:
            missing.append(f"{filename} (0 bytes: an interrupted download?)")
    return missing


def _diagnose_root(root: str, name: str) -> tuple[list[str], list[str]]:
    """Return (lines describing what is there, hints about what is wrong) for one root."""
    expected = os.path.join(root, "models", name)
    seen: list[str] = []
    hints: list[str] = []
    if not os.path.isdir(root):
        seen.append(f"{root}: does not exist")
        return seen, hints
    models = os.path.join(root, "models")
    if not os.path.isdir(models):
        seen.append(f"{models}: does not exist; {root} contains: {_listing(root)}")
    elif not os.path.isdir(expected):
        seen.append(f"{expected}: does not exist; {models} contains: {_listing(models)}")
    else:
        seen.append(f"{expected}: contains: {_listing(expected)}")
        if not _onnx_files(expected):
            for sub in sorted(os.listdir(expected)):
                inner = os.path.join(expected, sub)
                if os.path.isdir(inner) and _onnx_files(inner):
                    hints.append(
                        f"the .onnx files are one folder too deep, in {inner}: move the .onnx files "
                        f"up one folder, into {expected}"
                    )
        else:
            missing = _missing_required(expected, name)
            if missing:
                optional = OPTIONAL_MODEL_FILES.get(name, ())
                hints.append(
                    f"{expected} is missing {', '.join(missing)} (needed for detection and recognition"
                    + (f"; {', '.join(optional)} are optional" if optional else "")
                    + f"); re-download or re-extract {name}"
                )
    for zip_path in (
        os.path.join(models, f"{name}.zip"),
        os.path.join(expected, f"{name}.zip"),
        os.path.join(root, f"{name}.zip"),
    ):
        if os.path.isfile(zip_path):
            hints.append(
                f"{zip_path} was not extracted: extract it so that the .onnx files end up directly "
                f"in {expected}"
            )
    direct = os.path.join(root, name)
    if os.path.isdir(direct) and (_onnx_files(direct) or any(
        _onnx_files(os.path.join(direct, s)) for s in os.listdir(direct) if os.path.isdir(os.path.join(direct, s))
    )):
        seen.append(f"{direct}: contains: {_listing(direct)}")
        hints.append(
            f"the files are in {direct}, without the 'models' level insightface expects: move that "
            f"folder to {expected}"
        )
    if os.path.isdir(models) and _onnx_files(models):
        hints.append(
            f".onnx files lie directly in {models}: put them in a folder named {name} inside it "
            f"({expected})"
        )
    return seen, hints


def find_insightface_model_dir(roots: Sequence[str], name: str = DEFAULT_MODEL_NAME) -> str:
    """Return the absolute path of ``<root>/models/<name>`` for the first root that has it complete.

    Each root is an "insightface" folder (ComfyUI: ``models/insightface``).  Raise
    ModelFileError listing every folder searched, the files found and the likely mistake.
    """
    if not name or os.sep in name or (os.altsep and os.altsep in name) or name in (".", ".."):
        raise FaceOptionError(f"insightface model name {name!r} must be a plain folder name such as buffalo_l")
    roots = [os.path.abspath(os.path.expanduser(str(r))) for r in roots]
    if not roots:
        raise ModelFileError(
            f"no insightface model folder is configured; put {name} in <ComfyUI>/models/insightface/models/{name}/"
        )
    for root in roots:
        candidate = os.path.join(root, "models", name)
        if os.path.isdir(candidate) and _onnx_files(candidate) and not _missing_required(candidate, name):
            logger.debug("insightface model folder: %s", candidate)
            return candidate
    seen: list[str] = []
    hints: list[str] = []
    for root in roots:
        s, h = _diagnose_root(root, name)
        seen += s
        hints += h
    required = REQUIRED_MODEL_FILES.get(name)
    need = f" ({' and '.join(required.values())} are required)" if required else ""
    lines = [
        f"insightface model '{name}' not found or incomplete. Expected its .onnx files directly in "
        f"<insightface folder>/models/{name}/{need}, e.g. {os.path.join(roots[0], 'models', name)}.",
        "Searched:",
        *(f"  - {line}" for line in seen),
    ]
    if hints:
        lines.append("Likely problem:")
        lines += [f"  - {hint}" for hint in dict.fromkeys(hints)]
    raise ModelFileError("\n".join(lines))


# --------------------------------------------------------------------------------------------
# onnxruntime providers
# --------------------------------------------------------------------------------------------


def _available_providers() -> list[str]:
    try:
        import onnxruntime
    except Exception as exc:  # ImportError, or a broken binary build
        raise MissingDependencyError(f"onnxruntime is not usable ({exc}); {_INSTALL_HINT}") from exc
    return list(onnxruntime.get_available_providers())


def resolve_providers(choice: str = "auto") -> list[str]:
    """Map a provider choice to an onnxruntime provider list (always ending with CPU).

    ``auto`` takes the first available of CUDA, ROCm, CoreML, DirectML, else CPU.  A named
    provider that this onnxruntime build does not offer falls back to CPU with a warning.
    """
    lookup = {c.lower(): c for c in PROVIDER_CHOICES}
    key = lookup.get(str(choice).strip().lower())
    if key is None:
        raise FaceOptionError(f"provider {choice!r} is not one of {', '.join(PROVIDER_CHOICES)}")
    available = _available_providers()
    if key == "auto":
        chosen = next((c for c in _AUTO_PREFERENCE if _PROVIDER_NAMES[c] in available), "CPU")
    elif key != "CPU" and _PROVIDER_NAMES[key] not in available:
        logger.warning(
            "insightface provider %s was requested but this onnxruntime does not offer %s "
            "(available: %s); falling back to CPU. For CUDA install onnxruntime-gpu matching your CUDA version.",
            key, _PROVIDER_NAMES[key], ", ".join(available) or "none",
        )
        chosen = "CPU"
    else:
        chosen = key
    providers = [_PROVIDER_NAMES[chosen]]
    if chosen != "CPU":
        providers.append(_CPU)
    logger.info("insightface providers (%s requested): %s", key, ", ".join(providers))
    return providers


# --------------------------------------------------------------------------------------------
# Loading insightface
# --------------------------------------------------------------------------------------------


def _import_face_analysis_class():
    try:
        from insightface.app import FaceAnalysis
    except Exception as exc:  # ImportError, or e.g. a numpy ABI error from an old compiled build
        raise MissingDependencyError(
            f"insightface could not be imported ({type(exc).__name__}: {exc}); {_INSTALL_HINT}"
        ) from exc
    return FaceAnalysis


def load_face_analysis(model_dir: str, providers: Sequence[str]) -> Any:
    """Build ``insightface.app.FaceAnalysis`` on an existing model folder, never downloading.

    ``model_dir`` is the folder holding the .onnx files (see :func:`find_insightface_model_dir`).
    Only the detection and recognition models are loaded.
    """
    face_analysis_cls = _import_face_analysis_class()
    folder = os.path.abspath(os.path.expanduser(str(model_dir)))
    if not os.path.isdir(folder):
        # insightface would treat a missing folder as a model *name* and try to download it.
        raise ModelFileError(f"insightface model folder {folder} does not exist")
    if not _onnx_files(folder):
        raise ModelFileError(f"insightface model folder {folder} holds no .onnx files; it contains: {_listing(folder)}")
    providers = list(providers) or [_CPU]
    try:
        analysis = face_analysis_cls(
            name=folder,
            root=os.path.dirname(folder),
            providers=providers,
            allowed_modules=list(ALLOWED_MODULES),
        )
    except AssertionError as exc:
        raise ModelFileError(
            f"insightface found no face detection model in {folder} (files: {_listing(folder)}). "
            f"buffalo_l needs det_10g.onnx; re-download or re-extract the model pack"
        ) from exc
    except Exception as exc:
        raise ModelFileError(
            f"insightface could not load the models in {folder} ({type(exc).__name__}: {exc}). "
            f"A truncated or corrupt .onnx file is the usual cause: re-download the model pack"
        ) from exc
    models = getattr(analysis, "models", {})
    if "recognition" not in models:
        raise ModelFileError(
            f"insightface found no recognition (ArcFace) model in {folder} (files: {_listing(folder)}). "
            f"buffalo_l needs w600k_r50.onnx"
        )
    _log_applied_providers(analysis, folder, providers)
    return analysis


def _log_applied_providers(analysis: Any, folder: str, requested: list[str]) -> None:
    det = getattr(analysis, "det_model", None)
    session = getattr(det, "session", None)
    applied: list[str] = []
    if session is not None and hasattr(session, "get_providers"):
        try:
            applied = list(session.get_providers())
        except Exception:  # informational only
            applied = []
    logger.info("insightface models loaded from %s; providers in use: %s", folder, ", ".join(applied or requested))
    if applied and requested and requested[0] != _CPU and requested[0] not in applied:
        logger.warning(
            "insightface asked for %s but onnxruntime runs on %s (driver or CUDA/cuDNN libraries missing?)",
            requested[0], ", ".join(applied),
        )


_CACHE: dict[tuple[str, tuple[str, ...]], Any] = {}
_CACHE_LOCK = threading.Lock()


def get_face_analysis(model_dir: str, providers: Sequence[str] | str = "auto") -> Any:
    """Cached :func:`load_face_analysis`, keyed by (real folder path, provider tuple).

    ``providers`` is a provider list or a choice for :func:`resolve_providers`.
    """
    provider_list = resolve_providers(providers) if isinstance(providers, str) else list(providers)
    key = (os.path.realpath(os.path.abspath(os.path.expanduser(str(model_dir)))), tuple(provider_list))
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
        if cached is not None:
            return cached
        analysis = load_face_analysis(key[0], provider_list)
        _CACHE[key] = analysis
        return analysis


def clear_face_analysis_cache() -> None:
    """Drop every cached FaceAnalysis (frees their onnxruntime sessions)."""
    with _CACHE_LOCK:
        _CACHE.clear()
