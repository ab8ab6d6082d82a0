"""Adapter layer table, LoRA fold, and the diffusers processors against the spec's formulas."""

import pytest
import torch

import official_reference as ref
from numeric import SAME_MATH_FP32, assert_close, assert_differs
from training.attention_processors import (
    ConsistentIDAttnProcessor,
    ConsistentIDIPAttnProcessor,
    fold_lora,
    install_processors,
)
from consistentid_core.model.layers import UNetLayout, cross_attention_layers, layer_table
from spec_keys import read_layout

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import Attention  # noqa: E402


@pytest.mark.parametrize("arch,count", [("sd15", 32), ("sdxl", 140)])
def test_layer_table_matches_the_official_index_order(arch, count):
    parts, names = read_layout(arch)
    table = layer_table(arch)
    assert len(table) == count
    assert [row.diffusers_name for row in table] == [names[i] for i in range(count)]
    adapter = parts["adapter_modules"]
    for row in table:
        assert adapter[f"{row.index}.to_q_lora.down.weight"] == (128, row.hidden_size)
        assert adapter[f"{row.index}.to_k_lora.down.weight"] == (128, row.context_dim)
        assert row.is_cross_attention == (f"{row.index}.to_k_ip.weight" in adapter) == (row.index % 2 == 1)


def test_sd15_comfy_keys_cover_every_cross_attention_block_once():
    keys = [row.comfy_block for row in cross_attention_layers("sd15")]
    assert len(keys) == len(set(keys)) == 16
    assert sorted(k[1] for k in keys if k[0] == "input") == [1, 2, 4, 5, 7, 8]
    assert sorted(k[1] for k in keys if k[0] == "output") == list(range(3, 12))
    assert [k for k in keys if k[0] == "middle"] == [("middle", 0, 0)]
    assert layer_table("sd15")[1].ldm_prefix == "input_blocks.1.1.transformer_blocks.0.attn2"
    assert layer_table("sd15")[31].ldm_prefix == "middle_block.1.transformer_blocks.0.attn2"
    assert layer_table("sd15")[31].hidden_size == 1280


