"""ComfyUI side of the ConsistentID model patch: LoRA weight patches and the attn2 replace patches.

A patch object is immutable once registered: ComfyUI deep-copies ``model_options`` on every
clone, and the copy shares the projected ID keys/values (the only tensors the patch holds).
Re-running ConsistentIDApplyModel with the same checkpoint and embeds (a new weight, a new
window) reuses the projections and the LoRA patch list of the previous run: see the memos below.
IPAdapter-style packs call ``.add(callback, **kwargs)`` on whatever sits at a block key; that
is honoured on the copy that belongs to the calling model only.
"""

from __future__ import annotations

import copy
import logging

import torch

from ..consistentid_core.attribute_branch import attribute_branch_from_extra, attribute_projections
from ..consistentid_core.layers import ARCH_LABEL
from ..consistentid_core.errors import ArchitectureMismatchError, CheckpointError
from ..consistentid_core.id_attention import (
    IDPatchSettings, IDProjections, current_sigma, id_attention_delta, sdpa_attention, tensor_version,
)
from ..consistentid_core.layers import LORA_TARGETS, cross_attention_layers, layer_table
from ..consistentid_core.memo import IdentityLRU

logger = logging.getLogger("consistentid")

CONTEXT_WIDTH = {"sd15": 768, "sdxl": 2048}

# Both are derived from objects a graph keeps alive between runs (the checkpoint, the embeds'
# tensors, the base model) and are small next to them: a few KiB of keys/values per identity and
# layer, and a list of references to the checkpoint's own LoRA tensors.
_PROJECTIONS = IdentityLRU("ID projections", max_entries=8)
_LORA_PATCHES = IdentityLRU("LoRA patches", max_entries=4)
_ATTRIBUTE_BRANCHES = IdentityLRU("attribute branches", max_entries=2)
_NO_BRANCH = object()  # remembered too: a file without the branch is checked once


def comfy_attention(q, k, v, heads, extra_options=None):
    """ComfyUI's attention kernel; newer versions route through transformer_options (SageAttention etc.)."""
    from comfy.ldm.modules.attention import optimized_attention

    extra_options = extra_options or {}
    precision = extra_options.get("attn_precision")
    try:
        return optimized_attention(q, k, v, heads, attn_precision=precision, transformer_options=extra_options)
    except TypeError:  # before the Sep 2025 signature change
        return optimized_attention(q, k, v, heads, attn_precision=precision)


class ConsistentIDAttn2Patch:
    """One cross-attention block: the previous patch (or plain attention) plus the ID-token term."""

    def __init__(self, key, projections: IDProjections, settings: IDPatchSettings, previous=None,
                 attribute: tuple[IDProjections, IDPatchSettings] | None = None):
        self.key = key
        self.projections = projections
        self.settings = settings
        self.previous = previous
        self.attribute = attribute  # the FlexID attribute branch's tokens and window, when connected
        self.callbacks: tuple = ()
        self.placement = ("cpu", torch.float32)  # where the host last said the model runs

    def __call__(self, q, k, v, extra_options):
        if self.previous is not None:
            out = self.previous(q, k, v, extra_options)
        else:
            out = comfy_attention(q, k, v, extra_options["n_heads"], extra_options)
        # The ID and attribute terms attend to 4 keys: torch's fused kernel, not ComfyUI's choice,
        # which on the CPU is the sub-quadratic kernel made for long key sequences (8 % of a step).
        attention = sdpa_attention
        delta = id_attention_delta(q, extra_options, self.key, self.projections, self.settings, attention)
        if delta is not None:
            out = out + delta.to(out.dtype)
        if self.attribute is not None:
            attr_delta = id_attention_delta(q, extra_options, self.key, *self.attribute, attention)
            if attr_delta is not None:
                out = out + attr_delta.to(out.dtype)
        if self.callbacks:
            sigma = current_sigma(extra_options)
            for callback, kwargs in self.callbacks:
                start, end = kwargs.get("sigma_start", float("inf")), kwargs.get("sigma_end", 0.0)
                if sigma is None or end <= sigma <= start:
                    out = out + callback(out, q, k, v, extra_options, **kwargs)
        return out

    def add(self, callback, **kwargs):
        """IPAdapter's registration hook: its callback adds its term after ours."""
        self.callbacks = self.callbacks + ((callback, kwargs),)

    def __deepcopy__(self, memo):
        clone = copy.copy(self)
        clone.previous = copy.deepcopy(self.previous, memo)
        return clone

    def to(self, device_or_dtype):
        device, dtype = self.placement
        if isinstance(device_or_dtype, torch.dtype):
            dtype = device_or_dtype
        else:
            device = device_or_dtype
        self.placement = (device, dtype)
        # This block's keys/values only: all blocks share one IDProjections, and the host moves
        # every block on every load, clone release and offload.
        self.projections.warm(device, dtype, keys=(self.key,))
        if self.attribute is not None:
            self.attribute[0].warm(device, dtype, keys=(self.key,))
        if self.previous is not None and hasattr(self.previous, "to"):
            self.previous = self.previous.to(device_or_dtype)
        return self


