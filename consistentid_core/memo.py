"""Small bounded caches: an LRU keyed partly by object identity, for results derived from models,
and :class:`ModelCache`, the loaded face models by file.

The pack's expensive results (ID projections of a checkpoint and embeds, encoded photos of a set
of face models) depend on objects that have no cheap content hash, such as a loaded network.  An
``id()`` alone is no key: after an object is freed, a new one can get the same id.  So every
entry keeps weak references to its owner objects and only counts as a hit while they are the very
same objects; an entry whose owner was freed is dropped, which also frees its value.
Owners that cannot be weakly referenced are never cached (a miss every time, never a wrong hit).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from typing import Any, Hashable

logger = logging.getLogger("consistentid")

_MISSING = object()


class IdentityLRU:
    """``get``/``put`` by ``(owners, values)``: owners by identity (weakly held), values by equality.

    Bounded by entry count and, when values report their size, by bytes; the least recently used
    entries go first.  Safe to use from several threads.
    """

    def __init__(self, name: str, max_entries: int, max_bytes: int | None = None):
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.name = name
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple, tuple[tuple, Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        # Filled by weakref callbacks, emptied under the lock: a callback can run inside any
        # allocation, even while this thread holds the lock, so it must not take it.
        self._dead: list[tuple] = []

    def __len__(self) -> int:
        with self._lock:
            self._purge_dead()
            return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, owners: tuple, values: Hashable = (), default=None):
        key = _key(owners, values)
        with self._lock:
            self._purge_dead()
            entry = self._entries.get(key, _MISSING)
            if entry is not _MISSING and _same_owners(entry[0], owners):
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[1]
            if entry is not _MISSING:  # an id was reused by a new object: the entry is stale
                self._remove(key)
            self.misses += 1
            return default

    def put(self, owners: tuple, values: Hashable, value, nbytes: int = 0) -> bool:
        """Stores ``value``; returns False when an owner cannot be weakly referenced (not stored)."""
        key = _key(owners, values)
        try:
            refs = tuple(weakref.ref(owner, self._on_owner_freed(key)) for owner in owners)
        except TypeError:
            logger.debug("%s cache: %s cannot be weakly referenced; not cached",
                         self.name, ", ".join(type(o).__name__ for o in owners))
            return False
        if self.max_bytes is not None and nbytes > self.max_bytes:
            return False
        with self._lock:
            self._purge_dead()
            if key in self._entries:
                self._remove(key)
            self._entries[key] = (refs, value, nbytes)
            self._bytes += nbytes
            while len(self._entries) > self.max_entries or (
                    self.max_bytes is not None and self._bytes > self.max_bytes and len(self._entries) > 1):
                self._remove(next(iter(self._entries)))
        return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self._dead.clear()

    def _on_owner_freed(self, key):
        dead = self._dead

        def callback(_ref, key=key):
            dead.append(key)

        return callback

    def _purge_dead(self) -> None:
        while self._dead:
            key = self._dead.pop()
            entry = self._entries.get(key)
            if entry is not None and any(ref() is None for ref in entry[0]):
                self._remove(key)

    def _remove(self, key) -> None:
        _refs, _value, nbytes = self._entries.pop(key)
        self._bytes -= nbytes


def _key(owners: tuple, values: Hashable) -> tuple:
    return tuple(id(owner) for owner in owners), values


def _same_owners(refs: tuple, owners: tuple) -> bool:
    return len(refs) == len(owners) and all(ref() is owner for ref, owner in zip(refs, owners))


class ModelCache(OrderedDict):
    """A dict of loaded models by key (file, options) that keeps the ``max_entries`` most recently used.

    It is a dict on purpose: loaders use ``get`` and item assignment, so a plain ``{}`` can stand in
    for it.  Every instance is listed for :func:`release_model_caches`, which a host calls when it
    frees memory.  Thread safety is the caller's (each loader holds its own lock).
    """

    def __init__(self, name: str, max_entries: int):
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        super().__init__()
        self.name = name
        self.max_entries = max_entries
        _MODEL_CACHES.append(weakref.ref(self))

    def get(self, key, default=None):
        if key in self:
            self.move_to_end(key)
            return self[key]
        return default

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.max_entries:
            old_key, _old = self.popitem(last=False)
            logger.info("%s cache: dropped %s (keeps the %d most recently used)", self.name, old_key, self.max_entries)


_MODEL_CACHES: list[weakref.ref] = []  # weak: a cache made by a test goes when the test drops it


def release_model_caches() -> int:
    """Empties every :class:`ModelCache` (face parser, insightface); returns how many models were dropped.

    A model still referenced elsewhere (a host's node outputs) stays alive there; the caches only
    stop keeping it, so that it is freed once its last user lets go."""
    dropped = 0
    _MODEL_CACHES[:] = [ref for ref in _MODEL_CACHES if ref() is not None]
    for ref in list(_MODEL_CACHES):
        cache = ref()
        if cache is not None:
            dropped += len(cache)
            cache.clear()
    if dropped:
        logger.info("released %d cached face model(s)", dropped)
    return dropped
