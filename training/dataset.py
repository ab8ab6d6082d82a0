"""Per-sample processing of the training set (spec §3.2) and a resumable shuffle.

Regions, their masked full-frame images and the caption alignment come from the core, so a
model trained here sees exactly what the inference code feeds it.  The random choices of a
sample (the 10 % text drop) and the shuffle order are functions of (seed, epoch, index), not of
a running random state: a run resumed in the middle of an epoch draws exactly what an
uninterrupted run draws, whatever the number of data-loader workers.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from consistentid_core.constants import ID_DIM
from consistentid_core.face.clip_features import clip_pixel_values, zero_pixel_values
from consistentid_core.errors import InputImageError, TrainingDataError
from consistentid_core.face.labels import WITHOUT_BACKGROUND
from consistentid_core.face.parsing import MAX_REGIONS, label_masks, region_images, select_regions
from consistentid_core.prompt.text import CAPTION_SD15, second_encoder_ids

from .manifest import Entry, read_embedding
from .texts import empty_prompt, training_prompt



def square_fit(image: Image.Image, size: int, resample) -> Image.Image:
    """Shortest side to ``size``, then the centred ``size`` square (Resize + CenterCrop)."""
    w, h = image.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        w, h = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((w, h), resample)
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def open_image(path: str, what: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
        raise TrainingDataError(f"{what} {path} cannot be read ({exc}); was the data set changed after the check?") from exc


def read_label_map(path: str) -> np.ndarray:
    labels = np.asarray(open_image(path, "label map"))
    if labels.ndim != 2:
        raise TrainingDataError(f"label map {path} has shape {labels.shape}; expected a single-channel label PNG")
    return labels


class ConsistentIDDataset(Dataset):
    """Samples of :class:`~training.manifest.Entry` as the tensors one training step needs.

    ``tokenizer_2`` (SDXL) adds ``input_ids_2``.  Masks and the image are at ``resolution``; the
    CLIP inputs are 224 px crops of the stored image, as at inference.
    """

    def __init__(self, entries: list[Entry], tokenizer, tokenizer_2=None, resolution: int = 512,
                 text_drop_rate: float = 0.1, seed: int = 0, default_facial_caption: str = CAPTION_SD15):
        self.entries = list(entries)
        self.default_facial_caption = default_facial_caption
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.resolution = resolution
        self.text_drop_rate = text_drop_rate
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def drops_text(self, index: int) -> bool:
        if self.text_drop_rate <= 0:
            return False
        return bool(np.random.default_rng([self.seed, self.epoch, index]).random() < self.text_drop_rate)

    def _mask_tensor(self, mask: np.ndarray) -> torch.Tensor:
        # Nearest keeps the masks binary; at the official 512 px this is the identity.
        fitted = square_fit(Image.fromarray(mask), self.resolution, Image.NEAREST)
        return torch.from_numpy(np.asarray(fitted, dtype=np.float32) / 255.0)

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        image = open_image(entry.image, "image").convert("RGB")
        labels = read_label_map(entry.labels)
        try:
            masks = label_masks(labels)
        except InputImageError as exc:
            raise TrainingDataError(f"label map {entry.labels}: {exc}") from exc
        regions = select_regions(masks)
        drop = self.drops_text(index)
        if drop:
            prompt = empty_prompt(self.tokenizer)
        else:
            facial = entry.facial_caption or self.default_facial_caption
            prompt = training_prompt(entry.caption, facial, list(regions), self.tokenizer)
        kept = prompt.parts[:MAX_REGIONS]

        res = self.resolution
        region_pixels = zero_pixel_values(MAX_REGIONS)
        facial_masks = torch.zeros(MAX_REGIONS, res, res)
        crops = region_images(image, {name: regions[name] for name in kept})
        for slot, (name, crop) in enumerate(zip(kept, crops)):
            region_pixels[slot] = clip_pixel_values(crop)
            facial_masks[slot] = self._mask_tensor(regions[name])
        token_index = torch.zeros(MAX_REGIONS, dtype=torch.long)
        token_index[: prompt.num_facial_tokens] = torch.tensor(prompt.token_positions[:MAX_REGIONS], dtype=torch.long)

        background = masks.get(WITHOUT_BACKGROUND)
        fitted = square_fit(image, res, Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(fitted, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        sample = {
            "index": index,
            "pixel_values": pixels.contiguous(),
            "clip_pixels": zero_pixel_values(1)[0] if drop else clip_pixel_values(image),
            "region_pixels": region_pixels,
            "region_valid": torch.tensor(prompt.valid_mask(MAX_REGIONS), dtype=torch.bool),
            "facial_token_index": token_index,
            "facial_masks": facial_masks,
            "background_mask": (self._mask_tensor(background) if background is not None else torch.ones(res, res))[None],
            "input_ids": torch.tensor(prompt.input_ids, dtype=torch.long),
            "token_mask": torch.tensor(prompt.token_mask, dtype=torch.bool),
            "id_embed": read_embedding(entry.embed) if entry.embed else torch.zeros(ID_DIM),
            "text_dropped": drop,
        }
        if self.tokenizer_2 is not None:
            sample["input_ids_2"] = torch.tensor(second_encoder_ids(prompt, self.tokenizer_2), dtype=torch.long)
        return sample


class EpochSampler(Sampler[int]):
    """A permutation of the data set fixed by (seed, epoch), so a resumed epoch replays the same order."""

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True):
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.size))
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.size).tolist())
