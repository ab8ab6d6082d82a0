"""Tiny random models and a stand-in photo set for the training tests (CPU, no network).

The models have the real classes and file layouts (diffusers folders, the real CLIP BPE
tokenizer) but toy widths: cross_attention_dim 64, so the whole base model is a few MB.  The
CLIP vision tower keeps ViT-H's width and token count (1280 x 257) with two layers, because the
FacialEncoder and the ID projection are built for exactly those features.

Photos are black with a saturated red square, which the insightface stand-ins detect as a face;
:class:`TinyFaceParser` answers every photo with the same label map (face and nose), so the
region masks the localisation loss trains against are known.  Two regions, not five, because the
FacialEncoder's cost grows with the number of regions and it dominates a step on the CPU.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from clip_vocab import sd15_tokenizer
from face_standins import FixedParser
from consistentid_core.face.labels import LABEL_NECK, LABEL_NOSE, LABEL_SKIN
from tools.insightface_standins import make_buffalo_l, red_square_image

CROSS_DIM = 64
SD_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                "num_train_timesteps": 1000, "prediction_type": "epsilon"}
UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=CROSS_DIM, attention_head_dim=4, norm_num_groups=32,
)
VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64,
)
RESOLUTION = 64  # VAE /4 and UNet /4: 16 x 16 latents, cross-attention maps of 16, 8 and 4 pixels a side
FACE_BOX = (192, 192, 320, 320)  # the red square of every stand-in photo, at 512 px


def save_tiny_base_model(folder: str, cross_dim: int = CROSS_DIM, seed: int = 0) -> str:
    """A diffusers-format SD1.5-like folder: unet/, vae/, text_encoder/, tokenizer/, scheduler/."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    UNet2DConditionModel(**{**UNET, "cross_attention_dim": cross_dim}).save_pretrained(os.path.join(folder, "unet"))
    AutoencoderKL(**VAE).save_pretrained(os.path.join(folder, "vae"))
    text = CLIPTextConfig(vocab_size=49408, hidden_size=cross_dim, intermediate_size=2 * cross_dim, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, projection_dim=cross_dim)
    CLIPTextModel(text).save_pretrained(os.path.join(folder, "text_encoder"))
    sd15_tokenizer().save_pretrained(os.path.join(folder, "tokenizer"))
    DDPMScheduler(**SD_SCHEDULER).save_pretrained(os.path.join(folder, "scheduler"))
    return folder


def save_tiny_sdxl_base_model(folder: str, seed: int = 0) -> str:
    """An SDXL-like folder: two text encoders (32 + 32 = 64 wide), pooled text and time ids into the UNet."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from clip_vocab import sdxl_tokenizer_2

    torch.manual_seed(seed)
    half = CROSS_DIM // 2
    time_dim = 8
    UNet2DConditionModel(**UNET, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                         projection_class_embeddings_input_dim=half + 6 * time_dim).save_pretrained(os.path.join(folder, "unet"))
    AutoencoderKL(**VAE).save_pretrained(os.path.join(folder, "vae"))
    text = dict(vocab_size=49408, hidden_size=half, intermediate_size=2 * half, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, projection_dim=half)
    CLIPTextModel(CLIPTextConfig(**text)).save_pretrained(os.path.join(folder, "text_encoder"))
    CLIPTextModelWithProjection(CLIPTextConfig(**text)).save_pretrained(os.path.join(folder, "text_encoder_2"))
    sd15_tokenizer().save_pretrained(os.path.join(folder, "tokenizer"))
    sdxl_tokenizer_2().save_pretrained(os.path.join(folder, "tokenizer_2"))
    DDPMScheduler(**SD_SCHEDULER).save_pretrained(os.path.join(folder, "scheduler"))
    return folder


def save_tiny_image_encoder(folder: str, width: int = 1280, seed: int = 1, heads: int = 16) -> str:
    """CLIPVisionModelWithProjection with ViT-H's width and 257 tokens, but one layer (the penultimate
    hidden state is then the normalised patch embedding)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=width, intermediate_size=256, num_hidden_layers=1, num_attention_heads=heads,
                              image_size=224, patch_size=14, projection_dim=64)
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    return folder


