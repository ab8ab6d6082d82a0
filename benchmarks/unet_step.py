"""Per-step UNet cost of ConsistentID in ComfyUI, measured the way a sampler runs the model.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/unet_step.py [--arch sd15] [--blocks 2 --steps 3]

One "step" is one UNet forward of a cond + uncond batch (batch 2) at 64x64 latents (512 px) for
SD1.5 and 128x128 (1024 px) for SDXL, random weights of the real shapes.

What a user pays per step (steady state).  Each case is loaded once per block (ComfyUI folds the
LoRA into the weights at load), runs one untimed warm-up forward, then ``--steps`` consecutive
timed forwards; the blocks of the cases alternate (``benchlib.time_blocks``).  The cases:

* ``unpatched``: the model as it comes from the checkpoint loader;
* ``full``: ConsistentIDApplyModel's output (LoRA folded, ID term in every cross-attention);
* ``lora_only``: the LoRA weight patches alone (no attention patch): what folding costs per step;
* ``wrapper_only``: the attention patches with weight 0: the replace-patch path without the ID term;
* ``id_only``: the attention patches with the ID term, no LoRA;
* ``zero_fold`` (a control, not a product path): zero weight patches on the weights the LoRA
  patches.  ComfyUI re-makes those weights, with unchanged values, in newly allocated memory, as
  the LoRA fold does: what differs from ``unpatched`` is where the weights live, not any arithmetic.

Every ComfyUI attention backend runs in its own process (``--backends``): ComfyUI picks its kernel
once, at import.  ``sub-quadratic`` is ComfyUI's CPU default, ``pytorch`` what the runner uses on
the CPU, ``default`` ComfyUI's own choice (pytorch on a current NVIDIA GPU).  ``diffusers``
is the comparison: a diffusers UNet with its default processors, and with the core's
official-style processors (the rank-128 LoRA as extra products in every call, the ID tokens
projected in every call), which is how the official pipeline runs.

Paid once per model load, not per step: applying the node (ID projections, LoRA patch list), and
switching ComfyUI's loaded model between the unpatched and the patched clone (folding the LoRA into
the weights, and restoring them).  ``--alternating-repeats`` repeats the old way of measuring
(one forward per load, the cases alternating run by run), which times the first forward after
such a switch: it is kept to show what it measured.

The ID term alone: the 16 (SD1.5) / 70 (SDXL) ID-term attentions of one step, on the query
tensors of a real forward, with the kernel the patch calls (torch's scaled_dot_product_attention)
and with ComfyUI's ``optimized_attention`` of the backend (what the patch called before).

SDXL on a CPU (``--sdxl-lora auto``): bf16, and the patch without the LoRA fold.  Folding changes
weight values, not shapes (the SD1.5 ``lora_only`` case measures that it costs nothing per step);
what it adds is ComfyUI's backup of the original weights, 1.9 GB, which on a 24 GB machine shared
with other jobs decides between running and being killed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import Case, Table, ms  # noqa: E402

import torch  # noqa: E402

LATENT = {"sd15": 64, "sdxl": 128}
CONTEXT = {"sd15": 768, "sdxl": 2048}
SDXL_POOLED = 1280
SDXL_ADM = 2816  # pooled text (1280) + 6 size/crop numbers embedded at 256 each
TARGET_RATIO = 1.02
ACCEPTED_RATIO = 1.05  # what run-to-run noise on a shared machine is allowed to add
SIGMA = 5.0  # any sigma inside the default window: the ID term is active
COMFY_CASES = ("unpatched", "full", "lora_only", "wrapper_only", "id_only", "zero_fold")
DEFAULT_CASES = ("unpatched", "full", "lora_only", "wrapper_only", "id_only")
SDXL_DEFAULT_CASES = ("unpatched", "full")
COMFY_BACKENDS = ("sub-quadratic", "pytorch", "split", "default")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--arch", nargs="+", default=None, choices=["sd15", "sdxl"],
                        help="default: sd15 on the CPU (an SDXL step takes minutes there), sd15 and sdxl on CUDA")
    parser.add_argument("--backends", nargs="+", default=None, choices=COMFY_BACKENDS + ("diffusers",),
                        help="default: sub-quadratic pytorch diffusers on the CPU; default diffusers on CUDA")
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), choices=COMFY_CASES,
                        help="ComfyUI cases for SD1.5 (unpatched is always measured)")
    parser.add_argument("--sdxl-cases", nargs="+", default=list(SDXL_DEFAULT_CASES), choices=COMFY_CASES)
    parser.add_argument("--blocks", type=int, default=2, help="blocks per case (alternated)")
    parser.add_argument("--steps", type=int, default=3, help="timed consecutive forwards per block")
    parser.add_argument("--sdxl-blocks", type=int, default=None, help="default: --blocks")
    parser.add_argument("--sdxl-steps", type=int, default=None, help="default: --steps")
    parser.add_argument("--latent", type=int, default=None,
                        help="latent side for every architecture (default: 64 for SD1.5, 128 for SDXL)")
    parser.add_argument("--sdxl-latent", type=int, default=None, help="latent side for SDXL only")
    parser.add_argument("--sdxl-dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="auto: bf16 on the CPU (an fp32 SDXL UNet is 10 GB), fp16 on CUDA")
    parser.add_argument("--sdxl-lora", default="auto", choices=["auto", "fold", "skip"],
                        help="fold the LoRA into the SDXL weights (auto: on CUDA only, see above)")
    parser.add_argument("--alternating-repeats", type=int, default=5,
                        help="runs of the old run-by-run alternation, unpatched vs full (0: skip)")
    parser.add_argument("--switch-repeats", type=int, default=5, help="runs of each one-off cost (0: skip)")
    parser.add_argument("--id-term-repeats", type=int, default=7, help="runs of the ID term alone (0: skip)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (default: torch's choice, what a user gets)")
    parser.add_argument("--malloc", default="default", choices=sorted(benchlib.MALLOC_SETTINGS),
                        help="glibc malloc settings of the measuring processes (see benchlib.MALLOC_SETTINGS); "
                             "default: as a user runs ComfyUI")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per backend process")
    parser.add_argument("--output", default="unet_step", help="file stem under benchmarks/results/")
    parser.add_argument("--append", action="store_true",
                        help="keep the results already in the output file (other architectures, backends or "
                             "malloc settings); a measurement of the same triple replaces its old one")
    # One backend and architecture in this process (what the parent starts per backend).
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("blocks", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def steady_samples(args, arch: str) -> tuple[int, int]:
    if arch == "sdxl":
        return args.sdxl_blocks or args.blocks, args.sdxl_steps or args.steps
    return args.blocks, args.steps


def latent_side(args, arch: str) -> int:
    if arch == "sdxl" and args.sdxl_latent:
        return args.sdxl_latent
    return args.latent or LATENT[arch]


def model_dtype(arch: str, device: torch.device, sdxl_choice: str) -> torch.dtype:
    if arch == "sdxl" and sdxl_choice != "auto":
        return DTYPES[sdxl_choice]
    if device.type == "cuda":
        return torch.float16  # what ComfyUI runs SD1.5/SDXL in on a current GPU
    return torch.bfloat16 if arch == "sdxl" else torch.float32


# --- inputs -------------------------------------------------------------------------------------

class StepInputs:
    """One step's tensors, the same for every case of an architecture."""

    def __init__(self, arch: str, device: torch.device, dtype: torch.dtype, id_tokens: torch.Tensor,
                 side: int | None = None, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        side, width = side or LATENT[arch], CONTEXT[arch]
        self.arch = arch
        self.side = side
        self.x = torch.randn(2, 4, side, side, generator=gen).to(device)
        self.text = torch.randn(2, 77, width, generator=gen).to(device, dtype)
        self.sigma = torch.full((2,), SIGMA, device=device)
        self.timestep = torch.full((2,), 500.0, device=device)
        # cond row first, uncond row second: what ComfyUI's sampler batches for cfg
        self.text_and_id = torch.cat([self.text, id_tokens.to(device, dtype)], dim=1)
        self.pooled = torch.randn(2, SDXL_POOLED, generator=gen).to(device, dtype)
        pixels = float(side * 8)
        self.time_ids = torch.tensor([[pixels, pixels, 0.0, 0.0, pixels, pixels]] * 2, device=device, dtype=dtype)
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


# --- memory -------------------------------------------------------------------------------------

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


# --- ComfyUI, one backend -------------------------------------------------------------------------

def comfy_variants(host, model, ckpt, embeds, names, fold_lora: bool) -> dict:
    """The patched clones of ``model`` that the cases run, by case name (all share its weights)."""
    apply = host.pack_submodule("nodes.glue.model_patch")
    patch = host.pack_submodule("nodes.glue.model_patch")
    lora = 1.0 if fold_lora else 0.0
    variants = {"unpatched": model}
    for name in names:
        if name == "full":
            variants[name] = apply.apply_model(model, ckpt, embeds, lora_strength=lora)
        elif name == "lora_only":
            variants[name] = model.clone()
            patch.add_lora_patches(variants[name], ckpt, 1.0)
        elif name == "wrapper_only":
            variants[name] = apply.apply_model(model, ckpt, embeds, weight=0.0, lora_strength=0.0)
        elif name == "id_only":
            variants[name] = apply.apply_model(model, ckpt, embeds, lora_strength=0.0)
        elif name == "zero_fold":
            import comfy.utils

            variants[name] = model.clone()
            zeros = {key: (torch.zeros_like(comfy.utils.get_attr(model.model, key)),)  # ComfyUI's "diff" patch
                     for key in patch.lora_patches(model, ckpt)}
            variants[name].add_patches(zeros, 1.0)
    return variants


def loader(patcher):
    import comfy.model_management

    return lambda: comfy.model_management.load_models_gpu([patcher])


def apply_node_costs(host, model, ckpt, embeds, fold_lora, repeats) -> dict:
    """ConsistentIDApplyModel's own time: the first run (projections and LoRA patch list built)
    and later runs (both memoised; a clone and 16/70 patch objects)."""
    apply = host.pack_submodule("nodes.glue.model_patch")
    lora = 1.0 if fold_lora else 0.0
    began = time.perf_counter()
    apply.apply_model(model, ckpt, embeds, lora_strength=lora)
    first = time.perf_counter() - began
    again = []
    for index in range(max(repeats, 1)):
        began = time.perf_counter()
        apply.apply_model(model, ckpt, embeds, weight=1.0 - 0.01 * index, lora_strength=lora)
        again.append(time.perf_counter() - began)
    return {"first_s": first, "again": benchlib.Timing(again).as_dict()}


def switch_costs(unpatched, patched, device, repeats) -> dict:
    """Seconds to make ComfyUI's loaded model the patched clone (LoRA folded into the weights) and
    back (the original weights restored), each after the other one was loaded."""
    to_patched, to_unpatched = [], []
    for _ in range(repeats):
        loader(unpatched)()
        to_patched.append(benchlib.time_once(loader(patched), device))
        to_unpatched.append(benchlib.time_once(loader(unpatched), device))
    return {"to_patched": benchlib.Timing(to_patched).as_dict(), "to_unpatched": benchlib.Timing(to_unpatched).as_dict()}


def capture_id_calls(host, patched, inputs) -> list[tuple]:
    """The arguments of every ID-term call of one forward: (q, extra_options, key, projections, settings)."""
    patch_module = host.pack_submodule("nodes.glue.model_patch")
    original = patch_module.id_attention_delta
    calls = []

    def recording(q, extra_options, key, projections, settings, attention):
        if projections.kind == "identity":
            calls.append((q.clone(), dict(extra_options), key, projections, settings))
        return original(q, extra_options, key, projections, settings, attention)

    loader(patched)()
    patch_module.id_attention_delta = recording
    try:
        comfy_forward(patched, inputs)()
    finally:
        patch_module.id_attention_delta = original
    return calls


def id_term_costs(host, patched, inputs, device, repeats) -> dict:
    """The ID term of one step alone, with the kernel the patch calls and with ComfyUI's kernel.

    Timed on the query tensors of a real forward, so the shapes, batch layout and memoised
    keys/values are the sampler's; the difference of two step times would drown it in noise.
    """
    core = host.pack_submodule("consistentid_core.model.id_attention")
    patch_module = host.pack_submodule("nodes.glue.model_patch")
    calls = capture_id_calls(host, patched, inputs)

    def term(kernel_for):
        def run():
            with torch.inference_mode():
                for q, options, key, projections, settings in calls:
                    core.id_attention_delta(q, options, key, projections, settings, kernel_for(options))
        return run

    comfy_kernel = lambda options: (  # noqa: E731
        lambda q, k, v, heads: patch_module.comfy_attention(q, k, v, heads, options))
    timings = benchlib.time_cases(
        [Case("sdpa", term(lambda options: core.sdpa_attention)), Case("comfy", term(comfy_kernel))],
        device, repeats, warmup=1)
    import comfy.ldm.modules.attention

    return {"layers": len(calls), "comfy_kernel": comfy.ldm.modules.attention.optimized_attention.__name__,
            "sdpa": timings["sdpa"].as_dict(), "comfy": timings["comfy"].as_dict()}


def bench_comfy(host, args, arch, device, dtype, fold_lora) -> dict:
    import comfy.model_management
    from tools import random_models

    names = args.sdxl_cases if arch == "sdxl" else args.cases
    names = ["unpatched"] + [n for n in names if n != "unpatched"]
    blocks, steps = steady_samples(args, arch)
    embeds = benchlib.random_face_embeds(host, arch)
    benchlib.log_progress(f"{arch}: building the random ComfyUI UNet ({dtype})")
    model = random_models.comfy_unet(arch, seed=0, dtype=dtype)
    ckpt = make_checkpoint(host, arch, device, dtype)
    result = {"cases": names, "blocks": blocks, "steps": steps, "lora_folded": fold_lora}
    result["apply_node"] = apply_node_costs(host, model, ckpt, embeds, fold_lora, args.switch_repeats)
    variants = comfy_variants(host, model, ckpt, embeds, [n for n in names if n != "unpatched"] + ["full"], fold_lora)
    inputs = StepInputs(arch, device, dtype, benchlib.id_tokens(ckpt, embeds), latent_side(args, arch))
    # The patches hold what they need (projected keys/values; the LoRA patches reference the
    # adapter's own tensors): the rest of the checkpoint can go.
    del ckpt
    benchlib.free_memory()

    cases = [Case(name, comfy_forward(variants[name], inputs), setup=loader(variants[name])) for name in names]
    load_before = benchlib.load_average()
    steady = benchlib.time_blocks(cases, device, blocks, steps, warmup=1, progress=benchlib.log_progress)
    result["steady"] = {name: timing.as_dict() for name, timing in steady.items()}
    result["load_average_steady"] = [load_before, benchlib.load_average()]

    if args.id_term_repeats:
        benchlib.log_progress(f"{arch}: the ID term alone")
        result["id_term"] = id_term_costs(host, variants["full"], inputs, device, args.id_term_repeats)
    if args.switch_repeats and fold_lora:
        benchlib.log_progress(f"{arch}: switching between the unpatched and the patched model")
        result["switch"] = switch_costs(variants["unpatched"], variants["full"], device, args.switch_repeats)
    if args.alternating_repeats:
        benchlib.log_progress(f"{arch}: the old run-by-run alternation (a load before every forward)")
        pair = [Case(name, comfy_forward(variants[name], inputs), setup=loader(variants[name]))
                for name in ("unpatched", "full")]
        alternating = benchlib.time_cases(pair, device, args.alternating_repeats, 1, benchlib.log_progress)
        result["alternating"] = {name: timing.as_dict() for name, timing in alternating.items()}
    comfy.model_management.unload_all_models()
    del model, variants, cases
    comfy.model_management.soft_empty_cache()
    benchlib.free_memory()
    return result


# --- diffusers ------------------------------------------------------------------------------------

def bench_diffusers(host, args, arch, device, dtype) -> dict:
    from tools import random_models

    attention = host.pack_submodule("training.attention_processors")
    blocks, steps = steady_samples(args, arch)
    embeds = benchlib.random_face_embeds(host, arch)
    benchlib.log_progress(f"{arch}: building the random diffusers UNet ({dtype})")
    unet = random_models.diffusers_unet(arch, seed=0, device=device, dtype=dtype)
    plain = dict(unet.attn_processors)
    ckpt = make_checkpoint(host, arch, device, dtype)  # the same seed: the same adapter as ComfyUI's
    attention.install_processors(unet, adapter_state=ckpt.adapter_state_dict())
    inputs = StepInputs(arch, device, dtype, benchlib.id_tokens(ckpt, embeds), latent_side(args, arch))
    del ckpt  # the processors hold their own copies
    benchlib.free_memory()
    official = dict(unet.attn_processors)
    plain_setup, plain_run = diffusers_forward(unet, plain, inputs.text, inputs)
    official_setup, official_run = diffusers_forward(unet, official, inputs.text_and_id, inputs)
    cases = [Case("unpatched", plain_run, setup=plain_setup), Case("full", official_run, setup=official_setup)]
    load_before = benchlib.load_average()
    steady = benchlib.time_blocks(cases, device, blocks, steps, warmup=1, progress=benchlib.log_progress)
    del unet, plain, official, cases
    benchlib.free_memory()
    return {"cases": ["unpatched", "full"], "blocks": blocks, "steps": steps,
            "steady": {name: timing.as_dict() for name, timing in steady.items()},
            "load_average_steady": [load_before, benchlib.load_average()]}


# --- one process per backend ------------------------------------------------------------------------

def run_child(args) -> dict:
    """This process measures one (architecture, backend) and writes its JSON (``--child`` spec)."""
    spec = json.loads(args.child)
    arch, backend = spec["arch"], spec["backend"]
    comfy_backend = None if backend in ("default", "diffusers") else backend
    if args.threads:
        torch.set_num_threads(args.threads)
    device, host, machine = benchlib.start(args.device, attention=comfy_backend)
    import comfy.ldm.modules.attention

    dtype = model_dtype(arch, device, args.sdxl_dtype)
    fold = arch == "sd15" or args.sdxl_lora == "fold" or (args.sdxl_lora == "auto" and device.type == "cuda")
    result = {"arch": arch, "backend": backend, "dtype": str(dtype).replace("torch.", ""),
              "latent": latent_side(args, arch), "batch": 2, "machine": machine,
              "comfy_attention": comfy.ldm.modules.attention.optimized_attention.__name__,
              "load_average_start": benchlib.load_average()}
    shortfall = memory_shortfall(arch, dtype) if device.type == "cpu" else None
    if shortfall:
        result["skipped"] = shortfall
    elif backend == "diffusers":
        result.update(bench_diffusers(host, args, arch, device, dtype))
    else:
        result.update(bench_comfy(host, args, arch, device, dtype, fold))
    result["load_average_end"] = benchlib.load_average()
    with open(spec["output"], "w") as handle:
        json.dump(result, handle, indent=2)
    return 0


def child_argv(args, arch: str, backend: str, output: str) -> list[str]:
    """This script's command line for one (architecture, backend), with the parent's settings."""
    passed = ["--device", args.device, "--blocks", str(args.blocks), "--steps", str(args.steps),
              "--sdxl-dtype", args.sdxl_dtype, "--sdxl-lora", args.sdxl_lora,
              "--alternating-repeats", str(args.alternating_repeats), "--switch-repeats", str(args.switch_repeats),
              "--id-term-repeats", str(args.id_term_repeats), "--cases", *args.cases, "--sdxl-cases", *args.sdxl_cases]
    for option, value in (("--threads", args.threads), ("--sdxl-blocks", args.sdxl_blocks), ("--sdxl-steps", args.sdxl_steps),
                          ("--latent", args.latent), ("--sdxl-latent", args.sdxl_latent)):
        if value:
            passed += [option, str(value)]
    spec = json.dumps({"arch": arch, "backend": backend, "output": output})
    return [sys.executable, os.path.abspath(__file__), *passed, "--child", spec]


def measure(args, arch: str, backend: str) -> dict:
    benchlib.log_progress(f"=== {arch}, {backend}: a process of its own")
    with tempfile.TemporaryDirectory(prefix="cid-unet-step-") as folder:
        output = os.path.join(folder, "result.json")
        try:
            done = subprocess.run(child_argv(args, arch, backend, output), timeout=args.timeout,
                                  env=benchlib.child_environment(args.malloc))
        except subprocess.TimeoutExpired:
            return {"arch": arch, "backend": backend, "skipped": f"did not finish within {args.timeout:.0f} s"}
        if done.returncode != 0 or not os.path.isfile(output):
            # A process killed for memory ends with -9 and leaves no file: say so instead of a traceback.
            return {"arch": arch, "backend": backend, "skipped": f"the process ended with code {done.returncode}"}
        with open(output) as handle:
            result = json.load(handle)
    result["malloc"] = args.malloc
    return result


# --- summary ------------------------------------------------------------------------------------------

def summarize(result: dict) -> dict:
    """Medians and ratios of one (architecture, backend) result, as the tables print them."""
    if "skipped" in result:
        return {}
    steady = {name: benchlib.Timing(v["samples_s"], v.get("cpu_samples_s", [])) for name, v in result["steady"].items()}
    out = {"median_s": {name: t.median for name, t in steady.items()}, "ratio": {}, "cpu_ratio": {}}
    for name in steady:
        if name != "unpatched":
            out["ratio"][name] = benchlib.ratio(steady, name, "unpatched")
            out["cpu_ratio"][name] = benchlib.ratio(steady, name, "unpatched", by_cpu=True)
    if "full" in out["ratio"]:
        out["verdict"] = benchlib.verdict(out["ratio"]["full"], TARGET_RATIO, ACCEPTED_RATIO)
    if "alternating" in result:
        alternating = {name: benchlib.Timing(v["samples_s"], v.get("cpu_samples_s", []))
                       for name, v in result["alternating"].items()}
        out["alternating_ratio"] = benchlib.ratio(alternating, "full", "unpatched")
    first = {name: v["first_after_load_s"] for name, v in result["steady"].items() if v.get("first_after_load_s")}
    out["first_after_load_s"] = {name: sorted(v)[len(v) // 2] for name, v in first.items()}
    faults = {name: v["page_faults"] for name, v in result["steady"].items() if v.get("page_faults")}
    out["page_faults_per_step"] = {name: sorted(v)[len(v) // 2] for name, v in faults.items()}
    return out


def steady_table(results: list[dict], machine: str) -> Table:
    table = Table(
        f"Steady-state UNet step, batch 2 (cond + uncond), random weights; medians of blocks x steps "
        f"per case, blocks alternated; {machine}",
        ["model", "backend", "unpatched (ms)", "full patch (ms)", f"ratio (target <= {TARGET_RATIO})",
         "by CPU time", "LoRA only", "wrapper only", "ID tokens only", "zero fold (control)",
         "page faults per step (unpatched / full)", "malloc", "samples per case"])
    for r in results:
        label = f"{r['arch'].upper()} {r.get('latent', '?')}x{r.get('latent', '?')}"
        if "skipped" in r:
            table.add(label, r["backend"], f"skipped: {r['skipped']}", *["-"] * (len(table.headers) - 3))
            continue
        s = r["summary"]
        if r["backend"] == "diffusers":
            backend = "diffusers, official-style processors"
        else:
            backend = f"{r['backend']} ({r['comfy_attention']})"
        if not r.get("lora_folded", True):
            backend += ", LoRA not folded"
        ratios = s["ratio"]
        cell = lambda name: f"{ratios[name]:.3f}" if name in ratios else "-"  # noqa: E731
        full = f"{ratios['full']:.3f}"
        if r["backend"] != "diffusers":
            full += f" ({s['verdict']})"
        cpu = f"{s['cpu_ratio']['full']:.3f}" if s["cpu_ratio"].get("full") else "-"
        faults = s.get("page_faults_per_step", {})
        fault_cell = f"{faults.get('unpatched', '-')} / {faults.get('full', '-')}" if faults else "-"
        table.add(label, backend, ms(s["median_s"]["unpatched"]), ms(s["median_s"]["full"]), full, cpu,
                  cell("lora_only"), cell("wrapper_only"), cell("id_only"), cell("zero_fold"), fault_cell,
                  r.get("malloc", "default"), f"{r['blocks']} x {r['steps']}")
    return table


def one_off_table(results: list[dict]) -> Table:
    table = Table(
        "Paid once per model load or node run, not per step; and the ID term of one step alone",
        ["model", "backend", "Apply node, first / again (ms)", "load patched: LoRA fold (ms)",
         "load unpatched: restore (ms)", "first forward after a load / steady (full)",
         "old run-by-run alternation: full / unpatched", "ID term per step, sdpa (now) (ms, share)",
         "ID term per step, ComfyUI's kernel (before) (ms)"])
    for r in results:
        if "skipped" in r or r["backend"] == "diffusers":
            continue
        s = r["summary"]
        label = f"{r['arch'].upper()} {r['latent']}x{r['latent']}"
        apply = r["apply_node"]
        switch = r.get("switch")
        first = s["first_after_load_s"].get("full")
        after_load = f"{first / s['median_s']['full']:.3f}" if first else "-"
        alternating = f"{s['alternating_ratio']:.3f}" if "alternating_ratio" in s else "-"
        id_term = r.get("id_term")
        now = before = "-"
        if id_term:
            sdpa = id_term["sdpa"]["median_s"]
            now = f"{ms(sdpa)} ({100 * sdpa / s['median_s']['unpatched']:.1f} %)"
            before = f"{ms(id_term['comfy']['median_s'])} ({id_term['comfy_kernel']})"
        table.add(label, r["backend"], f"{ms(apply['first_s'])} / {ms(apply['again']['median_s'])}",
                  ms(switch["to_patched"]["median_s"]) if switch else "-",
                  ms(switch["to_unpatched"]["median_s"]) if switch else "-", after_load, alternating, now, before)
    return table


def plot(results: list[dict], machine: str, path: str) -> None:
    plt = benchlib.pyplot()
    results = [r for r in results if "skipped" not in r]
    if not results:
        return
    colours = {"unpatched": "#9aa5b1", "full": "#2f7ed8", "lora_only": "#c9b27c", "wrapper_only": "#5cb85c",
               "id_only": "#8e6bbf", "zero_fold": "#e39c4f"}
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4.4), squeeze=False, sharey=False)
    for ax, r in zip(axes[0], results):
        names = [n for n in COMFY_CASES if n in r["steady"]]
        medians = [r["summary"]["median_s"][n] * 1000 for n in names]
        lows = [m - min(r["steady"][n]["samples_s"]) * 1000 for m, n in zip(medians, names)]
        highs = [max(r["steady"][n]["samples_s"]) * 1000 - m for m, n in zip(medians, names)]
        bars = ax.bar(names, medians, yerr=[lows, highs], color=[colours[n] for n in names], capsize=3)
        ax.bar_label(bars, labels=[f"{m:.0f}" for m in medians], padding=2, fontsize=7)
        backend = "diffusers (official processors)" if r["backend"] == "diffusers" else r["comfy_attention"]
        ax.set_title(f"{r['arch'].upper()} {r['latent']}x{r['latent']} {r['dtype']}\n{backend}, "
                     f"malloc {r.get('malloc', 'default')}\n"
                     f"full / unpatched {r['summary']['ratio']['full']:.3f}", fontsize=8)
        ax.set_ylabel("ms per UNet step (median, min-max)")
        ax.tick_params(axis="x", labelsize=7, rotation=30)
    benchlib.save_figure(fig, path, f"Steady-state UNet step: {machine}", fontsize=8)


def result_key(result: dict) -> tuple:
    return result["arch"], result["backend"], result.get("malloc", "default")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    device = benchlib.pick_device(args.device)
    archs = args.arch or (["sd15", "sdxl"] if device.type == "cuda" else ["sd15"])
    backends = args.backends or (["default", "diffusers"] if device.type == "cuda"
                                 else ["sub-quadratic", "pytorch", "diffusers"])
    for arch in archs:
        blocks, steps = steady_samples(args, arch)
        if blocks * steps < 5:
            benchlib.log_progress(f"note: {arch} gets {blocks * steps} steady-state samples per case; "
                                  "the reported medians want at least 5")
    started = benchlib.load_average()
    results = benchlib.previous_results(args.output) if args.append else []
    for arch in archs:
        for backend in backends:
            result = measure(args, arch, backend)
            result["summary"] = summarize(result)
            results = [r for r in results if result_key(r) != result_key(result)] + [result]
            # Written after every process, so that a run killed later still leaves these numbers.
            benchlib.write_json(f"{args.output}.json", {
                "machine": next((r["machine"] for r in results if "machine" in r), benchlib.machine_description(device)),
                "load_average": {"start": started, "now": benchlib.load_average()},
                "results": results})
    machine = next((r["machine"] for r in results if "machine" in r), benchlib.machine_description(device))
    for table in (steady_table(results, machine), one_off_table(results)):
        table.print()
    print(f"load average (1, 5, 15 min): at the start {started}, at the end {benchlib.load_average()}")
    png = benchlib.results_path(f"{args.output}.png")
    plot(results, machine, png)
    print(f"plot: {os.path.relpath(png, benchlib.REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
