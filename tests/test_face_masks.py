"""The face mask for inpainting (consistentid_core/face/masks.py): support, grow, feather, routes, refusals.

Faces come from a stand-in detector that answers with chosen boxes, parses from FixedParser, so every
pixel of the expected masks is known.
"""

import math

import numpy as np
import pytest

from consistentid_core.errors import FaceNotFoundError, FaceOptionError
from consistentid_core.face import masks
from consistentid_core.face.labels import LABEL_HAIR, LABEL_NECK, LABEL_SKIN
from face_standins import FixedParser, face_label_map


class BoxDetector:
    """insightface's FaceAnalysis interface, finding the boxes it was given (detector order as given)."""

    def __init__(self, *boxes, scores=None):
        self.boxes = [np.asarray(b, dtype=np.float32) for b in boxes]
        self.scores = scores or [0.9] * len(boxes)
        self.fed = []

    def prepare(self, ctx_id=0, det_size=(640, 640), **_):
        self.det_size = det_size

    def get(self, image):
        self.fed.append(image)
        return [{"bbox": b, "det_score": s} for b, s in zip(self.boxes, self.scores)]


def rectangle(height, width, top, bottom, left, right):
    out = np.zeros((height, width), dtype=bool)
    out[max(0, top):min(height, bottom), max(0, left):min(width, right)] = True
    return out


