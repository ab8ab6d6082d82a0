"""The two ConsistentID networks, with the official state-dict layout.

``FacialEncoder`` pools each CLIP-encoded facial region to one vector and fuses it into the text
embedding of the noun that names the region; ``ProjPlusModel`` turns an ArcFace embedding plus
CLIP tokens of the whole photo into the 4 global ID tokens.  Parameter names, norm eps (1e-5),
the erf GELU and the ``dim_head ** -0.25`` split scaling of the perceiver attention all follow
the official modules so that released weights give the same numbers.
"""

from __future__ import annotations

import torch
from torch import nn


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """LN -> Linear -> GELU -> Linear, no biases on the Linears (keys 0.*, 1.weight, 3.weight)."""
    inner = dim * mult
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner, bias=False),
        nn.GELU(),
        nn.Linear(inner, dim, bias=False),
    )


class PerceiverAttention(nn.Module):
    """Latents attend to the image tokens and to themselves; the caller adds the residual."""

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.dim_head = dim_head
        self.heads = heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, latents: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``key_mask`` [B, N] (optional, not in the official model): image tokens to ignore."""
        x = self.norm1(x)
        latents = self.norm2(latents)
        b, n_lat, _ = latents.shape
        q = self._split_heads(self.to_q(latents))
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        k, v = self._split_heads(k), self._split_heads(v)
        # Scaling q and k separately (rather than the product) is what the weights were trained
        # with; it only matters in fp16, where it keeps the logits in range.
        scale = self.dim_head ** -0.25
        weights = (q * scale) @ (k * scale).transpose(-2, -1)
        logits = weights.float()
        if key_mask is not None:
            # The latents stay attendable, so a row with every image token masked still has finite weights.
            keep = torch.cat((key_mask.to(torch.bool), key_mask.new_ones(b, n_lat, dtype=torch.bool)), dim=1)
            logits = logits.masked_fill(~keep[:, None, None, :], float("-inf"))
        weights = torch.softmax(logits, dim=-1).to(weights.dtype)
        out = (weights @ v).transpose(1, 2).reshape(b, n_lat, -1)
        return self.to_out(out)


class _PerceiverStack(nn.Module):
    """proj_in -> depth x (attention + residual, feed-forward + residual) -> proj_out -> norm_out."""

    def __init__(self, dim, depth, dim_head, heads, embedding_dim, output_dim, ff_mult):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )

    def _run(self, latents: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)
        for attention, ff in self.layers:
            latents = attention(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class FacePerceiverResampler(_PerceiverStack):
    """The resampler of ProjPlusModel: it has no learned latents, the ID tokens are the latents."""

    def __init__(self, dim=768, depth=4, dim_head=64, heads=16, embedding_dim=1280, output_dim=768, ff_mult=4):
        super().__init__(dim, depth, dim_head, heads, embedding_dim, output_dim, ff_mult)

    def forward(self, latents: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._run(latents, x)


class AttentionMLP(_PerceiverStack):
    """Pools each region's CLIP tokens [N, 257, 1280] to one vector [N, 1, output_dim]."""

    def __init__(self, dim=1024, depth=8, dim_head=64, heads=16, embedding_dim=1280, output_dim=768, ff_mult=4):
        super().__init__(dim, depth, dim_head, heads, embedding_dim, output_dim, ff_mult)
        self.latents = nn.Parameter(torch.randn(1, 1, dim) / dim**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self.latents.repeat(x.shape[0], 1, 1), x)


class MLP(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, use_residual: bool = True):
        super().__init__()
        if use_residual and in_dim != out_dim:
            raise ValueError("a residual MLP needs in_dim == out_dim")
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.act_fn = nn.GELU()
        self.use_residual = use_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(self.act_fn(self.fc1(self.layernorm(x))))
        return x + y if self.use_residual else y


