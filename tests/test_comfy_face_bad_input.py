"""Every bad input of the face pipeline inside a real ComfyUI gets its message: no face, several faces,
bad sizes and colour layouts, a CLIP vision model that is not ViT-H, embeds of the other architecture."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from consistentid_core.embeds import save_embeds as core_save_embeds
from numeric import DEEP_NET_FP32, SAME_MATH_FP32, assert_close, assert_differs
from comfy_face_fixtures import (
    as_image, blank_photo, blue_photo, box_of, cheap_embeds, CHOSEN_COLOUR, CID_FILE, encode, FACE, Loaded,
    no_region_parser, OTHER_COLOUR, PREVIEW_HEIGHT, SIZE, SMALL_FACE, VIT_L_FILE,
)

pytestmark = [pytest.mark.comfyui, pytest.mark.filterwarnings("ignore::FutureWarning")]


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
