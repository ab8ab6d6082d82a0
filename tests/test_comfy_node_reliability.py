"""Bad input, long loops and memory of the nodes inside a real ComfyUI (issue 13, items 4, 6, 7 and 8).

* attn_mask of every shape mask nodes give, NaN masks, mask counts that fit no latent batch;
* NaN pixels, oversized image batches, lora_strength out of range or NaN, a merge at 1.0;
* ComfyUI's progress bar and cancel in every node loop over photos;
* the projected keys/values and the face-model caches released by ComfyUI's unload_all_models.

Needs COMFYUI_PATH (see tests/comfy_harness.py).  Models: random SD1.5 UNet and ConsistentID file
built in memory; the face models are stand-ins (tests/face_standins.py, tools/insightface_standins.py).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from comfy_sd15 import comfy_model_from_diffusers, comfy_sd15_clip, consistentid_sd15, diffusers_sd15_unet, random_embeds, unet_forward
from face_standins import FixedParser, PatchEncoder, face_label_map
from numeric import SAME_MATH_FP32, assert_close
from tools.insightface_standins import make_buffalo_l, red_square_image

pytestmark = [pytest.mark.comfyui, pytest.mark.filterwarnings("ignore::FutureWarning")]

NAN = float("nan")


@pytest.fixture(scope="module")
def errors(comfy):
    return comfy.pack_submodule("consistentid_core.errors")


@pytest.fixture(scope="module")
def model(comfy):
    return comfy_model_from_diffusers(diffusers_sd15_unet())


@pytest.fixture(scope="module")
def ckpt(comfy, tmp_path_factory):
    return consistentid_sd15(comfy, tmp_path_factory.mktemp("cid"))


@pytest.fixture(scope="module")
def embeds(comfy):
    return random_embeds(comfy)


@pytest.fixture(scope="module")
def analysis(comfy, tmp_path_factory):
    folder = make_buffalo_l(str(tmp_path_factory.mktemp("insightface") / "models" / "buffalo_l"))
    return comfy.pack_submodule("consistentid_core.face.insightface_models").load_face_analysis(folder, ["CPUExecutionProvider"])


def _apply(comfy, model, ckpt, embeds, **kwargs):
    return comfy.pack_submodule("nodes.glue.model_patch").apply_model(model, ckpt, embeds, **kwargs)


def _inputs(latent_batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(latent_batch, 4, 8, 8, generator=gen).repeat(2, 1, 1, 1)  # cond + uncond chunks
    return x, torch.tensor([300] * 2 * latent_batch), torch.randn(2 * latent_batch, 77, 768, generator=gen)


def _half_mask(height=64, width=64):
    mask = torch.zeros(height, width)
    mask[:, : width // 2] = 1.0
    return mask


def _faces(count, size=640):
    return torch.from_numpy(np.stack([red_square_image(size, ((192, 192, 128, 255),), color="blue")] * count)).float() / 255


# --- attn_mask (item 4) ---------------------------------------------------------------------------

def test_a_2d_or_4d_mask_is_normalised_when_apply_runs_and_samples_like_a_mask_batch(comfy, model, ckpt, embeds):
    plane = _half_mask()
    x, t, text = _inputs(latent_batch=2)
    reference = unet_forward(_apply(comfy, model, ckpt, embeds, attn_mask=plane[None]), x, t, text, [0, 1])
    for given in (plane, plane[None, None]):  # [H, W] as many mask nodes give it, and [B, 1, H, W]
        patched = _apply(comfy, model, ckpt, embeds, attn_mask=given)
        patch = patched.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1, 0)]
        assert tuple(patch.settings.mask.shape) == (1, 64, 64)
        assert_close(unet_forward(patched, x, t, text, [0, 1]), reference, SAME_MATH_FP32)
    unmasked = unet_forward(_apply(comfy, model, ckpt, embeds), x, t, text, [0, 1])
    assert (reference - unmasked).abs().max() > 1e-4  # the mask really acts


def test_a_mask_of_another_shape_or_with_nan_is_refused_when_apply_runs(comfy, model, ckpt, embeds, errors):
    with pytest.raises(errors.PromptError, match=r"attn_mask has shape \[2, 3, 64, 64\]; a mask must be \[H, W\], "
                                                 r"\[B, H, W\] or \[B, 1, H, W\]"):
        _apply(comfy, model, ckpt, embeds, attn_mask=torch.ones(2, 3, 64, 64))
    mask = _half_mask()
    mask[5, 5] = NAN
    with pytest.raises(errors.PromptError, match=r"attn_mask has 1 NaN/Inf values \(of 4096\); fix or replace the node"):
        _apply(comfy, model, ckpt, embeds, attn_mask=mask)


def test_a_mask_count_that_fits_no_latent_batch_is_named_at_the_first_step(comfy, model, ckpt, embeds, errors):
    # The latent batch is unknown to Apply; the first cross-attention call of sampling names both counts.
    patched = _apply(comfy, model, ckpt, embeds, attn_mask=torch.ones(3, 64, 64))
    with pytest.raises(errors.PromptError, match="attn_mask holds 3 masks but the latent batch has 2 images; give one "
                                                 "mask for every image, or exactly one mask per latent image"):
        unet_forward(patched, *_inputs(latent_batch=2), [0, 1])
    unet_forward(patched, *_inputs(latent_batch=3), [0, 1])  # one mask per image: fine


# --- strengths and the merge step (item 6) ------------------------------------------------------------

@pytest.mark.parametrize("value", [NAN, float("inf"), 2.5, -0.1])
def test_lora_strength_out_of_range_or_nan_is_refused(comfy, model, ckpt, embeds, errors, value):
    with pytest.raises(errors.PromptError, match=rf"lora_strength is {value}; it must lie in 0..2.0"):
        _apply(comfy, model, ckpt, embeds, lora_strength=value)
    node = comfy.node_class("ConsistentIDApplyModel")
    assert node.validate_inputs(lora_strength=value) == f"lora_strength is {value}; it must lie in 0..2.0"


def test_validate_inputs_checks_what_comfyui_skips_for_this_node(comfy):
    # A validate_inputs taking **kwargs switches off ComfyUI's own min/max checks for every input.
    node = comfy.node_class("ConsistentIDApplyModel")
    assert node.validate_inputs() is True
    assert node.validate_inputs(weight=2.0, lora_strength=0.0, start_at=0.2, end_at=0.9) is True
    assert node.validate_inputs(weight=NAN) == "weight is nan; it must lie in 0..3.0"
    assert node.validate_inputs(attr_weight=7.0) == "attr_weight is 7.0; it must lie in 0..3.0"
    assert node.validate_inputs(start_at=NAN) == "start_at is nan; it must lie in 0..1"
    assert node.validate_inputs(start_at=0.8, end_at=0.2) == "start_at (0.8) must not be after end_at (0.2)"
    assert node.validate_inputs(lora_strength=None) is True  # a linked input: checked when the node runs


def test_a_merge_at_of_one_warns_that_the_facial_prompt_is_never_used(comfy, model, ckpt, embeds, caplog):
    with caplog.at_level(logging.WARNING, logger="consistentid"):
        (merge_at,) = comfy.execute_node("ConsistentIDMergeStep", model=model, scheduler="normal", steps=1,
                                         merge_step=0).args
    assert merge_at == 1.0
    assert "merge_step 0 is the last of 1 step(s), which makes merge_at 1.0, so the facial prompt is never used" \
        in caplog.text
    caplog.clear()
    clip = comfy_sd15_clip()[0]
    cond = comfy.pack_submodule("nodes.glue.text_encoding")
    with caplog.at_level(logging.WARNING, logger="consistentid"):
        cond.consistentid_conditioning(clip, ckpt, embeds, "A man", "", merge_at=1.0)
    assert "merge_at is 1.0 (the facial entry starts at the very end), so the facial prompt is never used" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="consistentid"):
        (merge_at,) = comfy.execute_node("ConsistentIDMergeStep", model=model, scheduler="normal", steps=50,
                                         merge_step=30).args
    assert 0.5 < merge_at < 0.7 and "never used" not in caplog.text


# --- images: NaN pixels and oversized batches (item 6) -------------------------------------------------

def test_nan_pixels_are_named_by_image_not_read_as_no_face(comfy, errors):
    image = _faces(2, size=64)
    image[1, 3, 4, 0] = NAN
    image[1, 9, 9, 2] = float("inf")
    message = r"image 1 of 2 has NaN/Inf pixels \(2 values\); fix or replace the node that made it"
    with pytest.raises(errors.InputImageError, match=message):
        comfy.execute_node("ConsistentIDFaceParse", image=image, face_parser=None, resolution="sd15 (512)")
    with pytest.raises(errors.InputImageError, match=message):  # before any model is touched
        comfy.execute_node("ConsistentIDEncodeFace", consistentid=None, clip_vision=None, face_analysis=None,
                           face_parser=None, image=image, face_select="first", combine="average", on_no_face="error")
    with pytest.raises(errors.InputImageError, match="pose image 1 of 2 has NaN/Inf pixels"):
        comfy.execute_node("ConsistentIDFaceKeypoints", face_analysis=None, image=image, face_select="largest",
                           color_order="bgr")
    with pytest.raises(errors.InputImageError, match="attribute image 1 of 2 has NaN/Inf pixels"):
        comfy.execute_node("ConsistentIDEncodeAttributes", clip_vision=None, face_parser=None, image=image, mode="crop",
                           resolution="sd15 (512)")


class ShapeOnly:
    """An IMAGE batch that has a shape but fails the test if any pixel is read."""

    ndim = 4
    shape = (2, 8000, 8000, 3)

    def __getitem__(self, index):
        raise AssertionError("pixels were read before the size was checked")


def test_an_oversized_batch_is_refused_from_its_shape_before_any_conversion(comfy, errors):
    images = comfy.pack_submodule("nodes.glue.images")
    message = (r"reference image is 8000x8000 px; sides above 4096 px are refused because detection works at 640 px "
               r"or less and a larger image only costs memory \(all 2 image\(s\) of the batch refused before "
               r"conversion\): downscale it first")
    with pytest.raises(errors.InputImageError, match=message):
        images.image_batch_to_uint8(ShapeOnly())
    # 2 x 768 MB if it were converted; an expanded view costs nothing, so only a shape check passes this cheaply
    huge = torch.zeros(1, 1, 1, 3).expand(2, 8000, 8000, 3)
    with pytest.raises(errors.InputImageError, match=message):
        comfy.execute_node("ConsistentIDFaceParse", image=huge, face_parser=None, resolution="sd15 (512)")
    assert len(images.image_batch_to_uint8(torch.zeros(1, 4096, 64, 3))) == 1  # the limit itself is allowed


# --- progress bar and cancel in every loop over photos (item 7) -------------------------------------------

class CountingParser(torch.nn.Module):
    """A 19-class parser with one weight (so ComfyUI can manage it) that counts its calls."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 19, 1)
        self.calls = 0
        self.eval()

    def forward(self, x):
        self.calls += 1
        return self.conv(x)


