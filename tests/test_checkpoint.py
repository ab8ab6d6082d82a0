"""load_checkpoint / save_checkpoint: every accepted form, and every bad file named in the issue."""

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from consistentid_core.model import checkpoint as checkpoint_module
from consistentid_core.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from spec_keys import flatten, random_official_state


@pytest.fixture(scope="module")
def sd15_nested():
    return random_official_state("sd15", seed=7)  # image_proj in bf16, the rest fp32, like the release


@pytest.fixture(scope="module")
def sd15_bin(sd15_nested, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ConsistentID-v1.bin"
    torch.save(sd15_nested, path)
    return path


def _assert_weights_equal(ckpt, nested, proj_part="image_proj"):
    facial = ckpt.facial_encoder.state_dict()
    for key, value in nested["FacialEncoder"].items():
        assert torch.equal(facial[key], value.float()), key
    proj = ckpt.image_proj.state_dict()
    for key, value in nested[proj_part].items():
        assert torch.equal(proj[key], value.float()), key
    for key, value in nested["adapter_modules"].items():
        index, name = key.split(".", 1)
        assert torch.equal(ckpt.adapter[int(index)][name], value.float()), key


def test_official_nested_bin_loads(sd15_bin, sd15_nested):
    ckpt = load_checkpoint(sd15_bin)
    assert ckpt.arch == "sd15"
    assert ckpt.num_processors == 32
    assert len(ckpt.adapter[1]) == 10 and len(ckpt.adapter[0]) == 8
    assert ckpt.facial_encoder.visual_projection.latents.dtype == torch.float32
    assert ckpt.image_proj.norm.weight.dtype == torch.float32  # bf16 in the file, cast on load
    assert ckpt.metadata["source_format"] == "torch"
    _assert_weights_equal(ckpt, sd15_nested)


def test_image_proj_model_name_and_dtype_argument(sd15_nested, tmp_path):
    renamed = dict(sd15_nested)
    renamed["image_proj_model"] = renamed.pop("image_proj")
    path = tmp_path / "converted.bin"
    torch.save(renamed, path)
    ckpt = load_checkpoint(path, dtype=torch.float16)
    assert ckpt.image_proj.proj[0].weight.dtype == torch.float16
    assert ckpt.adapter[5]["to_k_ip.weight"].dtype == torch.float16


@pytest.mark.parametrize("proj_key", ["image_proj", "image_proj_model"])
def test_flat_training_checkpoint_with_unet_keys_loads(sd15_nested, tmp_path, proj_key):
    flat = flatten(sd15_nested, proj_key)
    flat["unet.conv_in.weight"] = torch.zeros(4)  # the accelerate checkpoint's frozen UNet is ignored
    path = tmp_path / "pytorch_model.bin"
    torch.save(flat, path)
    _assert_weights_equal(load_checkpoint(path), sd15_nested)


def test_flat_safetensors_loads(sd15_nested, tmp_path):
    path = tmp_path / "flat.safetensors"
    save_file({k: v.contiguous() for k, v in flatten(sd15_nested, "image_proj_model").items()}, str(path))
    ckpt = load_checkpoint(path)
    assert ckpt.metadata["source_format"] == "safetensors"
    _assert_weights_equal(ckpt, sd15_nested)


def test_save_then_load_is_exact(sd15_bin, tmp_path):
    ckpt = load_checkpoint(sd15_bin)
    out = tmp_path / "roundtrip.safetensors"
    save_checkpoint(ckpt, out, metadata={"trained_on": "unit test"})
    again = load_checkpoint(out)
    assert again.arch == "sd15"
    assert again.metadata["format"] == "consistentid" and again.metadata["format_version"] == "1"
    assert again.metadata["trained_on"] == "unit test"
    for a, b in ((ckpt.facial_encoder, again.facial_encoder), (ckpt.image_proj, again.image_proj)):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb)
    assert ckpt.adapter_state_dict().keys() == again.adapter_state_dict().keys()
    assert all(torch.equal(v, again.adapter_state_dict()[k]) for k, v in ckpt.adapter_state_dict().items())
    with pytest.raises(CheckpointError, match="roundtrip.bin: save_checkpoint writes .safetensors only"):
        save_checkpoint(ckpt, tmp_path / "roundtrip.bin")


