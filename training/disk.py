"""Writing training outputs so that a crash or a full disk never leaves a file that looks complete.

Every file a run publishes (checkpoint folders, adapter files, the final copy) is written under a
temporary name and renamed into place, which is atomic on one file system.  A write that fails
for lack of space (or any other I/O error) becomes one :class:`TrainingConfigError` that says
where, how much room is left there and about how much was needed, instead of a raw ``OSError``,
a ``SafetensorError`` or torch's ``unexpected pos`` from its zip writer.
"""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import contextmanager

from consistentid_core.disk import free_bytes, human_bytes, is_disk_full  # noqa: F401 (used by training)
from consistentid_core.errors import TrainingConfigError

logger = logging.getLogger("consistentid.training")


def is_write_failure(exc: BaseException) -> bool:
    return isinstance(exc, OSError) or is_disk_full(exc)


def folder_bytes(folder: str) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def remove(path: str) -> None:
    """Deletes a file or folder; a folder is renamed first so that a half-deleted one never looks complete."""
    if os.path.isdir(path) and not os.path.islink(path):
        doomed = os.path.join(os.path.dirname(path), f".tmp-delete-{os.path.basename(path)}-{os.getpid()}")
        try:
            os.rename(path, doomed)
        except OSError:
            doomed = path
        shutil.rmtree(doomed, ignore_errors=True)
    elif os.path.lexists(path):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def temporary_path(path: str) -> str:
    """A hidden sibling of ``path`` with the same extension (save_checkpoint insists on .safetensors)."""
    folder, name = os.path.split(os.fspath(path))
    stem, ext = os.path.splitext(name)
    return os.path.join(folder, f".{stem}.tmp-{os.getpid()}{ext}")


@contextmanager
def replacing(path: str):
    """Yields a temporary path to write; on success it replaces ``path`` in one step, on failure it is removed."""
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def atomic_copy(source: str, target: str) -> None:
    with replacing(target) as tmp:
        shutil.copyfile(source, tmp)


@contextmanager
def write_errors(what: str, where: str, needed: int | None = None, advice: str = "", cleanup: str | None = None):
    """Turns a failed write of ``what`` into ``where`` into a TrainingConfigError; removes ``cleanup`` first."""
    try:
        yield
    except Exception as exc:
        if not is_write_failure(exc):
            raise
        if cleanup:
            remove(cleanup)
        free = free_bytes(where)
        room = f"{human_bytes(free)} free on that disk" if free is not None else "free space unknown"
        need = f", and it needs about {human_bytes(needed)}" if needed else ""
        if is_disk_full(exc):
            problem = f"no space left to write {what} to {where} ({room}{need})"
            fix = advice or f"free space on the disk of {where} or write to another disk"
        else:
            problem = f"could not write {what} to {where} ({type(exc).__name__}: {exc}; {room})"
            fix = advice or f"check that {where} is writable"
        raise TrainingConfigError(f"{problem}. {fix[0].upper()}{fix[1:]}") from exc
