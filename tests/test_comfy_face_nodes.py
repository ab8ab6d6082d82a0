"""The face nodes inside a real ComfyUI: a photo becomes embeds equal to the core's, and every
bad input of the face-pipeline issue gets its message.

Needs COMFYUI_PATH (see tests/comfy_harness.py); without it every test here is skipped.  The
models are random-weight files with the real layouts (tools/random_models.py): CLIP ViT-H and
ViT-L vision towers, an official-layout SD1.5 ConsistentID file, facexlib's BiSeNet, and the
buffalo_l stand-ins, whose detector finds saturated squares in the last channel of what it is
fed.  With the SD1.5 "official" colour order insightface gets RGB, so the faces here are BLUE
squares.

The ViT-H forward costs about 1.7 s per image on a 2-core CPU, so the bad-input tests encode
with a parser that finds no region (photo + zero image: two images per reference); the full
region path runs in the workflow test.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tools import random_models as comfy_models
from comfy_harness import REPO_ROOT, comfy_session
from consistentid_core.embeds import FaceEmbeds as CoreFaceEmbeds
from consistentid_core.embeds import load_embeds as core_load_embeds
from consistentid_core.embeds import save_embeds as core_save_embeds
from face_standins import FixedParser, face_label_map
from tools.insightface_standins import red_square_image
from numeric import DEEP_NET_FP32, SAME_MATH_FP32, assert_close, assert_differs

pytestmark = [pytest.mark.comfyui, pytest.mark.filterwarnings("ignore::FutureWarning")]

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


# --- 1. the whole workflow equals the core functions ------------------------------------------

def face_workflow() -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": PHOTO_FILE}},
        "2": {"class_type": "ConsistentIDModelLoader", "inputs": {"consistentid_file": CID_FILE}},
        "3": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": VIT_H_FILE}},
        "4": {"class_type": "ConsistentIDFaceAnalysisLoader", "inputs": {"model_name": "buffalo_l", "provider": "CPU"}},
        "5": {"class_type": "ConsistentIDFaceParserLoader", "inputs": {"parser_file": PARSER_CHOICE, "device": "cpu"}},
        "6": {"class_type": "ConsistentIDEncodeFace",
              "inputs": {"consistentid": ["2", 0], "clip_vision": ["3", 0], "face_analysis": ["4", 0],
                         "face_parser": ["5", 0], "image": ["1", 0], "face_select": "first", "combine": "average",
                         "on_no_face": "error"}},
        "7": {"class_type": "ConsistentIDSaveEmbeds", "inputs": {"embeds": ["6", 0], "filename_prefix": "cid/workflow"}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["6", 1]}},
        "9": {"class_type": "ConsistentIDFaceParse",
              "inputs": {"image": ["1", 0], "face_parser": ["5", 0], "resolution": "sd15 (512)"}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 1]}},
    }


def preview_file(comfy, history: dict, node_id: str) -> Image.Image:
    [entry] = history["outputs"][node_id]["images"]
    return Image.open(comfy.temp_dir / entry["subfolder"] / entry["filename"])


def test_workflow_embeds_equal_the_core_functions(models, loaded):
    comfy = models
    history = comfy.run_workflow(face_workflow())

    assert set(history["outputs"]) == {"7", "8", "10"}
    [saved] = history["outputs"]["7"]["text"]
    assert saved.startswith("output/cid/workflow_") and saved.endswith(".safetensors")
    path = comfy.output_dir / saved[len("output/"):]
    embeds = core_load_embeds(str(path), expected_arch="sd15")
    assert embeds.arch == "sd15" and embeds.num_references == 1
    assert embeds.checkpoint == CID_FILE
    assert embeds.face_found.tolist() == [True]
    assert abs(float(embeds.id_embeds[0].norm()) - 1.0) < 1e-5

    # The same photo through the core pipeline with the very objects the loader nodes give.
    pipeline = comfy.pack_submodule("consistentid_core.face.pipeline")
    vision = comfy.pack_submodule("nodes.glue.vision").comfy_vision_encoder(loaded.clip_vision)
    photo = np.asarray(Image.open(comfy.input_dir / PHOTO_FILE).convert("RGB"))
    with torch.inference_mode():
        expected, refs = pipeline.encode_references(
            [photo], loaded.analysis, loaded.parser, vision, "sd15", face_select="first",
            color_order="official", on_no_face="error")

    assert refs[0].face is not None
    x1, y1, x2, y2 = (float(v) for v in refs[0].face.bbox)
    assert max(abs(x1 - 128), abs(y1 - 128), abs(x2 - 256), abs(y2 - 256)) < 8
    assert embeds.region_names == expected.region_names
    assert torch.equal(embeds.region_valid, expected.region_valid)
    assert_close(embeds.region_embeds, expected.region_embeds, DEEP_NET_FP32)
    assert_close(embeds.clip_embeds, expected.clip_embeds, DEEP_NET_FP32)
    assert_close(embeds.uncond_clip_embeds, expected.uncond_clip_embeds, DEEP_NET_FP32)
    assert_close(embeds.id_embeds, expected.id_embeds, SAME_MATH_FP32)
    # Random features, not zeros: a wrong wiring could not pass the comparisons above by accident.
    assert float(embeds.clip_embeds.std()) > 0.1
    assert_differs(embeds.clip_embeds, embeds.uncond_clip_embeds, 1e-2)

    # The seeded random BiSeNet marks some regions on this photo (Face, Left_Eye, Upper_Lip), so
    # the region comparison above is about real crops, not only the zero-image padding.
    regions = len(embeds.region_names[0])
    assert 1 <= regions <= 5 and embeds.region_names[0][0] == "Face"
    (reloaded,) = comfy.execute_node("ConsistentIDLoadEmbeds", embeds_file=saved, consistentid=loaded.consistentid).args
    assert torch.equal(reloaded.region_embeds, embeds.region_embeds) and reloaded.region_names == embeds.region_names

    preview = preview_file(comfy, history, "8")
    assert preview.size == (PREVIEW_HEIGHT * (2 + regions), PREVIEW_HEIGHT)
    overlay = preview_file(comfy, history, "10")
    assert overlay.size == (SIZE, SIZE)


def test_loaders_give_the_sd15_model_and_log_the_provider(models, loaded, caplog):
    comfy = models
    assert loaded.consistentid.arch == "sd15"
    assert loaded.consistentid.num_processors == 32  # SD1.5's 16 transformer blocks, self + cross attention
    assert loaded.consistentid.name == CID_FILE
    with caplog.at_level(logging.INFO, logger="consistentid"):
        (again,) = comfy.execute_node("ConsistentIDFaceAnalysisLoader", model_name="buffalo_l", provider="CPU").args
    assert again is loaded.analysis  # cached by folder and providers
    assert "insightface providers (CPU requested): CPUExecutionProvider" in caplog.text
    assert set(again.models) == {"detection", "recognition"}
    (parser,) = comfy.execute_node("ConsistentIDFaceParserLoader", parser_file=PARSER_CHOICE, device="auto").args
    assert parser is loaded.parser and not parser.training  # "auto" is the CPU here: the same cache entry


@pytest.mark.slow
def test_comfyui_vision_encoder_gives_the_official_penultimate_states(models, loaded):
    # The official pipeline runs transformers' CLIPVisionModelWithProjection and takes
    # hidden_states[-2]; the node runs ComfyUI's own ViT-H on the same file.
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    from transformers.modeling_utils import no_init_weights

    with no_init_weights():  # every weight comes from the file; a random init of 632 M values costs seconds
        reference = CLIPVisionModelWithProjection(CLIPVisionConfig(**comfy_models.CLIP_VISION_CONFIGS["vit_h"]))
    state = load_file(str(models.models_dir / "clip_vision" / VIT_H_FILE))
    reference.load_state_dict({key: value.float() for key, value in state.items()})
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    vision = models.pack_submodule("nodes.glue.vision").comfy_vision_encoder(loaded.clip_vision)
    with torch.inference_mode():
        expected = reference.eval()(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        features = vision(pixels).float()
    assert tuple(features.shape) == (1, 257, 1280)
    assert_close(features, expected, DEEP_NET_FP32)


def test_face_parse_node_gives_five_region_masks_and_an_overlay(models):
    comfy = models
    x1, y1, x2, y2 = box_of(FACE)
    parser = FixedParser(face_label_map(512, tuple(v * 512 // SIZE for v in (x1, y1, x2, y2))))
    masks, overlay = comfy.execute_node(
        "ConsistentIDFaceParse", image=as_image(blue_photo(), blank_photo()), face_parser=parser,
        resolution="sd15 (512)").args

    assert tuple(masks.shape) == (10, SIZE, SIZE)  # 5 slots (face, eye, ear, nose, lip) per image
    assert tuple(overlay.shape) == (2, SIZE, SIZE, 3)
    first = masks[:5]
    # The filled skin contour (face_label_map: the middle 80 % of the box's width, its full height)
    # covers the inside of the face, eyes and nose included; nothing is marked far from it.
    assert float(first[0, y1 + 8:y2 - 8, x1 + 20:x2 - 20].min()) > 0.99
    assert float(first[:, 300:, 300:].max()) == 0.0
    for slot in range(5):
        assert float(first[slot].max()) > 0.99, f"region slot {slot} is empty"
    # The eye slot lies in the upper half of the face, the lip slot in the lower one.
    eye_rows = torch.nonzero(first[1] > 0.5)[:, 0].float().mean()
    lip_rows = torch.nonzero(first[4] > 0.5)[:, 0].float().mean()
    assert y1 < eye_rows < (y1 + y2) / 2 < lip_rows < y2
    # The overlay leaves the background as it is and tints the face.
    assert torch.equal(overlay[0, :50, :50], as_image(blue_photo())[0, :50, :50])
    assert not torch.equal(overlay[0, y1:y2, x1:x2], as_image(blue_photo())[0, y1:y2, x1:x2])


def test_face_parse_node_takes_a_real_photo_through_load_image(models):
    folder = os.environ.get("CID_TEST_PHOTOS")
    if not folder or not os.path.isfile(os.path.join(folder, "obama.jpg")):
        pytest.skip("CID_TEST_PHOTOS is not set to the face_recognition test photos")
    comfy = models
    with Image.open(os.path.join(folder, "obama.jpg")) as photo:
        photo.save(comfy.input_dir / "obama.jpg")
        width, height = photo.size
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "obama.jpg"}},
        "2": {"class_type": "ConsistentIDFaceParserLoader", "inputs": {"parser_file": PARSER_CHOICE, "device": "cpu"}},
        "3": {"class_type": "ConsistentIDFaceParse",
              "inputs": {"image": ["1", 0], "face_parser": ["2", 0], "resolution": "sd15 (512)"}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}},
    }
    history = comfy.run_workflow(prompt)
    assert preview_file(comfy, history, "4").size == (width, height)


# --- 2. bad input ---------------------------------------------------------------------------------

def test_no_face_with_error_names_the_image(models, loaded, errors):
    with pytest.raises(errors.FaceNotFoundError, match=r"no face found in image 1 of 3 \(image 1 of the batch\)"):
        encode(models, loaded, as_image(blue_photo(), blank_photo(), blue_photo()), on_no_face="error")


def test_no_face_with_skip_drops_the_image(models, loaded, errors, photo_embeds):
    embeds, preview = encode(models, loaded, as_image(blank_photo(), blue_photo()), on_no_face="skip")
    assert embeds.num_references == 1
    assert embeds.sources == ["image 1 of the batch"]
    assert embeds.face_found.tolist() == [True]
    assert_close(embeds.clip_embeds, photo_embeds[0].clip_embeds, DEEP_NET_FP32)
    assert tuple(preview.shape) == (1, PREVIEW_HEIGHT, 2 * PREVIEW_HEIGHT, 3)  # one row: the kept photo

    with pytest.raises(errors.FaceNotFoundError, match="no face found in any of the 2 reference images"):
        encode(models, loaded, as_image(blank_photo(), blank_photo()), on_no_face="skip")


def test_no_face_with_zeros_gives_a_zero_identity_and_a_warning(models, loaded, caplog):
    with caplog.at_level(logging.WARNING, logger="consistentid"):
        embeds, _ = encode(models, loaded, as_image(blank_photo()), on_no_face="zeros")
    assert torch.equal(embeds.id_embeds, torch.zeros(1, 512))
    assert embeds.face_found.tolist() == [False]
    # The CLIP stream is still the photo's, as in the official code.
    assert float(embeds.clip_embeds.std()) > 0.1
    assert "no face found in image 0 of 1" in caplog.text and "zero identity embedding" in caplog.text


def _ring(tile: np.ndarray, box, scale: float) -> np.ndarray:
    """The pixels on a box's outline (3 px wide after scaling) in a preview tile, as [N, 3] ints."""
    x1, y1, x2, y2 = (int(round(v * scale)) for v in box)
    mask = np.zeros(tile.shape[:2], dtype=bool)
    mask[y1 - 1:y2 + 2, x1 - 1:x2 + 2] = True
    mask[y1 + 2:y2 - 1, x1 + 2:x2 - 1] = False
    return tile[mask].astype(int)