@pytest.mark.slow
def test_sdxl_checkpoint_is_detected(tmp_path):
    nested = random_official_state("sdxl", proj_dtype=torch.bfloat16, fill=0.5)
    nested = {part: {k: v.to(torch.bfloat16) for k, v in state.items()} for part, state in nested.items()}
    path = tmp_path / "ConsistentID_SDXL-v1.bin"
    torch.save(nested, path)
    del nested
    ckpt = load_checkpoint(path, dtype=torch.bfloat16)
    assert ckpt.arch == "sdxl"
    assert ckpt.num_processors == 140
    assert ckpt.image_proj.cross_attention_dim == 2048
    assert ckpt.adapter[139]["to_v_ip.weight"].shape == (1280, 2048)


# ---- bad files -------------------------------------------------------------------------------


def _raises(path, *fragments):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert os.path.basename(str(path)) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_file(tmp_path):
    _raises(tmp_path / "nowhere.bin", "file not found")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")
    _raises(path, "empty")


def test_truncated_bin(sd15_bin, tmp_path):
    path = tmp_path / "truncated.bin"
    path.write_bytes(sd15_bin.read_bytes()[: 1 << 20])
    _raises(path, "truncated")


def test_truncated_safetensors(sd15_bin, tmp_path):
    full = tmp_path / "full.safetensors"
    save_checkpoint(load_checkpoint(sd15_bin), full)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(full.read_bytes()[: 1 << 20])
    _raises(path, "truncated or corrupt")


def test_not_a_checkpoint_at_all(tmp_path):
    path = tmp_path / "notes.bin"
    path.write_text("these are not weights\n" * 10)
    _raises(path, "not a weight file")


def test_a_plain_tensor_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    _raises(path, "not a ConsistentID checkpoint")


def test_checkpoint_of_another_model(tmp_path):
    ip_adapter = tmp_path / "ip-adapter-faceid-plus_sd15.bin"
    torch.save({"image_proj": {"norm.weight": torch.ones(768)}, "ip_adapter": {"1.to_k_ip.weight": torch.zeros(320, 768)}}, ip_adapter)
    _raises(ip_adapter, "IP-Adapter")
    sd = tmp_path / "v1-5-pruned.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, str(sd))
    _raises(sd, "Stable Diffusion model")


def test_missing_and_unexpected_keys_are_named(sd15_nested, tmp_path):
    broken = {part: dict(state) for part, state in sd15_nested.items()}
    del broken["FacialEncoder"]["visual_projection.latents"]
    path = tmp_path / "missing.bin"
    torch.save(broken, path)
    _raises(path, "FacialEncoder", "missing keys ['visual_projection.latents']")

    broken = {part: dict(state) for part, state in sd15_nested.items()}
    broken["image_proj"]["extra.weight"] = torch.zeros(1)
    path = tmp_path / "unexpected.bin"
    torch.save(broken, path)
    _raises(path, "image_proj", "unexpected keys ['extra.weight']")

    broken = {part: dict(state) for part, state in sd15_nested.items()}
    del broken["adapter_modules"]["3.to_v_ip.weight"]
    path = tmp_path / "adapter.bin"
    torch.save(broken, path)
    _raises(path, "adapter_modules", "3.to_v_ip.weight")

    broken = {part: dict(state) for part, state in sd15_nested.items() if part != "adapter_modules"}
    path = tmp_path / "noadapter.bin"
    torch.save(broken, path)
    _raises(path, "lacks its adapter_modules")


def test_shape_mismatch_is_named(sd15_nested, tmp_path):
    broken = {part: dict(state) for part, state in sd15_nested.items()}
    broken["adapter_modules"]["9.to_k_ip.weight"] = torch.zeros(1280, 1024)
    path = tmp_path / "shape.bin"
    torch.save(broken, path)
    _raises(path, "adapter_modules.9.to_k_ip.weight", "[1280, 1024]", "[1280, 768]")


