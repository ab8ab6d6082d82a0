"""Text conditioning of ConsistentID: text-only, facial and facial-fused negative embeddings (spec §2.6, §4).

The text encoder is the host's: a callable that takes ``{"l": [[(id, weight), ...77]], "g": ...}``
(ComfyUI's token-weight format) and returns ``(hidden states [1,77,E], pooled or None)``.  The
token ids are built here with the official logic, so prompts are read literally as the official
code does; a host may pass per-token weights to honour its emphasis syntax.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..embeds import FaceEmbeds
from ..constants import DEFAULT_MERGE_AT, OFFICIAL_MERGE_STEP, OFFICIAL_STEPS  # noqa: F401 (re-exported)
from ..errors import PromptError
from ..model.networks import FacialEncoder
from .region_control import RegionStrengths, blend_facial_tokens
from .text import IMAGE_MARKER, MAX_REGIONS, FacialPrompt, build_facial_prompt, plain_ids, second_encoder_ids

logger = logging.getLogger("consistentid")

TokenWeights = list[tuple[int, float]]
TextEncoder = Callable[[dict], tuple[torch.Tensor, torch.Tensor | None]]
WeightFn = Callable[[str, str, list[int]], list[float] | None]  # (text, "l" | "g", ids) -> weights

@dataclass
class ConditioningSet:
    """Per identity row r: the three contexts of the official pipeline, each [N, 77, E]."""

    text_only: torch.Tensor
    facial: torch.Tensor
    negative: torch.Tensor
    pooled_text_only: torch.Tensor | None
    pooled_facial: torch.Tensor | None
    pooled_negative: torch.Tensor | None
    prompts: list[FacialPrompt]


def _pairs(ids: Sequence[int], weights: Sequence[float] | None = None) -> list[TokenWeights]:
    weights = weights if weights is not None else [1.0] * len(ids)
    return [[(int(i), float(w)) for i, w in zip(ids, weights)]]


class _Encoder:
    """Memoises the host encoder by token ids: the negative and text-only prompts are shared by all rows."""

    def __init__(self, encode: TextEncoder, weight_fn: WeightFn | None):
        self.encode, self.weight_fn, self.memo = encode, weight_fn, {}

    def __call__(self, text: str, ids_l: list[int], ids_g: list[int] | None = None):
        key = (tuple(ids_l), tuple(ids_g) if ids_g is not None else None)
        if key not in self.memo:
            weigh = self.weight_fn or (lambda _text, _which, _ids: None)
            tokens = {"l": _pairs(ids_l, weigh(text, "l", ids_l))}
            if ids_g is not None:
                tokens["g"] = _pairs(ids_g, weigh(text, "g", ids_g))
            cond, pooled = self.encode(tokens)
            self.memo[key] = (cond.float().cpu(), None if pooled is None else pooled.float().cpu())
        return self.memo[key]


def _region_slots(embeds: FaceEmbeds, row: int, prompt: FacialPrompt) -> list[int]:
    names = embeds.region_names[row]
    return [names.index(name) for name in prompt.parts[: prompt.num_facial_tokens]]


def _fuse(encoder: FacialEncoder, context: torch.Tensor, regions: torch.Tensor, slots: list[int], prompt: FacialPrompt):
    """FacialEncoder over one row: ``regions`` [5, 257, 1280] reordered so slot i feeds marked token i."""
    parts = torch.zeros(1, MAX_REGIONS, *regions.shape[1:], dtype=regions.dtype)
    for i, slot in enumerate(slots):
        parts[0, i] = regions[slot]
    token_mask = torch.tensor([prompt.token_mask], dtype=torch.bool)
    valid = torch.tensor([prompt.valid_mask(MAX_REGIONS)], dtype=torch.bool)
    dtype = encoder.fuse_module.layer_norm.weight.dtype
    with torch.no_grad():
        out = encoder(context.to(dtype), parts.to(dtype), token_mask, valid)
    return out.float()


def build_conditioning(
    facial_encoder: FacialEncoder,
    embeds: FaceEmbeds,
    prompt: str,
    negative_prompt: str,
    tokenizer,
    encode: TextEncoder,
    caption: str,
    tokenizer_2=None,
    weight_fn: WeightFn | None = None,
    strengths: RegionStrengths | None = None,
) -> ConditioningSet:
    """The official contexts for every identity row of ``embeds``.

    SD1.5: text-only = the whole facial prompt without markers; facial = FacialEncoder over the
    clean ids.  SDXL (``tokenizer_2`` given, whose pad token must be "!"): text-only = the raw
    prompt; the bigG half sees the literal ``<|facial|>`` pieces (the official quirk).  The
    negative is fused with the zero-image region features at the positive's token positions.
    ``strengths`` moves each fused token back toward its plain text token (FlexID-style control).
    """
    arch = embeds.arch
    if (arch == "sdxl") != (tokenizer_2 is not None):
        raise PromptError(f"{arch} conditioning needs {'two tokenizers' if arch == 'sdxl' else 'one tokenizer'}")
    if facial_encoder.embed_dim != {"sd15": 768, "sdxl": 2048}[arch]:
        raise PromptError(f"the FacialEncoder is {facial_encoder.embed_dim}-wide, {arch} embeds need another ConsistentID file")
    run = _Encoder(encode, weight_fn)
    second = (lambda text: plain_ids(text, tokenizer_2, (IMAGE_MARKER,))) if tokenizer_2 is not None else (lambda text: None)

    negative_length = len(tokenizer(negative_prompt, truncation=False, verbose=False)["input_ids"])
    if negative_length > 77:
        logger.warning(
            "the negative prompt is %d tokens; like the official pipeline, only its first 77 are used", negative_length
        )
    negative, pooled_negative = run(negative_prompt, plain_ids(negative_prompt, tokenizer), second(negative_prompt))
    rows = {"text_only": [], "facial": [], "negative": [], "pooled_text_only": [], "pooled_facial": []}
    prompts = []
    uncond_regions = embeds.uncond_region_embeds[0]
    for r in range(embeds.num_references):
        fp = build_facial_prompt(prompt, embeds.region_names[r], tokenizer, caption=caption, arch=arch)
        prompts.append(fp)
        if tokenizer_2 is None:
            clean, pooled_facial = run(fp.text_only, fp.input_ids)
            text_only, pooled_text = run(fp.text_only, plain_ids(fp.text_only, tokenizer))
        else:
            clean, pooled_facial = run(fp.text_only, fp.input_ids, second_encoder_ids(fp, tokenizer_2))
            text_only, pooled_text = run(prompt, plain_ids(prompt, tokenizer), second(prompt))
        slots = _region_slots(embeds, r, fp)
        used = fp.num_facial_tokens
        blend = lambda plain, fused: blend_facial_tokens(  # noqa: E731
            plain, fused, fp.token_positions[:used], fp.parts[:used], strengths or RegionStrengths())
        rows["facial"].append(blend(clean, _fuse(facial_encoder, clean, embeds.region_embeds[r].float(), slots, fp)))
        rows["negative"].append(blend(negative, _fuse(facial_encoder, negative, uncond_regions.float(), slots, fp)))
        rows["text_only"].append(text_only)
        rows["pooled_text_only"].append(pooled_text)
        rows["pooled_facial"].append(pooled_facial)
        if fp.truncated:
            logger.info("prompt row %d: the facial prompt was cut to 77 tokens (as the official code does)", r)

    def cat(name):
        items = rows[name]
        return None if items[0] is None else torch.cat(items)

    n = embeds.num_references
    return ConditioningSet(
        text_only=cat("text_only"),
        facial=cat("facial"),
        negative=cat("negative"),
        pooled_text_only=cat("pooled_text_only"),
        pooled_facial=cat("pooled_facial"),
        pooled_negative=None if pooled_negative is None else pooled_negative.repeat(n, 1),
        prompts=prompts,
    )


def merge_fraction(sigmas: Sequence[float], merge_step: int, percent_of_sigma: Callable[[float], float]) -> float:
    """The timestep-range boundary that makes steps 0..merge_step text-only and later steps facial.

    ``sigmas`` is the schedule of the sampler (steps + 1 values, the last 0).  A first-order
    sampler evaluates step i at ``sigmas[i]``; the boundary is put strictly between
    ``sigmas[merge_step]`` and ``sigmas[merge_step + 1]`` so that no step sees both entries.
    ``percent_of_sigma`` is the inverse of the host's ``percent_to_sigma``.
    """
    steps = len(sigmas) - 1
    if steps < 1:
        raise PromptError("the sampler schedule has no steps")
    if not 0 <= merge_step < steps:
        raise PromptError(f"merge_step must be between 0 and {steps - 1} for {steps} steps, got {merge_step}")
    if merge_step == steps - 1:
        warn_facial_prompt_unused(f"merge_step {merge_step} is the last of {steps} step(s), which makes merge_at 1.0")
        return 1.0
    hi, lo = float(sigmas[merge_step]), float(sigmas[merge_step + 1])
    mid = math.sqrt(hi * lo) if lo > 0 else hi / 2
    merge_at = min(1.0, max(0.0, float(percent_of_sigma(mid))))
    if merge_at >= 1.0:
        warn_facial_prompt_unused(f"merge_step {merge_step} of {steps} steps falls at the end of the schedule, "
                                  "which makes merge_at 1.0")
    return merge_at


def warn_facial_prompt_unused(why: str) -> None:
    """Logs that the facial prompt (the fused facial tokens) will never be used, and what to do."""
    logger.warning(
        "%s, so the facial prompt is never used and only the text-only prompt (plus the ID "
        "tokens) conditions the image. Use more steps or an earlier merge step (official: after step %d of %d, "
        "merge_at %g with the normal scheduler)", why, OFFICIAL_MERGE_STEP, OFFICIAL_STEPS, DEFAULT_MERGE_AT,
    )