def _outline_colour(preview: torch.Tensor, face) -> str:
    tile = (preview[0, :, :PREVIEW_HEIGHT].numpy() * 255).round()
    ring = _ring(tile, box_of(face), PREVIEW_HEIGHT / SIZE)
    green = np.linalg.norm(ring - CHOSEN_COLOUR, axis=1) < 60
    red = np.linalg.norm(ring - OTHER_COLOUR, axis=1) < 60
    assert green.sum() == 0 or red.sum() == 0, "a box outline holds both colours"
    return "chosen" if green.sum() > 20 else "other" if red.sum() > 20 else "none"


def test_several_faces_face_select_picks_and_the_preview_shows_which(models, loaded):
    two = as_image(blue_photo(FACE, SMALL_FACE))
    largest, preview = encode(models, loaded, two, face_select="largest")
    assert _outline_colour(preview, FACE) == "chosen"
    assert _outline_colour(preview, SMALL_FACE) == "other"

    by_index = {}
    for index in (0, 1):
        embeds, preview = encode(models, loaded, two, face_select=f"index:{index}")
        chosen = [face for face in (FACE, SMALL_FACE) if _outline_colour(preview, face) == "chosen"]
        others = [face for face in (FACE, SMALL_FACE) if _outline_colour(preview, face) == "other"]
        assert len(chosen) == 1 and len(others) == 1
        by_index[chosen[0]] = embeds
    assert set(by_index) == {FACE, SMALL_FACE}
    assert torch.equal(by_index[FACE].id_embeds, largest.id_embeds)
    assert_differs(by_index[SMALL_FACE].id_embeds, largest.id_embeds, 1e-3)