def model_arch(model) -> str | None:
    """'sd15' / 'sdxl' from the UNet's cross-attention width, or None for other models."""
    config = getattr(getattr(model.model, "model_config", None), "unet_config", {}) or {}
    width = config.get("context_dim")
    return {768: "sd15", 2048: "sdxl"}.get(width)


def check_model(model, ckpt) -> None:
    arch = model_arch(model)
    if arch != ckpt.arch:
        found = ARCH_LABEL[arch] if arch else "a model ConsistentID does not support"
        # Files trained on another UNet layout (training module) load, but the patch knows only the two official ones.
        made_for = ARCH_LABEL.get(ckpt.arch, "another base model (a custom UNet layout)")
        base = f"the {made_for}" if ckpt.arch in ARCH_LABEL else "the"
        raise ArchitectureMismatchError(
            f"{ckpt.name} is a ConsistentID file for {made_for}, but the model is {found}. "
            f"Load {base} base model it was made for, or the ConsistentID file made for this model"
        )


def lora_state(ckpt) -> dict[str, torch.Tensor]:
    """The adapter LoRAs under diffusers processor names, the form comfy.lora.load_lora reads."""
    state = {}
    for layer in layer_table(ckpt.arch):
        tensors = ckpt.adapter[layer.index]
        for lora_name, _linear in LORA_TARGETS:
            for part in ("down", "up"):
                state[f"{layer.diffusers_name}.{lora_name}.{part}.weight"] = tensors[f"{lora_name}.{part}.weight"]
    return state


def lora_patches(model, ckpt) -> dict:
    """ComfyUI's weight patches of the adapter LoRA for this base model, built once per (model, checkpoint).

    They only reference the checkpoint's tensors; the strength is applied by ``add_patches``.
    """
    import comfy.lora

    owners = (model.model, ckpt)
    patches = _LORA_PATCHES.get(owners)
    if patches is None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        patches = comfy.lora.load_lora(lora_state(ckpt), key_map, log_missing=False)
        expected = 4 * len(layer_table(ckpt.arch))
        if len(patches) != expected:
            raise CheckpointError(
                f"{ckpt.name}: only {len(patches)} of {expected} LoRA weights found a layer in this model; "
                "the base model's attention layers differ from the UNet ConsistentID was trained on"
            )
        _LORA_PATCHES.put(owners, (), patches)
    return patches


def add_lora_patches(model, ckpt, strength: float) -> int:
    accepted = model.add_patches(lora_patches(model, ckpt), strength)
    return len(accepted)


