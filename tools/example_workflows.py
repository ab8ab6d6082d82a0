"""The example workflows, written once here in API form.

``python tools/example_workflows.py`` writes ``example_workflows/api/<name>_api.json`` (what the tests
and ``tools/run_workflow.py`` run); ``tools/ui_workflows.py`` turns them into the UI-format files
of ``example_workflows/`` that ComfyUI's frontend opens.
"""

from __future__ import annotations

import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_DIR = os.path.join(REPO, "example_workflows", "api")

SD15_CHECKPOINT = "realisticVisionV60B1_v51VAE.safetensors"
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
SD15_WEIGHTS = "ConsistentID-v1.bin"
SDXL_WEIGHTS = "ConsistentID_SDXL-v1.bin"
CLIP_VISION = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
PARSER = "consistentid/face_parsing.pth"
PHOTO = "consistentid_reference.png"
PHOTO_2 = "consistentid_reference_2.png"
# FlexID: weights trained with the attribute stage (the released files have no attribute branch).
SD15_ATTRIBUTE_WEIGHTS = "ConsistentID-v1-attributes.safetensors"
SDXL_ATTRIBUTE_WEIGHTS = "ConsistentID_SDXL-v1-attributes.safetensors"
ATTRIBUTE_PHOTO = "consistentid_attributes_2.png"  # photo B: hair and glasses
EYES_PHOTO = "consistentid_eyes_3.png"  # photo C
POSE_PHOTO = "consistentid_pose_4.png"  # photo D
TARGET_PHOTO = "consistentid_target.png"  # face_inpaint: the photo the face goes into
INSTANTID_CONTROLNET = "instantid/diffusion_pytorch_model.safetensors"
PROMPT = "cinematic photo, A man, in a forest, adventuring, 50mm photograph, half-length portrait, film, bokeh, professional, 4k, highly detailed"
NEGATIVE = "monochrome, lowres, bad anatomy, worst quality, low quality, blurry"
SDXL_NEGATIVE = "(worst quality, low quality, illustration, 3d, 2d, painting, cartoons, sketch), open mouth"
# The nodes' default merge_at (consistentid_core.prompt.conditioning.DEFAULT_MERGE_AT: the official switch after step
# 30 of 50), written out so that this file needs no torch; tests/test_node_metadata.py checks that they agree.
MERGE_AT = 0.62
# Every widget of ConsistentIDApplyModel, as the frontend sends them (the attr_* ones are optional).
APPLY_DEFAULTS = dict(weight=1.0, lora_strength=1.0, start_at=0.0, end_at=1.0, attr_weight=1.0, attr_start_at=0.0,
                      attr_end_at=1.0)


def link(node: str, slot: int = 0):
    return [node, slot]


def node(class_type: str, title: str, **inputs):
    return {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}


def face_encoder_nodes(weights: str, photo_node: str = "6") -> dict:
    return {
        "2": node("ConsistentIDModelLoader", "ConsistentID weights", consistentid_file=weights),
        "3": node("CLIPVisionLoader", "CLIP ViT-H", clip_name=CLIP_VISION),
        "4": node("ConsistentIDFaceAnalysisLoader", "InsightFace", model_name="buffalo_l", provider="auto"),
        "5": node("ConsistentIDFaceParserLoader", "Face parser", parser_file=PARSER, device="auto"),
        "7": node("ConsistentIDEncodeFace", "Encode face", consistentid=link("2"), clip_vision=link("3"),
                  face_analysis=link("4"), face_parser=link("5"), image=link(photo_node), face_select="first",
                  combine="average", on_no_face="error", color_order="official"),
        "13": node("PreviewImage", "Face and regions used", images=link("7", 1)),
    }


def sampling_nodes(model, positive, negative, width, height, steps, cfg, seed, prefix) -> dict:
    return {
        "9": node("EmptyLatentImage", "Size", width=width, height=height, batch_size=1),
        "10": node("KSampler", "KSampler", model=model, positive=positive, negative=negative, latent_image=link("9"),
                   seed=seed, steps=steps, cfg=cfg, sampler_name="euler",
                   scheduler="normal", denoise=1.0),
        "11": node("VAEDecode", "Decode", samples=link("10"), vae=link("1", 2)),
        "12": node("SaveImage", "Portrait", images=link("11"), filename_prefix=prefix),
    }


