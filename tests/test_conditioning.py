"""Official contexts: text-only, facial (FacialEncoder on the marked tokens) and the fused negative."""

import pytest
import torch

from clip_vocab import sd15_tokenizer, sdxl_tokenizer_2
from consistentid_core.prompt.conditioning import build_conditioning
from consistentid_core.embeds import FaceEmbeds
from consistentid_core.model.networks import FacialEncoder
from consistentid_core.prompt.text import CAPTION_SD15, CAPTION_SD15_OLD, CAPTION_SDXL, IMAGE_MARKER, build_facial_prompt, plain_ids
from consistentid_core.prompt.text import second_encoder_ids
from numeric import SAME_MATH_FP32, assert_close

PROMPT = "A man, in a forest, adventuring"
NEGATIVE = "monochrome, lowres"
NAMES = ["Face", "Left_Eye", "Left_Ear", "Nose", "Upper_Lip"]


class FakeTextEncoder:
    """A deterministic stand-in for the host encoder: token table + position, per encoder key."""

    def __init__(self, width=768, widths=None):
        gen = torch.Generator().manual_seed(0)
        self.widths = widths or {"l": width}
        self.tables = {k: torch.randn(49410, w, generator=gen) for k, w in self.widths.items()}
        self.calls = []

    def __call__(self, tokens):
        self.calls.append(tokens)
        outs, pooled = [], None
        for key in ("l", "g"):
            if key in tokens:
                ids = torch.tensor([i for i, _ in tokens[key][0]])
                weights = torch.tensor([w for _, w in tokens[key][0]])[:, None]
                emb = self.tables[key][ids] * weights + torch.arange(77)[:, None] * 0.01
                outs.append(emb[None])
                pooled = emb[None, 0, :8]
        return torch.cat(outs, dim=-1), pooled if "g" in tokens else None


def _embeds(arch="sd15", names=NAMES, n=1):
    torch.manual_seed(1)
    valid = torch.zeros(n, 5, dtype=torch.bool)
    valid[:, : len(names)] = True
    return FaceEmbeds(
        arch=arch, id_embeds=torch.nn.functional.normalize(torch.randn(n, 512), dim=-1),
        clip_embeds=torch.randn(n, 257, 1280), region_embeds=torch.randn(n, 5, 257, 1280), region_valid=valid,
        region_names=[list(names)] * n, uncond_clip_embeds=torch.randn(1, 257, 1280), sources=["t"] * n,
    )


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return FacialEncoder().eval()


def test_sd15_contexts_follow_the_official_recipe(encoder):
    tok, fake, embeds = sd15_tokenizer(), FakeTextEncoder(), _embeds()
    out = build_conditioning(encoder, embeds, PROMPT, NEGATIVE, tok, fake, CAPTION_SD15)
    fp = build_facial_prompt(PROMPT, NAMES, tok, caption=CAPTION_SD15)
    assert out.prompts[0].input_ids == fp.input_ids
    clean, _ = fake({"l": [[(i, 1.0) for i in fp.input_ids]]})
    text_only, _ = fake({"l": [[(i, 1.0) for i in plain_ids(fp.text_only, tok)]]})
    negative, _ = fake({"l": [[(i, 1.0) for i in plain_ids(NEGATIVE, tok)]]})
    assert torch.equal(out.text_only, text_only)
    mask = torch.tensor(fp.token_mask)
    # only the 5 marked rows of the facial context differ from the clean ids' encoding
    assert torch.equal(out.facial[0, ~mask], clean[0, ~mask])
    assert (out.facial[0, mask] - clean[0, mask]).abs().amin(dim=-1).gt(0).all()
    expected = encoder(clean, embeds.region_embeds, mask[None], torch.ones(1, 5, dtype=torch.bool))
    assert_close(out.facial, expected, SAME_MATH_FP32)
    # the negative is fused at the positive's positions with the zero-image features
    assert torch.equal(out.negative[0, ~mask], negative[0, ~mask])
    expected_neg = encoder(negative, embeds.uncond_region_embeds, mask[None], torch.ones(1, 5, dtype=torch.bool))
    assert_close(out.negative, expected_neg, SAME_MATH_FP32)
    assert out.pooled_facial is None and out.pooled_negative is None


