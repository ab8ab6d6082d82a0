"""tools/run_workflow.py's choices that need no ComfyUI: which UNet dtype a run asks for."""

import json
import os

import pytest

from tools import run_workflow

WORKFLOWS = run_workflow.WORKFLOW_DIR


def _workflow(name):
    with open(os.path.join(WORKFLOWS, f"{name}_api.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("requested, smoke, cpu, workflow, expected", [
    ("auto", True, True, "sdxl_portrait", "bf16"),       # an SDXL smoke run on the CPU: fp32 UNet alone is 10 GB
    ("auto", True, True, "sd15_portrait", None),         # SD1.5 fits in fp32: ComfyUI's own choice
    ("auto", False, True, "sdxl_portrait", None),        # real weights: the user's ComfyUI defaults
    ("auto", True, False, "sdxl_portrait", None),        # a GPU picks its own half precision
    ("fp32", True, True, "sdxl_portrait", "fp32"),        # asked for: forced, also on a GPU
    ("bf16", False, False, "sd15_portrait", "bf16"),
    ("fp16", False, True, "sd15_portrait", "fp16"),
])
def test_unet_dtype_choice(requested, smoke, cpu, workflow, expected):
    assert run_workflow.choose_unet_dtype(requested, smoke, cpu, _workflow(workflow)) == expected


def test_every_unet_dtype_choice_is_a_comfyui_switch():
    from tools import comfy_host

    assert set(comfy_host.UNET_DTYPE_FLAGS) == {"fp32", "bf16", "fp16"}
    assert set(comfy_host.UNET_DTYPE_FLAGS.values()) == {"fp32_unet", "bf16_unet", "fp16_unet"}


def test_unet_dtype_option_refuses_unknown_values(capsys):
    with pytest.raises(SystemExit):
        run_workflow.parse_args(["--smoke", "--comfyui", "/x", "--unet-dtype", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


def test_face_inpaint_keeps_the_target_photo_apart_from_the_reference():
    args = run_workflow.parse_args(["--image", "me.jpg", "--target", "group.png", "--workflow", "face_inpaint",
                                    "--comfyui", "/x"])
    prompt = run_workflow.customise(_workflow("face_inpaint"), args, "reference.jpg", "target.png")
    images = {node["_meta"]["title"]: node["inputs"]["image"] for node in prompt.values()
              if node["class_type"] == "LoadImage"}
    assert images == {"Reference photo": "reference.jpg", "Target photo": "target.png"}


def test_face_inpaint_without_a_target_stops_before_loading_anything(capsys):
    assert run_workflow.main(["--image", "me.jpg", "--workflow", "face_inpaint", "--comfyui", "/nowhere"]) == 2
    assert "--target" in capsys.readouterr().out
