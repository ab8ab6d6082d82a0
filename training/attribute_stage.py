"""The FlexID attribute stage: train the attribute branch on top of frozen identity weights.

    python -m training.train --stage attributes --init-from ConsistentID-v1.bin --config train.yaml

Everything ConsistentID already has (FacialEncoder, ID projection, LoRA, to_k_ip/to_v_ip) comes
from ``init_from`` and stays frozen; only the branch (resampler + to_k_attr/to_v_attr) trains, with
the identity and attribute streams dropped independently (``id_drop_rate``, ``attribute_drop_rate``).
The data is the one ``prepare_data`` made: the attribute pictures (hair, glasses, hat, earrings,
necklace, face outline) are cut from each photo with its stored label map.  The result,
``<output_dir>/consistentid_attributes.safetensors``, is the identity weights plus the branch: it
loads in the nodes as before, and Apply ConsistentID to Model then takes attribute embeds.

This version runs in one process (no DDP) and saves no resumable state (``resume_from_checkpoint``
is refused; a snapshot can be the next run's ``init_from``); ``max_train_steps`` and
``checkpointing_steps`` still apply: a weight snapshot is written at every checkpointing step, the
oldest ones this run wrote are deleted beyond ``checkpoints_total_limit``, and every file is
written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from consistentid_core.attributes.branch import AttributeBranch, attribute_branch_from_extra, attribute_state_dict
from training.attribute_branch_training import (
    AttributeBatch, attribute_loss_step, attribute_optimizer, install_attribute_processors,
)
from consistentid_core.attributes.photos import ATTRIBUTE_NAMES, attribute_images, attribute_regions
from consistentid_core.model.checkpoint import checkpoint_state_dict, load_checkpoint, save_checkpoint
from consistentid_core.face.clip_features import CLIP_TOKENS, CLIP_WIDTH, clip_pixel_values, zero_pixel_values
from consistentid_core.errors import TrainingConfigError

from .accelerator import make_accelerator
from .base_models import check_architecture, load_base_models
from .config import TrainConfig
from .dataset import ConsistentIDDataset, EpochSampler, open_image, read_label_map
from .disk import remove, replacing, write_errors
from .manifest import load_entries
from .modules import build_trainee
from .texts import DEFAULT_FACIAL_CAPTION
from .trainer import ConsistentIDStep, step_generator

logger = logging.getLogger("consistentid.training")

ATTRIBUTE_FILE = "consistentid_attributes.safetensors"
SLOTS = len(ATTRIBUTE_NAMES)


class AttributeDataset(Dataset):
    """The identity stage's samples plus ``attribute_pixels`` [S, 3, 224, 224] and ``attribute_valid`` [S]."""

    def __init__(self, base: ConsistentIDDataset, crop_mode: str = "crop"):
        self.base = base
        self.crop_mode = crop_mode

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        sample = self.base[index]
        entry = self.base.entries[index]
        regions = attribute_regions(read_label_map(entry.labels))
        pixels, valid = zero_pixel_values(SLOTS), torch.zeros(SLOTS, dtype=torch.bool)
        if regions:
            image = open_image(entry.image, "image").convert("RGB")
            for name, picture in zip(regions, attribute_images(image, regions, self.crop_mode)):
                slot = ATTRIBUTE_NAMES.index(name)
                pixels[slot], valid[slot] = clip_pixel_values(picture), True
        sample["attribute_pixels"], sample["attribute_valid"] = pixels, valid
        return sample


@dataclass
class AttributeResult:
    global_step: int
    weights_path: str
    history: list[dict] = field(default_factory=list)