def with_merge_step_sampler(graph: dict, merge_step: int = 30) -> dict:
    """Swaps the stock KSampler of ``sampling_nodes`` for ConsistentIDKSampler."""
    graph["10"]["class_type"] = "ConsistentIDKSampler"
    graph["10"]["_meta"]["title"] = f"KSampler (merge step {merge_step})"
    graph["10"]["inputs"]["merge_step"] = merge_step
    return graph


def sd15_portrait() -> dict:
    graph = {
        "1": node("CheckpointLoaderSimple", "SD1.5 checkpoint", ckpt_name=SD15_CHECKPOINT),
        "6": node("LoadImage", "Reference photo", image=PHOTO),
        **face_encoder_nodes(SD15_WEIGHTS),
        "8": node("ConsistentIDApply", "Apply ConsistentID", model=link("1"), clip=link("1", 1), consistentid=link("2"),
                  embeds=link("7"), text=PROMPT, negative_text=NEGATIVE, weight=1.0, merge_at=MERGE_AT),
    }
    graph.update(sampling_nodes(link("8"), link("8", 1), link("8", 2), 512, 768, 50, 5.0, 2024, "ConsistentID/sd15"))
    return graph


def unified_loader_portrait() -> dict:
    """The SD1.5 portrait with ConsistentID Unified Loader in place of the four loaders: it finds every file
    by name for the model's architecture."""
    graph = {
        "1": node("CheckpointLoaderSimple", "SD1.5 checkpoint", ckpt_name=SD15_CHECKPOINT),
        "6": node("LoadImage", "Reference photo", image=PHOTO),
        "2": node("ConsistentIDUnifiedLoader", "ConsistentID Unified Loader", model=link("1"), consistentid_file="auto",
                  clip_vision_file="auto", parser_file="auto", provider="auto", parser_device="auto"),
        "7": node("ConsistentIDEncodeFace", "Encode face", consistentid=link("2", 1), clip_vision=link("2", 2),
                  face_analysis=link("2", 3), face_parser=link("2", 4), image=link("6"), face_select="first",
                  combine="average", on_no_face="error", color_order="official"),
        "13": node("PreviewImage", "Face and regions used", images=link("7", 1)),
        "8": node("ConsistentIDApply", "Apply ConsistentID", model=link("2"), clip=link("1", 1),
                  consistentid=link("2", 1), embeds=link("7"), text=PROMPT, negative_text=NEGATIVE, weight=1.0,
                  merge_at=MERGE_AT),
    }
    graph.update(sampling_nodes(link("8"), link("8", 1), link("8", 2), 512, 768, 50, 5.0, 2024,
                                "ConsistentID/unified_loader"))
    return graph


def sd15_stock_ksampler() -> dict:
    graph = {
        "1": node("CheckpointLoaderSimple", "SD1.5 checkpoint", ckpt_name=SD15_CHECKPOINT),
        "6": node("LoadImage", "Reference photo", image=PHOTO),
        **face_encoder_nodes(SD15_WEIGHTS),
        "8": node("ConsistentIDApplyModel", "Apply ConsistentID model", model=link("1"), consistentid=link("2"),
                  embeds=link("7"), **APPLY_DEFAULTS),
        "14": node("ConsistentIDMergeStep", "Merge step 30 of 50", model=link("8"), scheduler="normal", steps=50,
                   merge_step=30, denoise=1.0),
        "15": node("ConsistentIDConditioning", "ConsistentID conditioning", clip=link("1", 1), consistentid=link("2"),
                   embeds=link("7"), text=PROMPT, negative_text=NEGATIVE, caption="auto", merge_at=link("14"),
                   emphasis="literal (official)", custom_caption="", mask_strength=1.0),
    }
    graph.update(sampling_nodes(link("8"), link("15"), link("15", 1), 512, 768, 50, 5.0, 2024, "ConsistentID/sd15_ksampler"))
    return graph


def sdxl_portrait() -> dict:
    graph = {
        "1": node("CheckpointLoaderSimple", "SDXL checkpoint", ckpt_name=SDXL_CHECKPOINT),
        "6": node("LoadImage", "Reference photo", image=PHOTO),
        **face_encoder_nodes(SDXL_WEIGHTS),
        "8": node("ConsistentIDApplyModel", "Apply ConsistentID model", model=link("1"), consistentid=link("2"),
                  embeds=link("7"), **APPLY_DEFAULTS),
        "15": node("ConsistentIDConditioning", "ConsistentID conditioning", clip=link("1", 1), consistentid=link("2"),
                   embeds=link("7"), text="A woman wearing a santa hat", negative_text=SDXL_NEGATIVE, caption="auto",
                   merge_at=MERGE_AT, emphasis="literal (official)", custom_caption="", mask_strength=1.0),
    }
    graph.update(sampling_nodes(link("8"), link("15"), link("15", 1), 864, 1152, 50, 7.5, 222, "ConsistentID/sdxl"))
    return with_merge_step_sampler(graph)