def test_unknown_architecture(sd15_nested, tmp_path):
    broken = {part: dict(state) for part, state in sd15_nested.items()}
    broken["image_proj"]["norm.weight"] = torch.ones(1024)
    path = tmp_path / "sd21.bin"
    torch.save(broken, path)
    _raises(path, "unknown architecture", "1024")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_pickle_does_not_run_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump({"FacialEncoder": _Exploit(str(marker))}, f, protocol=2)
    _raises(path, "refused to load")
    assert not marker.exists()

    zipped = tmp_path / "evil_zip.bin"
    torch.save({"FacialEncoder": _Exploit(str(marker))}, zipped)
    _raises(zipped, "refused to load")
    assert not marker.exists()


# ---- crafted or damaged entries (issue 13): refused by name, before anything is built -----------


def _small_nested(**changes):
    """A nested file of the official form with one tensor per part: enough to reach the entry checks."""
    nested = {
        "FacialEncoder": {"fuse_module.layer_norm.weight": torch.ones(768)},
        "image_proj": {"norm.weight": torch.ones(768)},
        "adapter_modules": {"0.to_q_lora.down.weight": torch.zeros(128, 320)},
    }
    nested.update(changes)
    return nested


def test_a_folder_is_named_as_a_folder(tmp_path):
    folder = tmp_path / "ConsistentID"
    folder.mkdir()
    (folder / "ConsistentID-v1.bin").write_bytes(b"x")
    message = _raises(folder, "is a folder, not a weight file", "ConsistentID-v1.bin")
    assert "not found" not in message


def test_empty_adapter_modules_in_a_nested_file(tmp_path):
    path = tmp_path / "empty_adapter.bin"
    torch.save(_small_nested(adapter_modules={}), path)
    _raises(path, "'adapter_modules' entry is empty", "incomplete")
    torch.save(_small_nested(FacialEncoder={}), path)
    _raises(path, "'FacialEncoder' entry is empty")


def test_integer_adapter_keys_are_named(tmp_path):
    path = tmp_path / "int_keys.bin"
    torch.save(_small_nested(adapter_modules={0: torch.zeros(2), 1: torch.zeros(2)}), path)
    _raises(path, "adapter_modules has keys that are not names ([0, 1], int)")


@pytest.mark.parametrize("extra, named, kind", [
    ({"attribute_proj": {"queries": [1.0, 2.0]}}, "attribute_proj.queries", "list"),
    ({"attribute_scale": 0.5}, "attribute_scale", "float"),
    ({"attribute_proj": {"layers": {"0": torch.zeros(2)}}}, "attribute_proj.layers", "dict"),
])
def test_a_non_tensor_attribute_entry_is_named(tmp_path, extra, named, kind):
    path = tmp_path / "attribute.bin"
    torch.save(_small_nested(**extra), path)
    _raises(path, f"entries ['{named}'] are not tensors (the first is a {kind})")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_integer_or_bool_weights_are_refused_by_key(tmp_path, dtype):
    state = _small_nested()
    state["adapter_modules"]["0.to_q_lora.down.weight"] = torch.zeros(128, 320, dtype=dtype)
    path = tmp_path / "ints.bin"
    torch.save(state, path)
    _raises(path, f"adapter_modules.0.to_q_lora.down.weight holds {dtype} values", "floating point")


def test_nan_and_inf_weights_are_refused_with_key_and_count(tmp_path):
    norm = torch.ones(768)
    norm[[3, 5]] = float("nan")
    norm[7] = float("inf")
    bad_adapter = torch.zeros(128, 320)
    bad_adapter[0, 0] = -float("inf")
    flat = {"FacialEncoder.fuse_module.layer_norm.weight": torch.ones(768), "image_proj.norm.weight": norm,
            "adapter_modules.0.to_q_lora.down.weight": bad_adapter}
    path = tmp_path / "diverged.safetensors"
    save_file(flat, str(path))
    _raises(path, "image_proj.norm.weight holds 2 NaN and 1 Inf values (of 768)", "damaged")

    flat["image_proj.norm.weight"] = torch.ones(768, dtype=torch.bfloat16)
    save_file(flat, str(path))
    message = _raises(path, "adapter_modules.0.to_q_lora.down.weight holds 0 NaN and 1 Inf values (of 40960)")
    assert "more" not in message  # one damaged tensor, not "n more"

    flat["adapter_modules.1.to_q_lora.down.weight"] = torch.full((4,), float("nan"))
    save_file(flat, str(path))
    _raises(path, "and 1 more adapter_modules tensors are damaged too")


