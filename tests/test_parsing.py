"""Region parsing: label masks, official key selection, region images, parser preprocessing."""

import numpy as np
import pytest
import torch
from PIL import Image

from consistentid_core.face import labels
from consistentid_core.errors import InputImageError, ModelFileError
from consistentid_core.constants import CLIP_MEAN, CLIP_STD
from consistentid_core.face.labels import colorize_labels, overlay, region_group
from consistentid_core.face.parser import parse_image
from consistentid_core.face.parsing import clip_mean_image, label_masks, pad_regions, region_images, region_masks, select_regions

FACE_BOX = (10, 55, 14, 51)  # rows 10..54, cols 14..50 -> 45 x 37 pixels


def full_label_map() -> np.ndarray:
    """64x64 map holding all 19 labels; the skin box encloses eyes, brows, nose, mouth and a hole."""
    m = np.zeros((64, 64), dtype=np.uint8)
    r0, r1, c0, c1 = FACE_BOX
    m[r0:r1, c0:c1] = 1
    m[18:20, 20:26] = 2   # left brow
    m[18:20, 38:44] = 3   # right brow
    m[22:26, 20:26] = 4   # left eye
    m[22:26, 38:44] = 5   # right eye
    m[21:27, 27:29] = 6   # eyeglasses bridge
    m[24:36, 8:14] = 7    # left ear, outside the skin box
    m[24:36, 51:57] = 8   # right ear
    m[36:38, 8:10] = 9    # earring
    m[28:36, 30:34] = 10  # nose
    m[41:42, 28:36] = 11  # mouth interior
    m[39:41, 27:37] = 12  # upper lip
    m[42:44, 27:37] = 13  # lower lip
    m[48:50, 30:32] = 0   # a background hole inside the skin
    m[55:60, 24:40] = 14  # neck
    m[58:59, 26:38] = 15  # necklace
    m[60:64, 10:54] = 16  # cloth
    m[4:10, 14:51] = 17   # hair
    m[0:4, 14:51] = 18    # hat
    return m


def test_label_mask_order_on_full_map():
    masks = label_masks(full_label_map())
    assert list(masks) == [
        "WithoutBackground", "Background", "Face", "Left_Eyebrow", "Right_Eyebrow", "Left_Eye",
        "Right_Eye", "Eyeglasses", "Left_Ear", "Right_Ear", "Earring", "Nose", "Mouth", "Upper_Lip",
        "Lower_Lip", "Neck", "Necklace", "Cloth", "Hair", "Hat",
    ]
    used = ["WithoutBackground", "Background", "Face", "Left_Eye", "Right_Eye", "Left_Ear",
            "Right_Ear", "Nose", "Upper_Lip", "Lower_Lip"]
    # Spec 8.3 item 14 lists the names ConsistentID uses; they keep that relative order.
    assert [k for k in masks if k in used] == used


def test_masks_are_binary_and_holes_filled():
    lm = full_label_map()
    masks = label_masks(lm)
    for name, mask in masks.items():
        assert mask.dtype == np.uint8 and mask.shape == (64, 64), name
        assert set(np.unique(mask).tolist()) <= {0, 255}, name
    r0, r1, c0, c1 = FACE_BOX
    skin_pixels = int((lm == 1).sum())
    face_pixels = int((masks["Face"] == 255).sum())
    assert face_pixels == (r1 - r0) * (c1 - c0) == 1665
    assert skin_pixels < face_pixels
    # brows 2x12, eyes 2x24, glasses 12, nose 32, mouth 8, lips 2x20, hole 4
    assert skin_pixels == 1665 - 24 - 48 - 12 - 32 - 8 - 40 - 4 == 1497
    # The ears lie outside the skin outline and stay out of the Face mask.
    assert masks["Face"][30, 10] == 0
    assert int((masks["Left_Eye"] == 255).sum()) == 24
    np.testing.assert_array_equal(masks["WithoutBackground"], 255 - masks["Background"])


def test_filled_hole_inside_a_single_label():
    lm = np.zeros((20, 20), dtype=np.uint8)
    lm[2:18, 2:18] = 10
    lm[8:12, 8:12] = 0
    m = label_masks(lm)["Nose"]
    assert int((m == 255).sum()) == 256
    assert int((lm == 10).sum()) == 240


def test_select_regions_official_order():
    kept = select_regions(label_masks(full_label_map()))
    assert list(kept) == ["Face", "Left_Eye", "Left_Ear", "Nose", "Upper_Lip"]
    rm = region_masks(full_label_map())
    assert rm.names == ["Face", "Left_Eye", "Left_Ear", "Nose", "Upper_Lip"]
    assert rm.masks.shape == (5, 64, 64) and rm.masks.dtype == np.uint8
    assert len(rm) == 5
    np.testing.assert_array_equal(rm.masks[1], kept["Left_Eye"])


