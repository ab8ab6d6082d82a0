"""Registration of every node of the pack with ComfyUI."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .apply import ConsistentIDApplyModel
from .attributes import ConsistentIDEncodeAttributes
from .conditioning import ConsistentIDConditioning
from .embeds_io import ConsistentIDCombineEmbeds, ConsistentIDLoadEmbeds, ConsistentIDSaveEmbeds
from .encode import ConsistentIDEncodeFace, ConsistentIDFaceParse
from .glue.folders import register_model_folders
from .inpaint import ConsistentIDFaceMask
from .loaders import ConsistentIDFaceAnalysisLoader, ConsistentIDFaceParserLoader, ConsistentIDModelLoader
from .one_node import ConsistentIDApply
from .region_control import ConsistentIDFaceKeypoints, ConsistentIDRegionMix, ConsistentIDRegionStrengths
from .sampler import ConsistentIDKSampler, ConsistentIDMergeStep
from .unified_loader import ConsistentIDUnifiedLoader

NODE_CLASSES: tuple[type[io.ComfyNode], ...] = (
    ConsistentIDUnifiedLoader,
    ConsistentIDModelLoader,
    ConsistentIDFaceAnalysisLoader,
    ConsistentIDFaceParserLoader,
    ConsistentIDFaceParse,
    ConsistentIDEncodeFace,
    ConsistentIDSaveEmbeds,
    ConsistentIDLoadEmbeds,
    ConsistentIDCombineEmbeds,
    ConsistentIDApplyModel,
    ConsistentIDConditioning,
    ConsistentIDKSampler,
    ConsistentIDMergeStep,
    ConsistentIDApply,
    ConsistentIDRegionMix,
    ConsistentIDRegionStrengths,
    ConsistentIDFaceKeypoints,
    ConsistentIDEncodeAttributes,
    ConsistentIDFaceMask,
)
# Node ids are a permanent API: workflows saved by users refer to them.
NODE_IDS: tuple[str, ...] = tuple(cls.__name__ for cls in NODE_CLASSES)


class ConsistentIDExtension(ComfyExtension):
    async def on_load(self) -> None:
        register_model_folders()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # ComfyUI 0.3.64 never calls on_load, and the loaders list their folders in define_schema.
        register_model_folders()
        return list(NODE_CLASSES)
