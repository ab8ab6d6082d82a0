"""Two people in one picture (issue 15, part 2) inside a real ComfyUI, on random SD1.5 weights.

* two chained ConsistentIDApplyModel nodes, each with its attn_mask: in one UNet forward, every
  cross-attention block adds A's ID term exactly where A's mask is (equal to the term of A alone)
  and nothing of B there, and the other way round;
* the ConsistentID LoRA is on the model once, however many identities are chained;
* ConsistentIDConditioning's ``mask`` gives the entries ComfyUI's Conditioning (Set Mask) gives, and
  a stock KSampler receives each person's text-only and facial entries with that person's mask
  and timestep window, next to an unmasked scene prompt.

Needs COMFYUI_PATH (see tests/comfy_harness.py).
"""

from __future__ import annotations

import importlib
import logging

import pytest
import torch

from comfy_sd15 import comfy_model_from_diffusers, comfy_sd15_clip, consistentid_sd15, diffusers_sd15_unet, random_embeds, unet_forward
from numeric import SAME_MATH_FP32, assert_close, assert_differs

pytestmark = pytest.mark.comfyui

LATENT = 16  # latent side: token grids 16, 8, 4 and 2, on which the half masks stay exactly 0 or 1
PIXELS = 8 * LATENT


@pytest.fixture(scope="module")
def model(comfy):
    return comfy_model_from_diffusers(diffusers_sd15_unet())


@pytest.fixture(scope="module")
def ckpt(comfy, tmp_path_factory):
    return consistentid_sd15(comfy, tmp_path_factory.mktemp("cid"))


@pytest.fixture(scope="module")
def person_a(comfy):
    return random_embeds(comfy, seed=5)


@pytest.fixture(scope="module")
def person_b(comfy):
    return random_embeds(comfy, seed=17)


@pytest.fixture(scope="module")
def clip(comfy):
    return comfy_sd15_clip()[0]


@pytest.fixture(scope="module")
def patch_mod(comfy):
    return comfy.pack_submodule("nodes.glue.model_patch")


def _halves(size=PIXELS):
    left = torch.zeros(1, size, size)
    left[:, :, : size // 2] = 1.0
    return left, 1.0 - left


def _attn2(model):
    return model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})


def _chain(patch_mod, model, ckpt, person_a, person_b, **kwargs_b):
    left, right = _halves()
    first = patch_mod.apply_model(model, ckpt, person_a, attn_mask=left)
    return patch_mod.apply_model(first, ckpt, person_b, attn_mask=right, **kwargs_b)


class _Recorder:
    """Stands at a block's attn2 key in front of the real patch and keeps what the UNet passes it."""

    def __init__(self, patch):
        self.patch, self.calls = patch, []

    def __call__(self, q, k, v, extra_options):
        self.calls.append((q, k, v, dict(extra_options)))
        return self.patch(q, k, v, extra_options)


# --- the ID tokens: one UNet forward ------------------------------------------------------------------

