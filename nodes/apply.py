"""ConsistentIDApplyModel: the LoRA as weight patches plus the ID-token cross-attention patches."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..consistentid_core.layers import ARCH_LABEL
from ..consistentid_core.errors import ArchitectureMismatchError, PromptError
from ..consistentid_core.id_attention import IDPatchSettings
from .patch import add_lora_patches, check_model, id_projections, install_attn2_patches
from .types import CATEGORY, ConsistentIDEmbeds, ConsistentIDModel

logger = logging.getLogger("consistentid")


def check_embeds(ckpt, embeds) -> None:
    if embeds.arch != ckpt.arch:
        raise ArchitectureMismatchError(
            f"the embeds were made for {ARCH_LABEL[embeds.arch]} but {ckpt.name} is {ARCH_LABEL[ckpt.arch]}: "
            "encode the face again with this ConsistentID file"
        )
    if embeds.checkpoint and embeds.checkpoint != ckpt.name:
        logger.warning(
            "embeds were encoded with %s and are used with %s; the features do not depend on the file, so this works",
            embeds.checkpoint, ckpt.name,
        )


def apply_model(model, ckpt, embeds, weight=1.0, lora_strength=1.0, start_at=0.0, end_at=1.0, attn_mask=None):
    """A patched clone of ``model``; the input model is never modified."""
    if not 0.0 <= start_at <= end_at <= 1.0:
        raise PromptError(f"start_at ({start_at}) and end_at ({end_at}) must satisfy 0 <= start_at <= end_at <= 1")
    check_model(model, ckpt)
    check_embeds(ckpt, embeds)
    patched = model.clone()
    if lora_strength != 0:
        add_lora_patches(patched, ckpt, lora_strength)
    sampling = patched.get_model_object("model_sampling")
    settings = IDPatchSettings(
        weight=float(weight),
        # The full schedule is spelled as an open window, so that no step has to read its sigma
        # (on a GPU a read waits for the device, in every cross-attention layer).
        sigma_start=float("inf") if start_at <= 0.0 else float(sampling.percent_to_sigma(start_at)),
        sigma_end=0.0 if end_at >= 1.0 else float(sampling.percent_to_sigma(end_at)),
        mask=None if attn_mask is None else attn_mask.detach().float().cpu(),
    )
    install_attn2_patches(patched, ckpt, id_projections(ckpt, embeds), settings)
    return patched


class ConsistentIDApplyModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentIDApplyModel",
            display_name="Apply ConsistentID Model",
            category=CATEGORY,
            description="Patches the model: ConsistentID's LoRA on every attention layer and the 4 identity tokens "
                        "in every cross-attention layer (middle block included).",
            inputs=[
                io.Model.Input("model"),
                ConsistentIDModel.Input("consistentid"),
                ConsistentIDEmbeds.Input("embeds"),
                io.Float.Input("weight", default=1.0, min=0.0, max=3.0, step=0.05,
                               tooltip="strength of the identity tokens (official: 1.0)"),
                io.Float.Input("lora_strength", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="strength of ConsistentID's attention LoRA (official: 1.0)"),
                io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.01),
                io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.01),
                io.Mask.Input("attn_mask", optional=True, tooltip="where the identity applies (white = yes)"),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def validate_inputs(cls, start_at=0.0, end_at=1.0, **_kwargs):
        if start_at > end_at:
            return f"start_at ({start_at}) must not be after end_at ({end_at})"
        return True

    @classmethod
    def execute(cls, model, consistentid, embeds, weight, lora_strength, start_at, end_at, attn_mask=None) -> io.NodeOutput:
        return io.NodeOutput(apply_model(model, consistentid, embeds, weight, lora_strength, start_at, end_at, attn_mask))
