"""Folder layout of an evaluation: reference photos, generated images and their prompts.

References (``--references DIR``), one identity per entry::

    references/
      obama.jpg                  an identity with one photo, or
      obama/                     an identity with several photos:
        reference.jpg              the one the images were generated from (else the first by name)
        other_1.jpg                further photos of the same person (copy-paste indicator)
      class_words.json           optional: {"obama": "man", ...}; others get --class-word

Generated images (``--generated DIR``) and prompts (``--prompts FILE``), one of:

* ``prompts.txt``, or ``builtin`` for the 45 protocol prompts: one prompt per line, ``{class}``
  replaced by the identity's class word; ``# group: NAME`` lines set the group of the lines after
  them.  ``generated/<identity>/`` then holds exactly one image per prompt, in prompt order by
  natural sort of the file names (``0.png``, ``1.png``, ..., ``44.png``).
* ``manifest.json`` from ``training.make_eval_workflows``: each item's image is the ComfyUI output
  ``<output_prefix>_NNNNN_.png`` (or ``<output_prefix>.png``) under ``generated/``, i.e. point
  ``--generated`` at ComfyUI's ``output`` folder.
* ``prompts.csv`` with columns ``image,prompt`` and optionally ``identity,group``; ``image`` is a
  path under ``generated/`` whose first folder is the identity unless ``identity`` says otherwise.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import re
from dataclasses import dataclass, field

from consistentid_core.errors import EvaluationError

from .prompts import fill, protocol_prompts

logger = logging.getLogger("consistentid.evaluate")

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CLASS_WORDS_FILE = "class_words.json"
MANIFEST_FORMAT = "consistentid-eval-manifest"
BUILTIN = "builtin"


@dataclass
class Reference:
    identity: str
    path: str
    others: list[str] = field(default_factory=list)
    class_word: str = "person"


@dataclass
class Sample:
    image: str
    identity: str
    prompt: str
    group: str = ""
    seed: int | None = None


def natural_key(name: str):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def image_files(folder: str) -> list[str]:
    names = [n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTS) and not n.startswith(".")]
    return [os.path.join(folder, n) for n in sorted(names, key=natural_key)]


def load_references(folder, class_word: str = "person") -> dict[str, Reference]:
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        raise EvaluationError(f"reference folder {folder} does not exist (--references)")
    words = {}
    words_path = os.path.join(folder, CLASS_WORDS_FILE)
    if os.path.isfile(words_path):
        with open(words_path, encoding="utf-8") as fh:
            words = json.load(fh)
    refs: dict[str, Reference] = {}
    for entry in sorted(os.listdir(folder), key=natural_key):
        path = os.path.join(folder, entry)
        if os.path.isdir(path):
            photos = image_files(path)
            if not photos:
                logger.warning("reference folder %s holds no image; identity %r skipped", path, entry)
                continue
            chosen = [p for p in photos if os.path.splitext(os.path.basename(p))[0].lower() == "reference"]
            main = chosen[0] if chosen else photos[0]
            identity, others = entry, [p for p in photos if p != main]
        elif entry.lower().endswith(IMAGE_EXTS):
            identity, main, others = os.path.splitext(entry)[0], path, []
        else:
            continue
        if identity in refs:
            raise EvaluationError(f"identity {identity!r} appears twice in {folder} (a file and a folder?)")
        refs[identity] = Reference(identity, main, others, words.get(identity, class_word))
    if not refs:
        raise EvaluationError(f"reference folder {folder} holds no photos ({', '.join(IMAGE_EXTS)})")
    return refs


def read_text_prompts(path: str) -> list[tuple[str, str]]:
    """(group, template) pairs of a prompt file, or of the protocol for ``builtin``."""
    if path == BUILTIN:
        return [(p.group, p.template) for p in protocol_prompts()]
    out, group = [], ""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            match = re.match(r"#\s*group:\s*(.+)", line)
            if match:
                group = match.group(1).strip()
            elif line and not line.startswith("#"):
                out.append((group, line))
    if not out:
        raise EvaluationError(f"prompt file {path} holds no prompts")
    return out


def _text_samples(generated: str, path: str, refs: dict[str, Reference]) -> list[Sample]:
    prompts = read_text_prompts(path)
    folders = sorted(e for e in os.listdir(generated) if os.path.isdir(os.path.join(generated, e)))
    loose = [e for e in os.listdir(generated) if e.lower().endswith(IMAGE_EXTS)]
    if loose and not folders:
        raise EvaluationError(
            f"{generated} holds images directly; with a text prompt file they must sit in one folder per "
            f"identity, named like the references ({', '.join(list(refs)[:5])})"
        )
    samples = []
    for identity in folders:
        images = image_files(os.path.join(generated, identity))
        if not images:
            continue
        if len(images) != len(prompts):
            raise EvaluationError(
                f"{os.path.join(generated, identity)} holds {len(images)} images but {path} has {len(prompts)} "
                "prompts; a text prompt file needs exactly one image per prompt, in prompt order"
            )
        word = refs[identity].class_word if identity in refs else "person"
        samples += [Sample(img, identity, fill(t, word), g) for img, (g, t) in zip(images, prompts)]
    return samples


def find_output(generated: str, prefix: str) -> str | None:
    """The image ComfyUI's SaveImage wrote for ``prefix`` (the newest counter when re-run)."""
    base = os.path.join(generated, *prefix.split("/"))
    exact = [base + ext for ext in IMAGE_EXTS if os.path.isfile(base + ext)]
    numbered = sorted(glob.glob(glob.escape(base) + "_[0-9]*"), key=natural_key)
    numbered = [p for p in numbered if p.lower().endswith(IMAGE_EXTS)]
    if len(numbered) > 1:
        logger.warning("%d images for %s; using the newest, %s", len(numbered), prefix, os.path.basename(numbered[-1]))
    return numbered[-1] if numbered else (exact[0] if exact else None)


