"""Evaluate generated images against reference photos: CLIP-T, CLIP-I, DINO, FaceSim, FGIS, FID.

Usage::

    python -m training.evaluate --references refs/ --generated ours=out/ConsistentID baseline=out/plain \
        --prompts manifest.json --out results/ --parser models/face_parsing.pth \
        --dino models/dino-vits16 --clip models/clip-vit-large-patch14

Folder layouts: see :mod:`training.evaluation.layout`; metric definitions: the README section
"Evaluation" and :mod:`training.evaluation.fgis`.  Each ``--generated`` folder is one row of the
table (``NAME=DIR``, or just ``DIR`` to use its folder name).  Models are read from local paths
only; a metric whose model is not given is left empty.  Writes ``results.md``, ``results.csv``,
``results.png``, ``per_image_<run>.csv`` and ``summary.json`` into ``--out``.

Importable: :func:`evaluate` does the same from Python.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
import sys

from consistentid_core.errors import EvaluationError

from .evaluation.encoders import ClipEncoder, DinoEncoder
from .evaluation.facesim import BACKENDS, load_face_model
from .evaluation.fid import MIN_IMAGES
from .evaluation.fgis import MIN_PIXELS, PARSE_SIZE
from .evaluation.layout import collect_samples, image_files, load_references
from .evaluation.report import METRICS, read_rows, write_report
from .evaluation.scoring import FID_FEATURES, Evaluator

logger = logging.getLogger("consistentid.evaluate")

PER_IMAGE_COLUMNS = ("image", "identity", "group", "seed", "prompt", "CLIP-T", "CLIP-I", "DINO", "FaceSim",
                     "face_found", "copy_paste", "FGIS", "fgis_face", "fgis_eye", "fgis_ear", "fgis_nose",
                     "fgis_lip", "missing_in_reference", "missing_in_generated")


def load_models(facesim: str = "sface", facesim_dir=None, parser=None, dino=None, clip=None, device="cpu", **options):
    """An :class:`Evaluator` with the models read from local paths (None: metric skipped)."""
    face_model = None if facesim == "none" else load_face_model(facesim, facesim_dir)
    parser_net = None
    if parser is not None:
        from consistentid_core.errors import ModelFileError
        from consistentid_core.face.parser import load_face_parser

        if not os.path.isfile(parser):
            raise EvaluationError(f"face parser file {parser} does not exist (--parser); expected the 19-class "
                                  "BiSeNet face_parsing.pth / 79999_iter.pth")
        try:
            parser_net = load_face_parser(parser, device)
        except ModelFileError as exc:
            raise EvaluationError(f"--parser {parser}: {exc}") from exc
    dino_enc = DinoEncoder.from_folder(dino, device) if dino is not None else None
    clip_enc = ClipEncoder.from_folder(clip, device) if clip is not None else None
    return Evaluator(face_model, parser_net, dino_enc, clip_enc, **options)


def _run_name(spec: str) -> tuple[str, str]:
    if "=" in spec and not os.path.isdir(spec):
        name, folder = spec.split("=", 1)
        return name.strip(), folder
    return os.path.basename(os.path.normpath(spec)), spec


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "run"


def check_run_names(names) -> None:
    """Refuses run names that would write the same per-image file ("a b" and "a_b"; "A" and "a" on
    file systems that ignore case)."""
    files: dict[str, str] = {}
    for name in names:
        key = _safe(name).casefold()
        if key in files:
            raise EvaluationError(f"runs {files[key]!r} and {name!r} would both write per_image_{_safe(name)}.csv; "
                                  "give one of them another name with NAME=DIR")
        files[key] = name


def write_per_image(records: list[dict], path: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=PER_IMAGE_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for rec in records:
            row = dict(rec)
            for key in ("missing_in_reference", "missing_in_generated"):
                row[key] = " ".join(rec.get(key, []))
            writer.writerow(row)


def evaluate(references, generated: dict[str, str], prompts, out_dir, evaluator: Evaluator,
             class_word: str = "person", fid_real=None, extra_rows=None, percent: bool = False) -> dict:
    """Score every run in ``generated`` ({name: folder}) and write the report; returns the summary."""
    check_run_names(generated)
    refs = load_references(references, class_word)
    runs = {name: collect_samples(folder, prompts, refs) for name, folder in generated.items()}
    real = None
    if fid_real is not None:
        if not os.path.isdir(fid_real):
            raise EvaluationError(f"--fid-real folder {fid_real} does not exist")
        real = image_files(fid_real)
    os.makedirs(out_dir, exist_ok=True)
    rows, summary = [], {"runs": {}, "references": {i: r.path for i, r in refs.items()}}
    for name, samples in runs.items():
        logger.info("run %s: %d images of %d identities", name, len(samples), len({s.identity for s in samples}))
        result = evaluator.evaluate(samples, refs, name, real)
        rows.append(result.row)
        write_per_image(result.per_image, os.path.join(out_dir, f"per_image_{_safe(name)}.csv"))
        summary["runs"][name] = {"row": result.row, **result.details}
    for path in extra_rows or []:
        rows += read_rows(path)
    summary["files"] = write_report(rows, out_dir, percent)
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2, default=str)
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--references", required=True, help="folder of reference photos (one file or folder per identity)")
    p.add_argument("--generated", required=True, nargs="+", metavar="[NAME=]DIR", help="one folder per run/method")
    p.add_argument("--prompts", required=True, help="prompts .txt, manifest .json, .csv, or 'builtin' (45 prompts)")
    p.add_argument("--out", required=True, help="folder for results.md/.csv/.png, per-image CSVs, summary.json")
    p.add_argument("--facesim", default="sface", choices=BACKENDS + ("none",), help="face-recognition backbone")
    p.add_argument("--facesim-dir", help="folder of the FaceSim model files (default: from the installed package)")
    p.add_argument("--parser", help="BiSeNet face parser file (face_parsing.pth), needed for FGIS")
    p.add_argument("--dino", help="local folder of DINO ViT-S/16 (transformers ViTModel), for DINO and FGIS")
    p.add_argument("--clip", help="local folder of a transformers CLIPModel with its tokenizer, for CLIP-T/I")
    p.add_argument("--class-word", default="person", help="replaces {class} in prompts (default: person)")
    p.add_argument("--fid-features", default="dino", choices=FID_FEATURES, help="feature extractor for FID")
    p.add_argument("--fid-real", help="real images for FID (default: all reference photos)")
    p.add_argument("--fid-min-images", type=int, default=MIN_IMAGES, help="FID only with at least this many images")
    p.add_argument("--parse-size", type=int, default=PARSE_SIZE, help="face-parser input size (official 512)")
    p.add_argument("--min-region-pixels", type=int, default=MIN_PIXELS, help="FGIS region presence threshold")
    p.add_argument("--extra-rows", nargs="*", default=[], help="CSV files of rows to add (earlier runs, papers)")
    p.add_argument("--percent", action="store_true", help="show similarities x100 in the table and plot")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def print_summary(summary: dict, out=None) -> None:
    out = out or sys.stdout
    with open(summary["files"]["md"], encoding="utf-8") as fh:
        print(fh.read(), file=out)
    for name, run in summary["runs"].items():
        row = run["row"]
        if row.get("no_face"):
            print(f"{name}: {row['no_face']} of {row['images']} images without a face (FaceSim 0)", file=out)
        if row.get("no_shared_region"):
            print(f"{name}: {row['no_shared_region']} images share no face region with their reference (FGIS 0)",
                  file=out)
        for side, counts in run["regions_excluded"].items():
            missing = ", ".join(f"{g} {n}x" for g, n in counts.items() if n)
            if missing:
                print(f"{name}: FGIS parts excluded, absent in the {side}: {missing}", file=out)
        skipped = [m for m in METRICS if row.get(m) is None]
        if skipped:
            print(f"{name}: not computed: {', '.join(skipped)}" + (f" ({row['fid_note']})" if row.get("fid_note")
                                                                     and "FID" in skipped else ""), file=out)
    print("written: " + ", ".join(summary["files"].values()), file=out)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        runs = dict(_run_name(spec) for spec in args.generated)
        if len(runs) != len(args.generated):
            raise EvaluationError("two --generated runs have the same name; use NAME=DIR to tell them apart")
        check_run_names(runs)  # before the models load, which takes a while
        evaluator = load_models(args.facesim, args.facesim_dir, args.parser, args.dino, args.clip, args.device,
                                parse_size=args.parse_size, min_region_pixels=args.min_region_pixels,
                                fid_features=args.fid_features, fid_min_images=args.fid_min_images)
        summary = evaluate(args.references, runs, args.prompts, args.out, evaluator, args.class_word,
                           args.fid_real, args.extra_rows, args.percent)
    except EvaluationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
