"""Random-weight model files with the real layouts, for tests that run models inside ComfyUI.

The real weights (CLIP ViT-H, ConsistentID, BiSeNet, buffalo_l, an SD1.5 checkpoint) cannot be
downloaded in the test environment, and what the tests check is the wiring (file formats, key
names, shapes, ComfyUI's loaders), not the pictures.  So each builder writes a file that the
real loader accepts, with seeded random weights.

The large files take seconds to minutes to make, so they are built once into a cache folder
(``CID_MODEL_CACHE``, default ``~/.cache/consistentid-test-models``) under names that carry a
version tag: bumping a builder's version makes it rebuild, and the older file of that builder is
deleted.  Each builder then hard-links the cached file to the path it is given (copying where a
link is impossible, e.g. across file systems).  Tests must treat placed files as read-only: a
hard link shares its bytes with the cache.

``sd15_checkpoint`` needs ComfyUI itself, already set up in this process (it converts and saves
through ComfyUI's own code); the other builders need only torch, safetensors,
transformers' config classes, facexlib and onnx.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)

CACHE_ENV = "CID_MODEL_CACHE"
DEFAULT_CACHE = os.path.join("~", ".cache", "consistentid-test-models")

# Bump a version when its builder changes what it writes.
VERSIONS = {
    "clip_vision_vit_h": "v1",
    "clip_vision_vit_l": "v1",
    "consistentid_sd15": "v2",
    "consistentid_sd15_attributes": "v1",
    "consistentid_sdxl": "v1",
    "consistentid_sdxl_attributes": "v1",
    "sdxl_checkpoint": "v1",
    "instantid_controlnet": "v1",
    "face_parser": "v1",
    "sd15_checkpoint": "v4",
}

WEIGHT_STD = 0.02  # the initializer_range of CLIP's configs

# ComfyUI's own configs, copied so that no builder needs the ComfyUI checkout to make the file.
CLIP_VISION_CONFIGS = {
    "vit_h": {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16, "num_hidden_layers": 32,
              "patch_size": 14, "image_size": 224, "projection_dim": 1024, "hidden_act": "gelu",
              "layer_norm_eps": 1e-5},
    "vit_l": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
              "patch_size": 14, "image_size": 224, "projection_dim": 768, "hidden_act": "quick_gelu",
              "layer_norm_eps": 1e-5},
}

# Stable Diffusion 1.5 as diffusers describes it (runwayml/stable-diffusion-v1-5, unet/ vae/ text_encoder/).
SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
# Stable Diffusion XL base 1.0's UNet as diffusers describes it (stabilityai/stable-diffusion-xl-base-1.0, unet/).
SDXL_UNET_CONFIG = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
UNET_CONFIGS = {"sd15": SD15_UNET_CONFIG, "sdxl": SDXL_UNET_CONFIG}
SD15_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_TEXT_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
}


# --- cache ------------------------------------------------------------------------------------

def cache_dir() -> Path:
    folder = Path(os.path.expanduser(os.environ.get(CACHE_ENV, "").strip() or DEFAULT_CACHE))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def cached_file(stem: str, suffix: str, build: Callable[[Path], None]) -> Path:
    """``<cache>/<stem>-<version><suffix>``, built by ``build(tmp_path)`` when absent."""
    folder = cache_dir()
    version = VERSIONS[stem]
    target = folder / f"{stem}-{version}{suffix}"
    if target.is_file() and target.stat().st_size > 0:
        return target
    own = re.compile(re.escape(stem) + r"-v\d+" + re.escape(suffix) + "$")
    for stale in folder.iterdir():
        if own.match(stale.name) and stale != target:
            log.info("removing stale test model %s", stale)
            stale.unlink()
    # Built under a temporary name and renamed, so an interrupted build never looks finished.
    tmp = folder / f".{target.name}.{os.getpid()}.partial"
    started = time.perf_counter()
    try:
        build(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    log.info("built test model %s (%.1f MB) in %.1f s", target.name, target.stat().st_size / 2**20,
             time.perf_counter() - started)
    return target


def place(source: Path, dest) -> Path:
    """Hard-links (or copies) ``source`` to ``dest``, replacing what is there."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() or dest.is_symlink():
        dest.unlink()
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)
    return dest


# --- random tensors ---------------------------------------------------------------------------

def _is_norm(key: str) -> bool:
    # CLIP spells its first norm "pre_layrnorm"; diffusers uses norm/group_norm/conv_norm_out.
    parts = key.split(".")
    return any("norm" in p or "layrnorm" in p for p in parts[:-1])


