"""DINO and CLIP encoders for the evaluation, loaded from local folders only.

Both are read with ``from_pretrained(folder, local_files_only=True)`` after the folder has been
checked here, so a wrong path ends in an :class:`EvaluationError` that names the folder and the
file it lacks instead of a hub lookup.  Pre-processing is done here rather than by the
transformers image processors, so that a folder without ``preprocessor_config.json`` (a model
saved with ``save_pretrained`` only) works and the crops are exactly the documented ones.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from consistentid_core.errors import EvaluationError
from consistentid_core.constants import CLIP_MEAN, CLIP_STD
from consistentid_core.face.parser import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger("consistentid.evaluate")

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))

# facebook/dino-vits16 as transformers describes it.
DINO_VITS16 = {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "patch_size": 16}

# DINO's own evaluation transform (and DreamBooth's DINO score): shorter side to 256, centre 224.
DINO_RESIZE = 256
DINO_CROP = 224

BATCH = 8


def check_model_folder(folder, what: str, option: str, need_tokenizer: bool = False) -> str:
    """Raise EvaluationError unless ``folder`` holds config.json, a weight file (and a tokenizer)."""
    if folder is None:
        raise EvaluationError(f"no {what} folder given; pass {option} DIR")
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        raise EvaluationError(
            f"{what} folder {folder} does not exist ({option}); it must hold config.json and "
            f"{' or '.join(WEIGHT_FILES[:2])} as written by save_pretrained"
        )
    present = set(os.listdir(folder))
    if "config.json" not in present:
        raise EvaluationError(f"{what} folder {folder} has no config.json (found: {sorted(present)[:8]})")
    if not present.intersection(WEIGHT_FILES):
        raise EvaluationError(
            f"{what} folder {folder} has no weights: expected {' or '.join(WEIGHT_FILES[:2])} "
            f"(found: {sorted(present)[:8]})"
        )
    if need_tokenizer and not any(all(f in present for f in group) for group in TOKENIZER_FILES):
        raise EvaluationError(
            f"{what} folder {folder} has no tokenizer: expected vocab.json + merges.txt or tokenizer.json"
        )
    return folder


def _read_config(folder: str) -> dict:
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"{folder}/config.json is unreadable: {exc}") from exc


def _rgb(image) -> Image.Image:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_center_crop(image: Image.Image, resize: int, crop: int) -> Image.Image:
    """Shorter side to ``resize`` (bicubic), then the centred ``crop`` x ``crop`` square."""
    image = _rgb(image)
    w, h = image.size
    scale = resize / min(w, h)
    nw, nh = max(crop, round(w * scale)), max(crop, round(h * scale))
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - crop) // 2, (nh - crop) // 2
    return image.crop((left, top, left + crop, top + crop))


def to_tensor(images: list[Image.Image], mean, std) -> torch.Tensor:
    arr = np.stack([np.asarray(_rgb(im), dtype=np.float32) / 255.0 for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


class DinoEncoder:
    """CLS embeddings (after the final LayerNorm) of a transformers ``ViTModel``."""

    def __init__(self, model: torch.nn.Module, name: str = "dino", device="cpu"):
        self.model = model.eval().requires_grad_(False).to(device)
        self.device = device
        self.name = name
        self.image_size = int(model.config.image_size)

    @classmethod
    def from_folder(cls, folder, device="cpu") -> "DinoEncoder":
        folder = check_model_folder(folder, "DINO", "--dino")
        config = _read_config(folder)
        if config.get("model_type") != "vit":
            raise EvaluationError(
                f"DINO folder {folder} holds a {config.get('model_type')!r} model; expected the transformers "
                "ViTModel layout of facebook/dino-vits16 (model_type 'vit')"
            )
        differs = {k: (config.get(k), v) for k, v in DINO_VITS16.items() if config.get(k) != v}
        if differs:
            logger.warning("DINO model in %s is not ViT-S/16 (%s): its numbers do not compare with the paper's",
                           folder, ", ".join(f"{k}={a} instead of {b}" for k, (a, b) in differs.items()))
        from transformers import ViTModel

        model = ViTModel.from_pretrained(folder, add_pooling_layer=False, local_files_only=True)
        logger.info("DINO encoder: %s (hidden %s, patch %s)", folder, config.get("hidden_size"),
                    config.get("patch_size"))
        return cls(model, name=os.path.basename(folder.rstrip(os.sep)), device=device)

    @torch.no_grad()
    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, len(pixels), BATCH):
            batch = pixels[start:start + BATCH].to(self.device)
            out.append(self.model(pixel_values=batch).last_hidden_state[:, 0].float().cpu())
        return F.normalize(torch.cat(out), dim=-1)

    def embed_images(self, images: list) -> torch.Tensor:
        """Whole images: DINO's resize-256 / centre-crop-224 transform. Unit vectors [N, D]."""
        if not images:
            return torch.zeros(0, self.model.config.hidden_size)
        crops = [resize_center_crop(im, round(self.image_size * DINO_RESIZE / DINO_CROP), self.image_size)
                 for im in images]
        return self._embed(to_tensor(crops, IMAGENET_MEAN, IMAGENET_STD))

    def embed_squares(self, images: list) -> torch.Tensor:
        """Square region crops, resized (bicubic) to the model's input size as they are."""
        if not images:
            return torch.zeros(0, self.model.config.hidden_size)
        size = (self.image_size, self.image_size)
        resized = [_rgb(im).resize(size, Image.BICUBIC) for im in images]
        return self._embed(to_tensor(resized, IMAGENET_MEAN, IMAGENET_STD))


