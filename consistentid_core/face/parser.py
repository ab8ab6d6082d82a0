"""The BiSeNet face parser, built with facexlib's implementation and loaded from a local file only,
and :func:`parse_image`, which runs it the official way.

``face_parsing.pth`` (the ConsistentID mirror), ``79999_iter.pth`` (face-parsing.PyTorch) and
facexlib's ``parsing_bisenet.pth`` all have the 191-key layout of facexlib's ``BiSeNet(num_class=19)``.
The class is constructed directly: facexlib's ``init_parsing_model`` helper would download.
"""

from __future__ import annotations

import logging
import os
import threading

import numpy as np
import torch
from PIL import Image

from ..errors import InputImageError, MissingDependencyError, ModelFileError
from ..memo import ModelCache
from .labels import NUM_LABELS

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


# --- running it ---------------------------------------------------------------------------------

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def _module_device_dtype(net: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in net.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def parse_image(net: torch.nn.Module, image: Image.Image, size: int) -> np.ndarray:
    """Run a 19-class BiSeNet on the whole image squashed to ``size`` x ``size``.

    Exactly the official preprocessing: PIL bilinear resize of the full frame (aspect ratio is
    ignored, there is no face crop), scale to 0..1, ImageNet normalisation, first network output,
    argmax over classes.  The input follows the device and dtype of the net's first parameter;
    the official parser runs in fp32, and fp16 can flip near-tied pixels.  The net should be in
    eval mode (BatchNorm); that is left to whoever loaded it.
    """
    if size <= 0:
        raise ValueError(f"Parse size must be positive, got {size}.")
    if not isinstance(image, Image.Image) or image.width == 0 or image.height == 0:
        raise InputImageError(f"the face parser needs a non-empty PIL image, got {image!r:.80}")
    image = image if image.mode == "RGB" else image.convert("RGB")
    resized = image.resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    x = ((x - mean) / std).unsqueeze(0)
    device, dtype = _module_device_dtype(net)
    if net.training:
        logger.warning("The face parser is in training mode; its BatchNorm layers will misbehave.")
    with torch.no_grad():
        out = net(x.to(device=device, dtype=dtype))
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[0] != 1 \
                or out.shape[1] != NUM_LABELS or tuple(out.shape[2:]) != (size, size):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelFileError(
                f"The face parser returned {shape}, expected (1, {NUM_LABELS}, {size}, {size}). "
                "Use the 19-class BiSeNet face_parsing.pth (79999_iter.pth)."
            )
        labels = out[0].argmax(dim=0)
    return labels.to(torch.uint8).cpu().numpy()
