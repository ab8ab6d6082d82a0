"""Saving and loading embeds: plain safetensors with a small metadata header, never pickles (they are
meant to be shared between users, and loading a pickle runs arbitrary code); numbered names that two
servers sharing one output folder never both claim; file names kept inside the folder they name."""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile

import torch

from ..disk import free_bytes, human_bytes, is_disk_full
from ..errors import EmbedsError
from .face_embeds import FORMAT_TAG, FORMAT_VERSION, FaceEmbeds, _FLOAT_FIELDS, _REQUIRED_TENSORS

logger = logging.getLogger("consistentid")

EXTENSION = ".safetensors"
TEMP_PREFIX = ".tmp-"  # a save in progress, or one killed before its rename; never a finished file
NUMBER_FORMAT = "_{:05d}"
_NUMBERED_SUFFIX = NUMBER_FORMAT.format(1) + EXTENSION
_MAX_NUMBER_CLASHES = 1000


# --- files -------------------------------------------------------------------------------------

def _write_temporary(embeds: FaceEmbeds, directory: str) -> str:
    """``embeds`` written completely to a new ``.tmp-*`` file in ``directory``; its path."""
    from safetensors.torch import save_file

    tensors = {name: getattr(embeds, name).detach().cpu().contiguous() for name in _FLOAT_FIELDS}
    tensors["region_valid"] = embeds.region_valid.detach().cpu().to(torch.uint8).contiguous()
    if embeds.face_found is not None:
        tensors["face_found"] = embeds.face_found.detach().cpu().to(torch.uint8).contiguous()
    metadata = {
        "format": FORMAT_TAG,
        "format_version": FORMAT_VERSION,
        "arch": embeds.arch,
        "region_names": json.dumps(embeds.region_names),
        "sources": json.dumps(embeds.sources),
        "checkpoint": embeds.checkpoint,
    }
    needed = sum(t.element_size() * t.nelement() for t in tensors.values())
    try:
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=EXTENSION, dir=directory)
    except OSError as exc:
        raise _disk_full(exc, directory, needed) or exc
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
    except BaseException as exc:
        _remove_quietly(tmp)
        full = _disk_full(exc, directory, needed)
        if full is not None:
            raise full from exc
        raise
    return tmp


def _disk_full(exc: BaseException, directory: str, needed: int) -> EmbedsError | None:
    """The named error for a full disk or quota while saving into ``directory``; None for other failures."""
    if not is_disk_full(exc):
        return None
    free = free_bytes(directory)
    room = "unknown free space" if free is None else f"{human_bytes(free)} free"
    return EmbedsError(f"no room to save embeds in {directory}: {room}, about {human_bytes(needed)} needed. "
                       "Free some space on that disk, or save somewhere else (another filename_prefix folder "
                       "or ComfyUI's --output-directory)")


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def save_embeds(embeds: FaceEmbeds, path: str) -> None:
    """Write ``embeds`` as a safetensors file with the ``consistentid-embeds`` metadata tag.

    The file is written next to its destination and renamed into place, so an interrupted save
    never leaves a truncated file under the final name.  An existing file at ``path`` is replaced;
    :func:`save_numbered_embeds` is the variant that never replaces one.
    """
    tmp = _write_temporary(embeds, os.path.dirname(os.path.abspath(path)))
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def _existing_ancestor(path: str) -> str:
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _limits(folder: str) -> tuple[int, int]:
    """(longest file name, longest path) in bytes that the file system under ``folder`` takes."""
    probe = _existing_ancestor(folder)
    try:
        return int(os.pathconf(probe, "PC_NAME_MAX")), int(os.pathconf(probe, "PC_PATH_MAX"))
    except (AttributeError, OSError, ValueError):  # no pathconf on Windows: NTFS names 255, paths 260
        return 255, 260


