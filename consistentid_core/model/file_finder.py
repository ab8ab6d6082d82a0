"""Which file plays which part: the model files ConsistentID needs, picked by name from folder listings.

A host lists, for each folder kind (``consistentid``, ``clip_vision``, ``insightface``, ``facexlib``),
every file under every folder registered for that kind, as a path relative to that folder with
sub-folders included (ComfyUI's ``folder_paths.get_filename_list``, which covers
``extra_model_paths.yaml`` too).  :func:`find_model_files` picks, for each part, the file with its
official name or else a common renaming, and when anything is missing raises one
:class:`~consistentid_core.errors.ModelFileError` that lists every missing file with the folder it
belongs in.  Nothing here touches the disk: it works on the listings alone.

The parts and how a file is recognised (names compared without case, punctuation or extension):

* ConsistentID weights of the base model's architecture: ``ConsistentID-v1.bin`` (SD1.5) or
  ``ConsistentID_SDXL-v1.bin`` (SDXL); renamed: ``consistentid_v1.safetensors``,
  ``ConsistentID-SDXL.bin``...; any other weight file whose name holds "consistentid" (and "xl" for
  SDXL, no "xl" for SD1.5) comes last.
* the CLIP ViT-H image encoder: ``CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors``; renamed:
  ``clip_vision_h.safetensors``, ``CLIP-ViT-H-14.safetensors``, ``ip-adapter_image_encoder_sd15``...;
  then any name with "vit-h" in it, or IP-Adapter's ``image_encoder/model.safetensors`` outside an
  SDXL folder (IP-Adapter's SDXL image encoder is ViT-bigG).
* insightface ``buffalo_l``: the folder holding ``det_10g.onnx`` and ``w600k_r50.onnx``;
  ``models/buffalo_l`` first, then a ``buffalo_l`` folder at any depth (one level too deep, or without
  the ``models`` level), then any folder with both files.
* the BiSeNet face parser: ``face_parsing.pth``, ``79999_iter.pth``, ``parsing_bisenet.pth``; renamed:
  the same stems with another extension or spelling; then names with "bisenet" or "face" and "pars".

Among files of the same standing the shallowest wins, then the folder kind listed first, then the
name in alphabetical order, so the choice is the same on every run.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from ..errors import ArchitectureMismatchError, ModelFileError
from ..face.insightface_models import DEFAULT_MODEL_NAME, REQUIRED_MODEL_FILES
from ..face.parser import PARSER_FILE_NAMES
from .layers import ARCH_LABEL

# The host's folder kinds (ComfyUI's folder names).
FOLDER_CONSISTENTID = "consistentid"
FOLDER_CLIP_VISION = "clip_vision"
FOLDER_INSIGHTFACE = "insightface"
FOLDER_FACEXLIB = "facexlib"
FOLDER_KINDS = (FOLDER_CONSISTENTID, FOLDER_CLIP_VISION, FOLDER_INSIGHTFACE, FOLDER_FACEXLIB)

# The parts, in the order the missing-files message lists them.
PART_WEIGHTS = "consistentid"
PART_CLIP_VISION = "clip_vision"
PART_INSIGHTFACE = "insightface"
PART_FACE_PARSER = "face_parser"
PARTS = (PART_WEIGHTS, PART_CLIP_VISION, PART_INSIGHTFACE, PART_FACE_PARSER)

AUTO = "auto"  # a choice that means: find the file by its name

WEIGHT_FILES = {"sd15": "ConsistentID-v1.bin", "sdxl": "ConsistentID_SDXL-v1.bin"}
CLIP_VISION_FILE = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
INSIGHTFACE_PACK = DEFAULT_MODEL_NAME  # buffalo_l: the ArcFace space ConsistentID was trained in
INSIGHTFACE_FILES = tuple(REQUIRED_MODEL_FILES[INSIGHTFACE_PACK].values())  # det_10g.onnx, w600k_r50.onnx

WEIGHT_EXTENSIONS = (".bin", ".safetensors", ".pth", ".pt", ".sft", ".ckpt")

# Squashed names (see _squash) of the usual renamings, per part.
_WEIGHT_RENAMINGS = {
    "sd15": {"consistentidv1", "consistentid", "consistentidsd15", "consistentidsd15v1", "consistentidv1sd15"},
    "sdxl": {"consistentidsdxlv1", "consistentidsdxl", "consistentidxl", "consistentidxlv1", "consistentidv1sdxl"},
}
_CLIP_VISION_RENAMINGS = {
    "clipvith14laion2bs32bb79k", "clipvisionh", "clipvisionvith14", "clipvith14", "clipvith", "vith14",
    "openclipvith14", "openclipvith14laion2bs32bb79k", "ipadapterimageencodersd15", "imageencodersd15",
    "sd15imageencoder", "sd15clipvision", "clipvisionsd15", "ipadaptersd15imageencoder",
}
_PARSER_RENAMINGS = {"faceparsing", "79999iter", "parsingbisenet", "bisenet", "faceparsingbisenet",
                     "bisenetfaceparsing", "faceparser", "bisenetfaceparser"}

_STANDING_CHOSEN, _STANDING_OFFICIAL, _STANDING_RENAMED, _STANDING_LIKELY = 0, 1, 2, 3
_HOW = {_STANDING_CHOSEN: "chosen in the node", _STANDING_OFFICIAL: "official name",
        _STANDING_RENAMED: "renamed", _STANDING_LIKELY: "found by a likely name"}


@dataclass(frozen=True)
class FoundFile:
    """One part's file: ``folder`` is the folder kind, ``name`` the path relative to it ("/" separated).

    For insightface ``name`` is the model folder and ``files`` its two required files; for the other
    parts ``files`` is ``(name,)``."""

    part: str
    folder: str
    name: str
    files: tuple[str, ...]
    how: str

    def __str__(self) -> str:
        return f"{self.folder}/{self.name} ({self.how})"


@dataclass(frozen=True)
class ModelFiles:
    """The files of every part for one architecture ('sd15' or 'sdxl')."""

    arch: str
    consistentid: FoundFile
    clip_vision: FoundFile
    insightface: FoundFile
    face_parser: FoundFile

    def describe(self) -> str:
        return "; ".join(f"{part}: {getattr(self, part)}" for part in PARTS)


@dataclass(frozen=True)
class _Missing:
    part: str
    what: str  # the file (or files) to put there
    folder: str  # the folder kind it belongs in
    sub_folder: str  # below that folder ("" for the folder itself)
    about: str  # what it is
    hints: tuple[str, ...] = ()


def _normalise(name: str) -> str:
    return name.replace("\\", "/").strip("/")


def _squash(text: str) -> str:
    """Lower case, letters and digits only: 'ConsistentID_SDXL-v1' -> 'consistentidsdxlv1'."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _stem(name: str) -> str:
    base = posixpath.basename(name)
    root, ext = posixpath.splitext(base)
    return root if ext else base


