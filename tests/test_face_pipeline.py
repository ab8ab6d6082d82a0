"""Photo -> FaceEmbeds with the real insightface library (stand-in models), a fixed parser and a patch encoder."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from consistentid_core.face.clip_features import check_vision_features, clip_pixel_values, zero_pixel_values
from consistentid_core.errors import FaceNotFoundError, ModelFileError
from consistentid_core.face.analysis import get_face_analysis
from consistentid_core.face.pipeline import encode_references
from consistentid_core.face.parser import parse_image
from consistentid_core.face.parsing import label_masks, region_images, select_regions
from consistentid_core.face.preview import reference_preview
from face_standins import FixedParser, PatchEncoder, face_label_map
from tools.insightface_standins import make_buffalo_l, red_square_image
from numeric import DEEP_NET_FP32, assert_close, assert_differs

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    folder = make_buffalo_l(str(tmp_path_factory.mktemp("insightface") / "models" / "buffalo_l"))
    return get_face_analysis(folder, "CPU")


FACE_BOX = (128, 128, 256, 256)  # a 128 px red square centred on (192, 192)


@pytest.fixture()
def photo():
    return red_square_image(640, ((192, 192, 128, 255),))


def _parser(box=FACE_BOX, size=640):
    return FixedParser(face_label_map(size, box))


def test_one_photo_gives_the_official_regions_and_features(analysis, photo):
    encoder, parser = PatchEncoder(), _parser()
    embeds, refs = encode_references([photo], analysis, parser, encoder, "sd15", color_order="bgr", checkpoint="cid.bin")
    # one pass of the vision model: photo + 5 regions + the zero image
    assert (encoder.calls, encoder.images) == (1, 7)
    assert embeds.arch == "sd15" and embeds.num_references == 1 and embeds.checkpoint == "cid.bin"
    assert embeds.region_names == [["Face", "Left_Eye", "Left_Ear", "Nose", "Upper_Lip"]]
    assert embeds.region_valid.tolist() == [[True] * 5]
    assert bool(embeds.face_found[0])
    face = refs[0].face
    assert abs(float(np.linalg.norm(face.normed_embedding)) - 1) < 1e-5
    assert torch.equal(embeds.id_embeds[0], torch.from_numpy(face.normed_embedding))
    x1, y1, x2, y2 = face.bbox
    assert abs(x1 - 128) < 8 and abs(y2 - 256) < 8

    # The region features are exactly what the core functions give for the same photo.
    labels = parse_image(parser, Image.fromarray(photo), 512)
    crops = region_images(Image.fromarray(photo), select_regions(label_masks(labels)))
    with torch.no_grad():
        expected = encoder(torch.stack([clip_pixel_values(c) for c in crops]))
        assert_close(embeds.region_embeds[0], expected, DEEP_NET_FP32)
        assert_close(embeds.clip_embeds[0], encoder(clip_pixel_values(Image.fromarray(photo))[None])[0], DEEP_NET_FP32)
        assert_close(embeds.uncond_clip_embeds, encoder(zero_pixel_values(1)), DEEP_NET_FP32)


def test_colour_order_decides_what_insightface_sees(analysis, photo):
    embeds, refs = encode_references([photo], analysis, _parser(), PatchEncoder(), "sdxl", color_order="official")
    assert refs[0].face is not None  # SDXL's official order is BGR, the right one
    with pytest.raises(FaceNotFoundError, match="image 0 of 1"):
        encode_references([photo], analysis, _parser(), PatchEncoder(), "sd15", color_order="official")


def test_no_face_policies(analysis, photo, caplog):
    blank = np.zeros((640, 640, 3), dtype=np.uint8)
    args = (analysis, _parser(), PatchEncoder(), "sd15")
    with pytest.raises(FaceNotFoundError, match=r"no face found in image 1 of 2 \(second\)"):
        encode_references([photo, blank], *args, color_order="bgr", sources=["first", "second"])

    embeds, refs = encode_references([blank, photo], *args, color_order="bgr", on_no_face="skip")
    assert embeds.num_references == 1 and embeds.sources == ["image 1"]

    with caplog.at_level(logging.WARNING, logger="consistentid"):
        embeds, _ = encode_references([blank], *args, color_order="bgr", on_no_face="zeros")
    assert torch.equal(embeds.id_embeds, torch.zeros(1, 512))
    assert embeds.face_found.tolist() == [False]
    assert "zero identity embedding" in caplog.text

    with pytest.raises(FaceNotFoundError, match="any of the 2 reference images"):
        encode_references([blank, blank], *args, color_order="bgr", on_no_face="skip")


def test_several_faces_regions_come_from_the_chosen_face(analysis):
    two = red_square_image(640, ((192, 192, 128, 255), (480, 480, 64, 255)))
    labels = np.maximum(face_label_map(640, FACE_BOX), face_label_map(640, (448, 448, 512, 512)))
    parser = FixedParser(labels)
    embeds, refs = encode_references([two], analysis, parser, PatchEncoder(), "sd15", face_select="largest", color_order="bgr")
    ref = refs[0]
    assert len(ref.faces) == 2
    chosen = ref.face.bbox
    assert chosen[2] - chosen[0] > 100  # the 128 px face
    face_mask = ref.regions["Face"]
    ys, xs = np.nonzero(face_mask)
    assert xs.max() < 512 * 400 / 640 and ys.max() < 512 * 400 / 640  # nothing of the small face at (480, 480)

    small = min(range(2), key=lambda i: ref.faces[i].area)
    embeds_small, refs_small = encode_references(
        [two], analysis, parser, PatchEncoder(), "sd15", face_select=f"index:{small}", color_order="bgr")
    assert refs_small[0].face_index == small
    assert_differs(embeds_small.region_embeds, embeds.region_embeds, 1e-3)
    assert_differs(embeds_small.id_embeds, embeds.id_embeds, 1e-3)
    ys, xs = np.nonzero(refs_small[0].regions["Face"])
    assert xs.min() > 512 * 300 / 640  # only the small face
    with pytest.raises(FaceNotFoundError, match="index:5"):
        encode_references([two], analysis, parser, PatchEncoder(), "sd15", face_select="index:5", color_order="bgr")


def test_a_vision_model_that_is_not_vit_h_is_named():
    with pytest.raises(ModelFileError, match="ViT-L .*ConsistentID needs CLIP ViT-H/14"):
        check_vision_features(torch.zeros(2, 257, 1024), 2)
    with pytest.raises(ModelFileError, match="ViT-bigG"):
        check_vision_features(torch.zeros(1, 257, 1664), 1)


def test_preview_shows_the_photo_the_parse_and_the_regions(analysis, photo):
    _, refs = encode_references([photo], analysis, _parser(), PatchEncoder(), "sd15", color_order="bgr")
    preview = reference_preview(refs[0], height=128)
    assert preview.shape == (128, 128 * 7, 3) and preview.dtype == np.uint8
    # the chosen face's box is drawn in green on the first tile
    first = preview[:, :128]
    green = first[..., 1].astype(int)
    assert ((green > 100) & (green > first[..., 0].astype(int) + 60)).any()