def test_select_keeps_right_side_when_left_missing():
    lm = full_label_map()
    lm[lm == 4] = 1
    lm[lm == 7] = 0
    lm[lm == 12] = 1
    kept = select_regions(label_masks(lm))
    assert list(kept) == ["Face", "Right_Eye", "Right_Ear", "Nose", "Lower_Lip"]


def test_missing_parts_are_absent():
    lm = np.zeros((32, 32), dtype=np.uint8)
    lm[4:28, 4:28] = 1
    lm[12:18, 14:18] = 10
    lm[8:10, 8:12] = 5
    rm = region_masks(lm)
    assert rm.names == ["Face", "Right_Eye", "Nose"]
    empty = region_masks(np.zeros((8, 8), dtype=np.uint8))
    assert empty.names == [] and empty.masks.shape == (0, 8, 8)


def test_select_from_unordered_dict_walks_given_order():
    # Selection walks the given order; the pair rule keeps whichever side comes first.
    m = {"Right_Eye": 1, "Left_Eye": 2, "Hair": 3, "Face": 4}
    assert list(select_regions(m)) == ["Right_Eye", "Face"]


def test_region_group():
    assert region_group("Left_Eye") == "eye"
    assert region_group("Right_Ear") == "ear"
    assert region_group("Lower_Lip") == "lip"
    assert region_group("Face") == "face"
    assert region_group("Nose") == "nose"
    with pytest.raises(KeyError):
        region_group("Hair")


def test_bad_label_maps():
    with pytest.raises(InputImageError):
        label_masks(np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(InputImageError):
        label_masks(np.full((4, 4), 19, dtype=np.uint8))
    # Integer maps of another dtype are accepted when the values fit.
    assert list(label_masks(np.ones((4, 4), dtype=np.int64))) == ["Face"]


def test_region_images_upscaled_bicubic_full_frame():
    lm = full_label_map()
    rm = region_masks(lm)
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(1, 256, size=(256, 256, 3), dtype=np.uint8), "RGB")
    images = region_images(photo, rm.as_dict())
    assert len(images) == 5
    for img in images:
        assert img.size == (256, 256) and img.mode == "RGB"

    eye = np.asarray(images[1])
    up = np.asarray(Image.fromarray(rm.masks[1], "L").resize((256, 256), Image.BICUBIC))
    # Soft edges from the bicubic upscale: grey levels between 0 and 255 exist.
    grey = (up > 0) & (up < 255)
    assert int(grey.sum()) > 0
    # Black outside the region, the photo unchanged where the mask is fully on.
    assert np.all(eye[up == 0] == 0)
    assert int((up == 0).sum()) > 256 * 256 * 0.9
    np.testing.assert_array_equal(eye[up == 255], np.asarray(photo)[up == 255])
    # The eye covers 4x6 parse pixels at (22, 20): 16x24 at 4x scale, nothing of the right eye.
    assert up[100, 90] == 255 and up[100, 160] == 0


def test_region_images_white_photo_shows_the_mask():
    lm = full_label_map()
    rm = region_masks(lm)
    white = Image.new("RGB", (256, 256), (255, 255, 255))
    nose = np.asarray(region_images(white, {"Nose": rm.masks[3]})[0]).astype(int)
    up = np.asarray(Image.fromarray(rm.masks[3], "L").resize((256, 256), Image.BICUBIC)).astype(int)
    assert np.abs(nose[..., 0] - up).max() <= 1
    values = np.unique(nose[..., 0])
    assert values[0] == 0 and values[-1] == 255
    assert np.any((values > 0) & (values < 255))


def test_region_images_non_square_and_pil_masks():
    photo = Image.new("RGB", (96, 48), (10, 20, 30))
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[4:12, 4:12] = 255
    out = region_images(photo, {"Face": Image.fromarray(mask, "L")})
    assert out[0].size == (96, 48)
    assert np.asarray(out[0])[24, 48].tolist() == [10, 20, 30]
    assert np.asarray(out[0])[0, 0].tolist() == [0, 0, 0]


