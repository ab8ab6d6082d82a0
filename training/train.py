"""Train ConsistentID on a prepared data set.

    python -m training.train --config train.yaml [--any-setting value ...]
    accelerate launch [--multi_gpu --num_processes N ...] -m training.train --config train.yaml

Accelerate does devices, DDP (one or many machines), mixed precision and gradient accumulation;
settings are listed by ``--help`` and in :mod:`training.config`.  The result,
``<output_dir>/consistentid.safetensors``, loads in the ComfyUI nodes like the official weights.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, default_collate
from tqdm.auto import tqdm

from consistentid_core.checkpoint import load_checkpoint, save_checkpoint
from consistentid_core.errors import ConsistentIDError, TrainingConfigError

from .base_models import check_architecture, describe_layout, load_base_models
from .config import TrainConfig, parse_args
from .dataset import ConsistentIDDataset, EpochSampler
from .losses import AttentionRecorder, attention_blocks, default_blocks
from .manifest import load_entries, report_captions
from .modules import build_trainee
from .state import ADAPTER_FILE, checkpoint_dir, check_resume_settings, read_state, resolve_resume, rotate, write_state
from .texts import DEFAULT_FACIAL_CAPTION
from .trainer import ConsistentIDStep, step_generator

logger = logging.getLogger("consistentid.training")

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainResult:
    global_step: int
    adapter_path: str
    history: list[dict] = field(default_factory=list)
    validation: dict = field(default_factory=dict)
    main_process: bool = True


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


class TrainingRun:
    """Everything a run needs, set up in the order that fails fastest: settings, data files, models."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.accelerator = accelerator = make_accelerator(config)
        entries = load_entries(config.manifest, config.data_root, config.parsing_root, config.faceid_root,
                               config.max_problems_shown)
        self.train_entries, self.val_entries = self._split(entries)
        self.models = models = load_base_models(config.base_model, config.image_encoder, config.base_model_config)
        init = load_checkpoint(config.init_from) if config.init_from else None
        self.arch = check_architecture(models, config.arch, init.layout if init else None, init.name if init else "")
        self._check_resolution()
        facial_default = DEFAULT_FACIAL_CAPTION[models.family]
        report_captions(self.train_entries + self.val_entries, models.tokenizer, facial_default, config.max_problems_shown)
        logger.info("base model %s: %s; %d training and %d validation faces", models.source,
                    describe_layout(models.layout), len(self.train_entries), len(self.val_entries))

        trainee = build_trainee(models, self.arch, init)
        if config.gradient_checkpointing:
            models.unet.enable_gradient_checkpointing()
        blocks = config.localisation_blocks or default_blocks(self.arch, models.layout)
        try:
            recorder = AttentionRecorder(models.unet, models.layout, blocks)
        except ValueError as exc:
            raise TrainingConfigError(f"localisation_blocks: {exc}; this UNet has "
                                      f"{', '.join(attention_blocks(models.layout))}") from exc
        # The fused kernel updates the ~180 M trainable parameters several times faster than the default loop.
        optimizer = torch.optim.AdamW(trainee.trainable_parameters(), lr=config.learning_rate,
                                      betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay,
                                      eps=config.adam_epsilon, fused=accelerator.device.type in ("cpu", "cuda"))

        def dataset(entries, drop_rate):
            return ConsistentIDDataset(entries, models.tokenizer, models.tokenizer_2, config.resolution, drop_rate,
                                       config.seed, facial_default)

        self.dataset = dataset(self.train_entries, config.text_drop_rate)
        loader = DataLoader(self.dataset, batch_size=config.train_batch_size, sampler=EpochSampler(len(self.dataset), config.seed),
                            num_workers=config.dataloader_num_workers, collate_fn=default_collate, drop_last=False)
        self.val_loader = DataLoader(dataset(self.val_entries, 0.0), batch_size=config.train_batch_size, shuffle=False,
                                     collate_fn=default_collate)

        self.weight_dtype = DTYPES.get(accelerator.mixed_precision, torch.float32)
        self._place_frozen()
        self.trainee, self.optimizer, self.loader = accelerator.prepare(trainee, optimizer, loader)
        common = dict(device=accelerator.device, weight_dtype=self.weight_dtype, resolution=config.resolution,
                      localisation_weight=config.localisation_weight, background_mask_prob=config.background_mask_prob)
        self.step = ConsistentIDStep(models, self.trainee, recorder, **common)
        self.val_step = ConsistentIDStep(models, accelerator.unwrap_model(self.trainee), recorder, **common)

    def _split(self, entries):
        config = self.config
        if config.validation_manifest:
            val = load_entries(config.validation_manifest, config.data_root, config.parsing_root, config.faceid_root,
                               config.max_problems_shown)
            return entries, val
        held = config.num_validation_samples
        if held and len(entries) > held:
            return entries[:-held], entries[-held:]
        if held:
            logger.warning("only %d face(s) in the data set: nothing is held out, validation is skipped", len(entries))
        return entries, []

    def _check_resolution(self):
        models = self.models
        factor = 2 ** (len(models.vae.config.block_out_channels) - 1) * 2 ** (len(models.layout.block_out_channels) - 1)
        if self.config.resolution % factor:
            raise TrainingConfigError(f"resolution {self.config.resolution} does not divide into this model's latent "
                                      f"grid: it must be a multiple of {factor} (VAE and UNet downsampling)")

    def _place_frozen(self):
        models, device, dtype = self.models, self.accelerator.device, self.weight_dtype
        for module in models.frozen():
            module.to(device=device, dtype=dtype)
        if models.vae.config.get("force_upcast", False):
            models.vae.to(dtype=torch.float32)
        # The processors are submodules of the UNet's attention layers and were cast with it; they train in fp32.
        for module in models.unet.attn_processors.values():
            module.to(dtype=torch.float32)

    # --- the loop --------------------------------------------------------------------------------

    def hparams(self) -> dict:
        return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in self.config.to_dict().items()}

    def resume_point(self) -> tuple[int, int]:
        config = self.config
        if not config.resume_from_checkpoint:
            return 0, 0
        folder = resolve_resume(config.output_dir, config.resume_from_checkpoint)
        self.accelerator.load_state(folder)
        state = read_state(folder)
        check_resume_settings(state["settings"], self.resume_settings(), folder)
        logger.info("resumed from %s at step %d", folder, state["global_step"])
        return int(state["global_step"]), int(state["micro_step"])

    def resume_settings(self) -> dict:
        settings = {k: getattr(self.config, k) for k in ("seed", "train_batch_size", "gradient_accumulation_steps",
                                                          "resolution", "text_drop_rate", "background_mask_prob")}
        settings["num_processes"] = self.accelerator.num_processes
        return settings

    def save(self, global_step: int, micro_step: int) -> str:
        accelerator, config = self.accelerator, self.config
        folder = checkpoint_dir(config.output_dir, global_step)
        accelerator.save_state(folder)
        if accelerator.is_main_process:
            self.save_adapter(os.path.join(folder, ADAPTER_FILE), global_step)
            write_state(folder, {"global_step": global_step, "micro_step": micro_step, "settings": self.resume_settings()})
            rotate(config.output_dir, config.checkpoints_total_limit)
        accelerator.wait_for_everyone()
        return folder

    def save_adapter(self, path: str, global_step: int) -> None:
        trainee = self.accelerator.unwrap_model(self.trainee)
        metadata = {"trained_steps": global_step, "base_model": os.path.basename(os.path.normpath(self.models.source)),
                    "resolution": self.config.resolution, "producer": "consistentid training"}
        save_checkpoint(trainee.to_checkpoint(), path, metadata)

    def validate(self, global_step: int) -> dict:
        if not self.val_entries:
            return {}
        scores = self.val_step.validate(self.val_loader, self.config.validation_timesteps, self.config.seed)
        logger.info("step %d validation: localisation score %.4f, noise MSE %.4f", global_step,
                    scores["val/localisation_score"], scores["val/noise_mse"])
        self.accelerator.log(scores, step=global_step)
        return scores

    def _loss(self, batch, micro_step, global_step):
        generator = step_generator(self.config.seed, self.accelerator.process_index, micro_step)
        try:
            out = self.step(batch, generator)
            self.accelerator.backward(out.loss)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            config = self.config
            raise TrainingConfigError(
                f"out of memory at step {global_step + 1} with train_batch_size {config.train_batch_size} at resolution "
                f"{config.resolution} ({type(exc).__name__}). Lower train_batch_size and raise gradient_accumulation_steps "
                f"(now {config.gradient_accumulation_steps}) to keep the effective batch, enable gradient_checkpointing"
                f"{'' if config.gradient_checkpointing else ' (now off)'}, or use mixed_precision bf16"
            ) from exc
        return out

    def run(self) -> TrainResult:
        config, accelerator = self.config, self.accelerator
        if config.report_to != "none":
            accelerator.init_trackers(config.tracker_project_name, config=self.hparams())
        per_epoch = len(self.loader)
        steps_per_epoch = math.ceil(per_epoch / config.gradient_accumulation_steps)
        max_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
        global_step, micro_step = self.resume_point()
        history, validation, pending, saved = [], {}, [], None
        progress = tqdm(total=max_steps, initial=global_step, desc="training", unit="step",
                        disable=not accelerator.is_local_main_process)
        val_every = config.validation_steps or config.checkpointing_steps
        while global_step < max_steps:
            epoch, skip = divmod(micro_step, per_epoch)
            self.loader.set_epoch(epoch)
            batches = accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
            for batch in batches:
                with accelerator.accumulate(self.trainee):
                    out = self._loss(batch, micro_step, global_step)
                    if accelerator.sync_gradients and config.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(self.trainee.parameters(), config.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                micro_step += 1
                pending.append(torch.stack([out.loss, out.noise, out.localisation]).detach().float())
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                mean = accelerator.gather(torch.stack(pending).mean(0)[None]).mean(0).tolist()
                pending = []
                record = {"step": global_step, "loss": mean[0], "loss_noise": mean[1], "loss_localisation": mean[2]}
                history.append(record)
                progress.update(1)
                progress.set_postfix(loss=f"{mean[0]:.4f}")
                if global_step % config.logging_steps == 0:
                    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=global_step)
                if global_step % config.checkpointing_steps == 0 or global_step == max_steps:
                    saved = (global_step, self.save(global_step, micro_step))
                if global_step % val_every == 0 or global_step == max_steps:
                    validation = self.validate(global_step)
                if global_step >= max_steps:
                    break
        progress.close()
        final = os.path.join(config.output_dir, ADAPTER_FILE)
        if accelerator.is_main_process:
            if saved and saved[0] == global_step:
                shutil.copyfile(os.path.join(saved[1], ADAPTER_FILE), final)
            else:
                self.save_adapter(final, global_step)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return TrainResult(global_step, final, history, validation, accelerator.is_main_process)


def train(config: TrainConfig) -> TrainResult:
    return TrainingRun(config).run()


def main(argv=None) -> int:
    # Under `accelerate launch` every process runs this; only the first one reports progress.
    level = logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = parse_args(argv)
        if config.stage == "attributes":
            from .attribute_stage import train_attributes

            done = train_attributes(config)
            print(f"trained the attribute branch {done.global_step} steps; ConsistentID weights with it: "
                  f"{done.weights_path}")
            return 0
        result = train(config)
    except ConsistentIDError as exc:
        logger.error("%s", exc)
        return 2
    if not result.main_process:
        return 0
    score = result.validation.get("val/localisation_score")
    summary = f"trained {result.global_step} steps; ConsistentID weights: {result.adapter_path}"
    if score is not None:
        summary += f"; validation localisation score {score:.4f}"
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
