"""UI-format example workflows: ``example_workflows/api/<name>_api.json`` -> ``example_workflows/<name>.json``.

The API format (what ``/prompt`` takes) names every input; the UI format (LiteGraph, what
ComfyUI's frontend saves and opens) keeps widget values as a bare list whose order the frontend
derives from the node definitions.  So the converter needs those definitions and runs inside a
real ComfyUI with this pack loaded (tools/comfy_host.py)::

    COMFYUI_PATH=/path/to/ComfyUI python -m tools.ui_workflows      # from the repository root

``api_to_ui`` and its inverse ``ui_to_api`` themselves need no ComfyUI: they take node
definitions shaped like the server's ``/object_info`` entries, which is what the frontend reads.
The rules below are those of ComfyUI frontend 1.27 (the one ComfyUI 0.3.64 pins):

* an input is a widget when its type has a widget constructor (INT, FLOAT, STRING, COMBO...) and
  it is not ``forceInput``; widgets follow ``input_order``, required before optional;
* an INT with ``control_after_generate`` (or, when that is not given, an INT called seed or
  noise_seed) and a COMBO with it are followed by a control widget; its value here is "fixed" so
  the example reproduces its image;
* the first required COMBO with ``image_upload`` (or video/animated) gets an "upload" button
  widget after all the inputs; the button's value is always "image";
* an input slot is saved only for sockets and for widgets fed by a link (the frontend drops the
  unconnected widget slots when it saves, see compressWidgetInputSlots); a linked widget keeps
  a value in ``widgets_values``, here its default, and the link wins when the prompt is built.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_DIR = os.path.join(REPO, "example_workflows", "api")
UI_DIR = os.path.join(REPO, "example_workflows")
API_SUFFIX = "_api.json"

# The keys of ComfyWidgets in the frontend's src/scripts/widgets.ts.
WIDGET_TYPES = frozenset({
    "INT", "FLOAT", "BOOLEAN", "STRING", "MARKDOWN", "COMBO", "IMAGEUPLOAD", "FILEUPLOAD", "COLOR",
    "IMAGECOMPARE", "TREESELECT", "MULTISELECT", "CHART", "GALLERIA", "SELECTBUTTON", "TEXTAREA",
})
LEGACY_SEED_NAMES = ("seed", "noise_seed")
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")
UPLOAD_VALUE = "image"
CONTROL_VALUE = "fixed"
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})  # drawn by the frontend only, never sent to the server
OPTIONAL_SHAPE = 7  # LiteGraph's RenderShape.HollowCircle, the frontend's mark for optional inputs
NOTE_COLOR, NOTE_BGCOLOR = "#432", "#653"  # the yellow the workflow templates use for notes

# Layout, in canvas units.  LiteGraph draws the title bar above a node's pos, outside its size.
TITLE_HEIGHT = 30
SLOT_HEIGHT = 20
WIDGET_HEIGHT = 24  # a widget row and the gap under it
TEXT_BOX_HEIGHT = 110  # a multiline STRING, tall enough to read a prompt
IMAGE_AREA_HEIGHT = 260  # room for the preview that image nodes draw under their widgets
NODE_WIDTH = 320
WIDE_NODE_WIDTH = 440  # nodes with a prompt box
TITLE_CHAR_WIDTH = 8  # a generous width of one character of the 14px title font
COLUMN_GAP = 60
ROW_GAP = 40
NOTE_WIDTH = 560

# What each example is for, shown in its note; the model list is read from the graph.
DESCRIPTIONS = {
    "sd15_portrait": (
        "A portrait of the person in the reference photo with SD1.5 and the fewest nodes: "
        "Apply ConsistentID patches the model and writes the prompt with the official facial caption; "
        "the facial tokens take over after 62% of sampling (merge_at), and the stock KSampler renders."
    ),
    "unified_loader_portrait": (
        "The SD1.5 portrait with one loader: ConsistentID Unified Loader takes the checkpoint's MODEL and finds "
        "the ConsistentID weights of its architecture (SD1.5: ConsistentID-v1.bin, SDXL: ConsistentID_SDXL-v1.bin), "
        "the CLIP ViT-H image encoder, insightface buffalo_l and the face parser by their names or common renamings, "
        "in sub-folders and extra_model_paths.yaml folders too; a missing file gives one message listing every "
        "missing file and its folder. Apply ConsistentID and the stock KSampler do the rest, as in sd15_portrait."
    ),
    "sd15_stock_ksampler_merge_step": (
        "The same SD1.5 portrait built from the separate nodes: Apply ConsistentID Model patches the model, "
        "ConsistentID Conditioning builds the positive/negative prompt, and ConsistentID Merge Step turns "
        "'switch after step 30 of 50' into the merge_at that makes the stock KSampler switch exactly there, "
        "as the official pipeline does."
    ),
    "sdxl_portrait": (
        "An SDXL portrait: Apply ConsistentID Model and ConsistentID Conditioning with the SDXL weights, "
        "sampled by KSampler (ConsistentID merge step), which switches to the facial prompt after step 30 itself."
    ),
    "several_photos_save_embeds": (
        "Two photos of the same person are batched and encoded into one identity (combine: average), then saved "
        "as output/consistentid/my_person_00001.safetensors, so later workflows need neither insightface nor "
        "CLIP vision nor the face parser. Put both photos into ComfyUI's input folder."
    ),
    "portrait_from_saved_embeds": (
        "An SD1.5 portrait from embeds saved earlier by the several_photos_save_embeds example: no reference photo, "
        "no face analysis. Run that example first (or pick another saved embeds file)."
    ),
    "flexid_sd15_identity_attributes_eyes": (
        "FlexID-style control with SD1.5, each part from its own photo and with its own strength: the identity of "
        "photo A, hair and glasses of photo B (Encode Attributes -> attribute_embeds, attr_weight), the eyes of "
        "photo C (Regions From Other Photos) and per-region strengths. The attribute branch needs ConsistentID "
        "weights trained with the attribute stage; the released ConsistentID-v1.bin has none (disconnect "
        "attribute_embeds to use it: identity, regions and strengths work with it as they are)."
    ),
    "flexid_sdxl_identity_attributes_eyes_pose": (
        "The SDXL FlexID example with all four photos: identity of A, hair and glasses of B, eyes of C, and the head "
        "pose of D through ComfyUI's own Apply ControlNet with the InstantID ControlNet, fed the 5-keypoint drawing "
        "of Face Keypoints. Attributes need weights trained with the attribute stage; pose and regions work with "
        "the released ConsistentID_SDXL-v1.bin."
    ),
    "two_people": (
        "Two people in one picture with SD1.5: photo A on the left half, photo B on the right (SolidMask + "
        "MaskComposite + InvertMask; draw your own masks instead if you like). Two Apply ConsistentID to Model "
        "nodes are chained, each with its person's attn_mask, so each identity acts only in its half; the "
        "ConsistentID LoRA comes from the first and is kept once. Each ConsistentID Conditioning is masked the same "
        "way (text-only before merge_at, facial after, per person), and Conditioning (Combine) adds a scene prompt "
        "for the whole picture; the stock KSampler renders."
    ),
    "face_parse_preview": (
        "Shows what ConsistentID cuts out of a face: the face parser's coloured overlay and the five region masks "
        "(face, eye, ear, nose, lip) it uses for the facial prompt. No checkpoint needed."
    ),
    "face_inpaint": (
        "The person of the reference photo into an existing photo (the target). Face Mask For Inpainting finds the "
        "target's largest face and makes its mask: insightface's box grown by 24 px, the outer 16 px of it "
        "feathered, exactly 0 everywhere else (source 'parser' follows the face's shape instead). Apply "
        "ConsistentID patches a normal SD1.5 checkpoint and writes the facial prompt; ComfyUI's "
        "InpaintModelConditioning and KSampler (denoise 0.9: lower keeps more of the target's face) redraw the "
        "masked face; ImageCompositeMasked pastes the result into the target with the same mask, so every pixel "
        "outside the mask is the target's own and the picture keeps the target's size. Target sides divisible by "
        "8 fit exactly."
    ),
}


class WorkflowError(ValueError):
    """A workflow that does not fit the node definitions, or a malformed UI file."""


# --- node definitions ---------------------------------------------------------------------------

@dataclass(frozen=True)
class InputDef:
    name: str
    type: str  # "COMBO" for a list of choices, as the frontend names it
    options: dict
    optional: bool
    choices: tuple = ()

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.options.get("forceInput")

    @property
    def has_control(self) -> bool:
        flag = self.options.get("control_after_generate")
        if self.type == "INT":
            return bool(flag) if flag is not None else self.name in LEGACY_SEED_NAMES
        return self.type == "COMBO" and bool(flag)

    @property
    def wants_upload(self) -> bool:
        return self.type == "COMBO" and not self.optional and any(self.options.get(f) is True for f in UPLOAD_FLAGS)

    def default(self):
        """The value a freshly created widget has in the frontend."""
        if "default" in self.options:
            return self.options["default"]
        if self.type == "COMBO":
            return self.choices[0] if self.choices else ""
        return {"INT": 0, "FLOAT": 0.0, "BOOLEAN": False}.get(self.type, "")


@dataclass(frozen=True)
class WidgetSlot:
    """One entry of ``widgets_values``: a widget input, or a control/upload value the API never sees."""
    kind: str  # "input", "control" or "upload"
    input: InputDef | None = None


@dataclass(frozen=True)
class NodeDef:
    type: str
    display_name: str
    inputs: tuple[InputDef, ...]
    outputs: tuple[tuple[str, str], ...]  # (name, type) per output slot

    def input(self, name: str) -> InputDef:
        for candidate in self.inputs:
            if candidate.name == name:
                return candidate
        raise WorkflowError(f"{self.type} has no input {name!r}; it has {[i.name for i in self.inputs]}")

    @property
    def sockets(self) -> list[InputDef]:
        return [i for i in self.inputs if not i.is_widget]

    @property
    def widgets(self) -> list[InputDef]:
        return [i for i in self.inputs if i.is_widget]

    def widget_slots(self) -> list[WidgetSlot]:
        slots = []
        for widget in self.widgets:
            slots.append(WidgetSlot("input", widget))
            if widget.has_control:
                slots.append(WidgetSlot("control"))
        if any(i.wants_upload for i in self.inputs):
            slots.append(WidgetSlot("upload"))
        return slots


def parse_node_def(node_type: str, info: dict) -> NodeDef:
    """A NodeDef from an ``/object_info`` entry (keys input, input_order, output, output_name, display_name)."""
    spec = info.get("input") or {}
    order = info.get("input_order") or {}
    inputs = []
    for group in ("required", "optional"):
        entries = spec.get(group) or {}
        names = [n for n in order.get(group, []) if n in entries]
        names += [n for n in entries if n not in names]
        inputs += [_input_def(name, entries[name], group == "optional") for name in names]
    types = [t if isinstance(t, str) else "COMBO" for t in info.get("output") or []]
    names = list(info.get("output_name") or types)
    return NodeDef(node_type, info.get("display_name") or node_type, tuple(inputs), tuple(zip(names, types)))


def _input_def(name: str, spec, optional: bool) -> InputDef:
    kind = spec[0]
    options = dict(spec[1]) if len(spec) > 1 and spec[1] else {}
    if isinstance(kind, (list, tuple)):
        return InputDef(name, "COMBO", options, optional, tuple(kind))
    if kind == "COMBO":
        return InputDef(name, "COMBO", options, optional, tuple(options.get("options") or ()))
    return InputDef(name, kind, options, optional)


def object_info(nodes_module, node_type: str) -> dict:
    """What ComfyUI's server sends the frontend for ``node_type`` (the fields the converter reads)."""
    from comfy_api.internal import _ComfyNodeInternal

    node_cls = nodes_module.NODE_CLASS_MAPPINGS.get(node_type)
    if node_cls is None:
        raise WorkflowError(f"node type {node_type!r} is not registered in this ComfyUI")
    if issubclass(node_cls, _ComfyNodeInternal):
        return node_cls.GET_NODE_INFO_V1()
    inputs = node_cls.INPUT_TYPES()
    outputs = list(node_cls.RETURN_TYPES)
    return {
        "name": node_type,
        "display_name": nodes_module.NODE_DISPLAY_NAME_MAPPINGS.get(node_type, node_type),
        "input": inputs,
        "input_order": {group: list(entries) for group, entries in inputs.items()},
        "output": outputs,
        "output_name": list(getattr(node_cls, "RETURN_NAMES", outputs)),
    }


