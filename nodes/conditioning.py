"""ConsistentIDConditioning: the official text-only / facial / negative contexts as CONDITIONING.

The positive gets two entries with timestep ranges, text-only before ``merge_at`` and facial
after, so any stock sampler reproduces the official delayed switch (the "merge step").
"""

from __future__ import annotations

import copy
import logging
import weakref

from comfy_api.latest import io

from ..consistentid_core.conditioning import (
    DEFAULT_MERGE_AT, OFFICIAL_MERGE_STEP, OFFICIAL_STEPS, build_conditioning, warn_facial_prompt_unused,
)
from ..consistentid_core.emphasis import strip_emphasis
from ..consistentid_core.layers import ARCH_LABEL
from ..consistentid_core.errors import ArchitectureMismatchError, PromptError
from ..consistentid_core.text import CAPTION_SD15, CAPTION_SD15_OLD, CAPTION_SDXL
from .apply import check_embeds
from .types import CATEGORY_APPLY, ConsistentIDEmbeds, ConsistentIDModel, RegionStrengthsType

logger = logging.getLogger("consistentid")

CAPTIONS = {
    "official SD1.5": CAPTION_SD15,
    "official SD1.5 (before 2024-08, HF Space)": CAPTION_SD15_OLD,
    "official SDXL": CAPTION_SDXL,
}
CAPTION_CHOICES = ["auto", *CAPTIONS, "custom"]
DEFAULT_PROMPT = "A man, in a forest, adventuring"
DEFAULT_NEGATIVE = "monochrome, lowres, bad anatomy, worst quality, low quality, blurry"


def prompt_inputs() -> list:
    """The text and negative_text widgets, shared by the split and the one-box nodes."""
    return [
        io.String.Input("text", multiline=True, default=DEFAULT_PROMPT,
                        tooltip="the prompt, e.g. 'A man, in a forest, adventuring'; the facial caption is "
                                "appended to it, and a prompt too long for 77 tokens is cut"),
        io.String.Input("negative_text", multiline=True, default=DEFAULT_NEGATIVE,
                        tooltip="read literally as the official code does; only the first 77 tokens count"),
    ]


def merge_at_input(tooltip: str):
    """The merge_at widget, with the one default every node uses (consistentid_core.conditioning)."""
    return io.Float.Input("merge_at", default=DEFAULT_MERGE_AT, min=0.0, max=1.0, step=0.01, tooltip=tooltip)


MERGE_AT_TOOLTIP = (f"fraction of sampling after which the facial prompt replaces the text-only one (0..1); "
                    f"{DEFAULT_MERGE_AT:g} = the official switch after step {OFFICIAL_MERGE_STEP} of {OFFICIAL_STEPS} "
                    "with the normal scheduler. For an exact step with any scheduler, link ConsistentID Merge Step here")

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


def resolve_caption(choice: str, custom: str, arch: str) -> str:
    if choice == "auto":
        return CAPTION_SDXL if arch == "sdxl" else CAPTION_SD15
    if choice == "custom":
        if not custom.strip():
            raise PromptError("caption is 'custom' but custom_caption is empty")
        return custom
    return CAPTIONS[choice]


def consistentid_conditioning(clip, ckpt, embeds, text, negative_text, caption=CAPTION_SD15,
                              merge_at=DEFAULT_MERGE_AT, emphasis="literal (official)", strengths=None):
    """(positive, negative) CONDITIONING lists."""
    if not 0.0 <= merge_at <= 1.0:
        raise PromptError(f"merge_at must be between 0 and 1, got {merge_at}")
    if merge_at >= 1.0:
        warn_facial_prompt_unused(f"merge_at is {merge_at} (the facial entry starts at the very end)")
    check_embeds(ckpt, embeds)
    first, second = clip_tokenizers(clip)
    if (second is not None) != (ckpt.arch == "sdxl"):
        raise ArchitectureMismatchError(
            f"{ckpt.name} is for {ARCH_LABEL[ckpt.arch]} but the CLIP is {'SDXL' if second is not None else 'SD1.5'}'s"
        )
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


class ConsistentIDConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentIDConditioning",
            display_name="ConsistentID Conditioning",
            category=CATEGORY_APPLY,
            description="Encodes the prompt with the facial caption; the facial tokens take over at merge_at "
                        "(official: after step 30 of 50). Use 'ConsistentID Merge Step' for an exact step.",
            inputs=[
                io.Clip.Input("clip", tooltip="the text encoder of the checkpoint (SD1.5 or SDXL, matching the "
                                              "ConsistentID weights)"),
                ConsistentIDModel.Input("consistentid", tooltip="from Load ConsistentID Weights: its facial "
                                                                "encoder fuses the regions into the prompt"),
                ConsistentIDEmbeds.Input("embeds", tooltip="from Encode Face, Load/Combine Embeds or Regions "
                                                           "From Other Photos"),
                *prompt_inputs(),
                io.Combo.Input("caption", options=CAPTION_CHOICES, default="auto",
                               tooltip="the facial caption appended to the prompt; auto = the official one for the model"),
                merge_at_input(MERGE_AT_TOOLTIP),
                io.Combo.Input("emphasis", options=["literal (official)", "comfy (word:1.2)"], default="literal (official)",
                               tooltip="literal: brackets are text, as the official code reads them; comfy: ComfyUI weights"),
                io.String.Input("custom_caption", default="", optional=True,
                                tooltip="used when caption is 'custom'; must name face, eyes, ears, nose, mouth"),
                RegionStrengthsType.Input("region_strengths", optional=True,
                                          tooltip="from ConsistentID Region Strengths; all 1.0 when not connected"),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive",
                                       tooltip="text-only before merge_at, facial after; to KSampler's positive "
                                               "(or to KSampler (ConsistentID merge step))"),
                io.Conditioning.Output(display_name="negative",
                                       tooltip="the negative prompt with the official facial-fused tokens; to "
                                               "KSampler's negative"),
            ],
        )

    @classmethod
    def execute(cls, clip, consistentid, embeds, text, negative_text, caption, merge_at, emphasis,
                custom_caption="", region_strengths=None) -> io.NodeOutput:
        chosen = resolve_caption(caption, custom_caption, consistentid.arch)
        positive, negative = consistentid_conditioning(clip, consistentid, embeds, text, negative_text, chosen, merge_at,
                                                       emphasis, region_strengths)
        return io.NodeOutput(positive, negative)
