"""The two training losses: noise MSE with background masking, and facial localisation.

The localisation loss is FastComposer's balanced L1 on **cross-attention** probabilities: how the
latent pixels attend to each facial token, against that region's mask (spec §3.3).  The official
code hooked the self-attention layers instead, where the same gather reads pixel columns; here the
maps come from :attr:`ConsistentIDIPAttnProcessor.attention_recorder`, whose last axis is the 77
text tokens.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from training.attention_processors import ConsistentIDIPAttnProcessor
from consistentid_core.model.layers import UNetLayout, cross_attention_layers

EPS = 1e-5
# Spec §3.3: the middle five attention blocks for SD1.5, the middle three for SDXL.
OFFICIAL_BLOCKS = {
    "sd15": ("down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.1", "up_blocks.2"),
    "sdxl": ("down_blocks.2", "mid_block", "up_blocks.1"),
}


def _block_of(diffusers_name: str) -> str:
    parts = diffusers_name.split(".")
    return parts[0] if parts[0] == "mid_block" else ".".join(parts[:2])


def attention_blocks(layout: UNetLayout) -> list[str]:
    """The blocks with cross-attention, from the highest resolution down and back up."""
    order = []
    for layer in cross_attention_layers(layout):
        block = _block_of(layer.diffusers_name)
        if block not in order:
            order.append(block)
    # diffusers lists down, up, mid; the resolution order is down, mid, up.
    return [b for b in order if b.startswith("down")] + ["mid_block"] + [b for b in order if b.startswith("up")]


def default_blocks(arch: str, layout: UNetLayout) -> tuple[str, ...]:
    """The official blocks, or for another layout its attention blocks without the outermost two."""
    if arch in OFFICIAL_BLOCKS:
        return OFFICIAL_BLOCKS[arch]
    blocks = attention_blocks(layout)
    return tuple(blocks[1:-1] if len(blocks) > 2 else blocks)


class AttentionRecorder:
    """Collects the text-attention probabilities of the cross-attention layers of some blocks.

    The hooked layers always take the processor's explicit-softmax path, recording or not:
    gradient checkpointing re-runs them in backward and checks that the re-run saves the same
    tensors as the first run, which a switch to fused attention would break.
    """

    def __init__(self, unet, layout: UNetLayout, blocks):
        modules = dict(unet.named_modules())
        self.blocks = tuple(blocks)
        self.layers: dict[str, ConsistentIDIPAttnProcessor] = {}
        for layer in cross_attention_layers(layout):
            if _block_of(layer.diffusers_name) in self.blocks:
                processor = modules[layer.diffusers_module].processor
                if not isinstance(processor, ConsistentIDIPAttnProcessor):
                    raise TypeError(f"{layer.diffusers_module} has no ConsistentID processor; install the processors first")
                self.layers[layer.diffusers_module] = processor
        unknown = set(self.blocks) - {_block_of(name) for name in self.layers}
        if unknown:
            raise ValueError(f"no cross-attention layers in blocks {sorted(unknown)} of this UNet")
        self.maps: dict[str, torch.Tensor] = {}
        self._active = False
        for name, processor in self.layers.items():
            processor.attention_recorder = self._store(name)

    @contextmanager
    def recording(self):
        """The maps of the forward passes run inside the block (a re-run in backward stores nothing)."""
        self.maps = {}
        self._active = True
        try:
            yield self.maps
        finally:
            self._active = False

    def remove(self) -> None:
        for processor in self.layers.values():
            processor.attention_recorder = None

    def _store(self, name: str):
        def store(probs: torch.Tensor) -> None:
            if self._active:
                self.maps[name] = probs

        return store


def token_maps(probs: torch.Tensor, token_index: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """[B, heads, pixels, 77] -> [B, heads, slots, h, w] maps of the tokens at ``token_index`` [B, slots]."""
    batch, heads, pixels, _ = probs.shape
    index = token_index[:, None, None, :].expand(batch, heads, pixels, token_index.shape[1])
    maps = probs.gather(-1, index).permute(0, 1, 3, 2)
    scale = math.sqrt(latent_hw[0] * latent_hw[1] / pixels)
    h, w = round(latent_hw[0] / scale), round(latent_hw[1] / scale)
    if h * w != pixels:
        raise ValueError(f"{pixels} attention pixels do not tile a {latent_hw[0]}x{latent_hw[1]} latent")
    return maps.reshape(batch, heads, -1, h, w)


def balanced_l1(maps: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """FastComposer's balanced L1 for one layer.

    ``maps`` [B, heads, slots, h, w] attention of each facial token, ``masks`` [B, slots, H, W] its
    region in 0..1, ``valid`` [B, slots].  Each map is divided by its maximum; per head and token
    the loss is mean attention outside the region minus mean attention inside it (-1 is perfect).
    Averaged over a sample's valid tokens (0 without any), then over heads and the batch.
    """
    maps = maps / (maps.amax(dim=(-2, -1), keepdim=True) + EPS)
    masks = F.interpolate(masks.float(), size=maps.shape[-2:], mode="bilinear", antialias=True, align_corners=False)
    masks = masks[:, None].to(maps.dtype)
    inside = (maps * masks).sum(dim=(-2, -1)) / (masks.sum(dim=(-2, -1)) + EPS)
    outside = (maps * (1 - masks)).sum(dim=(-2, -1)) / ((1 - masks).sum(dim=(-2, -1)) + EPS)
    valid = valid[:, None].to(maps.dtype)
    per_token = (outside - inside) * valid
    per_head = per_token.sum(dim=-1) / valid.sum(dim=-1).clamp(min=1)
    return per_head.mean()


def localisation_loss(maps: dict, token_index, masks, valid, latent_hw) -> torch.Tensor:
    """Mean of :func:`balanced_l1` over the recorded layers."""
    if not maps:
        raise ValueError("no attention maps were recorded")
    losses = [balanced_l1(token_maps(probs, token_index, latent_hw), masks, valid) for probs in maps.values()]
    return torch.stack(losses).mean()


def noise_loss(prediction, target, background_mask=None) -> torch.Tensor:
    """MSE over all elements; with a mask, both sides are multiplied by it first (spec §3.3, step 4)."""
    prediction, target = prediction.float(), target.float()
    if background_mask is not None:
        mask = F.interpolate(background_mask.float(), size=prediction.shape[-2:], mode="bilinear", align_corners=False)
        prediction, target = prediction * mask, target * mask
    return F.mse_loss(prediction, target, reduction="mean")
