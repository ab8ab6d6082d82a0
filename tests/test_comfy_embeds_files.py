"""Saving and loading embeds inside a real ComfyUI: names that leave the folder, links, foreign files and
other format versions are refused with a message."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from consistentid_core.embeds import save_embeds as core_save_embeds
from comfy_face_fixtures import cheap_embeds, schema_options

pytestmark = [pytest.mark.comfyui, pytest.mark.filterwarnings("ignore::FutureWarning")]


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
