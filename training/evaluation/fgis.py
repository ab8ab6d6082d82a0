"""FGIS, the fine-grained identity similarity of the ConsistentID paper, as this project defines it.

The paper proposes FGIS but never released its code (issue #68 upstream) or formula, so the exact
definition used here is:

1. **Parsing.**  Each image (reference and generated, separately) is parsed by the same 19-class
   BiSeNet that ConsistentID conditions on, with the official pre-processing
   (:func:`consistentid_core.face.parser.parse_image`: the whole frame squashed to 512x512).
2. **Parts.**  ``label_masks`` turns the label map into filled-contour masks (as the pipeline
   does).  The eight parts of the official key list are kept, *both* members of each pair (Face,
   Left_Eye, Right_Eye, Left_Ear, Right_Ear, Nose, Upper_Lip, Lower_Lip), unlike the pipeline's
   first-of-pair choice, because a metric should see both eyes.  They form the five region
   groups face / eye / ear / nose / lip.
3. **Disjoint masks.**  The filled face contour encloses eyes, nose and mouth; every pixel is
   given to one part only, parts of the groups eye, nose, lip, ear, face taking pixels in that
   order.  So "face" means skin, brows and the face outline without the parts scored on their own,
   and a change confined to one group's pixels moves exactly that group's score.
4. **Presence.**  A part is present in an image when its disjoint mask keeps at least
   ``min_pixels`` pixels (default 16) at parse resolution.
5. **Crops.**  Per part: the mask is resized to the image with nearest neighbour; the image is
   multiplied by it (black outside the part), cut to the mask's bounding box widened to a centred
   square (black where the square leaves the frame), and resized to 224x224 (bicubic).  Each eye,
   ear and lip is cropped on its own, so a crop is not mostly the black gap between two ears.
6. **Embedding.**  DINO ViT-S/16 (transformers ``ViTModel`` layout of ``facebook/dino-vits16``),
   the CLS token after the final LayerNorm, ImageNet normalisation.
7. **Score.**  Per part: cosine of the two CLS vectors (not clamped), for the parts present in
   *both* images.  Per region group: the mean over its shared parts.  Per image pair (FGIS): the
   mean over the groups with at least one shared part, so the five groups weigh equally.  Parts
   present in only one image are left out and reported.  A pair with no shared part scores 0
   (counted and reported, like FaceSim's 0 for a missing face).  The run's FGIS is the mean over
   its images; per-group means are over the pairs where that group was shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from PIL import Image

from consistentid_core.face.labels import GROUP_ORDER, region_group
from consistentid_core.face.parser import parse_image
from consistentid_core.face.parsing import label_masks

PARSE_SIZE = 512
MIN_PIXELS = 16
# The official key list in slot (ascending-label) order, both members of every pair.
PARTS = ("Face", "Left_Eye", "Right_Eye", "Left_Ear", "Right_Ear", "Nose", "Upper_Lip", "Lower_Lip")
# Small parts first: the pixels they share with the enclosing face contour are theirs.
PRIORITY = ("eye", "nose", "lip", "ear", "face")


def part_masks(label_map: np.ndarray, min_pixels: int = MIN_PIXELS) -> dict[str, np.ndarray]:
    """Disjoint boolean masks (parse resolution) of the parts present, in PARTS order."""
    filled = {name: mask > 0 for name, mask in label_masks(label_map).items() if name in PARTS}
    taken = np.zeros(label_map.shape, dtype=bool)
    kept: dict[str, np.ndarray] = {}
    for group in PRIORITY:
        for name in PARTS:
            if name in filled and region_group(name) == group:
                own = filled[name] & ~taken
                taken |= own
                if int(own.sum()) >= min_pixels:
                    kept[name] = own
    return {name: kept[name] for name in PARTS if name in kept}


def group_masks(label_map: np.ndarray, min_pixels: int = MIN_PIXELS) -> dict[str, np.ndarray]:
    """Union of the present parts of each group (face, eye, ear, nose, lip), in GROUP_ORDER."""
    groups: dict[str, np.ndarray] = {}
    for name, mask in part_masks(label_map, min_pixels).items():
        group = region_group(name)
        groups[group] = groups[group] | mask if group in groups else mask
    return {g: groups[g] for g in GROUP_ORDER if g in groups}


def to_image_size(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Boolean mask at parse resolution -> boolean mask of ``size`` = (width, height)."""
    w, h = size
    if mask.shape == (h, w):
        return mask
    return cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0