@pytest.fixture()
def progress_events(comfy, monkeypatch):
    """ComfyUI's progress hook, recording (value, total); ``cancel_at`` presses cancel when that value is shown."""
    import comfy.model_management as mm
    import comfy.utils

    events = SimpleNamespace(seen=[], cancel_at=None)

    def hook(value, total, preview, node_id=None):
        events.seen.append((value, total))
        if value == events.cancel_at:
            mm.interrupt_current_processing(True)

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    yield events
    mm.interrupt_current_processing(False)


def _stub_vision(comfy, monkeypatch, module_name):
    """The node's CLIP vision check and encoder replaced by a small patch encoder (ViT-H's forward is seconds)."""
    module = comfy.pack_submodule(module_name)
    encoder = PatchEncoder()
    monkeypatch.setattr(module, "check_clip_vision", lambda clip_vision: None)
    monkeypatch.setattr(module, "comfy_vision_encoder", lambda clip_vision: encoder)
    return encoder


def test_face_parse_shows_progress_and_stops_on_cancel(comfy, progress_events):
    import comfy.model_management as mm

    parser = CountingParser()
    comfy.execute_node("ConsistentIDFaceParse", image=_faces(3, size=64), face_parser=parser, resolution="sd15 (512)")
    assert progress_events.seen == [(0, 3), (1, 3), (2, 3), (3, 3)] and parser.calls == 3
    progress_events.seen.clear()
    progress_events.cancel_at = 0  # cancel while the first photo is parsed
    with pytest.raises(mm.InterruptProcessingException):
        comfy.execute_node("ConsistentIDFaceParse", image=_faces(3, size=64), face_parser=parser, resolution="sd15 (512)")
    assert parser.calls == 4  # one more photo, then it stopped


