"""ConsistentID generation inside a real ComfyUI: model patch, conditioning and the merge step.

Runs only with COMFYUI_PATH set.  Uses random weights of the real SD1.5 shapes built in memory.
"""

import copy
import importlib
import logging

import pytest
import torch

from comfy_sd15 import (
    comfy_model_from_diffusers, comfy_sd15_clip, consistentid_sd15, diffusers_sd15_unet, random_embeds, unet_forward,
)
from numeric import SAME_MATH_FP32, assert_close, assert_differs

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def unet_pair(comfy):
    unet = diffusers_sd15_unet()
    return unet, comfy_model_from_diffusers(unet)


@pytest.fixture(scope="module")
def ckpt(comfy, tmp_path_factory):
    return consistentid_sd15(comfy, tmp_path_factory.mktemp("cid"))


@pytest.fixture(scope="module")
def embeds(comfy):
    return random_embeds(comfy)


@pytest.fixture(scope="module")
def clip(comfy):
    return comfy_sd15_clip()[0]


def _apply(comfy, model, ckpt, embeds, **kwargs):
    return comfy.pack_submodule("nodes.glue.model_patch").apply_model(model, ckpt, embeds, **kwargs)


def _attn2_patches(model):
    return model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})




def test_every_cross_attention_block_is_patched_once_per_forward(comfy, unet_pair, ckpt, embeds, monkeypatch):
    _, model = unet_pair
    patched = _apply(comfy, model, ckpt, embeds)
    keys = sorted(_attn2_patches(patched))
    assert len(keys) == 16 and ("middle", 0, 0) in keys
    assert _attn2_patches(model) == {}, "the input model must stay unpatched"

    patch_mod = comfy.pack_submodule("nodes.glue.model_patch")
    calls = []
    original = patch_mod.id_attention_delta
    monkeypatch.setattr(patch_mod, "id_attention_delta", lambda q, o, key, *a: calls.append(key) or original(q, o, key, *a))
    unet_forward(patched, torch.randn(2, 4, 8, 8), torch.tensor([500, 500]), torch.randn(2, 77, 768), [0, 1])
    assert sorted(calls) == keys


def test_patched_comfy_unet_equals_diffusers_with_the_core_processors(comfy, unet_pair, ckpt, embeds):
    from training.attention_processors import install_processors

    unet, model = unet_pair
    patched = _apply(comfy, model, ckpt, embeds)
    gen = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 768, generator=gen)
    t = torch.tensor([400, 400])
    ours = unet_forward(patched, x, t, text, cond_or_uncond=[0, 1])

    with torch.no_grad():
        proj = ckpt.image_proj
        id_cond = proj(embeds.id_embeds, embeds.clip_embeds)
        id_uncond = proj(torch.zeros(1, 512), embeds.uncond_clip_embeds)
        reference = copy.deepcopy(unet)
        install_processors(reference, adapter_state=ckpt.adapter_state_dict())
        context = torch.cat([text, torch.cat([id_cond, id_uncond])], dim=1)
        expected = reference(x, t, encoder_hidden_states=context).sample
        plain = unet(x, t, encoder_hidden_states=text).sample
    rel = ((ours - expected).abs().max() / expected.abs().max()).item()
    assert rel < 1e-3, rel
    assert ((ours - plain).abs().max() / plain.abs().max()).item() > 1e-2  # the patch really changes the output


def test_sigma_window_and_weight(comfy, unet_pair, ckpt, embeds):
    _, model = unet_pair
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([300, 300]), torch.randn(2, 77, 768)
    lora_only = unet_forward(_apply(comfy, model, ckpt, embeds, weight=0.0), x, t, text, [0, 1])
    late = _apply(comfy, model, ckpt, embeds, start_at=0.5, end_at=1.0)
    sigma_early = torch.tensor([14.0, 14.0])  # before start_at: only the LoRA acts
    assert_close(unet_forward(late, x, t, text, [0, 1], sigma_early), lora_only, SAME_MATH_FP32)
    sigma_late = torch.tensor([0.5, 0.5])
    assert_differs(unet_forward(late, x, t, text, [0, 1], sigma_late), lora_only, 1e-4)


