"""Custom ComfyUI socket types of the pack, its Add Node menu categories and its callback key."""

from comfy_api.latest import io

ConsistentIDModel = io.Custom("CONSISTENTID")  # a loaded ConsistentIDCheckpoint
ConsistentIDEmbeds = io.Custom("CONSISTENTID_EMBEDS")  # consistentid_core.embeds.FaceEmbeds
FaceParser = io.Custom("CONSISTENTID_FACE_PARSER")  # a BiSeNet torch module
AttributeEmbedsType = io.Custom("CONSISTENTID_ATTRIBUTES")  # consistentid_core.attributes.photos.AttributeEmbeds
RegionStrengthsType = io.Custom("CONSISTENTID_REGION_STRENGTHS")  # consistentid_core.prompt.region_control.RegionStrengths
FaceAnalysis = io.FaceAnalysis  # an insightface FaceAnalysis (ComfyUI's shared FACE_ANALYSIS type)

# The key of the pack's callbacks on ComfyUI ModelPatchers (model unload releases our caches).
CALLBACK_KEY = "consistentid"

# The pack's root in the Add Node menu; every node sits in one of the sub-categories below.
CATEGORY = "ConsistentID"
CATEGORY_LOADERS = f"{CATEGORY}/loaders"  # weights, insightface, face parser
CATEGORY_ENCODE = f"{CATEGORY}/encode"  # photo -> embeds, the region preview, the face mask for inpainting
CATEGORY_EMBEDS = f"{CATEGORY}/embeds"  # save, load, combine embeds
CATEGORY_APPLY = f"{CATEGORY}/apply"  # model patch and prompt conditioning
CATEGORY_SAMPLING = f"{CATEGORY}/sampling"  # the merge step
CATEGORY_FLEXID = f"{CATEGORY}/flexid"  # decoupled control: regions, strengths, pose, attributes
