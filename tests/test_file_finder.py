"""consistentid_core.model.file_finder: the unified loader's choice of files, on listings alone (no disk).

Listings are what ComfyUI's folder_paths.get_filename_list returns: per folder kind, every file under
every registered folder, relative to it, sub-folders included.
"""

from __future__ import annotations

import os
import re

import pytest

from consistentid_core.errors import ArchitectureMismatchError, ModelFileError
from consistentid_core.model import file_finder as ff

FOLDERS = {
    "consistentid": ["/comfy/models/consistentid", "/extra/consistentid"],
    "clip_vision": ["/comfy/models/clip_vision", "/extra/clip_vision"],
    "insightface": ["/comfy/models/insightface"],
    "facexlib": ["/comfy/models/facexlib"],
}
BUFFALO = ["models/buffalo_l/det_10g.onnx", "models/buffalo_l/w600k_r50.onnx", "models/buffalo_l/1k3d68.onnx",
           "models/buffalo_l/2d106det.onnx", "models/buffalo_l/genderage.onnx"]


def listings(**changes) -> dict[str, list[str]]:
    base = {
        "consistentid": ["ConsistentID-v1.bin", "ConsistentID_SDXL-v1.bin", "face_parsing.pth"],
        "clip_vision": ["CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"],
        "insightface": list(BUFFALO),
        "facexlib": [],
    }
    base.update(changes)
    return base


def found(arch="sd15", folders=FOLDERS, choices=None, **changes) -> ff.ModelFiles:
    return ff.find_model_files(arch, listings(**changes), folders, choices)


def missing_message(arch="sd15", folders=FOLDERS, **changes) -> str:
    with pytest.raises(ModelFileError) as caught:
        found(arch, folders, **changes)
    return str(caught.value)


# --- known names and the architecture -------------------------------------------------------------

def test_official_names_are_found_for_sd15():
    files = found("sd15")
    assert (files.consistentid.folder, files.consistentid.name) == ("consistentid", "ConsistentID-v1.bin")
    assert (files.clip_vision.folder, files.clip_vision.name) == ("clip_vision",
                                                                  "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors")
    assert (files.insightface.folder, files.insightface.name) == ("insightface", "models/buffalo_l")
    assert files.insightface.files == ("models/buffalo_l/det_10g.onnx", "models/buffalo_l/w600k_r50.onnx")
    assert (files.face_parser.folder, files.face_parser.name) == ("consistentid", "face_parsing.pth")
    assert {f.how for f in (files.consistentid, files.clip_vision, files.insightface, files.face_parser)} == {
        "official name"}


def test_sdxl_model_gets_the_sdxl_weights_and_sd15_the_sd15_weights():
    assert found("sdxl").consistentid.name == "ConsistentID_SDXL-v1.bin"
    assert found("sd15").consistentid.name == "ConsistentID-v1.bin"
    # Listed in the other order, the choice is the same.
    swapped = ["ConsistentID_SDXL-v1.bin", "face_parsing.pth", "ConsistentID-v1.bin"]
    assert found("sd15", consistentid=swapped).consistentid.name == "ConsistentID-v1.bin"
    assert found("sdxl", consistentid=swapped).consistentid.name == "ConsistentID_SDXL-v1.bin"


@pytest.mark.parametrize("arch", [None, "sd3", "flux"])
def test_a_model_of_unknown_architecture_is_refused_with_a_clear_message(arch):
    with pytest.raises(ArchitectureMismatchError) as caught:
        ff.find_model_files(arch, listings(), FOLDERS, model_label="Flux")
    message = str(caught.value)
    assert "(Flux) is neither SD1.5 nor SDXL" in message
    assert "ConsistentID-v1.bin for SD1.5" in message and "ConsistentID_SDXL-v1.bin for SDXL" in message
    assert "Connect an SD1.5 or SDXL checkpoint" in message


# --- renamings ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, name", [
    ("sd15", "consistentid_v1.safetensors"),
    ("sd15", "ConsistentID-v1.safetensors"),
    ("sd15", "consistentID.bin"),
    ("sdxl", "ConsistentID-SDXL-v1.safetensors"),
    ("sdxl", "consistentid_sdxl.bin"),
    ("sdxl", "ConsistentIDXL.bin"),
])
def test_renamed_weights_are_found_for_their_architecture_only(arch, name):
    files = found(arch, consistentid=[name, "face_parsing.pth"])
    assert (files.consistentid.name, files.consistentid.how) == (name, "renamed")
    other = "sdxl" if arch == "sd15" else "sd15"
    message = missing_message(other, consistentid=[name, "face_parsing.pth"])
    assert ff.WEIGHT_FILES[other] in message
    assert f"found {name}, which is the ConsistentID file for" in message


