"""Every SD1.5 API example workflow validates and runs in a real ComfyUI on random weights, 64 px, 2 steps.

The SDXL example is checked for node types and links by tests/test_example_workflows.py; running
it would need an SDXL checkpoint (about 20 GB in memory on the CPU), more than this machine has.
"""

import json
import os

import pytest
from PIL import Image

from comfy_harness import REPO_ROOT, comfy_session, comfyui_path_or_skip

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]
WORKFLOWS = os.path.join(REPO_ROOT, "example_workflows", "api")


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    comfyui_path_or_skip()
    session = comfy_session(tmp_path_factory.mktemp("comfyui"))
    from tools import smoke_models

    smoke_models.place_models(str(session.models_dir))
    session.refresh_file_lists()
    return session


def _run(session, name):
    # Each workflow loads its own checkpoint copy; the previous runs' models must not pile up (24 GB).
    session.release_memory()
    from tools import smoke_models

    with open(os.path.join(WORKFLOWS, f"{name}_api.json")) as f:
        prompt = smoke_models.shrink(json.load(f), str(session.input_dir))
    session.refresh_file_lists()
    return session.run_workflow(prompt)


def _saved_images(result):
    return [img for out in result["outputs"].values() for img in out.get("images", []) if img.get("type") == "output"]


@pytest.mark.parametrize("name", ["sd15_portrait", "sd15_stock_ksampler_merge_step", "unified_loader_portrait"])
def test_sd15_portrait_workflows_make_a_picture(session, name):
    result = _run(session, name)
    images = _saved_images(result)
    assert len(images) == 1
    with Image.open(session.output_dir / images[0]["subfolder"] / images[0]["filename"]) as picture:
        assert picture.size == (64, 64)


def test_several_photos_are_saved_and_reloaded(session):
    result = _run(session, "several_photos_save_embeds")
    saved = [t for out in result["outputs"].values() for t in out.get("text", [])]
    assert saved == ["output/consistentid/my_person_00001.safetensors"]
    embeds = session.pack_submodule("consistentid_core.embeds").load_embeds(
        str(session.output_dir / "consistentid" / "my_person_00001.safetensors"))
    assert embeds.num_references == 1 and "average of 2" in embeds.sources[0]
    result = _run(session, "portrait_from_saved_embeds")
    assert len(_saved_images(result)) == 1


def test_face_parse_preview_workflow(session):
    result = _run(session, "face_parse_preview")
    previews = [img for out in result["outputs"].values() for img in out.get("images", [])]
    assert len(previews) == 1 + 5  # the overlay and the 5 region masks


def test_flexid_workflow_takes_identity_attributes_and_eyes_from_three_photos(session, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="consistentid"):
        result = _run(session, "flexid_sd15_identity_attributes_eyes")
    images = _saved_images(result)
    assert len(images) == 1
    with Image.open(session.output_dir / images[0]["subfolder"] / images[0]["filename"]) as picture:
        assert picture.size == (64, 64)
    # The random face parser decides whether photo B shows an attribute; either way the log says which.
    said = [m for m in caplog.messages if m.startswith("attribute photo") or "attribute branch is skipped" in m]
    assert said, caplog.messages[-20:]


def test_two_people_workflow_makes_a_picture_with_the_lora_once(session, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="consistentid"):
        result = _run(session, "two_people")
    images = _saved_images(result)
    assert len(images) == 1
    with Image.open(session.output_dir / images[0]["subfolder"] / images[0]["filename"]) as picture:
        assert picture.size == (64, 64)
    # the second Apply found the first's LoRA on its model and kept it
    assert any("is already on the incoming model" in m and "kept once" in m for m in caplog.messages), \
        caplog.messages[-20:]


def test_face_inpaint_changes_only_the_masked_face_of_the_target(session):
    import numpy as np
    import torch

    from tools import smoke_models

    with open(os.path.join(WORKFLOWS, "face_inpaint_api.json")) as f:
        settings = json.load(f)["81"]["inputs"]  # the Face Mask node of the workflow
    result = _run(session, "face_inpaint")
    images = _saved_images(result)
    assert len(images) == 1
    with Image.open(session.input_dir / "consistentid_target.png") as photo:
        target = np.asarray(photo.convert("RGB"))
    with Image.open(session.output_dir / images[0]["subfolder"] / images[0]["filename"]) as picture:
        out = np.asarray(picture.convert("RGB"))
    assert out.shape == target.shape == (smoke_models.TARGET_SIZE, smoke_models.TARGET_SIZE, 3)

    # The mask the workflow used, made again by the node from the same photo and settings.
    analysis = session.execute_node("ConsistentIDFaceAnalysisLoader", model_name="buffalo_l", provider="auto").args[0]
    mask = session.execute_node(
        "ConsistentIDFaceMask", image=torch.from_numpy(target.astype(np.float32) / 255)[None],
        face_analysis=analysis, source=settings["source"], grow=settings["grow"], feather=settings["feather"],
        face_select=settings["face_select"]).args[0][0].numpy()
    # It is the stand-in face's box grown by `grow` px, and exactly 0 outside.
    x1, y1, x2, y2 = smoke_models.TARGET_FACE_BOX
    grow = settings["grow"]
    grown = np.zeros(mask.shape, dtype=bool)
    grown[y1 - grow:y2 + grow, x1 - grow:x2 + grow] = True
    assert np.array_equal(mask > 0, grown) and np.all(mask[~grown] == 0.0)

    outside = mask == 0
    assert np.array_equal(out[outside], target[outside])  # bit for bit the target's pixels
    changed = np.any(out != target, axis=-1)
    assert changed[mask == 1].mean() > 0.5  # the face itself was redrawn


@pytest.mark.parametrize("name, value", [("grow", -4), ("feather", 100000), ("source", "oval")])
def test_face_mask_settings_out_of_range_are_refused_before_anything_runs(session, name, value):
    from tools import smoke_models

    with open(os.path.join(WORKFLOWS, "face_inpaint_api.json")) as f:
        prompt = smoke_models.shrink(json.load(f), str(session.input_dir))
    session.refresh_file_lists()
    session.validate(prompt)  # valid as it is
    prompt["81"]["inputs"][name] = value
    with pytest.raises(AssertionError, match=rf"node 81 \(ConsistentIDFaceMask\).*{name}"):
        session.validate(prompt)
