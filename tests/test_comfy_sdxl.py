"""SDXL inside a real ComfyUI, without the memory of a full SDXL: keys on a meta-device model,
a forward of a small UNet with SDXL's block structure, and conditioning with random CLIP-L + bigG.
"""

import pytest
import torch

from comfy_harness import comfy_session, comfyui_path_or_skip
from numeric import SAME_MATH_FP32, assert_close

pytestmark = pytest.mark.comfyui

SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    comfyui_path_or_skip()
    return comfy_session(tmp_path_factory.mktemp("comfyui"))


def test_every_sdxl_layer_of_the_table_exists_in_comfyui_and_takes_its_lora(session):
    import comfy.lora
    import comfy.model_detection

    layers = session.pack_submodule("consistentid_core.model.layers")
    config = comfy.model_detection.model_config_from_unet_config(dict(SDXL_UNET))
    with torch.device("meta"):
        model = config.get_model({}, device="meta")
    unet = model.diffusion_model
    blocks = {"input": unet.input_blocks, "output": unet.output_blocks}
    for row in layers.cross_attention_layers("sdxl"):
        name, number, index = row.comfy_block
        stack = unet.middle_block[1] if name == "middle" else blocks[name][number][1]
        assert index < len(stack.transformer_blocks), row
        assert stack.transformer_blocks[index].attn2.to_k.weight.shape == (row.hidden_size, 2048)
    key_map = comfy.lora.model_lora_keys_unet(model, {})

    class FakeCkpt:
        arch = "sdxl"
        adapter = {row.index: {f"{lora}.{part}.weight": torch.zeros(1, 1) for lora, _ in layers.LORA_TARGETS
                               for part in ("down", "up")} for row in layers.layer_table("sdxl")}

    patches = comfy.lora.load_lora(session.pack_submodule("consistentid_core.model.adapter").adapter_lora_state(FakeCkpt), key_map, log_missing=False)
    assert len(patches) == 4 * 140


def test_a_forward_with_sdxl_block_structure_calls_each_of_the_70_patches_once(session, monkeypatch):
    import comfy.model_patcher
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    layers = session.pack_submodule("consistentid_core.model.layers")
    idattn = session.pack_submodule("consistentid_core.model.id_attention")
    patch = session.pack_submodule("nodes.glue.model_patch")
    small = dict(SDXL_UNET, model_channels=32, num_head_channels=8, context_dim=32, adm_in_channels=8)
    for key in ("use_temporal_attention", "use_temporal_resblock"):
        small.pop(key)
    torch.manual_seed(0)
    unet = UNetModel(**small, dtype=torch.float32, operations=comfy.ops.manual_cast)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.02)
    patcher = comfy.model_patcher.ModelPatcher(unet, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    # channels 32 x (1, 2, 4): the cross-attention widths per block, as in SDXL (640/1280) scaled down
    widths = {"input": {4: 64, 5: 64, 7: 128, 8: 128}, "output": {0: 128, 1: 128, 2: 128, 3: 64, 4: 64, 5: 64},
              "middle": {0: 128}}
    hidden = {row.comfy_block: widths[row.comfy_block[0]][row.comfy_block[1]] for row in layers.cross_attention_layers("sdxl")}
    to_k = {key: torch.randn(h, 32) for key, h in hidden.items()}
    projections = idattn.IDProjections.build(to_k, to_k, torch.randn(1, 4, 32), torch.randn(1, 4, 32))

    class FakeCkpt:
        arch = "sdxl"

    assert patch.install_attn2_patches(patcher, FakeCkpt, projections, idattn.IDPatchSettings()) == 70
    calls = []
    original = patch.id_attention_delta
    monkeypatch.setattr(patch, "id_attention_delta", lambda q, o, key, *a: calls.append(key) or original(q, o, key, *a))
    options = dict(patcher.model_options["transformer_options"], cond_or_uncond=[0, 1])
    with torch.no_grad():
        out = unet(torch.randn(2, 4, 16, 16), timesteps=torch.tensor([10, 10]), context=torch.randn(2, 77, 32),
                   y=torch.randn(2, 8), transformer_options=options)
    assert out.shape == (2, 4, 16, 16)
    assert len(calls) == 70 and len(set(calls)) == 70


def test_sdxl_conditioning_with_both_text_encoders(session):
    import comfy.sd
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, hidden_act="quick_gelu"))
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                        num_attention_heads=20, projection_dim=1280, hidden_act="gelu"))
    clip = comfy.sd.load_text_encoder_state_dicts([clip_l.state_dict(), clip_g.state_dict()],
                                                  clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    ckpt_mod = session.pack_submodule("consistentid_core.model.checkpoint")
    models = session.pack_submodule("consistentid_core.model.networks")
    ckpt = ckpt_mod.ConsistentIDCheckpoint("sdxl", models.build_facial_encoder("sdxl").eval(),
                                           models.build_image_proj("sdxl").eval(), {}, path="ConsistentID_SDXL-v1.bin")
    from comfy_sd15 import random_embeds

    embeds = random_embeds(session, arch="sdxl")
    embeds.checkpoint = "ConsistentID_SDXL-v1.bin"
    cond = session.pack_submodule("nodes.glue.text_encoding")
    text = session.pack_submodule("consistentid_core.prompt.text")
    positive, negative = cond.consistentid_conditioning(clip, ckpt, embeds, "A woman wearing a santa hat", "open mouth",
                                                        caption=text.CAPTION_SDXL, merge_at=0.6)
    (text_only, info_t), (facial, info_f) = positive
    assert text_only.shape == facial.shape == negative[0][0].shape == (1, 77, 2048)
    assert info_t["pooled_output"].shape == info_f["pooled_output"].shape == (1, 1280)
    assert negative[0][1]["pooled_output"].shape == (1, 1280)
    # the text-only phase is the raw prompt, encoded as ComfyUI would with plain ids
    first, second = cond.clip_tokenizers(clip)
    raw = {"l": [[(i, 1.0) for i in text.plain_ids("A woman wearing a santa hat", first)]],
           "g": [[(i, 1.0) for i in text.plain_ids("A woman wearing a santa hat", second, (text.IMAGE_MARKER,))]]}
    expected, pooled = clip.encode_from_tokens(raw, return_pooled=True)
    assert_close(text_only, expected, SAME_MATH_FP32)
    assert_close(info_t["pooled_output"], pooled, SAME_MATH_FP32)
    assert second.pad_token_id == 0 and first.pad_token_id == 49407