def _meta_state(build_module: Callable[[], torch.nn.Module]) -> dict[str, torch.Size]:
    """Key -> shape of a module built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        module = build_module()
    return {key: value.shape for key, value in module.state_dict().items()}


def _clip_like_state(shapes: dict, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """CLIP's initializer: normal(0, 0.02) weights and embeddings, layer norms 1, biases 0."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith(".bias"):
            tensor = torch.zeros(shape)
        elif _is_norm(key):
            tensor = torch.ones(shape)
        else:
            tensor = torch.randn(shape, generator=gen) * WEIGHT_STD
        state[key] = tensor.to(dtype)
    return state


def _fan_in_state(shapes: dict, seed: int, dtype: torch.dtype, gain: float = 1.0) -> dict[str, torch.Tensor]:
    """normal(0, gain^2 / fan_in) weights, norms 1, biases 0.

    The 1/fan_in variance keeps every layer's output at the scale of its input, so that a UNet or
    VAE of dozens of residual blocks stays in a range where fp16 neither overflows nor flushes.
    """
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith(".bias") or len(shape) == 0:
            tensor = torch.zeros(shape)
        elif _is_norm(key) and len(shape) == 1:
            tensor = torch.ones(shape)
        elif len(shape) == 1:  # e.g. CLIP's class embedding; nothing multiplies it into a sum
            tensor = torch.randn(shape, generator=gen) * WEIGHT_STD
        else:
            fan_in = 1
            for size in shape[1:]:
                fan_in *= int(size)
            tensor = torch.randn(shape, generator=gen) * (gain / fan_in ** 0.5)
        state[key] = tensor.to(dtype)
    return state


def randomize_(module: torch.nn.Module, seed: int = 0, gain: float = 1.0) -> torch.nn.Module:
    """Fills a module's parameters in place with the fan-in scheme of :func:`_fan_in_state`.

    For models too big to hold twice (a random SDXL UNet is 10 GB in fp32): the module is built
    with uninitialised storage and filled tensor by tensor, so no state dict copy ever exists.
    In a UNet every 1-D weight is a norm scale, so 1-D weights become 1 and biases 0.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            if name.endswith("bias") or param.ndim == 0:
                param.zero_()
            elif param.ndim == 1:
                param.fill_(1.0)
            else:
                fan_in = param[0].numel()
                # Drawn in fp32 on the CPU in slices: the same numbers on every device and dtype,
                # and no temporary as large as the biggest weight.
                flat = param.view(param.shape[0], -1)
                for start in range(0, flat.shape[0], 256):
                    rows = flat[start:start + 256]
                    rows.copy_(torch.randn(rows.shape, generator=gen) * (gain / fan_in ** 0.5))
    return module


def diffusers_unet(arch: str = "sd15", seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32):
    """A diffusers ``UNet2DConditionModel`` of SD1.5's or SDXL's exact shape with random weights."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CONFIGS[arch]).to(dtype)
    unet = unet.to_empty(device=device)
    return randomize_(unet, seed).eval().requires_grad_(False)


def comfy_unet(arch: str = "sd15", seed: int = 0, dtype: torch.dtype | None = None, manual_cast: torch.dtype | None = None):
    """A ComfyUI ``ModelPatcher`` of SD1.5's or SDXL's UNet with random weights, in ``dtype``.

    Built the way ``comfy.sd.load_diffusion_model_state_dict`` builds a model (detection from
    diffusers key names, here on the meta device; ComfyUI's device and dtype choices), then
    filled in place.  ``dtype`` None takes ComfyUI's choice for this device; ``manual_cast``
    the compute dtype when it differs from the weights' (None: compute in ``dtype``).
    ComfyUI must already be set up in this process.
    """
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        shapes = UNet2DConditionModel(**UNET_CONFIGS[arch]).state_dict()
    config = comfy.model_detection.model_config_from_diffusers_unet(shapes)
    if config is None:
        raise RuntimeError(f"ComfyUI did not recognise the {arch} UNet layout")
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    if dtype is None:
        params = sum(t.numel() for t in shapes.values())
        dtype = comfy.model_management.unet_dtype(model_params=params, supported_dtypes=config.supported_inference_dtypes)
    config.set_inference_dtype(dtype, manual_cast)
    model = config.get_model({}, "").to(offload_device)
    randomize_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


# --- CLIP vision ------------------------------------------------------------------------------

