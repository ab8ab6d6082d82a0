"""The BiSeNet face parser built with facexlib, loaded from local files only."""


import numpy as np
import pytest
import torch
from PIL import Image

from consistentid_core.face.clip_features import clip_pixel_values
from consistentid_core.errors import ModelFileError
from consistentid_core.face.parser import build_bisenet, get_face_parser, load_face_parser
from consistentid_core.face.parser import parse_image

pytest.importorskip("facexlib")


@pytest.fixture(scope="module")
def bisenet_state():
    torch.manual_seed(0)
    net = build_bisenet()
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("name", ["face_parsing.pth", "79999_iter.pth", "parsing_bisenet.pth"])
def test_the_three_official_files_load(tmp_path, bisenet_state, name):
    path = tmp_path / name
    torch.save(bisenet_state, path)
    net = load_face_parser(str(path))
    assert not net.training
    state = net.state_dict()
    assert len(state) == 191
    assert sum(p.numel() for p in net.parameters()) == 13_300_416
    assert all(torch.equal(state[k], v) for k, v in bisenet_state.items())
    labels = parse_image(net, Image.fromarray(np.zeros((100, 80, 3), np.uint8)), 64)
    assert labels.shape == (64, 64) and labels.dtype == np.uint8 and labels.max() < 19


def test_data_parallel_prefix_is_accepted(tmp_path, bisenet_state):
    path = tmp_path / "79999_iter.pth"
    torch.save({f"module.{k}": v for k, v in bisenet_state.items()}, path)
    assert len(load_face_parser(str(path)).state_dict()) == 191


def test_bad_parser_files(tmp_path, bisenet_state):
    with pytest.raises(ModelFileError, match="nowhere.pth: face parser file not found"):
        load_face_parser(str(tmp_path / "nowhere.pth"))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty.pth: the face parser file is empty"):
        load_face_parser(str(empty))
    parsenet = tmp_path / "parsing_parsenet.pth"
    torch.save({"encoder.0.weight": torch.zeros(1), "decoder.0.weight": torch.zeros(1)}, parsenet)
    with pytest.raises(ModelFileError, match="ParseNet"):
        load_face_parser(str(parsenet))
    other = tmp_path / "ConsistentID-v1.bin"
    torch.save({"FacialEncoder": {"a": torch.zeros(1)}}, other)
    with pytest.raises(ModelFileError, match="ConsistentID-v1.bin: not a 19-class BiSeNet"):
        load_face_parser(str(other))
    wrong = dict(bisenet_state)
    wrong["conv_out.conv_out.weight"] = torch.zeros(11, 256, 1, 1)
    path = tmp_path / "eleven.pth"
    torch.save(wrong, path)
    with pytest.raises(ModelFileError, match=r"conv_out.conv_out.weight has shape \[11, 256, 1, 1\]"):
        load_face_parser(str(path))


def test_parser_is_cached_per_file_and_device(tmp_path, bisenet_state):
    path = tmp_path / "face_parsing.pth"
    torch.save(bisenet_state, path)
    assert get_face_parser(str(path)) is get_face_parser(str(path))


def test_clip_preprocessing_equals_hugging_face():
    transformers = pytest.importorskip("transformers")
    rng = np.random.RandomState(0)
    for shape in ((300, 517, 3), (911, 400, 3), (224, 224, 3)):
        image = Image.fromarray(rng.randint(0, 256, shape).astype(np.uint8))
        ours = clip_pixel_values(image)
        theirs = transformers.CLIPImageProcessor()(image, return_tensors="pt")["pixel_values"][0]
        assert torch.allclose(ours, theirs, atol=1e-6)
