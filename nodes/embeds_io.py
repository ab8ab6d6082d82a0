"""Save, load and combine ConsistentID embeds (safetensors in ComfyUI's output/input folders; no pickle)."""

from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io

from ..consistentid_core.embeds import (
    COMBINE_METHODS, EXTENSION, TEMP_PREFIX, FaceEmbeds, load_embeds, resolve_inside, save_numbered_embeds,
)
from ..consistentid_core.errors import EmbedsError
from .glue.types import CATEGORY_EMBEDS, ConsistentIDEmbeds, ConsistentIDModel

logger = logging.getLogger("consistentid")

NONE_FOUND = "(no embeds file in input/ or output/)"


def _embeds_files() -> list[str]:
    found = []
    for label, base in (("input", folder_paths.get_input_directory()), ("output", folder_paths.get_output_directory())):
        for root, _dirs, files in os.walk(base, followlinks=False):
            for name in files:
                # A .tmp-* file is a save in progress or one that was killed: not embeds to offer.
                if name.endswith(EXTENSION) and not name.startswith(TEMP_PREFIX):
                    rel = os.path.relpath(os.path.join(root, name), base).replace(os.sep, "/")
                    found.append(f"{label}/{rel}")
    return sorted(found) or [NONE_FOUND]


def _base_dir(label: str) -> str:
    if label == "input":
        return folder_paths.get_input_directory()
    if label == "output":
        return folder_paths.get_output_directory()
    raise EmbedsError(f"embeds file must start with 'input/' or 'output/', got {label!r}")


class ConsistentIDSaveEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentIDSaveEmbeds",
            display_name="Save ConsistentID Embeds",
            category=CATEGORY_EMBEDS,
            description="Writes the embeds as .safetensors into ComfyUI's output folder (numbered, never overwritten).",
            inputs=[
                ConsistentIDEmbeds.Input("embeds", tooltip="from Encode Face (or Combine Embeds); saved with "
                                                           "their architecture and sources"),
                io.String.Input("filename_prefix", default="consistentid/embeds",
                                tooltip="relative to the output folder; '..' and absolute paths are refused"),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, embeds, filename_prefix) -> io.NodeOutput:
        out_dir = folder_paths.get_output_directory()
        path = save_numbered_embeds(embeds, out_dir, filename_prefix)
        rel = os.path.relpath(path, os.path.realpath(out_dir)).replace(os.sep, "/")
        logger.info("saved ConsistentID embeds to output/%s", rel)
        return io.NodeOutput(ui={"text": [f"output/{rel}"]})


class ConsistentIDLoadEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentIDLoadEmbeds",
            display_name="Load ConsistentID Embeds",
            category=CATEGORY_EMBEDS,
            description="Reads embeds saved by Save ConsistentID Embeds from the input or output folder.",
            inputs=[
                io.Combo.Input("embeds_file", options=_embeds_files(),
                               tooltip="a .safetensors embeds file under input/ or output/ (Save ConsistentID "
                                       "Embeds writes to output/consistentid/)"),
                ConsistentIDModel.Input("consistentid", optional=True,
                                        tooltip="when connected, embeds of the other architecture are refused here"),
            ],
            outputs=[ConsistentIDEmbeds.Output(display_name="embeds",
                                               tooltip="to Apply ConsistentID or ConsistentID Conditioning, as "
                                                       "Encode Face's embeds")],
        )

    @classmethod
    def execute(cls, embeds_file, consistentid=None) -> io.NodeOutput:
        if embeds_file == NONE_FOUND:
            raise EmbedsError("no embeds file: save one with Save ConsistentID Embeds, or copy a .safetensors into input/")
        label, _, rel = embeds_file.partition("/")
        path = resolve_inside(_base_dir(label), rel)
        expected = consistentid.arch if consistentid is not None else None
        return io.NodeOutput(load_embeds(path, expected_arch=expected))

    @classmethod
    def fingerprint_inputs(cls, embeds_file, consistentid=None):
        label, _, rel = embeds_file.partition("/")
        try:
            return os.path.getmtime(resolve_inside(_base_dir(label), rel))
        except (EmbedsError, OSError):
            return embeds_file


class ConsistentIDCombineEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentIDCombineEmbeds",
            display_name="Combine ConsistentID Embeds",
            category=CATEGORY_EMBEDS,
            description="Joins embeds of several photos: concat keeps them as a batch, the others reduce to one identity.",
            inputs=[
                ConsistentIDEmbeds.Input("embeds_1", tooltip="embeds of one photo (or of several); the "
                                                             "'first' method keeps only these"),
                ConsistentIDEmbeds.Input("embeds_2", tooltip="embeds of another photo of the same person, same "
                                                             "architecture"),
                ConsistentIDEmbeds.Input("embeds_3", optional=True, tooltip="optional third embeds"),
                ConsistentIDEmbeds.Input("embeds_4", optional=True, tooltip="optional fourth embeds"),
                io.Combo.Input("method", options=["concat", *COMBINE_METHODS], default="average",
                               tooltip="concat: keep them as a batch; average / norm_average: one identity "
                                       "from all of them; first: embeds_1's first reference only"),
            ],
            outputs=[ConsistentIDEmbeds.Output(display_name="embeds",
                                               tooltip="to Apply ConsistentID or ConsistentID Conditioning")],
        )

    @classmethod
    def execute(cls, embeds_1, embeds_2, method, embeds_3=None, embeds_4=None) -> io.NodeOutput:
        items = [e for e in (embeds_1, embeds_2, embeds_3, embeds_4) if e is not None]
        joined = FaceEmbeds.concat(items)
        return io.NodeOutput(joined if method == "concat" else joined.combine(method))
