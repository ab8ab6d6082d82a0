"""What the face encoder produces per reference image, and how several are concatenated and combined."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..constants import ARCHS, CLIP_TOKENS, ID_DIM, MAX_REGIONS
from ..constants import CLIP_WIDTH as CLIP_DIM
from ..errors import EmbedsError
from ..face.labels import GROUP_ORDER, REGION_GROUPS

logger = logging.getLogger("consistentid")


FORMAT_TAG = "consistentid-embeds"
FORMAT_VERSION = "1"

COMBINE_METHODS = ("average", "norm_average", "first")

_FLOAT_FIELDS = ("id_embeds", "clip_embeds", "region_embeds", "uncond_clip_embeds")
_REQUIRED_TENSORS = ("id_embeds", "clip_embeds", "region_embeds", "region_valid", "uncond_clip_embeds")



def _shape_str(shape) -> str:
    return "[" + ",".join(str(s) for s in shape) + "]"


@dataclass
class FaceEmbeds:
    """Per-reference face features.

    ``id_embeds`` [N,512]: ArcFace ``normed_embedding`` (zeros where no face was found and the
    zeros fallback was chosen).  ``clip_embeds`` [N,257,1280]: CLIP ViT-H penultimate hidden
    states of the whole image.  ``region_embeds`` [N,5,257,1280]: the same for the region images,
    padded to 5 slots; ``region_valid`` [N,5] marks the real ones, which come first, and
    ``region_names`` names them in slot order.  ``uncond_clip_embeds`` [1,257,1280]: features of
    the all-zero normalised (CLIP-mean) image, which is also the unconditional region input.
    """

    arch: str
    id_embeds: torch.Tensor
    clip_embeds: torch.Tensor
    region_embeds: torch.Tensor
    region_valid: torch.Tensor
    region_names: list[list[str]]
    uncond_clip_embeds: torch.Tensor
    sources: list[str]
    checkpoint: str = ""
    face_found: torch.Tensor | None = field(default=None)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise EmbedsError(f"FaceEmbeds.arch is {self.arch!r}; expected one of {', '.join(ARCHS)}.")
        for name in _FLOAT_FIELDS + ("region_valid",):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise EmbedsError(f"FaceEmbeds.{name} must be a tensor, got {type(value).__name__}.")
        n = self.id_embeds.shape[0] if self.id_embeds.ndim >= 1 else 0
        if n < 1:
            raise EmbedsError(
                f"FaceEmbeds.id_embeds has shape {_shape_str(self.id_embeds.shape)}; "
                "it must hold at least one reference."
            )
        expected = {
            "id_embeds": (n, ID_DIM),
            "clip_embeds": (n, CLIP_TOKENS, CLIP_DIM),
            "region_embeds": (n, MAX_REGIONS, CLIP_TOKENS, CLIP_DIM),
            "region_valid": (n, MAX_REGIONS),
            "uncond_clip_embeds": (1, CLIP_TOKENS, CLIP_DIM),
        }
        for name, shape in expected.items():
            found = tuple(getattr(self, name).shape)
            if found != shape:
                raise EmbedsError(
                    f"FaceEmbeds.{name} has shape {_shape_str(found)}, expected {_shape_str(shape)} "
                    f"(N={n} references)."
                )
        for name in _FLOAT_FIELDS:
            dtype = getattr(self, name).dtype
            if not dtype.is_floating_point:
                raise EmbedsError(f"FaceEmbeds.{name} has dtype {dtype}, expected a floating-point dtype.")
        if self.region_valid.dtype != torch.bool:
            raise EmbedsError(f"FaceEmbeds.region_valid has dtype {self.region_valid.dtype}, expected torch.bool.")
        if self.face_found is not None:
            if not isinstance(self.face_found, torch.Tensor):
                raise EmbedsError(f"FaceEmbeds.face_found must be a tensor or None, got {type(self.face_found).__name__}.")
            if tuple(self.face_found.shape) != (n,) or self.face_found.dtype != torch.bool:
                raise EmbedsError(
                    f"FaceEmbeds.face_found has shape {_shape_str(self.face_found.shape)} and dtype "
                    f"{self.face_found.dtype}, expected [{n}] torch.bool."
                )
        self._check_lists(n)

    def _check_lists(self, n: int) -> None:
        if not isinstance(self.sources, list) or len(self.sources) != n \
                or not all(isinstance(s, str) for s in self.sources):
            raise EmbedsError(f"FaceEmbeds.sources must be a list of {n} strings, got {self.sources!r}.")
        if not isinstance(self.checkpoint, str):
            raise EmbedsError(f"FaceEmbeds.checkpoint must be a string, got {type(self.checkpoint).__name__}.")
        if not isinstance(self.region_names, list) or len(self.region_names) != n:
            raise EmbedsError(
                f"FaceEmbeds.region_names must be a list of {n} lists, got {self.region_names!r}."
            )
        valid = self.region_valid.cpu()
        for i, names in enumerate(self.region_names):
            if not isinstance(names, list) or not all(isinstance(s, str) for s in names):
                raise EmbedsError(f"FaceEmbeds.region_names[{i}] must be a list of strings, got {names!r}.")
            count = int(valid[i].sum())
            # Names are matched to slots by position, so the real slots must be the leading ones.
            if not bool(valid[i, :count].all()):
                raise EmbedsError(
                    f"FaceEmbeds.region_valid[{i}] is {valid[i].int().tolist()}; "
                    "the valid slots must come first."
                )
            if len(names) != count:
                raise EmbedsError(
                    f"FaceEmbeds.region_names[{i}] has {len(names)} names but region_valid[{i}] "
                    f"marks {count} slots."
                )
            groups = []
            for name in names:
                if name not in REGION_GROUPS:
                    raise EmbedsError(
                        f"FaceEmbeds.region_names[{i}] contains {name!r}; known regions: "
                        f"{', '.join(REGION_GROUPS)}."
                    )
                groups.append(REGION_GROUPS[name])
            if len(set(groups)) != len(groups):
                raise EmbedsError(
                    f"FaceEmbeds.region_names[{i}] is {names}; at most one region per group "
                    "(face, eye, ear, nose, lip) is allowed."
                )

    # --- basics ---

    @property
    def num_references(self) -> int:
        return int(self.id_embeds.shape[0])

    @property
    def uncond_region_embeds(self) -> torch.Tensor:
        """[1,5,257,1280]: the zero-image features in every region slot."""
        return self.uncond_clip_embeds.unsqueeze(1).expand(1, MAX_REGIONS, CLIP_TOKENS, CLIP_DIM)

    def _replace(self, **changes) -> FaceEmbeds:
        values = {
            "arch": self.arch,
            "id_embeds": self.id_embeds,
            "clip_embeds": self.clip_embeds,
            "region_embeds": self.region_embeds,
            "region_valid": self.region_valid,
            "region_names": [list(r) for r in self.region_names],
            "uncond_clip_embeds": self.uncond_clip_embeds,
            "sources": list(self.sources),
            "checkpoint": self.checkpoint,
            "face_found": self.face_found,
        }
        values.update(changes)
        return FaceEmbeds(**values)

    def to(self, device=None, dtype: torch.dtype | None = None) -> FaceEmbeds:
        """A copy on ``device``; ``dtype`` applies to the feature tensors only, masks stay bool."""
        changes = {name: getattr(self, name).to(device=device, dtype=dtype) for name in _FLOAT_FIELDS}
        changes["region_valid"] = self.region_valid.to(device=device)
        if self.face_found is not None:
            changes["face_found"] = self.face_found.to(device=device)
        return self._replace(**changes)

    def select(self, indices) -> FaceEmbeds:
        """The references at ``indices`` (0-based, in the given order, repeats allowed)."""
        if isinstance(indices, int):
            indices = [indices]
        indices = [int(i) for i in indices]
        n = self.num_references
        if not indices:
            raise EmbedsError("No reference selected; choose at least one index.")
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise EmbedsError(f"Reference index {bad[0]} is out of range; these embeds hold {n} (0..{n - 1}).")
        idx = torch.tensor(indices, dtype=torch.long)

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, idx.to(t.device))

        return self._replace(
            id_embeds=pick(self.id_embeds),
            clip_embeds=pick(self.clip_embeds),
            region_embeds=pick(self.region_embeds),
            region_valid=pick(self.region_valid),
            region_names=[list(self.region_names[i]) for i in indices],
            sources=[self.sources[i] for i in indices],
            face_found=None if self.face_found is None else pick(self.face_found),
        )

    @classmethod
    def concat(cls, items: list[FaceEmbeds]) -> FaceEmbeds:
        return concat_embeds(items)

    def combine(self, method: str) -> FaceEmbeds:
        return combine_embeds(self, method)


# --- concat ------------------------------------------------------------------------------------

def concat_embeds(items: list[FaceEmbeds]) -> FaceEmbeds:
    """All references of ``items`` in order, on the device and dtypes of the first.

    Every item must have the same arch.  The unconditional features are taken from the first
    item; items whose unconditional features differ clearly were made with another CLIP vision
    model and are refused.  The checkpoint tag is kept when all non-empty tags agree, otherwise
    it becomes "".  A missing ``face_found`` counts as "face found".
    """
    items = list(items)
    if not items:
        raise EmbedsError("Nothing to concatenate: no face embeds were given.")
    for i, item in enumerate(items):
        if not isinstance(item, FaceEmbeds):
            raise EmbedsError(f"Input {i} is a {type(item).__name__}, not face embeds.")
    first = items[0]
    for i, item in enumerate(items[1:], start=1):
        if item.arch != first.arch:
            raise EmbedsError(
                f"Cannot combine face embeds made for {first.arch} with embeds made for {item.arch} "
                f"(input {i}); encode all references for the same model."
            )
        ref = first.uncond_clip_embeds.detach().float().cpu()
        other = item.uncond_clip_embeds.detach().float().cpu()
        # fp16 versus fp32 encoding moves these by far less than 5%; another model moves them wholesale.
        rel = float((ref - other).norm() / ref.norm().clamp_min(1e-12))
        if rel > 0.05:
            raise EmbedsError(
                f"Face embeds input {i} was made with a different CLIP vision model than input 0 "
                f"(unconditional features differ by {rel:.1%}); encode all references with the same one."
            )
    if len(items) == 1:
        return first._replace()

    device = first.id_embeds.device

    def cat(name: str) -> torch.Tensor:
        ref = getattr(first, name)
        return torch.cat([getattr(e, name).to(device=device, dtype=ref.dtype) for e in items])

    tags = {e.checkpoint for e in items if e.checkpoint}
    if len(tags) > 1:
        logger.warning("Concatenated face embeds were made for different checkpoints: %s", sorted(tags))
    checkpoint = tags.pop() if len(tags) == 1 else ""
    if all(e.face_found is None for e in items):
        face_found = None
    else:
        face_found = torch.cat([
            (e.face_found if e.face_found is not None
             else torch.ones(e.num_references, dtype=torch.bool)).to(device)
            for e in items
        ])
    return first._replace(
        id_embeds=cat("id_embeds"),
        clip_embeds=cat("clip_embeds"),
        region_embeds=cat("region_embeds"),
        region_valid=torch.cat([e.region_valid.to(device) for e in items]),
        region_names=[list(names) for e in items for names in e.region_names],
        sources=[s for e in items for s in e.sources],
        checkpoint=checkpoint,
        face_found=face_found,
    )


# --- combine -----------------------------------------------------------------------------------

def _norm_average(x: torch.Tensor, unit: bool = False) -> torch.Tensor:
    norms = x.norm(dim=-1, keepdim=True)
    directions = x / norms.clamp_min(1e-12)
    mean_dir = directions.mean(dim=0)
    mean_dir = mean_dir / mean_dir.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if unit:
        return mean_dir
    return mean_dir * norms.mean(dim=0)


def _reduce(x: torch.Tensor, method: str, unit: bool = False) -> torch.Tensor:
    """Combine along dim 0 in float32; returns the result without the reference dim."""
    xf = x.float()
    if method == "average":
        return xf.mean(dim=0)
    if x.shape[0] == 1 and not unit:
        # The mean of one vector is itself; skip the normalise/rescale round trip and its rounding.
        return xf[0]
    return _norm_average(xf, unit=unit)


def combine_embeds(embeds: FaceEmbeds, method: str) -> FaceEmbeds:
    """Merge all references into one (N=1).

    - ``first``: reference 0 unchanged.
    - ``average``: arithmetic mean over references of ``id_embeds`` and ``clip_embeds``.
    - ``norm_average``: per vector (last dim, i.e. per token for CLIP states), the mean of the
      L2-normalised vectors, normalised again and scaled to the mean of the original norms:
      ``normalize(mean_i(x_i / |x_i|)) * mean_i(|x_i|)``.  For ``id_embeds`` the result is left at
      unit length, as ArcFace embeddings are unit vectors.  Zero vectors (no face found) add no
      direction but do count in the mean norm.

    Regions are combined per group (face, eye, ear, nose, lip; left and right of one pair are the
    same group) over only the references that have that group, with the same method, so a
    reference without visible ears does not dilute the ears.  Output slots hold the groups present
    in any reference in the canonical order face, eye, ear, nose, lip, each named as in the first
    reference that has it; remaining slots hold the zero-image features, like official padding.
    All arithmetic is float32, cast back to the input dtype.
    """
    if method not in COMBINE_METHODS:
        raise EmbedsError(f"Unknown combine method {method!r}; choose one of {', '.join(COMBINE_METHODS)}.")
    if method == "first":
        return embeds.select([0])

    n = embeds.num_references
    if embeds.face_found is not None and not bool(embeds.face_found.all()):
        missing = [embeds.sources[i] for i in range(n) if not bool(embeds.face_found[i])]
        logger.warning(
            "Combining %d references of which %d had no face (zero ID embedding): %s",
            n, len(missing), ", ".join(missing),
        )

    id_out = _reduce(embeds.id_embeds, method, unit=(method == "norm_average"))
    clip_out = _reduce(embeds.clip_embeds, method)

    valid = embeds.region_valid.cpu()
    members: dict[str, list[tuple[int, int]]] = {}
    first_name: dict[str, str] = {}
    for r, names in enumerate(embeds.region_names):
        for slot, name in enumerate(names):
            if not bool(valid[r, slot]):
                continue
            group = REGION_GROUPS[name]
            members.setdefault(group, []).append((r, slot))
            first_name.setdefault(group, name)

    region_dtype = embeds.region_embeds.dtype
    device = embeds.region_embeds.device
    regions = embeds.uncond_clip_embeds.to(device).float().expand(MAX_REGIONS, CLIP_TOKENS, CLIP_DIM).clone()
    out_valid = torch.zeros(1, MAX_REGIONS, dtype=torch.bool, device=device)
    out_names: list[str] = []
    for group in GROUP_ORDER:
        if group not in members:
            continue
        slot = len(out_names)
        stacked = torch.stack([embeds.region_embeds[r, s] for r, s in members[group]])
        regions[slot] = _reduce(stacked, method)
        out_valid[0, slot] = True
        out_names.append(first_name[group])

    if embeds.face_found is None:
        face_found = None
    else:
        face_found = embeds.face_found.any().reshape(1)
    source = f"{method} of {n}: " + ", ".join(embeds.sources)
    return embeds._replace(
        id_embeds=id_out.unsqueeze(0).to(embeds.id_embeds.dtype),
        clip_embeds=clip_out.unsqueeze(0).to(embeds.clip_embeds.dtype),
        region_embeds=regions.unsqueeze(0).to(region_dtype),
        region_valid=out_valid,
        region_names=[out_names],
        sources=[source],
        face_found=face_found,
    )


