"""Per-step UNet cost of ConsistentID: ours (ComfyUI) against the official-style processors (diffusers).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/unet_step.py [--repeats 5] [--arch sd15 sdxl]

One "step" is one UNet forward of a cond + uncond batch (batch 2) at 64x64 latents (512 px) for
SD1.5 and 128x128 (1024 px) for SDXL, random weights of the real shapes.  Four forwards:

* ComfyUI, unpatched, and ComfyUI with ConsistentIDApplyModel's patch (the LoRA folded into the
  weights by ComfyUI's weight patching, plus 4 ID keys/values per cross-attention);
* diffusers with its default processors, and diffusers with the core's ConsistentID processors,
  which is how the official pipeline runs: the rank-128 LoRA as extra matrix products in every
  attention call, the 4 ID tokens projected in every call.

The two forwards of one framework alternate run by run (same weights, same process); the
frameworks run one after the other, so that only one UNet is in memory at a time.  The UNet's
ConsistentID checkpoint holds the adapter (LoRA, to_k_ip/to_v_ip) and the ID projection with
random weights; the FacialEncoder is left out, it plays no part in a UNet step.

SDXL on a CPU (``--sdxl-lora auto``): bf16, and our patch without the LoRA weight patches.  Folding
a LoRA changes weight values, not shapes, so the step does the same work either way (SD1.5 is
measured with the LoRA folded); what the fold adds is ComfyUI's backup of the 560 original
weights, 1.9 GB, which on a 24 GB machine shared with other jobs decides between running and
being killed.  A run is skipped, with the reason, when the free memory is clearly too small.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import Case, Table, ms  # noqa: E402

import torch  # noqa: E402

LATENT = {"sd15": 64, "sdxl": 128}
CONTEXT = {"sd15": 768, "sdxl": 2048}
SDXL_POOLED = 1280
SDXL_ADM = 2816  # pooled text (1280) + 6 size/crop numbers embedded at 256 each
TARGET_RATIO = 1.05
SIGMA = 5.0  # any sigma inside the default window: the ID term is active


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--arch", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    parser.add_argument("--sdxl-dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="auto: bf16 on the CPU (an fp32 SDXL UNet is 10 GB), fp16 on CUDA")
    parser.add_argument("--sdxl-repeats", type=int, default=None, help="timed runs per SDXL case (default: --repeats)")
    parser.add_argument("--sdxl-lora", default="auto", choices=["auto", "fold", "skip"],
                        help="fold the LoRA into the SDXL weights (auto: on CUDA only, see above)")
    parser.add_argument("--output", default="unet_step", help="file stem under benchmarks/results/")
    return parser.parse_args(argv)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def model_dtype(arch: str, device: torch.device, sdxl_choice: str) -> torch.dtype:
    if arch == "sdxl" and sdxl_choice != "auto":
        return DTYPES[sdxl_choice]
    if device.type == "cuda":
        return torch.float16  # what ComfyUI runs SD1.5/SDXL in on a current GPU
    return torch.bfloat16 if arch == "sdxl" else torch.float32


# --- inputs -------------------------------------------------------------------------------------

class StepInputs:
    """One step's tensors, the same for every case of an architecture."""

    def __init__(self, arch: str, device: torch.device, dtype: torch.dtype, id_tokens: torch.Tensor, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        side, width = LATENT[arch], CONTEXT[arch]
        self.arch = arch
        self.x = torch.randn(2, 4, side, side, generator=gen).to(device)
        self.text = torch.randn(2, 77, width, generator=gen).to(device, dtype)
        self.sigma = torch.full((2,), SIGMA, device=device)
        self.timestep = torch.full((2,), 500.0, device=device)
        # cond row first, uncond row second: what ComfyUI's sampler batches for cfg
        self.text_and_id = torch.cat([self.text, id_tokens.to(device, dtype)], dim=1)
        self.pooled = torch.randn(2, SDXL_POOLED, generator=gen).to(device, dtype)
        self.time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * 2, device=device, dtype=dtype)
        self.adm = torch.randn(2, SDXL_ADM, generator=gen).to(device, dtype)


