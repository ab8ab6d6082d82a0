"""Random-weight encoders and parser stand-ins for the evaluation tests.

DINO is built at its real size (ViT-S/16: hidden 384, 12 layers, 6 heads, patch 16), because
FGIS crops are fed at the real input size and the folder check warns on any other layout.  CLIP
has the real ``CLIPModel`` structure and the real 49408-entry tokenizer but tiny widths: the real
ViT-L/14 (428M parameters, 1.7 GB) would take longer to build and save than the whole test file
may run.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clip_vocab import sd15_tokenizer
from face_standins import face_label_map

DINO_VITS16 = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                   patch_size=16, image_size=224, qkv_bias=True, layer_norm_eps=1e-6)


def save_dino(folder, seed: int = 0) -> str:
    """config.json + model.safetensors of a ViTModel with DINO ViT-S/16's layout and random weights."""
    from safetensors.torch import save_file
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(**DINO_VITS16)
    # Shapes from a meta-device model, values drawn directly: transformers' own initialiser
    # (truncated normal over 22M weights) takes many seconds on a busy 2-core machine.
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ViTModel(config, add_pooling_layer=False).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if "layernorm" in key:
            state[key] = torch.ones(shape) if key.endswith("weight") else torch.zeros(shape)
        elif key.endswith("bias"):
            state[key] = torch.zeros(shape)
        else:
            state[key] = torch.randn(shape, generator=gen) * config.initializer_range
    config.save_pretrained(folder)
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return str(folder)


def save_small_clip(folder, seed: int = 0) -> str:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  image_size=224, patch_size=32)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).save_pretrained(folder)
    sd15_tokenizer().save_pretrained(folder)
    return str(folder)


class SequenceParser(torch.nn.Module):
    """Answers its n-th call with the n-th label map (the last one repeats), as BiSeNet logits."""

    def __init__(self, *label_maps: np.ndarray):
        super().__init__()
        self.maps = [torch.from_numpy(m.astype(np.int64)) for m in label_maps]
        self.calls = 0
        self.eval()

    def forward(self, x):
        labels = self.maps[min(self.calls, len(self.maps) - 1)]
        self.calls += 1
        labels = F.interpolate(labels[None, None].float(), size=x.shape[-2:], mode="nearest")[0, 0].long()
        logits = F.one_hot(labels, 19).permute(2, 0, 1)[None].float()
        return logits, logits, logits


def full_face_map(size: int = 512) -> np.ndarray:
    """Skin, eyes, ears, nose and lips in the middle of a ``size`` square."""
    return face_label_map(size, (size // 4, size // 8, 3 * size // 4, 7 * size // 8))


def astronaut(size: int = 512) -> Image.Image:
    import skimage.data

    return Image.fromarray(skimage.data.astronaut()).resize((size, size), Image.BICUBIC)


def coffee(size: int = 512) -> Image.Image:
    import skimage.data

    return Image.fromarray(skimage.data.coffee()).resize((size, size), Image.BICUBIC)
