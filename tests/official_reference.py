"""A functional re-statement of the official ConsistentID modules, written from the spec's text.

It works directly on state dicts (no nn.Module), so it shares no code with
``consistentid_core.model.networks`` and can serve as the independent side of the parity tests.  It keeps
the official in-place write of the FacialEncoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _ln(x, sd, prefix):
    return F.layer_norm(x, (x.shape[-1],), sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps=1e-5)


def _lin(x, sd, prefix, bias=True):
    return F.linear(x, sd[f"{prefix}.weight"], sd.get(f"{prefix}.bias") if bias else None)


def perceiver_attention(sd, prefix, x, latents, heads, dim_head=64):
    x = _ln(x, sd, f"{prefix}.norm1")
    lat = _ln(latents, sd, f"{prefix}.norm2")
    q = F.linear(lat, sd[f"{prefix}.to_q.weight"])
    kv = F.linear(torch.cat([x, lat], dim=1), sd[f"{prefix}.to_kv.weight"])
    k, v = kv.chunk(2, dim=-1)

    def split(t):
        b, n, w = t.shape
        return t.reshape(b, n, heads, w // heads).permute(0, 2, 1, 3)

    q, k, v = split(q), split(k), split(v)
    s = 1 / (dim_head ** 0.25)
    w = torch.matmul(q * s, (k * s).transpose(-1, -2))
    w = torch.softmax(w.float(), dim=-1).type(w.dtype)
    out = torch.matmul(w, v).permute(0, 2, 1, 3)
    out = out.reshape(out.shape[0], out.shape[1], -1)
    return F.linear(out, sd[f"{prefix}.to_out.weight"])


def feed_forward(sd, prefix, x):
    h = _ln(x, sd, f"{prefix}.0")
    h = F.linear(h, sd[f"{prefix}.1.weight"])
    h = F.gelu(h)
    return F.linear(h, sd[f"{prefix}.3.weight"])


def resampler(sd, prefix, latents, x, depth, heads):
    h = _lin(x, sd, f"{prefix}.proj_in")
    for i in range(depth):
        latents = perceiver_attention(sd, f"{prefix}.layers.{i}.0", h, latents, heads) + latents
        latents = feed_forward(sd, f"{prefix}.layers.{i}.1", latents) + latents
    latents = _lin(latents, sd, f"{prefix}.proj_out")
    return _ln(latents, sd, f"{prefix}.norm_out")


def proj_plus(sd, id_embeds, clip_embeds, shortcut=False, scale=1.0):
    c = sd["norm.weight"].shape[0]
    x = _lin(id_embeds, sd, "proj.0")
    x = F.gelu(x)
    x = _lin(x, sd, "proj.2")
    x = x.reshape(-1, 4, c)
    x = _ln(x, sd, "norm")
    out = resampler(sd, "perceiver_resampler", x, clip_embeds, depth=4, heads=c // 64)
    if shortcut:
        out = x + scale * out
    return out


def _mlp(sd, prefix, x, residual):
    h = _ln(x, sd, f"{prefix}.layernorm")
    h = _lin(h, sd, f"{prefix}.fc1")
    h = F.gelu(h)
    h = _lin(h, sd, f"{prefix}.fc2")
    return x + h if residual else h


def facial_encoder_inplace(sd, prompt_embeds, parts, token_mask, valid_mask):
    """Writes into ``prompt_embeds`` as the official module does, and returns it."""
    b, n = parts.shape[:2]
    lat = sd["visual_projection.latents"].repeat(b * n, 1, 1)
    r = resampler(sd, "visual_projection", lat, parts.reshape(b * n, 257, 1280), depth=8, heads=16)
    r = r.reshape(b, n, 1, -1)
    r_valid = r.flatten(0, 1)[valid_mask.flatten()].reshape(-1, r.shape[-1])
    e = prompt_embeds.shape[-1]
    t = prompt_embeds.reshape(-1, e)[token_mask.flatten()]
    assert token_mask.sum() == r_valid.shape[0]
    y = _mlp(sd, "fuse_module.mlp1", torch.cat([t, r_valid], dim=-1), residual=False) + t
    y = _mlp(sd, "fuse_module.mlp2", y, residual=True)
    y = _ln(y, sd, "fuse_module.layer_norm")
    prompt_embeds.view(-1, e).masked_scatter_(token_mask.flatten()[:, None], y)
    return prompt_embeds


def _sdpa(q, k, v, heads):
    def split(t):
        b, n, w = t.shape
        return t.reshape(b, n, heads, w // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


def processor_unmerged(weights, lora, x, context, heads, ip_tokens=None, scale=1.0):
    """The official processors: base weights W plus separate LoRA products U(D x)."""

    def with_lora(name, linear, inp):
        base = F.linear(inp, weights[f"{linear}.weight"], weights.get(f"{linear}.bias"))
        return base + F.linear(F.linear(inp, lora[f"{name}.down.weight"]), lora[f"{name}.up.weight"])

    ctx = x if context is None else context
    q = with_lora("to_q_lora", "to_q", x)
    k = with_lora("to_k_lora", "to_k", ctx)
    v = with_lora("to_v_lora", "to_v", ctx)
    h = _sdpa(q, k, v, heads)
    if ip_tokens is not None:
        h = h + scale * _sdpa(q, F.linear(ip_tokens, lora["to_k_ip.weight"]), F.linear(ip_tokens, lora["to_v_ip.weight"]), heads)
    return with_lora("to_out_lora", "to_out.0", h)


def processor_merged(weights, lora, x, context, heads, ip_tokens=None, scale=1.0):
    """The same layer with every LoRA folded into its weight: W' = W + up @ down."""

    def merged(name, linear):
        return weights[f"{linear}.weight"] + lora[f"{name}.up.weight"] @ lora[f"{name}.down.weight"]

    ctx = x if context is None else context
    q = F.linear(x, merged("to_q_lora", "to_q"))
    k = F.linear(ctx, merged("to_k_lora", "to_k"))
    v = F.linear(ctx, merged("to_v_lora", "to_v"))
    h = _sdpa(q, k, v, heads)
    if ip_tokens is not None:
        h = h + scale * _sdpa(q, F.linear(ip_tokens, lora["to_k_ip.weight"]), F.linear(ip_tokens, lora["to_v_ip.weight"]), heads)
    return F.linear(h, merged("to_out_lora", "to_out.0"), weights["to_out.0.bias"])
