"""The Accelerate set-up both training stages share, and how they recognise running out of memory."""

from __future__ import annotations

import os

import torch

from consistentid_core.errors import TrainingConfigError

from .config import TrainConfig


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text))


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    project = ProjectConfiguration(project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, "logs"))
    try:
        return Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            log_with=None if config.report_to == "none" else config.report_to,
            project_config=project,
            # Steps whose samples all had their text dropped leave the facial fusion unused.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
    except (ValueError, RuntimeError) as exc:
        raise TrainingConfigError(f"Accelerate refused the settings (mixed_precision={config.mixed_precision}, "
                                  f"report_to={config.report_to}): {exc}") from exc
