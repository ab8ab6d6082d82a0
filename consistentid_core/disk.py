"""Recognising a full disk, whoever reports it, and saying how much room there is.

A full disk reaches Python as an ``OSError`` with ENOSPC/EDQUOT, as safetensors' Rust I/O error
text, or as torch's zip writer's "unexpected pos" (which drops the errno); every writer of the pack
turns any of them into one named error with the folder, the free space and about how much was needed.
"""

from __future__ import annotations

import errno
import os
import shutil

_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# What the writers say when the disk is full: OSError text, safetensors' Rust I/O error, torch's zip writer
# (which drops the errno and reports only the position it failed to reach).
_FULL_MARKERS = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122",
                 "not enough space on the disk", "unexpected pos", "file write failed")


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from) reports a full disk or quota."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        if any(marker in str(exc).lower() for marker in _FULL_MARKERS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def free_bytes(path: str) -> int | None:
    """Free space on the disk that holds ``path`` (or its nearest existing parent folder)."""
    folder = os.path.abspath(path)
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None
