"""What the face encoder produces per reference image, and how it is combined, saved and loaded.

Saved embeds are plain safetensors with a small metadata header, never pickles: they are meant
to be shared between users, and loading a pickle runs arbitrary code.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field

import torch

from .errors import EmbedsError
from .parsing import GROUP_ORDER, MAX_REGIONS, REGION_GROUPS

logger = logging.getLogger("consistentid")

ARCHS = ("sd15", "sdxl")
ID_DIM = 512
CLIP_TOKENS = 257
CLIP_DIM = 1280

FORMAT_TAG = "consistentid-embeds"
FORMAT_VERSION = "1"

COMBINE_METHODS = ("average", "norm_average", "first")

_FLOAT_FIELDS = ("id_embeds", "clip_embeds", "region_embeds", "uncond_clip_embeds")
_REQUIRED_TENSORS = ("id_embeds", "clip_embeds", "region_embeds", "region_valid", "uncond_clip_embeds")

EXTENSION = ".safetensors"
TEMP_PREFIX = ".tmp-"  # a save in progress, or one killed before its rename; never a finished file
NUMBER_FORMAT = "_{:05d}"
_NUMBERED_SUFFIX = NUMBER_FORMAT.format(1) + EXTENSION
_MAX_NUMBER_CLASHES = 1000


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
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=EXTENSION, dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
    except BaseException:
        _remove_quietly(tmp)
        raise
    return tmp


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
