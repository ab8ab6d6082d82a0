"""Finding, checking and loading insightface model packs (``models/insightface/models/<name>/``).

insightface 2.1 uses ``name`` as the model folder as is when it is an existing directory and
otherwise calls its downloader, so :func:`load_face_analysis` only ever passes an absolute path
to a directory it has checked.  Messages name every searched folder, the files found there and
the usual mistakes (a folder nested one level too deep, a zip that was never extracted, a
missing ``models`` level).  Providers: auto/CPU/CUDA/ROCm/CoreML/DirectML, falling back to the
CPU with a warning, and logged.  insightface and onnxruntime are imported lazily.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Sequence

from ..errors import FaceOptionError, MissingDependencyError, ModelFileError
from ..memo import ModelCache

logger = logging.getLogger("consistentid")

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


# Bounded: each entry holds onnxruntime sessions; a host empties it when it frees memory (memo.release_model_caches).
_CACHE: dict[tuple[str, tuple[str, ...]], Any] = ModelCache("insightface", max_entries=2)
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