class AttributeStage:
    def __init__(self, config: TrainConfig):
        if not config.init_from:
            raise TrainingConfigError(
                "the attribute stage trains on top of identity weights: set init_from to a ConsistentID file "
                "(the official ConsistentID-v1.bin / ConsistentID_SDXL-v1.bin, or one you trained)")
        self.config = config
        self.snapshots: list[str] = []  # the snapshot folders this run wrote, oldest first
        self.accelerator = accelerator = make_accelerator(config)
        if accelerator.num_processes > 1:
            raise TrainingConfigError("the attribute stage runs in one process in this version; "
                                      "start it with python -m training.train, not accelerate launch --multi_gpu")
        entries = load_entries(config.manifest, config.data_root, config.parsing_root, config.faceid_root,
                               config.max_problems_shown)
        self.models = models = load_base_models(config.base_model, config.image_encoder, config.base_model_config)
        init = load_checkpoint(config.init_from)
        self.arch = check_architecture(models, config.arch, init.layout, init.name)
        self.trainee = trainee = build_trainee(models, self.arch, init)
        trainee.requires_grad_(False).eval()
        existing = attribute_branch_from_extra(init.extra, init.layout, source=init.name)
        if existing is not None:
            logger.info("%s already has an attribute branch (%d tokens): training continues from it",
                        init.name, existing.num_tokens)
        self.branch = existing or AttributeBranch(init.layout, num_tokens=config.attribute_tokens)
        self.weight_dtype = torch.float32 if accelerator.mixed_precision == "no" else {
            "fp16": torch.float16, "bf16": torch.bfloat16}[accelerator.mixed_precision]
        device = accelerator.device
        for module in models.frozen():
            module.to(device=device, dtype=self.weight_dtype).requires_grad_(False)
        for module in models.unet.attn_processors.values():
            module.to(dtype=torch.float32)
        trainee.to(device)
        self.branch.to(device)
        self.stream = install_attribute_processors(models.unet, self.branch)
        optimizer = attribute_optimizer(self.branch, frozen=(trainee, models.unet), lr=config.learning_rate,
                                        weight_decay=config.weight_decay, betas=(config.adam_beta1, config.adam_beta2))
        base = ConsistentIDDataset(entries, models.tokenizer, models.tokenizer_2, config.resolution,
                                   config.text_drop_rate, config.seed, DEFAULT_FACIAL_CAPTION[models.family])
        self.dataset = AttributeDataset(base, config.attribute_crop)
        loader = DataLoader(self.dataset, batch_size=config.train_batch_size, collate_fn=default_collate,
                            sampler=EpochSampler(len(self.dataset), config.seed), num_workers=config.dataloader_num_workers)
        self.optimizer, self.loader = accelerator.prepare(optimizer, loader)
        self.encoders = ConsistentIDStep(models, trainee, None, device=device, weight_dtype=self.weight_dtype,
                                         resolution=config.resolution, localisation_weight=0.0, background_mask_prob=0.0)
        logger.info("attribute stage on %s: %d faces, branch of %d tokens, %.1f M trainable parameters", init.name,
                    len(entries), self.branch.num_tokens, sum(p.numel() for p in self.branch.parameters()) / 1e6)

    @torch.no_grad()
    def encode(self, batch, generator: torch.Generator) -> AttributeBatch:
        """Everything frozen runs here, once per batch: VAE, text and CLIP encoders."""
        enc, device = self.encoders, self.accelerator.device
        latents = enc._latents(batch["pixel_values"], generator)
        prompt_embeds, pooled = enc._text(batch)
        valid = batch["attribute_valid"].to(device)
        features = torch.zeros(valid.shape[0], SLOTS, CLIP_TOKENS, CLIP_WIDTH, device=device)
        if valid.any():
            features[valid] = enc._vision(batch["attribute_pixels"].to(device)[valid]).float()
        return AttributeBatch(
            latents=latents, prompt_embeds=prompt_embeds.float(), token_mask=batch["token_mask"].to(device),
            region_features=enc._regions(batch).float(), region_valid=batch["region_valid"].to(device),
            id_embeds=batch["id_embed"].to(device).float(), clip_embeds=enc._vision(batch["clip_pixels"]).float(),
            attribute_features=features, attribute_valid=valid,
            uncond_clip=enc._vision(zero_pixel_values(1)).float(),
            added_cond_kwargs=enc._added_cond(pooled, latents.shape[0]),
        )

    def loss(self, batch, step: int) -> torch.Tensor:
        config = self.config
        generator = step_generator(config.seed, 0, step)
        return attribute_loss_step(
            self.models.unet, self.stream, self.branch, self.trainee.facial_encoder, self.trainee.image_proj,
            self.models.scheduler, self.encode(batch, generator), generator=generator, p_id=config.id_drop_rate,
            p_attr=config.attribute_drop_rate, shortcut=self.trainee.shortcut)

    def save(self, path: str, global_step: int) -> str:
        ckpt = self.trainee.to_checkpoint()
        ckpt.extra = attribute_state_dict(self.branch)
        needed = sum(t.numel() * t.element_size() for t in checkpoint_state_dict(ckpt).values())
        with write_errors(f"the attribute weights of step {global_step}", path, needed,
                          "free space on that disk or set output_dir to a disk with room; the last snapshot in "
                          f"{os.path.join(self.config.output_dir, 'checkpoints')} can be the next run's init_from"):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with replacing(path) as tmp:
                save_checkpoint(ckpt, tmp, {"trained_steps": global_step, "stage": "attributes",
                                            "init_from": os.path.basename(self.config.init_from),
                                            "producer": "consistentid training"})
        return path

    def snapshot(self, global_step: int) -> str:
        """checkpoints/attributes-<step>/; beyond checkpoints_total_limit the oldest this run wrote are deleted
        (snapshots of other runs in the same output_dir are left alone)."""
        folder = os.path.join(self.config.output_dir, "checkpoints", f"attributes-{global_step}")
        self.save(os.path.join(folder, ATTRIBUTE_FILE), global_step)
        self.snapshots = [f for f in self.snapshots if f != folder] + [folder]
        limit = self.config.checkpoints_total_limit
        while limit and len(self.snapshots) > limit:
            old = self.snapshots.pop(0)
            logger.info("removing old snapshot %s", old)
            remove(old)
        return folder

    def run(self) -> AttributeResult:
        config = self.config
        per_epoch = len(self.loader)
        max_steps = config.max_train_steps or config.num_train_epochs * per_epoch
        history, step = [], 0
        progress = tqdm(total=max_steps, desc="attribute stage", unit="step")
        self.branch.train()
        while step < max_steps:
            self.loader.set_epoch(step // per_epoch)
            for batch in self.loader:
                loss = self.loss(batch, step)
                self.accelerator.backward(loss)
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.branch.parameters(), config.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                step += 1
                history.append({"step": step, "loss": float(loss.detach())})
                progress.update(1)
                progress.set_postfix(loss=f"{history[-1]['loss']:.4f}")
                if step % config.checkpointing_steps == 0 and step < max_steps:
                    self.snapshot(step)
                if step >= max_steps:
                    break
        progress.close()
        final = self.save(os.path.join(config.output_dir, ATTRIBUTE_FILE), step)
        return AttributeResult(step, final, history)


def train_attributes(config: TrainConfig) -> AttributeResult:
    return AttributeStage(config).run()
