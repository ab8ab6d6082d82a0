"""FlexID-style control with the released weights: regions from other photos, per-region strengths, pose."""

from __future__ import annotations

from comfy_api.latest import io

from ..consistentid_core.face.keypoints import pose_keypoints
from ..consistentid_core.prompt.region_control import RegionStrengths, mix_regions
from .glue.images import image_batch_to_uint8, uint8_to_image_batch
from .glue.inputs import COLOR_ORDER, FACE_SELECT
from ..consistentid_core.progress import each_with_progress
from .glue.progress import comfy_progress
from .glue.types import CATEGORY_FLEXID, ConsistentIDEmbeds, FaceAnalysis, RegionStrengthsType

REGION_INPUTS = (("face", "face_shape_embeds"), ("eye", "eyes_embeds"), ("ear", "ears_embeds"),
                 ("nose", "nose_embeds"), ("lip", "mouth_embeds"))
REGION_WORDS = {"face": "face shape", "eye": "eyes", "ear": "ears", "nose": "nose", "lip": "mouth"}
STRENGTH_TOOLTIPS = {
    **{name: f"strength of the {word} token, 0..1: 0 = the plain text token, 1 = the fused facial token (official)"
       for name, word in (("face_shape", "face shape"), ("eyes", "eyes"), ("ears", "ears"), ("nose", "nose"),
                          ("mouth", "mouth"))},
    "region_scale": "multiplies all five region strengths, 0..1 (1 = as set)",
}


class ConsistentIDRegionMix(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentIDRegionMix",
            display_name="ConsistentID Regions From Other Photos",
            category=CATEGORY_FLEXID,
            description="Keeps the identity of 'embeds' and takes each connected region (face shape, eyes, ears, "
                        "nose, mouth) from the embeds of another photo.",
            inputs=[ConsistentIDEmbeds.Input("embeds", tooltip="the identity photo's embeds (from Encode Face); "
                                                               "its ID and regions are kept unless replaced")]
            + [ConsistentIDEmbeds.Input(name, optional=True,
                                        tooltip=f"optional: embeds of the photo whose {REGION_WORDS[group]} to use "
                                                "(from Encode Face, same architecture)")
               for group, name in REGION_INPUTS],
            outputs=[ConsistentIDEmbeds.Output(display_name="embeds",
                                               tooltip="the identity with the replaced regions; to Apply "
                                                       "ConsistentID or ConsistentID Conditioning")],
        )

    @classmethod
    def execute(cls, embeds, **regions) -> io.NodeOutput:
        donors = {group: regions[name] for group, name in REGION_INPUTS if regions.get(name) is not None}
        return io.NodeOutput(mix_regions(embeds, donors))


class ConsistentIDRegionStrengths(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        slider = dict(default=1.0, min=0.0, max=1.0, step=0.05)
        return io.Schema(
            node_id="ConsistentIDRegionStrengths",
            display_name="ConsistentID Region Strengths",
            category=CATEGORY_FLEXID,
            description="0 = the plain text token, 1 = the fused facial token; region_scale scales all five. "
                        "The identity tokens have their own weight in Apply ConsistentID to Model.",
            inputs=[io.Float.Input(name, tooltip=tooltip, **slider) for name, tooltip in STRENGTH_TOOLTIPS.items()],
            outputs=[RegionStrengthsType.Output(display_name="region_strengths",
                                                tooltip="to region_strengths of ConsistentID Conditioning")],
        )

    @classmethod
    def execute(cls, face_shape, eyes, ears, nose, mouth, region_scale) -> io.NodeOutput:
        per_group = {"face": face_shape, "eye": eyes, "ear": ears, "nose": nose, "lip": mouth}
        return io.NodeOutput(RegionStrengths(per_group, region_scale))


class ConsistentIDFaceKeypoints(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentIDFaceKeypoints",
            display_name="Face Keypoints For ControlNet (ConsistentID)",
            category=CATEGORY_FLEXID,
            description="The 5 insightface keypoints of a pose photo drawn the way InstantID-style ControlNets expect; "
                        "feed it to ComfyUI's Apply ControlNet.",
            inputs=[
                FaceAnalysis.Input("face_analysis", tooltip="from Load InsightFace (ConsistentID)"),
                io.Image.Input("image", tooltip="the photo whose head pose you want"),
                io.Combo.Input("face_select", options=FACE_SELECT, default="largest",
                               tooltip="which face of the photo: largest, highest_score, first (detector order) "
                                       "or index:N"),
                io.Combo.Input("color_order", options=COLOR_ORDER, default="bgr",
                               tooltip="colour order fed to insightface; bgr is what it expects (official = bgr "
                                       "here: a pose photo is not a reference photo)"),
            ],
            outputs=[io.Image.Output(display_name="keypoints",
                                     tooltip="the 5 keypoints on black, same size as the photo; to Apply "
                                             "ControlNet with an InstantID-style ControlNet")],
        )

    @classmethod
    def execute(cls, face_analysis, image, face_select, color_order) -> io.NodeOutput:
        pictures = []
        arrays = image_batch_to_uint8(image, "pose image")
        for index, array in each_with_progress(arrays, comfy_progress()):
            pictures.append(pose_keypoints(face_analysis, array, face_select, color_order, source=f"pose image {index}"))
        return io.NodeOutput(uint8_to_image_batch(pictures))
