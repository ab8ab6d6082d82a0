"""The decoupled ID-token cross-attention as a per-block callable patch (framework-free).

Every cross-attention layer adds ``weight * attention(q, k_ip, v_ip)`` to its text attention,
where ``k_ip``/``v_ip`` are the layer's ``to_k_ip``/``to_v_ip`` applied to the 4 ID tokens of the
row's identity (cond) or of the zero image (uncond).  Since the ID tokens do not change during
sampling, ``k_ip``/``v_ip`` are projected once when the patch is built; a step then costs one
extra attention over 4 keys per layer.

The host (ComfyUI) supplies the attention kernel and calls the patch as
``patch(q, k, v, extra_options) -> out`` with ``extra_options`` holding ``n_heads``,
``cond_or_uncond``, ``sigmas`` and ``original_shape``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from ..errors import PromptError

AttentionFn = Callable[..., torch.Tensor]


def sdpa_attention(q, k, v, heads, **_ignored):
    """[B, N, heads*d] attention with PyTorch's kernel: the fallback outside a host."""
    b, n, width = q.shape
    d = width // heads
    split = lambda t: t.view(t.shape[0], t.shape[1], heads, d).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, n, width)


# What a mismatched batch is told, per kind of token source: (holder, what it holds, the fix).
BATCH_SOURCES = {
    "identity": ("ConsistentID embeds", "identities", "use one identity (combine the embeds) or exactly one per image"),
    "attribute": ("attribute embeds", "attribute photos", "use one attribute photo or exactly one per image"),
}


def rows_for_batch(cond_or_uncond, batch: int, cond_count: int, kind: str = "identity") -> list[tuple[int, int]]:
    """For every row of the attention batch: (0 = identity row / 1 = uncond row, identity index).

    ComfyUI stacks chunks of equal size, one per entry of ``cond_or_uncond`` (0 cond, 1 uncond;
    other values are conds of edit models).  One identity serves every row of a cond chunk;
    ``cond_count`` identities serve a chunk of exactly that many rows, one each.
    """
    chunks = list(cond_or_uncond) or [0]
    if batch % len(chunks):
        raise PromptError(f"attention batch {batch} does not split into {len(chunks)} cond/uncond chunks")
    per_chunk = batch // len(chunks)
    if cond_count not in (1, per_chunk):
        holder, noun, fix = BATCH_SOURCES[kind]
        raise PromptError(f"the latent batch has {per_chunk} images but the {holder} hold {cond_count} {noun}; {fix}")
    rows = []
    for kind in chunks:
        for i in range(per_chunk):
            rows.append((1, 0) if kind == 1 else (0, i if cond_count > 1 else 0))
    return rows


def token_grid(original_shape, seq_len: int) -> tuple[int, int]:
    """The (h, w) of the latent grid this attention runs on: the UNet halves with rounding up."""
    h, w = int(original_shape[-2]), int(original_shape[-1])
    for _ in range(8):
        if h * w == seq_len:
            return h, w
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    raise PromptError(f"cannot place {seq_len} attention tokens on a latent of {original_shape[-2]}x{original_shape[-1]}")


def normalise_mask(mask, source: str = "attn_mask") -> torch.Tensor:
    """A ComfyUI MASK as [M, H, W] float32 on the CPU; PromptError naming ``source`` when unusable.

    Mask nodes give [H, W] (one mask), [B, H, W] (ComfyUI's MASK) or [B, 1, H, W] (image-like);
    all three mean the same masks.  Checked when the patch is built, so that nothing fails inside
    a cross-attention layer in the middle of sampling.
    """
    if not torch.is_tensor(mask):
        raise PromptError(f"{source} is a {type(mask).__name__}, not a mask tensor: connect a MASK output")
    shape = tuple(mask.shape)
    if mask.ndim == 4 and shape[1] == 1:
        mask = mask[:, 0]
    elif mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise PromptError(f"{source} has shape {list(shape)}; a mask must be [H, W], [B, H, W] or [B, 1, H, W] "
                          "(convert an image with ComfyUI's 'Convert Image to Mask')")
    if 0 in mask.shape:
        raise PromptError(f"{source} has shape {list(shape)}, which holds no pixels; connect a non-empty mask")
    mask = mask.detach().float().cpu()
    bad = int((~torch.isfinite(mask)).sum())
    if bad:
        raise PromptError(f"{source} has {bad} NaN/Inf values (of {mask.numel()}); fix or replace the node that "
                          "made the mask (values must lie in 0..1)")
    return mask


