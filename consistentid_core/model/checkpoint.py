"""The one loader for every form of ConsistentID weights, and the safetensors writer.

Accepted: the official nested ``.bin`` (torch pickle, read with ``weights_only=True`` so a crafted
file cannot run code), the ID projection under ``image_proj`` or ``image_proj_model``, mixed
fp32/bf16 tensors, flat files with ``FacialEncoder.`` / ``image_proj(_model).`` /
``adapter_modules.`` prefixes (``unet.*`` training keys are ignored), and ``.safetensors``.
Everything that goes wrong raises :class:`CheckpointError` naming the file and the problem.

Nothing is built from a file before it has been checked: every entry must be a floating-point,
finite tensor under a string key, the layout metadata must be of plausible size, and every key and
shape must match what the modules need (computed on the meta device, which allocates nothing).
Only then are the modules built, so their size is bounded by the tensors the file really holds.

Files written by :func:`save_checkpoint` carry the UNet layout in their metadata (``unet_layout``),
which is what lets a file trained for another base model (widths other than 768/2048) load: its
modules are rebuilt from that layout.  Official files have no such metadata and are recognised by
their width alone.
"""

from __future__ import annotations

import json
import os
import pickle
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError
from .layers import ARCH_BY_WIDTH, ARCH_LABEL, LAYOUTS, UNetLayout, layer_table
from .networks import FacialEncoder, ProjPlusModel, build_facial_encoder, build_image_proj

FORMAT_NAME = "consistentid"
FORMAT_VERSION = "1"
CUSTOM_ARCH = "custom"
LAYOUT_METADATA_KEY = "unet_layout"
PROJ_KEYS = ("image_proj", "image_proj_model")
FLAT_PREFIXES = ("FacialEncoder.", "image_proj_model.", "image_proj.", "adapter_modules.")
IGNORED_PREFIXES = ("unet.",)
# Prefixes that later format versions may add (the FlexID attribute branch); kept, not rejected.
EXTRA_PREFIXES = ("attribute_",)
_SHOW = 4
WEIGHT_SUFFIXES = (".bin", ".safetensors", ".sft", ".pt", ".pth", ".ckpt")

# Bounds on what ``unet_layout`` metadata may describe.  Real UNets stay far below them (SDXL: 3
# blocks, widths up to 2048, depth 10); they keep a crafted header from making the layer table or
# the shape computation loop for ever.  Memory is bounded separately: nothing is built before the
# file's own tensors have been matched key by key.
MAX_LAYOUT_WIDTH = 8192
MAX_LAYOUT_BLOCKS = 8
MAX_TRANSFORMER_DEPTH = 64
MAX_LAYERS_PER_BLOCK = 8


@dataclass
class ConsistentIDCheckpoint:
    arch: str
    facial_encoder: FacialEncoder
    image_proj: ProjPlusModel
    adapter: dict[int, dict[str, torch.Tensor]]
    metadata: dict[str, str] = field(default_factory=dict)
    path: str = ""
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    layout: UNetLayout | None = None

    def __post_init__(self) -> None:
        if self.layout is None:
            if self.arch not in LAYOUTS:
                raise CheckpointError(f"a {self.arch!r} ConsistentID checkpoint needs the UNet layout it was trained on")
            self.layout = LAYOUTS[self.arch]

    @property
    def num_processors(self) -> int:
        return len(self.adapter)

    @property
    def name(self) -> str:
        return os.path.basename(self.path) if self.path else "<in memory>"

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{i}.{k}": v for i, tensors in self.adapter.items() for k, v in tensors.items()}

    def to(self, device=None, dtype=None) -> "ConsistentIDCheckpoint":
        self.facial_encoder.to(device=device, dtype=dtype)
        self.image_proj.to(device=device, dtype=dtype)
        self.adapter = {i: {k: v.to(device=device, dtype=dtype) for k, v in t.items()} for i, t in self.adapter.items()}
        self.extra = {k: v.to(device=device, dtype=dtype) for k, v in self.extra.items()}
        return self


