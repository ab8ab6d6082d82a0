"""Model folders of the pack, registered with ComfyUI's folder_paths.

Paths that ``extra_model_paths.yaml`` already registered under the same names are kept; the
default folder under ``models/`` is added after them.
"""

from __future__ import annotations

import os

import folder_paths

from ...consistentid_core.face.parser import PARSER_FILE_NAMES

CONSISTENTID = "consistentid"  # ConsistentID weights (and the BiSeNet face parser)
FACEXLIB = "facexlib"  # facexlib's parsing_bisenet.pth
INSIGHTFACE = "insightface"  # insightface model packs: models/insightface/models/<name>/*.onnx

_WEIGHT_EXTENSIONS = {".bin", ".safetensors", ".pth", ".pt", ".sft"}


def _register(name: str, extensions: set[str] | None) -> None:
    default = os.path.join(folder_paths.models_dir, name)
    paths = list(folder_paths.folder_names_and_paths.get(name, ([], set()))[0])
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[name] = (paths, extensions if extensions is not None else set())


def register_model_folders() -> None:
    _register(CONSISTENTID, set(_WEIGHT_EXTENSIONS))
    _register(FACEXLIB, set(_WEIGHT_EXTENSIONS))
    _register(INSIGHTFACE, set())


def is_parser_file(filename: str) -> bool:
    base = os.path.basename(filename).lower()
    return base in PARSER_FILE_NAMES or "pars" in base or "bisenet" in base


def weight_files(name: str) -> list[str]:
    """Weight files of a folder, without the face parser that shares models/consistentid."""
    return [f for f in folder_paths.get_filename_list(name) if not is_parser_file(f)]


def parser_files() -> list[str]:
    """Face-parser files from models/consistentid and models/facexlib, as "<folder>/<file>" choices."""
    choices = []
    for folder in (CONSISTENTID, FACEXLIB):
        for filename in folder_paths.get_filename_list(folder):
            if is_parser_file(filename):
                choices.append(f"{folder}/{filename}")
    return choices


def resolve_parser_choice(choice: str) -> str:
    folder, _, filename = choice.partition("/")
    if folder not in (CONSISTENTID, FACEXLIB) or not filename:
        raise ValueError(f"face parser choice {choice!r} is not of the form 'consistentid/<file>' or 'facexlib/<file>'")
    return folder_paths.get_full_path_or_raise(folder, filename)


def insightface_roots() -> list[str]:
    return folder_paths.get_folder_paths(INSIGHTFACE)


# --- the unified loader: every model file by name, in every folder ComfyUI knows --------------------

CLIP_VISION = "clip_vision"  # ComfyUI's own folder for image encoders
UNIFIED_FOLDERS = (CONSISTENTID, CLIP_VISION, INSIGHTFACE, FACEXLIB)


def model_file_listings() -> dict[str, list[str]]:
    """Folder kind -> every file under each folder registered for it (sub-folders and
    extra_model_paths.yaml included), relative to that folder, as ComfyUI lists them for its combos."""
    return {kind: list(folder_paths.get_filename_list(kind)) for kind in UNIFIED_FOLDERS}


def clip_vision_files() -> list[str]:
    return list(folder_paths.get_filename_list(CLIP_VISION))


def model_file_folders() -> dict[str, list[str]]:
    """Folder kind -> the folders registered for it (where a missing file may go: the first)."""
    return {kind: list(folder_paths.get_folder_paths(kind)) for kind in UNIFIED_FOLDERS}


def full_path(kind: str, name: str) -> str:
    """The file ``name`` (relative, as listed) of a folder kind, resolved the way ComfyUI's loaders do."""
    return folder_paths.get_full_path_or_raise(kind, name.replace("/", os.sep))


def parser_device(choice: str):
    """The device a face parser loads on: ``auto`` = ComfyUI's compute device, else ``cpu``."""
    import comfy.model_management

    return comfy.model_management.get_torch_device() if choice == "auto" else "cpu"
