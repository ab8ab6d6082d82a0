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
import math

import torch

from ...consistentid_core.attributes.branch import attribute_branch_from_extra, attribute_projections
from ...consistentid_core.constants import MAX_LORA_STRENGTH, MAX_WEIGHT
from ...consistentid_core.errors import CheckpointError, PromptError
from ...consistentid_core.memo import IdentityLRU
from ...consistentid_core.model.adapter import (
    adapter_lora_state, arch_of_context_width, check_base_model, check_embeds, project_id_tokens,
)
from ...consistentid_core.model.id_attention import (
    IDPatchSettings, IDProjections, current_sigma, id_attention_delta, normalise_mask, sdpa_attention, tensor_version,
)
from ...consistentid_core.model.layers import cross_attention_layers, layer_table
from .types import CALLBACK_KEY

logger = logging.getLogger("consistentid")

# The strengths' ranges, for the schema and for the checks: ComfyUI skips its own min/max check
# for a node whose validate_inputs takes **kwargs, and NaN passes any min/max comparison.
STRENGTH_RANGES = {"weight": MAX_WEIGHT, "lora_strength": MAX_LORA_STRENGTH, "attr_weight": MAX_WEIGHT}

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
    """'sd15' / 'sdxl' of a ComfyUI MODEL, or None for other models."""
    config = getattr(getattr(model.model, "model_config", None), "unet_config", {}) or {}
    return arch_of_context_width(config.get("context_dim"))


def check_model(model, ckpt) -> None:
    check_base_model(model_arch(model), ckpt)


def lora_patches(model, ckpt) -> dict:
    """ComfyUI's weight patches of the adapter LoRA for this base model, built once per (model, checkpoint).

    They only reference the checkpoint's tensors; the strength is applied by ``add_patches``.
    """
    import comfy.lora

    owners = (model.model, ckpt)
    patches = _LORA_PATCHES.get(owners)
    if patches is None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        patches = comfy.lora.load_lora(adapter_lora_state(ckpt), key_map, log_missing=False)
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


def _patch_tensors(value) -> tuple:
    """The tensors a ComfyUI weight patch holds: a weight adapter's ``weights``, or an old-style ("lora", (...))."""
    weights = getattr(value, "weights", None)
    if weights is None and isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], tuple):
        weights = value[1]
    return tuple(w for w in weights or () if torch.is_tensor(w))


def lora_on_model(model, ckpt) -> dict[str, float]:
    """Weight key -> strength of every LoRA patch of this checkpoint already on ``model`` (empty when none).

    Found by what the patches hold (the checkpoint's own LoRA tensors), so a LoRA added by an earlier
    ConsistentIDApplyModel is recognised whichever patch objects carry it.
    """
    wanted = lora_patches(model, ckpt)
    own = {id(t) for value in wanted.values() for t in _patch_tensors(value)}
    found = {}
    for k, value in wanted.items():
        key = k if isinstance(k, str) else k[0]
        for entry in model.patches.get(key, ()):
            if entry[1] is value or any(id(t) in own for t in _patch_tensors(entry[1])):
                found[key] = float(entry[0])
    return found


def add_lora_once(model, ckpt, strength: float) -> int:
    """Adds the checkpoint's LoRA unless it is on the model already (a chained Apply: one LoRA, several
    identities); returns the number of weights patched here, 0 when the earlier LoRA was kept."""
    present = lora_on_model(model, ckpt)
    if not present:
        return add_lora_patches(model, ckpt, strength)
    kept = sorted(set(present.values()))
    expected = len(lora_patches(model, ckpt))
    logger.info(
        "the ConsistentID LoRA of %s is already on the incoming model (%d of %d weights, strength %s, from an "
        "earlier Apply ConsistentID): kept once, not applied again; this node adds its ID tokens only%s",
        ckpt.name, len(present), expected, "/".join(f"{s:g}" for s in kept),
        "" if kept == [float(strength)] else f" (its lora_strength {strength:g} is not used)",
    )
    if len(present) != expected:
        logger.warning("only %d of the %d ConsistentID LoRA weights of %s are on the incoming model; the rest are not "
                       "added, so that no weight gets the LoRA twice", len(present), expected, ckpt.name)
    return 0


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
        cached = project_id_tokens(ckpt, embeds)
        _PROJECTIONS.put(owners, versions, cached)
    return cached


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


