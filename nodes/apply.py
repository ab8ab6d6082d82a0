"""ConsistentIDApplyModel: the LoRA as weight patches plus the ID-token cross-attention patches."""

from __future__ import annotations

import logging
import math

from comfy_api.latest import io

from ..consistentid_core.layers import ARCH_LABEL
from ..consistentid_core.errors import ArchitectureMismatchError, PromptError
from ..consistentid_core.id_attention import IDPatchSettings, normalise_mask
from .patch import add_lora_patches, attribute_tokens, check_model, id_projections, install_attn2_patches
from .memory import register_patch_release
from .types import CATEGORY_APPLY, AttributeEmbedsType, ConsistentIDEmbeds, ConsistentIDModel

logger = logging.getLogger("consistentid")

MAX_WEIGHT = 3.0
MAX_LORA_STRENGTH = 2.0
# The strengths' ranges, for the schema and for the checks: ComfyUI skips its own min/max check
# for a node whose validate_inputs takes **kwargs, and NaN passes any min/max comparison.
STRENGTH_RANGES = {"weight": MAX_WEIGHT, "lora_strength": MAX_LORA_STRENGTH, "attr_weight": MAX_WEIGHT}


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


def _strength_problem(name: str, value) -> str | None:
    """Why a strength input is unusable (NaN, Inf, out of range), or None."""
    top = STRENGTH_RANGES[name]
    if not math.isfinite(float(value)) or not 0.0 <= value <= top:
        return f"{name} is {value}; it must lie in 0..{top}"
    return None


def _check_window(start_at: float, end_at: float, what: str = "") -> None:
    if not (math.isfinite(start_at) and math.isfinite(end_at)) or not 0.0 <= start_at <= end_at <= 1.0:
        raise PromptError(f"{what}start_at ({start_at}) and {what}end_at ({end_at}) must satisfy "
                          f"0 <= {what}start_at <= {what}end_at <= 1")


def _settings(sampling, weight, start_at, end_at, attn_mask=None) -> IDPatchSettings:
    return IDPatchSettings(
        weight=float(weight),
        # The full schedule is spelled as an open window, so that no step has to read its sigma
        # (on a GPU a read waits for the device, in every cross-attention layer).
        sigma_start=float("inf") if start_at <= 0.0 else float(sampling.percent_to_sigma(start_at)),
        sigma_end=0.0 if end_at >= 1.0 else float(sampling.percent_to_sigma(end_at)),
        mask=attn_mask,
    )


def apply_model(model, ckpt, embeds, weight=1.0, lora_strength=1.0, start_at=0.0, end_at=1.0, attn_mask=None,
                attribute_embeds=None, attr_weight=1.0, attr_start_at=0.0, attr_end_at=1.0):
    """A patched clone of ``model``; the input model is never modified.

    ``attribute_embeds`` (FlexID attribute photos) need a checkpoint with the attribute branch;
    their tokens get their own weight and sigma window, next to the identity tokens'.
    """
    _check_window(start_at, end_at)
    _check_window(attr_start_at, attr_end_at, "attr_")
    for name, value in (("weight", weight), ("lora_strength", lora_strength), ("attr_weight", attr_weight)):
        problem = _strength_problem(name, value)
        if problem:
            raise PromptError(problem)
    # The latent batch is not known here; the mask count is checked against it at the first step.
    attn_mask = None if attn_mask is None else normalise_mask(attn_mask, "attn_mask")
    check_model(model, ckpt)
    check_embeds(ckpt, embeds)
    attribute_projections = attribute_tokens(ckpt, attribute_embeds) if attribute_embeds is not None else None
    patched = model.clone()
    if lora_strength != 0:
        add_lora_patches(patched, ckpt, lora_strength)
    sampling = patched.get_model_object("model_sampling")
    attribute = None
    if attribute_projections is not None:
        attribute = (attribute_projections, _settings(sampling, attr_weight, attr_start_at, attr_end_at))
    install_attn2_patches(patched, ckpt, id_projections(ckpt, embeds),
                          _settings(sampling, weight, start_at, end_at, attn_mask), attribute)
    register_patch_release(patched)
    return patched


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
                                       "(official: 1.0)"),
                io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="fraction of sampling where the identity tokens start (0..1, not after "
                                       "end_at; official: 0)"),
                io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="fraction of sampling where the identity tokens stop (0..1; official: 1)"),
                io.Mask.Input("attn_mask", optional=True,
                              tooltip="where the identity applies (white = yes); one mask, or one per latent image"),
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
            problem = None if value is None else _strength_problem(name, value)
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