def photo(height=200, width=240, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# --- box route ----------------------------------------------------------------------------------

@pytest.mark.parametrize("grow", [0, 1, 10, 37])
def test_box_grown_by_n_px_is_the_box_rounded_outward_and_widened(grow):
    box = (40.3, 50.7, 100.2, 120.0)  # whole pixels: columns 40..100, rows 50..119
    found = masks.face_mask(BoxDetector(box), photo(), grow=grow, feather=0)
    expected = rectangle(200, 240, 50 - grow, 120 + grow, 40 - grow, 101 + grow)
    assert found.mask.dtype == np.float32 and found.mask.shape == (200, 240)
    assert np.array_equal(found.mask > 0, expected)
    assert np.all(found.mask[expected] == 1.0)  # feather 0: a hard mask


def test_box_is_clipped_to_the_photo():
    mask = masks.box_mask(100, 120, (-15.0, 70.0, 30.0, 130.0), grow=5, feather=0)
    assert np.array_equal(mask > 0, rectangle(100, 120, 65, 100, 0, 35))


@pytest.mark.parametrize("grow,feather", [(12, 8), (24, 16), (3, 3), (0, 5)])
def test_feather_stays_inside_the_grown_support(grow, feather):
    box = (60.0, 50.0, 140.0, 150.0)
    mask = masks.box_mask(200, 240, box, grow, feather)
    support = rectangle(200, 240, 50 - grow, 150 + grow, 60 - grow, 140 + grow)
    assert np.array_equal(mask > 0, support)  # feathering never widens the support...
    assert np.all(mask[~support] == 0.0)  # ...and outside it the mask is exactly zero
    inner = rectangle(200, 240, 50 - grow + feather, 150 + grow - feather, 60 - grow + feather, 140 + grow - feather)
    assert np.all(mask[inner] == 1.0)  # full strength from feather px in: the box grown by grow - feather
    ramp = support & ~inner
    assert np.all((mask[ramp] > 0) & (mask[ramp] < 1))
    # Along the middle row the edge rises 1/(f+1), 2/(f+1) ... f/(f+1), then 1.
    left = 60 - grow
    row = mask[100, left:left + feather + 1]
    np.testing.assert_allclose(row, np.arange(1, feather + 2) / (feather + 1), rtol=0, atol=1e-6)


def test_feather_wider_than_the_support_still_reaches_no_further():
    mask = masks.box_mask(100, 100, (40.0, 40.0, 50.0, 50.0), grow=2, feather=100)
    support = rectangle(100, 100, 38, 52, 38, 52)
    assert np.array_equal(mask > 0, support) and mask.max() < 1.0


def test_the_photo_border_is_not_a_feathered_edge():
    mask = masks.box_mask(100, 100, (0.0, 20.0, 50.0, 80.0), grow=0, feather=6)
    assert np.all(mask[30:70, 0] == 1.0)  # the face runs off the photo: full strength at the border
    assert mask[50, 49] == pytest.approx(1 / 7)  # the inner edge fades


def test_face_select_picks_the_face_the_mask_covers():
    small, large = (10.0, 10.0, 40.0, 40.0), (100.0, 80.0, 190.0, 180.0)
    found = masks.face_mask(BoxDetector(small, large, scores=[0.95, 0.8]), photo(), grow=0, feather=0,
                            face_select="largest")
    assert found.face_index == 1 and found.faces_found == 2
    assert np.array_equal(found.mask > 0, rectangle(200, 240, 80, 180, 100, 190))
    first = masks.face_mask(BoxDetector(small, large), photo(), grow=0, feather=0, face_select="first")
    assert np.array_equal(first.mask > 0, rectangle(200, 240, 10, 40, 10, 40))


def test_detection_uses_insightface_defaults_bgr():
    image = photo()
    detector = BoxDetector((10.0, 10.0, 60.0, 60.0))
    masks.face_mask(detector, image)
    assert detector.det_size == (640, 640)
    assert np.array_equal(detector.fed[0], image[:, :, ::-1])  # BGR, as insightface expects


# --- parser route -------------------------------------------------------------------------------

def test_grow_of_a_region_is_the_euclidean_disc():
    region = np.zeros((41, 41), dtype=bool)
    region[20, 20] = True
    grown = masks.grow_region(region, 5)
    ys, xs = np.nonzero(grown)
    assert np.all((ys - 20) ** 2 + (xs - 20) ** 2 <= 25)
    assert grown.sum() == sum(1 for y in range(-5, 6) for x in range(-5, 6) if x * x + y * y <= 25)  # 81


def test_parser_route_keeps_the_face_of_the_box_and_leaves_hair_and_other_faces_out():
    labels = np.zeros((200, 240), dtype=np.uint8)
    labels[40:60, 60:140] = LABEL_HAIR
    labels[60:150, 70:130] = LABEL_SKIN
    labels[150:170, 85:115] = LABEL_NECK
    labels[100:120, 100:104] = LABEL_HAIR  # a strand across the face: a hole, filled
    labels[20:50, 190:230] = LABEL_SKIN  # someone else's face, not connected to the box
    box = (72.0, 62.0, 128.0, 148.0)
    mask = masks.parser_mask(labels, box, grow=0, feather=0)
    face = rectangle(200, 240, 60, 150, 70, 130)
    assert np.array_equal(mask > 0, face)
    grown = masks.parser_mask(labels, box, grow=6, feather=3)
    assert np.array_equal(grown > 0, masks.grow_region(face, 6))
    assert np.all(grown[face & ~masks.grow_region(~face, 3)] == 1.0)  # more than feather px inside the face...
    assert np.all(grown[~masks.grow_region(face, 6)] == 0.0)  # ...and nothing beyond grow


def test_parser_route_end_to_end_parses_a_crop_around_the_box():
    height, width, box = 300, 320, (120.0, 100.0, 200.0, 196.0)
    left, top, right, bottom = masks.parse_crop(height, width, box)
    assert (left, top, right, bottom) == (64, 52, 256, 244)  # a square: the longer side plus half of it around
    # The parser is handed the crop: its answer is a face in crop coordinates.
    crop_labels = face_label_map(512, (64, 64, 448, 448))
    parser = FixedParser(crop_labels)
    found = masks.face_mask(BoxDetector(box), photo(height, width), source="parser", parser=parser, grow=4,
                            feather=2, parse_size=512)
    assert parser.calls == 1
    support = found.mask > 0
    assert not support[:top - 4].any() and not support[bottom + 4:].any()
    assert not support[:, :left - 4].any() and not support[:, right + 4:].any()
    # The skin of the stand-in parse, mapped back to the photo, is fully inside.
    scale_x, scale_y = (right - left) / 512, (bottom - top) / 512
    skin = (slice(int(top + 64 * scale_y) + 2, int(top + 448 * scale_y) - 2),
            slice(int(left + (64 + 0.1 * 384) * scale_x) + 2, int(left + (64 + 0.9 * 384) * scale_x) - 2))
    assert np.all(found.mask[skin] == 1.0)


def test_parser_route_without_face_pixels_in_the_box_names_the_image():
    labels = np.zeros((100, 100), dtype=np.uint8)
    labels[0:20, 0:20] = LABEL_SKIN
    with pytest.raises(FaceNotFoundError, match="target image 2"):
        masks.parser_mask(labels, (50.0, 50.0, 80.0, 80.0), 0, 0, source="target image 2")


def test_parser_route_needs_the_parser():
    with pytest.raises(FaceOptionError, match="face_parser"):
        masks.face_mask(BoxDetector((10.0, 10.0, 50.0, 50.0)), photo(), source="parser", parser=None)


# --- refusals -----------------------------------------------------------------------------------

def test_no_face_is_an_error_naming_the_image():
    with pytest.raises(FaceNotFoundError, match="target image 3 of the batch"):
        masks.face_mask(BoxDetector(), photo(), image_name="target image 3 of the batch")


@pytest.mark.parametrize("grow,feather", [(-1, 0), (0, -2), (1.5, 0), (0, math.nan), (True, 0), ("8", 0),
                                          (masks.MAX_GROW + 1, 0), (0, masks.MAX_FEATHER + 1), (None, 0)])
def test_bad_grow_or_feather_is_refused(grow, feather):
    with pytest.raises(FaceOptionError, match="grow|feather"):
        masks.box_mask(100, 100, (10.0, 10.0, 50.0, 50.0), grow, feather)
    with pytest.raises(FaceOptionError):
        masks.face_mask(BoxDetector((10.0, 10.0, 50.0, 50.0)), photo(), grow=grow, feather=feather)


def test_whole_float_values_are_accepted():
    assert masks.check_grow_feather(8.0, np.int64(4)) == (8, 4)


def test_unknown_source_is_refused():
    with pytest.raises(FaceOptionError, match="source"):
        masks.face_mask(BoxDetector((10.0, 10.0, 50.0, 50.0)), photo(), source="oval")


def test_preview_tints_the_mask_and_keeps_the_rest():
    image = photo(100, 100)
    mask = masks.box_mask(100, 100, (30.0, 30.0, 70.0, 70.0), 0, 0)
    preview = masks.mask_preview(image, mask)
    assert np.array_equal(preview[mask == 0], image[mask == 0])
    assert not np.array_equal(preview[mask == 1], image[mask == 1])
