"""What a user reads about the pack and what a registry reads about it.

Inside ComfyUI (COMFYUI_PATH): every node sits in a sub-category of "ConsistentID", every input and
output has a tooltip, no two display names can be mistaken for each other, the attribute node is
experimental, and every merge_at has the core's one default.  Without ComfyUI: LICENSE and the
pyproject metadata, the .comfyignore of the registry archive, and the default merge_at of the
example workflows.
"""

import json
import os
import re

import pytest

from comfy_harness import REPO_ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT_CATEGORY = "ConsistentID"
EXPERIMENTAL = {"ConsistentIDEncodeAttributes"}  # needs attribute-branch weights nobody has published
# What ComfyUI 0.3.64 (comfy_config/config_parser.py) accepts as accelerator classifiers; one other
# "Environment ::" classifier and it drops them all.
REGISTRY_ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                         "GPU :: Apple Metal"}
RUNTIME_FOLDERS = ("nodes", "consistentid_core", "example_workflows")
RUNTIME_FILES = ("__init__.py", "requirements.txt", "pyproject.toml", "README.md", "LICENSE")
DEVELOPMENT_PATHS = ("tests/conftest.py", "training/train.py",
                     "benchmarks/benchlib.py", "tools/run_workflow.py", "run.sh", ".ci/run", "requirements-dev.txt")


def _pyproject() -> dict:
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


# --- without ComfyUI ----------------------------------------------------------------------------

def test_license_file_exists_and_is_mit():
    with open(os.path.join(REPO_ROOT, "LICENSE")) as f:
        text = f.read()
    assert text.startswith("MIT License")
    assert "the comfyui-consistentid authors" in text


def test_pyproject_license_points_at_the_license_file():
    license_entry = _pyproject()["project"]["license"]
    assert license_entry == {"file": "LICENSE"}
    assert os.path.isfile(os.path.join(REPO_ROOT, license_entry["file"]))