def test_old_template_drops_the_face_region_and_keeps_the_slot_pairing(encoder):
    tok, fake, embeds = sd15_tokenizer(), FakeTextEncoder(), _embeds()
    out = build_conditioning(encoder, embeds, PROMPT, NEGATIVE, tok, fake, CAPTION_SD15_OLD)
    fp = out.prompts[0]
    assert fp.parts[:4] == ["Left_Eye", "Left_Ear", "Nose", "Upper_Lip"] and fp.num_facial_tokens == 4
    clean, _ = fake({"l": [[(i, 1.0) for i in fp.input_ids]]})
    parts = torch.zeros(1, 5, 257, 1280)
    parts[0, :4] = embeds.region_embeds[0, 1:5]  # slot 0 (Face) is unused
    expected = encoder(clean, parts, torch.tensor([fp.token_mask]), torch.tensor([[True] * 4 + [False]]))
    assert_close(out.facial, expected, SAME_MATH_FP32)


def test_missing_regions_and_several_identities(encoder):
    tok, fake = sd15_tokenizer(), FakeTextEncoder()
    embeds = FaceEmbeds.concat([_embeds(names=["Face", "Left_Eye", "Nose"]), _embeds()])
    out = build_conditioning(encoder, embeds, PROMPT, NEGATIVE, tok, fake, CAPTION_SD15)
    assert out.facial.shape == out.text_only.shape == out.negative.shape == (2, 77, 768)
    assert [p.num_facial_tokens for p in out.prompts] == [3, 5]
    # the negative prompt is encoded once for both rows
    negative_ids = plain_ids(NEGATIVE, tok)
    assert sum(1 for c in fake.calls if [i for i, _ in c["l"][0]] == negative_ids) == 1


def test_sdxl_uses_both_tokenizers_and_the_raw_prompt_for_the_text_only_phase():
    torch.manual_seed(0)
    encoder = FacialEncoder(output_dim=2048, embed_dim=2048).eval()
    tok, tok2 = sd15_tokenizer(), sdxl_tokenizer_2()
    fake = FakeTextEncoder(widths={"l": 768, "g": 1280})
    out = build_conditioning(encoder, _embeds("sdxl"), PROMPT, NEGATIVE, tok, fake, CAPTION_SDXL, tokenizer_2=tok2)
    fp = out.prompts[0]
    assert "; Detail:" in fp.text
    facial_call = next(c for c in fake.calls if [i for i, _ in c["l"][0]] == fp.input_ids)
    ids2 = [i for i, _ in facial_call["g"][0]]
    assert ids2 == second_encoder_ids(fp, tok2) and [27, 347, 11909, 91, 29] == ids2[ids2.index(27):ids2.index(27) + 5]
    raw, pooled_raw = fake({"l": [[(i, 1.0) for i in plain_ids(PROMPT, tok)]],
                            "g": [[(i, 1.0) for i in plain_ids(PROMPT, tok2, (IMAGE_MARKER,))]]})
    assert torch.equal(out.text_only, raw) and torch.equal(out.pooled_text_only, pooled_raw)
    assert out.facial.shape == (1, 77, 2048) and out.pooled_facial is not None and out.pooled_negative is not None


def test_per_token_weights_reach_the_encoder(encoder):
    tok, fake = sd15_tokenizer(), FakeTextEncoder()
    weights = lambda text, which, ids: [1.5 if i == ids[1] else 1.0 for i in ids]  # noqa: E731
    build_conditioning(encoder, _embeds(), PROMPT, NEGATIVE, tok, fake, CAPTION_SD15, weight_fn=weights)
    assert all(c["l"][0][1][1] == 1.5 for c in fake.calls)


def test_wrong_widths_and_tokenizers_are_refused(encoder):
    from consistentid_core.errors import PromptError

    with pytest.raises(PromptError, match="sdxl conditioning needs two tokenizers"):
        build_conditioning(encoder, _embeds("sdxl"), PROMPT, "", sd15_tokenizer(), FakeTextEncoder(), CAPTION_SDXL)
    with pytest.raises(PromptError, match="768-wide"):
        build_conditioning(encoder, _embeds("sdxl"), PROMPT, "", sd15_tokenizer(), FakeTextEncoder(), CAPTION_SDXL,
                           tokenizer_2=sdxl_tokenizer_2())