# --- API -> UI ----------------------------------------------------------------------------------

def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _node_id(key: str) -> int:
    if not key.isdigit():
        raise WorkflowError(f"node id {key!r} is not a number; the frontend numbers its nodes")
    return int(key)


def api_to_ui(api: dict, defs: dict[str, dict], note: str | None = None) -> dict:
    """The UI-format workflow for an API-format one; ``defs`` maps class types to object_info entries."""
    missing = sorted({entry["class_type"] for entry in api.values()} - set(defs))
    if missing:
        raise WorkflowError(f"no node definition for {missing}")
    node_defs = {key: parse_node_def(entry["class_type"], defs[entry["class_type"]]) for key, entry in api.items()}

    edges = []  # (source key, source slot, target key, input name)
    for key, entry in api.items():
        defn = node_defs[key]
        for name, value in entry["inputs"].items():
            if not defn.input(name).is_widget and not _is_link(value):
                raise WorkflowError(f"node {key} input {name} is a socket but has the value {value!r}")
            if _is_link(value):
                source, slot = value
                if source not in api:
                    raise WorkflowError(f"node {key} input {name} links to missing node {source}")
                if slot >= len(node_defs[source].outputs):
                    raise WorkflowError(f"node {key} input {name} links to output {slot} of node {source}, "
                                        f"which has {len(node_defs[source].outputs)} outputs")
                edges.append((source, slot, key, name))
        for inp in defn.inputs:
            if not inp.optional and inp.name not in entry["inputs"]:
                raise WorkflowError(f"node {key} ({defn.type}) has no value for the required input {inp.name!r}")

    order = _execution_order(list(api), edges)
    ui_nodes = {key: _ui_node(key, api[key], node_defs[key], edges, order.index(key)) for key in order}
    links = []
    for key in order:  # numbered in execution order, then slot order, as a hand-built graph would be
        for slot_index, slot in enumerate(ui_nodes[key]["inputs"]):
            feeding = [(s, ss) for s, ss, t, name in edges if t == key and name == slot["name"]]
            if not feeding:
                continue
            (source, source_slot), = feeding
            link_id = len(links) + 1
            slot["link"] = link_id
            ui_nodes[source]["outputs"][source_slot]["links"].append(link_id)
            links.append([link_id, _node_id(source), source_slot, _node_id(key), slot_index,
                          node_defs[source].outputs[source_slot][1]])

    nodes = [ui_nodes[key] for key in order]
    graph_top = 0
    if note is not None:
        note_node = _note_node(max(_node_id(k) for k in api) + 1, note, len(nodes))
        nodes.append(note_node)
        graph_top = note_node["size"][1] + TITLE_HEIGHT + ROW_GAP
    _lay_out(ui_nodes, edges, graph_top)
    return {
        "last_node_id": max(n["id"] for n in nodes),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {},
        "version": 0.4,
    }


