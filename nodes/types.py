"""Custom ComfyUI socket types of the pack."""

from comfy_api.latest import io

ConsistentIDModel = io.Custom("CONSISTENTID")  # a loaded ConsistentIDCheckpoint
ConsistentIDEmbeds = io.Custom("CONSISTENTID_EMBEDS")  # consistentid_core.embeds.FaceEmbeds
FaceParser = io.Custom("CONSISTENTID_FACE_PARSER")  # a BiSeNet torch module
AttributeEmbedsType = io.Custom("CONSISTENTID_ATTRIBUTES")  # consistentid_core.attributes.AttributeEmbeds
RegionStrengthsType = io.Custom("CONSISTENTID_REGION_STRENGTHS")  # consistentid_core.region_control.RegionStrengths
FaceAnalysis = io.FaceAnalysis  # an insightface FaceAnalysis (ComfyUI's shared FACE_ANALYSIS type)

CATEGORY = "ConsistentID"
