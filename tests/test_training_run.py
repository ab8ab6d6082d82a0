"""End-to-end training on tiny random models: 20 steps, exact resume, the saved file, the losses, bad settings."""

import glob
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from training.attention_processors import install_processors
from consistentid_core.model.checkpoint import load_checkpoint
from consistentid_core.errors import TrainingConfigError, TrainingDataError
from consistentid_core.model.layers import SD15_LAYOUT, UNetLayout
from training.base_models import check_architecture, load_base_models
from training.config import make_config
from training.train import TrainingRun, main
from training.trainer import step_generator
from training_standins import (  # noqa: F401
    CROSS_DIM,
    UNET,
    save_tiny_image_encoder,
    one_cpu_thread,
    save_tiny_sdxl_base_model,
    tiny_world,
)
from numeric import DEEP_NET_FP32, SAME_MATH_FP32, assert_close

diffusers = pytest.importorskip("diffusers")


def _run(world, output_dir, **settings):
    return TrainingRun(make_config(world.config(output_dir, **settings)))


@pytest.fixture(scope="module")
def trained(tiny_world, tmp_path_factory):
    """20 steps with checkpoints at 16 and 20, TensorBoard logging and a validation at the end."""
    out = tmp_path_factory.mktemp("run_a")
    run = _run(tiny_world, out, max_train_steps=20, checkpointing_steps=16, validation_steps=20, report_to="tensorboard")
    result = run.run()
    yield run, result, out
    shutil.rmtree(out, ignore_errors=True)  # about 4 GB of optimizer states and weights


def test_twenty_steps_train_log_and_save(trained):
    run, result, out = trained
    assert result.global_step == 20 and [h["step"] for h in result.history] == list(range(1, 21))
    assert all(math.isfinite(h[k]) for h in result.history for k in ("loss", "loss_noise", "loss_localisation"))
    for step in (16, 20):
        folder = out / "checkpoints" / f"checkpoint-{step}"
        state = json.loads((folder / "training_state.json").read_text())
        assert state["global_step"] == state["micro_step"] == step
        assert (folder / "optimizer.bin").is_file() and (folder / "consistentid.safetensors").is_file()
    assert result.adapter_path == str(out / "consistentid.safetensors")
    assert glob.glob(str(out / "logs" / "**" / "events.out.tfevents.*"), recursive=True)
    score = result.validation["val/localisation_score"]
    assert -1.0 <= score <= 1.0 and math.isfinite(result.validation["val/noise_mse"])
    assert len(run.val_entries) == 1 and len(run.train_entries) == 3


def test_resume_continues_exactly_from_the_saved_step(trained, tiny_world, tmp_path):
    _, first, out = trained
    resumed = _run(tiny_world, tmp_path, max_train_steps=20, checkpointing_steps=16, validation_steps=20,
                   resume_from_checkpoint=str(out / "checkpoints" / "checkpoint-16")).run()
    assert [h["step"] for h in resumed.history] == [17, 18, 19, 20]
    assert resumed.history == first.history[16:]
    a, b = load_file(first.adapter_path), load_file(resumed.adapter_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["adapter_modules.1.to_q_lora.up.weight"], torch.zeros_like(a["adapter_modules.1.to_q_lora.up.weight"]))


def test_saved_file_loads_and_drives_a_fresh_diffusers_unet(trained, tiny_world):
    from diffusers import UNet2DConditionModel

    run, result, _ = trained
    ckpt = load_checkpoint(result.adapter_path)
    assert ckpt.arch == "custom" and ckpt.layout == UNetLayout.from_diffusers_config(UNET)
    assert ckpt.metadata["trained_steps"] == "20"
    unet = UNet2DConditionModel.from_pretrained(tiny_world.base, subfolder="unet").eval()
    install_processors(unet, ckpt.adapter_state_dict())
    gen = torch.Generator().manual_seed(5)
    prompt, token_mask = torch.randn(1, 77, CROSS_DIM, generator=gen), torch.zeros(1, 77, dtype=torch.bool)
    token_mask[0, [3, 6]] = True
    regions, valid = torch.randn(1, 5, 257, 1280, generator=gen), torch.tensor([[True, True, False, False, False]])
    id_embed, clip = torch.randn(1, 512, generator=gen), torch.randn(1, 257, 1280, generator=gen)
    latents, t = torch.randn(1, 4, 16, 16, generator=gen), torch.tensor([400])
    trainee = run.accelerator.unwrap_model(run.trainee)
    with torch.no_grad():
        expected_context = trainee.context(prompt, token_mask, regions, valid, id_embed, clip)
        expected = trainee.unet(latents, t, encoder_hidden_states=expected_context).sample
        text = ckpt.facial_encoder(prompt, regions, token_mask, valid)
        context = torch.cat([text, ckpt.image_proj(id_embed, clip)], dim=1)
        got = unet(latents, t, encoder_hidden_states=context).sample
    assert_close(context, expected_context, SAME_MATH_FP32)
    assert_close(got, expected, DEEP_NET_FP32)


