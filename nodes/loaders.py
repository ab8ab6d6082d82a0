"""Loader nodes: ConsistentID weights, insightface, and the BiSeNet face parser."""

from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io

from ..consistentid_core.errors import ModelFileError
from ..consistentid_core.face.insightface_models import find_insightface_model_dir, get_face_analysis, resolve_providers
from ..consistentid_core.face.parser import PARSER_FILE_NAMES, get_face_parser
from ..consistentid_core.model.checkpoint import cached_checkpoint, describe
from .glue import folders
from .glue.types import CATEGORY_LOADERS, ConsistentIDModel, FaceAnalysis, FaceParser

logger = logging.getLogger("consistentid")

NONE_FOUND = "(no file found - see the tooltip)"
PROVIDERS = ["auto", "CPU", "CUDA", "ROCm", "CoreML", "DirectML"]
INSIGHTFACE_NAMES = ["buffalo_l", "antelopev2"]


def _choices(files: list[str]) -> list[str]:
    return files or [NONE_FOUND]


def _missing(kind: str, folder_names: tuple[str, ...], wanted: str) -> ModelFileError:
    searched = [p for name in folder_names for p in folder_paths.get_folder_paths(name)]
    found = {p: sorted(os.listdir(p))[:10] if os.path.isdir(p) else "(does not exist)" for p in searched}
    return ModelFileError(f"no {kind} selected: put {wanted} into one of {searched}. Found there: {found}")


class ConsistentIDModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentIDModelLoader",
            display_name="Load ConsistentID Weights",
            category=CATEGORY_LOADERS,
            description="Loads ConsistentID weights (official .bin or .safetensors, SD1.5 or SDXL) from models/consistentid.",
            inputs=[
                io.Combo.Input(
                    "consistentid_file",
                    options=_choices(folders.weight_files(folders.CONSISTENTID)),
                    tooltip="ConsistentID-v1.bin (SD1.5) or ConsistentID_SDXL-v1.bin (SDXL) in models/consistentid",
                ),
            ],
            outputs=[ConsistentIDModel.Output(display_name="consistentid",
                                              tooltip="the ConsistentID weights (SD1.5 or SDXL); to Encode Face, "
                                                      "Apply ConsistentID and ConsistentID Conditioning")],
        )

    @classmethod
    def execute(cls, consistentid_file) -> io.NodeOutput:
        if consistentid_file == NONE_FOUND:
            raise _missing("ConsistentID file", (folders.CONSISTENTID,), "ConsistentID-v1.bin")
        path = folder_paths.get_full_path_or_raise(folders.CONSISTENTID, consistentid_file)
        ckpt = cached_checkpoint(path)
        logger.info("ConsistentID weights: %s", describe(ckpt))
        return io.NodeOutput(ckpt)


class ConsistentIDFaceAnalysisLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentIDFaceAnalysisLoader",
            display_name="Load InsightFace (ConsistentID)",
            category=CATEGORY_LOADERS,
            description="insightface detector + ArcFace from models/insightface/models/<name>/ (never downloads).",
            inputs=[
                io.Combo.Input("model_name", options=INSIGHTFACE_NAMES, default="buffalo_l",
                               tooltip="ConsistentID was trained with buffalo_l; antelopev2 embeddings live in another space"),
                io.Combo.Input("provider", options=PROVIDERS, default="auto",
                               tooltip="onnxruntime execution provider; 'auto' takes the best available and logs it "
                                       "(CUDA needs onnxruntime-gpu installed in place of onnxruntime)"),
            ],
            outputs=[FaceAnalysis.Output(display_name="face_analysis",
                                         tooltip="face detector + ArcFace; to Encode Face and Face Keypoints")],
        )

    @classmethod
    def execute(cls, model_name, provider) -> io.NodeOutput:
        if model_name != "buffalo_l":
            logger.warning("ConsistentID was trained with buffalo_l ArcFace embeddings; %s gives other identities", model_name)
        model_dir = find_insightface_model_dir(folders.insightface_roots(), model_name)
        return io.NodeOutput(get_face_analysis(model_dir, resolve_providers(provider)))


class ConsistentIDFaceParserLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentIDFaceParserLoader",
            display_name="Load Face Parser (ConsistentID)",
            category=CATEGORY_LOADERS,
            description="The 19-class BiSeNet face parser from models/consistentid or models/facexlib.",
            inputs=[
                io.Combo.Input("parser_file", options=_choices(folders.parser_files()),
                               tooltip=f"one of {', '.join(PARSER_FILE_NAMES)} in models/consistentid or models/facexlib"),
                io.Combo.Input("device", options=["auto", "cpu"], default="auto",
                               tooltip="auto: ComfyUI's compute device; cpu keeps the parser off the GPU"),
            ],
            outputs=[FaceParser.Output(display_name="face_parser",
                                       tooltip="the BiSeNet face parser; to Encode Face, Face Parse and Encode "
                                               "Attributes")],
        )

    @classmethod
    def execute(cls, parser_file, device) -> io.NodeOutput:
        if parser_file == NONE_FOUND:
            raise _missing("face parser", (folders.CONSISTENTID, folders.FACEXLIB), f"one of {', '.join(PARSER_FILE_NAMES)}")
        return io.NodeOutput(get_face_parser(folders.resolve_parser_choice(parser_file), folders.parser_device(device)))