def comfy_forward(patcher, inputs: StepInputs):
    options = dict(patcher.model_options.get("transformer_options", {}), cond_or_uncond=[0, 1], sigmas=inputs.sigma)
    extra = {"y": inputs.adm} if inputs.arch == "sdxl" else {}

    def run():
        with torch.inference_mode():
            return patcher.model.apply_model(inputs.x, inputs.sigma, c_crossattn=inputs.text,
                                             transformer_options=options, **extra)

    return run


def diffusers_forward(unet, processors: dict, context: torch.Tensor, inputs: StepInputs):
    x = inputs.x.to(unet.dtype)
    extra = {}
    if inputs.arch == "sdxl":
        extra["added_cond_kwargs"] = {"text_embeds": inputs.pooled, "time_ids": inputs.time_ids}

    def setup():
        unet.set_attn_processor(dict(processors))

    def run():
        with torch.inference_mode():
            return unet(x, inputs.timestep, encoder_hidden_states=context, **extra).sample

    return setup, run


# --- one architecture -----------------------------------------------------------------------------

# Free memory a run needs beyond what this process holds (UNet, activations, adapter, patch backup).
NEEDS_GIB = {("sd15", 4): 6.5, ("sd15", 2): 4.0, ("sdxl", 4): 14.0, ("sdxl", 2): 8.0}


