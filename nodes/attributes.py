"""ConsistentIDEncodeAttributes: hair, glasses, hat, earrings, necklace (and head outline) of an attribute photo.

The attribute branch needs ConsistentID weights trained with the attribute stage
(``python -m training.train --stage attributes``); the released official files do not have it.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..consistentid_core.attributes.photos import CROP_MODES, encode_attribute_photos
from .glue.images import image_batch_to_uint8
from .glue.memory import use_face_parser
from .glue.progress import comfy_progress
from .glue.types import CATEGORY_FLEXID, AttributeEmbedsType, FaceParser
from .glue.vision import check_clip_vision, comfy_vision_encoder


class ConsistentIDEncodeAttributes(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentIDEncodeAttributes",
            display_name="Encode Attributes (ConsistentID, FlexID)",
            category=CATEGORY_FLEXID,
            description="Hair, glasses, hat, earrings, necklace and head outline of a photo, for the attribute branch "
                        "(needs ConsistentID weights trained with the attribute stage; none are published, so this "
                        "node is experimental). Nothing found: the branch is skipped.",
            inputs=[
                io.ClipVision.Input("clip_vision", tooltip="CLIP-ViT-H-14-laion2B-s32B-b79K from ComfyUI's Load CLIP "
                                                           "Vision (the one Encode Face uses)"),
                FaceParser.Input("face_parser", tooltip="from Load Face Parser (ConsistentID): finds hair, "
                                                        "glasses, hat..."),
                io.Image.Input("image", tooltip="the photo whose hair, glasses, hat... you want"),
                io.Combo.Input("mode", options=list(CROP_MODES), default="crop",
                               tooltip="crop: a loose crop around each attribute; full: the whole frame, masked"),
                io.Combo.Input("resolution", options=["sd15 (512)", "sdxl (1280)"], default="sd15 (512)",
                               tooltip="the size the photo is squashed to before parsing: match the model "
                                       "(SD1.5 or SDXL)"),
            ],
            outputs=[AttributeEmbedsType.Output(display_name="attribute_embeds",
                                                tooltip="to attribute_embeds of Apply ConsistentID to Model (needs "
                                                        "weights with the attribute branch)")],
            is_experimental=True,
        )

    @classmethod
    def execute(cls, clip_vision, face_parser, image, mode, resolution) -> io.NodeOutput:
        arch = "sdxl" if resolution.startswith("sdxl") else "sd15"
        photos = image_batch_to_uint8(image, "attribute image")  # the photos' own faults first: free to check
        check_clip_vision(clip_vision)
        encoder = comfy_vision_encoder(clip_vision)
        use_face_parser(face_parser)
        # None when no photo shows an attribute (logged); the Apply node then skips the branch.
        return io.NodeOutput(encode_attribute_photos(photos, face_parser, encoder, arch, mode=mode,
                                                     progress=comfy_progress()))
