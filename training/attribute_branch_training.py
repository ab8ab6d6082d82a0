"""Training stage of the attribute branch on a diffusers UNet, with every identity part frozen.

The ConsistentID processors (:func:`.attention.install_processors`) stay as they are; each
cross-attention layer's processor is wrapped by :class:`AttributeAttnProcessor`, which runs it
unchanged and adds the attribute term.  The term is the one the ComfyUI patch adds before the
layer's output projection, ``scale * attention(q, to_k_attr(a), to_v_attr(a))`` with the same
LoRA'd query as the ID term; since ``to_out`` is affine, adding ``W_out @ term`` after the
processor equals adding ``term`` before it, so the wrapped processor needs no change.

The attribute tokens of the current batch reach the wrappers through one shared
:class:`AttributeStream`, set for the duration of a forward: diffusers drops
``cross_attention_kwargs`` that a processor's signature does not name, so they cannot carry them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention_processors import ConsistentIDIPAttnProcessor
from consistentid_core.constants import ID_DIM
from consistentid_core.attributes.branch import AttributeBranch, branch_dropout
from consistentid_core.model.layers import UNetLayout, cross_attention_layers

logger = logging.getLogger("consistentid")



class AttributeStream:
    """The attribute tokens [B, T, C] of the forward in progress; None outside it."""

    def __init__(self):
        self.tokens: torch.Tensor | None = None


def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


class AttributeAttnProcessor(nn.Module):
    """A ConsistentID cross-attention processor plus ``scale`` x attention to the attribute tokens.

    The identity processor and the branch's k/v live outside this module's tree: registered here,
    they would move into the UNet's state dict under new names and be frozen or moved with it,
    whereas their owners (the trainee, the branch) already manage them.
    """

    def __init__(self, identity: ConsistentIDIPAttnProcessor, kv: nn.Module, stream: AttributeStream, scale: float = 1.0):
        super().__init__()
        self._parts = (identity, kv)
        self.stream = stream
        self.scale = scale

    @property
    def identity(self) -> ConsistentIDIPAttnProcessor:
        return self._parts[0]

    @property
    def kv(self) -> nn.Module:
        return self._parts[1]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        out = self.identity(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        tokens = self.stream.tokens
        if tokens is None or self.scale == 0:
            return out
        return out + self._attribute_term(attn, hidden_states, temb, tokens)

    def _attribute_term(self, attn, hidden_states, temb, tokens):
        proc = self.identity
        states, shape = proc._prologue(attn, hidden_states, temb)
        if tokens.shape[0] != states.shape[0]:
            raise ValueError(f"{tokens.shape[0]} rows of attribute tokens for a UNet batch of {states.shape[0]}")
        q = attn.to_q(states) + proc.lora_scale * proc.to_q_lora(states)
        kv = self.kv
        k = kv.to_k_attr(tokens.to(kv.to_k_attr.weight.dtype)).to(q.dtype)
        v = kv.to_v_attr(tokens.to(kv.to_v_attr.weight.dtype)).to(q.dtype)
        heads = attn.heads
        term = F.scaled_dot_product_attention(_split(q, heads), _split(k, heads), _split(v, heads))
        term = term.transpose(1, 2).reshape(q.shape) * self.scale
        # The linear part of to_out only: its bias is already in the processor's output.
        term = F.linear(term, attn.to_out[0].weight) + proc.lora_scale * proc.to_out_lora(term)
        term = attn.to_out[1](term)
        if shape is not None:
            b, c, h, w = shape
            term = term.transpose(-1, -2).reshape(b, c, h, w)
        return term / attn.rescale_output_factor


def install_attribute_processors(unet, branch: AttributeBranch, scale: float = 1.0) -> AttributeStream:
    """Wraps the ConsistentID processor of every cross-attention layer; returns the stream to feed.

    Install an :class:`training.losses.AttentionRecorder` before this: it looks for the identity
    processors on the attention modules.
    """
    layout = UNetLayout.from_diffusers_config(unet.config)
    if layout != branch.layout:
        raise ValueError(f"the attribute branch was built for {branch.layout}, this UNet is {layout}")
    modules = dict(unet.named_modules())
    stream = AttributeStream()
    for layer in cross_attention_layers(layout):
        attn = modules[layer.diffusers_module]
        proc = attn.processor
        if isinstance(proc, AttributeAttnProcessor):
            raise ValueError(f"{layer.diffusers_module} already has the attribute processor")
        if not isinstance(proc, ConsistentIDIPAttnProcessor):
            raise TypeError(f"{layer.diffusers_module} has no ConsistentID processor; run install_processors first")
        attn.set_processor(AttributeAttnProcessor(proc, branch.attribute_adapter[str(layer.index)], stream, scale))
    return stream


def remove_attribute_processors(unet) -> int:
    """Puts the identity processors back; returns how many layers were unwrapped."""
    count = 0
    for module in unet.modules():
        proc = getattr(module, "processor", None)
        if isinstance(proc, AttributeAttnProcessor):
            module.set_processor(proc.identity)
            count += 1
    return count


def attribute_optimizer(branch: AttributeBranch, frozen=(), lr: float = 1e-4, weight_decay: float = 1e-2,
                        betas=(0.9, 0.999)) -> torch.optim.Optimizer:
    """AdamW over the branch alone; every module in ``frozen`` is set to requires_grad=False.

    Freezing matters beyond the optimizer: frozen parts left trainable would still collect
    gradients through the UNet on every step, for nothing.
    """
    own = {id(p) for p in branch.parameters()}
    for module in frozen:
        shared = [name for name, p in module.named_parameters() if id(p) in own]
        if shared:
            raise ValueError(f"parameter {shared[0]} belongs to both the attribute branch and a frozen module")
        module.requires_grad_(False)
    branch.requires_grad_(True).train()
    return torch.optim.AdamW(branch.parameters(), lr=lr, weight_decay=weight_decay, betas=betas)


@dataclass
class AttributeBatch:
    """Encoded inputs of one step; the VAE, text and CLIP encoders ran before (they are frozen)."""

    latents: torch.Tensor  # [B, 4, h, w], already scaled
    prompt_embeds: torch.Tensor  # [B, 77, C]
    token_mask: torch.Tensor  # [B, 77] bool: the facial tokens
    region_features: torch.Tensor  # [B, 5, 257, 1280]
    region_valid: torch.Tensor  # [B, 5] bool
    id_embeds: torch.Tensor  # [B, 512]
    clip_embeds: torch.Tensor  # [B, 257, 1280]
    attribute_features: torch.Tensor  # [B, S, 257, 1280]
    attribute_valid: torch.Tensor  # [B, S] bool
    uncond_clip: torch.Tensor  # [1, 257, 1280]: features of the zero image
    added_cond_kwargs: dict | None = None  # SDXL's pooled text and time ids


@dataclass
class IdentityContext:
    """What the frozen identity parts make of a batch: it does not change while the branch trains,
    so it can be computed once per batch (or stored with the prepared data) and reused."""

    text: torch.Tensor  # [B, 77, C]: the prompt with the facial tokens fused in
    id_tokens: torch.Tensor  # [B, 4, C]
    id_null: torch.Tensor  # [1, 4, C]: the tokens of no face, what a dropped identity becomes


@torch.no_grad()
def identity_context(facial_encoder, image_proj, batch: AttributeBatch, shortcut: bool = False) -> IdentityContext:
    """``shortcut`` is the ID projection's (the official SDXL pipeline uses it)."""
    text = facial_encoder(batch.prompt_embeds, batch.region_features, batch.token_mask, batch.region_valid)
    id_tokens = image_proj(batch.id_embeds, batch.clip_embeds, shortcut=shortcut)
    id_null = image_proj(batch.id_embeds.new_zeros(1, ID_DIM), batch.uncond_clip, shortcut=shortcut)
    return IdentityContext(text, id_tokens, id_null)


