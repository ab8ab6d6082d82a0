"""Turn a folder of face photos into a training set in the official manifest format.

    python -m training.prepare_data --input photos/ --output data/ \\
        --insightface models/insightface --parser models/consistentid/face_parsing.pth [--captions captions.jsonl]

Per photo: the 512 px square (shortest side resized, centre crop), its BiSeNet label map, the
ArcFace embedding of the first detected face (buffalo_l on BGR input at det 640, as the official
data script), and the captions.  Photos without a face, unreadable or too small ones are skipped
and counted.  Every outcome is appended to ``prepare_log.jsonl``, so an interrupted run picks up
where it stopped; ``manifest.json`` is written at the end.

Output files are named after the source path ("a/b.jpg" -> "a__b_jpg"); sources whose names would
clash ("a/b.jpg" and "a__b.jpg", "a.b/c.jpg" and "a_b/c.jpg") get a short hash of their path
added, so that no photo overwrites another one's files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from consistentid_core.errors import ConsistentIDError, InputImageError, TrainingDataError
from consistentid_core.face.analysis import detect_faces, face_id_embedding, find_insightface_model_dir
from consistentid_core.face.analysis import get_face_analysis, select_face
from consistentid_core.face.parser import load_face_parser
from consistentid_core.face.parser import parse_image

from .dataset import square_fit
from .disk import write_errors
from .manifest import CAPTION_FIELD, EMBED_FIELDS, FACIAL_CAPTION_FIELD, IMAGE_FIELD, LABELS_FIELD, SOURCE_FIELD
from .manifest import write_embedding
from .texts import DEFAULT_CAPTION, DEFAULT_FACIAL_CAPTION

logger = logging.getLogger("consistentid.training")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
SIZE = 512
DET_SIZE = 640
LOG_FILE = "prepare_log.jsonl"
MANIFEST_FILE = "manifest.json"
SKIP_REASONS = ("unreadable", "tiny", "no face")


class Skip(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass
class PrepareReport:
    manifest: str
    prepared: int = 0
    reused: int = 0
    skipped: dict[str, list[str]] = field(default_factory=lambda: {r: [] for r in SKIP_REASONS})

    @property
    def total_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def summary(self) -> str:
        parts = ", ".join(f"{reason} {len(files)}" for reason, files in self.skipped.items() if files)
        skipped = f"skipped {self.total_skipped} ({parts})" if parts else "skipped 0"
        return f"prepared {self.prepared + self.reused} images ({self.reused} from an earlier run), {skipped} -> {self.manifest}"


def list_images(folder: str) -> list[str]:
    """Image files under ``folder`` (recursively), as sorted paths relative to it."""
    if not os.path.isdir(folder):
        raise TrainingDataError(f"input folder not found: {folder}")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.relpath(os.path.join(root, f), folder) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def read_captions(path: str) -> dict[str, dict]:
    """{file: {"caption", "facial_caption"}} from JSON Lines, a JSON list of objects, or a JSON {file: caption} map."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        data = [json.loads(line) for line in text.splitlines() if line.strip()] if path.endswith(".jsonl") else json.loads(text)
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainingDataError(f"captions file {path} cannot be read ({exc})") from exc
    if isinstance(data, dict):
        data = [{"file": k, **(v if isinstance(v, dict) else {"caption": v})} for k, v in data.items()]
    captions = {}
    for i, item in enumerate(data if isinstance(data, list) else []):
        if not isinstance(item, dict) or not isinstance(item.get("file"), str):
            raise TrainingDataError(f"captions file {path}: item {i} has no \"file\" name: {str(item)[:80]}")
        values = {k: item[k] for k in ("caption", "facial_caption") if item.get(k) is not None}
        if not all(isinstance(v, str) for v in values.values()):
            raise TrainingDataError(f"captions file {path}: the captions of {item['file']} must be text")
        captions[os.path.normpath(item["file"])] = values
    if not isinstance(data, list):
        raise TrainingDataError(f"captions file {path} must hold a list of {{\"file\", \"caption\", \"facial_caption\"}} objects")
    return captions


def output_name(relative: str) -> str:
    """A flat file stem for a source path: "a/b.jpg" -> "a__b_jpg" (not unique: see :func:`output_names`)."""
    return relative.replace(os.sep, "__").replace("/", "__").replace(".", "_")


def _path_hash(relative: str) -> str:
    return hashlib.sha1(relative.replace(os.sep, "/").encode("utf-8")).hexdigest()[:8]


