"""The UI-format example workflows (example_workflows/) and their API twins (example_workflows/api/).

Without ComfyUI: the files parse, pair up, have consistent link tables, use known node types
and match their API twins in nodes and links; the converter's widget rules hold on small
hand-written definitions.  With COMFYUI_PATH: the UI files convert back to exactly the API
files with the real node definitions, are what the converter writes today, and use only
node types the real ComfyUI registers with the pack loaded.
"""

import glob
import importlib.util
import json
import os
import re
import sys

import pytest


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UI_DIR = os.path.join(REPO, "example_workflows")
API_DIR = os.path.join(REPO, "example_workflows", "api")

# The ComfyUI built-in nodes the examples use (the comfyui test below checks them for real),
# and the frontend's own note nodes, which the server never sees.
BUILTIN_TYPES = {
    "CheckpointLoaderSimple", "CLIPVisionLoader", "LoadImage", "ImageBatch", "EmptyLatentImage", "KSampler",
    "VAEDecode", "SaveImage", "PreviewImage", "MaskToImage", "ControlNetLoader", "ControlNetApplyAdvanced",
    "InpaintModelConditioning", "ImageCompositeMasked",
    "SolidMask", "MaskComposite", "InvertMask", "CLIPTextEncode", "ConditioningCombine",
}
NOTE_TYPES = {"Note", "MarkdownNote"}


