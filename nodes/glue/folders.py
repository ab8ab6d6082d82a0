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
