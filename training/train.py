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
import sys
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, default_collate
from tqdm.auto import tqdm

from consistentid_core.model.checkpoint import load_checkpoint, save_checkpoint
from consistentid_core.errors import CheckpointError, ConsistentIDError, TrainingConfigError

from .accelerator import is_out_of_memory, make_accelerator
from .attribute_stage import train_attributes
from .base_models import check_architecture, describe_layout, load_base_models
from .config import TrainConfig, parse_args
from .dataset import ConsistentIDDataset, EpochSampler
from .disk import atomic_copy, folder_bytes, replacing, write_errors
from .losses import AttentionRecorder, attention_blocks, default_blocks
from .manifest import load_entries, report_captions
from .modules import build_trainee
from .state import ADAPTER_FILE, check_resume_settings, checkpoint_dir, checkpoints_root, clear_staging
from .state import commit_checkpoint, continued_run, damaged, new_run_id, note_earlier_runs, resume_candidates, rotate
from .state import run_checkpoints, staging_dir, verify_files
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


class TrainingRun:
    """Everything a run needs, set up in the order that fails fastest: settings, data files, models."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.run_id, self.parent = new_run_id(), None  # a resumed run takes its checkpoint's (resume_point)
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
        """Loads the checkpoint to resume from and sets the run id; (global step, micro-step)."""
        config = self.config
        if not config.resume_from_checkpoint:
            if self.accelerator.is_main_process:
                note_earlier_runs(config.output_dir)
            return 0, 0
        latest = config.resume_from_checkpoint == "latest"
        unusable = []
        for ckpt in resume_candidates(config.output_dir, config.resume_from_checkpoint):
            try:
                verify_files(ckpt)
                self.accelerator.load_state(ckpt.folder)
            except Exception as exc:  # torch, safetensors and pickle each fail in their own way on a damaged file
                error = damaged(ckpt, exc)
                if not latest:
                    raise error from exc
                logger.warning("%s; falling back to the previous checkpoint of this run", error)
                unusable.append(ckpt)
                continue
            check_resume_settings(ckpt.settings, self.resume_settings(), ckpt.folder)
            self.run_id, self.parent = continued_run(config.output_dir, ckpt, unusable)
            if unusable:
                logger.warning("resumed from %s instead of the damaged %s", ckpt.name, ", ".join(c.name for c in unusable))
            logger.info("resumed from %s at step %d", ckpt.folder, ckpt.step)
            return ckpt.step, ckpt.micro_step
        raise CheckpointError("resume_from_checkpoint is 'latest' but no checkpoint of the last run can be loaded: "
                              + "; ".join(c.name for c in unusable) + ". Resume from another checkpoint folder "
                              "explicitly, or start again without resume_from_checkpoint")

    def resume_settings(self) -> dict:
        settings = {k: getattr(self.config, k) for k in ("seed", "train_batch_size", "gradient_accumulation_steps",
                                                          "resolution", "text_drop_rate", "background_mask_prob")}
        settings["num_processes"] = self.accelerator.num_processes
        return settings

    def checkpoint_bytes(self) -> int:
        """About what a checkpoint takes: the last one of this run, else 4 fp32 copies of the trainable
        weights (weights, AdamW's two moments, the adapter file)."""
        own = run_checkpoints(self.config.output_dir, self.run_id)
        if own:
            return folder_bytes(own[-1].folder)
        trainee = self.accelerator.unwrap_model(self.trainee)
        return 16 * sum(p.numel() for p in trainee.trainable_parameters())

    def _space_advice(self) -> str:
        limit = self.config.checkpoints_total_limit
        return (f"free space there, lower checkpoints_total_limit (now {limit}; while a checkpoint is written, one more "
                "than the limit is on disk) or set output_dir to a disk with room, then continue with "
                "--resume-from-checkpoint latest (finished checkpoints are complete)")

    def save(self, global_step: int, micro_step: int) -> str:
        """Writes checkpoint-<global_step> into a staging folder and renames it when complete."""
        accelerator, config = self.accelerator, self.config
        staging = staging_dir(config.output_dir, global_step)
        main = accelerator.is_main_process
        if main:
            clear_staging(staging)
        accelerator.wait_for_everyone()
        what, needed, advice = f"checkpoint-{global_step}", self.checkpoint_bytes(), self._space_advice()
        where = checkpoints_root(config.output_dir)
        with write_errors(what, where, needed, advice, staging if main else None):
            accelerator.save_state(staging)
        accelerator.wait_for_everyone()
        if main:
            with write_errors(what, where, needed, advice, staging):
                self.save_adapter(os.path.join(staging, ADAPTER_FILE), global_step)
                state = {"micro_step": micro_step, "settings": self.resume_settings(), "run_id": self.run_id,
                         "parent": self.parent}
                commit_checkpoint(config.output_dir, staging, global_step, state)
            rotate(config.output_dir, config.checkpoints_total_limit, self.run_id)
        accelerator.wait_for_everyone()
        return checkpoint_dir(config.output_dir, global_step)

    def save_adapter(self, path: str, global_step: int) -> None:
        trainee = self.accelerator.unwrap_model(self.trainee)
        metadata = {"trained_steps": global_step, "base_model": os.path.basename(os.path.normpath(self.models.source)),
                    "resolution": self.config.resolution, "producer": "consistentid training"}
        with replacing(path) as tmp:
            save_checkpoint(trainee.to_checkpoint(), tmp, metadata)

    def write_final(self, global_step: int, saved: tuple[int, str] | None) -> str:
        """<output_dir>/consistentid.safetensors, replaced in one step (a copy of the last checkpoint's adapter)."""
        final = os.path.join(self.config.output_dir, ADAPTER_FILE)
        trainee = self.accelerator.unwrap_model(self.trainee)
        needed = 4 * sum(p.numel() for p in trainee.trainable_parameters())
        copy = saved[0] == global_step if saved else False
        advice = (f"the same weights are in {os.path.join(saved[1], ADAPTER_FILE)}: copy that file once there is room"
                  if copy else f"free space on the disk of {final} and run again with --resume-from-checkpoint latest")
        with write_errors("the trained weights", final, needed, advice):
            if copy:
                atomic_copy(os.path.join(saved[1], ADAPTER_FILE), final)
            else:
                self.save_adapter(final, global_step)
        return final

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
            self.write_final(global_step, saved)
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
