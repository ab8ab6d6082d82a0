"""The training manifest (the official JSON list, spec §3.1) and the ArcFace embedding files.

Every entry is checked before training starts, as deeply as a training step would read it: each
image and label map fully decoded (a truncated JPEG is found here, not at the first batch that
reaches it), label maps single-channel, the size of their image and with BiSeNet's 19 labels,
each embedding loaded, of shape [1, 512] and finite, and no image listed twice.  A data set with
problems is refused with one :class:`TrainingDataError` that lists them all, instead of failing
hours into a run.  Over-long captions are not an error (training has a fallback for them) but
are reported.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import safe_open
from safetensors.numpy import save_file as save_numpy
from tqdm.auto import tqdm

from consistentid_core.constants import ID_DIM
from consistentid_core.errors import TrainingDataError
from consistentid_core.face.labels import NUM_LABELS

from .texts import DEFAULT_CAPTION, caption_issue

logger = logging.getLogger("consistentid.training")

IMAGE_FIELD = "resize_IMG"
LABELS_FIELD = "parsing_mask_IMG"
EMBED_FIELDS = ("id_embed_file_resize", "id_embed_file_origin")
CAPTION_FIELD = "vqa_llva"
FACIAL_CAPTION_FIELD = "vqa_llva_more_face_detail"
SOURCE_FIELD = "source"
EMBED_KEY = "id_embed"
LABEL_MODES = ("L", "P", "I", "I;16")


@dataclass
class Entry:
    """One training sample with absolute paths; ``embed`` None means a zero identity (official),
    ``facial_caption`` None the architecture's template."""

    index: int
    image: str
    labels: str
    embed: str | None
    caption: str
    facial_caption: str | None

    @property
    def name(self) -> str:
        return f"entry {self.index} ({os.path.basename(self.image)})"