def test_face_select_beyond_the_faces_found_names_the_image_and_the_count(models, loaded, errors):
    two = as_image(blue_photo(FACE, SMALL_FACE), blue_photo(FACE, SMALL_FACE))
    with pytest.raises(errors.FaceNotFoundError,
                       match=r"no face found in image 0 of 2 \(image 0 of the batch\) \(2 found, but face_select is index:5\)"):
        encode(models, loaded, two, face_select="index:5")


def test_grayscale_is_read_as_three_equal_channels(models, loaded):
    grey = blue_photo()[:, :, 2:3] // 2 + 40  # one channel: a square on a dark grey background
    one_channel, _ = encode(models, loaded, as_image(grey), on_no_face="zeros")
    three_channels, _ = encode(models, loaded, as_image(np.repeat(grey, 3, axis=2)), on_no_face="zeros")
    assert torch.equal(one_channel.clip_embeds, three_channels.clip_embeds)
    assert torch.equal(one_channel.id_embeds, three_channels.id_embeds)

    masks, overlay = models.execute_node("ConsistentIDFaceParse", image=as_image(grey), face_parser=no_region_parser(),
                                         resolution="sd15 (512)").args
    assert tuple(masks.shape) == (5, SIZE, SIZE) and tuple(overlay.shape) == (1, SIZE, SIZE, 3)
    assert torch.equal(overlay[0, ..., 0], overlay[0, ..., 2])


