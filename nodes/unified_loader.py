"""ConsistentIDUnifiedLoader: everything ConsistentID needs for a MODEL, found by file name in one node."""

from __future__ import annotations

import logging
import os

from comfy_api.latest import io

from ..consistentid_core.errors import ModelFileError
from ..consistentid_core.face.insightface_models import PROVIDER_CHOICES, get_face_analysis, resolve_providers
from ..consistentid_core.face.parser import get_face_parser
from ..consistentid_core.model.adapter import check_base_model
from ..consistentid_core.model.checkpoint import cached_checkpoint, describe
from ..consistentid_core.model.file_finder import (AUTO, CLIP_VISION_FILE, INSIGHTFACE_PACK, PART_CLIP_VISION,
                                                   PART_FACE_PARSER, PART_WEIGHTS, WEIGHT_FILES, find_model_files)
from .glue import folders
from .glue.model_patch import model_arch
from .glue.types import CATEGORY_LOADERS, ConsistentIDModel, FaceAnalysis, FaceParser
from .glue.vision import cached_clip_vision, check_clip_vision

logger = logging.getLogger("consistentid")


def _model_label(model) -> str:
    inner = getattr(model, "model", None)
    return type(inner).__name__ if inner is not None else type(model).__name__


def _insightface_dir(files: tuple[str, ...]) -> str:
    """The one folder holding both insightface files (the listing merges every registered folder)."""
    paths = [folders.full_path(folders.INSIGHTFACE, name) for name in files]
    homes = {os.path.dirname(path) for path in paths}
    if len(homes) != 1:
        raise ModelFileError(
            f"insightface {INSIGHTFACE_PACK}: {', '.join(paths)} lie in different folders; put all the "
            f"{INSIGHTFACE_PACK} .onnx files into one folder, models/insightface/models/{INSIGHTFACE_PACK}/")
    return homes.pop()


class ConsistentIDUnifiedLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConsistentIDUnifiedLoader",
            display_name="ConsistentID Unified Loader",
            category=CATEGORY_LOADERS,
            description="Everything ConsistentID needs for the model, in one node: the ConsistentID weights of the "
                        "model's architecture, the CLIP ViT-H image encoder, insightface buffalo_l and the face "
                        "parser, found by file name in every model folder (sub-folders and extra_model_paths.yaml "
                        "included). Never downloads; a missing file gives one message listing every file and its "
                        "folder.",
            inputs=[
                io.Model.Input("model", tooltip="the SD1.5 or SDXL model from Load Checkpoint; its architecture "
                                                "picks the ConsistentID file. Passed through unchanged"),
                io.Combo.Input("consistentid_file", options=[AUTO, *folders.weight_files(folders.CONSISTENTID)],
                               default=AUTO, optional=True,
                               tooltip=f"auto: {WEIGHT_FILES['sd15']} for an SD1.5 model, {WEIGHT_FILES['sdxl']} "
                                       "for SDXL (or a renamed copy) from models/consistentid; or pick a file"),
                io.Combo.Input("clip_vision_file", options=[AUTO, *folders.clip_vision_files()],
                               default=AUTO, optional=True,
                               tooltip=f"auto: {CLIP_VISION_FILE} (or a renamed copy such as clip_vision_h) "
                                       "from models/clip_vision; or pick a file. It must be CLIP ViT-H"),
                io.Combo.Input("parser_file", options=[AUTO, *folders.parser_files()], default=AUTO, optional=True,
                               tooltip="auto: face_parsing.pth, 79999_iter.pth or parsing_bisenet.pth from "
                                       "models/consistentid or models/facexlib; or pick a file"),
                io.Combo.Input("provider", options=list(PROVIDER_CHOICES), default="auto", optional=True,
                               tooltip="onnxruntime provider for insightface; auto takes the best available and "
                                       "logs it (CUDA needs onnxruntime-gpu)"),
                io.Combo.Input("parser_device", options=["auto", "cpu"], default="auto", optional=True,
                               tooltip="auto: ComfyUI's compute device; cpu keeps the face parser off the GPU"),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="the model given, unchanged; to Apply ConsistentID"),
                ConsistentIDModel.Output(display_name="consistentid",
                                         tooltip="the ConsistentID weights of the model's architecture; to Encode "
                                                 "Face, Apply ConsistentID and ConsistentID Conditioning"),
                io.ClipVision.Output(display_name="clip_vision",
                                     tooltip="the CLIP ViT-H image encoder; to Encode Face and Encode Attributes"),
                FaceAnalysis.Output(display_name="face_analysis",
                                    tooltip="insightface buffalo_l (detector + ArcFace); to Encode Face and Face "
                                            "Keypoints"),
                FaceParser.Output(display_name="face_parser",
                                  tooltip="the BiSeNet face parser; to Encode Face, Face Parse and Encode Attributes"),
            ],
        )

    @classmethod
    def execute(cls, model, consistentid_file=AUTO, clip_vision_file=AUTO, parser_file=AUTO, provider="auto",
                parser_device="auto") -> io.NodeOutput:
        arch = model_arch(model)
        files = find_model_files(
            arch, folders.model_file_listings(), folders.model_file_folders(),
            choices={PART_WEIGHTS: consistentid_file, PART_CLIP_VISION: clip_vision_file,
                     PART_FACE_PARSER: parser_file},
            model_label=_model_label(model))
        logger.info("unified loader, %s model: %s", arch, files.describe())
        # The same caches as the separate loaders: a file they loaded already is the very same object here.
        ckpt = cached_checkpoint(folders.full_path(files.consistentid.folder, files.consistentid.name))
        check_base_model(arch, ckpt)
        logger.info("ConsistentID weights: %s", describe(ckpt))
        clip_vision = cached_clip_vision(folders.full_path(files.clip_vision.folder, files.clip_vision.name))
        check_clip_vision(clip_vision)
        analysis = get_face_analysis(_insightface_dir(files.insightface.files), resolve_providers(provider or "auto"))
        parser = get_face_parser(folders.full_path(files.face_parser.folder, files.face_parser.name),
                                 folders.parser_device(parser_device or "auto"))
        return io.NodeOutput(model, ckpt, clip_vision, analysis, parser)
