"""Per-image scores and run aggregates: FaceSim, copy-paste, FGIS, CLIP-T, CLIP-I, DINO, FID.

Every model is optional (None): the metrics that need it are left empty ("–" in the table) and
the run says so, so a run with only the face model still gives FaceSim.  Reference-side work
(face embedding, region embeddings, whole-image features) is done once per identity.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps

from consistentid_core.errors import EvaluationError
from consistentid_core.face.labels import GROUP_ORDER

from .facesim import face_similarity
from .fgis import PARTS, FGISScorer
from .fid import MIN_IMAGES, fid_or_reason
from .layout import Reference, Sample

logger = logging.getLogger("consistentid.evaluate")

FID_FEATURES = ("dino", "clip")


def load_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            # Phone photos store their rotation in EXIF; detectors need the upright face.
            return ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"cannot read image {path}: {exc}") from exc


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


@dataclass
class _RefFeatures:
    face: np.ndarray | None = None
    others: list[np.ndarray] = field(default_factory=list)
    regions: object = None
    dino: torch.Tensor | None = None
    clip: torch.Tensor | None = None


@dataclass
class RunResult:
    row: dict                 # one row of the results table (report.CSV_COLUMNS)
    per_image: list[dict]     # one dict per generated image
    details: dict             # counts and lists for summary.json


class Evaluator:
    def __init__(self, face_model=None, parser=None, dino=None, clip=None, *, parse_size: int = 512,
                 min_region_pixels: int = 16, fid_features: str = "dino", fid_min_images: int = MIN_IMAGES):
        if fid_features not in FID_FEATURES:
            raise EvaluationError(f"--fid-features must be one of {', '.join(FID_FEATURES)}, not {fid_features!r}")
        self.face_model = face_model
        self.dino = dino
        self.clip = clip
        self.fgis = FGISScorer(parser, dino, parse_size, min_region_pixels) if parser is not None and dino else None
        if parser is not None and dino is None:
            logger.warning("FGIS needs both the face parser and DINO; no DINO folder given, FGIS is skipped")
        self.fid_features = fid_features
        self.fid_min_images = fid_min_images
        self._refs: dict[str, _RefFeatures] = {}

    # --- references ---------------------------------------------------------------------------

    def _reference(self, ref: Reference) -> _RefFeatures:
        cached = self._refs.get(ref.identity)
        if cached is not None:
            return cached
        image = load_image(ref.path)
        feats = _RefFeatures()
        if self.face_model is not None:
            feats.face = self.face_model.embed(np.asarray(image))
            if feats.face is None:
                raise EvaluationError(
                    f"reference photo {ref.path}: {self.face_model.name} finds no face in it, so FaceSim would be 0 "
                    "for every image of this identity; use a photo with a clearly visible face")
            for other in ref.others:
                vector = self.face_model.embed(np.asarray(load_image(other)))
                if vector is None:
                    logger.warning("no face in %s: not used for the copy-paste indicator", other)
                else:
                    feats.others.append(vector)
        if self.fgis is not None:
            feats.regions = self.fgis.regions(image)
            logger.info("reference %s: face parts %s", ref.identity, ", ".join(feats.regions.parts) or "none")
        if self.dino is not None:
            feats.dino = self.dino.embed_images([image])[0]
        if self.clip is not None:
            feats.clip = self.clip.embed_images([image])[0]
        self._refs[ref.identity] = feats
        return feats

    # --- one image ----------------------------------------------------------------------------

    def score(self, sample: Sample, ref: Reference) -> tuple[dict, dict]:
        """(per-image record, whole-image features for FID) of one generated image."""
        feats = self._reference(ref)
        image = load_image(sample.image)
        rec: dict = {"image": sample.image, "identity": sample.identity, "group": sample.group,
                     "prompt": sample.prompt, "seed": sample.seed}
        if self.face_model is not None:
            vector = self.face_model.embed(np.asarray(image))
            rec["face_found"] = vector is not None
            rec["FaceSim"] = face_similarity(feats.face, vector)
            if vector is not None and feats.others:
                to_others = np.mean([face_similarity(o, vector) for o in feats.others])
                rec["copy_paste"] = rec["FaceSim"] - float(to_others)
        if self.fgis is not None:
            result = self.fgis.compare(feats.regions, self.fgis.regions(image))
            rec["FGIS"] = result.score
            rec["fgis_shared"] = result.shared
            rec.update({f"fgis_{g}": v for g, v in result.per_region.items()})
            rec["missing_in_reference"] = result.missing_in_reference
            rec["missing_in_generated"] = result.missing_in_generated
        features = {}
        if self.dino is not None:
            features["dino"] = self.dino.embed_images([image])[0]
            rec["DINO"] = float(torch.dot(feats.dino, features["dino"]))
        if self.clip is not None:
            features["clip"] = self.clip.embed_images([image])[0]
            rec["CLIP-I"] = float(torch.dot(feats.clip, features["clip"]))
            rec["CLIP-T"] = float(torch.dot(self.clip.embed_texts([sample.prompt])[0], features["clip"]))
        return rec, features

    # --- a run --------------------------------------------------------------------------------

    def _real_features(self, paths: list[str]) -> np.ndarray | None:
        encoder = self.dino if self.fid_features == "dino" else self.clip
        if encoder is None:
            return None
        images = [load_image(p) for p in paths]
        return encoder.embed_images(images).numpy()

    def evaluate(self, samples: list[Sample], refs: dict[str, Reference], name: str,
                 fid_real: list[str] | None = None) -> RunResult:
        records, gen_features = [], []
        for i, sample in enumerate(samples):
            if sample.identity not in refs:
                raise EvaluationError(f"no reference photo for identity {sample.identity!r} ({sample.image})")
            rec, features = self.score(sample, refs[sample.identity])
            records.append(rec)
            gen_features.append(features.get(self.fid_features))
            if (i + 1) % 20 == 0 or i + 1 == len(samples):
                logger.info("%s: scored %d/%d images", name, i + 1, len(samples))
        row, details = self._aggregate(records, name)
        real_paths = fid_real if fid_real is not None else [p for r in refs.values() for p in [r.path, *r.others]]
        row["FID"], row["fid_note"] = self._fid(gen_features, real_paths)
        return RunResult(row, records, details)

    def _fid(self, gen_features: list, real_paths: list[str]) -> tuple[float | None, str]:
        if any(f is None for f in gen_features):
            return None, f"FID needs the {self.fid_features.upper()} encoder (--{self.fid_features})"
        if len(gen_features) < max(self.fid_min_images, 2):
            return None, f"only {len(gen_features)} generated images (--fid-min-images {self.fid_min_images})"
        real = self._real_features(real_paths)
        value, note = fid_or_reason(torch.stack(gen_features).numpy(), real, self.fid_min_images)
        return value, (f"{self.fid_features} features, {len(gen_features)} vs {len(real)} images"
                       + (f"; {note}" if note else ""))

    def _aggregate(self, records: list[dict], name: str) -> tuple[dict, dict]:
        def column(key):
            return [r.get(key) for r in records]

        no_face = [r["image"] for r in records if r.get("face_found") is False]
        no_shared = [r["image"] for r in records if r.get("fgis_shared") is False]
        excluded = {side: {p: sum(p in r.get(f"missing_in_{side}", []) for r in records) for p in PARTS}
                    for side in ("reference", "generated")}
        copies = [v for v in column("copy_paste") if v is not None]
        row = {
            "method": name,
            "CLIP-T": _mean(column("CLIP-T")), "CLIP-I": _mean(column("CLIP-I")), "DINO": _mean(column("DINO")),
            "FaceSim": _mean(column("FaceSim")), "FGIS": _mean(column("FGIS")),
            "images": len(records), "identities": len({r["identity"] for r in records}),
            "no_face": len(no_face) if self.face_model is not None else None,
            "no_shared_region": len(no_shared) if self.fgis is not None else None,
            "copy_paste": _mean(copies), "copy_paste_images": len(copies),
            "facesim_model": getattr(self.face_model, "name", ""),
            "dino_model": getattr(self.dino, "name", ""), "clip_model": getattr(self.clip, "name", ""),
            "fid_features": self.fid_features if (self.dino if self.fid_features == "dino" else self.clip) else "",
        }
        row.update({f"fgis_{g}": _mean(column(f"fgis_{g}")) for g in GROUP_ORDER})
        if no_face:
            logger.warning("%s: %d of %d generated images have no face (FaceSim 0): %s", name, len(no_face),
                           len(records), ", ".join(os.path.basename(p) for p in no_face[:5]))
        for side, counts in excluded.items():
            if any(counts.values()):
                logger.info("%s: FGIS parts excluded as absent in the %s: %s", name, side,
                            ", ".join(f"{g} x{n}" for g, n in counts.items() if n))
        by_group = {}
        for group in sorted({r["group"] for r in records if r["group"]}):
            chosen = [r for r in records if r["group"] == group]
            by_group[group] = {m: _mean(r.get(m) for r in chosen) for m in ("CLIP-T", "FaceSim", "FGIS")}
        details = {"no_face_images": no_face, "no_shared_region_images": no_shared,
                   "regions_excluded": excluded, "by_prompt_group": by_group}
        return row, details
