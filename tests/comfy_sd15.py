"""Random-weight SD1.5 pieces with the real layouts, built in memory for the ComfyUI generation tests.

The UNet is a diffusers ``UNet2DConditionModel`` (its default config is SD1.5's) loaded into
ComfyUI from its state dict, so both sides carry the same weights; the text encoder is a
transformers ``CLIPTextModel`` of CLIP-L's shape loaded as ComfyUI's SD1.5 CLIP.
"""

from __future__ import annotations

import torch

from spec_keys import random_official_state


def diffusers_sd15_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(cross_attention_dim=768).eval()  # the class default is 1280


def comfy_model_from_diffusers(unet):
    import comfy.sd

    state = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    return comfy.sd.load_diffusion_model_state_dict(state)


def comfy_sd15_clip(seed: int = 0):
    import comfy.sd
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
    text_model = CLIPTextModel(config).eval()
    state = {k: v.detach().clone() for k, v in text_model.state_dict().items()}
    return comfy.sd.load_text_encoder_state_dicts([state], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION), text_model


def consistentid_sd15(session, tmp_path, seed: int = 3):
    """A random official-layout SD1.5 ConsistentID file, loaded with the pack's own loader."""
    path = tmp_path / "ConsistentID-v1.bin"
    torch.save(random_official_state("sd15", seed=seed, proj_dtype=torch.float32), path)
    return session.pack_submodule("consistentid_core.model.checkpoint").load_checkpoint(str(path))


def random_embeds(session, arch="sd15", n=1, seed=5, names=("Face", "Left_Eye", "Left_Ear", "Nose", "Upper_Lip")):
    embeds_mod = session.pack_submodule("consistentid_core.embeds")
    gen = torch.Generator().manual_seed(seed)
    valid = torch.zeros(n, 5, dtype=torch.bool)
    valid[:, : len(names)] = True
    return embeds_mod.FaceEmbeds(
        arch=arch,
        id_embeds=torch.nn.functional.normalize(torch.randn(n, 512, generator=gen), dim=-1),
        clip_embeds=torch.randn(n, 257, 1280, generator=gen),
        region_embeds=torch.randn(n, 5, 257, 1280, generator=gen),
        region_valid=valid,
        region_names=[list(names)] * n,
        uncond_clip_embeds=torch.randn(1, 257, 1280, generator=gen),
        sources=[f"random {i}" for i in range(n)],
        checkpoint="ConsistentID-v1.bin",
    )


def unet_forward(model, x, t, context, cond_or_uncond, sigmas=None):
    """One forward of a (patched) ComfyUI model's UNet with the transformer options a sampler passes."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    options = dict(model.model_options["transformer_options"], cond_or_uncond=cond_or_uncond)
    if sigmas is not None:
        options["sigmas"] = sigmas
    with torch.no_grad():
        return model.model.diffusion_model(x, timesteps=t, context=context, transformer_options=options)