def save_embeds_from_several_photos() -> dict:
    graph = {
        "6": node("LoadImage", "Reference photo 1", image=PHOTO),
        "16": node("LoadImage", "Reference photo 2", image=PHOTO_2),
        **face_encoder_nodes(SD15_WEIGHTS, photo_node="18"),
        "18": node("ImageBatch", "Both photos", image1=link("6"), image2=link("16")),
        "19": node("ConsistentIDSaveEmbeds", "Save embeds", embeds=link("7"), filename_prefix="consistentid/my_person"),
    }
    return graph


def portrait_from_saved_embeds() -> dict:
    graph = {
        "1": node("CheckpointLoaderSimple", "SD1.5 checkpoint", ckpt_name=SD15_CHECKPOINT),
        "2": node("ConsistentIDModelLoader", "ConsistentID weights", consistentid_file=SD15_WEIGHTS),
        "7": node("ConsistentIDLoadEmbeds", "Saved embeds", embeds_file="output/consistentid/my_person_00001.safetensors",
                  consistentid=link("2")),
        "8": node("ConsistentIDApply", "Apply ConsistentID", model=link("1"), clip=link("1", 1), consistentid=link("2"),
                  embeds=link("7"), text=PROMPT, negative_text=NEGATIVE, weight=1.0, merge_at=MERGE_AT),
    }
    graph.update(sampling_nodes(link("8"), link("8", 1), link("8", 2), 512, 768, 50, 5.0, 2024, "ConsistentID/from_embeds"))
    return graph


def face_parse_preview() -> dict:
    return {
        "6": node("LoadImage", "Reference photo", image=PHOTO),
        "5": node("ConsistentIDFaceParserLoader", "Face parser", parser_file=PARSER, device="auto"),
        "20": node("ConsistentIDFaceParse", "Parse face", image=link("6"), face_parser=link("5"), resolution="sd15 (512)"),
        "21": node("PreviewImage", "Parse overlay", images=link("20", 1)),
        "22": node("MaskToImage", "Masks as images", mask=link("20")),
        "23": node("PreviewImage", "Region masks (face, eye, ear, nose, lip)", images=link("22")),
    }


def flexid_nodes(weights: str, resolution: str) -> dict:
    """Identity from photo A ("6"), hair and glasses from B, eyes from C, each with its own strength."""
    graph = face_encoder_nodes(weights)
    graph.update({
        "30": node("LoadImage", "Photo B: hair and glasses", image=ATTRIBUTE_PHOTO),
        "31": node("ConsistentIDEncodeAttributes", "Attributes of B", clip_vision=link("3"), face_parser=link("5"),
                   image=link("30"), mode="crop", resolution=resolution),
        "32": node("LoadImage", "Photo C: eyes", image=EYES_PHOTO),
        "33": node("ConsistentIDEncodeFace", "Encode C", consistentid=link("2"), clip_vision=link("3"),
                   face_analysis=link("4"), face_parser=link("5"), image=link("32"), face_select="first",
                   combine="average", on_no_face="error", color_order="official"),
        "34": node("ConsistentIDRegionMix", "Identity of A, eyes of C", embeds=link("7"), eyes_embeds=link("33")),
        "35": node("ConsistentIDRegionStrengths", "Region strengths", face_shape=1.0, eyes=1.0, ears=1.0, nose=1.0,
                   mouth=1.0, region_scale=1.0),
        "8": node("ConsistentIDApplyModel", "Apply ConsistentID model (identity + attributes)", model=link("1"),
                  consistentid=link("2"), embeds=link("34"), attribute_embeds=link("31"), **APPLY_DEFAULTS),
    })
    return graph