def test_encode_face_shows_progress_and_stops_on_cancel(comfy, analysis, progress_events, monkeypatch):
    import comfy.model_management as mm

    encoder = _stub_vision(comfy, monkeypatch, "nodes.encode")
    parser = FixedParser(face_label_map(640, (128, 128, 256, 256)))
    ckpt = SimpleNamespace(arch="sd15", name="ConsistentID-v1.bin")
    inputs = dict(consistentid=ckpt, clip_vision=object(), face_analysis=analysis, face_parser=parser,
                  face_select="first", combine="average", on_no_face="error")
    (embeds, _preview) = comfy.execute_node("ConsistentIDEncodeFace", image=_faces(3), **inputs).args
    assert embeds.num_references == 1  # averaged
    assert progress_events.seen == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]  # 3 photos, then the vision pass

    other = FixedParser(face_label_map(640, (128, 128, 256, 256)))  # new models: no cache hit
    progress_events.seen.clear()
    progress_events.cancel_at = 0
    calls = encoder.calls
    with pytest.raises(mm.InterruptProcessingException):
        comfy.execute_node("ConsistentIDEncodeFace", image=_faces(3), **dict(inputs, face_parser=other))
    assert other.calls == 1 and encoder.calls == calls  # the first photo only; the vision model never ran