def test_existing_patches_are_wrapped_and_ipadapter_add_stays_on_its_clone(comfy, unet_pair, ckpt, embeds):
    _, model = unet_pair
    base = model.clone()
    seen = []

    def foreign(q, k, v, extra_options):
        seen.append(1)
        import comfy.ldm.modules.attention as attention

        return attention.optimized_attention(q, k, v, extra_options["n_heads"])

    base.set_model_attn2_replace(foreign, "middle", 0, 0)
    patched = _apply(comfy, base, ckpt, embeds)
    assert _attn2_patches(patched)[("middle", 0, 0)].previous is not None
    assert _attn2_patches(base)[("middle", 0, 0)] is foreign, "the upstream patch object is not replaced or mutated"
    unet_forward(patched, torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), torch.randn(2, 77, 768), [0, 1])
    assert seen == [1]

    # an IPAdapter node applied after ours clones the model and calls .add() on the object it finds
    after = patched.clone()
    target = _attn2_patches(after)[("input", 1, 0)]
    target.add(lambda out, q, k, v, extra_options, **kw: torch.zeros_like(out), weight=1.0)
    assert len(target.callbacks) == 1
    assert _attn2_patches(patched)[("input", 1, 0)].callbacks == ()
    assert target.projections is _attn2_patches(patched)[("input", 1, 0)].projections, "heavy tensors are shared"


def test_reexecution_with_another_weight_never_accumulates(comfy, unet_pair, ckpt, embeds):
    _, model = unet_pair
    before = dict(model.patches)
    for weight in (1.0, 0.5, 0.8):
        patched = _apply(comfy, model, ckpt, embeds, weight=weight)
        patches = _attn2_patches(patched)
        assert len(patches) == 16 and all(p.previous is None for p in patches.values())
        assert {p.settings.weight for p in patches.values()} == {weight}
        assert len(patched.patches) == 128 and all(len(v) == 1 for v in patched.patches.values())
    assert model.patches == before and _attn2_patches(model) == {}


def test_patch_follows_device_and_dtype_moves(comfy, unet_pair, ckpt, embeds):
    _, model = unet_pair
    patched = _apply(comfy, model, ckpt, embeds)
    patched.model_patches_to(torch.device("cpu"))
    patched.model_patches_to(torch.float16)
    patch = _attn2_patches(patched)[("input", 1, 0)]
    q = torch.randn(2, 64, 320, dtype=torch.float16)
    k, v = patch.projections.for_rows(patch.key, [(0, 0), (1, 0)], q.device, q.dtype)
    assert k.dtype == torch.float16 and k.shape == (2, 4, 320)


def test_architecture_and_range_errors(comfy, unet_pair, ckpt, embeds, clip):
    errors = comfy.pack_submodule("consistentid_core.errors")
    _, model = unet_pair
    sdxl_embeds = random_embeds(comfy, arch="sdxl")
    with pytest.raises(errors.ArchitectureMismatchError, match="made for SDXL but ConsistentID-v1.bin is SD1.5"):
        _apply(comfy, model, ckpt, sdxl_embeds)

    class FakeSDXL:
        class model:
            class model_config:
                unet_config = {"context_dim": 2048}

    with pytest.raises(errors.ArchitectureMismatchError, match="ConsistentID-v1.bin is a ConsistentID file for SD1.5, but the model is SDXL"):
        _apply(comfy, FakeSDXL(), ckpt, embeds)
    with pytest.raises(errors.PromptError, match="start_at"):
        _apply(comfy, model, ckpt, embeds, start_at=0.8, end_at=0.2)
    cond = comfy.pack_submodule("nodes.glue.text_encoding")
    with pytest.raises(errors.PromptError, match="merge_at must be between 0 and 1"):
        cond.consistentid_conditioning(clip, ckpt, embeds, "a man", "", merge_at=1.5)
    sampler = comfy.pack_submodule("nodes.sampler")
    with pytest.raises(errors.PromptError, match="merge_step must be between 0 and 3 for 4 steps, got 4"):
        sampler.merge_at_for(model, "normal", 4, 4)