def face_labels(size: int = 512, box=FACE_BOX) -> np.ndarray:
    """Skin in ``box`` with a nose, a neck down to the bottom edge: regions Face and Nose.

    The neck matters: a background that encircles the person would make the official
    WithoutBackground mask (inverse of the *filled* background) empty.
    """
    labels = np.zeros((size, size), dtype=np.uint8)
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1

    def put(label, fx1, fy1, fx2, fy2):
        labels[int(y1 + fy1 * h):int(y1 + fy2 * h), int(x1 + fx1 * w):int(x1 + fx2 * w)] = label

    labels[y2:, x1 + w // 4:x2 - w // 4] = LABEL_NECK
    put(LABEL_SKIN, 0.0, 0.0, 1.0, 1.0)
    put(LABEL_NOSE, 0.4, 0.45, 0.6, 0.7)
    return labels


class TinyFaceParser(FixedParser):
    def __init__(self):
        super().__init__(face_labels())


def make_insightface(root: str) -> str:
    """``<root>/models/buffalo_l`` with the stand-in detector and ArcFace; returns ``root``."""
    make_buffalo_l(os.path.join(root, "models", "buffalo_l"))
    return root


def write_face_photos(folder: str, count: int, seed: int = 0) -> list[str]:
    """512 px photos with the red square face; a little dark noise makes each one different."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    cx, cy = (FACE_BOX[0] + FACE_BOX[2]) // 2, (FACE_BOX[1] + FACE_BOX[3]) // 2
    for i in range(count):
        image = red_square_image(512, squares=((cx, cy, FACE_BOX[2] - FACE_BOX[0], 255),)).astype(np.int16)
        image[..., 1:] += rng.integers(0, 30, size=(512, 512, 2), dtype=np.int16)
        name = f"face_{i:02d}.png"
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, name))
        names.append(name)
    return names


def photo_without_face(path: str) -> str:
    """A real photo ($CID_TEST_PHOTOS/biden.jpg) the stand-in detector finds no red square in, else a smooth gradient."""
    photos = os.environ.get("CID_TEST_PHOTOS")
    source = os.path.join(photos, "biden.jpg") if photos else None
    if source and os.path.isfile(source):
        Image.open(source).convert("RGB").save(path)
    else:
        ramp = np.linspace(0, 255, 512, dtype=np.float32)
        image = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (512, 1)), np.tile(ramp[:, None], (1, 512))], -1)
        Image.fromarray(image.astype(np.uint8)).save(path)
    return path


class TinyWorld:
    """Paths of the tiny models and of the prepared stand-in data set shared by the training tests."""

    def __init__(self, root):
        self.root = str(root)
        self.base = os.path.join(self.root, "base")
        self.vision = os.path.join(self.root, "vision")
        self.insightface = os.path.join(self.root, "insightface")
        self.photos = os.path.join(self.root, "photos")
        self.data = os.path.join(self.root, "data")
        self.manifest = os.path.join(self.data, "manifest.json")
        self.report = None

    def config(self, output_dir, **overrides) -> dict:
        values = dict(base_model=self.base, image_encoder=self.vision, manifest=self.manifest, output_dir=str(output_dir),
                      resolution=RESOLUTION, report_to="none", validation_timesteps=[500], checkpointing_steps=1000)
        values.update(overrides)
        return values


CUSTOM_CAPTION = "A smiling person in a red square. The background is dark."


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """Tiny base model and image encoder, stand-in insightface, and a data set prepared from
    4 stand-in faces, one real photo without a face, one unreadable and one tiny image."""
    from consistentid_core.face.analysis import get_face_analysis
    from training.prepare_data import prepare_dataset, read_captions

    world = TinyWorld(tmp_path_factory.mktemp("training"))
    save_tiny_base_model(world.base)
    save_tiny_image_encoder(world.vision)
    make_insightface(world.insightface)
    write_face_photos(world.photos, 4)
    photo_without_face(os.path.join(world.photos, "no_face.jpg"))
    with open(os.path.join(world.photos, "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is no JPEG")
    Image.fromarray(red_square_image(96, squares=((48, 48, 32, 255),))).save(os.path.join(world.photos, "tiny.png"))
    captions = os.path.join(world.root, "captions.jsonl")
    with open(captions, "w", encoding="utf-8") as f:
        f.write(json.dumps({"file": "face_00.png", "caption": CUSTOM_CAPTION}) + "\n")
    analysis = get_face_analysis(os.path.join(world.insightface, "models", "buffalo_l"), ["CPUExecutionProvider"])
    world.report = prepare_dataset(world.photos, world.data, analysis, TinyFaceParser(), read_captions(captions),
                                   progress=False)
    return world


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """Training tests run torch on one thread.

    On a 2-core machine shared with any other busy process, two OpenMP threads wait on each other
    at every kernel barrier: the training tests took 7 minutes that way instead of 100 s.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
