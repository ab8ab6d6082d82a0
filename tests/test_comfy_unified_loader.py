"""ConsistentID Unified Loader inside a real ComfyUI: the very objects the separate loaders return, files
found under other names, in sub-folders and in extra_model_paths.yaml folders, and one message for every
missing file.

Needs COMFYUI_PATH (see tests/comfy_harness.py).  The model files are the random-weight stand-ins of
tools/random_models.py, hard-linked from its cache into folders of this test's own; each test points
ComfyUI's folders at them (and back afterwards), so other test files in the same ComfyUI see nothing
of them.  The node reads nothing of the MODEL but its architecture, so the MODEL here is a stand-in that
carries ComfyUI's own model config; the workflow test (tests/test_comfy_workflows.py) runs the node
on a real checkpoint.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from tools import random_models

pytestmark = [pytest.mark.comfyui, pytest.mark.filterwarnings("ignore::FutureWarning")]

CID_FILE = "ConsistentID-v1.bin"
VIT_H_FILE = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
PARSER_FILE = "face_parsing.pth"
KINDS = ("consistentid", "clip_vision", "insightface", "facexlib")


def stand_in_model(config_name: str):
    """A MODEL-shaped object whose inner model carries ComfyUI's config class of that name."""
    config = getattr(importlib.import_module("comfy.supported_models"), config_name)
    inner = type(config_name, (), {"model_config": SimpleNamespace(unet_config=dict(config.unet_config))})()
    return SimpleNamespace(model=inner)


@pytest.fixture(scope="module")
def official(comfy, tmp_path_factory) -> Path:
    """The files under their official names and places."""
    root = tmp_path_factory.mktemp("unified-official")
    random_models.consistentid_checkpoint(root / "consistentid" / CID_FILE)
    random_models.face_parser(root / "consistentid" / PARSER_FILE)
    random_models.clip_vision_vit_h(root / "clip_vision" / VIT_H_FILE)
    random_models.insightface_buffalo_l(root / "insightface" / "models" / "buffalo_l")
    (root / "facexlib").mkdir()
    return root


@pytest.fixture
def point_folders(comfy, monkeypatch):
    """point_folders(kind=[paths...]): ComfyUI's folders of those kinds are exactly these, until the test ends."""

    def point(**kinds):
        for kind, paths in kinds.items():
            _, extensions = comfy.folder_paths.folder_names_and_paths[kind]
            monkeypatch.setitem(comfy.folder_paths.folder_names_and_paths, kind,
                                ([str(p) for p in paths], extensions))
        comfy.refresh_file_lists()

    yield point
    monkeypatch.undo()
    comfy.refresh_file_lists()


@pytest.fixture(scope="module")
def pack(comfy):
    return SimpleNamespace(
        errors=comfy.pack_submodule("consistentid_core.errors"),
        checkpoint=comfy.pack_submodule("consistentid_core.model.checkpoint"),
        insightface=comfy.pack_submodule("consistentid_core.face.insightface_models"),
        parser=comfy.pack_submodule("consistentid_core.face.parser"),
        vision=comfy.pack_submodule("nodes.glue.vision"),
    )


def unified(comfy, model, **choices):
    return comfy.execute_node("ConsistentIDUnifiedLoader", model=model, **choices).args


def test_the_node_is_a_loader_with_auto_first_in_every_file_list(comfy, official, point_folders):
    point_folders(**{kind: [official / kind] for kind in KINDS})
    info = comfy.node_class("ConsistentIDUnifiedLoader").GET_NODE_INFO_V1()
    assert info["category"] == "ConsistentID/loaders"
    assert info["output"] == ["MODEL", "CONSISTENTID", "CLIP_VISION", "FACE_ANALYSIS", "CONSISTENTID_FACE_PARSER"]
    optional = info["input"]["optional"]
    assert optional["consistentid_file"][1]["options"] == ["auto", CID_FILE]
    assert optional["clip_vision_file"][1]["options"] == ["auto", VIT_H_FILE]
    assert optional["parser_file"][1]["options"] == ["auto", f"consistentid/{PARSER_FILE}"]
    assert {name: spec[1]["default"] for name, spec in optional.items()} == {
        "consistentid_file": "auto", "clip_vision_file": "auto", "parser_file": "auto", "provider": "auto",
        "parser_device": "auto"}


def test_it_returns_the_very_objects_the_separate_loaders_return(comfy, official, point_folders, pack):
    point_folders(**{kind: [official / kind] for kind in KINDS})
    (weights,) = comfy.execute_node("ConsistentIDModelLoader", consistentid_file=CID_FILE).args
    (analysis,) = comfy.execute_node("ConsistentIDFaceAnalysisLoader", model_name="buffalo_l", provider="auto").args
    (parser,) = comfy.execute_node("ConsistentIDFaceParserLoader", parser_file=f"consistentid/{PARSER_FILE}",
                                   device="auto").args
    model = stand_in_model("SD15")
    out_model, out_weights, clip_vision, out_analysis, out_parser = unified(comfy, model)
    assert out_model is model
    assert out_weights is weights and out_weights.arch == "sd15"
    assert out_analysis is analysis
    assert out_parser is parser
    # In the other order too: the unified loader first, then the separate ones.
    again = unified(comfy, model)
    assert again[1] is weights and again[3] is analysis and again[4] is parser and again[2] is clip_vision
    (stock,) = comfy.execute_node("CLIPVisionLoader", clip_name=VIT_H_FILE)
    assert stock is not clip_vision  # ComfyUI's own Load CLIP Vision keeps a copy of its own (see the help page)
    assert type(stock) is type(clip_vision)


