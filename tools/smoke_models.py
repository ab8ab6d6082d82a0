"""Random-weight stand-ins for ``run_workflow.py --smoke``: every file the example workflows name.

The pictures such a run makes are noise.  What it proves is that ComfyUI loads the pack, every
loader reads its file, the face pipeline finds the (synthetic) face and sampling runs to the end.
Built files are cached (see tools/random_models.py), so only the first run takes minutes.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from tools import random_models
from tools.insightface_standins import make_buffalo_l, red_square_image

SMOKE_SIZE = 64
SMOKE_STEPS = 2
CHECKPOINTS = {"sd15": "smoke_sd15_random.safetensors", "sdxl": "smoke_sdxl_random.safetensors"}
CHECKPOINT = CHECKPOINTS["sd15"]
# The stand-in detector "sees" a saturated red square in the first channel of insightface's blob,
# which is the last channel of the array it is given.  The official colour order feeds RGB to
# insightface for SD1.5 (so the photo's square must be blue) and BGR for SDXL (red); the
# keypoint node always feeds BGR, and only the SDXL workflow has one.
PHOTO_COLOURS = {"sd15": "blue", "sdxl": "red"}
# face_inpaint's target photo: grey noise (no "redness" for the stand-in detector) with a red 64 px square,
# which the face mask node (insightface's own BGR order) detects at 2x in the 640 px detector input.  Its
# sides stay divisible by 8, so the VAE's latent covers it exactly and the composite lines up.
TARGET_SIZE = 320
TARGET_FACE_BOX = (128, 128, 192, 192)  # x1, y1, x2, y2 of the square: the box the detector finds


def workflow_arch(prompt: dict) -> str:
    """``sdxl`` when the workflow loads an SDXL checkpoint (by its title, as the examples name it)."""
    titles = (node.get("_meta", {}).get("title", "") for node in prompt.values())
    return "sdxl" if any("SDXL" in title for title in titles) else "sd15"


def _photo(path: str, offset: int, colour: str) -> None:
    square = red_square_image(640, ((192 + offset, 192, 128, 255),), color=colour)
    Image.fromarray(np.ascontiguousarray(square)).save(path)


def place_models(models_dir: str, arch: str = "sd15") -> None:
    """Every file the example workflows of ``arch`` name, with random weights, under ``models_dir``.

    SD1.5 takes about 4 GB of cache; SDXL about 13 GB more and a few minutes for its first build."""
    consistentid = os.path.join(models_dir, "consistentid")
    if arch == "sdxl":
        from tools import random_sdxl_models

        random_sdxl_models.sdxl_checkpoint(os.path.join(models_dir, "checkpoints", CHECKPOINTS["sdxl"]))
        random_sdxl_models.instantid_controlnet(
            os.path.join(models_dir, "controlnet", "instantid", "diffusion_pytorch_model.safetensors"))
        random_models.consistentid_checkpoint(os.path.join(consistentid, "ConsistentID_SDXL-v1.bin"), "sdxl")
        random_models.consistentid_attributes_checkpoint(
            os.path.join(consistentid, "ConsistentID_SDXL-v1-attributes.safetensors"), "sdxl")
    else:
        random_models.sd15_checkpoint(os.path.join(models_dir, "checkpoints", CHECKPOINTS["sd15"]))
        random_models.consistentid_checkpoint(os.path.join(consistentid, "ConsistentID-v1.bin"))
        random_models.consistentid_attributes_checkpoint(
            os.path.join(consistentid, "ConsistentID-v1-attributes.safetensors"))
    random_models.face_parser(os.path.join(consistentid, "face_parsing.pth"))
    random_models.clip_vision_vit_h(os.path.join(models_dir, "clip_vision", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"))
    make_buffalo_l(os.path.join(models_dir, "insightface", "models", "buffalo_l"))


def _target_photo(path: str) -> None:
    grey = np.random.default_rng(7).integers(0, 96, (TARGET_SIZE, TARGET_SIZE, 1), dtype=np.uint8)
    image = np.repeat(grey, 3, axis=2)
    x1, y1, x2, y2 = TARGET_FACE_BOX
    image[y1:y2, x1:x2] = (255, 0, 0)
    Image.fromarray(image).save(path)


def shrink(prompt: dict, input_dir: str) -> dict:
    """The workflow on the stand-ins: synthetic photos, the random checkpoint, 64 px, 2 steps (an inpainting
    target photo keeps its TARGET_SIZE: its latent comes from the photo)."""
    arch = workflow_arch(prompt)
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "LoadImage" and "target" in inputs["image"]:
            _target_photo(os.path.join(input_dir, inputs["image"]))
        elif kind == "LoadImage":
            _photo(os.path.join(input_dir, inputs["image"]), 0 if "2" not in inputs["image"] else 64,
                   PHOTO_COLOURS[arch])
        elif kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = CHECKPOINTS[arch]
        elif kind == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = SMOKE_SIZE
        elif kind in ("KSampler", "ConsistentIDKSampler", "ConsistentIDMergeStep"):
            inputs["steps"] = SMOKE_STEPS
            if "merge_step" in inputs:
                inputs["merge_step"] = 0
    return prompt


def prepare(host, prompt: dict, input_dir: str) -> dict:
    place_models(host.folder_paths.models_dir, workflow_arch(prompt))
    host.folder_paths.filename_list_cache.clear()
    return shrink(prompt, input_dir)
