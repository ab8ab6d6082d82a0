"""The FlexID attribute branch inside a real ComfyUI: Apply ConsistentID Model with attribute embeds.

Runs only with COMFYUI_PATH set.  Random weights of the real SD1.5 shapes, built in memory; the
ConsistentID file is the official nested layout plus the branch as two more nested parts.
"""

import copy
import logging

import pytest
import torch

from comfy_sd15 import comfy_model_from_diffusers, diffusers_sd15_unet, random_embeds, unet_forward
from spec_keys import random_official_state
from numeric import SAME_MATH_FP32, assert_close, assert_differs

pytestmark = pytest.mark.comfyui


def _randomised(branch, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in branch.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return branch


@pytest.fixture(scope="module")
def unet_pair(comfy):
    unet = diffusers_sd15_unet(seed=4)
    return unet, comfy_model_from_diffusers(unet)


@pytest.fixture(scope="module")
def files(comfy, tmp_path_factory):
    """(official file, file with the attribute branch, the branch) loaded with the pack's loader."""
    from consistentid_core.attributes.branch import AttributeBranch, attribute_state_dict

    folder = tmp_path_factory.mktemp("cid")
    official = random_official_state("sd15", seed=3, proj_dtype=torch.float32)
    branch = _randomised(AttributeBranch("sd15", depth=2), seed=9)
    nested = dict(official)
    for key, value in attribute_state_dict(branch).items():
        part, rest = key.split(".", 1)
        nested.setdefault(part, {})[rest] = value
    torch.save(official, folder / "ConsistentID-v1.bin")
    torch.save(nested, folder / "ConsistentID-v1-attributes.bin")
    load = comfy.pack_submodule("consistentid_core.model.checkpoint").load_checkpoint
    yield load(str(folder / "ConsistentID-v1.bin")), load(str(folder / "ConsistentID-v1-attributes.bin")), branch


def _attribute_embeds(comfy, present=(0, 1), seed=11):
    attributes = comfy.pack_submodule("consistentid_core.attributes.photos")
    slots = len(attributes.ATTRIBUTE_NAMES)
    gen = torch.Generator().manual_seed(seed)
    valid = torch.zeros(1, slots, dtype=torch.bool)
    valid[0, list(present)] = True
    return attributes.AttributeEmbeds(torch.randn(1, slots, 257, 1280, generator=gen), valid,
                                      torch.randn(1, 257, 1280, generator=gen), ["attribute photo"])


def _apply(comfy, model, ckpt, embeds, **kwargs):
    return comfy.pack_submodule("nodes.glue.model_patch").apply_model(model, ckpt, embeds, **kwargs)




def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([400, 400]), torch.randn(2, 77, 768, generator=gen)


def test_comfy_patch_equals_the_training_processors_with_attributes(comfy, unet_pair, files):
    """The node's attribute term is the one the attribute stage trains (diffusers, core processors)."""
    from training.attention_processors import install_processors
    from training.attribute_branch_training import install_attribute_processors

    unet, model = unet_pair
    _, ckpt, branch = files
    embeds, attrs = random_embeds(comfy), _attribute_embeds(comfy)
    x, t, text = _inputs()
    ours = unet_forward(_apply(comfy, model, ckpt, embeds, attribute_embeds=attrs, attr_weight=0.8), x, t, text, [0, 1])
    without = unet_forward(_apply(comfy, model, ckpt, embeds), x, t, text, [0, 1])

    with torch.no_grad():
        proj = ckpt.image_proj
        id_tokens = torch.cat([proj(embeds.id_embeds, embeds.clip_embeds), proj(torch.zeros(1, 512), embeds.uncond_clip_embeds)])
        attr_tokens = torch.cat([branch.tokens(attrs.features, attrs.valid, attrs.uncond), branch.null_tokens(attrs.uncond)])
        reference = copy.deepcopy(unet)
        install_processors(reference, adapter_state=ckpt.adapter_state_dict())
        stream = install_attribute_processors(reference, branch, scale=0.8)
        stream.tokens = attr_tokens
        expected = reference(x, t, encoder_hidden_states=torch.cat([text, id_tokens], dim=1)).sample
    rel = ((ours - expected).abs().max() / expected.abs().max()).item()
    assert rel < 1e-3, rel
    assert ((ours - without).abs().max() / without.abs().max()).item() > 1e-3  # the branch really acts


def test_attr_weight_zero_and_window_give_the_output_without_attributes(comfy, unet_pair, files):
    _, model = unet_pair
    _, ckpt, _ = files
    embeds, attrs = random_embeds(comfy), _attribute_embeds(comfy)
    x, t, text = _inputs(1)
    without = unet_forward(_apply(comfy, model, ckpt, embeds), x, t, text, [0, 1])
    zero = unet_forward(_apply(comfy, model, ckpt, embeds, attribute_embeds=attrs, attr_weight=0.0), x, t, text, [0, 1])
    assert torch.equal(zero, without)
    late = _apply(comfy, model, ckpt, embeds, attribute_embeds=attrs, attr_start_at=0.5)
    early_sigma, late_sigma = torch.tensor([14.0, 14.0]), torch.tensor([0.5, 0.5])
    assert_close(unet_forward(late, x, t, text, [0, 1], early_sigma), unet_forward(
        _apply(comfy, model, ckpt, embeds), x, t, text, [0, 1], early_sigma), SAME_MATH_FP32)
    with_attrs_late = unet_forward(late, x, t, text, [0, 1], late_sigma)
    assert_differs(with_attrs_late, unet_forward(_apply(comfy, model, ckpt, embeds), x, t, text, [0, 1], late_sigma),
                   1e-4)


def test_photo_without_attributes_skips_the_branch_and_says_so(comfy, unet_pair, files, caplog):
    _, model = unet_pair
    _, ckpt, _ = files
    embeds = random_embeds(comfy)
    outline_only = _attribute_embeds(comfy, present=(5,))  # the face outline alone is no extrinsic attribute
    x, t, text = _inputs(2)
    with caplog.at_level(logging.WARNING, logger="consistentid"):
        skipped = _apply(comfy, model, ckpt, embeds, attribute_embeds=outline_only)
    assert any("shows no hair, glasses, hat, earrings or necklace" in m for m in caplog.messages)
    assert torch.equal(unet_forward(skipped, x, t, text, [0, 1]), unet_forward(_apply(comfy, model, ckpt, embeds), x, t, text, [0, 1]))


def test_official_file_with_attribute_inputs_is_a_clear_error(comfy, unet_pair, files):
    _, model = unet_pair
    official, _, _ = files
    errors = comfy.pack_submodule("consistentid_core.errors")
    with pytest.raises(errors.CheckpointError, match=r"ConsistentID-v1\.bin has no attribute branch .*Disconnect "
                                                     r"attribute_embeds, or load ConsistentID weights trained"):
        _apply(comfy, model, official, random_embeds(comfy), attribute_embeds=_attribute_embeds(comfy))
    patched = _apply(comfy, model, official, random_embeds(comfy))  # without attribute inputs it works as always
    assert patched is not model


@pytest.mark.parametrize("kwargs, message", [
    (dict(attr_start_at=0.7, attr_end_at=0.2), r"attr_start_at \(0.7\) and attr_end_at \(0.2\) must satisfy"),
    (dict(attr_weight=-0.5), r"attr_weight is -0.5; it must lie in 0..3.0"),
    (dict(attr_weight=4.0), r"attr_weight is 4.0; it must lie in 0..3.0"),
    (dict(attr_end_at=1.5), r"attr_start_at \(0.0\) and attr_end_at \(1.5\) must satisfy"),
])
def test_strengths_out_of_range_are_refused(comfy, unet_pair, files, kwargs, message):
    _, model = unet_pair
    _, ckpt, _ = files
    errors = comfy.pack_submodule("consistentid_core.errors")
    with pytest.raises(errors.PromptError, match=message):
        _apply(comfy, model, ckpt, random_embeds(comfy), attribute_embeds=_attribute_embeds(comfy), **kwargs)


def test_apply_node_validates_the_attribute_window(comfy):
    node = comfy.pack_submodule("nodes.apply").ConsistentIDApplyModel
    assert node.validate_inputs(attr_start_at=0.8, attr_end_at=0.3) == "attr_start_at (0.8) must not be after attr_end_at (0.3)"
    assert node.validate_inputs(attr_start_at=0.2, attr_end_at=0.3) is True


class _StubParser(torch.nn.Module):
    """19-class logits: hair (17) over the top third, glasses (6) in a band, skin (1) elsewhere."""

    def __init__(self, labels=(17, 6)):
        super().__init__()
        self.labels = labels
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        _, _, h, w = x.shape
        logits = torch.zeros(1, 19, h, w)
        logits[0, 1] = 1.0
        if 17 in self.labels:
            logits[0, 17, : h // 3] = 5.0
        if 6 in self.labels:
            logits[0, 6, h // 2 - h // 16: h // 2 + h // 16, w // 4: 3 * w // 4] = 5.0
        return (logits,)


def test_encode_attributes_node(comfy, monkeypatch, caplog):
    module = comfy.pack_submodule("nodes.attributes")
    seen = []

    def vision(pixels):
        seen.append(tuple(pixels.shape))
        return torch.ones(pixels.shape[0], 257, 1280) * torch.arange(1, pixels.shape[0] + 1)[:, None, None]

    monkeypatch.setattr(module, "check_clip_vision", lambda clip_vision: None)
    monkeypatch.setattr(module, "comfy_vision_encoder", lambda clip_vision: vision)
    photo = torch.rand(1, 256, 256, 3)
    (attrs,) = comfy.execute_node("ConsistentIDEncodeAttributes", clip_vision=object(), face_parser=_StubParser().eval(),
                                  image=photo, mode="crop", resolution="sd15 (512)").args
    assert attrs.present(0) == ["hair", "eyeglasses", "face_outline"]
    assert seen == [(4, 3, 224, 224)]  # three attribute pictures and the zero image, in one batch
    assert torch.equal(attrs.features[0, 1], torch.full((257, 1280), 2.0))  # glasses: the second picture
    assert torch.equal(attrs.uncond, torch.full((1, 257, 1280), 4.0))

    with caplog.at_level(logging.WARNING, logger="consistentid"):
        (none,) = comfy.execute_node("ConsistentIDEncodeAttributes", clip_vision=object(),
                                     face_parser=_StubParser(labels=()).eval(), image=photo, mode="crop",
                                     resolution="sd15 (512)").args
    assert none is None
    assert any("shows no hair, glasses, hat, earrings or necklace" in m for m in caplog.messages)


def test_training_output_loads_in_the_loader_node_and_patches(comfy, unet_pair, tmp_path):
    """What training/train.py writes for SD1.5 (the trainee's to_checkpoint + save_checkpoint, as
    TrainingRun.save_adapter does), and the attribute stage's file, load in ConsistentIDModelLoader."""
    from training.attention_processors import install_processors
    from consistentid_core.attributes.branch import AttributeBranch, attribute_state_dict
    from consistentid_core.model.checkpoint import save_checkpoint
    from consistentid_core.model.layers import LAYOUTS
    from training.modules import ConsistentIDTrainee, new_modules

    unet, model = unet_pair
    reference = copy.deepcopy(unet)
    facial, proj = new_modules("sd15", 768)
    trainee = ConsistentIDTrainee(reference, facial, proj, install_processors(reference), "sd15", LAYOUTS["sd15"])
    folder = comfy.model_dir("consistentid")
    save_checkpoint(trainee.to_checkpoint(), folder / "consistentid.safetensors",
                    {"trained_steps": 20, "producer": "consistentid training"})
    ckpt = trainee.to_checkpoint()
    ckpt.extra = attribute_state_dict(_randomised(AttributeBranch("sd15", depth=1), seed=2))
    save_checkpoint(ckpt, folder / "consistentid_attributes.safetensors", {"stage": "attributes"})
    comfy.refresh_file_lists()
    (plain,) = comfy.execute_node("ConsistentIDModelLoader", consistentid_file="consistentid.safetensors").args
    (with_branch,) = comfy.execute_node("ConsistentIDModelLoader", consistentid_file="consistentid_attributes.safetensors").args
    assert plain.arch == with_branch.arch == "sd15" and plain.metadata["trained_steps"] == "20"
    embeds = random_embeds(comfy)
    x, t, text = _inputs(3)
    out = unet_forward(_apply(comfy, model, with_branch, embeds, attribute_embeds=_attribute_embeds(comfy)), x, t, text, [0, 1])
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