def _load_converter():
    # By path: tools/ is not a package, and a top-level "tools" could be someone else's.
    spec = importlib.util.spec_from_file_location("ui_workflows", os.path.join(REPO, "tools", "ui_workflows.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


uiw = _load_converter()


def pack_node_ids() -> set[str]:
    # Read from the source: importing nodes/ would need ComfyUI's comfy_api.
    ids = set()
    for path in glob.glob(os.path.join(REPO, "nodes", "*.py")):
        with open(path) as f:
            ids.update(re.findall(r'node_id="([^"]+)"', f.read()))
    return ids


def names(folder: str, suffix: str) -> set[str]:
    return {os.path.basename(p)[: -len(suffix)] for p in glob.glob(os.path.join(folder, "*" + suffix))}


UI_NAMES = sorted(names(UI_DIR, ".json"))
API_NAMES = sorted(names(API_DIR, "_api.json"))


def load_ui(name: str) -> dict:
    with open(os.path.join(UI_DIR, f"{name}.json")) as f:
        return json.load(f)


def load_api(name: str) -> dict:
    with open(os.path.join(API_DIR, f"{name}_api.json")) as f:
        return json.load(f)


# --- without ComfyUI ----------------------------------------------------------------------------

def test_there_are_examples():
    assert len(UI_NAMES) >= 6, UI_NAMES


def test_every_api_workflow_has_a_ui_twin_and_back():
    assert set(API_NAMES) == set(UI_NAMES)


@pytest.mark.parametrize("name", UI_NAMES)
def test_ui_file_has_the_litegraph_shape(name):
    ui = load_ui(name)
    assert ui["version"] == 0.4
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra"):
        assert key in ui, key
    ids = [node["id"] for node in ui["nodes"]]
    assert len(ids) == len(set(ids)), "node ids repeat"
    assert ui["last_node_id"] >= max(ids)
    assert ui["last_link_id"] >= max((row[0] for row in ui["links"]), default=0)
    for node in ui["nodes"]:
        for key in ("id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
                    "widgets_values"):
            assert key in node, f"node {node.get('id')} lacks {key}"
        assert len(node["pos"]) == 2 and len(node["size"]) == 2
        if node["type"] not in NOTE_TYPES:
            assert node["properties"]["Node name for S&R"] == node["type"]


@pytest.mark.parametrize("name", UI_NAMES)
def test_link_table_matches_the_slots(name):
    ui = load_ui(name)
    nodes = {node["id"]: node for node in ui["nodes"]}
    rows = {row[0]: row for row in ui["links"]}
    assert len(rows) == len(ui["links"]), "link ids repeat"
    # Where each link id is referenced from the node side, to compare with what the row names.
    as_input, as_output = {}, {}
    for node in ui["nodes"]:
        for index, slot in enumerate(node["inputs"]):
            if slot["link"] is not None:
                as_input.setdefault(slot["link"], []).append((node["id"], index))
        for index, slot in enumerate(node["outputs"]):
            assert slot.get("slot_index", index) == index
            for link_id in slot["links"] or []:
                as_output.setdefault(link_id, []).append((node["id"], index))
    assert set(as_input) == set(rows), "input slots and the link table name different links"
    assert set(as_output) == set(rows), "output slots and the link table name different links"
    for link_id, (_, source, source_slot, target, target_slot, kind) in rows.items():
        assert as_output[link_id] == [(source, source_slot)], f"link {link_id}"
        assert as_input[link_id] == [(target, target_slot)], f"link {link_id}"
        assert nodes[source]["outputs"][source_slot]["type"] == kind, f"link {link_id}"


@pytest.mark.parametrize("name", UI_NAMES)
def test_node_types_are_the_packs_or_builtin(name):
    allowed = pack_node_ids() | BUILTIN_TYPES | NOTE_TYPES
    types = {node["type"] for node in load_ui(name)["nodes"]} | {n["class_type"] for n in load_api(name).values()}
    assert types <= allowed, sorted(types - allowed)


@pytest.mark.parametrize("name", UI_NAMES)
def test_ui_file_has_the_nodes_and_links_of_its_api_twin(name):
    ui, api = load_ui(name), load_api(name)
    graph_nodes = {str(node["id"]): node for node in ui["nodes"] if node["type"] not in NOTE_TYPES}
    assert set(graph_nodes) == set(api)
    for key, entry in api.items():
        assert graph_nodes[key]["type"] == entry["class_type"], key
        assert graph_nodes[key]["title"] == entry["_meta"]["title"], key
    ui_links = set()
    for row in ui["links"]:
        target_slot = graph_nodes[str(row[3])]["inputs"][row[4]]
        ui_links.add((str(row[1]), row[2], str(row[3]), target_slot["name"]))
    api_links = {(value[0], value[1], key, input_name) for key, entry in api.items()
                 for input_name, value in entry["inputs"].items() if isinstance(value, list)}
    assert ui_links == api_links


@pytest.mark.parametrize("name", UI_NAMES)
def test_ui_file_has_a_note_naming_the_model_files(name):
    notes = [node for node in load_ui(name)["nodes"] if node["type"] == "Note"]
    assert len(notes) == 1
    text = notes[0]["widgets_values"][0]
    for line in uiw.model_lines(load_api(name)):
        assert line in text


@pytest.mark.parametrize("name", UI_NAMES)
def test_nodes_do_not_overlap(name):
    boxes = [(n["pos"][0], n["pos"][1] - uiw.TITLE_HEIGHT, n["size"][0], n["size"][1] + uiw.TITLE_HEIGHT, n["title"])
             for n in load_ui(name)["nodes"]]
    for i, (ax, ay, aw, ah, a) in enumerate(boxes):
        for bx, by, bw, bh, b in boxes[i + 1:]:
            assert not (ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah), f"{a!r} overlaps {b!r}"


# The converter's rules, on hand-written definitions shaped like /object_info entries.
TOY_DEFS = {
    "Loader": {"input": {"required": {"ckpt": [["a.safetensors", "b.safetensors"]]}},
               "output": ["MODEL", "CLIP"], "output_name": ["MODEL", "CLIP"], "display_name": "Loader"},
    "Picture": {"input": {"required": {"image": [["x.png"], {"image_upload": True}]}},
                "output": ["IMAGE", "MASK"], "display_name": "Picture"},
    "Number": {"input": {"required": {"value": ["FLOAT", {"default": 0.5}]}}, "output": ["FLOAT"],
               "output_name": ["value"], "display_name": "Number"},
    "Sampler": {
        "input": {"required": {"model": ["MODEL", {}], "seed": ["INT", {"default": 0}],
                               "strength": ["FLOAT", {"default": 0.25}],
                               "mode": ["COMBO", {"options": ["a", "b"], "control_after_generate": True}],
                               "steps": ["INT", {"default": 20, "control_after_generate": False}]},
                  "optional": {"image": ["IMAGE", {}], "text": ["STRING", {"multiline": True, "default": ""}]}},
        "input_order": {"required": ["seed", "model", "steps", "strength", "mode"], "optional": ["text", "image"]},
        "output": ["LATENT"], "display_name": "Sampler"},
}
TOY_API = {
    "1": {"class_type": "Loader", "inputs": {"ckpt": "b.safetensors"}, "_meta": {"title": "Load"}},
    "2": {"class_type": "Number", "inputs": {"value": 0.75}, "_meta": {"title": "Strength"}},
    "3": {"class_type": "Picture", "inputs": {"image": "me.png"}, "_meta": {"title": "Photo"}},
    "4": {"class_type": "Sampler", "inputs": {"model": ["1", 0], "seed": 7, "steps": 9, "strength": ["2", 0],
                                              "mode": "b", "text": "hi", "image": ["3", 0]},
          "_meta": {"title": "Sample"}},
}


def test_converter_lays_out_widgets_as_the_frontend_does():
    ui = uiw.api_to_ui(TOY_API, TOY_DEFS, note="about")
    nodes = {node["id"]: node for node in ui["nodes"]}
    # input_order decides; INT seed gets a control by name, steps refuses one, the combo asks for one;
    # the linked strength keeps its default as its value.
    assert nodes[4]["widgets_values"] == [7, "fixed", 9, 0.25, "b", "fixed", "hi"]
    assert nodes[3]["widgets_values"] == ["me.png", "image"]
    # Sockets (all of them, in order), then the linked widget only; optional ones drawn hollow.
    assert [(s["name"], s["link"] is not None, s.get("shape"), s.get("widget")) for s in nodes[4]["inputs"]] == [
        ("model", True, None, None), ("image", True, 7, None), ("strength", True, None, {"name": "strength"})]
    assert [o["name"] for o in nodes[3]["outputs"]] == ["IMAGE", "MASK"]
    assert nodes[5]["type"] == "Note" and nodes[5]["widgets_values"] == ["about"]


def test_converter_round_trips():
    assert uiw.ui_to_api(uiw.api_to_ui(TOY_API, TOY_DEFS, note="about"), TOY_DEFS) == TOY_API


def test_converter_refuses_a_missing_required_value():
    broken = json.loads(json.dumps(TOY_API))
    del broken["4"]["inputs"]["seed"]
    with pytest.raises(uiw.WorkflowError, match="seed"):
        uiw.api_to_ui(broken, TOY_DEFS)


def test_every_example_has_a_description():
    assert set(API_NAMES) <= set(uiw.DESCRIPTIONS)


# --- inside ComfyUI -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def definitions(comfy):
    types = {n["class_type"] for name in API_NAMES for n in load_api(name).values()}
    return {node_type: uiw.object_info(comfy.nodes, node_type) for node_type in types}


@pytest.mark.comfyui
@pytest.mark.parametrize("name", UI_NAMES)
def test_ui_file_converts_back_to_its_api_twin(definitions, name):
    assert uiw.ui_to_api(load_ui(name), definitions) == load_api(name)


@pytest.mark.comfyui
@pytest.mark.parametrize("name", UI_NAMES)
def test_ui_file_is_what_the_converter_writes(definitions, name):
    api = load_api(name)
    assert uiw.api_to_ui(api, definitions, uiw.note_text(name, api)) == load_ui(name), (
        "example_workflows/ is stale: run COMFYUI_PATH=... python -m tools.ui_workflows")


@pytest.mark.comfyui
@pytest.mark.parametrize("name", UI_NAMES)
def test_every_node_type_is_registered_in_comfyui(comfy, name):
    for node in load_ui(name)["nodes"]:
        if node["type"] in NOTE_TYPES:
            continue
        node_cls = comfy.node_class(node["type"])
        assert comfy.is_pack_class(node_cls) == (node["type"] in pack_node_ids()), node["type"]
    for entry in load_api(name).values():
        comfy.node_class(entry["class_type"])
