"""Bad input, long work and memory in the framework-free core (issue 13, items 4, 6, 7 and 8).

Masks of every shape ComfyUI nodes give, NaN masks and mask counts that do not fit the latent
batch; the progress/interrupt callback of the face pipeline; the bounded face-model caches and
the release of the projected keys/values.  The ComfyUI side is in test_comfy_node_reliability.py.
"""

import logging

import numpy as np
import pytest
import torch

from consistentid_core.face import insightface_models
from consistentid_core.face import parser as face_parser
from consistentid_core.prompt.conditioning import merge_fraction
from consistentid_core.errors import PromptError
from consistentid_core.face.analysis import get_face_analysis
from consistentid_core.face.pipeline import encode_references
from consistentid_core.model.id_attention import (
    IDPatchSettings, IDProjections, id_attention_delta, mask_for_batch, normalise_mask, sdpa_attention,
)
from consistentid_core.memo import ModelCache, release_model_caches
from face_standins import FixedParser, PatchEncoder, face_label_map
from numeric import SAME_MATH_FP32, assert_close
from tools.insightface_standins import make_buffalo_l, red_square_image

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

WIDTH, HEADS = 64, 4


def _projections(identities=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    wk, wv = torch.randn(WIDTH, 32, generator=gen), torch.randn(WIDTH, 32, generator=gen)
    cond, uncond = torch.randn(identities, 4, 32, generator=gen), torch.randn(1, 4, 32, generator=gen)
    return IDProjections.build({"a": wk, "b": wk}, {"a": wv, "b": wv}, cond, uncond)


def _options(latent_batch):
    # cond + uncond chunks of a latent batch on a 4x4 grid (16 tokens)
    return {"n_heads": HEADS, "cond_or_uncond": [0, 1], "original_shape": (latent_batch, 4, 4, 4)}


# --- attn_mask (item 4) ---------------------------------------------------------------------------

def test_masks_of_every_comfy_shape_become_the_same_mask_stack():
    gen = torch.Generator().manual_seed(1)
    plane = torch.rand(8, 8, generator=gen)
    one = normalise_mask(plane)
    assert one.shape == (1, 8, 8) and one.dtype == torch.float32
    assert torch.equal(one[0], plane)
    batch = torch.rand(3, 8, 8, generator=gen)
    assert torch.equal(normalise_mask(batch), batch)
    assert torch.equal(normalise_mask(batch[:, None]), batch)  # [B, 1, H, W], image-like
    assert normalise_mask(plane.double()).dtype == torch.float32


@pytest.mark.parametrize("shape", [(8,), (2, 3, 8, 8), (1, 1, 1, 8, 8)])
def test_a_mask_of_another_shape_is_refused_with_its_shape(shape):
    with pytest.raises(PromptError, match=r"attn_mask has shape \[" + ", ".join(map(str, shape)) + r"\]; a mask must be "
                                          r"\[H, W\], \[B, H, W\] or \[B, 1, H, W\]"):
        normalise_mask(torch.zeros(shape))


def test_an_empty_or_non_tensor_mask_is_refused():
    with pytest.raises(PromptError, match=r"attn_mask has shape \[1, 0, 8\], which holds no pixels"):
        normalise_mask(torch.zeros(1, 0, 8))
    with pytest.raises(PromptError, match="attn_mask is a list, not a mask tensor"):
        normalise_mask([[0.0, 1.0]])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_in_a_mask_is_refused_with_the_count(bad):
    mask = torch.ones(2, 8, 8)
    mask[1, 2, 3] = bad
    mask[0, 0, 0] = bad
    with pytest.raises(PromptError, match=r"attn_mask has 2 NaN/Inf values \(of 128\); fix or replace the node"):
        normalise_mask(mask)


def test_a_2d_mask_gives_what_the_same_mask_as_a_stack_gives():
    proj = _projections()
    q = torch.randn(4, 16, WIDTH, generator=torch.Generator().manual_seed(2))
    plane = torch.zeros(8, 8)
    plane[:, :4] = 1.0
    from_plane = id_attention_delta(q, _options(2), "a", proj, IDPatchSettings(mask=normalise_mask(plane)), sdpa_attention)
    from_stack = id_attention_delta(q, _options(2), "a", proj, IDPatchSettings(mask=plane[None]), sdpa_attention)
    assert_close(from_plane, from_stack, SAME_MATH_FP32)
    assert torch.count_nonzero(from_plane.view(4, 4, 4, WIDTH)[:, :, 2:]) == 0  # right half masked out
    assert torch.count_nonzero(from_plane.view(4, 4, 4, WIDTH)[:, :, :2]) > 0


def test_a_mask_count_that_fits_no_latent_batch_is_named_at_the_first_call():
    proj = _projections()
    q = torch.randn(4, 16, WIDTH, generator=torch.Generator().manual_seed(3))  # latent batch 2, cond + uncond
    three = IDPatchSettings(mask=torch.ones(3, 8, 8))
    with pytest.raises(PromptError, match="attn_mask holds 3 masks but the latent batch has 2 images; give one mask "
                                          "for every image, or exactly one mask per latent image"):
        id_attention_delta(q, _options(2), "a", proj, three, sdpa_attention)
    for count in (1, 2):  # one for all, or one per image
        delta = id_attention_delta(q, _options(2), "a", proj, IDPatchSettings(mask=torch.ones(count, 8, 8)), sdpa_attention)
        assert delta.shape == q.shape
    mask_for_batch(1, 7)
    with pytest.raises(PromptError, match="holds 2 masks but the latent batch has 3 images"):
        mask_for_batch(2, 3)


def test_a_mask_per_image_reaches_the_rows_of_that_image_only():
    proj = _projections()
    q = torch.randn(6, 16, WIDTH, generator=torch.Generator().manual_seed(4))  # 3 images, cond + uncond
    masks = torch.ones(3, 8, 8)
    masks[1] = 0.0
    delta = id_attention_delta(q, _options(3), "a", proj, IDPatchSettings(mask=masks), sdpa_attention)
    zero_rows = [r for r in range(6) if torch.count_nonzero(delta[r]) == 0]
    assert zero_rows == [1, 4]  # image 1 in the cond chunk and in the uncond chunk


# --- released copies (item 8) -----------------------------------------------------------------------

def test_release_drops_every_device_copy_and_layout_and_the_next_step_rebuilds_them():
    proj = _projections(identities=2)
    rows = [(0, 0), (0, 1), (1, 0), (1, 0)]
    before = proj.for_rows("a", rows, "cpu", torch.float32)
    proj.for_rows("b", rows, "cpu", torch.bfloat16)
    # per block: the copies cond k/v [2, 4, 64] and uncond k/v [1, 4, 64], and the layout's k/v [4, 4, 64]
    elements = (2 + 2 + 1 + 1) * 4 * WIDTH + 2 * 4 * 4 * WIDTH
    expected = elements * 4 + elements * 2  # block "a" in fp32, block "b" in bf16
    assert proj.cached_bytes == expected
    assert proj.release() == expected
    assert proj.cached_bytes == 0 and not proj._moved and not proj._batches
    again = proj.for_rows("a", rows, "cpu", torch.float32)
    assert again[0] is not before[0]
    assert_close(again[0], before[0], SAME_MATH_FP32)
    assert_close(again[1], before[1], SAME_MATH_FP32)


def test_release_can_keep_one_device_and_some_blocks():
    proj = _projections()
    proj.warm("cpu", torch.float32)
    proj._on("a", "meta", torch.float32)  # another device's copy, as after a move
    assert proj.release(keep_device="cpu") > 0
    assert {where[1] for where in proj._moved} == {"cpu"}
    proj.release(keys=("a",))
    assert {where[0] for where in proj._moved} == {"b"}


def test_settings_release_the_resampled_masks():
    settings = IDPatchSettings(mask=torch.ones(1, 8, 8))
    rows = settings.mask_rows((2, 4, 4, 4), 16, 4, 2, "cpu", torch.float32)
    assert rows.shape == (4, 16, 1)
    assert settings.release() == 4 * 16 * 4
    assert settings._masks == {} and settings.release() == 0


# --- bounded face-model caches (item 8) -------------------------------------------------------------

def test_model_cache_keeps_the_two_most_recently_used():
    cache = ModelCache("test models", max_entries=2)
    cache["a"], cache["b"] = 1, 2
    assert cache.get("a") == 1  # "a" is now the most recent
    cache["c"] = 3
    assert list(cache) == ["a", "c"]
    assert cache.get("b", "gone") == "gone"
    with pytest.raises(ValueError):
        ModelCache("none", 0)


def test_the_face_parser_and_insightface_caches_are_bounded_and_released(monkeypatch, tmp_path):
    assert isinstance(face_parser._cache, ModelCache) and face_parser._cache.max_entries == 2
    assert isinstance(insightface_models._CACHE, ModelCache) and insightface_models._CACHE.max_entries == 2
    monkeypatch.setattr(face_parser, "_cache", ModelCache("face parser", 2))
    loads = []
    monkeypatch.setattr(face_parser, "load_face_parser", lambda path, device: loads.append(path) or torch.nn.Linear(1, 1))
    files = []
    for name in ("one.pth", "two.pth", "three.pth"):
        (tmp_path / name).write_bytes(b"x")
        files.append(str(tmp_path / name))
    first = face_parser.get_face_parser(files[0])
    assert face_parser.get_face_parser(files[0]) is first  # cached
    face_parser.get_face_parser(files[1])
    face_parser.get_face_parser(files[2])
    assert len(face_parser._cache) == 2 and len(loads) == 3
    assert face_parser.get_face_parser(files[0]) is not first  # the least recently used one was dropped
    assert len(loads) == 4

    monkeypatch.setattr(insightface_models, "_CACHE", ModelCache("insightface", 2))
    monkeypatch.setattr(insightface_models, "load_face_analysis", lambda folder, providers: object())
    for name in ("a", "b", "c"):
        insightface_models.get_face_analysis(str(tmp_path / name), ["CPUExecutionProvider"])
    assert len(insightface_models._CACHE) == 2

    assert release_model_caches() >= 4
    assert len(face_parser._cache) == 0 and len(insightface_models._CACHE) == 0


# --- progress and interrupt of the face pipeline (item 7) ---------------------------------------------

@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    folder = make_buffalo_l(str(tmp_path_factory.mktemp("insightface") / "models" / "buffalo_l"))
    return get_face_analysis(folder, "CPU")


def _photos(count):
    return [red_square_image(640, ((192, 192, 128, 255),)) for _ in range(count)]


class Stop(Exception):
    """What a host's cancel raises through the callback."""


def test_encoding_reports_each_photo_and_the_vision_pass(analysis):
    seen = []
    parser = FixedParser(face_label_map(640, (128, 128, 256, 256)))
    embeds, _ = encode_references(_photos(3), analysis, parser, PatchEncoder(), "sd15", color_order="bgr",
                                  progress=lambda done, total: seen.append((done, total)))
    assert embeds.num_references == 3
    assert seen == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]


