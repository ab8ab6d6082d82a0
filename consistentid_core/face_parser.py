"""The BiSeNet face parser, built with facexlib's implementation and loaded from a local file only.

``face_parsing.pth`` (the ConsistentID mirror), ``79999_iter.pth`` (face-parsing.PyTorch) and
facexlib's ``parsing_bisenet.pth`` all have the 191-key layout of facexlib's ``BiSeNet(num_class=19)``.
The class is constructed directly: facexlib's ``init_parsing_model`` helper would download.
"""

from __future__ import annotations

import logging
import os
import threading

import torch

from .errors import MissingDependencyError, ModelFileError
from .memo import ModelCache

logger = logging.getLogger("consistentid")

PARSER_FILE_NAMES = ("face_parsing.pth", "79999_iter.pth", "parsing_bisenet.pth")
NUM_STATE_KEYS = 191

# Bounded: each entry is a network on its device; a host empties it when it frees memory (memo.release_model_caches).
_cache: dict[tuple, torch.nn.Module] = ModelCache("face parser", max_entries=2)
_lock = threading.Lock()


def build_bisenet() -> torch.nn.Module:
    try:
        from facexlib.parsing.bisenet import BiSeNet
    except ImportError as exc:
        raise MissingDependencyError(
            f"the face parser needs the facexlib package ({exc}). Install it into ComfyUI's Python with "
            "'pip install facexlib' (or 'pip install --no-deps facexlib' plus opencv-python-headless and scipy)"
        ) from exc
    return BiSeNet(num_class=19)


def _read_state(path: str) -> dict:
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"{name}: face parser file not found at {path}")
    if os.path.getsize(path) == 0:
        raise ModelFileError(f"{name}: the face parser file is empty; download it again")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file: truncated, not a checkpoint, or unsafe pickle
        raise ModelFileError(f"{name}: not a readable face parser checkpoint ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelFileError(f"{name}: not a face parser checkpoint (it holds a {type(state).__name__})")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _check_layout(name: str, state: dict, own: dict) -> None:
    keys = list(state)
    if any(k.startswith(("encoder.", "decoder.", "parsing")) for k in keys) and "cp.resnet.conv1.weight" not in state:
        raise ModelFileError(
            f"{name}: this looks like facexlib's ParseNet; ConsistentID uses the BiSeNet parser "
            f"({', '.join(PARSER_FILE_NAMES)})"
        )
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ModelFileError(
            f"{name}: not a 19-class BiSeNet face parser ({NUM_STATE_KEYS} keys expected): "
            f"missing {missing[:4]} ({len(missing)}), unexpected {unexpected[:4]} ({len(unexpected)}). "
            f"Use one of {', '.join(PARSER_FILE_NAMES)}"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ModelFileError(
                f"{name}: {key} has shape {list(value.shape)}, a 19-class BiSeNet needs {list(own[key].shape)}"
            )


def load_face_parser(path: str, device="cpu") -> torch.nn.Module:
    """A BiSeNet in eval mode, fp32 (as the official code runs it), on ``device``."""
    path = os.fspath(path)
    state = _read_state(path)
    net = build_bisenet()
    _check_layout(os.path.basename(path), state, net.state_dict())
    net.load_state_dict(state)
    net.eval().requires_grad_(False)
    return net.to(device=device, dtype=torch.float32)


def get_face_parser(path: str, device="cpu") -> torch.nn.Module:
    """Cached :func:`load_face_parser`, keyed by file, modification time and device."""
    real = os.path.realpath(path)
    key = (real, os.path.getmtime(real) if os.path.exists(real) else None, str(device))
    with _lock:
        net = _cache.get(key)
        if net is None:
            net = _cache[key] = load_face_parser(real, device)
            logger.info("loaded face parser %s on %s", os.path.basename(real), device)
        return net


def find_parser_file(folders: list[str]) -> str:
    """The first known parser file in ``folders``, or a ModelFileError listing what was searched and found."""
    seen = []
    for folder in folders:
        for name in PARSER_FILE_NAMES:
            candidate = os.path.join(folder, name)
            if os.path.isfile(candidate):
                return candidate
        if os.path.isdir(folder):
            seen.append(f"{folder}: {sorted(os.listdir(folder))[:10]}")
        else:
            seen.append(f"{folder}: (does not exist)")
    raise ModelFileError(
        f"no face parser found. Put one of {', '.join(PARSER_FILE_NAMES)} into one of these folders. "
        "Searched: " + "; ".join(seen)
    )