def _too_long(filename_prefix: str, folder: str) -> EmbedsError:
    name_max, path_max = _limits(folder)
    shown = filename_prefix if len(filename_prefix) <= 60 else filename_prefix[:60] + "..."
    return EmbedsError(
        f"filename_prefix {shown!r} ({len(os.fsencode(filename_prefix))} bytes) is too long: "
        f"each folder or file name may be at most {name_max} bytes on this file system and the whole path "
        f"{path_max}, and the saved file name adds {_NUMBERED_SUFFIX!r} ({len(_NUMBERED_SUFFIX)} bytes) to the "
        "last part; use a shorter filename_prefix."
    )


def _check_name_lengths(filename_prefix: str, base: str, stem: str) -> None:
    parts = os.path.relpath(stem, base).split(os.sep)
    name_max, path_max = _limits(os.path.dirname(stem))
    lengths = [len(os.fsencode(p)) for p in parts[:-1]] + [len(os.fsencode(parts[-1] + _NUMBERED_SUFFIX))]
    if max(lengths) > name_max or len(os.fsencode(stem + _NUMBERED_SUFFIX)) >= path_max:
        raise _too_long(filename_prefix, os.path.dirname(stem))


def _claim(tmp: str, path: str) -> bool:
    """Give the finished ``tmp`` the name ``path`` unless that name exists; False when it does.

    A hard link is created atomically and fails when the name is taken, so two savers can never
    both win one name, and the name never shows a half-written file.  File systems without hard
    links get an exclusively created placeholder (O_EXCL) that the file then replaces.
    """
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    os.replace(tmp, path)
    return True


def _first_free_number(folder: str, prefix: str) -> int:
    taken = set(os.listdir(folder))
    number = 1
    while f"{prefix}{NUMBER_FORMAT.format(number)}{EXTENSION}" in taken:
        number += 1
    return number


def save_numbered_embeds(embeds: FaceEmbeds, base_dir: str, filename_prefix: str) -> str:
    """Write ``embeds`` as ``<filename_prefix>_NNNNN.safetensors`` under ``base_dir``; returns the path.

    The number is the first one no file in the folder has.  Another process (a second ComfyUI
    sharing the output folder) may choose the same number at the same moment, so the name is
    claimed exclusively (see :func:`_claim`) and on a clash the next number is tried: no existing
    file is ever replaced.  ``filename_prefix`` must stay inside ``base_dir`` (see
    :func:`resolve_inside`); names too long for the file system are refused by EmbedsError.
    """
    base = os.path.realpath(base_dir)
    stem = resolve_inside(base_dir, filename_prefix)
    _check_name_lengths(filename_prefix, base, stem)
    folder, prefix = os.path.dirname(stem), os.path.basename(stem)
    try:
        os.makedirs(folder, exist_ok=True)
        tmp = _write_temporary(embeds, folder)
        try:
            number = _first_free_number(folder, prefix)
            for _ in range(_MAX_NUMBER_CLASHES):
                path = os.path.join(folder, f"{prefix}{NUMBER_FORMAT.format(number)}{EXTENSION}")
                if _claim(tmp, path):
                    return path
                number += 1
        finally:
            _remove_quietly(tmp)
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:  # a limit the checks above could not know of
            raise _too_long(filename_prefix, folder) from exc
        raise
    raise EmbedsError(
        f"could not find a free file name for {filename_prefix!r}: {_MAX_NUMBER_CLASHES} numbers from "
        f"{number - _MAX_NUMBER_CLASHES} on were taken while saving; use another filename_prefix."
    )