def test_rgba_drops_the_alpha_channel(models, loaded, photo_embeds):
    rgba = np.concatenate([blue_photo(), np.full((SIZE, SIZE, 1), 90, dtype=np.uint8)], axis=2)
    embeds, _ = encode(models, loaded, as_image(rgba))
    assert embeds.face_found.tolist() == [True]
    assert torch.equal(embeds.id_embeds, photo_embeds[0].id_embeds)
    assert_close(embeds.clip_embeds, photo_embeds[0].clip_embeds, DEEP_NET_FP32)


@pytest.mark.parametrize("node", ["ConsistentIDEncodeFace", "ConsistentIDFaceParse"])
@pytest.mark.parametrize("height, width, why", [
    (48, 100, r"reference image is 100x48 px; face detection needs at least 64 px on each side"),
    (4100, 64, r"reference image is 64x4100 px; sides above 4096 px are refused because detection works at 640 px"),
])
def test_too_small_or_too_large_images_are_refused_with_size_and_reason(models, loaded, errors, node, height, width, why):
    image = torch.zeros(1, height, width, 3)
    with pytest.raises(errors.InputImageError, match=why):
        if node == "ConsistentIDEncodeFace":
            encode(models, loaded, image)
        else:
            models.execute_node(node, image=image, face_parser=no_region_parser(), resolution="sd15 (512)")


def test_a_clip_vision_model_that_is_not_vit_h_is_refused(models, loaded, errors):
    (vit_l,) = models.execute_node("CLIPVisionLoader", clip_name=VIT_L_FILE)
    with pytest.raises(errors.ModelFileError,
                       match=r"is ViT-L \(width 1024, 24 layers\), not ViT-H/14; ConsistentID needs CLIP-ViT-H-14"):
        encode(models, replace_clip(loaded, vit_l), as_image(blue_photo()))


def replace_clip(loaded: Loaded, clip_vision) -> Loaded:
    return Loaded(loaded.consistentid, clip_vision, loaded.analysis, loaded.parser)


# --- embeds of the other architecture -------------------------------------------------------------

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


def test_embeds_of_the_other_architecture_are_refused(models, loaded, errors):
    comfy = models
    core_save_embeds(cheap_embeds("sdxl"), str(comfy.input_dir / "cid_sdxl.safetensors"))
    core_save_embeds(cheap_embeds("sd15"), str(comfy.input_dir / "cid_sd15.safetensors"))

    with pytest.raises(errors.EmbedsError,
                       match=r"'cid_sdxl.safetensors' holds face embeds for sdxl, but this model is sd15"):
        comfy.execute_node("ConsistentIDLoadEmbeds", embeds_file="input/cid_sdxl.safetensors",
                           consistentid=loaded.consistentid)
    sdxl_model = SimpleNamespace(arch="sdxl")
    with pytest.raises(errors.EmbedsError,
                       match=r"'cid_sd15.safetensors' holds face embeds for sd15, but this model is sdxl"):
        comfy.execute_node("ConsistentIDLoadEmbeds", embeds_file="input/cid_sd15.safetensors", consistentid=sdxl_model)
    # Unconnected, nothing is checked: the file itself is fine.
    (embeds,) = comfy.execute_node("ConsistentIDLoadEmbeds", embeds_file="input/cid_sdxl.safetensors").args
    assert embeds.arch == "sdxl" and embeds.sources == ["made in a test"]


