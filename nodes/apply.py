"""ConsistentIDApplyModel: the LoRA as weight patches plus the ID-token cross-attention patches."""

from __future__ import annotations

import logging
import math

from comfy_api.latest import io

from ..consistentid_core.constants import MAX_LORA_STRENGTH, MAX_WEIGHT
from .glue.model_patch import apply_model, strength_problem
from .glue.types import CATEGORY_APPLY, AttributeEmbedsType, ConsistentIDEmbeds, ConsistentIDModel

logger = logging.getLogger("consistentid")

class ConsistentIDApplyModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentIDApplyModel",
            display_name="Apply ConsistentID to Model (ID tokens + LoRA)",
            category=CATEGORY_APPLY,
            description="Patches the model only: ConsistentID's LoRA on every attention layer and the 4 identity "
                        "tokens in every cross-attention layer (middle block included). The prompt side is "
                        "ConsistentID Conditioning; Apply ConsistentID All-in-One does both.",
            inputs=[
                io.Model.Input("model", tooltip="the SD1.5 or SDXL model from Load Checkpoint (never modified: a "
                                                "patched copy comes out); LoRA loaders may come before"),
                ConsistentIDModel.Input("consistentid", tooltip="from Load ConsistentID Weights (same architecture "
                                                                "as the model)"),
                ConsistentIDEmbeds.Input("embeds", tooltip="the identity: from Encode Face, Load/Combine Embeds "
                                                           "or Regions From Other Photos"),
                io.Float.Input("weight", default=1.0, min=0.0, max=MAX_WEIGHT, step=0.05,
                               tooltip=f"strength of the identity tokens, 0..{MAX_WEIGHT:g} (official: 1.0)"),
                io.Float.Input("lora_strength", default=1.0, min=0.0, max=MAX_LORA_STRENGTH, step=0.05,
                               tooltip=f"strength of ConsistentID's attention LoRA, 0..{MAX_LORA_STRENGTH:g} "
                                       "(official: 1.0); a model that has it already (from an earlier Apply, "
                                       "for a second person) keeps its LoRA and this value is not used"),
                io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="fraction of sampling where the identity tokens start (0..1, not after "
                                       "end_at; official: 0)"),
                io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="fraction of sampling where the identity tokens stop (0..1; official: 1)"),
                io.Mask.Input("attn_mask", optional=True,
                              tooltip="where the identity applies (white = yes); one mask, or one per latent image. "
                                      "Two people: chain two Apply nodes, each with its own mask"),
                AttributeEmbedsType.Input("attribute_embeds", optional=True,
                                          tooltip="hair, glasses, hat... from Encode Attributes (experimental); "
                                                  "needs weights trained with the attribute stage (not the "
                                                  "released files)"),
                io.Float.Input("attr_weight", default=1.0, min=0.0, max=MAX_WEIGHT, step=0.05, optional=True,
                               tooltip=f"strength of the attribute tokens, 0..{MAX_WEIGHT:g}; used only with "
                                       "attribute_embeds"),
                io.Float.Input("attr_start_at", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="fraction of sampling where the attribute tokens start (0..1, not after "
                                       "attr_end_at)"),
                io.Float.Input("attr_end_at", default=1.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="fraction of sampling where the attribute tokens stop (0..1)"),
            ],
            outputs=[io.Model.Output(display_name="model",
                                     tooltip="the patched model; to KSampler (with ConsistentID Conditioning's "
                                             "positive and negative)")],
        )

    @classmethod
    def validate_inputs(cls, weight=1.0, lora_strength=1.0, attr_weight=1.0, start_at=0.0, end_at=1.0,
                        attr_start_at=0.0, attr_end_at=1.0, **_kwargs):
        # Linked inputs are not known yet (None here); execute checks them again.
        strengths = {"weight": weight, "lora_strength": lora_strength, "attr_weight": attr_weight}
        for name, value in strengths.items():
            problem = None if value is None else strength_problem(name, value)
            if problem:
                return problem
        windows = {"start_at": start_at, "end_at": end_at, "attr_start_at": attr_start_at, "attr_end_at": attr_end_at}
        for name, value in windows.items():
            if value is not None and (not math.isfinite(float(value)) or not 0.0 <= value <= 1.0):
                return f"{name} is {value}; it must lie in 0..1"
        if None in (start_at, end_at, attr_start_at, attr_end_at):
            return True
        if start_at > end_at:
            return f"start_at ({start_at}) must not be after end_at ({end_at})"
        if attr_start_at > attr_end_at:
            return f"attr_start_at ({attr_start_at}) must not be after attr_end_at ({attr_end_at})"
        return True

    @classmethod
    def execute(cls, model, consistentid, embeds, weight, lora_strength, start_at, end_at, attn_mask=None,
                attribute_embeds=None, attr_weight=1.0, attr_start_at=0.0, attr_end_at=1.0) -> io.NodeOutput:
        return io.NodeOutput(apply_model(model, consistentid, embeds, weight, lora_strength, start_at, end_at, attn_mask,
                                         attribute_embeds, attr_weight, attr_start_at, attr_end_at))