def read_manifest(path: str) -> list[dict]:
    """A JSON list of objects (official) or JSON Lines, one object per line."""
    if not os.path.isfile(path):
        raise TrainingDataError(f"manifest not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith(".jsonl"):
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TrainingDataError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise TrainingDataError(f"{path}: a manifest is a JSON list of objects with the fields {IMAGE_FIELD}, {LABELS_FIELD}, ...")
    if not records:
        raise TrainingDataError(f"{path}: the manifest has no entries")
    return records


def _resolve(root: str, value: str) -> str:
    return os.path.normpath(os.path.join(root, os.path.expanduser(value)))


def to_entries(records: list[dict], manifest_path: str, data_root=None, parsing_root=None, faceid_root=None):
    """(entries, problems): paths resolved against the official roots (default: the manifest's folder)."""
    here = os.path.dirname(os.path.abspath(manifest_path))
    roots = {name: root or here for name, root in (("data", data_root), ("parsing", parsing_root), ("faceid", faceid_root))}
    entries, problems = [], []
    for index, record in enumerate(records):
        missing = [f for f in (IMAGE_FIELD, LABELS_FIELD) if not isinstance(record.get(f), str) or not record.get(f)]
        if missing:
            problems.append(f"entry {index}: no {' / '.join(missing)} field")
            continue
        embed_value = next((record[f] for f in EMBED_FIELDS if isinstance(record.get(f), str) and record[f]), None)
        captions = [record.get(CAPTION_FIELD, DEFAULT_CAPTION), record.get(FACIAL_CAPTION_FIELD)]
        if not isinstance(captions[0], str) or not isinstance(captions[1], (str, type(None))):
            problems.append(f"entry {index}: {CAPTION_FIELD} / {FACIAL_CAPTION_FIELD} must be text")
            continue
        entries.append(Entry(
            index=index,
            image=_resolve(roots["data"], record[IMAGE_FIELD]),
            labels=_resolve(roots["parsing"], record[LABELS_FIELD]),
            embed=_resolve(roots["faceid"], embed_value) if embed_value else None,
            caption=captions[0],
            facial_caption=captions[1],
        ))
    return entries, problems


def _decode(path: str) -> Image.Image:
    """The fully decoded image: reading only the header would miss a file cut short."""
    with Image.open(path) as img:
        img.load()
        return img


def _read_problem(entry: Entry, what: str, path: str) -> tuple[Image.Image | None, str | None]:
    if not os.path.isfile(path):
        return None, f"{entry.name}: {what} not found: {path}"
    try:
        return _decode(path), None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return None, f"{entry.name}: {what} {path} cannot be decoded ({exc}); replace the file or remove the entry"


def entry_problems(entry: Entry) -> list[str]:
    """Everything wrong with one entry's files, each read completely, as a training step reads it."""
    problems = []
    image, problem = _read_problem(entry, "image", entry.image)
    problems += [problem] if problem else []
    labels, problem = _read_problem(entry, "label map", entry.labels)
    problems += [problem] if problem else []
    if labels is not None:
        if labels.mode not in LABEL_MODES:
            problems.append(f"{entry.name}: label map {entry.labels} is a {labels.mode} image; {LABELS_FIELD} must be the "
                            "single-channel BiSeNet label PNG, not the coloured preview")
        elif image is not None and labels.size != image.size:
            problems.append(f"{entry.name}: label map {entry.labels} is {labels.size[0]}x{labels.size[1]} but the image "
                            f"is {image.size[0]}x{image.size[1]}; parse the resized image again")
        elif int(np.asarray(labels).max(initial=0)) >= NUM_LABELS:
            problems.append(f"{entry.name}: label map {entry.labels} holds label {int(np.asarray(labels).max())}; BiSeNet "
                            f"labels are 0..{NUM_LABELS - 1} (parse the image again with the 19-class face parser)")
    if entry.embed is not None:
        if not os.path.isfile(entry.embed):
            problems.append(f"{entry.name}: ID embedding not found: {entry.embed}")
        else:
            try:
                read_embedding(entry.embed)
            except TrainingDataError as exc:
                problems.append(f"{entry.name}: {exc}")
    return problems


def duplicate_problems(entries: list[Entry]) -> list[str]:
    """The same image listed twice, or one label map shared by different images (a name clash when the
    data set was made): either trains some faces twice as often, or with another face's regions."""
    problems = []
    by_image, by_labels = defaultdict(list), defaultdict(list)
    for entry in entries:
        by_image[os.path.normcase(os.path.realpath(entry.image))].append(entry)
        by_labels[os.path.normcase(os.path.realpath(entry.labels))].append(entry)
    for same in by_image.values():
        if len(same) > 1:
            problems.append(f"entries {', '.join(str(e.index) for e in same)} list the same image {same[0].image}; "
                            "keep one of them")
    for same in by_labels.values():
        images = {os.path.realpath(e.image) for e in same}
        if len(images) > 1:
            problems.append(f"entries {', '.join(str(e.index) for e in same)} share the label map {same[0].labels} "
                            "but have different images; each image needs its own label map (prepare the data again)")
    return problems


def refuse(problems: list[str], what: str, shown: int) -> None:
    """Raises one TrainingDataError listing the first ``shown`` problems, when there are any."""
    if not problems:
        return
    more = f"\n  ... and {len(problems) - shown} more" if len(problems) > shown else ""
    listing = "\n".join(f"  - {p}" for p in problems[:shown])
    raise TrainingDataError(f"{what}: {len(problems)} problem(s); fix them before training:\n{listing}{more}")


def load_entries(manifest: str, data_root=None, parsing_root=None, faceid_root=None, shown: int = 20):
    """Reads and checks the files of a whole manifest; returns its entries or raises TrainingDataError.

    Needs no model, so a broken data set is refused before anything large is loaded.  Decoding
    runs on a few threads (PIL and numpy release the GIL while they decode).
    """
    entries, problems = to_entries(read_manifest(manifest), manifest, data_root, parsing_root, faceid_root)
    problems += duplicate_problems(entries)
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        checked = pool.map(entry_problems, entries)
        for found in tqdm(checked, total=len(entries), desc="checking data set", unit="entry",
                          disable=len(entries) < 1000):
            problems.extend(found)
    refuse(problems, f"data set {manifest}", shown)
    no_embed = [e for e in entries if e.embed is None]
    if no_embed:
        logger.warning("%d of %d entries have no ID embedding and train with a zero identity (as the official "
                       "code does), e.g. %s", len(no_embed), len(entries), no_embed[0].name)
    return entries


def report_captions(entries: list[Entry], tokenizer, default_facial: str, shown: int = 20) -> list[str]:
    """Logs (and returns) the entries whose captions exceed the token limit and what training does about it."""
    seen: dict[tuple[str, str], str | None] = {}
    notes = []
    for entry in entries:
        key = (entry.caption, entry.facial_caption or default_facial)
        if key not in seen:
            seen[key] = caption_issue(*key, tokenizer)
        if seen[key]:
            notes.append(f"{entry.name}: {seen[key]}")
    if notes:
        listing = "\n".join(f"  - {n}" for n in notes[:shown])
        logger.warning("%d caption(s) are too long and use the official fallback:\n%s", len(notes), listing)
    return notes


# --- ArcFace embeddings ------------------------------------------------------------------------

def write_embedding(path: str, vector) -> None:
    """A [1, 512] float32 embedding as .npy or .safetensors (never a pickle)."""
    array = np.asarray(vector, dtype=np.float32).reshape(1, ID_DIM)
    if path.endswith(".safetensors"):
        save_numpy({EMBED_KEY: array}, path)
    else:
        np.save(path, array, allow_pickle=False)


def read_embedding(path: str) -> torch.Tensor:
    """[512] float32 from .npy, .safetensors or the official ``torch.save``d [1, 512] tensor."""
    try:
        if path.endswith(".npy"):
            value = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                keys = list(f.keys())
                value = f.get_tensor(EMBED_KEY if EMBED_KEY in keys else keys[0])
        else:
            value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # numpy, safetensors and torch each raise their own kinds on bad files
        raise TrainingDataError(f"ID embedding {path} is unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(value, torch.Tensor) or value.numel() != ID_DIM or max(value.shape, default=0) != ID_DIM:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise TrainingDataError(f"ID embedding {path} holds {shape}; expected a [1, {ID_DIM}] ArcFace embedding")
    if not value.is_floating_point():
        raise TrainingDataError(f"ID embedding {path} holds {value.dtype} numbers; an ArcFace embedding is float")
    value = value.reshape(ID_DIM).float()
    bad = int((~torch.isfinite(value)).sum())
    if bad:
        raise TrainingDataError(f"ID embedding {path} holds {bad} NaN/Inf value(s); compute the embedding again "
                                "(prepare_data writes it from the photo)")
    return value
