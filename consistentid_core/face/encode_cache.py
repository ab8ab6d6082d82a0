"""Per-photo cache of the face encoding: a photo seen before with the same models costs nothing.

Encoding one reference runs insightface, the BiSeNet parser and CLIP ViT-H on the photo and up
to 5 region images, seconds on a CPU.  A host's own output cache avoids that only while the whole
node input stays unchanged; the same photo comes back in many other ways (an upstream node re-run
with an identical result, the combine option changed, a batch that adds one photo to three known
ones, another workflow with the same photo).  So each photo's result is kept here.

Key: a content hash of the photo's pixels, the identities of the face analysis, parser and CLIP
vision objects (see :mod:`.memo`: a freed model's entries go with it), and every option that
changes the result (arch, face selection, colour order, the no-face policy).  Value: the photo's
rows of the FaceEmbeds and its analysis (what the preview draws).  The CLIP features of the
unconditional zero image depend only on the vision model and are kept once per model.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..memo import IdentityLRU

if TYPE_CHECKING:
    from .pipeline import ReferenceAnalysis

logger = logging.getLogger("consistentid")

DEFAULT_MAX_ENTRIES = 64
DEFAULT_MAX_BYTES = 256 * 2**20  # about 25 photos of 640 px with 5 regions each


def image_digest(image) -> str:
    """Content hash of a photo: its pixels, shape and dtype (two equal arrays give equal digests)."""
    array = np.ascontiguousarray(image)
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{array.shape}|{array.dtype.str}|".encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


@dataclass(frozen=True)
class EncodedReference:
    """One photo's share of a FaceEmbeds, or only its analysis when the photo was dropped."""

    analysis: "ReferenceAnalysis"
    id_embed: torch.Tensor | None = None  # [512]; None: no row (skipped for having no face)
    clip_embed: torch.Tensor | None = None  # [257, 1280]
    region_embeds: torch.Tensor | None = None  # [regions, 257, 1280]
    region_names: tuple[str, ...] = ()

    @property
    def kept(self) -> bool:
        return self.id_embed is not None

    @property
    def nbytes(self) -> int:
        tensors = (self.id_embed, self.clip_embed, self.region_embeds)
        size = sum(t.element_size() * t.nelement() for t in tensors if t is not None)
        analysis = self.analysis
        return size + analysis.image.nbytes + analysis.label_map.nbytes + sum(m.nbytes for m in analysis.regions.values())

    def from_source(self, source: str) -> "EncodedReference":
        """The same result under the name the photo has in this call (its position may differ)."""
        if self.analysis.source == source:
            return self
        return replace(self, analysis=replace(self.analysis, source=source))


@dataclass(frozen=True)
class CacheKey:
    models: tuple
    values: tuple


class EncodeCache:
    """What :func:`pipeline.encode_references` reuses between calls; see the module doc."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: int = DEFAULT_MAX_BYTES):
        self._store = IdentityLRU("face encoding", max_entries, max_bytes)

    @property
    def hits(self) -> int:
        return self._store.hits

    @property
    def misses(self) -> int:
        return self._store.misses

    @property
    def nbytes(self) -> int:
        return self._store.nbytes

    def __len__(self) -> int:
        return len(self._store)

    def key(self, image, models: tuple, options: tuple) -> CacheKey:
        return CacheKey(tuple(models), ("photo", image_digest(image), tuple(options)))

    def get(self, key: CacheKey) -> EncodedReference | None:
        return self._store.get(key.models, key.values)

    def put(self, key: CacheKey, encoded: EncodedReference) -> None:
        if not self._store.put(key.models, key.values, encoded, encoded.nbytes):
            logger.debug("face encoding not cached (models not weakly referenceable, or larger than the cache)")

    def get_uncond(self, vision_model) -> torch.Tensor | None:
        return self._store.get((vision_model,), ("uncond",))

    def put_uncond(self, vision_model, features: torch.Tensor) -> None:
        self._store.put((vision_model,), ("uncond",), features, features.element_size() * features.nelement())

    def clear(self) -> None:
        self._store.clear()


ENCODE_CACHE = EncodeCache()
"""The process-wide cache the ComfyUI encode node uses."""