def region_crop(image: np.ndarray, mask: np.ndarray) -> Image.Image:
    """The masked square crop around ``mask`` (same H, W as the uint8 RGB ``image``)."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = max(y1 - y0, x1 - x0)
    top, left = (y0 + y1 - side) // 2, (x0 + x1 - side) // 2
    canvas = np.zeros((side, side, 3), dtype=np.uint8)
    h, w = mask.shape
    sy0, sx0 = max(top, 0), max(left, 0)
    sy1, sx1 = min(top + side, h), min(left + side, w)
    window = image[sy0:sy1, sx0:sx1] * mask[sy0:sy1, sx0:sx1, None]
    canvas[sy0 - top:sy1 - top, sx0 - left:sx1 - left] = window
    return Image.fromarray(canvas)


@dataclass
class RegionEmbeddings:
    """DINO CLS vectors of the present parts of one image."""

    vectors: dict[str, torch.Tensor]
    pixels: dict[str, int] = field(default_factory=dict)  # disjoint-mask area at parse resolution

    @property
    def parts(self) -> list[str]:
        return list(self.vectors)


@dataclass
class FGISResult:
    score: float                       # mean over groups with a shared part, 0 when none is shared
    per_region: dict[str, float]       # group -> mean cosine of its shared parts
    per_part: dict[str, float]         # part -> cosine, shared parts only
    missing_in_reference: list[str]    # parts present in the generated image only
    missing_in_generated: list[str]    # parts present in the reference only

    @property
    def shared(self) -> bool:
        return bool(self.per_region)


class FGISScorer:
    """Parses, crops and embeds face regions; compares two images' region embeddings."""

    def __init__(self, parser: torch.nn.Module, dino, parse_size: int = PARSE_SIZE, min_pixels: int = MIN_PIXELS):
        self.parser = parser
        self.dino = dino
        self.parse_size = parse_size
        self.min_pixels = min_pixels

    def label_map(self, image: Image.Image) -> np.ndarray:
        return parse_image(self.parser, image, self.parse_size)

    def regions(self, image: Image.Image, label_map: np.ndarray | None = None) -> RegionEmbeddings:
        image = image if image.mode == "RGB" else image.convert("RGB")
        if label_map is None:
            label_map = self.label_map(image)
        rgb = np.asarray(image)
        crops, names, pixels = [], [], {}
        for name, mask in part_masks(label_map, self.min_pixels).items():
            full = to_image_size(mask, image.size)
            # A part that vanishes when scaled to a tiny image has nothing to crop.
            if full.any():
                crops.append(region_crop(rgb, full))
                names.append(name)
                pixels[name] = int(mask.sum())
        vectors = self.dino.embed_squares(crops) if crops else torch.zeros(0)
        return RegionEmbeddings({g: vectors[i] for i, g in enumerate(names)}, pixels)

    @staticmethod
    def compare(reference: RegionEmbeddings, generated: RegionEmbeddings) -> FGISResult:
        ref, gen = reference.vectors, generated.vectors
        per_part = {p: float(torch.dot(ref[p], gen[p])) for p in PARTS if p in ref and p in gen}
        per_region = {}
        for group in GROUP_ORDER:
            shared = [v for p, v in per_part.items() if region_group(p) == group]
            if shared:
                per_region[group] = float(np.mean(shared))
        return FGISResult(
            score=float(np.mean(list(per_region.values()))) if per_region else 0.0,
            per_region=per_region,
            per_part=per_part,
            missing_in_reference=[p for p in PARTS if p in gen and p not in ref],
            missing_in_generated=[p for p in PARTS if p in ref and p not in gen],
        )