def _has_weight_extension(name: str) -> bool:
    return name.lower().endswith(WEIGHT_EXTENSIONS)


def _depth(name: str) -> int:
    return name.count("/")


# --- the standing of a file for each part (None: not a candidate) -------------------------------

def _weights_standing(arch: str) -> Callable[[str], int | None]:
    official = WEIGHT_FILES[arch].lower()

    def standing(name: str) -> int | None:
        if not _has_weight_extension(name):
            return None
        stem = _squash(_stem(name))
        if "consistentid" not in stem or _is_parser_name(stem) or ("xl" in stem) != (arch == "sdxl"):
            return None
        if posixpath.basename(name).lower() == official:
            return _STANDING_OFFICIAL
        if stem in _WEIGHT_RENAMINGS[arch]:
            return _STANDING_RENAMED
        return _STANDING_LIKELY

    return standing


def _clip_vision_standing(name: str) -> int | None:
    if not _has_weight_extension(name):
        return None
    if posixpath.basename(name).lower() == CLIP_VISION_FILE.lower():
        return _STANDING_OFFICIAL
    stem = _squash(_stem(name))
    if stem in _CLIP_VISION_RENAMINGS:
        return _STANDING_RENAMED
    path = _squash(name)
    if "bigg" in path or "sdxl" in path:
        return None
    if "vith" in stem:
        return _STANDING_LIKELY
    parent = _squash(posixpath.dirname(name))
    if stem in ("model", "pytorchmodel") and ("imageencoder" in parent or "vith" in parent):
        return _STANDING_LIKELY
    return None


