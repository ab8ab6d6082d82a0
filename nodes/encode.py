"""Face nodes: parse a face into regions, and encode reference photos into ConsistentID embeds."""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..consistentid_core.constants import PARSE_SIZE
from ..consistentid_core.embeds import COMBINE_METHODS
from ..consistentid_core.face.analysis import to_rgb_uint8
from ..consistentid_core.face.encode_cache import ENCODE_CACHE
from ..consistentid_core.face.labels import overlay
from ..consistentid_core.face.parser import parse_image
from ..consistentid_core.face.parsing import group_masks
from ..consistentid_core.face.pipeline import ON_NO_FACE, encode_references
from ..consistentid_core.face.preview import reference_preview, stack_previews
from .glue.images import image_batch_to_uint8, uint8_to_image_batch
from .glue.inputs import COLOR_ORDER, FACE_SELECT
from .glue.memory import use_face_parser
from ..consistentid_core.progress import each_with_progress
from .glue.progress import comfy_progress
from .glue.types import CATEGORY_ENCODE, ConsistentIDEmbeds, ConsistentIDModel, FaceAnalysis, FaceParser
from .glue.vision import check_clip_vision, comfy_vision_encoder

logger = logging.getLogger("consistentid")


class ConsistentIDFaceParse(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentIDFaceParse",
            display_name="Face Parse (ConsistentID)",
            category=CATEGORY_ENCODE,
            description="Shows the regions ConsistentID cuts out: 5 masks per image (face, eye, ear, nose, lip) and a coloured overlay.",
            inputs=[
                io.Image.Input("image", tooltip="one or more face photos, e.g. from Load Image"),
                FaceParser.Input("face_parser", tooltip="from Load Face Parser (ConsistentID)"),
                io.Combo.Input("resolution", options=["sd15 (512)", "sdxl (1280)"], default="sd15 (512)",
                               tooltip="the size the photo is squashed to before parsing, as the official pipelines do"),
            ],
            outputs=[
                io.Mask.Output(display_name="region_masks",
                               tooltip="5 masks per image, in the order face, eye, ear, nose, lip (empty where a "
                                       "region is missing); e.g. to Mask To Image"),
                io.Image.Output(display_name="overlay", tooltip="the photo with the parser's classes coloured; "
                                                                "to Preview Image"),
            ],
        )

    @classmethod
    def execute(cls, image, face_parser, resolution) -> io.NodeOutput:
        from PIL import Image

        size = PARSE_SIZE["sdxl" if resolution.startswith("sdxl") else "sd15"]
        arrays = image_batch_to_uint8(image)
        use_face_parser(face_parser)
        masks, overlays = [], []
        for _index, array in each_with_progress(arrays, comfy_progress()):
            rgb = to_rgb_uint8(array)
            labels = parse_image(face_parser, Image.fromarray(rgb), size)
            masks.append(torch.from_numpy(group_masks(labels, *rgb.shape[:2])))
            overlays.append(overlay(rgb, labels))
        return io.NodeOutput(torch.cat(masks), uint8_to_image_batch(overlays))


class ConsistentIDEncodeFace(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentIDEncodeFace",
            display_name="Encode Face (ConsistentID)",
            category=CATEGORY_ENCODE,
            description="Reference photo(s) -> identity embedding, CLIP features and the 5 facial-region features.",
            inputs=[
                ConsistentIDModel.Input("consistentid", tooltip="from Load ConsistentID Weights: sets SD1.5 or "
                                                                "SDXL preprocessing"),
                io.ClipVision.Input("clip_vision", tooltip="CLIP-ViT-H-14-laion2B-s32B-b79K from ComfyUI's Load CLIP Vision"),
                FaceAnalysis.Input("face_analysis", tooltip="from Load InsightFace (ConsistentID), buffalo_l"),
                FaceParser.Input("face_parser", tooltip="from Load Face Parser (ConsistentID)"),
                io.Image.Input("image", tooltip="one or more reference photos of the same person"),
                io.Combo.Input("face_select", options=FACE_SELECT, default="first",
                               tooltip="which face of a photo: first = the official detector order"),
                io.Combo.Input("combine", options=list(COMBINE_METHODS), default="average",
                               tooltip="how several reference photos become one identity"),
                io.Combo.Input("on_no_face", options=list(ON_NO_FACE), default="error",
                               tooltip="error: stop and name the image; skip: drop it; zeros: official silent zero identity"),
                io.Combo.Input("color_order", options=COLOR_ORDER, default="official", optional=True,
                               tooltip="colour order fed to insightface. official: RGB for SD1.5 (as the official "
                                       "pipeline), BGR for SDXL; bgr is what insightface expects"),
            ],
            outputs=[
                ConsistentIDEmbeds.Output(display_name="embeds",
                                          tooltip="identity + region features; to Apply ConsistentID, ConsistentID "
                                                  "Conditioning or Save ConsistentID Embeds"),
                io.Image.Output(display_name="preview",
                                tooltip="one row per photo: the faces found (the chosen one green), the parse "
                                        "and the region crops used; to Preview Image"),
            ],
        )

    @classmethod
    def execute(cls, consistentid, clip_vision, face_analysis, face_parser, image, face_select, combine,
                on_no_face, color_order="official") -> io.NodeOutput:
        arrays = image_batch_to_uint8(image)  # the photos' own faults first: they cost nothing to check
        check_clip_vision(clip_vision)
        sources = [f"image {i} of the batch" for i in range(len(arrays))]
        use_face_parser(face_parser)
        embeds, analyses = encode_references(
            arrays, face_analysis, face_parser, comfy_vision_encoder(clip_vision), consistentid.arch,
            face_select=face_select, color_order=color_order, on_no_face=on_no_face, sources=sources,
            checkpoint=consistentid.name, vision_name="the CLIP vision model",
            cache=ENCODE_CACHE, vision_model=clip_vision, progress=comfy_progress(),
        )
        if embeds.num_references > 1:
            embeds = embeds.combine(combine)
        preview = stack_previews([reference_preview(a) for a in analyses])
        return io.NodeOutput(embeds, uint8_to_image_batch([preview]))
