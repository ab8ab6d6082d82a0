"""Reference photo(s) -> FaceEmbeds: ArcFace ID, BiSeNet regions, CLIP ViT-H features.

One reference goes through the official steps (spec §2.2-2.4): insightface on the photo, BiSeNet
on the whole photo squashed to 512 (SD1.5) or 1280 (SDXL), the filled-contour regions with the
first-of-pair selection, full-frame region images with bicubic mask edges, and the CLIP
penultimate states of the photo and of each region.  Every reference of a batch and the
unconditional zero image are encoded in one pass of the vision model.

When a photo holds several faces, the regions are restricted to the chosen face (its box grown
by half on every side); with a single face this changes nothing, so the official behaviour holds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..constants import MAX_REGIONS, OFFICIAL_DET_SIZE, PARSE_SIZE
from ..embeds import FaceEmbeds
from ..errors import FaceNotFoundError
from ..progress import Progress, report
from .analysis import DetectedFace, detect_faces, parse_face_select, select_face, to_rgb_uint8
from .clip_features import VisionEncoder, clip_pixel_values, encode_pixels, zero_pixel_values
from .encode_cache import CacheKey, EncodeCache, EncodedReference
from .parser import parse_image
from .parsing import label_masks, region_images, select_regions

logger = logging.getLogger("consistentid")

ON_NO_FACE = ("error", "skip", "zeros")



@dataclass
class ReferenceAnalysis:
    """What was found in one reference photo; also what the preview draws."""

    source: str
    image: np.ndarray  # H x W x 3 uint8 RGB
    faces: list[DetectedFace]
    face_index: int | None  # None: no face found
    det_size: int | None
    label_map: np.ndarray  # parse resolution, uint8 labels
    regions: dict[str, np.ndarray] = field(default_factory=dict)  # kept region masks, parse resolution

    @property
    def face(self) -> DetectedFace | None:
        return None if self.face_index is None else self.faces[self.face_index]


def _restrict_to_face(regions: dict, face: DetectedFace, image_hw, parse_size) -> dict:
    h, w = image_hw
    x1, y1, x2, y2 = face.bbox
    grow_x, grow_y = (x2 - x1) * 0.5, (y2 - y1) * 0.5
    sx, sy = parse_size / w, parse_size / h
    box = np.zeros((parse_size, parse_size), dtype=np.uint8)
    top, bottom = max(0, int((y1 - grow_y) * sy)), min(parse_size, int(np.ceil((y2 + grow_y) * sy)))
    left, right = max(0, int((x1 - grow_x) * sx)), min(parse_size, int(np.ceil((x2 + grow_x) * sx)))
    box[top:bottom, left:right] = 1
    return {name: mask * box for name, mask in regions.items() if (mask * box).any()}


def analyse_reference(
    image,
    analysis,
    parser: torch.nn.Module,
    arch: str,
    face_select: str = "first",
    color_order: str = "official",
    source: str = "image",
    det_size: int | None = None,
) -> ReferenceAnalysis:
    rgb = to_rgb_uint8(image)
    how = parse_face_select(face_select)
    faces, used_size = detect_faces(analysis, rgb, det_size or OFFICIAL_DET_SIZE[arch], color_order, arch)
    index = None
    if faces:
        try:
            index = select_face(faces, how)[0]
        except FaceNotFoundError as exc:  # index:N beyond the faces found: treated like no face
            logger.warning("%s: %s", source, exc)
    parse_size = PARSE_SIZE[arch]
    labels = parse_image(parser, Image.fromarray(rgb), parse_size)
    regions = select_regions(label_masks(labels))
    if index is not None and len(faces) > 1:
        regions = _restrict_to_face(regions, faces[index], rgb.shape[:2], parse_size)
        # Restriction can empty a region; keep the official order of what is left.
    return ReferenceAnalysis(source, rgb, faces, index, used_size if faces else None, labels, regions)


def _no_face(how: str, ref: ReferenceAnalysis, position: int, total: int, face_select: str) -> None:
    where = f"image {position} of {total} ({ref.source})"
    if how == "error":
        found = f" ({len(ref.faces)} found, but face_select is {face_select})" if ref.faces else ""
        raise FaceNotFoundError(
            f"no face found in {where}{found}. Use a photo with a clearly visible face, or set on_no_face to "
            "'skip' (drop it) or 'zeros' (the official behaviour: a zero identity embedding)"
        )
    if how == "zeros":
        logger.warning("no face found in %s: using a zero identity embedding, as the official code does", where)
    else:
        logger.warning("no face found in %s: skipped", where)


def encode_references(
    images,
    analysis,
    parser: torch.nn.Module,
    vision: VisionEncoder,
    arch: str,
    face_select: str = "first",
    color_order: str = "official",
    on_no_face: str = "error",
    sources: list[str] | None = None,
    checkpoint: str = "",
    vision_name: str = "the CLIP vision model",
    cache: EncodeCache | None = None,
    vision_model=None,
    progress: Progress | None = None,
) -> tuple[FaceEmbeds, list[ReferenceAnalysis]]:
    """Encodes every reference photo; returns the embeds (one row per kept photo) and the analyses.

    With a ``cache``, photos encoded before with the same models and options are taken from it and
    only the others go through insightface, the parser and the vision model.  ``vision`` is often
    a fresh closure per call, so ``vision_model`` names the object whose identity keys the cache
    (the host's CLIP vision model); without it the cache keys on ``vision`` itself.
    ``progress`` counts one unit per photo and one for the vision pass (see :data:`Progress`).
    """
    if on_no_face not in ON_NO_FACE:
        raise ValueError(f"on_no_face must be one of {ON_NO_FACE}, got {on_no_face!r}")
    images = list(images)
    sources = sources or [f"image {i}" for i in range(len(images))]
    models = (analysis, parser, vision if vision_model is None else vision_model)
    options = (arch, face_select, color_order, on_no_face)

    results: list[EncodedReference | ReferenceAnalysis] = []
    keys: list[CacheKey | None] = []
    steps = len(images) + 1  # every photo, then the one vision pass over all of them
    for position, image in enumerate(images):
        report(progress, position, steps)
        key = cache.key(image, models, options) if cache is not None else None
        hit = cache.get(key) if key is not None else None
        if hit is not None:
            ref = hit.analysis
            results.append(hit.from_source(sources[position]))
        else:
            ref = analyse_reference(image, analysis, parser, arch, face_select, color_order, sources[position])
            results.append(ref)
        keys.append(None if hit is not None else key)
        if ref.face is None:
            _no_face(on_no_face, ref, position, len(images), face_select)
    if cache is not None:
        logger.info("face encoding: %d of %d photo(s) from the cache", sum(k is None for k in keys), len(images))

    def keeps(result) -> bool:  # a cached result knows; a new one is dropped only when skipped for no face
        if isinstance(result, EncodedReference):
            return result.kept
        return result.face is not None or on_no_face != "skip"

    if not any(keeps(r) for r in results):
        raise FaceNotFoundError(f"no face found in any of the {len(images)} reference images; nothing left to encode")

    uncond = cache.get_uncond(models[2]) if cache is not None else None
    to_encode = [i for i, r in enumerate(results) if isinstance(r, ReferenceAnalysis) and keeps(r)]
    report(progress, len(images), steps)
    if to_encode or uncond is None:
        encoded, fresh_uncond = _encode_photos([results[i] for i in to_encode], vision, vision_name, uncond is None)
        for i, enc in zip(to_encode, encoded):
            results[i] = enc
        if uncond is None:
            uncond = fresh_uncond
            if cache is not None:
                cache.put_uncond(models[2], uncond)
    for i, r in enumerate(results):
        if isinstance(r, ReferenceAnalysis):  # dropped for having no face: remembered as such
            results[i] = EncodedReference(r)
        if keys[i] is not None:
            cache.put(keys[i], results[i])

    kept = [r for r in results if r.kept]
    report(progress, steps, steps)
    return _assemble(kept, uncond, arch, checkpoint), [r.analysis for r in kept]


def _encode_photos(refs: list[ReferenceAnalysis], vision: VisionEncoder, vision_name: str, with_zero_image: bool):
    """All photos, their regions and (when asked) the zero image in one pass of the vision model."""
    pixels, layout = [], []
    for ref in refs:
        photo = Image.fromarray(ref.image)
        crops = region_images(photo, ref.regions)[:MAX_REGIONS]
        layout.append((len(pixels), len(crops)))
        pixels.append(clip_pixel_values(photo))
        pixels.extend(clip_pixel_values(crop) for crop in crops)
    parts = ([torch.stack(pixels)] if pixels else []) + ([zero_pixel_values(1)] if with_zero_image else [])
    features = encode_pixels(vision, torch.cat(parts), source=vision_name)
    encoded = []
    for ref, (start, count) in zip(refs, layout):
        emb = ref.face.normed_embedding if ref.face is not None else None
        encoded.append(EncodedReference(
            analysis=ref,
            id_embed=torch.zeros(512) if emb is None else torch.from_numpy(np.asarray(emb, np.float32)).clone(),
            # Copies, not views: a view would keep the whole batch's features alive in the cache.
            clip_embed=features[start].clone(),
            region_embeds=features[start + 1 : start + 1 + count].clone(),
            region_names=tuple(list(ref.regions)[:count]),
        ))
    return encoded, features[-1:].clone() if with_zero_image else None


def _assemble(kept: list[EncodedReference], uncond: torch.Tensor, arch: str, checkpoint: str) -> FaceEmbeds:
    region_embeds = uncond.unsqueeze(0).expand(len(kept), MAX_REGIONS, -1, -1).clone()
    region_valid = torch.zeros(len(kept), MAX_REGIONS, dtype=torch.bool)
    for row, enc in enumerate(kept):
        count = enc.region_embeds.shape[0]
        region_embeds[row, :count] = enc.region_embeds
        region_valid[row, :count] = True
    return FaceEmbeds(
        arch=arch,
        id_embeds=torch.stack([enc.id_embed for enc in kept]),
        clip_embeds=torch.stack([enc.clip_embed for enc in kept]),
        region_embeds=region_embeds,
        region_valid=region_valid,
        region_names=[list(enc.region_names) for enc in kept],
        uncond_clip_embeds=uncond.clone(),
        sources=[enc.analysis.source for enc in kept],
        checkpoint=checkpoint,
        face_found=torch.tensor([enc.analysis.face is not None for enc in kept]),
    )