def _is_parser_name(stem: str) -> bool:
    return "bisenet" in stem or ("pars" in stem and "face" in stem) or stem in _PARSER_RENAMINGS


def _parser_standing(name: str) -> int | None:
    if not _has_weight_extension(name):
        return None
    if posixpath.basename(name).lower() in PARSER_FILE_NAMES:
        return _STANDING_OFFICIAL
    stem = _squash(_stem(name))
    if "consistentid" in stem or "parsenet" in stem:  # facexlib's ParseNet is another network
        return None
    if stem in _PARSER_RENAMINGS:
        return _STANDING_RENAMED
    if _is_parser_name(stem):
        return _STANDING_LIKELY
    return None


def _parser_order(name: str) -> int:
    base = posixpath.basename(name).lower()
    return PARSER_FILE_NAMES.index(base) if base in PARSER_FILE_NAMES else len(PARSER_FILE_NAMES)


def _best_file(part: str, listings: Mapping[str, Sequence[str]], kinds: Sequence[str],
               standing: Callable[[str], int | None], order: Callable[[str], int] = lambda _n: 0) -> FoundFile | None:
    ranked = []
    for kind_index, kind in enumerate(kinds):
        for raw in listings.get(kind, ()):
            name = _normalise(raw)
            rank = standing(name)
            if rank is not None:
                ranked.append(((rank, order(name), _depth(name), kind_index, name), kind, name))
    if not ranked:
        return None
    (rank, *_rest), kind, name = min(ranked)
    return FoundFile(part, kind, name, (name,), _HOW[rank])


def _insightface_folders(files: Sequence[str]) -> dict[str, set[str]]:
    """folder (relative) -> the lower-case names of the files directly in it."""
    folders: dict[str, set[str]] = {}
    for raw in files:
        name = _normalise(raw)
        folders.setdefault(posixpath.dirname(name), set()).add(posixpath.basename(name).lower())
    return folders


def _best_insightface(listings: Mapping[str, Sequence[str]]) -> FoundFile | None:
    wanted = {f.lower() for f in INSIGHTFACE_FILES}
    expected = f"models/{INSIGHTFACE_PACK}"
    ranked = []
    for folder, names in _insightface_folders(listings.get(FOLDER_INSIGHTFACE, ())).items():
        if not wanted <= names:
            continue
        if folder == expected:
            rank = _STANDING_OFFICIAL
        elif _squash(posixpath.basename(folder)) == _squash(INSIGHTFACE_PACK):
            rank = _STANDING_RENAMED
        else:
            rank = _STANDING_LIKELY
        ranked.append(((rank, _depth(folder), folder), folder))
    if not ranked:
        return None
    (rank, *_rest), folder = min(ranked)
    # The listing's own spelling of each file, so that the host can resolve it.
    spelled = {posixpath.basename(_normalise(f)).lower(): _normalise(f)
               for f in listings.get(FOLDER_INSIGHTFACE, ()) if posixpath.dirname(_normalise(f)) == folder}
    files = tuple(spelled[f.lower()] for f in INSIGHTFACE_FILES)
    return FoundFile(PART_INSIGHTFACE, FOLDER_INSIGHTFACE, folder, files, _HOW[rank])


