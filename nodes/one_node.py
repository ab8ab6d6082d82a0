"""ConsistentIDApply: model patch and conditioning in one node, for people who want one box."""

from __future__ import annotations

from comfy_api.latest import io

from .apply import apply_model
from .conditioning import consistentid_conditioning, prompt_inputs, resolve_caption
from .types import CATEGORY, ConsistentIDEmbeds, ConsistentIDModel


class ConsistentIDApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentIDApply",
            display_name="Apply ConsistentID",
            category=CATEGORY,
            description="Patches the model and builds the positive/negative conditioning with the official defaults.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                ConsistentIDModel.Input("consistentid"),
                ConsistentIDEmbeds.Input("embeds"),
                *prompt_inputs(),
                io.Float.Input("weight", default=1.0, min=0.0, max=3.0, step=0.05),
                io.Float.Input("merge_at", default=0.62, min=0.0, max=1.0, step=0.01),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL"),
                io.Conditioning.Output(display_name="positive"),
                io.Conditioning.Output(display_name="negative"),
            ],
        )

    @classmethod
    def execute(cls, model, clip, consistentid, embeds, text, negative_text, weight, merge_at) -> io.NodeOutput:
        patched = apply_model(model, consistentid, embeds, weight=weight)
        caption = resolve_caption("auto", "", consistentid.arch)
        positive, negative = consistentid_conditioning(clip, consistentid, embeds, text, negative_text, caption, merge_at)
        return io.NodeOutput(patched, positive, negative)
