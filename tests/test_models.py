"""FacialEncoder and ProjPlusModel: official layout, and outputs equal to the spec's formulas."""

import pytest
import torch

import official_reference as ref
from consistentid_core.model.networks import FacialEncoder, ProjPlusModel, build_facial_encoder, build_image_proj
from spec_keys import random_official_state, read_layout

PARAM_COUNTS = {
    "sd15": {"FacialEncoder": 105_772_288, "image_proj": 33_581_568},
    "sdxl": {"FacialEncoder": 125_124_608, "image_proj_model": 217_125_888},
}


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_state_dict_keys_and_shapes_equal_the_official_lists(arch):
    parts, _ = read_layout(arch)
    proj_part = "image_proj" if arch == "sd15" else "image_proj_model"
    with torch.device("meta"):
        modules = {"FacialEncoder": build_facial_encoder(arch), proj_part: build_image_proj(arch)}
    for part, module in modules.items():
        ours = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        assert list(ours) == list(parts[part]), part
        assert ours == parts[part], part
        assert sum(p.numel() for p in module.parameters()) == PARAM_COUNTS[arch][part]


@pytest.fixture(scope="module")
def sd15_state():
    return random_official_state("sd15", seed=1, proj_dtype=torch.float32)


@pytest.fixture(scope="module")
def facial_encoder(sd15_state):
    enc = FacialEncoder()
    enc.load_state_dict(sd15_state["FacialEncoder"])
    return enc.eval()


def _inputs(batch=1, marked=(3, 9, 14, 20, 25), valid=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randn(batch, 77, 768, generator=gen)
    parts = torch.randn(batch, 5, 257, 1280, generator=gen)
    token_mask = torch.zeros(batch, 77, dtype=torch.bool)
    token_mask[:, list(marked)] = True
    valid_mask = torch.zeros(batch, 5, dtype=torch.bool)
    valid_mask[:, :valid] = True
    return prompt, parts, token_mask, valid_mask


@torch.no_grad()
def test_facial_encoder_equals_the_official_formula_and_changes_only_marked_rows(facial_encoder, sd15_state):
    prompt, parts, token_mask, valid_mask = _inputs(batch=2)
    before = prompt.clone()
    out = facial_encoder(prompt, parts, token_mask, valid_mask)
    assert out.shape == (2, 77, 768)
    assert torch.equal(prompt, before), "the input must be left untouched"

    expected = ref.facial_encoder_inplace(sd15_state["FacialEncoder"], prompt.clone(), parts, token_mask, valid_mask)
    assert _rel(out, expected) < 1e-5

    unchanged = ~token_mask
    assert torch.equal(out[unchanged], before[unchanged])
    assert (out[token_mask] - before[token_mask]).abs().min() > 0


@torch.no_grad()
def test_facial_encoder_fuses_region_i_into_the_ith_marked_token(facial_encoder):
    prompt, parts, token_mask, valid_mask = _inputs(marked=(5, 30), valid=2)
    out = facial_encoder(prompt, parts, token_mask, valid_mask)
    region_1 = facial_encoder.encode_regions(parts[0, 1:2])
    fused = facial_encoder.fuse_module(prompt[0, 30:31], region_1)
    assert _rel(out[0, 30:31], fused) < 1e-6
    # swapping the two regions moves the fused tokens with them
    swapped_parts = parts.clone()
    swapped_parts[:, [0, 1]] = parts[:, [1, 0]]
    swapped = facial_encoder(prompt, swapped_parts, token_mask, valid_mask)
    assert _rel(swapped[0, 5:6], facial_encoder.fuse_module(prompt[0, 5:6], region_1)) < 1e-6


@torch.no_grad()
def test_facial_encoder_without_facial_tokens_is_the_identity(facial_encoder):
    prompt, parts, token_mask, valid_mask = _inputs(marked=(), valid=0)
    assert torch.equal(facial_encoder(prompt, parts, token_mask, valid_mask), prompt)


def test_facial_encoder_rejects_token_region_count_mismatch(facial_encoder):
    prompt, parts, token_mask, valid_mask = _inputs(marked=(3, 9, 14), valid=4)
    with pytest.raises(ValueError, match=r"\[3\] facial tokens .* \[4\] regions"):
        facial_encoder(prompt, parts, token_mask, valid_mask)


@torch.no_grad()
@pytest.mark.parametrize("shortcut,scale", [(False, 1.0), (True, 1.0), (True, 0.5)])
def test_proj_plus_equals_the_official_formula(sd15_state, shortcut, scale):
    model = ProjPlusModel()
    model.load_state_dict(sd15_state["image_proj"])
    gen = torch.Generator().manual_seed(3)
    id_embeds = torch.nn.functional.normalize(torch.randn(2, 512, generator=gen), dim=-1)
    clip = torch.randn(2, 257, 1280, generator=gen)
    out = model(id_embeds, clip, shortcut=shortcut, scale=scale)
    assert out.shape == (2, 4, 768)
    expected = ref.proj_plus(sd15_state["image_proj"], id_embeds, clip, shortcut=shortcut, scale=scale)
    assert _rel(out, expected) < 1e-5


@torch.no_grad()
def test_sdxl_modules_equal_the_official_formula():
    torch.manual_seed(0)
    proj = build_image_proj("sdxl").eval()
    enc = build_facial_encoder("sdxl").eval()
    id_embeds = torch.randn(1, 512)
    clip = torch.randn(1, 257, 1280)
    for shortcut in (False, True):
        out = proj(id_embeds, clip, shortcut=shortcut)
        assert out.shape == (1, 4, 2048)
        assert _rel(out, ref.proj_plus(proj.state_dict(), id_embeds, clip, shortcut=shortcut)) < 1e-5
    prompt = torch.randn(1, 77, 2048)
    parts = torch.randn(1, 5, 257, 1280)
    mask = torch.zeros(1, 77, dtype=torch.bool)
    mask[0, [4, 8, 12]] = True
    valid = torch.tensor([[True, True, True, False, False]])
    out = enc(prompt, parts, mask, valid)
    expected = ref.facial_encoder_inplace(enc.state_dict(), prompt.clone(), parts, mask, valid)
    assert _rel(out, expected) < 1e-5
    assert enc.visual_projection(parts[0]).shape == (5, 1, 2048)