def memory_shortfall(arch: str, dtype: torch.dtype) -> str | None:
    import psutil

    need = NEEDS_GIB[(arch, torch.finfo(dtype).bits // 8)]
    free = psutil.virtual_memory().available / 2**30
    if free < need:
        return f"{arch} in {dtype} needs about {need:.0f} GiB of free memory, {free:.1f} GiB are free now"
    return None


def make_checkpoint(host, arch, device, dtype):
    # The pack loads checkpoints in fp32; a reduced-precision CPU run keeps the adapter in the
    # UNet's dtype, which the LoRA folding and the processors cast to anyway (0.9 GB less on SDXL).
    return benchlib.adapter_checkpoint(host, arch, dtype=torch.float32 if device.type == "cuda" else dtype)


def bench_comfy(host, arch, device, dtype, embeds, fold_lora, repeats, warmup) -> dict:
    import comfy.model_management
    from tools import random_models

    apply = host.pack_submodule("nodes.apply")
    benchlib.log_progress(f"{arch}: building the random ComfyUI UNet ({dtype})")
    model = random_models.comfy_unet(arch, seed=0, dtype=dtype)
    ckpt = make_checkpoint(host, arch, device, dtype)
    patched = apply.apply_model(model, ckpt, embeds, lora_strength=1.0 if fold_lora else 0.0)
    id_tokens = benchlib.id_tokens(ckpt, embeds)
    # The patch holds what it needs (projected keys/values; the LoRA patches reference the
    # adapter's tensors only when folded): the rest of the checkpoint can go.
    del ckpt
    benchlib.free_memory()
    inputs = StepInputs(arch, device, dtype, id_tokens)

    def load(patcher):
        return lambda: comfy.model_management.load_models_gpu([patcher])

    cases = [
        Case("comfy_unpatched", comfy_forward(model, inputs), setup=load(model)),
        Case("comfy_patched", comfy_forward(patched, inputs), setup=load(patched)),
    ]
    timings = benchlib.time_cases(cases, device, repeats, warmup, benchlib.log_progress)

    id_term = id_term_time(host, patched, inputs, device, runs=3)

    # The LoRA is folded into the weights whenever ComfyUI (re)loads the patched model, e.g.
    # after another model ran: a cost per load, not per step.
    load_times = []
    for _ in range(max(repeats, 5) if fold_lora else 0):
        load(model)()
        load_times.append(benchlib.time_once(load(patched), device))
    comfy.model_management.unload_all_models()
    del model, patched, cases
    comfy.model_management.soft_empty_cache()
    benchlib.free_memory()
    return {"timings": timings, "lora_fold_s": benchlib.Timing(load_times) if load_times else None,
            "id_tokens": id_tokens, "id_term_s": id_term}


def id_term_time(host, patched, inputs, device, runs: int) -> benchlib.Timing:
    """Seconds per step spent in the ID term itself (all cross-attention layers summed).

    Measured inside the patched forward by timing every call of the patch's ID-term function, so
    it is a direct reading of the overhead rather than the difference of two noisy step times.
    On CUDA each call is synchronised, which costs some overlap: an upper bound there.
    """
    import comfy.model_management

    patch_module = host.pack_submodule("nodes.patch")
    original = patch_module.id_attention_delta
    spent = [0.0]

    def timed_delta(*args, **kwargs):
        benchlib.synchronize(device)
        began = time.perf_counter()
        out = original(*args, **kwargs)
        benchlib.synchronize(device)
        spent[0] += time.perf_counter() - began
        return out

    comfy.model_management.load_models_gpu([patched])
    forward = comfy_forward(patched, inputs)
    samples = []
    patch_module.id_attention_delta = timed_delta
    try:
        for _ in range(runs):
            spent[0] = 0.0
            forward()
            samples.append(spent[0])
    finally:
        patch_module.id_attention_delta = original
    return benchlib.Timing(samples)


def bench_diffusers(host, arch, device, dtype, id_tokens, repeats, warmup) -> dict:
    from tools import random_models

    attention = host.pack_submodule("consistentid_core.attention")
    benchlib.log_progress(f"{arch}: building the random diffusers UNet ({dtype})")
    unet = random_models.diffusers_unet(arch, seed=0, device=device, dtype=dtype)
    plain = dict(unet.attn_processors)
    ckpt = make_checkpoint(host, arch, device, dtype)  # the same seed: the same adapter as above
    attention.install_processors(unet, adapter_state=ckpt.adapter_state_dict())
    del ckpt  # the processors hold their own copies
    benchlib.free_memory()
    official = dict(unet.attn_processors)
    inputs = StepInputs(arch, device, dtype, id_tokens)
    plain_setup, plain_run = diffusers_forward(unet, plain, inputs.text, inputs)
    official_setup, official_run = diffusers_forward(unet, official, inputs.text_and_id, inputs)
    cases = [
        Case("diffusers_plain", plain_run, setup=plain_setup),
        Case("diffusers_official", official_run, setup=official_setup),
    ]
    timings = benchlib.time_cases(cases, device, repeats, warmup, benchlib.log_progress)
    del unet, plain, official, cases
    benchlib.free_memory()
    return {"timings": timings}


def bench_arch(host, arch, device, dtype, fold_lora, repeats, warmup) -> dict:
    embeds = benchlib.random_face_embeds(host, arch)
    comfy_part = bench_comfy(host, arch, device, dtype, embeds, fold_lora, repeats, warmup)
    diffusers_part = bench_diffusers(host, arch, device, dtype, comfy_part["id_tokens"], repeats, warmup)
    timings = {**comfy_part["timings"], **diffusers_part["timings"]}
    t = {name: timing.median for name, timing in timings.items()}
    cpu = {name: timing.cpu_median for name, timing in timings.items()}
    cpu_ratios = {}
    if all(v is not None for v in cpu.values()):
        cpu_ratios = {
            "ratio_comfy_cpu_time": cpu["comfy_patched"] / cpu["comfy_unpatched"],
            "ratio_diffusers_cpu_time": cpu["diffusers_official"] / cpu["diffusers_plain"],
        }
    return {
        "arch": arch,
        "dtype": str(dtype).replace("torch.", ""),
        "latent": LATENT[arch],
        "batch": 2,
        "repeats": repeats,
        "timings": {name: timing.as_dict() for name, timing in timings.items()},
        "lora_folded": fold_lora,
        "lora_fold_on_load": comfy_part["lora_fold_s"].as_dict() if comfy_part["lora_fold_s"] else None,
        "id_term_in_step": comfy_part["id_term_s"].as_dict(),
        "id_term_share": comfy_part["id_term_s"].median / t["comfy_unpatched"],
        "ratio_comfy": t["comfy_patched"] / t["comfy_unpatched"],
        "ratio_diffusers": t["diffusers_official"] / t["diffusers_plain"],
        "factor_official_over_ours": t["diffusers_official"] / t["comfy_patched"],
        **cpu_ratios,
    }


# --- report ---------------------------------------------------------------------------------------

def report(results: list[dict], machine: str) -> Table:
    table = Table(
        f"UNet step, batch 2 (cond + uncond), random weights of the real shapes; {machine}",
        ["model", "dtype", "ComfyUI (ms)", "ComfyUI + ConsistentID (ms)", "ratio (target <= 1.05)",
         "diffusers (ms)", "diffusers + official processors (ms)", "ratio",
         "official / ours", "ratios by CPU time (ours, official)", "ID term inside our step (ms, share)",
         "LoRA fold per model load (ms)"],
    )
    for r in results:
        if "skipped" in r:
            table.add(f"{r['arch'].upper()}: skipped ({r['skipped']})", *["-"] * (len(table.headers) - 1))
            continue
        t = {name: v["median_s"] for name, v in r["timings"].items()}
        label = f"{r['arch'].upper()} {r['latent']}x{r['latent']} latent"
        if not r["lora_folded"]:
            label += " (ID term only, LoRA not folded)"
        fold = ms(r["lora_fold_on_load"]["median_s"]) if r["lora_fold_on_load"] else "-"
        verdict = "holds" if r["ratio_comfy"] <= TARGET_RATIO else "MISSED"
        by_cpu = (f"{r['ratio_comfy_cpu_time']:.3f}, {r['ratio_diffusers_cpu_time']:.3f}"
                  if "ratio_comfy_cpu_time" in r else "-")
        table.add(label, r["dtype"], ms(t["comfy_unpatched"]), ms(t["comfy_patched"]),
                  f"{r['ratio_comfy']:.3f} ({verdict})", ms(t["diffusers_plain"]), ms(t["diffusers_official"]),
                  f"{r['ratio_diffusers']:.3f}", f"{r['factor_official_over_ours']:.2f}x", by_cpu,
                  f"{ms(r['id_term_in_step']['median_s'])} ({100 * r['id_term_share']:.1f} %)", fold)
    return table


def plot(results: list[dict], machine: str, path: str) -> None:
    plt = benchlib.pyplot()
    names = [("comfy_unpatched", "ComfyUI"), ("comfy_patched", "ComfyUI + ours"),
             ("diffusers_plain", "diffusers"), ("diffusers_official", "diffusers + official")]
    colours = ["#9aa5b1", "#2f7ed8", "#c9b27c", "#d9534f"]
    results = [r for r in results if "skipped" not in r]
    if not results:
        return
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.2), squeeze=False)
    for ax, r in zip(axes[0], results):
        medians = [r["timings"][key]["median_s"] * 1000 for key, _ in names]
        lows = [m - r["timings"][key]["min_s"] * 1000 for m, (key, _) in zip(medians, names)]
        highs = [r["timings"][key]["max_s"] * 1000 - m for m, (key, _) in zip(medians, names)]
        bars = ax.bar([label for _, label in names], medians, yerr=[lows, highs], color=colours, capsize=4)
        ax.bar_label(bars, labels=[f"{m:.0f}" for m in medians], padding=2, fontsize=8)
        lora = "" if r["lora_folded"] else ", ours without LoRA fold"
        ax.set_title(f"{r['arch'].upper()} {r['latent']}x{r['latent']}, batch 2, {r['dtype']}{lora}\n"
                     f"ours/unpatched {r['ratio_comfy']:.3f}   official/plain {r['ratio_diffusers']:.3f}   "
                     f"official/ours {r['factor_official_over_ours']:.2f}x", fontsize=9)
        ax.set_ylabel("ms per UNet step (median, min-max)")
        ax.tick_params(axis="x", labelsize=8, rotation=15)
    benchlib.save_figure(fig, path, f"Per-step UNet cost: {machine}", fontsize=9)


def main(argv=None) -> int:
    args = parse_args(argv)
    device, host, machine = benchlib.start(args.device)
    results = []
    for arch in args.arch:
        dtype = model_dtype(arch, device, args.sdxl_dtype)
        repeats = args.sdxl_repeats if (arch == "sdxl" and args.sdxl_repeats) else args.repeats
        fold = arch == "sd15" or args.sdxl_lora == "fold" or (args.sdxl_lora == "auto" and device.type == "cuda")
        shortfall = memory_shortfall(arch, dtype) if device.type == "cpu" else None
        if shortfall:
            benchlib.log_progress(f"skipping {arch}: {shortfall}")
            results.append({"arch": arch, "skipped": shortfall})
        else:
            results.append(bench_arch(host, arch, device, dtype, fold, repeats, args.warmup))
        # Written after every model, so that a run killed later still leaves this one's numbers.
        benchlib.write_json(f"{args.output}.json", {"machine": machine, "results": results})
    table = report(results, machine)
    table.print()
    png = benchlib.results_path(f"{args.output}.png")
    plot(results, machine, png)
    print(f"plot: {os.path.relpath(png, benchlib.REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
