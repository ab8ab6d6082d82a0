"""Registration of every node of the pack with ComfyUI."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

NODE_IDS: tuple[str, ...] = ()


def node_classes() -> list[type[io.ComfyNode]]:
    return []


class ConsistentIDExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_classes()