def test_sdxl_comfy_keys_cover_70_cross_attention_layers():
    keys = [row.comfy_block for row in cross_attention_layers("sdxl")]
    assert len(keys) == len(set(keys)) == 70
    per_block = {}
    for name, block, _ in keys:
        per_block[(name, block)] = per_block.get((name, block), 0) + 1
    assert per_block == {
        ("input", 4): 2, ("input", 5): 2, ("input", 7): 10, ("input", 8): 10,
        ("output", 0): 10, ("output", 1): 10, ("output", 2): 10,
        ("output", 3): 2, ("output", 4): 2, ("output", 5): 2,
        ("middle", 0): 10,
    }
    row = layer_table("sdxl")[0]
    assert (row.diffusers_name, row.hidden_size, row.comfy_block) == (
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor", 640, ("input", 4, 0))
    assert layer_table("sdxl")[121].ldm_prefix == "middle_block.1.transformer_blocks.0.attn2"


def test_fold_lora_is_up_times_down():
    gen = torch.Generator().manual_seed(64)
    down, up = torch.randn(128, 320, generator=gen), torch.randn(640, 128, generator=gen)
    delta = fold_lora(down, up)
    assert delta.shape == (640, 320)
    x = torch.randn(3, 320, generator=gen)
    # the two sides sum in different orders: compare relative to the whole result (values in the hundreds)
    assert_close(x @ delta.T, (x @ down.T) @ up.T, SAME_MATH_FP32)
    assert_close(delta, up.double() @ down.double(), SAME_MATH_FP32)
    assert fold_lora(down.bfloat16(), up.bfloat16()).dtype == torch.bfloat16


def _random_lora(proc, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in proc.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return {k: v.clone() for k, v in proc.state_dict().items()}


def _attention(query_dim, cross_dim, heads=5, seed=0):
    torch.manual_seed(seed)
    attn = Attention(query_dim=query_dim, cross_attention_dim=cross_dim, heads=heads, dim_head=query_dim // heads, bias=False)
    return attn.eval()


@torch.no_grad()
def test_self_attention_processor_equals_unmerged_and_merged_formulas():
    attn = _attention(320, None)
    proc = ConsistentIDAttnProcessor(320)
    lora = _random_lora(proc, 1)
    attn.set_processor(proc)
    x = torch.randn(2, 64, 320)
    out = attn(x)
    weights = attn.state_dict()
    unmerged = ref.processor_unmerged(weights, lora, x, None, attn.heads)
    merged = ref.processor_merged(weights, lora, x, None, attn.heads)
    assert (out - unmerged).abs().max() / unmerged.abs().max() < 1e-5
    assert (out - merged).abs().max() / merged.abs().max() < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("scale", [1.0, 0.4])
def test_cross_attention_processor_equals_unmerged_and_merged_formulas(scale):
    attn = _attention(640, 768, heads=10)
    proc = ConsistentIDIPAttnProcessor(640, 768, scale=scale)
    lora = _random_lora(proc, 2)
    attn.set_processor(proc)
    x = torch.randn(2, 16, 640)
    text, ids = torch.randn(2, 77, 768), torch.randn(2, 4, 768)
    out = attn(x, encoder_hidden_states=torch.cat([text, ids], dim=1))
    weights = attn.state_dict()
    for formula in (ref.processor_unmerged, ref.processor_merged):
        expected = formula(weights, lora, x, text, attn.heads, ip_tokens=ids, scale=scale)
        assert (out - expected).abs().max() / expected.abs().max() < 1e-5


def test_cross_attention_processor_needs_the_id_tokens():
    attn = _attention(320, 768)
    attn.set_processor(ConsistentIDIPAttnProcessor(320, 768))
    with pytest.raises(ValueError, match="4 ID tokens"):
        attn(torch.randn(1, 16, 320))


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=48,
        attention_head_dim=8, norm_num_groups=8, transformer_layers_per_block=(2, 1),
    ).eval()


@torch.no_grad()
def test_install_processors_on_a_unet():
    unet = tiny_unet()
    layout = UNetLayout.from_diffusers_config(unet.config)
    table = layer_table(layout)
    # 2 down attentions x 2 transformer blocks + 3 up x 2 + mid x 1 (depth of the last block) -> x2 attn
    assert len(table) == (2 * 2 + 3 * 2 + 1) * 2
    sample, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    text = torch.randn(2, 77, 48)
    baseline = unet(sample, t, encoder_hidden_states=text).sample

    adapter = install_processors(unet, scale=0.0)
    keys = adapter.state_dict().keys()
    assert "1.to_k_ip.weight" in keys and "0.to_k_ip.weight" not in keys
    attn2 = dict(unet.named_modules())[table[1].diffusers_module]
    assert torch.equal(adapter[1].to_k_ip.weight, attn2.to_k.weight)
    ids = torch.randn(2, 4, 48)
    # fresh LoRA ups are zero and the ID scale is 0: the UNet output must not change
    same = unet(sample, t, encoder_hidden_states=torch.cat([text, ids], 1)).sample
    assert_close(same, baseline, SAME_MATH_FP32)

    for i, proc in enumerate(adapter):
        proc.scale = 1.0
        _random_lora(proc, 10 + i)
    state = {k: v.clone() for k, v in adapter.state_dict().items()}
    patched = unet(sample, t, encoder_hidden_states=torch.cat([text, ids], 1)).sample
    assert_differs(patched, baseline, 1e-3)

    other = tiny_unet()
    install_processors(other, adapter_state=state)
    again = other(sample, t, encoder_hidden_states=torch.cat([text, ids], 1)).sample
    assert_close(again, patched, SAME_MATH_FP32)


def test_install_refuses_a_wrong_adapter_state():
    unet = tiny_unet()
    state = {k: v for k, v in install_processors(tiny_unet()).state_dict().items()}
    state.pop("1.to_k_ip.weight")
    from consistentid_core.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"missing \['1.to_k_ip.weight'\]"):
        install_processors(unet, adapter_state=state)
