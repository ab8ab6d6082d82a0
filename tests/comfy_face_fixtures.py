"""Models, photos and loaded nodes that the face-node tests inside ComfyUI share.

The models are random-weight files with the real layouts (tools/random_models.py): CLIP ViT-H and
ViT-L vision towers, an official-layout SD1.5 ConsistentID file, facexlib's BiSeNet, and the
buffalo_l stand-ins, whose detector finds saturated squares in the last channel of what it is fed.
With the SD1.5 "official" colour order insightface gets RGB, so the faces here are BLUE squares.

The ViT-H forward costs about 1.7 s per image on a 2-core CPU, so the bad-input tests encode with a
parser that finds no region (photo + zero image: two images per reference); the full region path
runs in the workflow test.  The fixtures are registered once, in tests/conftest.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from tools import random_models as comfy_models
from consistentid_core.embeds import FaceEmbeds as CoreFaceEmbeds
from face_standins import FixedParser
from tools.insightface_standins import red_square_image

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

CID_FILE = "ConsistentID-v1.bin"
VIT_H_FILE = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
VIT_L_FILE = "clip-vit-large-patch14-random.safetensors"
PARSER_FILE = "face_parsing.pth"
PARSER_CHOICE = f"consistentid/{PARSER_FILE}"
PHOTO_FILE = "cid_blue_face.png"

SIZE = 640
FACE = (192, 192, 128)  # centre x, centre y, side: the box 128..256 in both axes
SMALL_FACE = (480, 480, 64)  # the box 448..512
PREVIEW_HEIGHT = 384  # reference_preview's row height
CHOSEN_COLOUR = np.array((40, 220, 60))  # consistentid_core.face.preview: the face that was used
OTHER_COLOUR = np.array((220, 50, 50))


# --- images -------------------------------------------------------------------------------------

def blue_photo(*faces) -> np.ndarray:
    return red_square_image(SIZE, tuple((x, y, side, 255) for x, y, side in (faces or (FACE,))), color="blue")


def blank_photo() -> np.ndarray:
    return np.zeros((SIZE, SIZE, 3), dtype=np.uint8)


def as_image(*arrays: np.ndarray) -> torch.Tensor:
    """uint8 H x W x C arrays -> a ComfyUI IMAGE batch [B, H, W, C] float 0..1."""
    return torch.from_numpy(np.stack(arrays)).float() / 255.0


def box_of(face) -> tuple[int, int, int, int]:
    x, y, side = face
    return x - side // 2, y - side // 2, x + side // 2, y + side // 2


def no_region_parser() -> FixedParser:
    return FixedParser(np.zeros((64, 64), dtype=np.uint8))


# --- session fixtures ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def models(comfy):
    """The model files in the session's folders and the photo in input/."""
    comfy_models.consistentid_checkpoint(comfy.model_dir("consistentid") / CID_FILE)
    comfy_models.face_parser(comfy.model_dir("consistentid") / PARSER_FILE)
    comfy_models.clip_vision_vit_h(comfy.model_dir("clip_vision") / VIT_H_FILE)
    comfy_models.clip_vision_vit_l(comfy.model_dir("clip_vision") / VIT_L_FILE)
    comfy_models.insightface_buffalo_l(comfy.model_dir("insightface", "models", "buffalo_l"))
    Image.fromarray(blue_photo()).save(comfy.input_dir / PHOTO_FILE)
    comfy.refresh_file_lists()
    return comfy


@dataclass
class Loaded:
    consistentid: object
    clip_vision: object
    analysis: object
    parser: object


@pytest.fixture(scope="session")
def loaded(models) -> Loaded:
    comfy = models
    (consistentid,) = comfy.execute_node("ConsistentIDModelLoader", consistentid_file=CID_FILE).args
    (clip_vision,) = comfy.execute_node("CLIPVisionLoader", clip_name=VIT_H_FILE)
    (analysis,) = comfy.execute_node("ConsistentIDFaceAnalysisLoader", model_name="buffalo_l", provider="CPU").args
    (parser,) = comfy.execute_node("ConsistentIDFaceParserLoader", parser_file=PARSER_CHOICE, device="cpu").args
    return Loaded(consistentid, clip_vision, analysis, parser)


@pytest.fixture(scope="session")
def errors(comfy):
    # The pack inside ComfyUI is a separate copy of the modules: its exception classes differ
    # from those of the top-level consistentid_core the unit tests import.
    return comfy.pack_submodule("consistentid_core.errors")


def encode(comfy, loaded: Loaded, image: torch.Tensor, parser=None, **options):
    inputs = {
        "consistentid": loaded.consistentid,
        "clip_vision": loaded.clip_vision,
        "face_analysis": loaded.analysis,
        "face_parser": parser if parser is not None else no_region_parser(),
        "image": image,
        "face_select": "first",
        "combine": "average",
        "on_no_face": "error",
    }
    inputs.update(options)
    embeds, preview = comfy.execute_node("ConsistentIDEncodeFace", **inputs).args
    return embeds, preview


@pytest.fixture(scope="session")
def photo_embeds(models, loaded):
    """The blue photo encoded without regions: the reference for the conversion tests."""
    return encode(models, loaded, as_image(blue_photo()))


def cheap_embeds(arch: str, source: str = "made in a test") -> CoreFaceEmbeds:
    gen = torch.Generator().manual_seed(len(source))
    return CoreFaceEmbeds(
        arch=arch,
        id_embeds=torch.nn.functional.normalize(torch.randn(1, 512, generator=gen), dim=-1),
        clip_embeds=torch.randn(1, 257, 1280, generator=gen),
        region_embeds=torch.zeros(1, 5, 257, 1280),
        region_valid=torch.zeros(1, 5, dtype=torch.bool),
        region_names=[[]],
        uncond_clip_embeds=torch.randn(1, 257, 1280, generator=gen),
        sources=[source],
        checkpoint=f"{arch}.bin",
    )


def schema_options(comfy, node_id: str, input_name: str) -> list[str]:
    """The choices ComfyUI offers for a combo input (V3 nodes give ("COMBO", {"options": [...]}))."""
    kind, *extra = comfy.node_class(node_id).INPUT_TYPES()["required"][input_name]
    return kind if isinstance(kind, list) else extra[0]["options"]


@pytest.fixture()
def pack_embeds(comfy):
    embeds = comfy.pack_submodule("consistentid_core.embeds")
    return embeds.FaceEmbeds(**{name: getattr(cheap_embeds("sd15"), name) for name in (
        "arch", "id_embeds", "clip_embeds", "region_embeds", "region_valid", "region_names", "uncond_clip_embeds",
        "sources", "checkpoint")})