def test_an_interrupt_stops_before_the_next_photo_and_nothing_is_encoded(analysis):
    parser = FixedParser(face_label_map(640, (128, 128, 256, 256)))
    encoder = PatchEncoder()

    def cancel_after_first(done, total):
        if done == 1:
            raise Stop()

    with pytest.raises(Stop):
        encode_references(_photos(3), analysis, parser, encoder, "sd15", color_order="bgr", progress=cancel_after_first)
    assert parser.calls == 1  # the second and third photo were never parsed
    assert encoder.calls == 0  # and the vision model never ran


# --- merge step that leaves the facial prompt unused (item 6) -----------------------------------------

def test_a_merge_at_of_one_is_warned_about(caplog):
    identity = lambda sigma: 1.0 - sigma / 15.0  # noqa: E731  (any decreasing map will do)
    with caplog.at_level(logging.WARNING, logger="consistentid"):
        assert merge_fraction([14.6, 0.0], 0, identity) == 1.0  # steps=1: the only possible merge step
    assert "merge_step 0 is the last of 1 step(s), which makes merge_at 1.0, so the facial prompt is never used" in caplog.text
    assert "Use more steps or an earlier merge step" in caplog.text
    caplog.clear()
    sigmas = list(np.linspace(14.6, 0.03, 50)) + [0.0]
    with caplog.at_level(logging.WARNING, logger="consistentid"):
        value = merge_fraction(sigmas, 30, identity)
    assert 0.0 < value < 1.0 and caplog.text == ""

