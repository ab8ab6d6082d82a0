"""Face inpainting: the face region of a target photo as a MASK for ComfyUI's stock inpaint nodes."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..consistentid_core.constants import PARSE_SIZE
from ..consistentid_core.face.masks import (
    DEFAULT_FEATHER, DEFAULT_GROW, MASK_SOURCES, MAX_FEATHER, MAX_GROW, check_grow_feather, check_source, face_mask,
    mask_preview,
)
from ..consistentid_core.progress import each_with_progress
from .glue.images import image_batch_to_uint8, uint8_to_image_batch
from .glue.inputs import FACE_SELECT
from .glue.memory import use_face_parser
from .glue.progress import comfy_progress
from .glue.types import CATEGORY_ENCODE, FaceAnalysis, FaceParser


class ConsistentIDFaceMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentIDFaceMask",
            display_name="Face Mask For Inpainting (ConsistentID)",
            category=CATEGORY_ENCODE,
            description="The face of a target photo as a MASK for inpainting: insightface's box (or the parsed face) "
                        "grown by 'grow' px, with a soft edge of 'feather' px inside that; exactly 0 everywhere else.",
            inputs=[
                io.Image.Input("image", tooltip="the target photo whose face is replaced (one or more, same size); "
                                                "sides divisible by 8 fit the VAE exactly"),
                FaceAnalysis.Input("face_analysis", tooltip="from Load InsightFace (ConsistentID); finds the face"),
                FaceParser.Input("face_parser", optional=True,
                                 tooltip="from Load Face Parser (ConsistentID); needed only for source 'parser'"),
                io.Combo.Input("source", options=list(MASK_SOURCES), default="box",
                               tooltip="box: insightface's face box, a rectangle; parser: the parsed face (skin, "
                                       "brows, eyes, ears, nose, mouth) of that face, hair left out"),
                io.Int.Input("grow", default=DEFAULT_GROW, min=0, max=MAX_GROW, step=1,
                             tooltip="px added around the face: the box widened on every side, or every pixel "
                                     "within this distance of the parsed face; the mask is exactly 0 beyond"),
                io.Int.Input("feather", default=DEFAULT_FEATHER, min=0, max=MAX_FEATHER, step=1,
                             tooltip="width in px of the soft edge, inside the grown region (it never widens it); "
                                     "0 = hard edge"),
                io.Combo.Input("face_select", options=FACE_SELECT, default="largest",
                               tooltip="which face of the photo: largest, highest_score, first (detector order) "
                                       "or index:N"),
            ],
            outputs=[
                io.Mask.Output(display_name="mask",
                               tooltip="the face region, 0..1, one per image; to InpaintModelConditioning (or VAE "
                                       "Encode For Inpainting) and to ImageCompositeMasked"),
                io.Image.Output(display_name="preview",
                                tooltip="the photo with the mask in red and the face box in green; to Preview Image"),
            ],
        )

    @classmethod
    def validate_inputs(cls, grow=None, feather=None, source=None):
        # No **kwargs: ComfyUI then still checks every other input itself, and skips only its min/max and
        # choice checks of these three, which are checked here.  Linked values are None here (execute
        # checks them when they arrive).
        try:
            check_grow_feather(0 if grow is None else grow, 0 if feather is None else feather)
            if source is not None:
                check_source(source)
        except ValueError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, image, face_analysis, source, grow, feather, face_select, face_parser=None) -> io.NodeOutput:
        arrays = image_batch_to_uint8(image, "target image")
        if source == "parser" and face_parser is not None:
            use_face_parser(face_parser)
        masks, previews = [], []
        for index, array in each_with_progress(arrays, comfy_progress()):
            found = face_mask(face_analysis, array, source=source, grow=grow, feather=feather,
                              face_select=face_select, parser=face_parser, parse_size=PARSE_SIZE["sd15"],
                              image_name=f"target image {index} of the batch")
            masks.append(torch.from_numpy(found.mask))
            previews.append(mask_preview(array, found.mask, found.box))
        return io.NodeOutput(torch.stack(masks), uint8_to_image_batch(previews))