def test_localisation_loss_reads_cross_attention_and_trains_the_facial_encoder(trained):
    run, _, _ = trained
    batch = next(iter(run.val_loader))
    out = run.step(batch, step_generator(0, 0, 99))
    assert out.maps and all(name.endswith("attn2") for name in out.maps)
    for probs in out.maps.values():
        assert probs.shape[-1] == 77 and probs.shape[-2] in (16, 64)  # keys: text tokens; queries: latent pixels
    encoder = run.accelerator.unwrap_model(run.trainee).facial_encoder
    params = list(encoder.visual_projection.parameters()) + list(encoder.fuse_module.parameters())
    grads = torch.autograd.grad(out.localisation, params, allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0


@pytest.fixture(scope="module")
def fresh_run(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("fresh")
    yield _run(tiny_world, out, learning_rate=1e-3, text_drop_rate=0.0)
    shutil.rmtree(out, ignore_errors=True)


def test_loss_goes_down_on_a_fixed_batch(fresh_run):
    run = fresh_run
    batch = next(iter(run.loader))
    losses = []
    for _ in range(5):
        # The same noise, timestep and batch every time: the loss before each update measures the fit.
        out = run.step(batch, step_generator(1, 0, 0), background=False)
        losses.append(float(out.loss))
        run.accelerator.backward(out.loss)
        run.optimizer.step()
        run.optimizer.zero_grad()
    assert all(math.isfinite(x) for x in losses)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.93 * losses[0], losses


def test_out_of_memory_names_the_batch_size_and_the_remedies(fresh_run, monkeypatch):
    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(fresh_run, "step", exhausted)
    with pytest.raises(TrainingConfigError) as info:
        fresh_run.run()
    message = str(info.value)
    assert "out of memory at step 1 with train_batch_size 1" in message
    assert "gradient_accumulation_steps" in message and "gradient_checkpointing (now off)" in message


def test_wrong_base_models_are_refused(tiny_world, tmp_path):
    with pytest.raises(TrainingConfigError, match=r"arch is sdxl \(SDXL\) but the base UNet in .* is a custom UNet "
                                                  r"\(cross_attention_dim 64"):
        _run(tiny_world, tmp_path / "a", arch="sdxl")
    models = load_base_models(tiny_world.base, tiny_world.vision)
    with pytest.raises(TrainingConfigError) as info:
        check_architecture(models, "auto", SD15_LAYOUT, "ConsistentID-v1.bin")
    assert "ConsistentID-v1.bin is a ConsistentID checkpoint for SD1.5 (cross_attention_dim 768), but the base UNet" in str(info.value)
    assert "cross_attention_dim 64" in str(info.value)
    with pytest.raises(TrainingConfigError, match=r"localisation_blocks: no cross-attention layers in blocks "
                                                  r"\['up_blocks.3'\] .*; this UNet has down_blocks.0, down_blocks.1, "
                                                  r"mid_block, up_blocks.1, up_blocks.2"):
        _run(tiny_world, tmp_path / "c", localisation_blocks=["up_blocks.3"])
    vit_l = save_tiny_image_encoder(str(tmp_path / "vit_l"), width=1024)
    with pytest.raises(TrainingConfigError, match="is ViT-L with 257 tokens; ConsistentID needs CLIP ViT-H/14"):
        _run(tiny_world, tmp_path / "b", image_encoder=vit_l)


def test_an_inconsistent_data_set_is_refused_before_any_model_is_loaded(tiny_world, tmp_path):
    entries = json.loads(open(tiny_world.manifest, encoding="utf-8").read())
    entries[1]["parsing_mask_IMG"] = "parsing/gone.png"
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(entries))
    config = make_config(tiny_world.config(tmp_path / "out", manifest=str(manifest), data_root=tiny_world.data,
                                           parsing_root=tiny_world.data, faceid_root=tiny_world.data,
                                           base_model=str(tmp_path / "no_such_model")))
    with pytest.raises(TrainingDataError, match=r"1 problem\(s\).*\n  - entry 1 \(face_01_png.jpg\): label map not found"):
        TrainingRun(config)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_command_line_with_a_yaml_config(tiny_world, tmp_path, capsys, caplog):
    config = tmp_path / "train.yaml"
    settings = tiny_world.config(tmp_path / "out", max_train_steps=1, num_validation_samples=0)
    config.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in settings.items()) + "learning_rate: 1e-4\n")
    assert main(["--config", str(config), "--text-drop-rate", "0"]) == 0
    assert "trained 1 steps; ConsistentID weights:" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "out" / "consistentid.safetensors").arch == "custom"
    config.write_text(config.read_text() + "learning_rat: 1\n")
    assert main(["--config", str(config)]) == 2
    assert "unknown setting(s) 'learning_rat' (did you mean 'learning_rate'?)" in caplog.text


def test_sdxl_style_base_model_trains(tiny_world, tmp_path):
    base = save_tiny_sdxl_base_model(str(tmp_path / "sdxl_base"))
    run = _run(tiny_world, tmp_path / "out", base_model=base, max_train_steps=1, num_validation_samples=0,
               text_drop_rate=0.0)
    assert run.models.family == "sdxl"
    batch = next(iter(run.loader))
    assert batch["input_ids_2"].shape == (1, 77) and batch["input_ids_2"][0, -1] == 0  # tokenizer_2 pads with "!"
    result = run.run()
    assert len(result.history) == 1 and math.isfinite(result.history[0]["loss"])
    assert load_checkpoint(result.adapter_path).layout == run.models.layout


def test_image_encoder_from_a_comfyui_clip_vision_file(tiny_world, tmp_path):
    from safetensors.torch import save_file
    from transformers import CLIPVisionModelWithProjection

    from training.base_models import load_image_encoder

    folder_model = CLIPVisionModelWithProjection.from_pretrained(tiny_world.vision).eval()
    state = {k: v.contiguous() for k, v in folder_model.state_dict().items() if not k.endswith("position_ids")}
    path = tmp_path / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
    save_file(state, str(path))  # vision_model.* + visual_projection.weight, as in ComfyUI's clip_vision folder
    single = load_image_encoder(str(path)).eval()
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = folder_model(pixels, output_hidden_states=True).hidden_states[-2]
        b = single(pixels, output_hidden_states=True).hidden_states[-2]
    assert a.shape == (2, 257, 1280) and torch.equal(a, b)
