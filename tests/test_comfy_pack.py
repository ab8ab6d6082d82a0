"""The pack inside a real ComfyUI: it loads, its nodes are registered, and graphs execute.

Needs COMFYUI_PATH (see tests/comfy_harness.py); without it these tests are skipped.
"""

import os

import pytest
import safetensors.torch

from comfy_harness import comfy_session


def smoke_prompt(filename_prefix: str) -> dict:
    """Built-in nodes only, cheap on a CPU; mixes V1 and V3 nodes and two output nodes."""
    return {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "LatentMultiply", "inputs": {"samples": ["1", 0], "multiplier": 0.5}},
        "3": {"class_type": "LatentUpscale",
              "inputs": {"samples": ["2", 0], "upscale_method": "nearest-exact", "width": 96, "height": 96,
                         "crop": "disabled"}},
        "4": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": filename_prefix}},
        "5": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0}},
        "6": {"class_type": "ImageInvert", "inputs": {"image": ["5", 0]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }


# --- skip logic: runs everywhere, with or without ComfyUI -------------------------------------

def test_without_comfyui_path_the_session_skips(monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.delenv("CID_REQUIRE_COMFYUI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="COMFYUI_PATH is not set"):
        comfy_session()


def test_when_ci_requires_comfyui_a_missing_path_fails_instead_of_skipping(monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setenv("CID_REQUIRE_COMFYUI", "1")
    with pytest.raises(pytest.fail.Exception, match="CID_REQUIRE_COMFYUI is set, so this is a failure"):
        comfy_session()


def test_a_wrong_comfyui_path_is_an_error_not_a_skip(monkeypatch, tmp_path):
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="is not a ComfyUI checkout"):
        comfy_session()


# --- inside ComfyUI ---------------------------------------------------------------------------

@pytest.mark.comfyui
def test_pack_loads_without_import_failure(comfy):
    assert comfy.pack_loaded, "\n".join(comfy.pack_load_log)
    assert comfy.pack_module is not None
    assert callable(comfy.pack_module.comfy_entrypoint)
    # ComfyUI only warns about an unreadable pyproject.toml, but the registry needs it.
    assert not [line for line in comfy.pack_load_log if "pyproject.toml" in line]


@pytest.mark.comfyui
def test_every_declared_node_is_registered_and_nothing_else(comfy):
    declared = comfy.pack_submodule("nodes.extension").NODE_IDS
    assert len(set(declared)) == len(declared), "NODE_IDS has duplicates"
    for node_id in declared:
        assert comfy.is_pack_class(comfy.node_class(node_id)), f"{node_id} is taken by a built-in node"
    assert comfy.pack_node_ids() == sorted(declared)


@pytest.mark.comfyui
def test_builtin_smoke_workflow_runs(comfy):
    history = comfy.run_workflow(smoke_prompt("smoke/latent"))

    assert history["status"]["completed"]
    assert set(history["outputs"]) == {"4", "7"}
    [saved] = history["outputs"]["4"]["latents"]
    latent = safetensors.torch.load_file(os.path.join(comfy.output_dir, saved["subfolder"], saved["filename"]))
    assert tuple(latent["latent_tensor"].shape) == (1, 4, 12, 12)
    [preview] = history["outputs"]["7"]["images"]
    assert preview["type"] == "temp"
    assert (comfy.temp_dir / preview["subfolder"] / preview["filename"]).is_file()


@pytest.mark.comfyui
def test_run_workflow_reports_validation_errors(comfy):
    prompt = smoke_prompt("smoke/latent")
    prompt["3"]["inputs"]["upscale_method"] = "no-such-method"
    with pytest.raises(AssertionError, match=r"node 3 \(LatentUpscale\).*upscale_method"):
        comfy.run_workflow(prompt)


@pytest.mark.comfyui
def test_run_workflow_reports_execution_errors(comfy):
    # SaveLatent refuses, at run time, to write outside the output folder.
    with pytest.raises(AssertionError, match=r"node 4 \(SaveLatent\) raised .*outside the output folder"):
        comfy.run_workflow(smoke_prompt("../escape"))


@pytest.mark.comfyui
def test_execute_node_runs_v1_and_v3_nodes(comfy):
    (empty,) = comfy.execute_node("EmptyLatentImage", width=64, height=64, batch_size=2)
    assert tuple(empty["samples"].shape) == (2, 4, 8, 8)

    doubled = comfy.execute_node("LatentMultiply", samples={"samples": empty["samples"] + 1}, multiplier=2.0)
    assert float(doubled.args[0]["samples"].mean()) == pytest.approx(2.0)
