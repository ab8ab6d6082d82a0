"""Random-weight stand-ins for ``run_workflow.py --smoke``: every file the SD1.5 workflows name.

The pictures such a run makes are noise.  What it proves is that ComfyUI loads the pack, every
loader reads its file, the face pipeline finds the (synthetic) face and sampling runs to the end.
Built files are cached (see tools/random_models.py), so only the first run takes minutes.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

# Imported now: ComfyHost takes the repository root off sys.path to protect ComfyUI's ``nodes``.
import consistentid_core.attention  # noqa: F401
import consistentid_core.models  # noqa: F401
from tools import random_models
from tools.insightface_standins import make_buffalo_l, red_square_image

SMOKE_SIZE = 64
SMOKE_STEPS = 2
CHECKPOINT = "smoke_sd15_random.safetensors"
UNSUPPORTED = {"SDXL checkpoint": "the smoke mode builds SD1.5 stand-ins only; run an SD1.5 workflow"}


def _photo(path: str, offset: int) -> None:
    # The stand-in detector "sees" a saturated square; SD1.5's official colour order feeds RGB to
    # insightface, which then reads the blue channel as red.
    square = red_square_image(640, ((192 + offset, 192, 128, 255),), color="blue")
    Image.fromarray(np.ascontiguousarray(square)).save(path)


def place_models(models_dir: str) -> None:
    """Every file the SD1.5 example workflows name, with random weights, under ``models_dir``."""
    random_models.sd15_checkpoint(os.path.join(models_dir, "checkpoints", CHECKPOINT))
    random_models.consistentid_checkpoint(os.path.join(models_dir, "consistentid", "ConsistentID-v1.bin"))
    random_models.consistentid_attributes_checkpoint(
        os.path.join(models_dir, "consistentid", "ConsistentID-v1-attributes.safetensors"))
    random_models.face_parser(os.path.join(models_dir, "consistentid", "face_parsing.pth"))
    random_models.clip_vision_vit_h(os.path.join(models_dir, "clip_vision", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"))
    make_buffalo_l(os.path.join(models_dir, "insightface", "models", "buffalo_l"))


def shrink(prompt: dict, input_dir: str) -> dict:
    """The workflow on the stand-ins: synthetic photos, the random checkpoint, 64 px, 2 steps."""
    for node in prompt.values():
        title = node.get("_meta", {}).get("title", "")
        if title in UNSUPPORTED:
            raise SystemExit(UNSUPPORTED[title])
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "LoadImage":
            _photo(os.path.join(input_dir, inputs["image"]), offset=0 if "2" not in inputs["image"] else 64)
        elif kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = CHECKPOINT
        elif kind == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = SMOKE_SIZE
        elif kind in ("KSampler", "ConsistentIDKSampler", "ConsistentIDMergeStep"):
            inputs["steps"] = SMOKE_STEPS
            if "merge_step" in inputs:
                inputs["merge_step"] = 0
    return prompt


def prepare(host, prompt: dict, input_dir: str) -> dict:
    place_models(host.folder_paths.models_dir)
    host.folder_paths.filename_list_cache.clear()
    return shrink(prompt, input_dir)
