"""Where a run keeps its checkpoints and how it finds one to resume from.

``<output_dir>/checkpoints/checkpoint-<step>/`` holds Accelerate's state (trainable weights,
optimizer, RNG, grad scaler, accumulation counter), ``training_state.json`` (step, micro-step,
the settings that must not change on resume, the run it belongs to, its save order and the size
of every file) and ``consistentid.safetensors``, the adapter in the official key layout that the
ComfyUI loader reads.  The final adapter is ``<output_dir>/consistentid.safetensors``.

A checkpoint is written into ``checkpoints/.tmp-checkpoint-<step>`` and renamed when complete,
so a folder named ``checkpoint-<step>`` is always a finished save.  Every run has an id: rotation
(``checkpoints_total_limit``) only ever deletes checkpoints of the current run, ranked by the
order they were saved in, and ``latest`` is the checkpoint saved last, so checkpoints that an
earlier run left in the same ``output_dir`` are neither deleted nor resumed by mistake.
Resuming from a checkpoint older than the newest one of its run starts a branch with a new id:
the newer checkpoints stay where they are, and one of them that has the step a branch saves is
moved aside (``checkpoint-<step>.run-<id>``) rather than overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from dataclasses import dataclass, field

from consistentid_core.errors import CheckpointError, TrainingConfigError

from .disk import remove

logger = logging.getLogger("consistentid.training")

CHECKPOINTS = "checkpoints"
STATE_FILE = "training_state.json"
ADAPTER_FILE = "consistentid.safetensors"
STAGING_PREFIX = ".tmp-"
_NAME = re.compile(r"^checkpoint-(\d+)$")
# Changing one of these between the saved run and the resumed one changes what a step draws.
RESUME_KEYS = ("seed", "train_batch_size", "gradient_accumulation_steps", "resolution", "text_drop_rate",
               "background_mask_prob", "num_processes")


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint folder and what its state file says about it.

    ``run_id`` None and ``sequence`` 0 mark checkpoints written before runs had ids; they rank
    below every newer one and by step among themselves.
    """

    folder: str
    step: int
    micro_step: int
    run_id: str | None = None
    sequence: int = 0
    settings: dict = field(default_factory=dict)
    files: dict | None = None

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.folder))

    @property
    def order(self) -> tuple[int, int]:
        return self.sequence, self.step


def checkpoints_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS)


def checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(checkpoints_root(output_dir), f"checkpoint-{step}")


def staging_dir(output_dir: str, step: int) -> str:
    return os.path.join(checkpoints_root(output_dir), f"{STAGING_PREFIX}checkpoint-{step}")


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def write_state(folder: str, state: dict) -> None:
    tmp = os.path.join(folder, STATE_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2)
    os.replace(tmp, os.path.join(folder, STATE_FILE))


