"""The trainable FlexID attribute branch: a resampler to N attribute tokens and their own k/v per layer.

Every cross-attention layer adds ``attr_weight * attention(q, to_k_attr(tokens), to_v_attr(tokens))``
next to the ID-token term, with the same query.  The weights flatten to two key prefixes,
``attribute_proj.*`` (the resampler) and ``attribute_adapter.{index}.to_k_attr/to_v_attr.weight``
(index = the official processor index of the layer), so :mod:`.checkpoint` keeps them in
``ckpt.extra`` and an official file, which has none, loads as before.

``to_v_attr`` starts at zero: added to an already trained identity model, the branch then starts
from that model's exact output, and the gradient reaches the rest of the branch from the first
update of ``to_v_attr`` on.
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch
from torch import nn

from .photos import ATTRIBUTE_NAMES, NO_ATTRIBUTES_MESSAGE, AttributeEmbeds
from ..face.clip_features import CLIP_WIDTH
from ..errors import CheckpointError, EmbedsError
from ..model.id_attention import IDProjections
from ..model.layers import LAYOUTS, UNetLayout, cross_attention_layers
from ..model.networks import PerceiverAttention, feed_forward

logger = logging.getLogger("consistentid")

PROJ_PREFIX = "attribute_proj."
ADAPTER_PREFIX = "attribute_adapter."
BRANCH_PREFIX = "attribute_"  # what checkpoint.py keeps in ``extra``
DIM_HEAD = 64
DEFAULT_TOKENS = 4
DEFAULT_DEPTH = 4
# What a file may claim, far above any trained branch: a crafted header must not make the loader
# build millions of layers before a shape check can refuse it.
MAX_BRANCH_SIZES = {"num_tokens": 256, "num_slots": 64, "depth": 32, "heads": 64}


class AttributeResampler(nn.Module):
    """Learned queries read the tokens of all present attribute pictures at once -> [B, num_tokens, C].

    A per-slot embedding is added to each picture's tokens so the queries can tell hair from
    glasses: CLIP features alone do not say which region a picture was cut from.
    """

    def __init__(self, num_tokens: int = DEFAULT_TOKENS, cross_attention_dim: int = 768, clip_dim: int = CLIP_WIDTH,
                 depth: int = DEFAULT_DEPTH, heads: int | None = None, num_slots: int = len(ATTRIBUTE_NAMES),
                 ff_mult: int = 4):
        super().__init__()
        dim = cross_attention_dim
        heads = heads or max(1, dim // DIM_HEAD)
        self.num_tokens = num_tokens
        self.num_slots = num_slots
        self.queries = nn.Parameter(torch.randn(1, num_tokens, dim) / dim**0.5)
        self.slot_embedding = nn.Parameter(torch.randn(num_slots, dim) * 0.02)
        self.proj_in = nn.Linear(clip_dim, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, DIM_HEAD, heads), feed_forward(dim, ff_mult)]) for _ in range(depth)
        )
        self.proj_out = nn.Linear(dim, dim)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``features`` [B, S, T, clip_dim], ``valid`` [B, S] -> [B, num_tokens, C]."""
        b, s, t, _ = features.shape
        if s != self.num_slots or tuple(valid.shape) != (b, s):
            raise EmbedsError(f"the attribute resampler takes {self.num_slots} slots; got features {list(features.shape)} "
                              f"and valid {list(valid.shape)}")
        x = self.proj_in(features.to(self.proj_in.weight.dtype)) + self.slot_embedding[None, :, None, :]
        x = x.reshape(b, s * t, -1)
        key_mask = valid.to(torch.bool)[:, :, None].expand(b, s, t).reshape(b, s * t)
        latents = self.queries.expand(b, -1, -1)
        for attention, ff in self.layers:
            latents = attention(x, latents, key_mask) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class AttributeKV(nn.Module):
    def __init__(self, cross_attention_dim: int, hidden_size: int):
        super().__init__()
        self.to_k_attr = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_attr = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        nn.init.zeros_(self.to_v_attr.weight)


def _layout(layout: UNetLayout | str) -> UNetLayout:
    if isinstance(layout, UNetLayout):
        return layout
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown architecture {layout!r} for the attribute branch; pass a UNetLayout")
    return LAYOUTS[layout]