def strength_problem(name: str, value) -> str | None:
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

    Applied to a model that already carries ConsistentID (two people: one Apply per identity, each
    with its ``attn_mask``), the new ID-token patches wrap the earlier ones, and the LoRA, already
    on the model, is kept once (see :func:`add_lora_once`).

    ``attribute_embeds`` (FlexID attribute photos) need a checkpoint with the attribute branch;
    their tokens get their own weight and sigma window, next to the identity tokens'.
    """
    _check_window(start_at, end_at)
    _check_window(attr_start_at, attr_end_at, "attr_")
    for name, value in (("weight", weight), ("lora_strength", lora_strength), ("attr_weight", attr_weight)):
        problem = strength_problem(name, value)
        if problem:
            raise PromptError(problem)
    # The latent batch is not known here; the mask count is checked against it at the first step.
    attn_mask = None if attn_mask is None else normalise_mask(attn_mask, "attn_mask")
    check_model(model, ckpt)
    check_embeds(ckpt, embeds)
    attribute_projections = attribute_tokens(ckpt, attribute_embeds) if attribute_embeds is not None else None
    patched = model.clone()
    if lora_strength != 0:
        add_lora_once(patched, ckpt, lora_strength)
    sampling = patched.get_model_object("model_sampling")
    attribute = None
    if attribute_projections is not None:
        attribute = (attribute_projections, _settings(sampling, attr_weight, attr_start_at, attr_end_at))
    install_attn2_patches(patched, ckpt, id_projections(ckpt, embeds),
                          _settings(sampling, weight, start_at, end_at, attn_mask), attribute)
    register_patch_release(patched)
    return patched


# --- releasing what the patches derived, when ComfyUI unloads the model (see memory.py) ---

def consistentid_patches(model) -> list[ConsistentIDAttn2Patch]:
    """Every ConsistentID attention patch registered on ``model`` (also ones wrapped by later patches)."""
    replace = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    found = []
    for patch in replace.values():
        while patch is not None:
            if isinstance(patch, ConsistentIDAttn2Patch):
                found.append(patch)
            patch = getattr(patch, "previous", None)
    return found


def _patch_parts(model):
    """The distinct projections and settings objects of the model's patches (blocks share them)."""
    projections, settings = {}, {}
    for patch in consistentid_patches(model):
        parts = [(patch.projections, patch.settings)] + ([patch.attribute] if patch.attribute is not None else [])
        for proj, setting in parts:
            projections[id(proj)] = proj
            settings[id(setting)] = setting
    return list(projections.values()), list(settings.values())


def patch_cache_bytes(model) -> int:
    """Bytes the model's ConsistentID patches hold in device copies, batch layouts and resampled masks."""
    projections, settings = _patch_parts(model)
    masks = sum(t.element_size() * t.nelement() for s in settings for t in list(s._masks.values()))
    return sum(p.cached_bytes for p in projections) + masks


def release_patch_caches(model, unpatch_all: bool = True) -> int:
    """ON_DETACH callback of a patched UNet: drops what its patches derived for a device; returns bytes.

    ComfyUI also detaches (with ``unpatch_all=False``) when a patcher is garbage collected or a
    clone of it is loaded; another clone may be sampling with the same projections then, so only
    a real unload releases.
    """
    if not unpatch_all:
        return 0
    projections, settings = _patch_parts(model)
    dropped = sum(p.release() for p in projections) + sum(s.release() for s in settings)
    logger.debug("model unloaded: released %d bytes of ConsistentID key/value copies", dropped)
    return dropped


def register_patch_release(model) -> None:
    """Makes ComfyUI's unload of ``model`` release its patch caches (once per patcher; clones inherit it)."""
    from comfy.patcher_extension import CallbacksMP

    if release_patch_caches not in model.get_callbacks(CallbacksMP.ON_DETACH, CALLBACK_KEY):
        model.add_callback_with_key(CallbacksMP.ON_DETACH, CALLBACK_KEY, release_patch_caches)