def test_combine_node_concatenates_averages_and_refuses_mixed_architectures(models, errors, pack_embeds):
    comfy = models
    module = comfy.pack_submodule("consistentid_core.embeds")
    other = module.FaceEmbeds(**{**vars(pack_embeds), "id_embeds": -pack_embeds.id_embeds,
                                 "clip_embeds": pack_embeds.clip_embeds + 1, "sources": ["other"]})
    (both,) = comfy.execute_node("ConsistentIDCombineEmbeds", embeds_1=pack_embeds, embeds_2=other, method="concat").args
    assert both.num_references == 2 and both.sources == ["made in a test", "other"]
    (mean,) = comfy.execute_node("ConsistentIDCombineEmbeds", embeds_1=pack_embeds, embeds_2=other, method="average").args
    assert mean.num_references == 1
    assert torch.allclose(mean.id_embeds, torch.zeros(1, 512), atol=1e-6)
    assert_close(mean.clip_embeds, pack_embeds.clip_embeds + 0.5, SAME_MATH_FP32)

    sdxl = module.FaceEmbeds(**{**vars(pack_embeds), "arch": "sdxl"})
    with pytest.raises(errors.EmbedsError, match="Cannot combine face embeds made for sd15 with embeds made for sdxl"):
        comfy.execute_node("ConsistentIDCombineEmbeds", embeds_1=pack_embeds, embeds_2=sdxl, method="average")


def test_a_refused_embeds_file_fails_its_node_not_the_queue(models):
    comfy = models
    core_save_embeds(cheap_embeds("sdxl"), str(comfy.input_dir / "cid_sdxl_queue.safetensors"))
    prompt = {
        "1": {"class_type": "ConsistentIDModelLoader", "inputs": {"consistentid_file": CID_FILE}},
        "2": {"class_type": "ConsistentIDLoadEmbeds",
              "inputs": {"embeds_file": "input/cid_sdxl_queue.safetensors", "consistentid": ["1", 0]}},
        "3": {"class_type": "ConsistentIDSaveEmbeds", "inputs": {"embeds": ["2", 0], "filename_prefix": "cid/queue"}},
    }
    with pytest.raises(AssertionError, match=r"node 2 \(ConsistentIDLoadEmbeds\) raised \S*EmbedsError: "
                                             r"'cid_sdxl_queue.safetensors' holds face embeds for sdxl"):
        comfy.run_workflow(prompt)
    assert not list(comfy.output_dir.glob("cid/queue_*"))
    # The queue goes on: the next prompt runs.
    del prompt["2"]["inputs"]["consistentid"]
    history = comfy.run_workflow(prompt)
    assert history["outputs"]["3"]["text"] == ["output/cid/queue_00001.safetensors"]


# --- missing or misplaced model files ---------------------------------------------------------------

@pytest.fixture()
def redirect_folders(models, monkeypatch):
    """Points ComfyUI model folder names at other folders for one test."""
    comfy = models

    def redirect(name: str, *paths: Path) -> None:
        _, extensions = comfy.folder_paths.folder_names_and_paths[name]
        monkeypatch.setitem(comfy.folder_paths.folder_names_and_paths, name, ([str(p) for p in paths], extensions))
        comfy.refresh_file_lists()

    yield redirect
    monkeypatch.undo()
    comfy.refresh_file_lists()


def schema_options(comfy, node_id: str, input_name: str) -> list[str]:
    """The choices ComfyUI offers for a combo input (V3 nodes give ("COMBO", {"options": [...]}))."""
    kind, *extra = comfy.node_class(node_id).INPUT_TYPES()["required"][input_name]
    return kind if isinstance(kind, list) else extra[0]["options"]


def test_no_consistentid_file_lists_the_folders_searched_and_the_files_found(models, redirect_folders, errors, tmp_path):
    comfy = models
    folder = tmp_path / "consistentid"
    folder.mkdir()
    (folder / "ConsistentID-v1.bin.crdownload").write_bytes(b"partial")
    redirect_folders("consistentid", folder)

    loaders = comfy.pack_submodule("nodes.loaders")
    assert schema_options(comfy, "ConsistentIDModelLoader", "consistentid_file") == [loaders.NONE_FOUND]
    with pytest.raises(errors.ModelFileError) as caught:
        comfy.execute_node("ConsistentIDModelLoader", consistentid_file=loaders.NONE_FOUND)
    message = str(caught.value)
    assert message.startswith("no ConsistentID file selected: put ConsistentID-v1.bin into one of")
    assert str(folder) in message and "ConsistentID-v1.bin.crdownload" in message