def test_encode_attributes_shows_progress_and_stops_on_cancel(comfy, progress_events, monkeypatch):
    import comfy.model_management as mm

    _stub_vision(comfy, monkeypatch, "nodes.attributes")
    parser = FixedParser(np.zeros((64, 64), dtype=np.uint8))  # no attribute: each photo is logged and skipped
    inputs = dict(clip_vision=object(), face_parser=parser, mode="crop", resolution="sd15 (512)")
    (result,) = comfy.execute_node("ConsistentIDEncodeAttributes", image=_faces(2, size=64), **inputs).args
    assert result is None and parser.calls == 2
    assert progress_events.seen == [(0, 2), (1, 2), (2, 2)]
    progress_events.cancel_at = 0
    with pytest.raises(mm.InterruptProcessingException):
        comfy.execute_node("ConsistentIDEncodeAttributes", image=_faces(2, size=64), **inputs)
    assert parser.calls == 3


def test_face_keypoints_show_progress_and_stop_on_cancel(comfy, analysis, progress_events, monkeypatch):
    import comfy.model_management as mm

    region_control = comfy.pack_submodule("nodes.region_control")
    detected = []
    original = region_control.pose_keypoints
    monkeypatch.setattr(region_control, "pose_keypoints", lambda *a, **k: detected.append(1) or original(*a, **k))
    inputs = dict(face_analysis=analysis, face_select="largest", color_order="rgb")  # blue square: insightface sees it in RGB
    (pictures,) = comfy.execute_node("ConsistentIDFaceKeypoints", image=_faces(2), **inputs).args
    assert tuple(pictures.shape) == (2, 640, 640, 3)
    assert progress_events.seen == [(0, 2), (1, 2), (2, 2)]
    progress_events.cancel_at = 0
    with pytest.raises(mm.InterruptProcessingException):
        comfy.execute_node("ConsistentIDFaceKeypoints", image=_faces(2), **inputs)
    assert len(detected) == 3


# --- memory released on ComfyUI's unload (item 8) -----------------------------------------------------------

def test_unload_all_models_releases_the_key_value_copies_and_sampling_still_matches(comfy, model, ckpt, embeds):
    import comfy.model_management as mm
    import hook_breaker_ac10a0

    memory = comfy.pack_submodule("nodes.glue.model_patch")
    patched = _apply(comfy, model, ckpt, embeds, attn_mask=_half_mask())
    x, t, text = _inputs(latent_batch=1)
    first = unet_forward(patched, x, t, text, [0, 1])
    held = memory.patch_cache_bytes(patched)
    # 16 blocks: cond/uncond k and v copies plus one batch layout and the resampled mask per block
    assert held > 16 * 4 * 4 * 320 * 4
    # Loading another clone of the same UNet detaches this one without unloading: the copies stay.
    unet_forward(_apply(comfy, model, ckpt, embeds, weight=0.5), x, t, text, [0, 1])
    assert memory.patch_cache_bytes(patched) == held

    unet_forward(patched, x, t, text, [0, 1])
    hook_breaker_ac10a0.restore_functions()  # what ComfyUI does after each prompt; a registration survives it
    mm.unload_all_models()
    assert memory.patch_cache_bytes(patched) == 0
    assert_close(unet_forward(patched, x, t, text, [0, 1]), first, SAME_MATH_FP32, "rebuilt copies differ")
    # Only what this layout needs comes back (the projections are shared with earlier tests' layouts).
    assert 0 < memory.patch_cache_bytes(patched) <= held


def test_unload_all_models_releases_the_face_models_and_offloads_the_parser(comfy, monkeypatch):
    import comfy.model_management as mm

    memory = comfy.pack_submodule("nodes.glue.memory")
    parser_module = comfy.pack_submodule("consistentid_core.face.parser")
    insightface_module = comfy.pack_submodule("consistentid_core.face.insightface_models")
    assert parser_module._cache.max_entries == 2 and insightface_module._CACHE.max_entries == 2

    parser = CountingParser()
    parser_module._cache[("parser.pth", 0.0, "cpu")] = parser
    insightface_module._CACHE[("buffalo_l", ("CPUExecutionProvider",))] = object()
    memory.use_face_parser(parser)  # what every node that parses does first
    patcher = parser.consistentid_patcher
    assert any(loaded.model is patcher for loaded in mm.current_loaded_models)
    mm.unload_all_models()
    assert len(parser_module._cache) == 0 and len(insightface_module._CACHE) == 0
    assert not any(loaded.model is patcher for loaded in mm.current_loaded_models)
    memory.use_face_parser(parser)  # usable again: ComfyUI loads it back
    assert any(loaded.model is patcher for loaded in mm.current_loaded_models)
