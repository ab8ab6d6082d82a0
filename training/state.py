"""Where a run keeps its checkpoints and how it finds one to resume from.

``<output_dir>/checkpoints/checkpoint-<step>/`` holds Accelerate's state (trainable weights,
optimizer, RNG, grad scaler, accumulation counter), ``training_state.json`` (step, micro-step,
the settings that must not change on resume) and ``consistentid.safetensors``, the adapter in the
official key layout that the ComfyUI loader reads.  The final adapter is
``<output_dir>/consistentid.safetensors``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

from consistentid_core.errors import TrainingConfigError

logger = logging.getLogger("consistentid.training")

CHECKPOINTS = "checkpoints"
STATE_FILE = "training_state.json"
ADAPTER_FILE = "consistentid.safetensors"
_NAME = re.compile(r"^checkpoint-(\d+)$")
# Changing one of these between the saved run and the resumed one changes what a step draws.
RESUME_KEYS = ("seed", "train_batch_size", "gradient_accumulation_steps", "resolution", "text_drop_rate",
               "background_mask_prob", "num_processes")


def checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, CHECKPOINTS, f"checkpoint-{step}")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    root = os.path.join(output_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _NAME.match(name)
        folder = os.path.join(root, name)
        # The state file is written last: a folder without it is an interrupted save.
        if match and os.path.isfile(os.path.join(folder, STATE_FILE)):
            found.append((int(match.group(1)), folder))
    return sorted(found)


def resolve_resume(output_dir: str, value: str) -> str:
    if value == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise TrainingConfigError(f"resume_from_checkpoint is 'latest' but {os.path.join(output_dir, CHECKPOINTS)} "
                                      "holds no complete checkpoint")
        return found[-1][1]
    folder = os.path.expanduser(value)
    if not os.path.isfile(os.path.join(folder, STATE_FILE)):
        raise TrainingConfigError(f"resume_from_checkpoint {folder} is not a complete training checkpoint (no {STATE_FILE})")
    return folder


def write_state(folder: str, state: dict) -> None:
    tmp = os.path.join(folder, STATE_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2)
    os.replace(tmp, os.path.join(folder, STATE_FILE))


def read_state(folder: str) -> dict:
    with open(os.path.join(folder, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)


def check_resume_settings(saved: dict, current: dict, folder: str) -> None:
    changed = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in RESUME_KEYS if saved.get(k) != current.get(k)]
    if changed:
        logger.warning("resuming from %s with changed settings (%s); the run continues but no longer replays "
                       "what an uninterrupted run would have done", folder, "; ".join(changed))


def rotate(output_dir: str, limit: int | None) -> None:
    """Deletes the oldest checkpoints so that at most ``limit`` remain."""
    if not limit:
        return
    found = list_checkpoints(output_dir)
    for _, folder in found[: max(0, len(found) - limit)]:
        logger.info("removing old checkpoint %s", folder)
        shutil.rmtree(folder, ignore_errors=True)