def read_state(folder: str) -> dict:
    with open(os.path.join(folder, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)


def read_checkpoint(folder: str) -> Checkpoint:
    """The checkpoint in ``folder``; CheckpointError when it has no readable state file."""
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder} is not a complete training checkpoint (no {STATE_FILE}); "
                              "pass a checkpoints/checkpoint-<step> folder or 'latest'")
    try:
        state = read_state(folder)
        step, micro_step = int(state["global_step"]), int(state["micro_step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {folder}: {STATE_FILE} is damaged ({type(exc).__name__}: {exc}); "
                              "resume from another checkpoint") from exc
    files = state.get("files")
    return Checkpoint(folder, step, micro_step, state.get("run_id"), int(state.get("sequence", 0)),
                      state.get("settings") or {}, files if isinstance(files, dict) else None)


def list_checkpoints(output_dir: str) -> list[Checkpoint]:
    """Every complete checkpoint of ``output_dir``, in the order they were saved (oldest first)."""
    root = checkpoints_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        folder = os.path.join(root, name)
        if not _NAME.match(name) or not os.path.isfile(os.path.join(folder, STATE_FILE)):
            continue  # staging folders, moved-aside ones and (before atomic saves) interrupted saves
        try:
            found.append(read_checkpoint(folder))
        except CheckpointError as exc:
            logger.warning("ignoring %s", exc)
    return sorted(found, key=lambda c: c.order)


def run_checkpoints(output_dir: str, run_id: str) -> list[Checkpoint]:
    return [c for c in list_checkpoints(output_dir) if c.run_id == run_id]


def _same_run(a: Checkpoint, b: Checkpoint) -> bool:
    return a.run_id == b.run_id


def resume_candidates(output_dir: str, value: str) -> list[Checkpoint]:
    """What to try, in order: for ``latest`` the checkpoint saved last, then the older ones of its run."""
    if value != "latest":
        return [read_checkpoint(os.path.expanduser(value))]
    found = list_checkpoints(output_dir)
    if not found:
        raise TrainingConfigError(f"resume_from_checkpoint is 'latest' but {checkpoints_root(output_dir)} "
                                  "holds no complete checkpoint")
    newest = found[-1]
    return [c for c in reversed(found) if _same_run(c, newest)]


def verify_files(ckpt: Checkpoint) -> None:
    """Compares the folder with the file sizes recorded at save time (checkpoints from before: not checked)."""
    for name, size in (ckpt.files or {}).items():
        path = os.path.join(ckpt.folder, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {ckpt.folder} is damaged: {name} is missing")
        actual = os.path.getsize(path)
        if actual != size:
            raise CheckpointError(f"checkpoint {ckpt.folder} is damaged: {name} has {actual} bytes but was saved "
                                  f"with {size} (cut short by a copy or a full disk?)")


def damaged(ckpt: Checkpoint, exc: BaseException) -> CheckpointError:
    if isinstance(exc, CheckpointError):
        return exc
    return CheckpointError(f"checkpoint {ckpt.folder} cannot be loaded ({type(exc).__name__}: {exc}); it is damaged, "
                           "or was saved by a run with other models or trainable parts")


def continued_run(output_dir: str, ckpt: Checkpoint, unusable: list[Checkpoint] = ()) -> tuple[str, dict | None]:
    """(run id, parent) for a run resumed from ``ckpt``.

    The run keeps its id when ``ckpt`` is the newest usable checkpoint of its run; resuming from an
    older one (or one from before run ids) starts a branch, so that the newer checkpoints are not
    ranked together with the branch's own and deleted by its rotation.
    """
    skipped = {c.folder for c in unusable}
    newer = [] if ckpt.run_id is None else [
        c for c in run_checkpoints(output_dir, ckpt.run_id)
        if c.sequence > ckpt.sequence and c.folder not in skipped and os.path.abspath(c.folder) != os.path.abspath(ckpt.folder)]
    if ckpt.run_id is not None and not newer:
        return ckpt.run_id, None
    run_id = new_run_id()
    if newer:
        logger.warning("%s is older than %s of the same run: continuing as a new branch (run %s). The newer "
                       "checkpoints are kept and not counted by checkpoints_total_limit; one with a step this "
                       "branch saves is moved aside, not overwritten", ckpt.name, ", ".join(c.name for c in newer), run_id)
    return run_id, {"run_id": ckpt.run_id, "step": ckpt.step, "folder": ckpt.folder}


def note_earlier_runs(output_dir: str) -> None:
    """Tells a fresh run about checkpoints that another run left in its output_dir (they are kept)."""
    found = list_checkpoints(output_dir)
    if found:
        logger.warning("%s already holds %d checkpoint(s) of an earlier run (%s): they are kept and not counted "
                       "by checkpoints_total_limit; 'latest' resumes this run once it has saved one",
                       checkpoints_root(output_dir), len(found), ", ".join(c.name for c in found[-3:]))


def clear_staging(folder: str) -> None:
    if os.path.exists(folder):
        logger.info("removing %s, left by an interrupted save", folder)
        remove(folder)


def _file_sizes(folder: str) -> dict[str, int]:
    sizes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder).replace(os.sep, "/")
            if relative != STATE_FILE:
                sizes[relative] = os.path.getsize(path)
    return sizes


def _make_room(final: str, run_id: str) -> None:
    """Clears the name ``final`` for a new save: an own or broken folder goes, another run's is moved aside."""
    try:
        owner = read_checkpoint(final).run_id
    except CheckpointError:
        remove(final)  # an interrupted save from before atomic saves, or a damaged one
        return
    if owner == run_id:
        remove(final)
        return
    base = f"{final}.run-{owner or 'earlier'}"
    aside, n = base, 1
    while os.path.exists(aside):
        n += 1
        aside = f"{base}-{n}"
    os.rename(final, aside)
    logger.warning("%s belonged to another run and was moved to %s (delete it when you no longer need it)",
                   final, aside)


def commit_checkpoint(output_dir: str, staging: str, step: int, state: dict) -> str:
    """Completes a staged save: state file (sizes, save order) written last, then renamed to checkpoint-<step>."""
    previous = list_checkpoints(output_dir)
    state = {**state, "global_step": step, "sequence": max((c.sequence for c in previous), default=0) + 1,
             "files": _file_sizes(staging)}
    write_state(staging, state)
    final = checkpoint_dir(output_dir, step)
    if os.path.lexists(final):
        _make_room(final, state["run_id"])
    os.rename(staging, final)
    return final


def check_resume_settings(saved: dict, current: dict, folder: str) -> None:
    changed = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in RESUME_KEYS if saved.get(k) != current.get(k)]
    if changed:
        logger.warning("resuming from %s with changed settings (%s); the run continues but no longer replays "
                       "what an uninterrupted run would have done", folder, "; ".join(changed))


def rotate(output_dir: str, limit: int | None, run_id: str) -> list[str]:
    """Deletes the oldest checkpoints of run ``run_id`` so that at most ``limit`` of them remain."""
    if not limit:
        return []
    own = run_checkpoints(output_dir, run_id)
    removed = []
    for ckpt in own[: max(0, len(own) - limit)]:
        logger.info("removing old checkpoint %s", ckpt.folder)
        remove(ckpt.folder)
        removed.append(ckpt.folder)
    return removed