class ClipEncoder:
    """Projected, unit-length CLIP image and text embeddings of a transformers ``CLIPModel``."""

    def __init__(self, model: torch.nn.Module, tokenizer, name: str = "clip", device="cpu"):
        self.model = model.eval().requires_grad_(False).to(device)
        self.tokenizer = tokenizer
        self.device = device
        self.name = name
        self.image_size = int(model.config.vision_config.image_size)
        # A tokenizer saved without its config reports an enormous model_max_length.
        self.max_tokens = min(int(tokenizer.model_max_length),
                              int(model.config.text_config.max_position_embeddings))

    @classmethod
    def from_folder(cls, folder, device="cpu") -> "ClipEncoder":
        folder = check_model_folder(folder, "CLIP", "--clip", need_tokenizer=True)
        config = _read_config(folder)
        if config.get("model_type") != "clip":
            raise EvaluationError(
                f"CLIP folder {folder} holds a {config.get('model_type')!r} model; expected the transformers "
                "CLIPModel layout (model_type 'clip', e.g. openai/clip-vit-large-patch14)"
            )
        from transformers import CLIPModel, CLIPTokenizer

        model = CLIPModel.from_pretrained(folder, local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        vision = model.config.vision_config
        logger.info("CLIP encoder: %s (vision hidden %s, patch %s)", folder, vision.hidden_size, vision.patch_size)
        return cls(model, tokenizer, name=os.path.basename(folder.rstrip(os.sep)), device=device)

    @torch.no_grad()
    def embed_images(self, images: list) -> torch.Tensor:
        if not images:
            return torch.zeros(0, self.model.config.projection_dim)
        out = []
        for start in range(0, len(images), BATCH):
            crops = [resize_center_crop(im, self.image_size, self.image_size) for im in images[start:start + BATCH]]
            pixels = to_tensor(crops, CLIP_MEAN, CLIP_STD).to(self.device)
            out.append(self.model.get_image_features(pixel_values=pixels).float().cpu())
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.model.config.projection_dim)
        out = []
        for start in range(0, len(texts), BATCH):
            # CLIP sees at most 77 tokens; longer prompts are cut as every CLIP-T implementation does.
            tokens = self.tokenizer(texts[start:start + BATCH], padding=True, truncation=True,
                                    max_length=self.max_tokens, return_tensors="pt")
            out.append(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                    attention_mask=tokens["attention_mask"].to(self.device))
                       .float().cpu())
        return F.normalize(torch.cat(out), dim=-1)
