"""ConsistentIDConditioning: the official text-only / facial / negative contexts as CONDITIONING.

The positive gets two entries with timestep ranges, text-only before ``merge_at`` and facial
after, so any stock sampler reproduces the official delayed switch (the "merge step").
"""

from __future__ import annotations

from comfy_api.latest import io

from ..consistentid_core.prompt.text import resolve_caption
from .glue.inputs import CAPTION_CHOICES, MERGE_AT_TOOLTIP, merge_at_input, prompt_inputs
from .glue.text_encoding import consistentid_conditioning
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
