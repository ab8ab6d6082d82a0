"""Missing, misplaced or foreign model files and missing optional packages, inside a real ComfyUI: each
gives one message naming the file, the folders searched and the fix; the pack still loads without
insightface and facexlib."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools import random_models as comfy_models
from comfy_harness import REPO_ROOT
from comfy_face_fixtures import PARSER_CHOICE, PARSER_FILE, TESTS_DIR, schema_options

pytestmark = [pytest.mark.comfyui, pytest.mark.filterwarnings("ignore::FutureWarning")]


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