def _execution_order(keys: list[str], edges) -> list[str]:
    """A topological order, ready nodes by id first (LiteGraph recomputes its own on load)."""
    waiting = {key: {s for s, _ss, t, _n in edges if t == key} for key in keys}
    order = []
    while waiting:
        ready = sorted((k for k, deps in waiting.items() if not deps), key=_node_id)
        if not ready:
            raise WorkflowError(f"the graph has a cycle among {sorted(waiting, key=_node_id)}")
        for key in ready:
            order.append(key)
            del waiting[key]
        for deps in waiting.values():
            deps.difference_update(ready)
    return order


def _ui_node(key: str, entry: dict, defn: NodeDef, edges, order: int) -> dict:
    linked = {name for _s, _ss, t, name in edges if t == key}
    inputs = [_input_slot(i) for i in defn.sockets]
    inputs += [dict(_input_slot(i), widget={"name": i.name}) for i in defn.widgets if i.name in linked]
    values = []
    for slot in defn.widget_slots():
        if slot.kind == "control":
            values.append(CONTROL_VALUE)
        elif slot.kind == "upload":
            values.append(UPLOAD_VALUE)
        elif slot.input.name in linked or slot.input.name not in entry["inputs"]:
            values.append(slot.input.default())
        else:
            values.append(entry["inputs"][slot.input.name])
    title = entry.get("_meta", {}).get("title", defn.display_name)
    return {
        "id": _node_id(key),
        "type": defn.type,
        "pos": [0, 0],
        "size": _node_size(defn, title),
        "flags": {},
        "order": order,
        "mode": 0,
        "inputs": inputs,
        "outputs": [{"name": name, "type": kind, "links": [], "slot_index": i}
                    for i, (name, kind) in enumerate(defn.outputs)],
        "title": title,
        "properties": {"Node name for S&R": defn.type},
        "widgets_values": values,
    }


