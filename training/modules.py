"""What training updates: the FacialEncoder, the ID projection and every attention processor.

:class:`ConsistentIDTrainee` holds the trainable parts as submodules and the frozen UNet outside
its module tree, so that Accelerate's checkpoints and DDP's gradient buckets hold only what is
trained (a few hundred MB instead of the whole UNet), while one forward call still runs the
whole conditioned UNet, which DDP needs to see.
"""

from __future__ import annotations

import torch
from torch import nn

from training.attention_processors import install_processors
from consistentid_core.model.checkpoint import ConsistentIDCheckpoint
from consistentid_core.model.layers import LAYOUTS, UNetLayout
from consistentid_core.model.networks import FacialEncoder, ProjPlusModel, build_facial_encoder, build_image_proj

from .base_models import BaseModels


class ConsistentIDTrainee(nn.Module):
    def __init__(self, unet, facial_encoder: FacialEncoder, image_proj: ProjPlusModel, adapter_modules: nn.ModuleList,
                 arch: str, layout: UNetLayout):
        super().__init__()
        self.facial_encoder = facial_encoder
        self.image_proj = image_proj
        self.adapter_modules = adapter_modules
        self.arch = arch
        self.layout = layout
        # The official SDXL pipeline adds the projection's input tokens back (shortcut); train as it infers.
        self.shortcut = arch == "sdxl"
        self._frozen = {"unet": unet}

    @property
    def unet(self):
        return self._frozen["unet"]

    def context(self, prompt_embeds, token_mask, region_features, region_valid, id_embeds, clip_embeds):
        """[B, 77 + 4, C]: the text with the facial tokens fused in, then the 4 ID tokens.

        The frozen encoders' outputs arrive in the half-precision weight dtype; the trainable modules
        keep fp32 weights, and autocast (where Accelerate enables it) picks the matmul precision.
        """
        prompt_embeds, region_features = prompt_embeds.float(), region_features.float()
        text = self.facial_encoder(prompt_embeds, region_features, token_mask, region_valid)
        id_tokens = self.image_proj(id_embeds.float(), clip_embeds.float(), shortcut=self.shortcut)
        return torch.cat([text, id_tokens.to(text.dtype)], dim=1)

    def forward(self, noisy_latents, timesteps, prompt_embeds, token_mask, region_features, region_valid,
                id_embeds, clip_embeds, added_cond_kwargs=None):
        context = self.context(prompt_embeds, token_mask, region_features, region_valid, id_embeds, clip_embeds)
        unet = self.unet
        return unet(noisy_latents, timesteps, encoder_hidden_states=context.to(unet.dtype),
                    added_cond_kwargs=added_cond_kwargs).sample

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def to_checkpoint(self, metadata: dict | None = None) -> ConsistentIDCheckpoint:
        """The current weights as a checkpoint for the core's ``save_checkpoint`` (official key layout)."""
        adapter = {i: dict(proc.state_dict()) for i, proc in enumerate(self.adapter_modules)}
        return ConsistentIDCheckpoint(self.arch, self.facial_encoder, self.image_proj, adapter,
                                      metadata=dict(metadata or {}), layout=self.layout)


def new_modules(arch: str, width: int) -> tuple[FacialEncoder, ProjPlusModel]:
    if arch in LAYOUTS:
        return build_facial_encoder(arch), build_image_proj(arch)
    return FacialEncoder(embedding_dim=1280, output_dim=width, embed_dim=width), ProjPlusModel(cross_attention_dim=width)


def build_trainee(models: BaseModels, arch: str, init: ConsistentIDCheckpoint | None = None) -> ConsistentIDTrainee:
    """Trainable modules on a frozen UNet: from ``init`` (fine-tuning) or from scratch.

    From scratch the LoRAs start as the identity (zero ``up``) and ``to_k_ip``/``to_v_ip`` as
    copies of the UNet's ``to_k``/``to_v``, as in official training.
    """
    unet = models.unet
    layout = models.layout
    unet.requires_grad_(False)
    if init is not None:
        facial, proj = init.facial_encoder, init.image_proj
        adapter = install_processors(unet, init.adapter_state_dict())
    else:
        facial, proj = new_modules(arch, layout.cross_attention_dim)
        adapter = install_processors(unet)
    trainee = ConsistentIDTrainee(unet, facial, proj, adapter, arch, layout)
    trainee.float().train().requires_grad_(True)
    return trainee