def flexid_sd15() -> dict:
    graph = {
        "1": node("CheckpointLoaderSimple", "SD1.5 checkpoint", ckpt_name=SD15_CHECKPOINT),
        "6": node("LoadImage", "Photo A: identity", image=PHOTO),
        **flexid_nodes(SD15_ATTRIBUTE_WEIGHTS, "sd15 (512)"),
        "15": node("ConsistentIDConditioning", "ConsistentID conditioning", clip=link("1", 1), consistentid=link("2"),
                   embeds=link("34"), text=PROMPT, negative_text=NEGATIVE, caption="auto", merge_at=MERGE_AT,
                   emphasis="literal (official)", custom_caption="", region_strengths=link("35"),
                   mask_strength=1.0),
    }
    graph.update(sampling_nodes(link("8"), link("15"), link("15", 1), 512, 768, 50, 5.0, 2024, "ConsistentID/flexid_sd15"))
    return with_merge_step_sampler(graph)


def flexid_sdxl_pose() -> dict:
    graph = flexid_sd15()
    graph.update({
        "1": node("CheckpointLoaderSimple", "SDXL checkpoint", ckpt_name=SDXL_CHECKPOINT),
        **flexid_nodes(SDXL_ATTRIBUTE_WEIGHTS, "sdxl (1280)"),
        "40": node("LoadImage", "Photo D: pose", image=POSE_PHOTO),
        "41": node("ConsistentIDFaceKeypoints", "Keypoints of D", face_analysis=link("4"), image=link("40"),
                   face_select="largest", color_order="bgr"),
        "42": node("ControlNetLoader", "InstantID ControlNet", control_net_name=INSTANTID_CONTROLNET),
        "43": node("ControlNetApplyAdvanced", "Pose of D", positive=link("15"), negative=link("15", 1),
                   control_net=link("42"), image=link("41"), strength=0.6, start_percent=0.0, end_percent=1.0,
                   vae=link("1", 2)),
        "44": node("PreviewImage", "Pose keypoints", images=link("41")),
    })
    graph["15"]["inputs"].update(text="A woman wearing a santa hat", negative_text=SDXL_NEGATIVE)
    graph.update(sampling_nodes(link("8"), link("43"), link("43", 1), 864, 1152, 50, 7.5, 222, "ConsistentID/flexid_sdxl"))
    return with_merge_step_sampler(graph)