class AttributeBranch(nn.Module):
    def __init__(self, layout: UNetLayout | str, num_tokens: int = DEFAULT_TOKENS, depth: int = DEFAULT_DEPTH,
                 heads: int | None = None, num_slots: int = len(ATTRIBUTE_NAMES)):
        super().__init__()
        self.layout = _layout(layout)
        width = self.layout.cross_attention_dim
        self.attribute_proj = AttributeResampler(num_tokens, width, CLIP_WIDTH, depth, heads, num_slots)
        self.attribute_adapter = nn.ModuleDict(
            {str(layer.index): AttributeKV(width, layer.hidden_size) for layer in cross_attention_layers(self.layout)}
        )

    @property
    def num_tokens(self) -> int:
        return self.attribute_proj.num_tokens

    def null_tokens(self, uncond: torch.Tensor) -> torch.Tensor:
        """[1, num_tokens, C] from the zero-image features in every slot: the unconditional attribute tokens."""
        slots = self.attribute_proj.num_slots
        features = uncond.reshape(1, 1, *uncond.shape[-2:]).expand(1, slots, -1, -1)
        return self.attribute_proj(features, torch.ones(1, slots, dtype=torch.bool, device=uncond.device))

    def tokens(self, features: torch.Tensor, valid: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """[B, num_tokens, C]; a row without any present attribute gets the unconditional tokens."""
        out = self.attribute_proj(features, valid)
        empty = ~valid.to(torch.bool).any(dim=1)
        if bool(empty.any()):
            out = torch.where(empty[:, None, None].to(out.device), self.null_tokens(uncond).to(out.dtype), out)
        return out

    def kv_weights(self) -> tuple[dict, dict]:
        """{comfy block key: to_k_attr weight} and the same for to_v_attr, for :class:`IDProjections`."""
        to_k, to_v = {}, {}
        for layer in cross_attention_layers(self.layout):
            kv = self.attribute_adapter[str(layer.index)]
            to_k[layer.comfy_block] = kv.to_k_attr.weight
            to_v[layer.comfy_block] = kv.to_v_attr.weight
        return to_k, to_v


def attribute_state_dict(branch: AttributeBranch) -> dict[str, torch.Tensor]:
    """Flat ``attribute_proj.*`` / ``attribute_adapter.*`` tensors, ready to join a checkpoint's flat dict."""
    return {key: value.detach() for key, value in branch.state_dict().items()}


def _fail(source: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{source}: the attribute branch is incomplete or made for another model: {problem}")


def _hyperparameters(state: Mapping[str, torch.Tensor], source: str) -> dict:
    """num_tokens, num_slots, depth and heads, read from the tensors (files carry no branch config)."""
    for key in ("queries", "slot_embedding", "layers.0.0.to_q.weight"):
        if PROJ_PREFIX + key not in state:
            raise _fail(source, f"missing key {PROJ_PREFIX + key}")
    queries, slots = state[PROJ_PREFIX + "queries"], state[PROJ_PREFIX + "slot_embedding"]
    if queries.ndim != 3 or slots.ndim != 2:
        raise _fail(source, f"{PROJ_PREFIX}queries has shape {list(queries.shape)} and {PROJ_PREFIX}slot_embedding "
                            f"{list(slots.shape)}; expected [1, tokens, C] and [slots, C]")
    layer_ids = {int(k[len(PROJ_PREFIX + "layers."):].split(".", 1)[0])
                 for k in state if k.startswith(PROJ_PREFIX + "layers.") and k[len(PROJ_PREFIX + "layers."):][:1].isdigit()}
    heads = int(state[PROJ_PREFIX + "layers.0.0.to_q.weight"].shape[0]) // DIM_HEAD
    sizes = {"num_tokens": int(queries.shape[1]), "num_slots": int(slots.shape[0]),
             "depth": 1 + max(layer_ids), "heads": max(1, heads)}
    for name, value in sizes.items():
        if value > MAX_BRANCH_SIZES[name]:
            raise _fail(source, f"its attribute branch claims {name} = {value} (at most {MAX_BRANCH_SIZES[name]} "
                                "is accepted); the file is damaged or not a ConsistentID attribute branch")
    return sizes


def attribute_branch_from_extra(extra: Mapping[str, torch.Tensor], layout: UNetLayout | str,
                                source: str = "checkpoint") -> AttributeBranch | None:
    """The branch stored in a checkpoint's ``extra`` tensors, or None when the file has none.

    A partial or mis-shaped branch raises :class:`CheckpointError` naming the first bad key.
    """
    state = {k: v for k, v in extra.items() if k.startswith(BRANCH_PREFIX)}
    if not state:
        return None
    hyperparameters = _hyperparameters(state, source)
    # Shapes first, on the meta device: sizes read from a crafted file must not allocate anything.
    with torch.device("meta"):
        expected = AttributeBranch(layout, **hyperparameters).state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise _fail(source, f"missing key {key}")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise _fail(source, f"{key} has shape {list(state[key].shape)}, this UNet needs {list(tensor.shape)}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise _fail(source, f"unexpected key {unexpected[0]} ({len(unexpected)} in all)")
    branch = AttributeBranch(layout, **hyperparameters)
    branch.load_state_dict({k: v.float() for k, v in state.items()})
    return branch.eval().requires_grad_(False)


def attribute_projections(branch: AttributeBranch, embeds: AttributeEmbeds) -> IDProjections | None:
    """k_attr / v_attr of every cross-attention layer, keyed like the ID projections (ComfyUI block keys).

    "cond" holds the tokens of each attribute photo, "uncond" those of the zero image.  Returns
    None, with the reason logged, when no photo shows an attribute: the branch is then skipped.
    """
    reason = embeds.skip_message()
    if reason is not None:
        logger.warning("%s", reason)
        return None
    usable = embeds.usable_rows
    for row in (~usable).nonzero().flatten().tolist():
        name = embeds.sources[row] if embeds.sources else f"attribute photo {row + 1}"
        logger.warning("%s: %s; its images get no attributes", name, NO_ATTRIBUTES_MESSAGE.split(";")[0])
    # A photo with only a face outline counts as none (see attributes.has_extrinsic): unconditional tokens.
    valid = embeds.valid & usable[:, None]
    param = branch.attribute_proj.proj_in.weight
    with torch.no_grad():
        cond = branch.tokens(embeds.features.to(param), valid.to(param.device), embeds.uncond.to(param))
        uncond = branch.null_tokens(embeds.uncond.to(param))
    to_k, to_v = branch.kv_weights()
    return IDProjections.build(to_k, to_v, cond, uncond, kind="attribute")


def branch_dropout(id_tokens: torch.Tensor, attr_tokens: torch.Tensor, p_id: float = 0.1, p_attr: float = 0.2,
                   generator: torch.Generator | None = None, id_null: torch.Tensor | None = None,
                   attr_null: torch.Tensor | None = None):
    """Drops the identity and the attribute stream of each sample independently.

    Dropped rows become zeros, or ``id_null`` / ``attr_null`` [1, T, C] when given: passing the
    unconditional tokens trains the model to read them as "no identity" / "no attributes", which
    is what classifier-free guidance feeds at sampling time.  Returns
    ``(id_tokens, attr_tokens, keep_id [B] bool, keep_attr [B] bool)``.
    """
    for name, p in (("p_id", p_id), ("p_attr", p_attr)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must lie in 0..1, got {p}")
    batch = id_tokens.shape[0]
    if attr_tokens.shape[0] != batch:
        raise ValueError(f"{batch} identity rows but {attr_tokens.shape[0]} attribute rows")
    # One draw for both streams: two independent uniforms per sample.
    draws = torch.rand(2, batch, generator=generator)
    keep_id, keep_attr = draws[0] >= p_id, draws[1] >= p_attr

    def apply(tokens, keep, null):
        null = torch.zeros_like(tokens[:1]) if null is None else null.to(tokens)
        return torch.where(keep.to(tokens.device)[:, None, None], tokens, null)

    return apply(id_tokens, keep_id, id_null), apply(attr_tokens, keep_attr, attr_null), keep_id, keep_attr