def mask_for_batch(mask_count: int, latent_batch: int, source: str = "attn_mask") -> None:
    """PromptError unless ``mask_count`` masks fit a latent batch: one for all images, or one per image."""
    if mask_count not in (1, latent_batch):
        raise PromptError(f"{source} holds {mask_count} masks but the latent batch has {latent_batch} images; "
                          "give one mask for every image, or exactly one mask per latent image")


def resample_mask(mask: torch.Tensor, original_shape, seq_len: int) -> torch.Tensor:
    """MASK [M, H, W] in 0..1 -> [M, seq_len, 1] on this layer's token grid."""
    h, w = token_grid(original_shape, seq_len)
    resized = F.interpolate(mask[:, None].float(), size=(h, w), mode="bilinear", align_corners=False)
    return resized.reshape(mask.shape[0], h * w, 1)


@dataclass(frozen=True)
class IDProjections:
    """k_ip / v_ip of every cross-attention layer for the identity rows and the uncond row.

    ``cond[key]`` is [N, 4, H] (N identities) and ``uncond[key]`` is [1, 4, H]; tensors are shared,
    never written.  A per-(device, dtype) copy is made on first use, and the [B, 4, H] keys/values
    of a batch layout are built once and reused by every later step with the same layout.
    """

    cond_k: Mapping[object, torch.Tensor]
    cond_v: Mapping[object, torch.Tensor]
    uncond_k: Mapping[object, torch.Tensor]
    uncond_v: Mapping[object, torch.Tensor]
    _moved: dict = field(default_factory=dict, compare=False, repr=False)
    _batches: dict = field(default_factory=dict, compare=False, repr=False)
    kind: str = "identity"  # or "attribute": the FlexID attribute branch's tokens (see BATCH_SOURCES)

    # Batch layouts kept per layer, device and dtype; a sampler uses one or two (cond+uncond, or
    # a last lone cond), so the bound only guards against pathological callers.
    MAX_LAYOUTS = 8

    @classmethod
    def build(cls, to_k_ip: Mapping, to_v_ip: Mapping, cond_tokens: torch.Tensor, uncond_tokens: torch.Tensor,
              kind: str = "identity"):
        if kind not in BATCH_SOURCES:
            raise ValueError(f"kind must be one of {sorted(BATCH_SOURCES)}, got {kind!r}")
        with torch.no_grad():
            proj = lambda w, t: (t.float() @ w.float().T).contiguous()  # noqa: E731
            return cls(
                {k: proj(w, cond_tokens) for k, w in to_k_ip.items()},
                {k: proj(w, cond_tokens) for k, w in to_v_ip.items()},
                {k: proj(w, uncond_tokens) for k, w in to_k_ip.items()},
                {k: proj(w, uncond_tokens) for k, w in to_v_ip.items()},
                kind=kind,
            )

    @property
    def identities(self) -> int:
        return next(iter(self.cond_k.values())).shape[0]

    def _on(self, key, device, dtype) -> tuple[torch.Tensor, ...]:
        where = (key, str(device), dtype)
        moved = self._moved.get(where)
        if moved is None:
            moved = tuple(
                t[key].to(device=device, dtype=dtype) for t in (self.cond_k, self.cond_v, self.uncond_k, self.uncond_v)
            )
            self._moved[where] = moved
        return moved

    def for_rows(self, key, rows, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        layout = (key, str(device), dtype, tuple(rows))
        batch = self._batches.get(layout)
        if batch is None:
            ck, cv, uk, uv = self._on(key, device, dtype)
            batch = (
                torch.stack([uk[0] if kind == 1 else ck[i] for kind, i in rows]),
                torch.stack([uv[0] if kind == 1 else cv[i] for kind, i in rows]),
            )
            same_layer = [k for k in list(self._batches) if k[:3] == layout[:3]]  # a host may release meanwhile
            if len(same_layer) >= self.MAX_LAYOUTS:
                self._batches.pop(same_layer[0], None)
            self._batches[layout] = batch
        return batch

    def warm(self, device=None, dtype=None, keys=None) -> None:
        """Prepares the copies for a device/dtype move announced by the host (of ``keys``, default all)."""
        for key in self.cond_k if keys is None else keys:
            self._on(key, device or "cpu", dtype or torch.float32)

    def release(self, keys=None, keep_device=None) -> int:
        """Drops the per-device copies and batch layouts (of ``keys``, default all), except those on
        ``keep_device``; returns the bytes dropped.  The projections themselves stay, and a later
        step makes the copies it needs again: this is what a host's model unload calls."""
        keys = None if keys is None else set(keys)
        keep = None if keep_device is None else str(keep_device)
        dropped = 0
        for store in (self._moved, self._batches):
            for where in list(store):
                if (keys is None or where[0] in keys) and where[1] != keep:
                    dropped += sum(_nbytes(t) for t in store.pop(where, ()))
        return dropped

    @property
    def cached_bytes(self) -> int:
        """Bytes held in per-device copies and batch layouts (what :meth:`release` frees)."""
        return sum(_nbytes(t) for store in (self._moved, self._batches) for ts in list(store.values()) for t in ts)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.element_size() * tensor.nelement()


@dataclass(frozen=True)
class IDPatchSettings:
    weight: float = 1.0
    sigma_start: float = float("inf")  # active while sigma_end <= sigma <= sigma_start
    sigma_end: float = 0.0
    mask: torch.Tensor | None = None  # [M, H, W] in 0..1 (see normalise_mask), or None
    _masks: dict = field(default_factory=dict, compare=False, repr=False)

    def active(self, sigma: float) -> bool:
        return self.weight != 0 and self.sigma_end <= sigma <= self.sigma_start

    @property
    def whole_schedule(self) -> bool:
        """True when every sigma is inside the window: the step's sigma need not be read at all."""
        return self.sigma_start == float("inf") and self.sigma_end <= 0.0

    def mask_rows(self, original_shape, seq_len: int, batch: int, chunks: int, device, dtype) -> torch.Tensor:
        """The mask on this layer's token grid, one row per attention row: [batch, seq_len, 1].

        The same few shapes come back in every step, so each is resampled once.
        """
        where = (tuple(int(s) for s in original_shape[-2:]), seq_len, batch, chunks, str(device), dtype)
        rows = self._masks.get(where)
        if rows is None:
            # A mask per latent image: row r of every cond/uncond chunk belongs to image r % chunk.
            per_chunk = batch // max(1, chunks)
            mask_for_batch(self.mask.shape[0], per_chunk)
            mask = resample_mask(self.mask, original_shape, seq_len).to(device, dtype)
            rows = mask[[(r % per_chunk) if mask.shape[0] > 1 else 0 for r in range(batch)]]
            self._masks[where] = rows
        return rows

    def release(self) -> int:
        """Drops the resampled masks (rebuilt on the next step); returns the bytes dropped."""
        dropped = sum(_nbytes(t) for t in list(self._masks.values()))
        self._masks.clear()
        return dropped


def tensor_version(tensor: torch.Tensor) -> int | None:
    """The in-place-change counter of a tensor, or None for inference tensors, which keep none
    (they cannot be changed outside inference mode; samplers make a new sigma tensor per step)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


class _SigmaReader:
    """``sigmas[0]`` as a float, read once per sigmas tensor.

    Every cross-attention layer of a step gets the same ``sigmas`` tensor; reading it is a
    device-to-host copy that waits for the GPU, so it is done for the first layer only.  The
    tensor is held (it is tiny) so that its id cannot be reused while it is remembered, and an
    in-place change shows in its version counter where it has one.
    """

    def __init__(self):
        self._last: tuple | None = None

    def __call__(self, sigmas) -> float:
        last = self._last
        version = tensor_version(sigmas)
        if last is not None and last[0] is sigmas and last[1] == version:
            return last[2]
        value = float(sigmas.detach().flatten()[0])
        self._last = (sigmas, version, value)
        return value


_read_sigma = _SigmaReader()


def current_sigma(extra_options) -> float | None:
    sigmas = extra_options.get("sigmas")
    if sigmas is None:
        return None
    return _read_sigma(sigmas) if torch.is_tensor(sigmas) else float(sigmas[0])


def id_attention_delta(q, extra_options, key, projections: IDProjections, settings: IDPatchSettings, attention: AttentionFn):
    """``weight * attention(q, k_ip, v_ip)`` for the rows of this batch, or None outside the window."""
    if settings.weight == 0:
        return None
    if not settings.whole_schedule:
        sigma = current_sigma(extra_options)
        if sigma is not None and not settings.active(sigma):
            return None
    rows = rows_for_batch(extra_options.get("cond_or_uncond", [0]), q.shape[0], projections.identities, projections.kind)
    k_ip, v_ip = projections.for_rows(key, rows, q.device, q.dtype)
    ip = attention(q, k_ip, v_ip, extra_options["n_heads"])
    if settings.mask is not None:
        chunks = len(extra_options.get("cond_or_uncond", [0]))
        ip = ip * settings.mask_rows(extra_options["original_shape"], q.shape[1], q.shape[0], chunks, q.device, q.dtype)
    return settings.weight * ip
