"""Decoupled control with the released weights: regions from other photos, per-region strengths.

* ``mix_regions`` takes the region features of one region group (face shape, eyes, ears, nose,
  mouth) from another photo's embeds, so each facial token can come from a different person or
  photo while the global identity (ArcFace + CLIP of the identity photo) stays.
* ``RegionStrengths`` blends each facial token between the plain text token (0) and the fused
  one (1); ``region_scale`` scales all of them, independently of the ID-token weight of the
  model patch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..embeds import FaceEmbeds
from ..errors import EmbedsError, PromptError
from ..face.labels import GROUP_ORDER, region_group

logger = logging.getLogger("consistentid")

GROUP_LABELS = {"face": "face shape", "eye": "eyes", "ear": "ears", "nose": "nose", "lip": "mouth"}


def _slot_of_group(embeds: FaceEmbeds, row: int, group: str) -> int | None:
    for slot, name in enumerate(embeds.region_names[row]):
        if region_group(name) == group:
            return slot
    return None


def mix_regions(identity: FaceEmbeds, donors: dict[str, FaceEmbeds]) -> FaceEmbeds:
    """``identity`` with the features of each ``donors[group]`` region (group in face/eye/ear/nose/lip).

    Donors must have one reference (combine them first) and the region; the identity keeps its
    slot order, and a region the identity photo lacks is added in the official slot order.
    """
    unknown = sorted(set(donors) - set(GROUP_ORDER))
    if unknown:
        raise PromptError(f"unknown region group(s) {unknown}; use {list(GROUP_ORDER)}")
    regions = identity.region_embeds.clone()
    valid = identity.region_valid.clone()
    names = [list(n) for n in identity.region_names]
    for group, donor in donors.items():
        if donor.arch != identity.arch:
            raise EmbedsError(f"the {GROUP_LABELS[group]} photo was encoded for {donor.arch}, the identity for {identity.arch}")
        if donor.num_references != 1:
            raise EmbedsError(f"the {GROUP_LABELS[group]} embeds hold {donor.num_references} photos; combine them to one first")
        source = _slot_of_group(donor, 0, group)
        if source is None:
            raise EmbedsError(
                f"the {GROUP_LABELS[group]} photo ({donor.sources[0]}) has no {GROUP_LABELS[group]} region: "
                "the face parser found none there; use another photo or leave that input empty"
            )
        for row in range(identity.num_references):
            target = _slot_of_group(identity, row, group)
            if target is None:
                names[row], target = _insert_slot(names[row], donor.region_names[0][source])
                regions[row, target + 1:] = regions[row, target:-1].clone()
                valid[row, target + 1:] = valid[row, target:-1].clone()
                valid[row, target] = True
            else:
                names[row][target] = donor.region_names[0][source]
            regions[row, target] = donor.region_embeds[0, source].to(regions.dtype)
    sources = [f"{s} (+ {', '.join(GROUP_LABELS[g] + ' from ' + d.sources[0] for g, d in donors.items())})"
               for s in identity.sources] if donors else list(identity.sources)
    return FaceEmbeds(
        arch=identity.arch, id_embeds=identity.id_embeds, clip_embeds=identity.clip_embeds, region_embeds=regions,
        region_valid=valid, region_names=names, uncond_clip_embeds=identity.uncond_clip_embeds, sources=sources,
        checkpoint=identity.checkpoint, face_found=identity.face_found,
    )


def _insert_slot(names: list[str], new: str) -> tuple[list[str], int]:
    order = {g: i for i, g in enumerate(GROUP_ORDER)}
    position = sum(1 for n in names if order[region_group(n)] < order[region_group(new)])
    if len(names) >= 5:
        raise EmbedsError("all 5 region slots are in use")
    return names[:position] + [new] + names[position:], position


@dataclass(frozen=True)
class RegionStrengths:
    per_group: dict = field(default_factory=lambda: {g: 1.0 for g in GROUP_ORDER})
    region_scale: float = 1.0

    def __post_init__(self):
        for group, value in {**self.per_group, "all regions": self.region_scale}.items():
            if not 0.0 <= float(value) <= 1.0:
                raise PromptError(f"the strength of {GROUP_LABELS.get(group, group)} must be between 0 and 1, got {value}")

    def for_part(self, name: str) -> float:
        return float(self.per_group.get(region_group(name), 1.0)) * float(self.region_scale)

    @property
    def is_identity(self) -> bool:
        return self.region_scale == 1.0 and all(float(v) == 1.0 for v in self.per_group.values())


def blend_facial_tokens(plain: torch.Tensor, fused: torch.Tensor, positions: list[int], parts: list[str],
                        strengths: RegionStrengths) -> torch.Tensor:
    """[1, 77, E]: fused tokens at ``positions`` moved back toward the plain text tokens by their strengths."""
    if strengths.is_identity:
        return fused
    out = fused.clone()
    for position, name in zip(positions, parts):
        s = strengths.for_part(name)
        out[:, position] = (1.0 - s) * plain[:, position] + s * fused[:, position]
    return out
