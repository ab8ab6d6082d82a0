"""ConsistentIDEncodeAttributes: hair, glasses, hat, earrings, necklace (and head outline) of an attribute photo.

The attribute branch needs ConsistentID weights trained with the attribute stage
(``python -m training.train --stage attributes``); the released official files do not have it.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io
from PIL import Image

from ..consistentid_core.attributes import CROP_MODES, AttributeEmbeds, encode_attributes
from ..consistentid_core.face_analysis import to_rgb_uint8
from ..consistentid_core.face_pipeline import PARSE_SIZE
from ..consistentid_core.parsing import parse_image
from .encode import check_clip_vision, comfy_vision_encoder
from .images import image_batch_to_uint8
from .memory import use_face_parser
from .progress import comfy_progress, each_with_progress
from .types import CATEGORY_FLEXID, AttributeEmbedsType, FaceParser


def encode_attribute_batch(images, face_parser, clip_vision, mode: str, arch: str,
                           progress=None) -> AttributeEmbeds | None:
    """``progress(done, total)`` before each photo (see face_pipeline.Progress); ComfyUI's by default."""
    arrays = image_batch_to_uint8(images, "attribute image")
    check_clip_vision(clip_vision)
    encoder = comfy_vision_encoder(clip_vision)
    use_face_parser(face_parser)
    rows = []
    for index, array in each_with_progress(arrays, progress or comfy_progress()):
        picture = Image.fromarray(to_rgb_uint8(array))
        labels = parse_image(face_parser, picture, PARSE_SIZE[arch])
        encoded = encode_attributes(picture, labels, encoder, mode=mode, source=f"attribute image {index}")
        if encoded is not None:
            rows.append(encoded)
    if not rows:
        return None  # logged by encode_attributes; the Apply node then skips the branch
    return AttributeEmbeds(torch.cat([r.features for r in rows]), torch.cat([r.valid for r in rows]), rows[0].uncond,
                           [s for r in rows for s in r.sources])


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
        return io.NodeOutput(encode_attribute_batch(image, face_parser, clip_vision, mode, arch))
