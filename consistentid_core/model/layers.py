"""The one table that maps ConsistentID adapter indices to UNet attention layers.

The official checkpoint numbers its attention processors in the order of diffusers'
``unet.attn_processors`` (down blocks, then up blocks, then the mid block; attn1 before attn2
inside each transformer block).  Everything in this pack that needs to find "processor i" in a
diffusers UNet, in an ldm/ComfyUI state dict or in ComfyUI's attention-patch registry reads it
from :func:`layer_table`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

ComfyBlockKey = tuple  # ("input" | "middle" | "output", block id, transformer index)


@dataclass(frozen=True)
class UNetLayout:
    """The few numbers of a UNet2DConditionModel config that fix its attention layers."""

    block_out_channels: tuple[int, ...]
    down_has_attention: tuple[bool, ...]
    transformer_depth: tuple[int, ...]
    cross_attention_dim: int
    layers_per_block: int = 2

    @classmethod
    def from_diffusers_config(cls, config) -> "UNetLayout":
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        down_types = tuple(get("down_block_types"))
        channels = tuple(get("block_out_channels"))
        depth = get("transformer_layers_per_block", 1)
        if isinstance(depth, int):
            depth = (depth,) * len(channels)
        layers = get("layers_per_block", 2)
        if not isinstance(layers, int):
            raise ValueError("per-block layers_per_block is not supported by ConsistentID")
        return cls(
            block_out_channels=channels,
            down_has_attention=tuple("CrossAttn" in t for t in down_types),
            transformer_depth=tuple(int(d) for d in depth),
            cross_attention_dim=int(get("cross_attention_dim")),
            layers_per_block=layers,
        )


SD15_LAYOUT = UNetLayout((320, 640, 1280, 1280), (True, True, True, False), (1, 1, 1, 1), 768)
SDXL_LAYOUT = UNetLayout((320, 640, 1280), (False, True, True), (0, 2, 10), 2048)
LAYOUTS = {"sd15": SD15_LAYOUT, "sdxl": SDXL_LAYOUT}


@dataclass(frozen=True)
class AdapterLayer:
    index: int
    diffusers_name: str  # "...transformer_blocks.t.attn2.processor"
    ldm_prefix: str  # "input_blocks.4.1.transformer_blocks.0.attn2" (no "diffusion_model.")
    comfy_block: ComfyBlockKey  # key of ComfyUI's attn patch registry
    hidden_size: int
    is_cross_attention: bool
    context_dim: int  # input width of to_k/to_v: hidden_size for attn1, cross_attention_dim for attn2

    @property
    def diffusers_module(self) -> str:
        """Name of the attention module itself (``...attn2``), without ``.processor``."""
        return self.diffusers_name[: -len(".processor")]


def _attention_modules(layout: UNetLayout):
    """(diffusers attention-module name, ldm block name, comfy block, hidden, depth), in diffusers order."""
    channels, attn, depth = layout.block_out_channels, layout.down_has_attention, layout.transformer_depth
    n = layout.layers_per_block
    for b, (ch, has, d) in enumerate(zip(channels, attn, depth)):
        if has:
            for a in range(n):
                block_id = (n + 1) * b + a + 1
                yield f"down_blocks.{b}.attentions.{a}", f"input_blocks.{block_id}.1", ("input", block_id), ch, d
    rev = list(zip(reversed(channels), reversed(attn), reversed(depth)))
    for b, (ch, has, d) in enumerate(rev):
        if has:
            for a in range(n + 1):
                block_id = (n + 1) * b + a
                yield f"up_blocks.{b}.attentions.{a}", f"output_blocks.{block_id}.1", ("output", block_id), ch, d
    yield "mid_block.attentions.0", "middle_block.1", ("middle", 0), channels[-1], depth[-1]


@lru_cache(maxsize=16)
def layer_table(layout: UNetLayout | str) -> tuple[AdapterLayer, ...]:
    """All attention layers of a UNet, indexed as the ConsistentID ``adapter_modules``."""
    if isinstance(layout, str):
        layout = LAYOUTS[layout]
    rows = []
    for module, ldm_block, comfy_block, hidden, depth in _attention_modules(layout):
        for t in range(depth):
            for kind in ("attn1", "attn2"):
                cross = kind == "attn2"
                rows.append(
                    AdapterLayer(
                        index=len(rows),
                        diffusers_name=f"{module}.transformer_blocks.{t}.{kind}.processor",
                        ldm_prefix=f"{ldm_block}.transformer_blocks.{t}.{kind}",
                        comfy_block=(comfy_block[0], comfy_block[1], t),
                        hidden_size=hidden,
                        is_cross_attention=cross,
                        context_dim=layout.cross_attention_dim if cross else hidden,
                    )
                )
    return tuple(rows)


def cross_attention_layers(layout: UNetLayout | str) -> tuple[AdapterLayer, ...]:
    return tuple(row for row in layer_table(layout) if row.is_cross_attention)


LORA_TARGETS: Sequence[tuple[str, str]] = (
    ("to_q_lora", "to_q"),
    ("to_k_lora", "to_k"),
    ("to_v_lora", "to_v"),
    ("to_out_lora", "to_out.0"),
)
"""(processor LoRA name, attention Linear it adds to) for every processor."""

ARCH_LABEL = {"sd15": "SD1.5", "sdxl": "SDXL"}
"""How an architecture is named in messages."""

ARCH_BY_WIDTH = {768: "sd15", 2048: "sdxl"}
"""The architecture of a UNet (or a checkpoint's k/v projections) from its cross-attention width."""