def two_people() -> dict:
    """Photo A on the left half and photo B on the right: an Apply and a masked Conditioning per person
    (the second Apply keeps the first's LoRA), combined with a scene prompt for the whole picture."""
    width, height = 768, 512
    graph = {
        "1": node("CheckpointLoaderSimple", "SD1.5 checkpoint", ckpt_name=SD15_CHECKPOINT),
        "6": node("LoadImage", "Photo A (left)", image=PHOTO),
        **face_encoder_nodes(SD15_WEIGHTS),
        "16": node("LoadImage", "Photo B (right)", image=PHOTO_2),
        "17": node("ConsistentIDEncodeFace", "Encode B", consistentid=link("2"), clip_vision=link("3"),
                   face_analysis=link("4"), face_parser=link("5"), image=link("16"), face_select="first",
                   combine="average", on_no_face="error", color_order="official"),
        "60": node("SolidMask", "Empty picture", value=0.0, width=width, height=height),
        "61": node("SolidMask", "Half the picture", value=1.0, width=width // 2, height=height),
        "62": node("MaskComposite", "Mask A: left half", destination=link("60"), source=link("61"), x=0, y=0,
                   operation="add"),
        "63": node("InvertMask", "Mask B: right half", mask=link("62")),
        "8": node("ConsistentIDApplyModel", "Apply ConsistentID: A", model=link("1"), consistentid=link("2"),
                  embeds=link("7"), attn_mask=link("62"), **APPLY_DEFAULTS),
        "18": node("ConsistentIDApplyModel", "Apply ConsistentID: B (LoRA kept from A)", model=link("8"),
                   consistentid=link("2"), embeds=link("17"), attn_mask=link("63"), **APPLY_DEFAULTS),
        "15": node("ConsistentIDConditioning", "Prompt of A (left)", clip=link("1", 1), consistentid=link("2"),
                   embeds=link("7"), text="A man, smiling, half-length portrait", negative_text=NEGATIVE,
                   caption="auto", merge_at=MERGE_AT, emphasis="literal (official)", custom_caption="",
                   mask=link("62"), mask_strength=1.0),
        "19": node("ConsistentIDConditioning", "Prompt of B (right)", clip=link("1", 1), consistentid=link("2"),
                   embeds=link("17"), text="A woman, smiling, half-length portrait", negative_text=NEGATIVE,
                   caption="auto", merge_at=MERGE_AT, emphasis="literal (official)", custom_caption="",
                   mask=link("63"), mask_strength=1.0),
        "64": node("CLIPTextEncode", "Scene prompt (whole picture)", clip=link("1", 1),
                   text="cinematic photo, two friends side by side in a park, 50mm photograph, film, bokeh, "
                        "professional, 4k, highly detailed"),
        "65": node("CLIPTextEncode", "Scene negative", clip=link("1", 1), text=NEGATIVE),
        "66": node("ConditioningCombine", "A + B", conditioning_1=link("15"), conditioning_2=link("19")),
        "67": node("ConditioningCombine", "Positive: A + B + scene", conditioning_1=link("66"),
                   conditioning_2=link("64")),
        "68": node("ConditioningCombine", "Negatives of A + B", conditioning_1=link("15", 1),
                   conditioning_2=link("19", 1)),
        "69": node("ConditioningCombine", "Negative: A + B + scene", conditioning_1=link("68"),
                   conditioning_2=link("65")),
        "70": node("PreviewImage", "Face and regions used: B", images=link("17", 1)),
    }
    graph["7"]["_meta"]["title"] = "Encode A"
    graph["13"]["_meta"]["title"] = "Face and regions used: A"
    graph.update(sampling_nodes(link("18"), link("67"), link("69"), width, height, 50, 5.0, 2024,
                                "ConsistentID/two_people"))
    graph["12"]["_meta"]["title"] = "Two people"
    return graph


def face_inpaint() -> dict:
    """The person of the reference photo into the face of a target photo: Face Mask finds the target's face
    (box grown and feathered), stock InpaintModelConditioning and KSampler redraw it with the identity applied,
    and stock ImageCompositeMasked pastes the result back with the same mask, so that every pixel outside
    the mask is the target's own."""
    graph = {
        "1": node("CheckpointLoaderSimple", "SD1.5 checkpoint", ckpt_name=SD15_CHECKPOINT),
        "6": node("LoadImage", "Reference photo", image=PHOTO),
        **face_encoder_nodes(SD15_WEIGHTS),
        "8": node("ConsistentIDApply", "Apply ConsistentID", model=link("1"), clip=link("1", 1), consistentid=link("2"),
                  embeds=link("7"), text="photo of a man, face, natural skin, sharp focus, highly detailed",
                  negative_text=NEGATIVE, weight=1.0, merge_at=MERGE_AT),
        "80": node("LoadImage", "Target photo", image=TARGET_PHOTO),
        "81": node("ConsistentIDFaceMask", "Face mask of the target", image=link("80"), face_analysis=link("4"),
                   face_parser=link("5"), source="box", grow=24, feather=16, face_select="largest"),
        "82": node("PreviewImage", "Mask on the target", images=link("81", 1)),
        "83": node("InpaintModelConditioning", "Inpaint conditioning", positive=link("8", 1), negative=link("8", 2),
                   vae=link("1", 2), pixels=link("80"), mask=link("81"), noise_mask=True),
    }
    graph.update(sampling_nodes(link("8"), link("83"), link("83", 1), 512, 512, 50, 5.0, 2024,
                                "ConsistentID/face_inpaint"))
    del graph["9"]  # the latent is the target's, from the inpaint conditioning
    graph["10"]["inputs"].update(latent_image=link("83", 2), denoise=0.9)
    graph["84"] = node("ImageCompositeMasked", "Paste the new face into the target", destination=link("80"),
                       source=link("11"), x=0, y=0, resize_source=True, mask=link("81"))
    graph["12"]["inputs"]["images"] = link("84")
    return graph


WORKFLOWS = {
    "sd15_portrait": sd15_portrait,
    "unified_loader_portrait": unified_loader_portrait,
    "sd15_stock_ksampler_merge_step": sd15_stock_ksampler,
    "sdxl_portrait": sdxl_portrait,
    "several_photos_save_embeds": save_embeds_from_several_photos,
    "portrait_from_saved_embeds": portrait_from_saved_embeds,
    "face_parse_preview": face_parse_preview,
    "flexid_sd15_identity_attributes_eyes": flexid_sd15,
    "flexid_sdxl_identity_attributes_eyes_pose": flexid_sdxl_pose,
    "two_people": two_people,
    "face_inpaint": face_inpaint,
}


def write_api_workflows(folder: str = API_DIR) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, build in WORKFLOWS.items():
        path = os.path.join(folder, f"{name}_api.json")
        with open(path, "w") as f:
            json.dump(build(), f, indent=2)
            f.write("\n")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write_api_workflows():
        print(written)