def test_each_identity_acts_only_inside_its_mask_in_one_unet_forward(comfy, model, ckpt, person_a, person_b, patch_mod):
    id_attention = comfy.pack_submodule("consistentid_core.model.id_attention")
    left, _ = _halves()
    chained = _chain(patch_mod, model, ckpt, person_a, person_b)
    alone_a = _attn2(patch_mod.apply_model(model, ckpt, person_a))  # A alone, no mask
    alone_b = _attn2(patch_mod.apply_model(model, ckpt, person_b))
    blocks = _attn2(chained)
    assert len(blocks) == 16
    for patch in blocks.values():  # B's patch wraps A's, which wraps plain attention
        assert isinstance(patch.previous, patch_mod.ConsistentIDAttn2Patch) and patch.previous.previous is None

    spied = chained.clone()
    recorders = {key: _Recorder(patch) for key, patch in blocks.items()}
    for key, recorder in recorders.items():
        spied.set_model_attn2_replace(recorder, *key)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, LATENT, LATENT, generator=gen).repeat(2, 1, 1, 1)  # cond + uncond chunks
    unet_forward(spied, x, torch.tensor([400, 400]), torch.randn(2, 77, 768, generator=gen), [0, 1])

    for key, recorder in recorders.items():
        assert len(recorder.calls) == 1, key
        q, k, v, options = recorder.calls[0]
        with torch.no_grad():
            plain = patch_mod.comfy_attention(q, k, v, options["n_heads"], options)
            with_a = blocks[key].previous(q, k, v, options)  # plain attention + A's masked term
            with_both = blocks[key](q, k, v, options)  # ... + B's masked term
            term_a, term_b = with_a - plain, with_both - with_a
            alone_term_a = alone_a[key](q, k, v, options) - plain
            alone_term_b = alone_b[key](q, k, v, options) - plain
        in_a = id_attention.resample_mask(left, options["original_shape"], q.shape[1])[0, :, 0]
        a_rows, b_rows = in_a == 1.0, in_a == 0.0
        assert a_rows.any() and b_rows.any() and bool((a_rows | b_rows).all()), key
        # inside A's half: A's term is A's term alone, B adds nothing; inside B's: the other way round
        assert_close(term_a[:, a_rows], alone_term_a[:, a_rows], SAME_MATH_FP32, f"{key} A in A's half")
        assert torch.equal(term_b[:, a_rows], torch.zeros_like(term_b[:, a_rows])), f"{key}: B acts in A's half"
        assert_close(term_b[:, b_rows], alone_term_b[:, b_rows], SAME_MATH_FP32, f"{key} B in B's half")
        assert torch.equal(term_a[:, b_rows], torch.zeros_like(term_a[:, b_rows])), f"{key}: A acts in B's half"
        assert_differs(alone_term_a[:, a_rows], alone_term_b[:, a_rows], 1e-2, f"{key}: A and B are the same term")


# --- the LoRA: once -------------------------------------------------------------------------------------

def test_the_lora_is_applied_once_when_two_applies_are_chained(comfy, model, ckpt, person_a, person_b, patch_mod,
                                                                caplog):
    with caplog.at_level(logging.INFO, logger="consistentid"):
        chained = _chain(patch_mod, model, ckpt, person_a, person_b)
    assert len(chained.patches) == 128, "every LoRA weight of the 16 attention layers x 4 projections x 2"
    assert {len(entries) for entries in chained.patches.values()} == {1}, "a weight got the LoRA twice"
    assert any("ConsistentID-v1.bin is already on the incoming model (128 of 128 weights, strength 1," in m
               and "kept once" in m for m in caplog.messages), caplog.messages
    assert model.patches == {} and _attn2(model) == {}, "the input model must stay unpatched"

    # What is kept is what the sampler sees: with both ID weights at 0, the chain is the LoRA of one Apply.
    left, right = _halves()
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([300, 300]), torch.randn(2, 77, 768)
    lora_once = unet_forward(patch_mod.apply_model(model, ckpt, person_a, weight=0.0), x, t, text, [0, 1])
    first = patch_mod.apply_model(model, ckpt, person_a, weight=0.0, attn_mask=left)
    both = patch_mod.apply_model(first, ckpt, person_b, weight=0.0, attn_mask=right)
    assert_close(unet_forward(both, x, t, text, [0, 1]), lora_once, SAME_MATH_FP32)
    twice = both.clone()
    patch_mod.add_lora_patches(twice, ckpt, 1.0)
    assert_differs(unet_forward(twice, x, t, text, [0, 1]), lora_once, 1e-3, "a second LoRA would change the output")

    # The second node's own lora_strength is named as unused; a first Apply without LoRA leaves it to the second.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="consistentid"):
        _chain(patch_mod, model, ckpt, person_a, person_b, lora_strength=0.5)
    assert any("its lora_strength 0.5 is not used" in m for m in caplog.messages), caplog.messages
    no_lora_first = patch_mod.apply_model(model, ckpt, person_a, lora_strength=0.0, attn_mask=left)
    second = patch_mod.apply_model(no_lora_first, ckpt, person_b, lora_strength=0.7, attn_mask=right)
    assert len(second.patches) == 128
    assert {tuple(e[0] for e in entries) for entries in second.patches.values()} == {(0.7,)}


