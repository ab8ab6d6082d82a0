"""Save/Load ConsistentID Embeds under faults (issue 13): shared output folders, killed saves,
over-long names and damaged files, run through the nodes inside a real ComfyUI.

Needs COMFYUI_PATH (see tests/comfy_harness.py); without it every test here is skipped.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from consistentid_core.embeds import FaceEmbeds as CoreFaceEmbeds
from consistentid_core.embeds import save_embeds as core_save_embeds

pytestmark = [pytest.mark.comfyui, pytest.mark.filterwarnings("ignore::FutureWarning")]

FOLDER = "cid_reliability"  # this module's own folder under output/ and input/ (the session is shared)


@pytest.fixture(scope="session")
def errors(comfy):
    # The pack inside ComfyUI has its own copy of the modules, and so its own exception classes.
    return comfy.pack_submodule("consistentid_core.errors")


def core_embeds(seed: int) -> CoreFaceEmbeds:
    gen = torch.Generator().manual_seed(seed)
    return CoreFaceEmbeds(
        arch="sd15",
        id_embeds=torch.nn.functional.normalize(torch.randn(1, 512, generator=gen), dim=-1),
        clip_embeds=torch.randn(1, 257, 1280, generator=gen),
        region_embeds=torch.zeros(1, 5, 257, 1280),
        region_valid=torch.zeros(1, 5, dtype=torch.bool),
        region_names=[[]],
        uncond_clip_embeds=torch.randn(1, 257, 1280, generator=gen),
        sources=[f"seed {seed}"],
        checkpoint="sd15.bin",
    )


def pack_embeds(comfy, seed: int):
    """The same embeds as an object of the pack's own FaceEmbeds class, which the nodes check for."""
    module = comfy.pack_submodule("consistentid_core.embeds")
    return module.FaceEmbeds(**{k: v for k, v in vars(core_embeds(seed)).items() if k != "face_found"})


def load_options(comfy) -> list[str]:
    kind, *extra = comfy.node_class("ConsistentIDLoadEmbeds").INPUT_TYPES()["required"]["embeds_file"]
    return kind if isinstance(kind, list) else extra[0]["options"]


def test_save_never_overwrites_a_file_another_server_wrote_after_the_listing(comfy, monkeypatch):
    folder = comfy.output_dir / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    theirs = folder / "race_00001.safetensors"
    core_save_embeds(core_embeds(1), str(theirs))
    their_bytes = theirs.read_bytes()
    # This server listed the folder before the other one wrote race_00001: its listing is stale.
    real_listdir = os.listdir

    def stale_listdir(path="."):
        names = real_listdir(path)
        return [n for n in names if n != theirs.name] if os.path.samefile(path, folder) else names

    monkeypatch.setattr(os, "listdir", stale_listdir)

    saved = comfy.execute_node("ConsistentIDSaveEmbeds", embeds=pack_embeds(comfy, 2), filename_prefix=f"{FOLDER}/race")
    assert saved.ui["text"] == [f"output/{FOLDER}/race_00002.safetensors"]
    assert theirs.read_bytes() == their_bytes
    mine = load_file(str(folder / "race_00002.safetensors"))
    assert torch.equal(mine["clip_embeds"], core_embeds(2).clip_embeds)
    assert sorted(p.name for p in folder.glob("race_*")) == ["race_00001.safetensors", "race_00002.safetensors"]
    assert not list(folder.glob(".tmp-*"))


def test_a_killed_save_left_behind_is_not_offered_by_load(comfy):
    for base in (comfy.output_dir, comfy.input_dir):
        folder = base / FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        core_save_embeds(core_embeds(3), str(folder / "kept.safetensors"))
        # What a save killed between writing and renaming leaves: a temporary, possibly half written.
        (folder / ".tmp-k1ll3d.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"half")
    options = load_options(comfy)
    assert f"output/{FOLDER}/kept.safetensors" in options and f"input/{FOLDER}/kept.safetensors" in options
    assert not [o for o in options if ".tmp-" in o], options


def test_an_over_long_name_is_a_named_error_with_the_limit(comfy, errors):
    before = set((comfy.output_dir).rglob("*"))
    for prefix in (f"{FOLDER}/" + "n" * 250, f"{FOLDER}/" + "d" * 300 + "/person"):
        with pytest.raises(errors.EmbedsError) as info:
            comfy.execute_node("ConsistentIDSaveEmbeds", embeds=pack_embeds(comfy, 4), filename_prefix=prefix)
        message = str(info.value)
        assert "is too long" in message and "at most 255 bytes" in message, message
        assert "use a shorter filename_prefix" in message
    assert set((comfy.output_dir).rglob("*")) == before


def test_an_over_long_name_fails_its_node_in_a_workflow_with_the_named_error(comfy):
    folder = comfy.input_dir / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    core_save_embeds(core_embeds(5), str(folder / "source.safetensors"))
    prompt = {
        "1": {"class_type": "ConsistentIDLoadEmbeds", "inputs": {"embeds_file": f"input/{FOLDER}/source.safetensors"}},
        "2": {"class_type": "ConsistentIDSaveEmbeds", "inputs": {"embeds": ["1", 0], "filename_prefix": "x" * 260}},
    }
    with pytest.raises(AssertionError, match=r"node 2 \(ConsistentIDSaveEmbeds\) raised \S*EmbedsError: "
                                             r"filename_prefix 'x+\.\.\.' \(260 bytes\) is too long"):
        comfy.run_workflow(prompt)


def test_load_refuses_embeds_holding_nan_with_the_file_named(comfy, errors):
    folder = comfy.input_dir / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "good_for_nan.safetensors"
    core_save_embeds(core_embeds(6), str(good))
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(good))
    tensors["id_embeds"][0, :4] = float("nan")
    save_file(tensors, str(folder / "nan.safetensors"), metadata=metadata)
    with pytest.raises(errors.EmbedsError,
                       match=r"'nan.safetensors' is damaged: id_embeds holds 4 NaN and 0 Inf values \(of 512\)"):
        comfy.execute_node("ConsistentIDLoadEmbeds", embeds_file=f"input/{FOLDER}/nan.safetensors")
