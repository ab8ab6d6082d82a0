"""Stand-ins for the face parser and CLIP ViT-H with the real interfaces and shapes.

``FixedParser`` answers every image with a label map chosen by the test (as one-hot logits in
BiSeNet's output format), so region selection downstream is predictable.  ``PatchEncoder`` maps
224 px pixels to [N, 257, 1280] "penultimate states" with a seeded random patch projection, so
different pixels give different features and equal pixels equal ones.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from consistentid_core.face.labels import LABEL_LEFT_EAR, LABEL_LEFT_EYE, LABEL_LOWER_LIP, LABEL_NOSE, LABEL_RIGHT_EAR
from consistentid_core.face.labels import LABEL_RIGHT_EYE, LABEL_SKIN, LABEL_UPPER_LIP


class FixedParser(torch.nn.Module):
    def __init__(self, label_map: np.ndarray):
        super().__init__()
        self.register_buffer("labels", torch.from_numpy(label_map.astype(np.int64)))
        self.calls = 0
        self.eval()

    def forward(self, x):
        self.calls += 1
        labels = F.interpolate(self.labels[None, None].float(), size=x.shape[-2:], mode="nearest")[0, 0].long()
        logits = F.one_hot(labels, 19).permute(2, 0, 1)[None].float()
        return logits, logits, logits


def face_label_map(size: int, box) -> np.ndarray:
    """A CelebAMask-style map with skin, both eyes, both ears, nose and lips inside ``box`` (x1, y1, x2, y2)."""
    labels = np.zeros((size, size), dtype=np.uint8)
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1

    def put(label, fx1, fy1, fx2, fy2):
        labels[int(y1 + fy1 * h):int(y1 + fy2 * h), int(x1 + fx1 * w):int(x1 + fx2 * w)] = label

    put(LABEL_SKIN, 0.1, 0.0, 0.9, 1.0)
    put(LABEL_LEFT_EAR, 0.0, 0.35, 0.1, 0.6)
    put(LABEL_RIGHT_EAR, 0.9, 0.35, 1.0, 0.6)
    put(LABEL_LEFT_EYE, 0.25, 0.3, 0.4, 0.4)
    put(LABEL_RIGHT_EYE, 0.6, 0.3, 0.75, 0.4)
    put(LABEL_NOSE, 0.45, 0.4, 0.55, 0.6)
    put(LABEL_UPPER_LIP, 0.35, 0.7, 0.65, 0.75)
    put(LABEL_LOWER_LIP, 0.35, 0.75, 0.65, 0.8)
    return labels


class PatchEncoder(torch.nn.Module):
    def __init__(self, width: int = 1280, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.proj = torch.nn.Parameter(torch.randn(width, 3 * 14 * 14, generator=gen) / 24)
        self.calls = 0
        self.images = 0

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.images += pixels.shape[0]
        patches = F.unfold(pixels, kernel_size=14, stride=14).transpose(1, 2)  # [N, 256, 588]
        tokens = patches @ self.proj.T
        return torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
