"""ConsistentIDConditioning: the official text-only / facial / negative contexts as CONDITIONING.

The positive gets two entries with timestep ranges, text-only before ``merge_at`` and facial
after, so any stock sampler reproduces the official delayed switch (the "merge step").  With a
``mask`` both outputs are confined to that region of the picture (two people in one picture).
"""

from __future__ import annotations

from comfy_api.latest import io

from ..consistentid_core.constants import MAX_MASK_STRENGTH
from ..consistentid_core.prompt.text import resolve_caption
from .glue.inputs import CAPTION_CHOICES, MERGE_AT_TOOLTIP, merge_at_input, prompt_inputs
from .glue.text_encoding import consistentid_conditioning, mask_conditioning
from .glue.types import CATEGORY_APPLY, ConsistentIDEmbeds, ConsistentIDModel, RegionStrengthsType

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
                io.Mask.Input("mask", optional=True,
                              tooltip="where in the picture this person's prompt applies (white = yes), for two "
                                      "people in one picture: both outputs are masked as by Conditioning (Set "
                                      "Mask); combine them with the other person's and a scene prompt. Not "
                                      "connected: the whole picture"),
                io.Float.Input("mask_strength", default=1.0, min=0.0, max=MAX_MASK_STRENGTH, step=0.01, optional=True,
                               tooltip=f"strength of this prompt inside its mask, 0..{MAX_MASK_STRENGTH:g}, against "
                                       "other prompts that cover the same place (used only with mask)"),
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
                custom_caption="", region_strengths=None, mask=None, mask_strength=1.0) -> io.NodeOutput:
        chosen = resolve_caption(caption, custom_caption, consistentid.arch)
        positive, negative = consistentid_conditioning(clip, consistentid, embeds, text, negative_text, chosen, merge_at,
                                                       emphasis, region_strengths)
        if mask is not None:
            positive = mask_conditioning(positive, mask, mask_strength)
            negative = mask_conditioning(negative, mask, mask_strength)
        return io.NodeOutput(positive, negative)