def test_latent_batch_larger_than_the_embeds_batch(comfy, unet_pair, ckpt):
    errors = comfy.pack_submodule("consistentid_core.errors")
    _, model = unet_pair
    two = random_embeds(comfy, n=2)
    patched = _apply(comfy, model, ckpt, two)
    unet_forward(patched, torch.randn(4, 4, 8, 8), torch.tensor([10] * 4), torch.randn(4, 77, 768), [0, 1])  # 2 images: fine
    with pytest.raises(errors.PromptError, match="latent batch has 3 images but the ConsistentID embeds hold 2"):
        unet_forward(patched, torch.randn(6, 4, 8, 8), torch.tensor([10] * 6), torch.randn(6, 77, 768), [0, 1])


def test_conditioning_entries_and_the_negative(comfy, ckpt, embeds, clip, caplog):
    cond = comfy.pack_submodule("nodes.glue.text_encoding")
    long_negative = ", ".join(["ugly"] * 100)
    with caplog.at_level(logging.WARNING, logger="consistentid"):
        positive, negative = cond.consistentid_conditioning(clip, ckpt, embeds, "A man, in a forest", long_negative,
                                                            merge_at=0.62)
    assert [e[1]["consistentid_phase"] for e in positive] == ["text", "facial"]
    assert positive[0][1]["end_percent"] == positive[1][1]["start_percent"] == 0.62
    assert positive[0][0].shape == positive[1][0].shape == negative[0][0].shape == (1, 77, 768)
    assert "negative prompt" in caplog.text and "77" in caplog.text
    diff_rows = (positive[0][0] - positive[1][0]).abs().sum(-1)[0].nonzero().flatten().tolist()
    assert len(diff_rows) == 5  # only the facial tokens differ between the two phases


