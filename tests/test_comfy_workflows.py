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
    from tools import smoke_models

    with open(os.path.join(WORKFLOWS, f"{name}_api.json")) as f:
        prompt = smoke_models.shrink(json.load(f), str(session.input_dir))
    session.refresh_file_lists()
    return session.run_workflow(prompt)


def _saved_images(result):
    return [img for out in result["outputs"].values() for img in out.get("images", []) if img.get("type") == "output"]


@pytest.mark.parametrize("name", ["sd15_portrait", "sd15_stock_ksampler_merge_step"])
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