class FuseModule(nn.Module):
    """Fuses a text-token embedding t with a region embedding r into a replacement token."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.mlp1 = MLP(embed_dim * 2, embed_dim, embed_dim, use_residual=False)
        self.mlp2 = MLP(embed_dim, embed_dim, embed_dim, use_residual=True)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def forward(self, token: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        fused = self.mlp1(torch.cat((token, region), dim=-1)) + token
        return self.layer_norm(self.mlp2(fused))


class FacialEncoder(nn.Module):
    def __init__(self, embedding_dim: int = 1280, output_dim: int = 768, embed_dim: int = 768):
        super().__init__()
        self.visual_projection = AttentionMLP(embedding_dim=embedding_dim, output_dim=output_dim)
        self.fuse_module = FuseModule(embed_dim)

    @property
    def embed_dim(self) -> int:
        return self.fuse_module.layer_norm.normalized_shape[0]

    def encode_regions(self, parts: torch.Tensor) -> torch.Tensor:
        """[N, 257, 1280] region tokens -> [N, output_dim] pooled region embeddings."""
        return self.visual_projection(parts).squeeze(1)

    def forward(
        self,
        prompt_embeds: torch.Tensor,
        parts: torch.Tensor,
        token_mask: torch.Tensor,
        valid_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Returns a copy of ``prompt_embeds`` [B,77,E] whose marked rows hold the fused tokens.

        The i-th valid region of a row goes into the i-th marked token of that row (left to
        right).  Unlike the official module, the input tensor is never written to.
        """
        batch, n_regions = parts.shape[:2]
        token_mask = token_mask.to(torch.bool)
        valid_mask = valid_mask.to(torch.bool)
        if valid_mask.shape != (batch, n_regions) or token_mask.shape != prompt_embeds.shape[:2]:
            raise ValueError(
                f"FacialEncoder: masks of shape {tuple(token_mask.shape)} / {tuple(valid_mask.shape)} do not fit "
                f"prompt {tuple(prompt_embeds.shape)} and parts {tuple(parts.shape)}"
            )
        per_row_tokens = token_mask.sum(dim=1)
        per_row_valid = valid_mask.sum(dim=1)
        if not torch.equal(per_row_tokens, per_row_valid):
            raise ValueError(
                f"FacialEncoder: {per_row_tokens.tolist()} facial tokens are marked in the prompt rows but "
                f"{per_row_valid.tolist()} regions are valid; they must match one to one"
            )
        n_tokens = int(per_row_tokens.sum())
        out = prompt_embeds.clone()
        if n_tokens == 0:
            return out
        # Regions are independent, so encoding only the valid ones gives the same numbers.
        flat_parts = parts.reshape(batch * n_regions, *parts.shape[2:])[valid_mask.reshape(-1)]
        regions = self.encode_regions(flat_parts.to(self.visual_projection.proj_in.weight.dtype))
        flat = out.view(-1, out.shape[-1])
        rows = token_mask.reshape(-1)
        flat[rows] = self.fuse_module(flat[rows], regions.to(flat.dtype))
        return out


class ProjPlusModel(nn.Module):
    def __init__(
        self,
        cross_attention_dim: int = 768,
        id_embeddings_dim: int = 512,
        clip_embeddings_dim: int = 1280,
        num_tokens: int = 4,
    ):
        super().__init__()
        self.cross_attention_dim = cross_attention_dim
        self.num_tokens = num_tokens
        self.proj = nn.Sequential(
            nn.Linear(id_embeddings_dim, id_embeddings_dim * 2),
            nn.GELU(),
            nn.Linear(id_embeddings_dim * 2, cross_attention_dim * num_tokens),
        )
        self.norm = nn.LayerNorm(cross_attention_dim)
        self.perceiver_resampler = FacePerceiverResampler(
            dim=cross_attention_dim,
            depth=4,
            dim_head=64,
            heads=cross_attention_dim // 64,
            embedding_dim=clip_embeddings_dim,
            output_dim=cross_attention_dim,
            ff_mult=4,
        )

    def forward(
        self,
        id_embeds: torch.Tensor,
        clip_embeds: torch.Tensor,
        shortcut: bool = False,
        scale: float = 1.0,
    ) -> torch.Tensor:
        tokens = self.proj(id_embeds).reshape(-1, self.num_tokens, self.cross_attention_dim)
        tokens = self.norm(tokens)
        out = self.perceiver_resampler(tokens, clip_embeds)
        if shortcut:
            out = tokens + scale * out
        return out


def build_facial_encoder(arch: str) -> FacialEncoder:
    width = {"sd15": 768, "sdxl": 2048}[arch]
    return FacialEncoder(embedding_dim=1280, output_dim=width, embed_dim=width)


def build_image_proj(arch: str) -> ProjPlusModel:
    return ProjPlusModel(cross_attention_dim={"sd15": 768, "sdxl": 2048}[arch])