def test_official_name_beats_a_renaming_and_a_renaming_beats_a_likely_name():
    names = ["ConsistentID-v1-attributes.safetensors", "consistentid_v1.safetensors", "face_parsing.pth"]
    files = found("sd15", consistentid=names)
    assert (files.consistentid.name, files.consistentid.how) == ("consistentid_v1.safetensors", "renamed")
    files = found("sd15", consistentid=names + ["ConsistentID-v1.bin"])
    assert files.consistentid.name == "ConsistentID-v1.bin"
    files = found("sd15", consistentid=names[:1] + ["face_parsing.pth"])
    assert (files.consistentid.name, files.consistentid.how) == (names[0], "found by a likely name")


@pytest.mark.parametrize("name, how", [
    ("clip_vision_h.safetensors", "renamed"),
    ("CLIP-ViT-H-14.safetensors", "renamed"),
    ("clip-vit-h-14-laion2b-s32b-b79k.bin", "renamed"),
    ("ip-adapter_image_encoder_sd15.safetensors", "renamed"),
    ("IPAdapter/models/image_encoder/model.safetensors", "found by a likely name"),
    ("laion_CLIP-ViT-H-14_fp16.safetensors", "found by a likely name"),
])
def test_renamed_clip_vision_is_found(name, how):
    files = found(clip_vision=["clip-vit-large-patch14.safetensors", name])
    assert (files.clip_vision.name, files.clip_vision.how) == (name, how)


@pytest.mark.parametrize("name", ["sdxl_models/image_encoder/model.safetensors", "CLIP-ViT-bigG-14.safetensors",
                                  "clip-vit-large-patch14.safetensors", "clip_vision_g.safetensors"])
def test_other_image_encoders_are_not_taken_for_vit_h(name):
    assert ff.CLIP_VISION_FILE in missing_message(clip_vision=[name])


@pytest.mark.parametrize("consistentid, facexlib, expected", [
    (["ConsistentID-v1.bin", "79999_iter.pth"], [], ("consistentid", "79999_iter.pth")),
    (["ConsistentID-v1.bin"], ["parsing_bisenet.pth", "parsing_parsenet.pth"], ("facexlib", "parsing_bisenet.pth")),
    (["ConsistentID-v1.bin", "face-parsing.safetensors"], [], ("consistentid", "face-parsing.safetensors")),
    (["ConsistentID-v1.bin", "bisenet/resnet18_face_parser.pth"], [],
     ("consistentid", "bisenet/resnet18_face_parser.pth")),
])
def test_face_parser_by_its_names_and_renamings(consistentid, facexlib, expected):
    files = found(consistentid=consistentid, facexlib=facexlib)
    assert (files.face_parser.folder, files.face_parser.name) == expected


def test_parsenet_is_not_a_face_parser_for_consistentid():
    """facexlib's ParseNet is another network, even when its name says face parsing."""
    message = missing_message(consistentid=["ConsistentID-v1.bin"],
                              facexlib=["parsing_parsenet.pth", "face_parsing_parsenet.pth"])
    assert "face_parsing.pth" in message


def test_the_official_parser_name_order_decides_between_official_names():
    files = found(consistentid=["ConsistentID-v1.bin", "79999_iter.pth"], facexlib=["parsing_bisenet.pth"])
    assert files.face_parser.name == "79999_iter.pth"
    files = found(consistentid=["ConsistentID-v1.bin", "79999_iter.pth", "face_parsing.pth"])
    assert files.face_parser.name == "face_parsing.pth"


# --- sub-folders and several folders ------------------------------------------------------------

def test_files_in_sub_folders_are_found_and_the_shallowest_wins():
    files = found("sdxl", consistentid=["JackAILab/ConsistentID/ConsistentID_SDXL-v1.bin", "parsers/face_parsing.pth"],
                  clip_vision=["ipadapter/sd15/CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"])
    assert files.consistentid.name == "JackAILab/ConsistentID/ConsistentID_SDXL-v1.bin"
    assert files.face_parser.name == "parsers/face_parsing.pth"
    assert files.clip_vision.name == "ipadapter/sd15/CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
    # "2023/..." sorts before "ConsistentID...": the depth, not the alphabet, decides.
    files = found(consistentid=["2023/ConsistentID-v1.bin", "ConsistentID-v1.bin", "face_parsing.pth"])
    assert files.consistentid.name == "ConsistentID-v1.bin"


def test_windows_separators_in_a_listing_are_read_as_sub_folders():
    files = found(consistentid=["sub\\ConsistentID-v1.bin", "face_parsing.pth"])
    assert files.consistentid.name == "sub/ConsistentID-v1.bin"


@pytest.mark.parametrize("layout, expected, how", [
    (["buffalo_l/det_10g.onnx", "buffalo_l/w600k_r50.onnx"], "buffalo_l", "renamed"),  # no "models" level
    (["models/buffalo_l/buffalo_l/det_10g.onnx", "models/buffalo_l/buffalo_l/w600k_r50.onnx"],
     "models/buffalo_l/buffalo_l", "renamed"),  # unzipped one folder too deep
    (["models/det_10g.onnx", "models/w600k_r50.onnx"], "models", "found by a likely name"),
])
def test_insightface_folder_at_another_depth_is_found(layout, expected, how):
    files = found(insightface=layout)
    assert (files.insightface.name, files.insightface.how) == (expected, how)
    assert files.insightface.files == tuple(f"{expected}/{name}" for name in ("det_10g.onnx", "w600k_r50.onnx"))