def _fail(path: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{os.path.basename(path) or path}: {problem}")


def _is_safetensors(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < header_len < os.path.getsize(path)


def _read_safetensors(path: str):
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        return tensors, metadata, "safetensors"
    except Exception as exc:  # safetensors raises its own SafetensorError and OSError variants
        raise _fail(path, f"the safetensors file is truncated or corrupt ({exc}); download it again") from exc


def _read_torch_pickle(path: str):
    with open(path, "rb") as f:
        magic = f.read(4)
    # torch.save writes a zip archive (PK..) or, in the legacy format, a pickle (protocol byte 0x80).
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):
        raise _fail(path, "not a weight file: it is neither a torch checkpoint nor safetensors")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise _fail(
                path,
                "refused to load: the file contains Python objects other than tensors. Official ConsistentID "
                "files hold only tensors; this one is of another tool, or crafted to run code",
            ) from exc
        raise _fail(path, f"not a weight file: it is neither a torch checkpoint nor safetensors ({exc})") from exc
    except Exception as exc:  # the weights-only unpickler raises many kinds on damaged input
        raise _fail(path, f"not a readable torch checkpoint; it is truncated or corrupt ({type(exc).__name__}: {exc})") from exc
    return data, {}, "torch"


def _describe_folder(path: str) -> str:
    try:
        weights = sorted(n for n in os.listdir(path) if n.endswith(WEIGHT_SUFFIXES))
    except OSError:
        weights = []
    hint = f" (it holds {weights[:_SHOW]})" if weights else ""
    return f"{path} is a folder, not a weight file; choose the .bin or .safetensors file inside it{hint}"


def _read(path: str):
    if os.path.isdir(path):
        raise _fail(path, _describe_folder(path))
    if not os.path.isfile(path):
        raise _fail(path, f"file not found at {path}")
    if os.path.getsize(path) == 0:
        raise _fail(path, "the file is empty (0 bytes); the download was probably interrupted")
    if _is_safetensors(path):
        return _read_safetensors(path)
    if path.endswith((".safetensors", ".sft")):
        raise _fail(path, "has a .safetensors name but no valid safetensors header; it is truncated or corrupt")
    return _read_torch_pickle(path)


def _describe_foreign(keys) -> str:
    keys = list(keys)
    joined = " ".join(keys[:200])
    if "ip_adapter" in keys:
        return "this is an IP-Adapter checkpoint (keys 'image_proj', 'ip_adapter'); load it with an IP-Adapter node"
    if "model.diffusion_model." in joined or "state_dict" in keys:
        return "this is a Stable Diffusion model checkpoint; put it in models/checkpoints"
    if "lora_unet_" in joined or "lora_te" in joined:
        return "this is a LoRA; put it in models/loras"
    return f"this is not a ConsistentID checkpoint (found keys such as {keys[:_SHOW]})"


def _nested_extra(data: dict) -> dict:
    """Branch tensors beside the three official parts of a nested file: ``{"attribute_proj": {...}}``
    or flat ``"attribute_proj.x"`` entries, both returned flat (``attribute_proj.x``)."""
    extra = {}
    for key, value in data.items():
        if not (isinstance(key, str) and key.startswith(EXTRA_PREFIXES)):
            continue
        if isinstance(value, dict):
            extra.update({f"{key}.{sub}": tensor for sub, tensor in value.items()})
        else:
            extra[key] = value
    return extra


def _group(path: str, data) -> tuple[dict, dict, dict, dict]:
    """Split the raw file contents into (facial_encoder, image_proj, adapter, extra) state dicts."""
    if not isinstance(data, dict) or not data:
        raise _fail(path, f"this is not a ConsistentID checkpoint (it holds a {type(data).__name__}, not a dict of weights)")
    if "FacialEncoder" in data:
        missing = [k for k in ("adapter_modules",) if k not in data]
        proj_key = next((k for k in PROJ_KEYS if k in data), None)
        if proj_key is None:
            missing.insert(0, "image_proj (or image_proj_model)")
        if missing:
            raise _fail(path, f"the checkpoint lacks its {', '.join(missing)} part; the file is incomplete")
        parts = (data["FacialEncoder"], data[proj_key], data["adapter_modules"])
        for name, part in zip(("FacialEncoder", proj_key, "adapter_modules"), parts):
            if not isinstance(part, dict):
                raise _fail(path, f"its '{name}' entry is a {type(part).__name__}, expected a dict of tensors")
            if not part:
                raise _fail(path, f"its '{name}' entry is empty (no tensors); the file is incomplete or was "
                                  "saved before training wrote any weights: use the complete file")
        return dict(parts[0]), dict(parts[1]), dict(parts[2]), _nested_extra(data)
    if not all(isinstance(k, str) for k in data):
        raise _fail(path, _describe_foreign(map(str, data)))
    groups = {"FacialEncoder.": {}, "image_proj.": {}, "adapter_modules.": {}}
    extra, unknown = {}, []
    for key, value in data.items():
        if key.startswith(IGNORED_PREFIXES):
            continue
        prefix = next((p for p in FLAT_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            (extra.__setitem__(key, value) if key.startswith(EXTRA_PREFIXES) else unknown.append(key))
            continue
        target = "image_proj." if prefix.startswith("image_proj") else prefix
        groups[target][key[len(prefix):]] = value
    if not any(groups.values()):
        raise _fail(path, _describe_foreign(data.keys()))
    if unknown:
        raise _fail(path, f"unexpected keys {unknown[:_SHOW]} ({len(unknown)} in all); is this a ConsistentID file?")
    empty = [p.rstrip(".") for p, g in groups.items() if not g]
    if empty:
        raise _fail(path, f"the checkpoint lacks its {', '.join(empty)} part; the file is incomplete")
    return groups["FacialEncoder."], groups["image_proj."], groups["adapter_modules."], extra


def _non_finite_counts(tensor: torch.Tensor) -> tuple[int, int]:
    """(NaN count, Inf count).

    A float32 sum is NaN or Inf whenever one element is, and costs a fifth of an element-wise
    ``isfinite`` pass, so the usual finite tensor is cleared by the sum alone; only a sum that is not
    finite (damage, or real overflow of huge values) is counted element by element.
    """
    if bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return 0, 0
    values = tensor.float()
    return int(torch.isnan(values).sum()), int(torch.isinf(values).sum())


def _check_tensors(path, part, state):
    """Every entry a finite floating-point tensor under a string key, named by ``part.key`` when not.

    Integer or bool tensors would be cast to float silently and NaN/Inf would turn every image
    black, so both are refused here, before anything is built.
    """
    prefix = f"{part}." if part else ""
    not_named = [k for k in state if not isinstance(k, str)]
    if not_named:
        raise _fail(path, f"{part or 'the file'} has keys that are not names ({not_named[:_SHOW]}, "
                          f"{type(not_named[0]).__name__}); ConsistentID files key every tensor by a string")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        kinds = type(state[bad[0]]).__name__
        raise _fail(path, f"entries {[prefix + k for k in bad[:_SHOW]]} are not tensors (the first is a {kinds}); "
                          "the file is not a ConsistentID weight file or was converted wrongly")
    for key, tensor in state.items():
        if not tensor.dtype.is_floating_point:
            raise _fail(path, f"{prefix}{key} holds {tensor.dtype} values, but weights must be floating point; "
                              "the file was converted wrongly or is of another kind")
    damaged = {}
    for key, tensor in state.items():
        nan, inf = _non_finite_counts(tensor)
        if nan or inf:
            damaged[key] = (nan, inf, tensor.numel())
    if damaged:
        key, (nan, inf, total) = next(iter(damaged.items()))
        others = f", and {len(damaged) - 1} more {part or 'extra'} tensors are damaged too" if len(damaged) > 1 else ""
        raise _fail(path, f"{prefix}{key} holds {nan} NaN and {inf} Inf values (of {total}){others}; the weights "
                          "are damaged (a diverged training run or a broken conversion): use another copy")


def layout_metadata(layout: UNetLayout) -> str:
    return json.dumps(asdict(layout), sort_keys=True)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _implausible_layout(layout: UNetLayout) -> str | None:
    """Why ``layout`` cannot be a real UNet (wrong types, unequal lengths, sizes beyond the bounds), or None."""
    channels, attention, depth = layout.block_out_channels, layout.down_has_attention, layout.transformer_depth
    if not all(isinstance(v, tuple) for v in (channels, attention, depth)):
        return "block_out_channels, down_has_attention and transformer_depth must be lists"
    if not 1 <= len(channels) <= MAX_LAYOUT_BLOCKS:
        return f"{len(channels)} blocks (a UNet has 1 to {MAX_LAYOUT_BLOCKS})"
    if len(attention) != len(channels) or len(depth) != len(channels):
        return (f"{len(channels)} block widths but {len(attention)} attention flags and "
                f"{len(depth)} transformer depths")
    if not all(_is_int(c) and 1 <= c <= MAX_LAYOUT_WIDTH for c in channels):
        return f"block widths {list(channels)} (each must be a whole number from 1 to {MAX_LAYOUT_WIDTH})"
    if not all(isinstance(a, bool) for a in attention):
        return f"down_has_attention {list(attention)} (each must be true or false)"
    if not all(_is_int(d) and 0 <= d <= MAX_TRANSFORMER_DEPTH for d in depth):
        return f"transformer depths {list(depth)} (each must be a whole number from 0 to {MAX_TRANSFORMER_DEPTH})"
    if not (_is_int(layout.cross_attention_dim) and 1 <= layout.cross_attention_dim <= MAX_LAYOUT_WIDTH):
        return f"cross-attention width {layout.cross_attention_dim!r} (at most {MAX_LAYOUT_WIDTH})"
    if not (_is_int(layout.layers_per_block) and 1 <= layout.layers_per_block <= MAX_LAYERS_PER_BLOCK):
        return f"layers_per_block {layout.layers_per_block!r} (1 to {MAX_LAYERS_PER_BLOCK})"
    return None


def _layout_from_metadata(path, metadata) -> UNetLayout | None:
    text = metadata.get(LAYOUT_METADATA_KEY)
    if text is None:
        return None
    try:
        fields = json.loads(text)
        if not isinstance(fields, dict):
            raise TypeError(f"a {type(fields).__name__}, not an object")
        layout = UNetLayout(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    except (TypeError, ValueError) as exc:
        raise _fail(path, f"its {LAYOUT_METADATA_KEY} metadata is not a UNet layout ({exc}): {text[:200]}") from exc
    problem = _implausible_layout(layout)
    if problem:
        raise _fail(path, f"its {LAYOUT_METADATA_KEY} metadata describes no plausible UNet: {problem}; "
                          "the metadata is damaged or crafted")
    return layout


def _detect_arch(path, proj_state, facial_state, layout: UNetLayout | None) -> str:
    norm = proj_state.get("norm.weight")
    if norm is None:
        raise _fail(path, "cannot tell the architecture: image_proj has no 'norm.weight'")
    if norm.ndim != 1:
        raise _fail(path, f"image_proj.norm.weight has shape {list(norm.shape)}, expected one dimension (the width)")
    width = int(norm.shape[0])
    if layout is not None:
        if layout.cross_attention_dim != width:
            raise _fail(path, f"its {LAYOUT_METADATA_KEY} metadata says cross-attention width "
                              f"{layout.cross_attention_dim} but the weights are {width} wide")
        arch = next((name for name, known in LAYOUTS.items() if known == layout), CUSTOM_ARCH)
    else:
        arch = ARCH_BY_WIDTH.get(width)
    if arch is None:
        raise _fail(path, f"unknown architecture: cross-attention width {width} (ConsistentID knows 768 = SD1.5, "
                          f"2048 = SDXL; a file trained for another base model needs the {LAYOUT_METADATA_KEY} "
                          "metadata that save_checkpoint writes)")
    fuse = facial_state.get("fuse_module.layer_norm.weight")
    if fuse is not None and (fuse.ndim != 1 or int(fuse.shape[0]) != width):
        raise _fail(path, "inconsistent file: FacialEncoder.fuse_module.layer_norm.weight has shape "
                          f"{list(fuse.shape)} but image_proj is {width} wide")
    return arch


def _build_modules(path, arch: str, width: int) -> tuple[FacialEncoder, ProjPlusModel]:
    """Fresh modules for ``arch``; on the meta device (``with torch.device("meta")``) they cost nothing."""
    if arch in LAYOUTS:
        return build_facial_encoder(arch), build_image_proj(arch)
    # The perceiver of ProjPlusModel runs width // 64 heads of 64 channels.
    if width % 64:
        raise _fail(path, f"cross-attention width {width} is not a multiple of 64, which the ID projection needs")
    return FacialEncoder(embedding_dim=1280, output_dim=width, embed_dim=width), ProjPlusModel(cross_attention_dim=width)


def _check_layout(path, part, expected: dict, state: dict) -> None:
    """Same keys (naming the first few that differ) and the same shapes as ``expected`` {key: shape}."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing keys {missing[:_SHOW]} ({len(missing)} in all)")
        if unexpected:
            detail.append(f"unexpected keys {unexpected[:_SHOW]} ({len(unexpected)} in all)")
        raise _fail(path, f"{part} does not match the ConsistentID layout: " + "; ".join(detail))
    for key, shape in expected.items():
        if tuple(state[key].shape) != tuple(shape):
            raise _fail(path, f"shape mismatch at {part}.{key}: file has {list(state[key].shape)}, expected {list(shape)}")


def _state_shapes(module: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _module_shapes(path, arch: str, width: int) -> tuple[dict, dict]:
    """{key: shape} of the FacialEncoder and image_proj that ``arch``/``width`` needs, without allocating:
    the modules are made on the meta device, which records shapes only."""
    with torch.device("meta"):
        facial, proj = _build_modules(path, arch, width)
    return _state_shapes(facial), _state_shapes(proj)


def _load_module(path, part, module, state, dtype):
    _check_layout(path, part, _state_shapes(module), state)
    module.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    module.to(dtype).eval()
    module.requires_grad_(False)


def _expected_adapter_shapes(layout):
    shapes = {}
    for layer in layer_table(layout):
        h, c, r = layer.hidden_size, layer.context_dim, 128
        for name, inp in (("to_q_lora", h), ("to_k_lora", c), ("to_v_lora", c), ("to_out_lora", h)):
            shapes[f"{layer.index}.{name}.down.weight"] = (r, inp)
            shapes[f"{layer.index}.{name}.up.weight"] = (h, r)
        if layer.is_cross_attention:
            shapes[f"{layer.index}.to_k_ip.weight"] = (h, c)
            shapes[f"{layer.index}.to_v_ip.weight"] = (h, c)
    return shapes


def _check_adapter(path, arch, layout, state) -> dict:
    """The adapter's {key: shape} after checking ``state`` against it (keys are strings: see _check_tensors)."""
    expected = _expected_adapter_shapes(layout)
    indices = {k.split(".", 1)[0] for k in state}
    if not all(i.isascii() and i.isdigit() for i in indices):
        raise _fail(path, f"adapter_modules keys must start with a processor index, found {sorted(indices)[:_SHOW]}")
    count = 1 + max(int(i) for i in indices)
    want = len(layer_table(layout))
    if count != want:
        label = ARCH_LABEL.get(arch, "file of this UNet layout")
        raise _fail(path, f"adapter_modules has {count} processors; a {label} ConsistentID file has {want}")
    _check_layout(path, "adapter_modules", expected, state)
    return expected


def _adapter_tensors(expected, state, dtype):
    adapter: dict[int, dict[str, torch.Tensor]] = {}
    for key in expected:
        tensor = state[key]
        index, name = key.split(".", 1)
        adapter.setdefault(int(index), {})[name] = tensor.to(dtype).contiguous()
    return adapter


def load_checkpoint(path, device="cpu", dtype=None) -> ConsistentIDCheckpoint:
    """Reads any supported form of ConsistentID weights; every tensor is cast to ``dtype`` (default fp32)."""
    path = os.fspath(path)
    dtype = dtype or torch.float32
    data, metadata, source_format = _read(path)
    facial_state, proj_state, adapter_state, extra = _group(path, data)
    for part, state in (("FacialEncoder", facial_state), ("image_proj", proj_state),
                        ("adapter_modules", adapter_state), ("", extra)):
        _check_tensors(path, part, state)
    layout = _layout_from_metadata(path, metadata)
    arch = _detect_arch(path, proj_state, facial_state, layout)
    if metadata.get("arch") and metadata["arch"] != arch:
        raise _fail(path, f"metadata says {metadata['arch']} but the weights are {arch}")
    layout = layout or LAYOUTS[arch]
    width = layout.cross_attention_dim
    facial_shapes, proj_shapes = _module_shapes(path, arch, width)
    _check_layout(path, "FacialEncoder", facial_shapes, facial_state)
    _check_layout(path, "image_proj", proj_shapes, proj_state)
    adapter_shapes = _check_adapter(path, arch, layout, adapter_state)
    # Built only now that the file has supplied every tensor the modules hold, at the right shape:
    # a few-KB file claiming a huge width never gets this far.
    facial, proj = _build_modules(path, arch, width)
    _load_module(path, "FacialEncoder", facial, facial_state, dtype)
    _load_module(path, "image_proj", proj, proj_state, dtype)
    adapter = _adapter_tensors(adapter_shapes, adapter_state, dtype)
    meta = {"arch": arch, "source_format": source_format}
    meta.update(metadata)
    extra = {k: v.to(dtype) for k, v in extra.items()}
    ckpt = ConsistentIDCheckpoint(arch, facial, proj, adapter, meta, path, extra, layout)
    return ckpt.to(device=device)


def checkpoint_state_dict(ckpt: ConsistentIDCheckpoint, proj_key: str = "image_proj") -> dict[str, torch.Tensor]:
    """Flat official-prefix state dict (what :func:`save_checkpoint` writes)."""
    flat = {f"FacialEncoder.{k}": v for k, v in ckpt.facial_encoder.state_dict().items()}
    flat.update({f"{proj_key}.{k}": v for k, v in ckpt.image_proj.state_dict().items()})
    flat.update({f"adapter_modules.{k}": v for k, v in ckpt.adapter_state_dict().items()})
    flat.update(ckpt.extra)
    return flat


def save_checkpoint(ckpt: ConsistentIDCheckpoint, path, metadata: dict[str, str] | None = None) -> None:
    """Writes ``.safetensors`` with the official key layout and (arch, format version, UNet layout) metadata."""
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise CheckpointError(f"{os.path.basename(path)}: save_checkpoint writes .safetensors only (no pickles)")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in checkpoint_state_dict(ckpt).items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    meta.update({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "arch": ckpt.arch})
    meta[LAYOUT_METADATA_KEY] = layout_metadata(ckpt.layout)
    save_file(tensors, path, metadata=meta)


def describe(ckpt: ConsistentIDCheckpoint) -> str:
    counts = {
        "FacialEncoder": sum(p.numel() for p in ckpt.facial_encoder.parameters()),
        "image_proj": sum(p.numel() for p in ckpt.image_proj.parameters()),
        "adapter_modules": sum(v.numel() for t in ckpt.adapter.values() for v in t.values()),
    }
    return json.dumps({"file": ckpt.name, "arch": ckpt.arch, "processors": ckpt.num_processors, "params": counts})


_cache: "OrderedDict[tuple, ConsistentIDCheckpoint]" = OrderedDict()
_cache_lock = threading.Lock()
CACHE_SIZE = 2


def cached_checkpoint(path) -> ConsistentIDCheckpoint:
    """:func:`load_checkpoint` on CPU in fp32, cached by (file, size, modification time).

    Callers must treat the result as read-only: it is shared by every graph that uses the file.
    """
    real = os.path.realpath(os.fspath(path))
    stat = os.stat(real) if os.path.exists(real) else None
    key = (real, stat.st_size if stat else None, stat.st_mtime_ns if stat else None)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    ckpt = load_checkpoint(real)
    with _cache_lock:
        _cache[key] = ckpt
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return ckpt