def test_nan_in_an_attribute_entry_is_refused(tmp_path):
    path = tmp_path / "attribute_nan.bin"
    torch.save(_small_nested(attribute_proj={"queries": torch.tensor([1.0, float("nan")])}), path)
    _raises(path, "attribute_proj.queries holds 1 NaN and 0 Inf values (of 2)")


def test_huge_finite_values_are_not_mistaken_for_damage(tmp_path):
    # Their float32 sum overflows; the element-wise recount must clear them, and the file then fails
    # only later, at the layout check, for lacking keys.
    state = _small_nested()
    state["FacialEncoder"]["fuse_module.layer_norm.weight"] = torch.full((768,), 3e38)
    path = tmp_path / "huge.bin"
    torch.save(state, path)
    message = _raises(path, "FacialEncoder does not match the ConsistentID layout")
    assert "NaN" not in message


def _crafted_layout_file(path, width: int, layout: dict) -> None:
    tensors = {"FacialEncoder.fuse_module.layer_norm.weight": torch.ones(width),
               "image_proj.norm.weight": torch.ones(width),
               "adapter_modules.0.to_q_lora.down.weight": torch.zeros(1)}
    save_file(tensors, str(path), metadata={"unet_layout": json.dumps(layout)})


SD15_BLOCKS = {"block_out_channels": [320, 640, 1280, 1280], "down_has_attention": [True, True, True, False],
               "transformer_depth": [1, 1, 1, 1], "layers_per_block": 2}


def test_crafted_layout_claiming_a_huge_width_is_refused_before_building(tmp_path, monkeypatch):
    path = tmp_path / "crafted.safetensors"
    _crafted_layout_file(path, 4096, {**SD15_BLOCKS, "cross_attention_dim": 4096})
    assert path.stat().st_size < 64 * 1024  # a few KB claiming modules of several GB

    built = []

    def recording(cls):
        def build(*args, **kwargs):
            module = cls(*args, **kwargs)
            built.append((cls.__name__, {p.device.type for p in module.parameters()}))
            return module
        return build

    monkeypatch.setattr(checkpoint_module, "FacialEncoder", recording(checkpoint_module.FacialEncoder))
    monkeypatch.setattr(checkpoint_module, "ProjPlusModel", recording(checkpoint_module.ProjPlusModel))
    _raises(path, "FacialEncoder does not match the ConsistentID layout", "missing keys")
    # The shapes were computed on the meta device, and no module was built for real.
    assert built == [("FacialEncoder", {"meta"}), ("ProjPlusModel", {"meta"})]


@pytest.mark.parametrize("change, fragment", [
    ({"cross_attention_dim": 100_000}, "cross-attention width 100000 (at most 8192)"),
    ({"transformer_depth": [1, 1, 1, 10**9]}, "transformer depths"),
    ({"block_out_channels": [320] * 50, "down_has_attention": [True] * 50, "transformer_depth": [1] * 50},
     "50 blocks"),
    ({"down_has_attention": [True, True]}, "4 block widths but 2 attention flags"),
    ({"layers_per_block": 10**6}, "layers_per_block 1000000"),
    ({"cross_attention_dim": 768.0}, "cross-attention width 768.0"),
    ({"block_out_channels": [320, 640, "x", 1280]}, "block widths"),
])
def test_implausible_layout_metadata_is_refused(tmp_path, change, fragment):
    path = tmp_path / "implausible.safetensors"
    layout = {**SD15_BLOCKS, "cross_attention_dim": 768, **change}
    width = layout["cross_attention_dim"] if isinstance(layout["cross_attention_dim"], int) else 768
    _crafted_layout_file(path, min(width, 8192), layout)
    _raises(path, "unet_layout metadata describes no plausible UNet", fragment)


def test_layout_metadata_that_is_not_an_object_is_refused(tmp_path):
    path = tmp_path / "list_layout.safetensors"
    save_file({"image_proj.norm.weight": torch.ones(768), "FacialEncoder.x": torch.ones(1),
               "adapter_modules.0.x": torch.ones(1)}, str(path), metadata={"unet_layout": "[1, 2]"})
    _raises(path, "unet_layout metadata is not a UNet layout", "a list, not an object")
