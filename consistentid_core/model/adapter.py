"""What a host's model patch takes from a ConsistentID checkpoint, and the checks that come first.

* :func:`check_base_model` / :func:`check_embeds` / :func:`check_text_encoder`: the base model,
  the embeds and the text encoder must be of the checkpoint's architecture; each names the fix.
* :func:`adapter_lora_state`: the rank-128 attention LoRAs under diffusers processor names, the
  form LoRA loaders (ComfyUI's ``comfy.lora.load_lora`` among them) map onto a UNet.
* :func:`project_id_tokens`: the identity's 4 (SD1.5) or 16 (SDXL) ID tokens, cond and uncond,
  projected by every cross-attention layer's ``to_k_ip`` / ``to_v_ip``.
"""

from __future__ import annotations

import logging

import torch

from ..constants import ID_DIM
from ..errors import ArchitectureMismatchError
from .id_attention import IDProjections
from .layers import ARCH_BY_WIDTH, ARCH_LABEL, LORA_TARGETS, cross_attention_layers, layer_table

logger = logging.getLogger("consistentid")


def arch_of_context_width(width: int | None) -> str | None:
    """'sd15' / 'sdxl' from a UNet's cross-attention width, None for a model ConsistentID does not know."""
    return ARCH_BY_WIDTH.get(width)


def check_base_model(arch: str | None, ckpt) -> None:
    """ArchitectureMismatchError unless the base model (``arch``, None when unknown) is the checkpoint's."""
    if arch == ckpt.arch:
        return
    found = ARCH_LABEL[arch] if arch else "a model ConsistentID does not support"
    # Files trained on another UNet layout (training module) load, but the patch knows only the two official ones.
    made_for = ARCH_LABEL.get(ckpt.arch, "another base model (a custom UNet layout)")
    base = f"the {made_for}" if ckpt.arch in ARCH_LABEL else "the"
    raise ArchitectureMismatchError(
        f"{ckpt.name} is a ConsistentID file for {made_for}, but the model is {found}. "
        f"Load {base} base model it was made for, or the ConsistentID file made for this model"
    )


def check_embeds(ckpt, embeds) -> None:
    """ArchitectureMismatchError when the embeds were encoded for the other architecture."""
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


def check_text_encoder(ckpt, is_sdxl_text_encoder: bool) -> None:
    """ArchitectureMismatchError when the text encoder is the other architecture's."""
    if is_sdxl_text_encoder != (ckpt.arch == "sdxl"):
        raise ArchitectureMismatchError(
            f"{ckpt.name} is for {ARCH_LABEL[ckpt.arch]} but the CLIP is "
            f"{'SDXL' if is_sdxl_text_encoder else 'SD1.5'}'s"
        )


def adapter_lora_state(ckpt) -> dict[str, torch.Tensor]:
    """The adapter LoRAs under diffusers processor names (the checkpoint's own tensors, not copies)."""
    state = {}
    for layer in layer_table(ckpt.arch):
        tensors = ckpt.adapter[layer.index]
        for lora_name, _linear in LORA_TARGETS:
            for part in ("down", "up"):
                state[f"{layer.diffusers_name}.{lora_name}.{part}.weight"] = tensors[f"{lora_name}.{part}.weight"]
    return state


def project_id_tokens(ckpt, embeds) -> IDProjections:
    """ID tokens of the identities (cond) and of the zero image (uncond), projected for every block.

    The blocks are keyed by the layer table's ComfyUI name (block, number, transformer index).
    """
    shortcut = ckpt.arch == "sdxl"  # the official SDXL pipeline uses the projection shortcut
    proj = ckpt.image_proj
    dtype = proj.norm.weight.dtype
    with torch.no_grad():
        cond = proj(embeds.id_embeds.to(dtype), embeds.clip_embeds.to(dtype), shortcut=shortcut)
        uncond = proj(torch.zeros(1, ID_DIM, dtype=dtype), embeds.uncond_clip_embeds.to(dtype), shortcut=shortcut)
    layers = cross_attention_layers(ckpt.arch)
    to_k = {layer.comfy_block: ckpt.adapter[layer.index]["to_k_ip.weight"] for layer in layers}
    to_v = {layer.comfy_block: ckpt.adapter[layer.index]["to_v_ip.weight"] for layer in layers}
    return IDProjections.build(to_k, to_v, cond, uncond)