def test_the_expected_insightface_folder_wins_over_others():
    files = found(insightface=["buffalo_l/det_10g.onnx", "buffalo_l/w600k_r50.onnx"] + BUFFALO)
    assert files.insightface.name == "models/buffalo_l"


def test_antelopev2_is_not_buffalo_l():
    antelope = ["models/antelopev2/scrfd_10g_bnkps.onnx", "models/antelopev2/glintr100.onnx"]
    assert "det_10g.onnx, w600k_r50.onnx" in missing_message(insightface=antelope)


def test_files_from_several_registered_folders_are_combined():
    """ComfyUI merges the listings of all folders of a kind (models/ and extra_model_paths.yaml ones):
    the weights from one folder and the parser from facexlib's are both found."""
    files = found(consistentid=["ConsistentID-v1.bin"], facexlib=["parsing_bisenet.pth"])
    assert (files.consistentid.folder, files.face_parser.folder) == ("consistentid", "facexlib")


def test_the_consistentid_folder_wins_over_facexlib_for_the_same_name():
    files = found(consistentid=["ConsistentID-v1.bin", "parsing_bisenet.pth"], facexlib=["parsing_bisenet.pth"])
    assert files.face_parser.folder == "consistentid"


# --- choices ------------------------------------------------------------------------------------

def test_a_chosen_file_wins_over_the_official_name():
    files = found(choices={"consistentid": "mine/ConsistentID-v1-attributes.safetensors", "clip_vision": "auto",
                           "face_parser": "facexlib/parsing_bisenet.pth"},
                  consistentid=["ConsistentID-v1.bin", "mine/ConsistentID-v1-attributes.safetensors",
                                "face_parsing.pth"], facexlib=["parsing_bisenet.pth"])
    assert (files.consistentid.name, files.consistentid.how) == ("mine/ConsistentID-v1-attributes.safetensors",
                                                                 "chosen in the node")
    assert files.clip_vision.how == "official name"
    assert (files.face_parser.folder, files.face_parser.name) == ("facexlib", "parsing_bisenet.pth")


def test_a_chosen_file_that_is_gone_is_reported_as_missing():
    with pytest.raises(ModelFileError) as caught:
        found(choices={"clip_vision": "gone.safetensors", "face_parser": "facexlib/parsing_bisenet.pth"})
    message = str(caught.value)
    assert re.search(r"gone\.safetensors +-> /comfy/models/clip_vision +\(.*chosen in the node", message), message
    assert re.search(r"parsing_bisenet\.pth +-> /comfy/models/facexlib", message), message


def test_a_choice_for_a_part_without_choices_is_refused():
    with pytest.raises(ValueError, match="insightface"):
        found(choices={"insightface": "models/antelopev2"})


# --- the one missing-files message --------------------------------------------------------------

def test_one_message_lists_every_missing_file_with_its_folder():
    message = missing_message("sdxl", consistentid=[], clip_vision=[], insightface=[], facexlib=[])
    lines = message.splitlines()
    assert "model files for this SDXL model are missing" in lines[0]
    rows = [line for line in lines if " -> " in line]
    assert [row.split(" -> ")[0].strip() for row in rows] == [
        "ConsistentID_SDXL-v1.bin", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", "det_10g.onnx, w600k_r50.onnx",
        "face_parsing.pth"]
    assert [row.split(" -> ")[1].split("   ")[0] for row in rows] == [
        "/comfy/models/consistentid", "/comfy/models/clip_vision",
        os.path.join("/comfy/models/insightface", "models", "buffalo_l"), "/comfy/models/consistentid"]
    assert "parsing_bisenet.pth in /comfy/models/facexlib" in message
    # Every folder searched is named, the extra ones too.
    assert "consistentid: /comfy/models/consistentid, /extra/consistentid" in message
    assert "clip_vision: /comfy/models/clip_vision, /extra/clip_vision" in message


def test_the_message_lists_only_what_is_missing():
    message = missing_message(clip_vision=["clip-vit-large-patch14.safetensors"])
    rows = [line for line in message.splitlines() if " -> " in line]
    assert len(rows) == 1 and rows[0].strip().startswith("CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors")
    assert "for this SD1.5 model" in message


def test_the_message_names_an_unextracted_zip_and_an_incomplete_insightface_folder():
    message = missing_message(insightface=["models/buffalo_l.zip", "models/buffalo_l/det_10g.onnx"])
    assert "models/buffalo_l.zip was never extracted" in message
    assert "models/buffalo_l/ has det_10g.onnx but not w600k_r50.onnx" in message


def test_a_kind_without_folders_still_says_where_the_file_goes():
    message = missing_message(folders={**FOLDERS, "clip_vision": []}, clip_vision=[])
    assert "-> <ComfyUI>/models/clip_vision" in message
    assert "clip_vision: (no folder registered)" in message
