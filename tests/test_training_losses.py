"""The localisation loss: balanced L1 numbers, and cross-attention maps recorded from a diffusers UNet."""

import pytest
import torch

from training.attention_processors import ConsistentIDIPAttnProcessor, install_processors
from consistentid_core.model.layers import SD15_LAYOUT, SDXL_LAYOUT, UNetLayout
from training.losses import AttentionRecorder, balanced_l1, default_blocks, localisation_loss, noise_loss, token_maps
from training_standins import UNET, one_cpu_thread  # noqa: F401
from numeric import DEEP_NET_FP32, assert_close

diffusers = pytest.importorskip("diffusers")


def test_balanced_l1_is_minus_one_on_the_mask_and_zero_when_uniform():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:5, 3:6] = 1
    on_mask = mask[:, None].clone() * 0.3  # any scale: each map is divided by its maximum
    uniform = torch.full((1, 1, 1, 8, 8), 0.02)
    outside = (1 - mask)[:, None]
    valid = torch.ones(1, 1, dtype=torch.bool)
    assert balanced_l1(on_mask, mask, valid).item() == pytest.approx(-1.0, abs=1e-4)
    assert balanced_l1(uniform, mask, valid).item() == pytest.approx(0.0, abs=1e-4)
    assert balanced_l1(outside, mask, valid).item() == pytest.approx(1.0, abs=1e-4)


def test_balanced_l1_averages_valid_tokens_only_then_heads_and_batch():
    mask = torch.zeros(2, 2, 4, 4)
    mask[:, 0, :2] = 1
    mask[:, 1, 2:] = 1
    maps = torch.stack([mask, 1 - mask], dim=1)  # head 0 on the regions (-1), head 1 off them (+1)
    valid = torch.tensor([[True, False], [True, True]])
    assert balanced_l1(maps, mask, valid).item() == pytest.approx(0.0, abs=1e-4)
    maps[:, 1] = mask  # both heads right: -1 whatever the valid mask
    assert balanced_l1(maps, mask, valid).item() == pytest.approx(-1.0, abs=1e-4)
    # A token without a region is ignored: garbage in slot 1 of sample 0 changes nothing.
    maps[0, :, 1] = 1 - mask[0, 1]
    assert balanced_l1(maps, mask, valid).item() == pytest.approx(-1.0, abs=1e-4)


def test_token_maps_gather_the_token_columns_as_images():
    probs = torch.zeros(1, 2, 16, 77)
    probs[0, :, 5, 12] = 1.0  # pixel (1, 1) of a 4x4 map attends to token 12
    maps = token_maps(probs, torch.tensor([[12, 3]]), latent_hw=(8, 8))
    assert maps.shape == (1, 2, 2, 4, 4)
    assert maps[0, 0, 0, 1, 1] == 1.0 and maps[0, 0, 0].sum() == 1.0 and maps[0, 0, 1].sum() == 0.0


def test_noise_loss_masks_both_sides():
    pred, target = torch.ones(1, 4, 4, 4), torch.zeros(1, 4, 4, 4)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :] = 1
    assert noise_loss(pred, target).item() == pytest.approx(1.0)
    assert noise_loss(pred, target, mask).item() == pytest.approx(0.5)


def test_default_blocks_are_the_official_middle_ones():
    assert default_blocks("sd15", SD15_LAYOUT) == ("down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.1", "up_blocks.2")
    assert default_blocks("sdxl", SDXL_LAYOUT) == ("down_blocks.2", "mid_block", "up_blocks.1")
    tiny = UNetLayout((32, 64, 64), (True, True, False), (1, 1, 1), 64, layers_per_block=1)
    assert default_blocks("custom", tiny) == ("down_blocks.1", "mid_block", "up_blocks.1")


def _tiny_unet(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET).eval().requires_grad_(False)
    adapter = install_processors(unet)
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            if name.endswith("up.weight"):
                param.normal_(0, 0.02)
    return unet, adapter


def _inputs(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([10, 700]), torch.randn(2, 81, 64, generator=gen)


def test_recorded_maps_are_cross_attention_over_the_77_text_tokens():
    unet, _ = _tiny_unet()
    layout = UNetLayout.from_diffusers_config(unet.config)
    latents, t, context = _inputs()
    with torch.no_grad():
        plain = unet(latents, t, encoder_hidden_states=context).sample
        recorder = AttentionRecorder(unet, layout, default_blocks("custom", layout))
        unet(latents, t, encoder_hidden_states=context)
        assert recorder.maps == {}  # hooked, but nothing is kept outside recording()
        with recorder.recording() as maps:
            recorded = unet(latents, t, encoder_hidden_states=context).sample
    # Recording switches to an explicit softmax; the output stays the fused-attention output.
    assert_close(plain, recorded, DEEP_NET_FP32)
    assert set(maps) == {"down_blocks.1.attentions.0.transformer_blocks.0.attn2",
                         "mid_block.attentions.0.transformer_blocks.0.attn2",
                         "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
                         "up_blocks.1.attentions.1.transformer_blocks.0.attn2"}
    heads = UNET["attention_head_dim"]
    for name, probs in maps.items():
        pixels = 16 if name.startswith("mid") else 64  # 4x4 and 8x8 of the 16x16 latent
        assert probs.shape == (2, heads, pixels, 77), name  # keys: the text tokens, not the pixels
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
    assert all(isinstance(p, ConsistentIDIPAttnProcessor) for p in recorder.layers.values())
    recorder.remove()
    assert all(p.attention_recorder is None for p in recorder.layers.values())


def test_localisation_gradient_survives_gradient_checkpointing():
    grads = []
    for checkpointing in (False, True):
        unet, adapter = _tiny_unet()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        layout = UNetLayout.from_diffusers_config(unet.config)
        recorder = AttentionRecorder(unet, layout, default_blocks("custom", layout))
        latents, t, context = _inputs()
        context.requires_grad_(True)
        adapter.requires_grad_(True)
        masks = torch.zeros(2, 5, 64, 64)
        masks[:, 0, 16:48, 16:48] = 1
        valid = torch.tensor([[True] + [False] * 4] * 2)
        with recorder.recording() as maps:
            unet(latents, t, encoder_hidden_states=context)
        loss = localisation_loss(maps, torch.full((2, 5), 7), masks, valid, (16, 16))
        loss.backward()
        assert len(maps) == 4  # recomputation in backward did not add or replace maps
        grads.append((context.grad.clone(), adapter[1].to_q_lora.up.weight.grad.clone()))
    assert grads[0][0][:, 7].abs().sum() > 0 and grads[0][1].abs().sum() > 0
    for a, b in zip(*grads):
        assert_close(a, b, DEEP_NET_FP32)
