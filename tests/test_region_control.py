"""Regions from other photos and per-region strengths (decoupled control with the released weights)."""

import pytest
import torch

from clip_vocab import sd15_tokenizer
from consistentid_core.prompt.conditioning import build_conditioning
from consistentid_core.embeds import FaceEmbeds
from consistentid_core.errors import EmbedsError, PromptError
from consistentid_core.model.networks import FacialEncoder
from consistentid_core.prompt.region_control import RegionStrengths, mix_regions
from consistentid_core.prompt.text import CAPTION_SD15
from test_conditioning import FakeTextEncoder
from numeric import SAME_MATH_FP32, assert_close

NAMES = ["Face", "Left_Eye", "Left_Ear", "Nose", "Upper_Lip"]


def _embeds(seed, names=NAMES, source="A"):
    gen = torch.Generator().manual_seed(seed)
    valid = torch.zeros(1, 5, dtype=torch.bool)
    valid[:, : len(names)] = True
    return FaceEmbeds(
        arch="sd15", id_embeds=torch.nn.functional.normalize(torch.randn(1, 512, generator=gen), dim=-1),
        clip_embeds=torch.randn(1, 257, 1280, generator=gen), region_embeds=torch.randn(1, 5, 257, 1280, generator=gen),
        region_valid=valid, region_names=[list(names)], uncond_clip_embeds=torch.randn(1, 257, 1280, generator=gen),
        sources=[source],
    )


def test_region_features_of_photo_b_go_into_exactly_that_region():
    a, b = _embeds(0, source="A"), _embeds(1, names=["Face", "Right_Eye", "Nose"], source="B")
    mixed = mix_regions(a, {"eye": b})
    assert torch.equal(mixed.region_embeds[0, 1], b.region_embeds[0, 1])  # B's eye
    for slot in (0, 2, 3, 4):
        assert torch.equal(mixed.region_embeds[0, slot], a.region_embeds[0, slot])
    assert torch.equal(mixed.id_embeds, a.id_embeds) and torch.equal(mixed.clip_embeds, a.clip_embeds)
    assert mixed.region_names[0][1] == "Right_Eye" and "eyes from B" in mixed.sources[0]


def test_a_region_the_identity_photo_lacks_is_added_in_the_official_slot():
    a, c = _embeds(0, names=["Face", "Nose", "Upper_Lip"]), _embeds(2)
    mixed = mix_regions(a, {"ear": c})
    assert mixed.region_names[0] == ["Face", "Left_Ear", "Nose", "Upper_Lip"]
    assert torch.equal(mixed.region_embeds[0, 1], c.region_embeds[0, 2])
    assert torch.equal(mixed.region_embeds[0, 2], a.region_embeds[0, 1])


def test_bad_region_inputs():
    a = _embeds(0)
    with pytest.raises(EmbedsError, match=r"the ears photo \(no-ears\) has no ears region"):
        mix_regions(a, {"ear": _embeds(3, names=["Face", "Nose"], source="no-ears")})
    with pytest.raises(PromptError, match="unknown region group"):
        mix_regions(a, {"hair": a})
    with pytest.raises(PromptError, match="strength of nose must be between 0 and 1, got 1.5"):
        RegionStrengths({"nose": 1.5})


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return FacialEncoder().eval()


def test_strength_0_gives_the_plain_token_and_1_the_fused_one(encoder):
    tok, fake, embeds = sd15_tokenizer(), FakeTextEncoder(), _embeds(0)
    full = build_conditioning(encoder, embeds, "A man", "", tok, fake, CAPTION_SD15)
    fp = full.prompts[0]
    clean, _ = fake({"l": [[(i, 1.0) for i in fp.input_ids]]})
    off = build_conditioning(encoder, embeds, "A man", "", tok, fake, CAPTION_SD15, strengths=RegionStrengths(region_scale=0.0))
    assert torch.equal(off.facial, clean)
    nose_half = build_conditioning(encoder, embeds, "A man", "", tok, fake, CAPTION_SD15,
                                   strengths=RegionStrengths({"nose": 0.5}))
    nose_position = fp.token_positions[fp.parts.index("Nose")]
    expected = 0.5 * clean[0, nose_position] + 0.5 * full.facial[0, nose_position]
    assert_close(nose_half.facial[0, nose_position], expected, SAME_MATH_FP32)
    others = [p for p in fp.token_positions if p != nose_position]
    assert torch.equal(nose_half.facial[0, others], full.facial[0, others])