def _manifest_samples(generated: str, path: str) -> list[Sample]:
    with open(path, encoding="utf-8") as fh:
        manifest = json.load(fh)
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise EvaluationError(f"{path} is not a manifest written by training.make_eval_workflows")
    samples, missing = [], []
    for item in manifest["items"]:
        image = find_output(generated, item["output_prefix"])
        if image is None:
            missing.append(item["output_prefix"])
            continue
        samples.append(Sample(image, item["identity"], item["prompt"], item.get("group", ""), item.get("seed")))
    if missing:
        raise EvaluationError(
            f"{len(missing)} of the {len(manifest['items'])} images listed in {path} are not in {generated} "
            f"(first: {', '.join(missing[:3])}); every prompt of the manifest needs its image"
        )
    return samples


def _csv_samples(generated: str, path: str) -> list[Sample]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"image", "prompt"} <= set(rows[0]):
        raise EvaluationError(f"{path} needs the columns image and prompt (and optionally identity, group)")
    samples, missing = [], []
    for row in rows:
        image = os.path.join(generated, row["image"])
        if not os.path.isfile(image):
            missing.append(row["image"])
            continue
        identity = row.get("identity") or row["image"].replace("\\", "/").split("/")[0]
        samples.append(Sample(image, identity, row["prompt"], row.get("group") or ""))
    if missing:
        raise EvaluationError(
            f"{len(missing)} of the {len(rows)} images listed in {path} are not in {generated} "
            f"(first: {', '.join(missing[:3])})"
        )
    return samples


def collect_samples(generated, prompts, refs: dict[str, Reference]) -> list[Sample]:
    """Pair every generated image with its prompt and identity; raise on any mismatch."""
    generated = os.path.abspath(os.fspath(generated))
    if not os.path.isdir(generated):
        raise EvaluationError(f"generated-image folder {generated} does not exist (--generated)")
    prompts = os.fspath(prompts)
    if prompts != BUILTIN and not os.path.isfile(prompts):
        raise EvaluationError(f"prompt file {prompts} does not exist (--prompts: a .txt, .json manifest, .csv "
                              f"or '{BUILTIN}')")
    if prompts.lower().endswith(".json"):
        samples = _manifest_samples(generated, prompts)
    elif prompts.lower().endswith(".csv"):
        samples = _csv_samples(generated, prompts)
    else:
        samples = _text_samples(generated, prompts, refs)
    if not samples:
        raise EvaluationError(f"no generated images found in {generated} for the prompts in {prompts}")
    orphans = sorted({s.identity for s in samples if s.identity not in refs})
    if orphans:
        first = next(s.image for s in samples if s.identity == orphans[0])
        raise EvaluationError(
            f"no reference photo for identity {orphans[0]!r} (generated image {first}); the reference folder "
            f"holds {', '.join(list(refs)[:8])}" + (f" (also missing: {', '.join(orphans[1:4])})" if len(orphans) > 1 else "")
        )
    unused = [i for i in refs if i not in {s.identity for s in samples}]
    if unused:
        logger.warning("references without generated images: %s", ", ".join(unused))
    return samples
