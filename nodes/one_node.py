"""ConsistentIDApply: model patch and conditioning in one node, for people who want one box."""

from __future__ import annotations

from comfy_api.latest import io

from ..consistentid_core.constants import MAX_WEIGHT
from ..consistentid_core.prompt.text import resolve_caption
from .glue.inputs import MERGE_AT_TOOLTIP, merge_at_input, prompt_inputs
from .glue.model_patch import apply_model
from .glue.text_encoding import consistentid_conditioning
from .glue.types import CATEGORY_APPLY, ConsistentIDEmbeds, ConsistentIDModel


class ConsistentIDApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentIDApply",
            display_name="Apply ConsistentID All-in-One (model + prompt)",
            category=CATEGORY_APPLY,
            description="One box with the official defaults: patches the model (what Apply ConsistentID to Model "
                        "does) and builds the positive/negative conditioning (what ConsistentID Conditioning does).",
            inputs=[
                io.Model.Input("model", tooltip="the SD1.5 or SDXL model from Load Checkpoint (never modified: a "
                                                "patched copy comes out)"),
                io.Clip.Input("clip", tooltip="the text encoder of the same checkpoint"),
                ConsistentIDModel.Input("consistentid", tooltip="from Load ConsistentID Weights (same architecture "
                                                                "as the checkpoint)"),
                ConsistentIDEmbeds.Input("embeds", tooltip="from Encode Face, Load Embeds or Combine Embeds"),
                *prompt_inputs(),
                io.Float.Input("weight", default=1.0, min=0.0, max=MAX_WEIGHT, step=0.05,
                               tooltip=f"strength of the identity tokens, 0..{MAX_WEIGHT:g} (official: 1.0)"),
                merge_at_input(MERGE_AT_TOOLTIP),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="the patched model; to KSampler's model"),
                io.Conditioning.Output(display_name="positive",
                                       tooltip="text-only before merge_at, facial after; to KSampler's positive"),
                io.Conditioning.Output(display_name="negative", tooltip="to KSampler's negative"),
            ],
        )

    @classmethod
    def execute(cls, model, clip, consistentid, embeds, text, negative_text, weight, merge_at) -> io.NodeOutput:
        patched = apply_model(model, consistentid, embeds, weight=weight)
        caption = resolve_caption("auto", "", consistentid.arch)
        positive, negative = consistentid_conditioning(clip, consistentid, embeds, text, negative_text, caption, merge_at)
        return io.NodeOutput(patched, positive, negative)