def output_names(sources: list[str], taken: dict[str, str] | None = None) -> dict[str, str]:
    """{source: file stem}, one distinct stem per source.

    A stem that two sources share, or that ``taken`` ({stem: source} of files an earlier run
    wrote) gives to another source, gets the hash of the source path appended; the names of
    sources without a clash stay as they always were.
    """
    used = dict(taken or {})
    plain = {source: output_name(source) for source in sources}
    counts = Counter(plain.values())
    names = {}
    for source in sources:
        stem = plain[source]
        if counts[stem] > 1 or used.get(stem, source) != source:
            stem = f"{stem}-{_path_hash(source)}"
        if used.get(stem, source) != source:  # a hash clash (or a file named like a hashed stem)
            raise TrainingDataError(f"{source} and {used[stem]} both map to the output name {stem}; rename one of them")
        used[stem] = source
        names[source] = stem
    return names


def load_photo(path: str, min_side: int) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            image = ImageOps.exif_transpose(img).convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as exc:
        raise Skip("unreadable", f"not a readable image ({type(exc).__name__}: {exc})") from exc
    if min(image.size) < min_side:
        raise Skip("tiny", f"{image.width}x{image.height} px; at least {min_side} px on the short side are needed")
    return image


def analyse(image: Image.Image, analysis, parser, det_size: int, face_select: str):
    """(512 px square, label map, ArcFace embedding) of one photo, or Skip."""
    square = square_fit(image, SIZE, Image.LANCZOS)
    rgb = np.asarray(square)
    try:
        faces, _ = detect_faces(analysis, rgb, det_size, color_order="bgr", arch="sd15")
    except InputImageError as exc:
        raise Skip("unreadable", str(exc)) from exc
    if not faces:
        raise Skip("no face", "no face found")
    _, face = select_face(faces, face_select)
    return square, parse_image(parser, square, SIZE), face_id_embedding(face)


