"""One training step and one validation pass (spec §3.3), on models set up for Accelerate.

Every random draw of a step (VAE sample, noise, timesteps, background masking) comes from a
generator seeded by (seed, process, micro-step): a resumed run redraws exactly what an
uninterrupted run draws, and each DDP process draws differently.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from consistentid_core.face.clip_features import CLIP_TOKENS, CLIP_WIDTH
from consistentid_core.face.parsing import MAX_REGIONS

from .base_models import BaseModels
from .losses import AttentionRecorder, localisation_loss, noise_loss

VALIDATION_STREAM = 1_000_003  # keeps validation draws apart from any training micro-step


def step_generator(seed: int, process: int, micro_step: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, process, micro_step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass
class StepOutput:
    loss: torch.Tensor
    noise: torch.Tensor
    localisation: torch.Tensor
    maps: dict
    background_masked: bool


class ConsistentIDStep:
    """Frozen encoders + the (prepared) trainee -> the loss of one batch."""

    def __init__(self, models: BaseModels, trainee, recorder: AttentionRecorder, *, device, weight_dtype,
                 resolution: int, localisation_weight: float, background_mask_prob: float):
        self.models = models
        self.trainee = trainee
        self.recorder = recorder
        self.device = device
        self.weight_dtype = weight_dtype
        self.resolution = resolution
        self.localisation_weight = localisation_weight
        self.background_mask_prob = background_mask_prob
        vae = models.vae
        # A VAE whose config asks for it (SDXL's overflows in fp16) encodes in fp32, as diffusers' pipelines do.
        self.vae_dtype = torch.float32 if vae.config.get("force_upcast", False) else weight_dtype
        self.scaling = vae.config.scaling_factor
        self.shift = vae.config.get("shift_factor") or 0.0

    @torch.no_grad()
    def _latents(self, pixels, generator):
        vae = self.models.vae
        dist = vae.encode(pixels.to(self.device, self.vae_dtype)).latent_dist
        noise = torch.randn(dist.mean.shape, generator=generator).to(dist.mean.device, dist.mean.dtype)
        latents = dist.mean + dist.std * noise
        return ((latents - self.shift) * self.scaling).to(self.weight_dtype)

    @torch.no_grad()
    def _text(self, batch):
        models = self.models
        ids = batch["input_ids"].to(self.device)
        if models.text_encoder_2 is None:
            return models.text_encoder(ids)[0], None
        first = models.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        out = models.text_encoder_2(batch["input_ids_2"].to(self.device), output_hidden_states=True)
        return torch.cat([first, out.hidden_states[-2]], dim=-1), out.text_embeds

    @torch.no_grad()
    def _vision(self, pixels):
        encoder = self.models.image_encoder
        return encoder(pixels.to(self.device, self.weight_dtype), output_hidden_states=True).hidden_states[-2]

    @torch.no_grad()
    def _regions(self, batch):
        """[B, 5, 257, 1280]: features of the valid regions; the FacialEncoder never reads the others."""
        valid = batch["region_valid"].to(self.device)
        pixels = batch["region_pixels"].to(self.device)
        features = torch.zeros(valid.shape[0], MAX_REGIONS, CLIP_TOKENS, CLIP_WIDTH, device=self.device, dtype=self.weight_dtype)
        if valid.any():
            features[valid] = self._vision(pixels[valid]).to(features.dtype)
        return features

    def _added_cond(self, pooled, batch_size):
        if pooled is None:
            return None
        res = self.resolution
        # (original size, crop top-left, target size) of SDXL's micro-conditioning: square, uncropped.
        time_ids = torch.tensor([res, res, 0, 0, res, res], device=self.device, dtype=self.weight_dtype)
        return {"text_embeds": pooled.to(self.weight_dtype), "time_ids": time_ids.repeat(batch_size, 1)}

    def __call__(self, batch, generator: torch.Generator, timesteps=None, background: bool | None = None) -> StepOutput:
        scheduler = self.models.scheduler
        latents = self._latents(batch["pixel_values"], generator)
        batch_size = latents.shape[0]
        prompt_embeds, pooled = self._text(batch)
        clip_embeds = self._vision(batch["clip_pixels"])
        region_features = self._regions(batch)

        noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        drawn_t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        timesteps = drawn_t if timesteps is None else torch.as_tensor(timesteps).expand(batch_size)
        timesteps = timesteps.to(self.device, torch.long)
        drawn_bg = bool(torch.rand((), generator=generator) < self.background_mask_prob)
        background = drawn_bg if background is None else background

        noisy = scheduler.add_noise(latents, noise, timesteps)
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        region_valid = batch["region_valid"].to(self.device)
        with self.recorder.recording() as maps:
            prediction = self.trainee(
                noisy, timesteps, prompt_embeds, batch["token_mask"].to(self.device), region_features, region_valid,
                batch["id_embed"].to(self.device), clip_embeds, self._added_cond(pooled, batch_size),
            )
        mask = batch["background_mask"].to(self.device) if background else None
        l_noise = noise_loss(prediction, target, mask)
        l_attn = localisation_loss(maps, batch["facial_token_index"].to(self.device),
                                   batch["facial_masks"].to(self.device), region_valid, tuple(latents.shape[-2:]))
        loss = l_noise + self.localisation_weight * l_attn
        return StepOutput(loss, l_noise, l_attn, maps, background)

    @torch.no_grad()
    def validate(self, loader, timesteps, seed: int) -> dict:
        """Localisation score (mean attention inside minus outside the regions, -1..1, higher is better)
        and noise MSE of the held-out faces, at fixed timesteps with fixed noise."""
        scores, mses, batches = [], [], 0
        for index, batch in enumerate(loader):
            for t in timesteps:
                out = self(batch, step_generator(seed, VALIDATION_STREAM + index, int(t)), timesteps=int(t), background=False)
                scores.append(-float(out.localisation))
                mses.append(float(out.noise))
            batches += 1
        if not batches:
            return {}
        return {"val/localisation_score": float(np.mean(scores)), "val/noise_mse": float(np.mean(mses))}
