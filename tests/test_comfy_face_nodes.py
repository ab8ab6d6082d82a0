"""The face nodes inside a real ComfyUI: a photo becomes embeds equal to the core's functions, the
loaders give what they name, and the random SD1.5 checkpoint the generation tests use loads and runs.

Needs COMFYUI_PATH (see tests/comfy_harness.py); the shared models and fixtures are in
tests/comfy_face_fixtures.py.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tools import random_models as comfy_models
from consistentid_core.embeds import load_embeds as core_load_embeds
from face_standins import FixedParser, face_label_map
from numeric import DEEP_NET_FP32, SAME_MATH_FP32, assert_close, assert_differs
from comfy_face_fixtures import (
    as_image, blank_photo, blue_photo, box_of, CID_FILE, FACE, PARSER_CHOICE, PHOTO_FILE, PREVIEW_HEIGHT,
    SIZE, VIT_H_FILE,
)

pytestmark = [pytest.mark.comfyui, pytest.mark.filterwarnings("ignore::FutureWarning")]


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