def _chosen_file(part: str, choice: str, listings: Mapping[str, Sequence[str]],
                 kinds: Sequence[str]) -> FoundFile | None:
    """The file a user picked: 'name' in the part's first folder kind, or '<kind>/name' for the parser."""
    choice = _normalise(choice)
    candidates = [(kinds[0], choice)]
    head, _, rest = choice.partition("/")
    if head in kinds and rest:
        candidates.insert(0, (head, rest))
    for kind, name in candidates:
        if name in {_normalise(f) for f in listings.get(kind, ())}:
            return FoundFile(part, kind, name, (name,), _HOW[_STANDING_CHOSEN])
    return None


# --- the message ---------------------------------------------------------------------------------

def _folder_path(folders: Mapping[str, Sequence[str]], kind: str, sub_folder: str = "") -> str:
    paths = list(folders.get(kind) or ())
    base = paths[0] if paths else f"<ComfyUI>/models/{kind}"
    return os.path.join(base, *sub_folder.split("/")) if sub_folder else base


def _weights_hints(arch: str, listings: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    other = "sdxl" if arch == "sd15" else "sd15"
    found = _best_file(PART_WEIGHTS, listings, (FOLDER_CONSISTENTID,), _weights_standing(other))
    if found is None:
        return ()
    return (f"found {found.name}, which is the ConsistentID file for {ARCH_LABEL[other]}; this model is "
            f"{ARCH_LABEL[arch]}",)


def _insightface_hints(listings: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    hints = []
    files = [_normalise(f) for f in listings.get(FOLDER_INSIGHTFACE, ())]
    for name in files:
        if posixpath.basename(name).lower() == f"{INSIGHTFACE_PACK}.zip":
            hints.append(f"{name} was never extracted: extract it so that the .onnx files lie directly in "
                         f"models/{INSIGHTFACE_PACK}/")
    for folder, names in sorted(_insightface_folders(files).items()):
        present = [f for f in INSIGHTFACE_FILES if f.lower() in names]
        if present and len(present) < len(INSIGHTFACE_FILES):
            absent = [f for f in INSIGHTFACE_FILES if f.lower() not in names]
            hints.append(f"{folder or '.'}/ has {', '.join(present)} but not {', '.join(absent)}: "
                         f"download or extract {INSIGHTFACE_PACK} again")
    return tuple(hints)


def _missing_message(arch: str, missing: Sequence[_Missing], folders: Mapping[str, Sequence[str]]) -> str:
    rows = [(m.what, _folder_path(folders, m.folder, m.sub_folder), m) for m in missing]
    width = max(len(what) for what, _p, _m in rows)
    lines = [f"ConsistentID model files for this {ARCH_LABEL[arch]} model are missing. Put each file into the "
             "folder shown (a sub-folder of it, or a folder added for the same name in extra_model_paths.yaml, "
             "works too), then run the workflow again:"]
    for what, path, item in rows:
        lines.append(f"  {what:<{width}} -> {path}   ({item.about})")
        lines += [f"      note: {hint}" for hint in item.hints]
    searched = sorted({m.folder for m in missing} | ({FOLDER_FACEXLIB} if any(
        m.part == PART_FACE_PARSER for m in missing) else set()), key=FOLDER_KINDS.index)
    lines.append("Searched: " + "; ".join(
        f"{kind}: {', '.join(folders.get(kind) or ()) or '(no folder registered)'}" for kind in searched))
    lines.append("Nothing is downloaded; the model table in the pack's README says where to get each file.")
    return "\n".join(lines)


# --- the entry point -----------------------------------------------------------------------------

def find_model_files(arch: str | None, listings: Mapping[str, Sequence[str]], folders: Mapping[str, Sequence[str]],
                     choices: Mapping[str, str | None] | None = None, model_label: str = "") -> ModelFiles:
    """The file of every part for a base model of architecture ``arch`` ('sd15', 'sdxl'; None: unknown).

    ``listings``: folder kind -> file paths relative to that kind's folders (sub-folders included).
    ``folders``: folder kind -> the folders registered for it, the first being where a missing file
    should go.  ``choices``: part -> a file picked by the user (the listing's relative name; for the
    face parser '<consistentid|facexlib>/<name>'), or ``AUTO`` / None to find it by name.
    ``model_label`` names the model in the message for an unknown architecture.

    Raises ArchitectureMismatchError for a model that is neither SD1.5 nor SDXL, and one
    ModelFileError that lists every missing file with its folder.
    """
    if arch not in WEIGHT_FILES:
        label = f" ({model_label})" if model_label else ""
        raise ArchitectureMismatchError(
            f"the model{label} is neither SD1.5 nor SDXL: ConsistentID has weights for those two only "
            f"({WEIGHT_FILES['sd15']} for SD1.5, {WEIGHT_FILES['sdxl']} for SDXL). Connect an SD1.5 or SDXL "
            "checkpoint's MODEL to the loader")
    choices = {part: value for part, value in (choices or {}).items() if value and value != AUTO}
    unknown = sorted(set(choices) - {PART_WEIGHTS, PART_CLIP_VISION, PART_FACE_PARSER})
    if unknown:
        raise ValueError(f"no file choice for {unknown}; parts with a choice: consistentid, clip_vision, face_parser")
    kinds = {PART_WEIGHTS: (FOLDER_CONSISTENTID,), PART_CLIP_VISION: (FOLDER_CLIP_VISION,),
             PART_FACE_PARSER: (FOLDER_CONSISTENTID, FOLDER_FACEXLIB)}

    def pick(part: str, standing, order=lambda _n: 0) -> FoundFile | None:
        if part in choices:
            return _chosen_file(part, choices[part], listings, kinds[part])
        return _best_file(part, listings, kinds[part], standing, order)

    weights = pick(PART_WEIGHTS, _weights_standing(arch))
    clip_vision = pick(PART_CLIP_VISION, _clip_vision_standing)
    insightface = _best_insightface(listings)
    parser = pick(PART_FACE_PARSER, _parser_standing, _parser_order)

    missing = []
    if weights is None:
        chosen = choices.get(PART_WEIGHTS)
        missing.append(_Missing(PART_WEIGHTS, chosen or WEIGHT_FILES[arch], FOLDER_CONSISTENTID, "",
                                f"ConsistentID weights for {ARCH_LABEL[arch]}"
                                + (", chosen in the node" if chosen else "; Hugging Face JackAILab/ConsistentID"),
                                () if chosen else _weights_hints(arch, listings)))
    if clip_vision is None:
        chosen = choices.get(PART_CLIP_VISION)
        missing.append(_Missing(PART_CLIP_VISION, chosen or CLIP_VISION_FILE, FOLDER_CLIP_VISION, "",
                                "the CLIP ViT-H image encoder, the SD1.5 IP-Adapter one"
                                + (", chosen in the node" if chosen else "")))
    if insightface is None:
        missing.append(_Missing(PART_INSIGHTFACE, ", ".join(INSIGHTFACE_FILES), FOLDER_INSIGHTFACE,
                                f"models/{INSIGHTFACE_PACK}",
                                f"insightface {INSIGHTFACE_PACK}, unzipped, with its other .onnx files",
                                _insightface_hints(listings)))
    if parser is None:
        chosen = choices.get(PART_FACE_PARSER)
        if chosen:
            folder, _, name = _normalise(chosen).partition("/")
        else:
            folder, name = FOLDER_CONSISTENTID, PARSER_FILE_NAMES[0]
        if folder not in (FOLDER_CONSISTENTID, FOLDER_FACEXLIB) or not name:
            folder, name = FOLDER_CONSISTENTID, _normalise(chosen)
        about = ("the BiSeNet face parser, chosen in the node" if chosen else
                 f"the BiSeNet face parser; {PARSER_FILE_NAMES[1]} there or facexlib's {PARSER_FILE_NAMES[2]} "
                 f"in {_folder_path(folders, FOLDER_FACEXLIB)} does as well")
        missing.append(_Missing(PART_FACE_PARSER, name, folder, "", about))
    if missing:
        raise ModelFileError(_missing_message(arch, missing, folders))
    return ModelFiles(arch, weights, clip_vision, insightface, parser)