def test_clip_mean_image_and_padding():
    img = clip_mean_image((6, 4))
    assert img.shape == (4, 6, 3) and img.dtype == torch.float32
    normalised = (img - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.equal(normalised, torch.zeros_like(normalised))
    assert clip_mean_image(3).shape == (3, 3, 3)

    a = Image.new("RGB", (6, 4), (255, 0, 51))
    b = torch.full((4, 6, 3), 0.25)
    stacked, valid = pad_regions([a, b], (6, 4))
    assert stacked.shape == (5, 4, 6, 3)
    assert valid.tolist() == [True, True, False, False, False]
    assert stacked[0, 0, 0].tolist() == pytest.approx([1.0, 0.0, 0.2])
    assert torch.equal(stacked[1], b)
    for i in range(2, 5):
        assert torch.equal(stacked[i], img)

    none, valid0 = pad_regions([], 8)
    assert none.shape == (5, 8, 8, 3) and not valid0.any()
    with pytest.raises(InputImageError):
        pad_regions([Image.new("RGB", (5, 4))], (6, 4))
    with pytest.raises(ValueError):
        pad_regions([a] * 6, (6, 4))


def test_colorize_and_overlay():
    lm = np.array([[0, 1], [4, 18]], dtype=np.uint8)
    colours = colorize_labels(lm)
    assert colours.shape == (2, 2, 3) and colours.dtype == np.uint8
    assert colours[0, 0].tolist() == [0, 0, 0]
    assert colours[1, 0].tolist() == labels.PALETTE[4].tolist()
    assert colours[1, 1].tolist() == labels.PALETTE[18].tolist()

    photo = np.full((4, 4, 3), 100, dtype=np.uint8)
    out = overlay(photo, lm, alpha=0.5)
    assert out.shape == (4, 4, 3)
    # Nearest-neighbour stretch: the top-left 2x2 block is background and stays untouched.
    assert out[:2, :2].tolist() == photo[:2, :2].tolist()
    expected = np.rint(100 * 0.5 + labels.PALETTE[1].astype(float) * 0.5).astype(int).tolist()
    assert out[0, 3].tolist() == expected
    assert np.array_equal(overlay(photo, lm, alpha=0.0), photo)


class FixedLogits(torch.nn.Module):
    """Ignores its input except for shape/dtype and returns logits whose argmax is ``labels``."""

    def __init__(self, labels: np.ndarray, dtype=torch.float32):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones((), dtype=dtype))
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.seen = None

    def forward(self, x):
        self.seen = x
        onehot = torch.nn.functional.one_hot(self.labels, 19).permute(2, 0, 1).to(x.dtype)
        logits = (onehot * 5.0 + 0.1 * torch.arange(19, dtype=x.dtype).view(19, 1, 1)) * self.scale
        logits = logits.unsqueeze(0).expand(x.shape[0], 19, *self.labels.shape)
        return logits, logits * 0, logits * 0


def test_parse_image_argmax_of_first_output():
    size = 8
    ys, xs = np.mgrid[0:size, 0:size]
    labels = ((xs + 3 * ys) % 19).astype(np.uint8)
    net = FixedLogits(labels).eval()
    photo = Image.new("RGB", (40, 20), (255, 0, 128))
    out = parse_image(net, photo, size)
    assert out.dtype == np.uint8 and out.shape == (size, size)
    np.testing.assert_array_equal(out, labels)

    # The non-square photo is squashed to size x size and ImageNet-normalised.
    x = net.seen
    assert tuple(x.shape) == (1, 3, size, size) and x.dtype == torch.float32
    expected = [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    for c in range(3):
        assert torch.allclose(x[0, c], torch.full((size, size), expected[c]), atol=1e-6)


def test_parse_image_follows_parameter_dtype_and_single_output():
    labels = np.full((4, 4), 10, dtype=np.uint8)
    labels[0, 0] = 1
    net = FixedLogits(labels, dtype=torch.float64).eval()
    out = parse_image(net, Image.new("RGB", (4, 4)), 4)
    assert net.seen.dtype == torch.float64
    np.testing.assert_array_equal(out, labels)

    class Single(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(1, 19, 4, 4).index_fill(1, torch.tensor([7]), 1.0)

    assert np.all(parse_image(Single(), Image.new("RGB", (9, 9)), 4) == 7)


def test_parse_image_rejects_wrong_output():
    class Wrong(torch.nn.Module):
        def forward(self, x):
            return (torch.zeros(1, 5, 4, 4),)

    with pytest.raises(ModelFileError):
        parse_image(Wrong(), Image.new("RGB", (4, 4)), 4)


def test_parse_image_bilinear_resize_matches_pil():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
    net = FixedLogits(np.zeros((16, 16), dtype=np.uint8)).eval()
    parse_image(net, Image.fromarray(arr, "RGB"), 16)
    ref = np.asarray(Image.fromarray(arr, "RGB").resize((16, 16), Image.BILINEAR), dtype=np.float32) / 255
    ref = (ref - np.array([0.485, 0.456, 0.406], dtype=np.float32)) / np.array([0.229, 0.224, 0.225],
                                                                              dtype=np.float32)
    np.testing.assert_allclose(net.seen[0].permute(1, 2, 0).numpy(), ref, atol=1e-6)