def clip_vision_state(kind: str = "vit_h", seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """A Hugging Face ``CLIPVisionModelWithProjection`` state dict (``vision_model.*``,
    ``visual_projection.weight``) with random weights, as the IP-Adapter image encoders are stored."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(**CLIP_VISION_CONFIGS[kind])
    shapes = _meta_state(lambda: CLIPVisionModelWithProjection(config))
    return _clip_like_state(shapes, seed, dtype)


def _save_clip_vision(kind: str, seed: int) -> Callable[[Path], None]:
    def build(tmp: Path) -> None:
        from safetensors.torch import save_file

        save_file(clip_vision_state(kind, seed), str(tmp), metadata={"format": "pt"})

    return build


def clip_vision_vit_h(path) -> Path:
    """CLIP ViT-H/14 vision tower (32 layers, 1280 wide, 224 px), fp16 safetensors, about 1.3 GB.

    ComfyUI's CLIPVisionLoader recognises it by ``vision_model.encoder.layers.30.*`` and loads it
    with its ``clip_vision_config_h.json``.
    """
    return place(cached_file("clip_vision_vit_h", ".safetensors", _save_clip_vision("vit_h", 0)), path)


def clip_vision_vit_l(path) -> Path:
    """CLIP ViT-L/14 vision tower (24 layers, 1024 wide), fp16 safetensors, about 0.6 GB."""
    return place(cached_file("clip_vision_vit_l", ".safetensors", _save_clip_vision("vit_l", 1)), path)


# --- ConsistentID, face parser, insightface -----------------------------------------------------

def random_consistentid_state(arch: str = "sd15", seed: int = 0) -> dict:
    """The official nested layout {FacialEncoder, image_proj, adapter_modules}, built from the core's
    own modules with their default initialisation and small non-zero LoRA ups, fp32."""
    from training.attention_processors import build_processors
    from consistentid_core.model.networks import build_facial_encoder, build_image_proj

    torch.manual_seed(seed)
    adapter = torch.nn.ModuleList(build_processors(arch).values())
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            if name.endswith("up.weight"):
                param.normal_(0, 1e-3)
    return {
        "FacialEncoder": build_facial_encoder(arch).state_dict(),
        "image_proj": build_image_proj(arch).state_dict(),
        "adapter_modules": adapter.state_dict(),
    }


# SDXL's random ConsistentID is stored in fp16: in fp32 it would be twice the size for no benefit.
_CONSISTENTID_DTYPES = {"sd15": torch.float32, "sdxl": torch.float16}


def consistentid_checkpoint(path, arch: str = "sd15") -> Path:
    """An official-layout ConsistentID ``.bin`` (torch.save of the nested dict) with random weights."""
    dtype = _CONSISTENTID_DTYPES[arch]

    def build(tmp: Path) -> None:
        nested = random_consistentid_state(arch, seed=0)
        torch.save({part: {k: v.to(dtype) for k, v in state.items()} for part, state in nested.items()}, str(tmp))

    return place(cached_file(f"consistentid_{arch}", ".bin", build), path)


def consistentid_attributes_checkpoint(path, arch: str = "sd15") -> Path:
    """The official-layout stand-in plus a random FlexID attribute branch, flat safetensors
    (``FacialEncoder.*``, ..., ``attribute_proj.*``, ``attribute_adapter.*``): the form the
    attribute stage of the training module writes.

    Every branch weight is random, ``to_v_attr`` included (training starts it at zero), so the
    branch visibly changes what the UNet computes."""
    dtype = _CONSISTENTID_DTYPES[arch]

    def build(tmp: Path) -> None:
        from consistentid_core.attributes.branch import AttributeBranch, attribute_state_dict

        from safetensors.torch import save_file

        nested = random_consistentid_state(arch, seed=0)
        flat = {f"{part}.{key}": value.to(dtype).contiguous() for part, state in nested.items()
                for key, value in state.items()}
        gen = torch.Generator().manual_seed(1)
        for key, value in attribute_state_dict(AttributeBranch(arch, depth=2)).items():
            flat[key] = (torch.randn(value.shape, generator=gen) * 0.05).to(dtype)
        save_file(flat, str(tmp), metadata={"arch": arch})

    return place(cached_file(f"consistentid_{arch}_attributes", ".safetensors", build), path)


def face_parser(path) -> Path:
    """facexlib's ``BiSeNet(num_class=19)`` with its own random init, as a torch.save'd state dict
    (the layout of ``face_parsing.pth`` / ``79999_iter.pth`` / ``parsing_bisenet.pth``)."""

    def build(tmp: Path) -> None:
        from facexlib.parsing.bisenet import BiSeNet

        torch.manual_seed(0)
        torch.save(BiSeNet(num_class=19).state_dict(), str(tmp))

    return place(cached_file("face_parser", ".pth", build), path)


def insightface_buffalo_l(folder) -> Path:
    """The buffalo_l stand-ins (detector + ArcFace) written into ``folder`` (``.../models/buffalo_l``).

    They are a few kilobytes and built in milliseconds, so they are not cached.
    """
    from .insightface_standins import make_buffalo_l

    return Path(make_buffalo_l(str(folder)))


# --- Stable Diffusion 1.5 -----------------------------------------------------------------------

def sd15_component_states(seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, dict[str, torch.Tensor]]:
    """Random diffusers/transformers state dicts of SD1.5's UNet, VAE and CLIP-L text encoder.

    Key names and shapes come from diffusers' ``UNet2DConditionModel`` / ``AutoencoderKL`` and
    transformers' ``CLIPTextModel`` built with the SD1.5 configs above (on the meta device).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_shapes = _meta_state(lambda: UNet2DConditionModel(**SD15_UNET_CONFIG))
    vae_shapes = _meta_state(lambda: AutoencoderKL(**SD15_VAE_CONFIG))
    text_shapes = _meta_state(lambda: CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG)))
    # Buffers such as position_ids are not weights; the real files do not need them.
    text_shapes = {k: v for k, v in text_shapes.items() if not k.endswith("position_ids")}
    return {
        "unet": _fan_in_state(unet_shapes, seed, dtype),
        "vae": _fan_in_state(vae_shapes, seed + 1, dtype),
        "text_encoder": _clip_like_state(text_shapes, seed + 2, dtype),
    }


