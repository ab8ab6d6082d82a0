"""ConsistentID attention processors for diffusers UNets (used by training and parity tests).

Every attention layer carries a rank-128 LoRA on to_q/to_k/to_v/to_out; cross-attention layers
also attend to the 4 ID tokens appended after the 77 text tokens through their own
``to_k_ip``/``to_v_ip``.  Parameter names equal the official ``adapter_modules`` keys.  For
inference in ComfyUI the LoRA is folded into the weights instead (:func:`fold_lora`).
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from consistentid_core.errors import CheckpointError
from consistentid_core.model.layers import UNetLayout, layer_table

DEFAULT_RANK = 128
NUM_ID_TOKENS = 4


class LoRALinear(nn.Module):
    """``up(down(x))`` with no alpha scaling (the official network_alpha is None)."""

    def __init__(self, in_features: int, out_features: int, rank: int = DEFAULT_RANK):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.down.weight, std=1.0 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype))).to(x.dtype)


def fold_lora(down: torch.Tensor, up: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight delta of one LoRA, ``up @ down`` computed in fp32: W' = W + delta."""
    delta = up.float() @ down.float()
    return delta.to(dtype or up.dtype)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class _LoRAProcessorBase(nn.Module):
    def __init__(self, hidden_size: int, cross_attention_dim: int | None, rank: int):
        super().__init__()
        context = cross_attention_dim or hidden_size
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim
        self.rank = rank
        self.lora_scale = 1.0
        self.to_q_lora = LoRALinear(hidden_size, hidden_size, rank)
        self.to_k_lora = LoRALinear(context, hidden_size, rank)
        self.to_v_lora = LoRALinear(context, hidden_size, rank)
        self.to_out_lora = LoRALinear(hidden_size, hidden_size, rank)

    def _prologue(self, attn, hidden_states, temb):
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape = None
        if hidden_states.ndim == 4:
            shape = hidden_states.shape
            b, c, h, w = shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        return hidden_states, shape

    def _mask(self, attn, attention_mask, context_len, batch):
        if attention_mask is None:
            return None
        mask = attn.prepare_attention_mask(attention_mask, context_len, batch)
        return mask.view(batch, attn.heads, -1, mask.shape[-1])

    def _project(self, linear, lora, x):
        return linear(x) + self.lora_scale * lora(x)

    def _epilogue(self, attn, hidden_states, residual, shape):
        hidden_states = self._project(attn.to_out[0], self.to_out_lora, hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if shape is not None:
            b, c, h, w = shape
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _text_attention(self, attn, query_states, context, attention_mask, recorder=None):
        batch = query_states.shape[0]
        mask = self._mask(attn, attention_mask, context.shape[1], batch)
        q = self._project(attn.to_q, self.to_q_lora, query_states)
        k = self._project(attn.to_k, self.to_k_lora, context)
        v = self._project(attn.to_v, self.to_v_lora, context)
        q_heads, k_heads, v_heads = _heads(q, attn.heads), _heads(k, attn.heads), _heads(v, attn.heads)
        if recorder is None:
            out = F.scaled_dot_product_attention(q_heads, k_heads, v_heads, attn_mask=mask)
        else:
            # SDPA never materialises the probabilities, so recording takes the explicit path; the
            # softmax runs in fp32 because the localisation loss divides by each map's maximum.
            scores = (q_heads @ k_heads.transpose(-1, -2)).float() * q_heads.shape[-1] ** -0.5
            if mask is not None:
                scores = scores + mask.float()
            probs = scores.softmax(dim=-1)
            recorder(probs)
            out = probs.to(v_heads.dtype) @ v_heads
        return q_heads, _merge_heads(out).to(q.dtype)


class ConsistentIDAttnProcessor(_LoRAProcessorBase):
    """Self-attention (attn1) processor: the base attention plus the LoRA on q, k, v and out."""

    def __init__(self, hidden_size: int, cross_attention_dim: int | None = None, rank: int = DEFAULT_RANK):
        super().__init__(hidden_size, cross_attention_dim, rank)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        hidden_states, shape = self._prologue(attn, hidden_states, temb)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        _, out = self._text_attention(attn, hidden_states, context, attention_mask)
        return self._epilogue(attn, out, residual, shape)


class ConsistentIDIPAttnProcessor(_LoRAProcessorBase):
    """Cross-attention (attn2) processor: LoRA'd text attention plus ``scale`` x attention to the ID tokens.

    The context is the 77 text tokens followed by ``num_tokens`` ID tokens.

    ``attention_recorder``: when set, it is called once per forward with the text-attention
    probabilities ``softmax(q k^T / sqrt(d))`` [B, heads, pixels, text tokens] (fp32, part of the
    autograd graph); training uses them for the facial localisation loss.  Left at None the
    processor runs fused SDPA and its numbers are exactly those of the unrecorded path.
    """

    attention_recorder: Callable[[torch.Tensor], None] | None = None

    def __init__(
        self,
        hidden_size: int,
        cross_attention_dim: int,
        rank: int = DEFAULT_RANK,
        num_tokens: int = NUM_ID_TOKENS,
        scale: float = 1.0,
    ):
        super().__init__(hidden_size, cross_attention_dim, rank)
        self.num_tokens = num_tokens
        self.scale = scale
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if encoder_hidden_states is None or encoder_hidden_states.shape[1] <= self.num_tokens:
            raise ValueError(
                f"ConsistentID cross-attention expects the text tokens followed by {self.num_tokens} ID "
                "tokens as encoder_hidden_states"
            )
        residual = hidden_states
        hidden_states, shape = self._prologue(attn, hidden_states, temb)
        text = encoder_hidden_states[:, : -self.num_tokens]
        id_tokens = encoder_hidden_states[:, -self.num_tokens :]
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        q_heads, out = self._text_attention(attn, hidden_states, text, attention_mask, self.attention_recorder)
        ip_k = _heads(self.to_k_ip(id_tokens.to(self.to_k_ip.weight.dtype)).to(q_heads.dtype), attn.heads)
        ip_v = _heads(self.to_v_ip(id_tokens.to(self.to_v_ip.weight.dtype)).to(q_heads.dtype), attn.heads)
        ip_out = _merge_heads(F.scaled_dot_product_attention(q_heads, ip_k, ip_v)).to(out.dtype)
        return self._epilogue(attn, out + self.scale * ip_out, residual, shape)


def build_processors(layout: UNetLayout | str, rank: int = DEFAULT_RANK, num_tokens: int = NUM_ID_TOKENS, scale: float = 1.0):
    """{diffusers processor name: processor} in adapter-index order."""
    processors = {}
    for layer in layer_table(layout):
        if layer.is_cross_attention:
            proc = ConsistentIDIPAttnProcessor(layer.hidden_size, layer.context_dim, rank, num_tokens, scale)
        else:
            proc = ConsistentIDAttnProcessor(layer.hidden_size, None, rank)
        processors[layer.diffusers_name] = proc
    return processors


def install_processors(
    unet,
    adapter_state: Mapping[str, torch.Tensor] | None = None,
    *,
    rank: int = DEFAULT_RANK,
    num_tokens: int = NUM_ID_TOKENS,
    scale: float = 1.0,
    init_ip_from_unet: bool = True,
) -> nn.ModuleList:
    """Puts ConsistentID processors on every attention layer of a diffusers UNet2DConditionModel.

    Returns ``adapter_modules``: the processors as a ModuleList in the official index order, so
    ``adapter_modules.state_dict()`` has the official keys.  ``adapter_state`` (flat
    ``"{index}.to_q_lora.down.weight"`` keys) is loaded strictly; without it, ``to_k_ip``/``to_v_ip``
    start as copies of the UNet's ``to_k``/``to_v`` as in official training.
    """
    layout = UNetLayout.from_diffusers_config(unet.config)
    table = layer_table(layout)
    existing = list(unet.attn_processors.keys())
    expected = [layer.diffusers_name for layer in table]
    if existing != expected:
        raise ValueError(
            "this UNet's attention layers do not follow the ConsistentID index order "
            f"(first difference: {next((a, b) for a, b in zip(existing + [None], expected + [None]) if a != b)})"
        )
    processors = build_processors(layout, rank, num_tokens, scale)
    modules = dict(unet.named_modules())
    device, dtype = unet.device, unet.dtype
    for layer in table:
        proc = processors[layer.diffusers_name]
        if layer.is_cross_attention and init_ip_from_unet and adapter_state is None:
            attn = modules[layer.diffusers_module]
            with torch.no_grad():
                proc.to_k_ip.weight.copy_(attn.to_k.weight)
                proc.to_v_ip.weight.copy_(attn.to_v.weight)
        proc.to(device=device, dtype=dtype)
    adapter_modules = nn.ModuleList(processors.values())
    if adapter_state is not None:
        load_adapter_state(adapter_modules, adapter_state)
    unet.set_attn_processor(processors)
    return adapter_modules


def load_adapter_state(adapter_modules: nn.ModuleList, state: Mapping[str, torch.Tensor], source: str = "adapter state"):
    own = adapter_modules.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: adapter_modules do not fit this UNet: missing {missing[:4]} unexpected {unexpected[:4]}"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(
                f"{source}: adapter_modules.{key} has shape {tuple(value.shape)}, this UNet needs {tuple(own[key].shape)}"
            )
    adapter_modules.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