# --- the prompts: masked conditioning -----------------------------------------------------------------------

def _conditioning(comfy, clip, ckpt, embeds, text, merge_at, **extra):
    result = comfy.execute_node("ConsistentIDConditioning", clip=clip, consistentid=ckpt, embeds=embeds, text=text,
                                negative_text="blurry", caption="auto", merge_at=merge_at,
                                emphasis="literal (official)", **extra)
    return result.args


def test_a_mask_gives_the_entries_of_comfyuis_conditioning_set_mask(comfy, clip, ckpt, person_a):
    left, _ = _halves()
    plain_pos, plain_neg = _conditioning(comfy, clip, ckpt, person_a, "A man", 0.5)
    positive, negative = _conditioning(comfy, clip, ckpt, person_a, "A man", 0.5, mask=left[0], mask_strength=0.8)
    assert [e[1]["consistentid_phase"] for e in positive] == ["text", "facial"]
    assert [(e[1]["start_percent"], e[1]["end_percent"]) for e in positive] == [(0.0, 0.5), (0.5, 1.0)]
    for ours, plain in zip(positive + negative, plain_pos + plain_neg):
        assert torch.equal(ours[0], plain[0])
        assert torch.equal(ours[1]["mask"], left) and ours[1]["mask_strength"] == 0.8
        assert ours[1]["set_area_to_bounds"] is False
        assert "mask" not in plain[1]
    # the stock node on the unmasked outputs gives the same entries (it keeps start/end_percent too)
    for ours, plain in ((positive, plain_pos), (negative, plain_neg)):
        (stock,) = comfy.execute_node("ConditioningSetMask", conditioning=plain, mask=left[0], strength=0.8,
                                      set_cond_area="default")
        assert len(stock) == len(ours)
        for mine, theirs in zip(ours, stock):
            assert set(mine[1]) == set(theirs[1])
            for name, value in theirs[1].items():
                same = torch.equal(mine[1][name], value) if torch.is_tensor(value) else mine[1][name] == value
                assert same, name


def test_masking_copies_the_entries_and_refuses_unusable_masks(comfy, clip, ckpt, person_a):
    errors = comfy.pack_submodule("consistentid_core.errors")
    text_encoding = comfy.pack_submodule("nodes.glue.text_encoding")
    plain_pos, _ = _conditioning(comfy, clip, ckpt, person_a, "A man", 0.5)
    before = [dict(e[1]) for e in plain_pos]
    masked = text_encoding.mask_conditioning(plain_pos, _halves()[0], 1.0)
    assert [e[1] for e in plain_pos] == before, "the input entries were changed"
    assert all(m[1] is not p[1] for m, p in zip(masked, plain_pos))
    with pytest.raises(errors.PromptError, match=r"mask_strength is nan; it must lie in 0\.\.10"):
        text_encoding.mask_conditioning(plain_pos, _halves()[0], float("nan"))
    with pytest.raises(errors.PromptError, match=r"mask has shape \[2, 3, 8, 8\]"):
        text_encoding.mask_conditioning(plain_pos, torch.ones(2, 3, 8, 8), 1.0)


