"""Face nodes: parse a face into regions, and encode reference photos into ConsistentID embeds."""

from __future__ import annotations

import logging

import numpy as np
import torch
from comfy_api.latest import io

from ..consistentid_core.clip_features import CLIP_WIDTH, KNOWN_WIDTHS
from ..consistentid_core.embeds import COMBINE_METHODS
from ..consistentid_core.encode_cache import ENCODE_CACHE
from ..consistentid_core.errors import ModelFileError
from ..consistentid_core.face_analysis import to_rgb_uint8
from ..consistentid_core.face_pipeline import ON_NO_FACE, PARSE_SIZE, encode_references
from ..consistentid_core.parsing import GROUP_ORDER, label_masks, parse_image, region_group, select_regions
from ..consistentid_core.preview import label_overlay, reference_preview, stack_previews
from .images import image_batch_to_uint8, uint8_to_image_batch
from .memory import use_face_parser
from .progress import comfy_progress, each_with_progress
from .types import CATEGORY_ENCODE, ConsistentIDEmbeds, ConsistentIDModel, FaceAnalysis, FaceParser

logger = logging.getLogger("consistentid")

FACE_SELECT = ["first", "largest", "highest_score"] + [f"index:{i}" for i in range(8)]
COLOR_ORDER = ["official", "bgr", "rgb"]


def check_clip_vision(clip_vision) -> None:
    """Refuses a CLIP vision model other than ViT-H before running it (a bigG pass is expensive)."""
    vision = getattr(getattr(clip_vision, "model", None), "vision_model", None)
    embeddings = getattr(vision, "embeddings", None)
    cls_embed = getattr(embeddings, "class_embedding", None)
    width = None if cls_embed is None else int(cls_embed.shape[0])
    layers = len(getattr(getattr(vision, "encoder", None), "layers", []))
    if width != CLIP_WIDTH or layers != 32:
        kind = KNOWN_WIDTHS.get(width, "an unknown image encoder")
        raise ModelFileError(
            f"the CLIP vision model given is {kind} (width {width}, {layers} layers), not ViT-H/14; ConsistentID needs "
            "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors (the SD1.5 IP-Adapter image encoder) from models/clip_vision"
        )


def comfy_vision_encoder(clip_vision):
    """pixels [N,3,224,224] (already normalised) -> penultimate hidden states, through ComfyUI's model manager."""
    import comfy.model_management

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        comfy.model_management.load_model_gpu(clip_vision.patcher)
        out = clip_vision.model(pixel_values=pixels.to(clip_vision.load_device), intermediate_output=-2)
        return out[1]

    return encode


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
            kept = select_regions(label_masks(labels))
            h, w = rgb.shape[:2]
            slots = np.zeros((len(GROUP_ORDER), h, w), dtype=np.float32)
            for name, mask in kept.items():
                resized = np.asarray(Image.fromarray(mask).resize((w, h), Image.BICUBIC), dtype=np.float32) / 255
                slots[GROUP_ORDER.index(region_group(name))] = resized
            masks.append(torch.from_numpy(slots))
            overlays.append(label_overlay(rgb, labels))
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
