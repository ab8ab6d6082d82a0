"""Model folders of the pack, registered with ComfyUI's folder_paths.

Paths that ``extra_model_paths.yaml`` already registered under the same names are kept; the
default folder under ``models/`` is added after them.
"""

from __future__ import annotations

import os

import folder_paths

from ..consistentid_core.face_parser import PARSER_FILE_NAMES

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


def weight_files(name: str) -> list[str]:
    return folder_paths.get_filename_list(name)


def parser_files() -> list[str]:
    """Face-parser files from models/consistentid and models/facexlib, as "<folder>/<file>" choices."""
    choices = []
    for folder in (CONSISTENTID, FACEXLIB):
        for filename in folder_paths.get_filename_list(folder):
            base = os.path.basename(filename).lower()
            if base in PARSER_FILE_NAMES or "pars" in base or "bisenet" in base:
                choices.append(f"{folder}/{filename}")
    return choices


def resolve_parser_choice(choice: str) -> str:
    folder, _, filename = choice.partition("/")
    if folder not in (CONSISTENTID, FACEXLIB) or not filename:
        raise ValueError(f"face parser choice {choice!r} is not of the form 'consistentid/<file>' or 'facexlib/<file>'")
    return folder_paths.get_full_path_or_raise(folder, filename)


def insightface_roots() -> list[str]:
    return folder_paths.get_folder_paths(INSIGHTFACE)