def test_the_clip_vision_model_is_loaded_once_per_file_version(comfy, official, point_folders, pack, monkeypatch):
    clip_vision_module = importlib.import_module("comfy.clip_vision")
    point_folders(**{kind: [official / kind] for kind in KINDS})
    pack.vision._CLIP_VISION_CACHE.clear()
    loads = []
    real_load = clip_vision_module.load
    monkeypatch.setattr(clip_vision_module, "load", lambda path: loads.append(path) or real_load(path))
    model = stand_in_model("SD15")
    first = unified(comfy, model)[2]
    second = unified(comfy, model, provider="CPU", parser_device="cpu")[2]
    assert second is first and len(loads) == 1
    # A changed file (new modification time) is read again, not served stale.
    path = official / "clip_vision" / VIT_H_FILE
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    third = unified(comfy, model)[2]
    assert third is not first and len(loads) == 2
    assert loads == [os.path.realpath(path)] * 2


def test_renamed_files_in_sub_folders_and_extra_model_paths_yaml_folders(comfy, official, point_folders, pack,
                                                                         tmp_path):
    """Every file under another name or one level off, half of them in folders added by an
    extra_model_paths.yaml that ComfyUI itself reads."""
    from utils.extra_config import load_extra_path_config

    own, extra = tmp_path / "models", tmp_path / "extra"
    for kind in KINDS:
        (own / kind).mkdir(parents=True)
    weights = random_models.place(official / "consistentid" / CID_FILE,
                                  extra / "consistentid" / "JackAILab" / "consistentid_v1.bin")
    clip_file = random_models.place(official / "clip_vision" / VIT_H_FILE,
                                    own / "clip_vision" / "ipadapter" / "clip_vision_h.safetensors")
    parser_file = random_models.place(official / "consistentid" / PARSER_FILE,
                                      extra / "facexlib" / "parsing_bisenet.pth")
    too_deep = own / "insightface" / "models" / "buffalo_l" / "buffalo_l"
    random_models.insightface_buffalo_l(too_deep)
    point_folders(**{kind: [own / kind] for kind in KINDS})
    yaml_file = tmp_path / "extra_model_paths.yaml"
    yaml_file.write_text(f"mine:\n    base_path: {extra}\n    consistentid: consistentid\n    facexlib: facexlib\n")
    load_extra_path_config(str(yaml_file))  # appends to the lists point_folders put in place (undone with them)
    comfy.refresh_file_lists()
    assert comfy.folder_paths.get_folder_paths("consistentid") == [str(own / "consistentid"),
                                                                   str(extra / "consistentid")]

    _model, ckpt, clip_vision, analysis, parser = unified(comfy, stand_in_model("SD15"))
    assert ckpt is pack.checkpoint.cached_checkpoint(str(weights))
    assert clip_vision is pack.vision.cached_clip_vision(str(clip_file))
    assert analysis is pack.insightface.get_face_analysis(str(too_deep), "auto")
    device = importlib.import_module("comfy.model_management").get_torch_device()
    assert parser is pack.parser.get_face_parser(str(parser_file), device)


def test_missing_files_give_one_message_with_every_file_and_its_folder(comfy, point_folders, pack, tmp_path):
    for kind in KINDS:
        (tmp_path / kind).mkdir()
    (tmp_path / "insightface" / "models").mkdir()
    (tmp_path / "insightface" / "models" / "buffalo_l.zip").write_bytes(b"never extracted")
    point_folders(**{kind: [tmp_path / kind] for kind in KINDS})
    with pytest.raises(pack.errors.ModelFileError) as caught:
        unified(comfy, stand_in_model("SD15"))
    message = str(caught.value)
    rows = dict(re.findall(r"^  (\S.*?) +-> (\S+)", message, flags=re.M))
    assert rows == {
        CID_FILE: str(tmp_path / "consistentid"),
        VIT_H_FILE: str(tmp_path / "clip_vision"),
        "det_10g.onnx, w600k_r50.onnx": str(tmp_path / "insightface" / "models" / "buffalo_l"),
        PARSER_FILE: str(tmp_path / "consistentid"),
    }, message
    assert "models/buffalo_l.zip was never extracted" in message
    assert f"parsing_bisenet.pth in {tmp_path / 'facexlib'}" in message


def test_an_sdxl_model_asks_for_the_sdxl_file_and_names_the_sd15_one_it_found(comfy, official, point_folders, pack):
    point_folders(**{kind: [official / kind] for kind in KINDS})
    with pytest.raises(pack.errors.ModelFileError) as caught:
        unified(comfy, stand_in_model("SDXL"))
    message = str(caught.value)
    rows = re.findall(r"^  (\S.*?) +-> ", message, flags=re.M)
    assert rows == ["ConsistentID_SDXL-v1.bin"], message
    assert f"found {CID_FILE}, which is the ConsistentID file for SD1.5; this model is SDXL" in message


def test_a_chosen_file_of_the_other_architecture_is_refused(comfy, official, point_folders, pack, tmp_path):
    """A file picked by hand (or an SDXL file renamed like the SD1.5 one) is checked against the model."""
    point_folders(**{kind: [official / kind] for kind in KINDS})
    with pytest.raises(pack.errors.ArchitectureMismatchError, match=r"ConsistentID file for SD1\.5, but the model is "
                                                                    r"SDXL"):
        unified(comfy, stand_in_model("SDXL"), consistentid_file=CID_FILE)


def test_a_model_of_unknown_architecture_is_refused(comfy, official, point_folders, pack):
    point_folders(**{kind: [official / kind] for kind in KINDS})
    with pytest.raises(pack.errors.ArchitectureMismatchError, match=r"the model \(Flux\) is neither SD1.5 nor SDXL"):
        unified(comfy, stand_in_model("Flux"))
