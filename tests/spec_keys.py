"""The official checkpoint layouts (copied from the spec's key lists) and random checkpoints built from them."""

from __future__ import annotations

import os
import re

import torch

DATA = os.path.join(os.path.dirname(__file__), "data")


def read_layout(arch: str):
    """{part: {key: shape}} and the index -> diffusers processor name table, from tests/data/keys_<arch>.txt."""
    parts, names, section = {}, {}, None
    with open(os.path.join(DATA, f"keys_{arch}.txt")) as f:
        for line in f:
            line = line.rstrip("\n")
            header = re.match(r"## \[(\w+)\]", line)
            if header:
                section = header.group(1)
                parts[section] = {}
            elif line.startswith("## adapter_modules index"):
                section = "names"
            elif line and not line.startswith("#") and section:
                key, value = line.split("\t")
                if section == "names":
                    names[int(key)] = value
                else:
                    parts[section][key] = tuple(int(x) for x in value.strip("[]").split(","))
    return parts, names


def random_official_state(arch: str, seed: int = 0, proj_dtype=torch.bfloat16, fill=None):
    """A nested official-format dict {FacialEncoder, image_proj(_model), adapter_modules} of random tensors.

    LayerNorm weights get values near 1 and LoRA ups are non-zero so that every path is exercised.
    ``fill`` (a float) makes constant tensors instead, which is much faster for the SDXL sizes.
    """
    parts, _ = read_layout(arch)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for part, shapes in parts.items():
        dtype = proj_dtype if part.startswith("image_proj") else torch.float32
        state = {}
        for key, shape in shapes.items():
            if fill is not None:
                tensor = torch.full(shape, fill, dtype=dtype)
            else:
                fan_in = shape[-1] if len(shape) > 1 else 1
                tensor = torch.randn(shape, generator=gen) / max(fan_in, 1) ** 0.5
                if len(shape) == 1 and (key.endswith("norm1.weight") or "norm" in key or key.endswith(".0.weight")):
                    tensor = 1.0 + 0.1 * tensor
                tensor = tensor.to(dtype)
            state[key] = tensor
        out[part] = state
    return out


def flatten(nested: dict, proj_key: str | None = None) -> dict:
    flat = {}
    for part, state in nested.items():
        prefix = proj_key if (proj_key and part.startswith("image_proj")) else part
        flat.update({f"{prefix}.{k}": v for k, v in state.items()})
    return flat
