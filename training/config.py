"""Training settings: one dataclass, read from a YAML or JSON file, overridden from the command line.

Every field is also a command-line option (``learning_rate`` -> ``--learning-rate``); a value on
the command line wins over the file.  Unknown keys and out-of-range values are refused up front
with :class:`TrainingConfigError`, naming the key and, for a typo, the closest known one.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field

import yaml

from consistentid_core.errors import TrainingConfigError

ARCHS = ("auto", "sd15", "sdxl", "custom")
PRECISIONS = ("no", "fp16", "bf16")
STAGES = ("identity", "attributes")


def _opt(help_text: str, default=None, **extra):
    return field(default=default, metadata={"help": help_text, **extra})


@dataclass
class TrainConfig:
    # models
    base_model: str = _opt("diffusers folder (unet/ vae/ text_encoder/ tokenizer/ ...) or single-file checkpoint", "")
    base_model_config: str | None = _opt("diffusers folder with the configs a single-file base model needs offline")
    image_encoder: str = _opt("CLIP ViT-H/14: CLIPVisionModelWithProjection folder or .safetensors", "")
    arch: str = _opt("what the base model must be: auto, sd15, sdxl or custom", "auto", choices=ARCHS)
    init_from: str | None = _opt("ConsistentID checkpoint to fine-tune (default: train from scratch)")
    stage: str = _opt("identity: ConsistentID itself; attributes: the FlexID attribute branch on top of init_from, "
                      "which stays frozen", "identity", choices=STAGES)
    # data
    manifest: str = _opt("data set manifest (prepare_data's manifest.json or the official JSON list)", "")
    data_root: str | None = _opt("folder the resize_IMG paths are relative to (default: the manifest's folder)")
    parsing_root: str | None = _opt("folder the parsing_mask_IMG paths are relative to")
    faceid_root: str | None = _opt("folder the id_embed_file_* paths are relative to")
    validation_manifest: str | None = _opt("held-out faces for validation (default: the last entries of manifest)")
    num_validation_samples: int = _opt("entries held out of manifest for validation when there is no validation_manifest", 1)
    resolution: int = _opt("training resolution in pixels (official: 512 for SD1.5, 1024 for SDXL)", 512)
    text_drop_rate: float = _opt("probability of training a sample with empty text and no whole-image CLIP input", 0.1)
    dataloader_num_workers: int = _opt("data-loader worker processes", 0)
    max_problems_shown: int = _opt("how many data set problems an error lists", 20)
    # loss
    background_mask_prob: float = _opt("probability of masking the noise loss with the WithoutBackground mask", 0.5)
    localisation_weight: float = _opt("weight of the facial localisation loss (lambda)", 0.01)
    localisation_blocks: list[str] | None = _opt("UNet blocks whose cross-attention the localisation loss reads "
                                                 "(default: the official middle blocks)", nargs="+")
    # attribute stage
    attribute_tokens: int = _opt("attribute tokens the branch makes (attribute stage)", 4)
    id_drop_rate: float = _opt("probability of dropping a sample's identity tokens (attribute stage)", 0.1)
    attribute_drop_rate: float = _opt("probability of dropping a sample's attribute tokens (attribute stage)", 0.2)
    attribute_crop: str = _opt("how attribute pictures are cut: crop (around each) or full (masked frame)", "crop",
                               choices=("crop", "full"))
    # optimisation
    train_batch_size: int = _opt("samples per device and step", 1)
    gradient_accumulation_steps: int = _opt("micro-batches per optimizer step", 1)
    max_train_steps: int | None = _opt("optimizer steps to train (default: num_train_epochs over the data)", type=int)
    num_train_epochs: int = _opt("epochs when max_train_steps is not set", 100)
    learning_rate: float = _opt("AdamW learning rate", 1e-4)
    weight_decay: float = _opt("AdamW weight decay", 1e-2)
    adam_beta1: float = _opt("AdamW beta1", 0.9)
    adam_beta2: float = _opt("AdamW beta2", 0.999)
    adam_epsilon: float = _opt("AdamW epsilon", 1e-8)
    max_grad_norm: float = _opt("gradient clipping norm; 0 = off (official)", 0.0)
    mixed_precision: str | None = _opt("no, fp16 or bf16 (default: what `accelerate config` says)", choices=PRECISIONS)
    gradient_checkpointing: bool = _opt("recompute UNet activations in backward: less memory, more time", False)
    seed: int = _opt("seed of every random draw (noise, timesteps, text drop, shuffle)", 0)
    # output
    output_dir: str = _opt("where checkpoints, logs and the final consistentid.safetensors go", "")
    checkpointing_steps: int = _opt("save a resumable checkpoint every N optimizer steps", 1000)
    checkpoints_total_limit: int | None = _opt("keep at most this many checkpoints (oldest deleted)", type=int)
    resume_from_checkpoint: str | None = _opt("'latest' or a checkpoint folder to continue from")
    validation_steps: int | None = _opt("validate every N steps (default: checkpointing_steps; always at the end)", type=int)
    validation_timesteps: list[int] = _opt("timesteps the validation score is averaged over", (250, 500, 750), nargs="+", type=int)
    report_to: str = _opt("Accelerate tracker: tensorboard, wandb, all or none", "tensorboard")
    tracker_project_name: str = _opt("tracker project / run name", "consistentid")
    logging_steps: int = _opt("log the loss every N optimizer steps", 1)

    def validate(self) -> "TrainConfig":
        problems = []
        for name in ("base_model", "image_encoder", "manifest", "output_dir"):
            if not getattr(self, name):
                problems.append(f"{name} is required")
        for name in ("resolution", "train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
                     "checkpointing_steps", "logging_steps", "max_problems_shown", "attribute_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_train_steps", "validation_steps", "checkpoints_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be at least 1, got {value}")
        for name in ("text_drop_rate", "background_mask_prob", "id_drop_rate", "attribute_drop_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} is a probability (0..1), got {getattr(self, name)}")
        for name in ("learning_rate", "localisation_weight", "weight_decay", "max_grad_norm", "num_validation_samples",
                     "dataloader_num_workers"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        if self.stage == "attributes" and self.resume_from_checkpoint:
            problems.append("resume_from_checkpoint: the attribute stage saves weight snapshots, not resumable training "
                            "states. To continue from one, set init_from to it (<output_dir>/checkpoints/attributes-<step>/"
                            "consistentid_attributes.safetensors): the branch continues from its weights with a new "
                            "optimizer, counting max_train_steps from 0")
        if self.resolution % 8:
            problems.append(f"resolution must be a multiple of 8, got {self.resolution}")
        if any(not 0 <= t < 1000 for t in self.validation_timesteps):
            problems.append(f"validation_timesteps must lie in 0..999, got {list(self.validation_timesteps)}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                problems.append(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")
        if problems:
            raise TrainingConfigError("invalid training settings:\n" + "\n".join(f"  - {p}" for p in problems))
        return self

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _normalise_key(key: str) -> str:
    return key.replace("-", "_")


def read_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise TrainingConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise TrainingConfigError(f"config file {path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TrainingConfigError(f"config file {path} must hold a mapping of settings, not a {type(data).__name__}")
    return data


def _scalar_type(f):
    if isinstance(f.default, bool):
        return bool
    if isinstance(f.default, (int, float)):
        return type(f.default)
    return f.metadata.get("type") if "nargs" not in f.metadata else None


def _coerce(name: str, value, source: str):
    # YAML reads "1e-4" as text (it wants "1.0e-4"); such values are converted rather than refused.
    kind = _scalar_type(FIELDS[name])
    if kind in (int, float) and isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            raise TrainingConfigError(f"{source}: {name} must be a number, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is not None and value is not None and not isinstance(value, kind):
        raise TrainingConfigError(f"{source}: {name} must be {kind.__name__}, got {value!r}")
    return value


def make_config(values: dict, source: str = "settings") -> TrainConfig:
    """A validated TrainConfig from a {name: value} mapping; unknown names are refused."""
    values = {_normalise_key(k): v for k, v in values.items()}
    unknown = [k for k in values if k not in FIELDS]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, FIELDS, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TrainingConfigError(f"{source}: unknown setting(s) {', '.join(hints)}")
    config = TrainConfig(**{k: _coerce(k, v, source) for k, v in values.items()})
    for name in ("validation_timesteps", "localisation_blocks"):
        value = getattr(config, name)
        if value is not None and not isinstance(value, (list, tuple)):
            setattr(config, name, [value])
    return config.validate()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.train",
        description="Train ConsistentID (FacialEncoder, ID projection, attention processors) on a prepared data set.",
    )
    parser.add_argument("--config", help="YAML or JSON file of settings; command-line options override it")
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        options = {"help": f.metadata["help"], "default": None, "dest": name}
        if isinstance(f.default, bool):
            options["action"] = argparse.BooleanOptionalAction
        else:
            default_type = type(f.default) if isinstance(f.default, (int, float, str)) else str
            options["type"] = f.metadata.get("type", default_type)
            if "nargs" in f.metadata:
                options["nargs"] = f.metadata["nargs"]
        parser.add_argument(flag, **options)
    return parser


def parse_args(argv=None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    values = read_config_file(args.config) if args.config else {}
    values = {_normalise_key(k): v for k, v in values.items()}
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    return make_config(values, args.config or "command line")