def _input_slot(inp: InputDef) -> dict:
    slot = {"name": inp.name, "type": inp.type, "link": None}
    if inp.optional:
        slot["shape"] = OPTIONAL_SHAPE
    return slot


def _note_node(node_id: int, text: str, order: int) -> dict:
    lines = sum(1 + len(line) // 85 for line in text.splitlines())  # about 85 characters fit a line
    return {
        "id": node_id,
        "type": "Note",
        "pos": [0, TITLE_HEIGHT],
        "size": [NOTE_WIDTH, 30 + 12 * lines],
        "flags": {},
        "order": order,
        "mode": 0,
        "inputs": [],
        "outputs": [],
        "title": "About this workflow",
        "properties": {},
        "widgets_values": [text],
        "color": NOTE_COLOR,
        "bgcolor": NOTE_BGCOLOR,
    }


def _node_size(defn: NodeDef, title: str) -> list[int]:
    """Roughly what LiteGraph's computeSize gives, with room for prompt boxes and image previews."""
    multiline = [w for w in defn.widgets if w.type == "STRING" and w.options.get("multiline")]
    width = WIDE_NODE_WIDTH if multiline else NODE_WIDTH
    width = max(width, TITLE_HEIGHT + TITLE_CHAR_WIDTH * len(title) + 20)
    rows = max(len(defn.sockets), len(defn.outputs), 1)
    height = rows * SLOT_HEIGHT + 8 + 6
    for slot in defn.widget_slots():
        height += TEXT_BOX_HEIGHT if slot.input in multiline else WIDGET_HEIGHT
    shows_images = defn.type in ("PreviewImage", "SaveImage") or any(i.wants_upload for i in defn.inputs)
    if shows_images:
        height += IMAGE_AREA_HEIGHT
    return [width, height]


def _lay_out(ui_nodes: dict[str, dict], edges, top: int) -> None:
    """Columns by graph depth, left to right; within a column, nodes near the ones that feed them."""
    consumers = {key: [t for s, _ss, t, _n in edges if s == key] for key in ui_nodes}
    sources = {key: [s for s, _ss, t, _n in edges if t == key] for key in ui_nodes}
    depth: dict[str, int] = {}

    def longest_path(key: str) -> int:
        if key not in depth:
            depth[key] = 1 + max((longest_path(s) for s in sources[key]), default=-1)
        return depth[key]

    for key in ui_nodes:
        longest_path(key)
    # A loader sits just left of its first consumer instead of far away in column 0.
    for key in ui_nodes:
        if not sources[key] and consumers[key]:
            depth[key] = min(depth[t] for t in consumers[key]) - 1

    top_of: dict[str, float] = {}  # canvas y of each placed node's first slot row

    def slot_y(key: str, slot: int) -> float:
        return top_of[key] + (slot + 0.5) * SLOT_HEIGHT

    x = 0
    for column in range(max(depth.values()) + 1):
        members = [k for k in ui_nodes if depth[k] == column]
        if not members:
            continue

        def sort_key(key: str):
            feeding = [slot_y(s, ss) for s, ss, t, _n in edges if t == key and s in top_of]
            if not feeding and not sources[key]:
                # A source: level with what already feeds its consumers, or below the column.
                feeding = [slot_y(s, ss) for s, ss, t, _n in edges if t in consumers[key] and s in top_of]
            if feeding:
                return (0, sum(feeding) / len(feeding), _node_id(key))
            return (1 if column else 0, 0.0, _node_id(key))

        y = top
        for key in sorted(members, key=sort_key):
            node = ui_nodes[key]
            node["pos"] = [x, y + TITLE_HEIGHT]
            top_of[key] = y + TITLE_HEIGHT
            y += TITLE_HEIGHT + node["size"][1] + ROW_GAP
        x += max(ui_nodes[k]["size"][0] for k in members) + COLUMN_GAP


# --- UI -> API ----------------------------------------------------------------------------------

def ui_to_api(ui: dict, defs: dict[str, dict]) -> dict:
    """The prompt the frontend would queue for a UI-format workflow (notes left out)."""
    links = {row[0]: row for row in ui.get("links") or []}
    api = {}
    for node in sorted(ui["nodes"], key=lambda n: n.get("order", 0)):
        if node["type"] in NOTE_TYPES:
            continue
        if node.get("mode", 0) != 0:
            raise WorkflowError(f"node {node['id']} is muted or bypassed; only active nodes are converted")
        if node["type"] not in defs:
            raise WorkflowError(f"no node definition for {node['type']!r} (node {node['id']})")
        defn = parse_node_def(node["type"], defs[node["type"]])
        slots = defn.widget_slots()
        values = node.get("widgets_values") or []
        if len(values) != len(slots):
            raise WorkflowError(f"node {node['id']} ({defn.type}) has {len(values)} widget values, "
                                f"its definition {len(slots)}")
        inputs = {slot.input.name: value for slot, value in zip(slots, values) if slot.kind == "input"}
        for index, slot in enumerate(node.get("inputs") or []):
            if slot.get("link") is None:
                continue
            row = links.get(slot["link"])
            if row is None or row[3] != node["id"] or row[4] != index:
                raise WorkflowError(f"node {node['id']} input {slot['name']} names link {slot['link']}, "
                                    f"which does not end there: {row}")
            defn.input(slot["name"])
            inputs[slot["name"]] = [str(row[1]), row[2]]
        api[str(node["id"])] = {"class_type": defn.type, "inputs": inputs,
                                "_meta": {"title": node.get("title") or defn.display_name}}
    return api


# --- the example files --------------------------------------------------------------------------

def model_lines(api: dict) -> list[str]:
    """Where each file the graph loads goes, read from the loader nodes' values."""
    lines = []
    for entry in api.values():
        inputs, kind = entry["inputs"], entry["class_type"]
        if kind == "CheckpointLoaderSimple":
            lines.append(f"- models/checkpoints/{inputs['ckpt_name']}")
        elif kind == "ConsistentIDModelLoader":
            lines.append(f"- models/consistentid/{inputs['consistentid_file']}")
        elif kind == "CLIPVisionLoader":
            lines.append(f"- models/clip_vision/{inputs['clip_name']}")
        elif kind == "ConsistentIDFaceAnalysisLoader":
            lines.append(f"- models/insightface/models/{inputs['model_name']}/ (the insightface {inputs['model_name']} "
                         f".onnx files)")
        elif kind == "ConsistentIDUnifiedLoader":
            lines += [
                "- models/consistentid/ConsistentID-v1.bin (for SD1.5; ConsistentID_SDXL-v1.bin for SDXL)",
                "- models/clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
                "- models/insightface/models/buffalo_l/ (the insightface buffalo_l .onnx files)",
                "- models/consistentid/face_parsing.pth (BiSeNet face parser)",
                "  (the Unified Loader also finds them in sub-folders and under common other names)",
            ]
        elif kind == "ConsistentIDFaceParserLoader":
            lines.append(f"- models/{inputs['parser_file']} (BiSeNet face parser)")
        elif kind == "LoadImage":
            title = entry.get("_meta", {}).get("title", "")
            what = title if title.startswith("Photo ") else "a photo of the person"
            if title.startswith("Target"):
                what = "the photo the face goes into"
            lines.append(f"- input/{inputs['image']} ({what}; any name, pick it in the node)")
        elif kind == "ControlNetLoader":
            lines.append(f"- models/controlnet/{inputs['control_net_name']} (the InstantID ControlNet, for the pose)")
        elif kind == "ConsistentIDLoadEmbeds":
            lines.append(f"- {inputs['embeds_file']} (saved embeds)")
    return sorted(set(lines), key=lines.index)


def note_text(name: str, api: dict) -> str:
    if name not in DESCRIPTIONS:
        raise WorkflowError(f"no description for the example {name!r}: add one to DESCRIPTIONS in {__file__}")
    return (f"{DESCRIPTIONS[name]}\n\nFiles it needs (paths inside the ComfyUI folder):\n"
            + "\n".join(model_lines(api)))


def api_workflows(folder: str = API_DIR) -> dict[str, dict]:
    found = {}
    for path in sorted(glob.glob(os.path.join(folder, "*" + API_SUFFIX))):
        with open(path) as f:
            found[os.path.basename(path)[: -len(API_SUFFIX)]] = json.load(f)
    return found


def convert_all(defs: dict[str, dict], api_dir: str = API_DIR, ui_dir: str = UI_DIR) -> list[str]:
    os.makedirs(ui_dir, exist_ok=True)
    written = []
    for name, api in api_workflows(api_dir).items():
        path = os.path.join(ui_dir, f"{name}.json")
        with open(path, "w") as f:
            json.dump(api_to_ui(api, defs, note_text(name, api)), f, indent=2)
            f.write("\n")
        written.append(path)
    return written


def comfy_definitions(node_types) -> dict[str, dict]:
    """object_info entries read from a ComfyUI set up in this process with the pack loaded."""
    from tools.comfy_host import ComfyHost

    with tempfile.TemporaryDirectory(prefix="cid-ui-workflows-") as base:
        host = ComfyHost(os.environ["COMFYUI_PATH"], cpu=True, base_directory=base)
        return {node_type: object_info(host.nodes, node_type) for node_type in node_types}


def main() -> int:
    if not os.environ.get("COMFYUI_PATH", "").strip():
        print("set COMFYUI_PATH to a ComfyUI checkout: the widget order comes from its node definitions",
              file=sys.stderr)
        return 2
    # ComfyUI warns about every optional built-in that does not import (torchaudio...); only errors
    # are worth showing here.  The root logger stays at WARNING so the harness still sees the pack's.
    quiet = logging.StreamHandler()
    quiet.setLevel(logging.ERROR)
    logging.basicConfig(level=logging.WARNING, handlers=[quiet])
    types = {entry["class_type"] for api in api_workflows().values() for entry in api.values()}
    for path in convert_all(comfy_definitions(sorted(types))):
        print(os.path.relpath(path, REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