def attribute_loss_step(unet, stream: AttributeStream, branch: AttributeBranch, facial_encoder, image_proj, scheduler,
                        batch: AttributeBatch, *, generator: torch.Generator, p_id: float = 0.1, p_attr: float = 0.2,
                        shortcut: bool = False, identity: IdentityContext | None = None) -> torch.Tensor:
    """The noise-prediction MSE of one batch with both streams dropped out independently.

    Only the branch enters the autograd graph.  ``identity`` skips the frozen FacialEncoder and ID
    projection when the caller already has their output for this batch.
    """
    if identity is None:
        identity = identity_context(facial_encoder, image_proj, batch, shortcut)
    dtype = unet.dtype
    attr_tokens = branch.tokens(batch.attribute_features, batch.attribute_valid, batch.uncond_clip)
    attr_null = branch.null_tokens(batch.uncond_clip)
    id_tokens, attr_tokens, _, _ = branch_dropout(identity.id_tokens, attr_tokens, p_id, p_attr, generator,
                                                  identity.id_null, attr_null)

    latents = batch.latents.to(dtype)
    size = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (size,), generator=generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    context = torch.cat([identity.text, id_tokens.to(identity.text.dtype)], dim=1).to(dtype)
    stream.tokens = attr_tokens.to(dtype)
    try:
        pred = unet(noisy, timesteps, encoder_hidden_states=context, added_cond_kwargs=batch.added_cond_kwargs).sample
    finally:
        stream.tokens = None
    return F.mse_loss(pred.float(), target.float())
