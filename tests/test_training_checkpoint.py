"""Checkpoints of UNets other than SD1.5/SDXL: the layout travels in the safetensors metadata."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from training.attention_processors import build_processors
from consistentid_core.model.checkpoint import (
    CheckpointError,
    ConsistentIDCheckpoint,
    checkpoint_state_dict,
    load_checkpoint,
    save_checkpoint,
)
from consistentid_core.model.layers import UNetLayout, layer_table
from consistentid_core.model.networks import FacialEncoder, ProjPlusModel
from training_standins import one_cpu_thread  # noqa: F401

TINY = UNetLayout((32, 64, 64), (True, True, False), (1, 1, 1), 64, layers_per_block=1)


@pytest.fixture(scope="module")
def tiny_checkpoint():
    torch.manual_seed(3)
    adapter = torch.nn.ModuleList(build_processors(TINY).values())
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            if name.endswith("up.weight"):
                param.normal_(0, 0.01)
    tensors = {i: dict(proc.state_dict()) for i, proc in enumerate(adapter)}
    facial = FacialEncoder(embedding_dim=1280, output_dim=64, embed_dim=64)
    return ConsistentIDCheckpoint("custom", facial, ProjPlusModel(cross_attention_dim=64), tensors, layout=TINY)


def test_custom_layout_round_trip(tiny_checkpoint, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(tiny_checkpoint, path, metadata={"trained_steps": 20})
    with safe_open(str(path), framework="pt") as f:
        stored = json.loads(f.metadata()["unet_layout"])
    assert stored["cross_attention_dim"] == 64 and stored["block_out_channels"] == [32, 64, 64]

    again = load_checkpoint(path)
    assert again.arch == "custom"
    assert again.layout == TINY
    assert again.num_processors == len(layer_table(TINY)) == 14
    assert again.image_proj.cross_attention_dim == 64
    assert again.facial_encoder.embed_dim == 64
    assert again.adapter[1]["to_k_ip.weight"].shape == (32, 64)
    assert again.metadata["trained_steps"] == "20"
    before, after = checkpoint_state_dict(tiny_checkpoint), checkpoint_state_dict(again)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_custom_file_without_layout_metadata_is_refused(tiny_checkpoint, tmp_path):
    path = tmp_path / "no_layout.safetensors"
    save_file({k: v.contiguous() for k, v in checkpoint_state_dict(tiny_checkpoint).items()}, str(path))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "no_layout.safetensors" in message and "width 64" in message and "unet_layout" in message


def test_layout_metadata_that_contradicts_the_weights_is_refused(tiny_checkpoint, tmp_path):
    path = tmp_path / "lying.safetensors"
    wrong = json.dumps({**json.loads(json.dumps(TINY.__dict__, default=list)), "cross_attention_dim": 128})
    tensors = {k: v.contiguous() for k, v in checkpoint_state_dict(tiny_checkpoint).items()}
    save_file(tensors, str(path), metadata={"unet_layout": wrong})
    with pytest.raises(CheckpointError, match="says cross-attention width 128 but the weights are 64 wide"):
        load_checkpoint(path)


def test_custom_width_must_suit_the_id_projection(tmp_path):
    odd = UNetLayout((32, 64, 64), (True, True, False), (1, 1, 1), 96, layers_per_block=1)
    adapter = {i: dict(p.state_dict()) for i, p in enumerate(build_processors(odd).values())}
    proj = ProjPlusModel(cross_attention_dim=128)
    state = {"FacialEncoder.fuse_module.layer_norm.weight": torch.ones(96), "image_proj.norm.weight": torch.ones(96)}
    state.update({f"adapter_modules.{i}.{k}": v for i, t in adapter.items() for k, v in t.items()})
    state.update({f"image_proj.{k}": v for k, v in proj.state_dict().items() if k != "norm.weight"})
    path = tmp_path / "odd.safetensors"
    save_file(state, str(path), metadata={"unet_layout": json.dumps(odd.__dict__, default=list)})
    with pytest.raises(CheckpointError, match="96 is not a multiple of 64"):
        load_checkpoint(path)


def test_a_custom_checkpoint_object_needs_its_layout(tiny_checkpoint):
    with pytest.raises(CheckpointError, match="needs the UNet layout"):
        ConsistentIDCheckpoint("custom", tiny_checkpoint.facial_encoder, tiny_checkpoint.image_proj, {})