def test_a_file_that_is_not_consistentid_is_named(models, errors):
    # models/consistentid also holds the face parser; the ConsistentID list leaves it out, and an
    # API prompt that names it anyway gets a message.
    assert PARSER_FILE not in schema_options(models, "ConsistentIDModelLoader", "consistentid_file")
    with pytest.raises(errors.CheckpointError,
                       match=r"face_parsing.pth: this is not a ConsistentID checkpoint \(found keys such as "
                             r"\['cp.resnet.conv1.weight'"):
        models.execute_node("ConsistentIDModelLoader", consistentid_file=PARSER_FILE)


def test_no_face_parser_lists_both_folders_and_the_files_found(models, redirect_folders, errors, tmp_path):
    comfy = models
    own, facexlib = tmp_path / "consistentid", tmp_path / "facexlib"
    own.mkdir()
    (facexlib / "weights").mkdir(parents=True)
    (facexlib / "face_parsing.zip").write_bytes(b"never extracted")
    redirect_folders("consistentid", own)
    redirect_folders("facexlib", facexlib)

    loaders = comfy.pack_submodule("nodes.loaders")
    assert schema_options(comfy, "ConsistentIDFaceParserLoader", "parser_file") == [loaders.NONE_FOUND]
    with pytest.raises(errors.ModelFileError) as caught:
        comfy.execute_node("ConsistentIDFaceParserLoader", parser_file=loaders.NONE_FOUND, device="cpu")
    message = str(caught.value)
    assert "no face parser selected: put one of face_parsing.pth, 79999_iter.pth, parsing_bisenet.pth" in message
    assert str(own) in message and str(facexlib) in message
    assert "face_parsing.zip" in message and "weights" in message


def test_no_insightface_models_lists_the_folders_searched(models, redirect_folders, errors, tmp_path):
    comfy = models
    root = tmp_path / "insightface"
    root.mkdir()
    redirect_folders("insightface", root)
    with pytest.raises(errors.ModelFileError) as caught:
        comfy.execute_node("ConsistentIDFaceAnalysisLoader", model_name="buffalo_l", provider="CPU")
    message = str(caught.value)
    assert message.startswith("insightface model 'buffalo_l' not found or incomplete")
    assert f"{root / 'models'}: does not exist; {root} contains: (empty)" in message
    assert "det_10g.onnx and w600k_r50.onnx are required" in message


def test_insightface_nested_one_folder_too_deep_is_explained(models, redirect_folders, errors, tmp_path):
    comfy = models
    root = tmp_path / "insightface"
    nested = comfy_models.insightface_buffalo_l(root / "models" / "buffalo_l" / "buffalo_l")
    redirect_folders("insightface", root)
    with pytest.raises(errors.ModelFileError) as caught:
        comfy.execute_node("ConsistentIDFaceAnalysisLoader", model_name="buffalo_l", provider="CPU")
    message = str(caught.value)
    assert f"{root / 'models' / 'buffalo_l'}: contains: buffalo_l/" in message
    assert f"the .onnx files are one folder too deep, in {nested}" in message
    assert f"move the .onnx files up one folder, into {root / 'models' / 'buffalo_l'}" in message


# --- optional dependencies ---------------------------------------------------------------------------

def _block_imports(monkeypatch, package: str) -> None:
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, package, None)


def test_without_insightface_the_loader_says_what_to_install(models, errors, monkeypatch):
    comfy = models
    models_module = comfy.pack_submodule("consistentid_core.face.insightface_models")
    monkeypatch.setattr(models_module, "_CACHE", {})
    _block_imports(monkeypatch, "insightface")
    with pytest.raises(errors.MissingDependencyError,
                       match=r"insightface could not be imported .*; pip install insightface onnxruntime"):
        comfy.execute_node("ConsistentIDFaceAnalysisLoader", model_name="buffalo_l", provider="CPU")


def test_without_facexlib_the_loader_says_what_to_install(models, errors, monkeypatch):
    comfy = models
    face_parser = comfy.pack_submodule("consistentid_core.face.parser")
    monkeypatch.setattr(face_parser, "_cache", {})
    _block_imports(monkeypatch, "facexlib")
    with pytest.raises(errors.MissingDependencyError, match=r"the face parser needs the facexlib package .*'pip install facexlib'"):
        comfy.execute_node("ConsistentIDFaceParserLoader", parser_file=PARSER_CHOICE, device="cpu")