def _write_sd15_checkpoint(tmp: Path, seed: int = 0) -> None:
    import comfy.model_management
    import comfy.sd

    states = sd15_component_states(seed)
    model = comfy.sd.load_diffusion_model_state_dict(states.pop("unet"), model_options={"dtype": torch.float16})
    if model is None:
        raise RuntimeError("ComfyUI did not recognise the random SD1.5 UNet")
    clip = comfy.sd.load_text_encoder_state_dicts([states.pop("text_encoder")],
                                                  clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    vae = comfy.sd.VAE(sd=states.pop("vae"), dtype=torch.float16)
    # The metadata mirrors what ComfyUI's CheckpointSave node writes for models without a modelspec.
    comfy.sd.save_checkpoint(str(tmp), model, clip, vae, metadata={"cid_test_model": json.dumps({"seed": seed})})
    del model, clip, vae
    comfy.model_management.cleanup_models()
    comfy.model_management.soft_empty_cache()


def sd15_checkpoint(path) -> Path:
    """A complete random Stable Diffusion 1.5 checkpoint in the single-file (ldm) layout.

    ``model.diffusion_model.*`` (UNet, 860 M parameters), ``cond_stage_model.transformer.text_model.*``
    (CLIP-L text encoder) and ``first_stage_model.*`` (VAE), fp16 safetensors of about 2 GB, which
    ComfyUI's CheckpointLoaderSimple loads as SD1.5.

    Built from diffusers/transformers layouts with random weights (UNet and VAE scaled by fan-in, so
    activations stay below about 30 and the noise prediction has a std of about 0.7: finite even
    in fp16; the text encoder with CLIP's 0.02 init), loaded into
    ComfyUI (``load_diffusion_model_state_dict``, ``load_text_encoder_state_dicts``, ``VAE``), which
    converts the diffusers names, and written with ``comfy.sd.save_checkpoint``, the function
    behind ComfyUI's CheckpointSave node.  ComfyUI must already be set up in this process (the tests'
    harness session, or tools/comfy_host.ComfyHost).
    The first build takes a few minutes on a 2-core CPU; later calls only link the cached file.
    """
    return place(cached_file("sd15_checkpoint", ".safetensors", _write_sd15_checkpoint), path)


__all__ = [
    "UNET_CONFIGS", "randomize_", "diffusers_unet", "comfy_unet", "cache_dir", "cached_file", "place", "clip_vision_state", "clip_vision_vit_h", "clip_vision_vit_l",
    "consistentid_checkpoint", "face_parser", "insightface_buffalo_l", "sd15_component_states", "sd15_checkpoint",
]