def id_projections(ckpt, embeds) -> IDProjections:
    """ID tokens of the identities (cond) and of the zero image (uncond), projected for every block.

    Memoised per (checkpoint, embeds tensors): a re-run with another weight or window reuses them,
    which for SDXL saves a perceiver pass over 2 x 261 tokens at width 2048.
    """
    inputs = (embeds.id_embeds, embeds.clip_embeds, embeds.uncond_clip_embeds)
    owners = (ckpt, ckpt.image_proj) + inputs
    versions = tuple(tensor_version(t) for t in inputs)
    cached = _PROJECTIONS.get(owners, versions)
    if cached is None:
        cached = _project_id_tokens(ckpt, embeds)
        _PROJECTIONS.put(owners, versions, cached)
    return cached


def _project_id_tokens(ckpt, embeds) -> IDProjections:
    shortcut = ckpt.arch == "sdxl"  # the official SDXL pipeline uses the projection shortcut
    proj = ckpt.image_proj
    dtype = proj.norm.weight.dtype
    with torch.no_grad():
        cond = proj(embeds.id_embeds.to(dtype), embeds.clip_embeds.to(dtype), shortcut=shortcut)
        uncond = proj(torch.zeros(1, 512, dtype=dtype), embeds.uncond_clip_embeds.to(dtype), shortcut=shortcut)
    layers = cross_attention_layers(ckpt.arch)
    to_k = {layer.comfy_block: ckpt.adapter[layer.index]["to_k_ip.weight"] for layer in layers}
    to_v = {layer.comfy_block: ckpt.adapter[layer.index]["to_v_ip.weight"] for layer in layers}
    return IDProjections.build(to_k, to_v, cond, uncond)


def install_attn2_patches(model, ckpt, projections: IDProjections, settings: IDPatchSettings,
                          attribute: tuple[IDProjections, IDPatchSettings] | None = None) -> int:
    """Registers one patch per cross-attention block, wrapping whatever was registered there before."""
    transformer_options = model.model_options.get("transformer_options", {})
    existing = transformer_options.get("patches_replace", {}).get("attn2", {})
    count = 0
    for layer in cross_attention_layers(ckpt.arch):
        name, number, index = layer.comfy_block
        # ComfyUI looks up (block, id, index) first and (block, id) second: wrap either so it still runs.
        previous = existing.get(layer.comfy_block, existing.get((name, number)))
        patch = ConsistentIDAttn2Patch(layer.comfy_block, projections, settings, previous, attribute)
        model.set_model_attn2_replace(patch, name, number, index)
        count += 1
    return count


def attribute_branch(ckpt):
    """The checkpoint's FlexID attribute branch, built once per checkpoint; CheckpointError when it has none."""
    branch = _ATTRIBUTE_BRANCHES.get((ckpt,))
    if branch is None:
        branch = attribute_branch_from_extra(ckpt.extra, ckpt.layout, source=ckpt.name) or _NO_BRANCH
        _ATTRIBUTE_BRANCHES.put((ckpt,), (), branch)
    if branch is _NO_BRANCH:
        raise CheckpointError(
            f"{ckpt.name} has no attribute branch (no attribute_proj.* / attribute_adapter.* weights; the released "
            "ConsistentID files have none). Disconnect attribute_embeds, or load ConsistentID weights trained "
            "with the attribute stage (see the README, 'FlexID control')"
        )
    return branch


def attribute_tokens(ckpt, embeds) -> IDProjections | None:
    """k_attr / v_attr of the attribute photos for every block, memoised like :func:`id_projections`;
    None (with the reason logged) when no photo shows an attribute."""
    branch = attribute_branch(ckpt)
    owners = (branch, embeds.features, embeds.valid, embeds.uncond)
    versions = tuple(tensor_version(t) for t in owners[1:])
    cached = _PROJECTIONS.get(owners, versions)
    if cached is None:
        cached = attribute_projections(branch, embeds)
        if cached is None:
            return None
        _PROJECTIONS.put(owners, versions, cached)
    return cached