def test_pyproject_has_what_the_registry_reads():
    data = _pyproject()
    project, comfy = data["project"], data["tool"]["comfy"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["description"].strip()
    assert os.path.isfile(os.path.join(REPO_ROOT, project["readme"]))
    assert project["urls"]["Repository"].startswith("https://")
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert comfy["requires-comfyui"].startswith(">=")
    classifiers = project["classifiers"]
    assert "Operating System :: OS Independent" in classifiers
    accelerators = {c[len("Environment :: "):] for c in classifiers if c.startswith("Environment ::")}
    assert accelerators <= REGISTRY_ACCELERATORS


def test_pyproject_dependencies_are_requirements_txt():
    with open(os.path.join(REPO_ROOT, "requirements.txt")) as f:
        required = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    assert _pyproject()["project"]["dependencies"] == required


def _comfyignore_patterns() -> list[str]:
    with open(os.path.join(REPO_ROOT, ".comfyignore")) as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


def _ignored(rel_path: str, patterns: list[str]) -> bool:
    """gitignore matching for the three forms .comfyignore keeps to: /folder/, /file and *.suffix."""
    for pattern in patterns:
        if pattern.startswith("*."):
            hit = rel_path.endswith(pattern[1:])
        elif pattern.startswith("/") and pattern.endswith("/"):
            hit = rel_path.startswith(pattern[1:])
        elif pattern.startswith("/"):
            hit = rel_path == pattern[1:]
        else:
            raise AssertionError(f".comfyignore: {pattern!r} is not one of the forms /folder/, /file, *.suffix")
        if hit:
            return True
    return False


def test_comfyignore_keeps_the_node_pack_and_leaves_out_the_rest():
    patterns = _comfyignore_patterns()
    kept = list(RUNTIME_FILES)
    for folder in RUNTIME_FOLDERS:
        for root, dirs, files in os.walk(os.path.join(REPO_ROOT, folder)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            kept += [os.path.relpath(os.path.join(root, name), REPO_ROOT).replace(os.sep, "/")
                     for name in files if not name.endswith(".pyc")]
    assert [path for path in kept if _ignored(path, patterns)] == []
    assert [path for path in DEVELOPMENT_PATHS if not _ignored(path, patterns)] == []


def test_the_default_merge_at_is_the_official_merge_step():
    from consistentid_core import constants

    steps, merge_step = constants.OFFICIAL_STEPS, constants.OFFICIAL_MERGE_STEP
    assert (steps, merge_step) == (50, 30)  # spec §2.1: 50 steps, start_merge_step 30
    assert constants.DEFAULT_MERGE_AT == (merge_step + 1) / steps == 0.62
    # ComfyUI's normal scheduler puts step i of n at i/(n-1) of the schedule: the default falls
    # strictly between the last text-only step and the first facial one.
    assert merge_step / (steps - 1) < constants.DEFAULT_MERGE_AT < (merge_step + 1) / (steps - 1)


def test_example_workflows_use_the_default_merge_at():
    from consistentid_core.constants import DEFAULT_MERGE_AT
    from tools import example_workflows

    assert example_workflows.MERGE_AT == DEFAULT_MERGE_AT
    for name, build in example_workflows.WORKFLOWS.items():
        with open(os.path.join(example_workflows.API_DIR, f"{name}_api.json")) as f:
            assert json.load(f) == build(), f"example_workflows/api/{name}_api.json is not what tools/example_workflows.py writes"


# --- inside ComfyUI -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def node_infos(comfy):
    """What ComfyUI's /object_info sends the frontend, for every node of the pack."""
    node_ids = comfy.pack_submodule("nodes.extension").NODE_IDS
    return {node_id: comfy.node_class(node_id).GET_NODE_INFO_V1() for node_id in node_ids}


def _inputs(info: dict) -> dict:
    """name -> options of the inputs a user connects or sets (ComfyUI's hidden inputs left out)."""
    return {name: (spec[1] if len(spec) > 1 else {})
            for group in ("required", "optional") for name, spec in (info["input"].get(group) or {}).items()}


@pytest.mark.comfyui
def test_every_node_is_in_a_sub_category(node_infos):
    wrong = {node_id: info["category"] for node_id, info in node_infos.items()
             if not re.fullmatch(rf"{ROOT_CATEGORY}/[a-z_]+", info["category"] or "")}
    assert wrong == {}


@pytest.mark.comfyui
def test_every_input_and_output_has_a_tooltip(node_infos):
    missing = []
    for node_id, info in node_infos.items():
        missing += [f"{node_id} input {name}" for name, options in _inputs(info).items()
                    if not str(options.get("tooltip") or "").strip()]
        missing += [f"{node_id} output {name}" for name, tooltip in zip(info["output_name"], info["output_tooltips"])
                    if not str(tooltip or "").strip()]
    assert missing == []


@pytest.mark.comfyui
def test_display_names_cannot_be_mistaken_for_each_other(node_infos):
    names = {node_id: info["display_name"] for node_id, info in node_infos.items()}
    assert all(name and name.strip() for name in names.values()), names
    squeezed = {node_id: re.sub(r"\s+", "", name).lower() for node_id, name in names.items()}
    assert len(set(squeezed.values())) == len(squeezed), names
    # One name that starts another ("Apply ConsistentID" / "Apply ConsistentID Model") is as bad.
    letters = {node_id: re.sub(r"[^a-z0-9]", "", name) for node_id, name in squeezed.items()}
    clashes = [(a, b) for a in letters for b in letters if a != b and letters[b].startswith(letters[a])]
    assert clashes == [], [(names[a], names[b]) for a, b in clashes]


@pytest.mark.comfyui
def test_only_the_attribute_node_is_experimental(node_infos):
    assert {node_id for node_id, info in node_infos.items() if info["experimental"]} == EXPERIMENTAL
    assert not any(info["deprecated"] for info in node_infos.values())


@pytest.mark.comfyui
def test_every_merge_at_has_the_core_default(comfy, node_infos):
    default = comfy.pack_submodule("consistentid_core.constants").DEFAULT_MERGE_AT
    defaults = {node_id: _inputs(info)["merge_at"].get("default") for node_id, info in node_infos.items()
                if "merge_at" in _inputs(info)}
    assert set(defaults) == {"ConsistentIDApply", "ConsistentIDConditioning"}
    assert defaults == {node_id: default for node_id in defaults}


@pytest.mark.comfyui
def test_comfyui_reads_the_registry_metadata(comfy):
    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(REPO_ROOT)
    assert config.project.license.file == "LICENSE"
    assert config.project.supported_os == ["OS Independent"]
    assert config.project.supported_comfyui_version == _pyproject()["tool"]["comfy"]["requires-comfyui"]
    assert config.tool_comfy.publisher_id == _pyproject()["tool"]["comfy"]["PublisherId"]