def load_embeds(path: str, expected_arch: str | None = None) -> FaceEmbeds:
    """Read a file written by :func:`save_embeds`; every refusal is an EmbedsError naming the file."""
    from safetensors import safe_open

    fname = os.path.basename(path)
    if not os.path.isfile(path):
        raise EmbedsError(f"Face embeds file {fname!r} does not exist.")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            keys = set(f.keys())
            tensors = {k: f.get_tensor(k) for k in keys if k in _REQUIRED_TENSORS or k == "face_found"}
    except Exception as exc:  # safetensors raises several types for a damaged or foreign header
        raise EmbedsError(
            f"{fname!r} is not a ConsistentID embeds file: it cannot be read as safetensors ({exc})."
        ) from exc

    if metadata.get("format") != FORMAT_TAG:
        raise EmbedsError(
            f"{fname!r} is not a ConsistentID embeds file (its metadata lacks format={FORMAT_TAG!r})."
        )
    version = metadata.get("format_version", "")
    if version != FORMAT_VERSION:
        try:
            age = "a newer" if int(version) > int(FORMAT_VERSION) else "an older"
        except ValueError:
            age = "another"
        raise EmbedsError(
            f"{fname!r} was made by {age} version of the ConsistentID pack (format_version "
            f"{version or '?'}, this pack reads {FORMAT_VERSION}); re-encode the references."
        )
    arch = metadata.get("arch", "")
    if expected_arch is not None and arch != expected_arch:
        raise EmbedsError(
            f"{fname!r} holds face embeds for {arch or 'an unknown architecture'}, "
            f"but this model is {expected_arch}; use embeds made for {expected_arch}."
        )
    missing = [k for k in _REQUIRED_TENSORS if k not in tensors]
    if missing:
        raise EmbedsError(f"{fname!r} is damaged: it lacks the tensor(s) {', '.join(missing)}.")
    _refuse_non_finite(fname, tensors)
    try:
        region_names = json.loads(metadata.get("region_names", ""))
        sources = json.loads(metadata.get("sources", ""))
    except json.JSONDecodeError as exc:
        raise EmbedsError(f"{fname!r} is damaged: its region_names/sources metadata is not JSON ({exc}).") from exc

    def as_bool(name: str) -> torch.Tensor:
        t = tensors[name]
        if t.dtype != torch.uint8 or bool((t > 1).any()):
            raise EmbedsError(f"{fname!r} is damaged: tensor {name} must be uint8 0/1, found {t.dtype}.")
        return t.bool()

    try:
        return FaceEmbeds(
            arch=arch,
            id_embeds=tensors["id_embeds"],
            clip_embeds=tensors["clip_embeds"],
            region_embeds=tensors["region_embeds"],
            region_valid=as_bool("region_valid"),
            region_names=region_names,
            uncond_clip_embeds=tensors["uncond_clip_embeds"],
            sources=sources,
            checkpoint=metadata.get("checkpoint", ""),
            face_found=as_bool("face_found") if "face_found" in tensors else None,
        )
    except EmbedsError as exc:
        raise EmbedsError(f"{fname!r} is damaged: {exc}") from exc


def _refuse_non_finite(fname: str, tensors: dict) -> None:
    """NaN or Inf features would make every generated image NaN (black); name the tensor and the count."""
    for name in _FLOAT_FIELDS:
        t = tensors[name]
        if not t.dtype.is_floating_point or bool(torch.isfinite(t).all()):
            continue  # a wrong dtype is refused, with its name, by FaceEmbeds
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        raise EmbedsError(
            f"{fname!r} is damaged: {name} holds {nan} NaN and {inf} Inf values (of {t.numel()}); "
            "encode the reference photos again and save new embeds."
        )


def resolve_inside(base_dir: str, filename: str) -> str:
    """The real path of ``filename`` under ``base_dir``, refusing anything that leaves it.

    Absolute names, ``..`` escapes and symlinks (of the file or any parent) that point outside are
    refused with EmbedsError.  The target need not exist yet.
    """
    if not isinstance(filename, str) or not filename.strip() or "\x00" in filename:
        raise EmbedsError(f"Invalid file name {filename!r}.")
    if os.path.isabs(filename) or os.path.splitdrive(filename)[0]:
        raise EmbedsError(f"File name {filename!r} must be relative to {base_dir!r}, not absolute.")
    base = os.path.realpath(base_dir)
    target = os.path.realpath(os.path.join(base, filename))
    try:
        inside = os.path.commonpath([base, target]) == base
    except ValueError:
        inside = False
    if not inside or target == base:
        raise EmbedsError(f"File name {filename!r} points outside the folder {base_dir!r}; refused.")
    return target