def test_merge_switch_happens_after_the_merge_step(comfy, unet_pair, ckpt, embeds, clip):
    import comfy.samplers as samplers

    sampler = comfy.pack_submodule("nodes.sampler")
    cond_mod = comfy.pack_submodule("nodes.glue.text_encoding")
    _, model = unet_pair
    patched = _apply(comfy, model, ckpt, embeds)
    positive, negative = cond_mod.consistentid_conditioning(clip, ckpt, embeds, "A man", "", merge_at=0.5)
    facial = positive[1][0]
    used = []

    def spy(apply_model, args):
        c = args["c"]["c_crossattn"]
        rows = args["cond_or_uncond"]
        for i, kind in enumerate(rows):
            if kind == 0:
                chunk = c[i * (c.shape[0] // len(rows))]
                used.append("facial" if torch.allclose(chunk, facial[0]) else "text")
        return apply_model(args["input"], args["timestep"], **args["c"])

    spied = patched.clone()
    spied.set_model_unet_function_wrapper(spy)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    node = comfy.node_class("ConsistentIDKSampler")
    node.execute(spied, 1, 6, 5.0, "euler", "normal", positive, negative, latent, 2, 1.0)
    assert used == ["text"] * 3 + ["facial"] * 3
    assert sampler.merge_at_for(model, "normal", 6, 2) == pytest.approx(
        sampler.merge_at_for(model, "normal", 6, 2, 1.0, "euler"))
    assert samplers  # imported for the side effect of resolving ComfyUI's module first


def test_an_interrupt_during_sampling_leaves_nothing_patched(comfy, unet_pair, ckpt, embeds, clip):
    import comfy.model_management as mm

    _, model = unet_pair
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([300, 300]), torch.randn(2, 77, 768)
    baseline = unet_forward(model, x, t, text, [0, 1])
    patched = _apply(comfy, model, ckpt, embeds)
    positive, negative = comfy.pack_submodule("nodes.glue.text_encoding").consistentid_conditioning(clip, ckpt, embeds, "A man", "")
    calls = []

    def cancel_on_second_step(apply_model, args):
        calls.append(1)
        if len(calls) == 2:
            raise mm.InterruptProcessingException()  # what ComfyUI raises when the user presses cancel
        return apply_model(args["input"], args["timestep"], **args["c"])

    interrupted = patched.clone()
    interrupted.set_model_unet_function_wrapper(cancel_on_second_step)
    with pytest.raises(mm.InterruptProcessingException):
        comfy.node_class("ConsistentIDKSampler").execute(interrupted, 1, 4, 5.0, "euler", "normal", positive, negative,
                                                         {"samples": torch.zeros(1, 4, 8, 8)}, 1, 1.0)
    assert len(calls) == 2
    assert _attn2_patches(model) == {} and model.patches == {}
    assert_close(unet_forward(model, x, t, text, [0, 1]), baseline, SAME_MATH_FP32, "weights were left patched")


def test_a_reexecution_reuses_the_projections_and_the_lora_patches(comfy, unet_pair, ckpt, embeds):
    _, model = unet_pair
    first = _apply(comfy, model, ckpt, embeds, weight=1.0)
    again = _apply(comfy, model, ckpt, embeds, weight=0.4, start_at=0.2)
    block = ("input", 1, 0)
    assert _attn2_patches(again)[block].projections is _attn2_patches(first)[block].projections
    key = next(iter(first.patches))
    assert again.patches[key][0][1] is first.patches[key][0][1], "the LoRA adapters were built again"
    assert again.patches[key][0][0] == 1.0 and _attn2_patches(again)[block].settings.weight == 0.4

    other = random_embeds(comfy, seed=11)
    fresh = _apply(comfy, model, ckpt, other)
    assert _attn2_patches(fresh)[block].projections is not _attn2_patches(first)[block].projections
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([300, 300]), torch.randn(2, 77, 768)
    assert_differs(unet_forward(fresh, x, t, text, [0, 1]), unet_forward(first, x, t, text, [0, 1]), 1e-4)


def test_a_device_move_touches_each_block_once(comfy, unet_pair, ckpt, embeds, monkeypatch):
    _, model = unet_pair
    patched = _apply(comfy, model, ckpt, embeds)
    projections = _attn2_patches(patched)[("input", 1, 0)].projections
    moved = []
    original = type(projections)._on
    monkeypatch.setattr(type(projections), "_on", lambda self, key, *a: moved.append(key) or original(self, key, *a))
    patched.model_patches_to(torch.device("cpu"))
    patched.model_patches_to(torch.bfloat16)
    assert sorted(moved) == sorted(list(_attn2_patches(patched)) * 2)  # 16 blocks x 2 moves, not 16 x 16 x 2
    patch = _attn2_patches(patched)[("input", 1, 0)]
    assert patch.placement == (torch.device("cpu"), torch.bfloat16)
    assert any(k[0] == ("input", 1, 0) and k[2] == torch.bfloat16 for k in projections._moved)


def test_a_bf16_patched_unet_equals_the_fp32_one_within_bf16_rounding(comfy, unet_pair, ckpt, embeds):
    """The closest CPU proxy for a GPU run in half precision: weights stored in bf16, and the
    patch moved to the model's dtype by ComfyUI's own load (``model_patches_to``)."""
    from numeric import BF16

    comfy_sd = importlib.import_module("comfy.sd")  # a plain import would shadow the ``comfy`` fixture

    unet, fp32_model = unet_pair
    state = {k: v.detach().to(torch.bfloat16) for k, v in unet.state_dict().items()}
    bf16_model = comfy_sd.load_diffusion_model_state_dict(state, model_options={"dtype": torch.bfloat16})
    assert bf16_model.model_dtype() == torch.bfloat16
    gen = torch.Generator().manual_seed(21)
    x, text = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 768, generator=gen)
    t = torch.tensor([400, 400])

    patched32, patched16 = _apply(comfy, fp32_model, ckpt, embeds), _apply(comfy, bf16_model, ckpt, embeds)
    full = unet_forward(patched32, x, t, text, [0, 1])
    half = unet_forward(patched16, x, t, text, [0, 1])
    # load_models_gpu moved every block's patch to the model's dtype, and its ID keys/values with it
    block = ("input", 1, 0)
    patch = _attn2_patches(patched16)[block]
    assert patch.placement[1] == torch.bfloat16
    moved = [where for where in patch.projections._moved if where[0] == block]
    assert (block, "cpu", torch.bfloat16) in moved
    assert torch.isfinite(half).all()
    assert_close(half.float(), full, BF16, "bf16 vs fp32 patched UNet")
    # and the patch acts in bf16 as in fp32: the change it makes is the same change
    plain16 = unet_forward(bf16_model, x, t, text, [0, 1])
    plain32 = unet_forward(fp32_model, x, t, text, [0, 1])
    assert_differs(full, plain32, 1e-2)
    assert_close((half - plain16).float(), full - plain32, 0.1, "the patch's own term in bf16")
    # moving the patched model back to fp32 moves the patch back too
    patch.to(torch.float32)
    assert patch.placement[1] == torch.float32
