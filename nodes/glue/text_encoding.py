"""The prompt side on ComfyUI's CLIP: its tokenizers and encoder, emphasis weights, and the
official text-only / facial / negative contexts as CONDITIONING entries with timestep ranges."""

from __future__ import annotations

import copy
import logging
import math
import weakref

from ...consistentid_core.constants import DEFAULT_MERGE_AT, MAX_MASK_STRENGTH
from ...consistentid_core.errors import ArchitectureMismatchError, PromptError
from ...consistentid_core.model.adapter import check_embeds, check_text_encoder
from ...consistentid_core.model.id_attention import normalise_mask
from ...consistentid_core.prompt.conditioning import build_conditioning, warn_facial_prompt_unused
from ...consistentid_core.prompt.emphasis import strip_emphasis
from ...consistentid_core.prompt.text import CAPTION_SD15

logger = logging.getLogger("consistentid")

PHASE_KEY = "consistentid_phase"  # marks our entries so ConsistentIDKSampler can re-time them
_second_tokenizers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def clip_tokenizers(clip):
    """(HF tokenizer of CLIP-L, HF tokenizer of bigG with the official "!" padding, or None)."""
    tok = clip.tokenizer
    first = getattr(getattr(tok, "clip_l", None), "tokenizer", None)
    if first is None:
        raise ArchitectureMismatchError("this CLIP is neither SD1.5's nor SDXL's text encoder; ConsistentID needs one of them")
    second_owner = getattr(getattr(tok, "clip_g", None), "tokenizer", None)
    if second_owner is None:
        return first, None
    second = _second_tokenizers.get(second_owner)
    if second is None:
        second = copy.deepcopy(second_owner)
        second.pad_token = "!"  # diffusers' SDXL tokenizer_2 pads with "!" (id 0)
        _second_tokenizers[second_owner] = second
    return first, second


def comfy_text_encoder(clip):
    def encode(tokens):
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        return cond, pooled

    return encode


def emphasis_weights(clip, original: str, plain: str):
    """Per-token weights from ComfyUI's own parser where its tokens equal the official ones."""

    def weights(text: str, which: str, ids: list[int]):
        weighted = text.replace(plain, original, 1) if plain in text else text
        chunks = clip.tokenize(weighted).get(which)
        if not chunks:
            return None
        theirs = chunks[0]
        if [int(t[0]) for t in theirs[: len(ids)]] != list(ids):
            logger.warning("emphasis could not be mapped onto the official tokens of %r; reading it literally", original)
            return None
        return [float(t[1]) for t in theirs[: len(ids)]]

    return weights


def consistentid_conditioning(clip, ckpt, embeds, text, negative_text, caption=CAPTION_SD15,
                              merge_at=DEFAULT_MERGE_AT, emphasis="literal (official)", strengths=None):
    """(positive, negative) CONDITIONING lists."""
    if not 0.0 <= merge_at <= 1.0:
        raise PromptError(f"merge_at must be between 0 and 1, got {merge_at}")
    if merge_at >= 1.0:
        warn_facial_prompt_unused(f"merge_at is {merge_at} (the facial entry starts at the very end)")
    check_embeds(ckpt, embeds)
    first, second = clip_tokenizers(clip)
    check_text_encoder(ckpt, is_sdxl_text_encoder=second is not None)
    weight_fn = None
    prompt, negative = text, negative_text
    if emphasis.startswith("comfy"):
        prompt, negative = strip_emphasis(text), strip_emphasis(negative_text)
        weights_pos = emphasis_weights(clip, text, prompt)
        weights_neg = emphasis_weights(clip, negative_text, negative)
        weight_fn = lambda t, which, ids: (weights_neg if t == negative else weights_pos)(t, which, ids)  # noqa: E731
    out = build_conditioning(
        ckpt.facial_encoder, embeds, prompt, negative, first, comfy_text_encoder(clip), caption,
        tokenizer_2=second, weight_fn=weight_fn, strengths=strengths,
    )
    for i, fp in enumerate(out.prompts):
        logger.info("facial prompt %d: %r (%d facial tokens)", i, fp.text, fp.num_facial_tokens)

    def entry(cond, pooled, extra):
        info = dict(extra)
        if pooled is not None:
            info["pooled_output"] = pooled
        return [cond, info]

    positive = [
        entry(out.text_only, out.pooled_text_only, {"start_percent": 0.0, "end_percent": merge_at, PHASE_KEY: "text"}),
        entry(out.facial, out.pooled_facial, {"start_percent": merge_at, "end_percent": 1.0, PHASE_KEY: "facial"}),
    ]
    negative_cond = [entry(out.negative, out.pooled_negative, {})]
    return positive, negative_cond


def mask_conditioning(conditioning, mask, strength: float = 1.0):
    """Copies of the entries confined to ``mask``, with the keys ComfyUI's Conditioning (Set Mask) sets
    (``mask`` [M, H, W], ``mask_strength``, ``set_area_to_bounds`` False); every other key, the
    start/end_percent of the text-only and facial entries included, is kept.  The input entries
    are not changed: a sampler combines the masked entries of several people with any others.
    """
    if not math.isfinite(float(strength)) or not 0.0 <= strength <= MAX_MASK_STRENGTH:
        raise PromptError(f"mask_strength is {strength}; it must lie in 0..{MAX_MASK_STRENGTH:g}")
    mask = normalise_mask(mask, "mask")
    out = []
    for cond, info in conditioning:
        info = dict(info)
        info.update(mask=mask, set_area_to_bounds=False, mask_strength=float(strength))
        out.append([cond, info])
    return out