class _Log:
    """prepare_log.jsonl: one JSON line per processed photo; the last line of a photo wins."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOG_FILE)
        self.records: dict[str, dict] = {}
        if os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by an interruption
                    self.records[record["source"]] = record

    def add(self, record: dict) -> None:
        self.records[record["source"]] = record
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def written(self) -> dict[str, str]:
        """{file stem: source} of the finished photos, leaving out files that several sources claim
        (an earlier version gave clashing photos one name: whichever was written last is in them)."""
        owners: dict[str, set[str]] = {}
        for source, record in self.records.items():
            if record.get("status") == "ok":
                for path in record["files"].values():
                    owners.setdefault(path, set()).add(source)
        shared = {source for claimants in owners.values() if len(claimants) > 1 for source in claimants}
        for source in sorted(shared):
            logger.warning("%s shares its prepared files with another photo (a name clash of an earlier run): "
                           "it is prepared again", source)
            del self.records[source]
        return {os.path.splitext(os.path.basename(r["files"]["image"]))[0]: s
                for s, r in self.records.items() if r.get("status") == "ok"}


def prepare_dataset(input_dir: str, output_dir: str, analysis, parser, captions: dict | None = None, *,
                    arch: str = "sd15", min_side: int = 256, det_size: int = DET_SIZE, face_select: str = "first",
                    image_format: str = "jpg", retry_skipped: bool = False, progress: bool = True) -> PrepareReport:
    """Prepares every photo of ``input_dir`` into ``output_dir``; see the module docstring."""
    sources = list_images(input_dir)
    for sub in ("images", "parsing", "id_embeds"):
        os.makedirs(os.path.join(output_dir, sub), exist_ok=True)
    log = _Log(output_dir)
    names = output_names(sources, log.written())
    report = PrepareReport(os.path.join(output_dir, MANIFEST_FILE))
    for source in tqdm(sources, desc="preparing", unit="photo", disable=not progress):
        done = log.records.get(source)
        if done and done["status"] == "ok" and all(os.path.isfile(os.path.join(output_dir, p)) for p in done["files"].values()):
            report.reused += 1
            continue
        if done and done["status"] == "skipped" and not retry_skipped:
            report.skipped[done["reason"]].append(source)
            continue
        stem = names[source]
        files = {"image": f"images/{stem}.{image_format}", "labels": f"parsing/{stem}.png", "embed": f"id_embeds/{stem}.npy"}
        try:
            image = load_photo(os.path.join(input_dir, source), min_side)
            square, labels, embedding = analyse(image, analysis, parser, det_size, face_select)
        except Skip as skip:
            logger.warning("skipped %s: %s", source, skip)
            report.skipped[skip.reason].append(source)
            log.add({"source": source, "status": "skipped", "reason": skip.reason, "detail": str(skip)})
            continue
        with write_errors(f"the prepared files of {source}", output_dir,
                          advice="free space there and run prepare_data again: it continues where it stopped"):
            square.save(os.path.join(output_dir, files["image"]), **({"quality": 95} if image_format == "jpg" else {}))
            Image.fromarray(labels).save(os.path.join(output_dir, files["labels"]))
            write_embedding(os.path.join(output_dir, files["embed"]), embedding)
            log.add({"source": source, "status": "ok", "files": files})
        report.prepared += 1
    write_manifest(output_dir, sources, log.records, captions or {}, DEFAULT_FACIAL_CAPTION[arch])
    if not report.prepared + report.reused:
        raise TrainingDataError(f"no usable photo in {input_dir}: {report.summary()}")
    return report


def write_manifest(output_dir: str, sources: list[str], records: dict, captions: dict, facial_default: str) -> None:
    entries = []
    for source in sources:
        record = records.get(source)
        if not record or record["status"] != "ok":
            continue
        given = captions.get(os.path.normpath(source)) or captions.get(os.path.basename(source)) or {}
        entries.append({
            SOURCE_FIELD: source,
            IMAGE_FIELD: record["files"]["image"],
            LABELS_FIELD: record["files"]["labels"],
            EMBED_FIELDS[0]: record["files"]["embed"],
            CAPTION_FIELD: given.get("caption", DEFAULT_CAPTION),
            FACIAL_CAPTION_FIELD: given.get("facial_caption", facial_default),
        })
    unused = set(captions) - {os.path.normpath(s) for s in sources} - {os.path.basename(s) for s in sources}
    if unused:
        logger.warning("%d caption(s) name no photo of the input folder, e.g. %s", len(unused), sorted(unused)[0])
    path = os.path.join(output_dir, MANIFEST_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(entries, f, indent=1, ensure_ascii=False)
    os.replace(path + ".tmp", path)


def _insightface_dir(path: str, name: str) -> str:
    if os.path.isdir(path) and any(f.endswith(".onnx") for f in os.listdir(path)):
        return path
    return find_insightface_model_dir([path], name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.prepare_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="folder of face photos (searched recursively)")
    parser.add_argument("--output", required=True, help="data set folder to write (resumable)")
    parser.add_argument("--insightface", required=True, help="insightface folder holding models/buffalo_l, or the buffalo_l folder")
    parser.add_argument("--insightface-model", default="buffalo_l", help="model pack name (default buffalo_l)")
    parser.add_argument("--parser", required=True, help="BiSeNet face parser file (face_parsing.pth / 79999_iter.pth)")
    parser.add_argument("--captions", help="captions file: JSON Lines or JSON list of {file, caption, facial_caption}")
    parser.add_argument("--arch", default="sd15", choices=sorted(DEFAULT_FACIAL_CAPTION), help="picks the default facial caption")
    parser.add_argument("--min-side", type=int, default=256, help="skip photos whose short side is smaller (px)")
    parser.add_argument("--det-size", type=int, default=DET_SIZE, help="face detection size (official data: 640)")
    parser.add_argument("--face-select", default="first", help="first (official), largest, highest_score or index:N")
    parser.add_argument("--image-format", default="jpg", choices=("jpg", "png"))
    parser.add_argument("--device", default="cpu", help="device of the face parser (cpu, cuda, ...)")
    parser.add_argument("--providers", default="auto", help="onnxruntime provider for insightface (auto, CPU, CUDA, ...)")
    parser.add_argument("--retry-skipped", action="store_true", help="try photos again that an earlier run skipped")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        analysis = get_face_analysis(_insightface_dir(args.insightface, args.insightface_model), args.providers)
        face_parser = load_face_parser(args.parser, args.device)
        captions = read_captions(args.captions) if args.captions else None
        report = prepare_dataset(args.input, args.output, analysis, face_parser, captions, arch=args.arch,
                                 min_side=args.min_side, det_size=args.det_size, face_select=args.face_select,
                                 image_format=args.image_format, retry_skipped=args.retry_skipped)
    except ConsistentIDError as exc:
        logger.error("%s", exc)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
