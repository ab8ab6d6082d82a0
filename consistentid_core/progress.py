"""How the core reports progress of long work to its host, without knowing the host."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, TypeVar

Progress = Callable[[int, int], None]
"""``progress(done, total)``: called before each unit of long work (a photo, a region) and once
with ``done == total`` at the end.  A host passes one that shows a progress bar and raises when
the user cancels; the core lets that exception through untouched, so nothing half-done is kept."""

Item = TypeVar("Item")


def report(progress: Progress | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


def each_with_progress(items: Iterable[Item], progress: Progress | None) -> Iterator[tuple[int, Item]]:
    """``items`` one by one, reporting ``progress(i, n)`` before each and ``(n, n)`` after the last."""
    items = list(items)
    for index, item in enumerate(items):
        report(progress, index, len(items))
        yield index, item
    report(progress, len(items), len(items))
