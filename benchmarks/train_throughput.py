"""Training throughput (images/s) and peak memory on the CPU, with and without gradient checkpointing.

    python benchmarks/train_throughput.py [--cases tiny sd15] [--steps 3] [--threads N] [--json results.json]

Two model sizes, random weights, batch 1, fp32:

* ``tiny``: the test suite's models (cross_attention_dim 64, 64 px -> 16 x 16 latents), but the
  real trainable modules (FacialEncoder ~100 M parameters) and five facial regions;
* ``sd15``: the real SD1.5 shapes: UNet 860 M, VAE, CLIP-L text encoder, CLIP ViT-H/14 vision
  tower, 512 px -> 64 x 64 latents, five regions.

A step is what ``training.train`` runs per batch: frozen encoders, the ConsistentID forward with
the recorded cross-attention maps, both losses, backward and a fused AdamW update.  Every case
runs in its own process, so that its peak RSS (the process high-water mark, models included) is
its own; after one untimed warm-up step, ``--steps`` steps are timed and the median is reported.

On a machine shared with other busy processes use ``--threads 1``: OpenMP threads that wait for
each other at every kernel barrier make a 2-thread run up to 15 times slower than a 1-thread run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (REPO, os.path.join(REPO, "tests")):
    if path not in sys.path:
        sys.path.append(path)

CASES = ("tiny", "sd15")
RESOLUTION = {"tiny": 64, "sd15": 512}


def _models(case: str):
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from training.base_models import SD_SCHEDULER, BaseModels

    torch.manual_seed(0)
    if case == "sd15":
        from tools.random_models import CLIP_VISION_CONFIGS, SD15_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG

        unet, vae = UNet2DConditionModel(**SD15_UNET_CONFIG), AutoencoderKL(**SD15_VAE_CONFIG)
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VISION_CONFIGS["vit_h"]))
    else:
        from training_standins import CROSS_DIM, UNET, VAE

        unet, vae = UNet2DConditionModel(**UNET), AutoencoderKL(**VAE)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=CROSS_DIM, intermediate_size=2 * CROSS_DIM,
                                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77))
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=1280, intermediate_size=256, num_hidden_layers=1,
                                                                num_attention_heads=16, image_size=224, patch_size=14))
    models = BaseModels(unet, vae, text, None, vision, DDPMScheduler(**SD_SCHEDULER), source=case)
    for module in models.frozen():
        module.requires_grad_(False).eval()
    return models


def _batch(resolution: int):
    import torch

    gen = torch.Generator().manual_seed(1)
    positions = torch.tensor([[5, 8, 11, 14, 17]])
    input_ids = torch.randint(300, 40000, (1, 77), generator=gen)
    input_ids[0, 0], input_ids[0, 30:] = 49406, 49407
    token_mask = torch.zeros(1, 77, dtype=torch.bool)
    token_mask[0, positions[0]] = True
    return {
        "pixel_values": torch.rand(1, 3, resolution, resolution, generator=gen) * 2 - 1,
        "clip_pixels": torch.randn(1, 3, 224, 224, generator=gen),
        "region_pixels": torch.randn(1, 5, 3, 224, 224, generator=gen),
        "region_valid": torch.ones(1, 5, dtype=torch.bool),
        "facial_token_index": positions,
        "facial_masks": (torch.rand(1, 5, resolution, resolution, generator=gen) > 0.8).float(),
        "background_mask": torch.ones(1, 1, resolution, resolution),
        "input_ids": input_ids,
        "token_mask": token_mask,
        "id_embed": torch.nn.functional.normalize(torch.randn(1, 512, generator=gen), dim=-1),
    }


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def worker(case: str, checkpointing: bool, steps: int, threads: int | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from training.base_models import check_architecture
    from training.losses import AttentionRecorder, default_blocks
    from training.modules import build_trainee
    from training.trainer import ConsistentIDStep, step_generator

    torch.set_flush_denormal(True)  # random weights can underflow; denormals would time the FPU, not the model
    models = _models(case)
    arch = check_architecture(models)
    trainee = build_trainee(models, arch)
    if checkpointing:
        models.unet.enable_gradient_checkpointing()
    recorder = AttentionRecorder(models.unet, models.layout, default_blocks(arch, models.layout))
    optimizer = torch.optim.AdamW(trainee.trainable_parameters(), lr=1e-4, weight_decay=1e-2, fused=True)
    step = ConsistentIDStep(models, trainee, recorder, device=torch.device("cpu"), weight_dtype=torch.float32,
                            resolution=RESOLUTION[case], localisation_weight=0.01, background_mask_prob=0.5)
    batch = _batch(RESOLUTION[case])
    built_rss = _rss_gib()
    load_before = os.getloadavg()[0]
    times = []
    for index in range(steps + 1):
        started = time.perf_counter()
        out = step(batch, step_generator(0, 0, index))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index:  # the first step allocates buffers and warms the kernels
            times.append(time.perf_counter() - started)
        del out
    trainable = sum(p.numel() for p in trainee.trainable_parameters())
    return {"case": case, "checkpointing": checkpointing, "step_s": times, "median_s": statistics.median(times),
            "images_per_s": 1.0 / statistics.median(times), "peak_rss_gib": _rss_gib(), "models_rss_gib": built_rss,
            "trainable_params": trainable, "threads": torch.get_num_threads(),
            # A shared machine: other processes on the same cores slow OpenMP kernels far more than their share.
            "load_avg_1min": [load_before, os.getloadavg()[0]]}


def run_case(case: str, checkpointing: bool, steps: int, threads: int | None) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", case, "--steps", str(steps)]
    if threads:
        command += ["--threads", str(threads)]
    if checkpointing:
        command.append("--checkpointing")
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        killed = " (killed by a signal: out of memory?)" if done.returncode < 0 else ""
        raise RuntimeError(f"case {case} (checkpointing {checkpointing}) failed with exit code "
                           f"{done.returncode}{killed}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    rows = ["| model | grad. checkpointing | s/step (median) | images/s | peak RSS | time vs off | peak RSS vs off |",
            "|---|---|---|---|---|---|---|"]
    by_key = {(r["case"], r["checkpointing"]): r for r in results}
    for r in results:
        base = by_key.get((r["case"], False), r)
        rows.append(f"| {r['case']} | {'on' if r['checkpointing'] else 'off'} | {r['median_s']:.2f} "
                    f"({len(r['step_s'])} steps) | {r['images_per_s']:.3f} | {r['peak_rss_gib']:.1f} GiB | "
                    f"{r['median_s'] / base['median_s']:.2f}x | {r['peak_rss_gib'] / base['peak_rss_gib']:.2f}x |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (after one warm-up step)")
    parser.add_argument("--modes", nargs="+", default=["off", "on"], choices=("off", "on"),
                        help="gradient checkpointing settings to measure")
    parser.add_argument("--threads", type=int, help="torch threads per case (default: torch's choice)")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.checkpointing, args.steps, args.threads)))
        return 0
    results = []
    for case in args.cases:
        for checkpointing in [mode == "on" for mode in args.modes]:
            results.append(run_case(case, checkpointing, args.steps, args.threads))
            print(f"{case}, gradient checkpointing {'on' if checkpointing else 'off'}: "
                  f"{results[-1]['median_s']:.2f} s/step", file=sys.stderr, flush=True)
            if args.json:  # after every case: a later case killed for memory must not lose the earlier ones
                with open(args.json, "w", encoding="utf-8") as f:
                    json.dump(results, f, indent=2)
    print(table(results))
    loads = [x for r in results for x in r["load_avg_1min"]]
    print(f"\n{results[0]['threads']} threads; 1-minute load average during the runs {min(loads):.1f}..{max(loads):.1f} "
          f"on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