def test_a_stock_ksampler_receives_each_persons_prompt_in_its_mask_and_window(comfy, model, ckpt, person_a, person_b,
                                                                             clip, patch_mod, monkeypatch):
    samplers = importlib.import_module("comfy.samplers")  # a plain import would shadow the ``comfy`` fixture
    steps = 2
    merge_at = comfy.pack_submodule("nodes.sampler").merge_at_for(model, "normal", steps, 0)  # step 0 text, 1 facial
    left, right = _halves()
    pos_a, neg_a = _conditioning(comfy, clip, ckpt, person_a, "A man", merge_at, mask=left[0])
    pos_b, neg_b = _conditioning(comfy, clip, ckpt, person_b, "A woman", merge_at, mask=right[0])
    (scene,) = comfy.execute_node("CLIPTextEncode", clip=clip, text="two friends in a park")
    (scene_neg,) = comfy.execute_node("CLIPTextEncode", clip=clip, text="lowres")
    combine = lambda *conds: conds[0] if len(conds) == 1 else comfy.execute_node(  # noqa: E731
        "ConditioningCombine", conditioning_1=combine(*conds[:-1]), conditioning_2=conds[-1])[0]
    positive, negative = combine(pos_a, pos_b, scene), combine(neg_a, neg_b, scene_neg)

    lat_left = torch.zeros(1, LATENT, LATENT)
    lat_left[:, :, : LATENT // 2] = 1.0
    masks = {"A": lat_left, "B": 1.0 - lat_left, None: None}
    # name -> (cross-attention tensor, mask, percent window or None)
    expected = {
        "A text-only": (pos_a[0][0], "A", (0.0, merge_at)), "A facial": (pos_a[1][0], "A", (merge_at, 1.0)),
        "B text-only": (pos_b[0][0], "B", (0.0, merge_at)), "B facial": (pos_b[1][0], "B", (merge_at, 1.0)),
        "scene": (scene[0][0], None, None),
        "A negative": (neg_a[0][0], "A", None), "B negative": (neg_b[0][0], "B", None),
        "scene negative": (scene_neg[0][0], None, None),
    }
    seen = []
    original = samplers.get_area_and_mult

    def recording(conds, x_in, timestep_in):
        result = original(conds, x_in, timestep_in)
        seen.append((float(timestep_in[0]), conds, result is not None))
        return result

    monkeypatch.setattr(samplers, "get_area_and_mult", recording)
    chained = _chain(patch_mod, model, ckpt, person_a, person_b)
    comfy.execute_node("KSampler", model=chained, seed=1, steps=steps, cfg=5.0, sampler_name="euler",
                       scheduler="normal", positive=positive, negative=negative,
                       latent_image={"samples": torch.zeros(1, 4, LATENT, LATENT)}, denoise=1.0)

    sampling = chained.get_model_object("model_sampling")
    active = {}
    for sigma, conds, is_active in seen:
        mask = conds.get("mask")
        label = next((lab for lab, m in masks.items() if (m is None) == (mask is None)
                      and (m is None or torch.equal(mask.cpu(), m))), "other")
        names = [name for name, (tensor, lab, _window) in expected.items()
                 if lab == label and torch.equal(conds["cross_attn"], tensor)]
        assert len(names) == 1, f"an entry the graph did not make reached the sampler (mask {label})"
        name = names[0]
        window = expected[name][2]
        if window is None:
            assert "timestep_start" not in conds and "timestep_end" not in conds, name
        else:
            assert conds["timestep_start"] == pytest.approx(float(sampling.percent_to_sigma(window[0]))), name
            assert conds["timestep_end"] == pytest.approx(float(sampling.percent_to_sigma(window[1]))), name
        if mask is not None:
            assert conds.get("mask_strength") == 1.0 and "area" not in conds, name
        if is_active:
            active.setdefault(sigma, set()).add(name)

    assert len(active) == steps, active
    first, second = (active[s] for s in sorted(active, reverse=True))
    everywhere = {"scene", "A negative", "B negative", "scene negative"}
    assert first == {"A text-only", "B text-only"} | everywhere
    assert second == {"A facial", "B facial"} | everywhere