_WITHOUT_OPTIONAL_PACKAGES = r"""
import json, sys
tests_dir, repo_root, root = sys.argv[1:4]
for name in ("insightface", "facexlib"):
    sys.modules[name] = None  # as if never installed: every import of them fails
sys.path.insert(0, tests_dir)
sys.path.append(repo_root)
import torch
from comfy_harness import comfy_session
from tools.insightface_standins import make_buffalo_l

session = comfy_session(root)
result = {"loaded": session.pack_loaded, "nodes": session.pack_node_ids(), "log": session.pack_load_log}
make_buffalo_l(str(session.model_dir("insightface", "models", "buffalo_l")))
torch.save({}, str(session.model_dir("consistentid") / "face_parsing.pth"))
session.refresh_file_lists()
for node_id, inputs in (("ConsistentIDFaceAnalysisLoader", {"model_name": "buffalo_l", "provider": "CPU"}),
                        ("ConsistentIDFaceParserLoader", {"parser_file": "consistentid/face_parsing.pth", "device": "cpu"})):
    try:
        session.execute_node(node_id, **inputs)
        result[node_id] = None
    except Exception as exc:
        result[node_id] = [type(exc).__name__, str(exc)]
print("RESULT " + json.dumps(result))
"""


def test_the_pack_loads_without_insightface_and_facexlib(comfy, tmp_path):
    # A fresh process: the pack's modules must import with both packages missing from the start.
    run = subprocess.run(
        [sys.executable, "-c", _WITHOUT_OPTIONAL_PACKAGES, TESTS_DIR, REPO_ROOT, str(tmp_path / "comfyui")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["loaded"], result["log"]
    assert result["nodes"] == sorted(comfy.pack_submodule("nodes.extension").NODE_IDS)
    kind, message = result["ConsistentIDFaceAnalysisLoader"]
    assert kind == "MissingDependencyError" and "pip install insightface onnxruntime" in message
    kind, message = result["ConsistentIDFaceParserLoader"]
    assert kind == "MissingDependencyError" and "pip install facexlib" in message


# --- save and load: paths, foreign files, format versions ------------------------------------------

def files_under(folder: Path, skip: Path | None = None) -> set[str]:
    found = set()
    for root, dirs, files in os.walk(folder):
        if skip is not None and Path(root).resolve() == skip.resolve():
            dirs[:] = []
            continue
        found.update(os.path.join(root, name) for name in files)
    return found


@pytest.fixture()
def pack_embeds(comfy):
    embeds = comfy.pack_submodule("consistentid_core.embeds")
    return embeds.FaceEmbeds(**{name: getattr(cheap_embeds("sd15"), name) for name in (
        "arch", "id_embeds", "clip_embeds", "region_embeds", "region_valid", "region_names", "uncond_clip_embeds",
        "sources", "checkpoint")})


@pytest.fixture()
def escape_link(models, tmp_path):
    """output/escape_link -> a folder outside the output folder (removed afterwards)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    link = models.output_dir / "escape_link"
    os.symlink(outside, link, target_is_directory=True)
    yield outside
    os.unlink(link)


@pytest.mark.parametrize("prefix, why", [
    ("../x", r"File name '\.\./x' points outside the folder"),
    ("cid/../../x", r"points outside the folder"),
    ("ABSOLUTE", r"must be relative to .*, not absolute"),
    ("escape_link/x", r"File name 'escape_link/x' points outside the folder"),
])
def test_save_refuses_names_that_leave_the_output_folder(models, errors, pack_embeds, escape_link, tmp_path,
                                                         prefix, why):
    comfy = models
    if prefix == "ABSOLUTE":
        prefix = str(tmp_path / "absolute" / "x")
    before = files_under(comfy.root.parent, skip=comfy.output_dir)
    with pytest.raises(errors.EmbedsError, match=why):
        comfy.execute_node("ConsistentIDSaveEmbeds", embeds=pack_embeds, filename_prefix=prefix)
    assert files_under(comfy.root.parent, skip=comfy.output_dir) == before
    assert not list(escape_link.iterdir())
    assert not (tmp_path / "absolute").exists()


def test_save_and_load_inside_the_output_folder(models, pack_embeds):
    comfy = models
    first = comfy.execute_node("ConsistentIDSaveEmbeds", embeds=pack_embeds, filename_prefix="cid/sub/person")
    second = comfy.execute_node("ConsistentIDSaveEmbeds", embeds=pack_embeds, filename_prefix="cid/sub/person")
    assert first.ui["text"] == ["output/cid/sub/person_00001.safetensors"]
    assert second.ui["text"] == ["output/cid/sub/person_00002.safetensors"]  # numbered, never overwritten
    assert "output/cid/sub/person_00002.safetensors" in schema_options(comfy, "ConsistentIDLoadEmbeds", "embeds_file")
    (loaded,) = comfy.execute_node("ConsistentIDLoadEmbeds", embeds_file="output/cid/sub/person_00002.safetensors").args
    assert torch.equal(loaded.clip_embeds, pack_embeds.clip_embeds) and loaded.sources == pack_embeds.sources


def test_load_refuses_names_and_links_that_leave_the_folder(models, errors, tmp_path):
    comfy = models
    # Valid embeds files outside input/: the refusal is about where they are, not what they are.
    core_save_embeds(cheap_embeds("sd15"), str(comfy.root / "outside.safetensors"))
    core_save_embeds(cheap_embeds("sd15"), str(tmp_path / "elsewhere.safetensors"))
    link = comfy.input_dir / "linked.safetensors"
    os.symlink(tmp_path / "elsewhere.safetensors", link)
    try:
        for name, why in (("input/../outside.safetensors", r"points outside the folder"),
                          ("input/linked.safetensors", r"'linked.safetensors' points outside the folder"),
                          (f"input/{tmp_path / 'elsewhere.safetensors'}", r"points outside the folder|not absolute"),
                          ("models/outside.safetensors", r"must start with 'input/' or 'output/', got 'models'")):
            with pytest.raises(errors.EmbedsError, match=why):
                comfy.execute_node("ConsistentIDLoadEmbeds", embeds_file=name)
    finally:
        os.unlink(link)


def test_load_refuses_files_that_are_not_embeds(models, errors):
    comfy = models
    save_file({"weight": torch.zeros(4)}, str(comfy.input_dir / "lora_like.safetensors"))
    (comfy.input_dir / "text.safetensors").write_text("this is not a safetensors file")
    with pytest.raises(errors.EmbedsError,
                       match=r"'lora_like.safetensors' is not a ConsistentID embeds file \(its metadata lacks "
                             r"format='consistentid-embeds'\)"):
        comfy.execute_node("ConsistentIDLoadEmbeds", embeds_file="input/lora_like.safetensors")
    with pytest.raises(errors.EmbedsError,
                       match=r"'text.safetensors' is not a ConsistentID embeds file: it cannot be read as safetensors"):
        comfy.execute_node("ConsistentIDLoadEmbeds", embeds_file="input/text.safetensors")


@pytest.mark.parametrize("version, age", [("2", "a newer"), ("0", "an older"), ("beta", "another")])
def test_load_refuses_another_format_version(models, errors, version, age):
    comfy = models
    path = comfy.input_dir / f"cid_version_{version}.safetensors"
    core_save_embeds(cheap_embeds("sd15"), str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    save_file(load_file(str(path)), str(path), metadata={**metadata, "format_version": version})
    with pytest.raises(errors.EmbedsError,
                       match=rf"was made by {age} version of the ConsistentID pack \(format_version {version}, "
                             r"this pack reads 1\); re-encode the references"):
        comfy.execute_node("ConsistentIDLoadEmbeds", embeds_file=f"input/cid_version_{version}.safetensors")


# --- the SD1.5 test checkpoint (used by the generation tests; checked here where it is built) -----

@pytest.mark.slow
def test_the_random_sd15_checkpoint_loads_and_generates_in_comfyui(comfy):
    from safetensors import safe_open

    path = comfy_models.sd15_checkpoint(comfy.model_dir("checkpoints") / "cid_sd15_random.safetensors")
    comfy.refresh_file_lists()
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        dtypes = {f.get_slice(key).get_dtype() for key in keys}
    prefixes = {}
    for key in keys:
        prefixes[key.split(".")[0]] = prefixes.get(key.split(".")[0], 0) + 1
    # The key counts of the released v1-5-pruned-emaonly file, less its position_ids buffer.
    assert prefixes == {"model": 686, "first_stage_model": 248, "cond_stage_model": 196}
    assert dtypes == {"F16"}

    model, clip, vae = comfy.execute_node("CheckpointLoaderSimple", ckpt_name="cid_sd15_random.safetensors")
    assert type(model.model.model_config).__name__ == "SD15"
    (positive,) = comfy.execute_node("CLIPTextEncode", text="a photo of a person", clip=clip)
    cond = positive[0][0]
    assert tuple(cond.shape) == (1, 77, 768) and bool(torch.isfinite(cond).all())
    # The noise prediction at the largest and a small noise level: finite and of a trained model's scale.
    from comfy import model_management  # ComfyUI's package; importable once the session exists

    model_management.load_model_gpu(model)
    diffusion = model.model.diffusion_model
    sampling = model.model.model_sampling
    with torch.inference_mode():
        for sigma in (14.6, 0.1):
            noisy = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
            eps = diffusion(noisy, sampling.timestep(torch.tensor([sigma])), context=cond)
            assert bool(torch.isfinite(eps).all()) and 0.2 < float(eps.std()) < 5, (sigma, float(eps.std()))

    (latent,) = comfy.execute_node("EmptyLatentImage", width=256, height=256, batch_size=1)
    (sampled,) = comfy.execute_node("KSampler", model=model, seed=0, steps=2, cfg=7.0, sampler_name="euler",
                                    scheduler="normal", positive=positive, negative=positive, latent_image=latent,
                                    denoise=1.0)
    samples = sampled["samples"]
    assert tuple(samples.shape) == (1, 4, 32, 32) and bool(torch.isfinite(samples).all())
    (image,) = comfy.execute_node("VAEDecode", samples=sampled, vae=vae)
    assert tuple(image.shape) == (1, 256, 256, 3) and bool(torch.isfinite(image).all())
    assert float(image.std()) > 0.01
