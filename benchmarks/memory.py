"""Memory of the ConsistentID adapter, and what clones and re-executions cost in time and memory.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/memory.py [--iterations 20] [--costs-only]

SD1.5, random weights of the real shapes, in ComfyUI in this process:

* the checkpoint as the pack's loader reads it (a random file of the official layout), split
  into its parts; the ID patch that ConsistentIDApplyModel adds; the weight backup ComfyUI keeps
  while the LoRA is folded into a loaded model; the extra peak of a 512 px, batch-2 step;
* 20 clones of the patched model (``ModelPatcher.clone``, each loaded and run on a tiny latent,
  then dropped as ComfyUI drops a replaced node output) and 20 re-executions of
  ConsistentIDApplyModel with a changed weight on the same input model (each loaded and run):
  the growth of the live tensor bytes and of the RSS, which must stay below 1 % of the adapter.

Peak RSS comes from the kernel's high-water mark (Linux) or a 1 ms sampler; VRAM from torch's
allocator statistics on CUDA.

Also the host-side time of the patch for SD1.5 and SDXL: ConsistentIDApplyModel, a clone (made
and dropped), the patch move ComfyUI does on every model load, and the bookkeeping of one step
(the ID term without its attention kernel).  These run on meta-device UNets (no weights are
needed for them) with one intra-op thread: they are many tiny operations, and on a machine shared
with other jobs two threads stall at every operation's barrier, which is noise, not our cost.
``--costs-only`` measures just these (seconds instead of minutes), e.g. to compare two versions.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import Table, mib, ms  # noqa: E402

import torch  # noqa: E402

GROWTH_LIMIT = 0.01  # of the adapter's bytes
STEP_LATENT = 64
TINY_LATENT = 8


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--iterations", type=int, default=20, help="clones and re-executions")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs for the apply/clone/move medians")
    parser.add_argument("--costs-only", action="store_true", help="only the host-side costs (meta UNets, fast)")
    parser.add_argument("--skip-step", action="store_true", help="leave out the 512 px step peaks (slow on a CPU)")
    parser.add_argument("--output", default="memory")
    return parser.parse_args(argv)


class Phase:
    """RSS, live tensor bytes and VRAM before/after and at the peak of one block."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        benchlib.free_memory()
        self.tensors_before = benchlib.live_tensor_bytes()
        self.vram = benchlib.PeakVRAM(self.device).__enter__()
        self.rss = benchlib.PeakRSS().__enter__()
        return self

    def __exit__(self, *exc):
        self.rss.__exit__(*exc)
        self.vram.__exit__(*exc)
        self.tensors_after = benchlib.live_tensor_bytes()

    def as_dict(self) -> dict:
        return {
            "rss_peak_increase": self.rss.increase,
            "tensor_bytes_added": self.tensors_after - self.tensors_before,
            "vram_peak_increase": self.vram.increase,
        }


def forward(patcher, side: int, device) -> None:
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, side, side, generator=gen).to(device)
    context = torch.randn(2, 77, 768, generator=gen).to(device)
    sigma = torch.full((2,), 5.0, device=device)
    options = dict(patcher.model_options.get("transformer_options", {}), cond_or_uncond=[0, 1], sigmas=sigma)
    with torch.inference_mode():
        patcher.model.apply_model(x, sigma, c_crossattn=context, transformer_options=options)


def growth_run(label, make, iterations, device) -> dict:
    """Runs ``make(i)`` (returns the new live object, the previous one is dropped) ``iterations``
    times after one warm-up; records live tensor bytes and RSS after every iteration."""
    current = make(-1)  # warm-up: first-use caches and allocator pools fill here, not in the count
    benchlib.free_memory()
    start_tensors, start_rss = benchlib.live_tensor_bytes(), benchlib.rss_bytes()
    start_vram = benchlib.vram_allocated(device)
    tensors, rss, seconds = [], [], []
    for i in range(iterations):
        began = time.perf_counter()
        current = make(i)
        seconds.append(time.perf_counter() - began)
        benchlib.free_memory()
        tensors.append(benchlib.live_tensor_bytes() - start_tensors)
        rss.append(benchlib.rss_bytes() - start_rss)
        benchlib.log_progress(f"{label} {i + 1}/{iterations}: tensors {tensors[-1]:+d} B, RSS {rss[-1] / 2**20:+.1f} MiB")
    del current
    return {
        "tensor_growth": tensors,
        "rss_growth": rss,
        "vram_growth": benchlib.vram_allocated(device) - start_vram,
        "seconds_per_iteration": benchlib.Timing(seconds).as_dict(),
    }


def timed(fn, repeats) -> benchlib.Timing:
    fn()
    samples = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - began)
    return benchlib.Timing(samples)


def patch_costs(host, model, ckpt, embeds, repeats) -> dict:
    """Per apply, per clone (created and dropped) and per model load's patch move, in seconds."""
    apply = host.pack_submodule("nodes.glue.model_patch")
    weights = iter([0.5 + 0.01 * i for i in range(10 * repeats + 10)])
    patched = apply.apply_model(model, ckpt, embeds)

    def clone_and_drop():
        clone = patched.clone()
        del clone  # ComfyUI's ModelPatcher.__del__ detaches: the patches are moved to the offload device

    def move():
        patched.model_patches_to(patched.load_device)
        patched.model_patches_to(patched.model_dtype())

    return {
        "apply_s": timed(lambda: apply.apply_model(model, ckpt, embeds, weight=next(weights)), repeats).as_dict(),
        "clone_s": timed(clone_and_drop, repeats).as_dict(),
        "patch_move_per_load_s": timed(move, repeats).as_dict(),
        "patch_host_per_step_s": timed(host_work_per_step(host, patched), 10 * repeats).as_dict(),
    }


def host_work_per_step(host, patched):
    """One step's worth of the ID term without its attention kernel: every cross-attention layer's
    row selection, key/value lookup, window check and scaling, on a tiny query.  This is the part
    of the patch that is Python and bookkeeping rather than arithmetic."""
    idattn = host.pack_submodule("consistentid_core.model.id_attention")
    patches = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    device, dtype = patched.load_device, patched.model_dtype()
    queries = {key: torch.zeros(2, 16, p.projections.cond_k[key].shape[-1], device=device, dtype=dtype)
               for key, p in patches.items()}
    options = {"n_heads": 8, "cond_or_uncond": [0, 1], "sigmas": torch.full((2,), 5.0, device=device)}
    no_kernel = lambda q, k, v, heads: q  # noqa: E731

    def step():
        options["sigmas"] = torch.full((2,), 5.0, device=device)  # a new tensor per step, as a sampler passes
        for key, patch in patches.items():
            idattn.id_attention_delta(queries[key], options, key, patch.projections, patch.settings, no_kernel)
        benchlib.synchronize(device)

    return step


def sd15(host, device, args) -> dict:
    import comfy.model_management
    from tools import random_models

    apply = host.pack_submodule("nodes.glue.model_patch")
    checkpoint = host.pack_submodule("consistentid_core.model.checkpoint")
    path = random_models.consistentid_checkpoint(
        os.path.join(host.folder_paths.models_dir, "consistentid", "ConsistentID-v1.bin"))

    with Phase(device) as load_phase:
        ckpt = checkpoint.load_checkpoint(path)
    parts = {
        "adapter (LoRA + to_k_ip/to_v_ip)": benchlib.tensor_bytes(ckpt.adapter),
        "ID projection (image_proj)": benchlib.tensor_bytes(ckpt.image_proj),
        "FacialEncoder": benchlib.tensor_bytes(ckpt.facial_encoder),
    }
    adapter_bytes = parts["adapter (LoRA + to_k_ip/to_v_ip)"]
    embeds = benchlib.random_face_embeds(host, "sd15")

    benchlib.log_progress("building the random SD1.5 ComfyUI UNet")
    model = random_models.comfy_unet("sd15", seed=0, dtype=torch.float16 if device.type == "cuda" else torch.float32)
    comfy.model_management.load_models_gpu([model])
    with Phase(device) as apply_phase:
        patched = apply.apply_model(model, ckpt, embeds)
    with Phase(device) as fold_phase:
        comfy.model_management.load_models_gpu([patched])

    steps = {}
    if not args.skip_step:
        for name, patcher in (("unpatched", model), ("patched", patched)):
            forward(patcher, TINY_LATENT, device)  # loads (and folds) outside the measured block
            with Phase(device) as step_phase:
                forward(patcher, STEP_LATENT, device)
            steps[name] = step_phase.as_dict()
            benchlib.log_progress(f"512 px step {name}: RSS peak +{mib(step_phase.rss.increase)} MiB")

    def clone_once(_i):
        clone = patched.clone()
        forward(clone, TINY_LATENT, device)
        return clone

    weights = [0.3 + 0.035 * i for i in range(args.iterations + 1)]

    def reexecute(i):
        again = apply.apply_model(model, ckpt, embeds, weight=weights[i + 1])
        forward(again, TINY_LATENT, device)
        return again

    clones = growth_run("clone", clone_once, args.iterations, device)
    reexecutions = growth_run("re-execution", reexecute, args.iterations, device)
    comfy.model_management.unload_all_models()
    return {
        "checkpoint_load": load_phase.as_dict(),
        "checkpoint_parts": parts,
        "adapter_bytes": adapter_bytes,
        "apply": apply_phase.as_dict(),
        "lora_fold_load": fold_phase.as_dict(),
        "step_peaks": steps,
        "clones": clones,
        "reexecutions": reexecutions,
    }


def host_costs(host, arch: str, repeats: int) -> dict:
    import comfy.model_detection
    import comfy.model_patcher
    from diffusers import UNet2DConditionModel
    from tools import random_models

    ckpt = benchlib.adapter_checkpoint(host, arch)
    embeds = benchlib.random_face_embeds(host, arch)
    with torch.device("meta"):
        shapes = UNet2DConditionModel(**random_models.UNET_CONFIGS[arch]).state_dict()
    config = comfy.model_detection.model_config_from_diffusers_unet(shapes)
    config.set_inference_dtype(torch.float16, None)
    with torch.device("meta"):
        base = config.get_model({}, "", device="meta")
    cpu = torch.device("cpu")
    model = comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        costs = patch_costs(host, model, ckpt, embeds, repeats)
    finally:
        torch.set_num_threads(threads)
    costs["adapter_bytes"] = benchlib.tensor_bytes(ckpt.adapter)
    return costs


# --- report ---------------------------------------------------------------------------------------

def report(result: dict, machine: str) -> list[Table]:
    adapter = result["adapter_bytes"]
    limit = GROWTH_LIMIT * adapter
    memory = Table(f"Memory of the adapter (SD1.5, random weights of the real layout); {machine}",
                   ["what", "bytes", "MiB", "note"])
    for name, size in result["checkpoint_parts"].items():
        memory.add(f"checkpoint: {name}", size, mib(size), "tensor bytes as loaded (fp32)")
    load = result["checkpoint_load"]
    memory.add("checkpoint load: peak RSS increase", load["rss_peak_increase"], mib(load["rss_peak_increase"]),
               "reading the .bin and building the modules")
    apply = result["apply"]
    memory.add("ConsistentIDApplyModel: tensors added", apply["tensor_bytes_added"], mib(apply["tensor_bytes_added"]),
               "projected ID keys/values of the 16 cross-attention layers")
    memory.add("ConsistentIDApplyModel: peak RSS increase", apply["rss_peak_increase"], mib(apply["rss_peak_increase"]), "")
    fold = result["lora_fold_load"]
    memory.add("model load with the LoRA folded: tensors added", fold["tensor_bytes_added"],
               mib(fold["tensor_bytes_added"]), "ComfyUI's backup of the 128 original weights (any LoRA does this)")
    memory.add("model load with the LoRA folded: peak RSS increase", fold["rss_peak_increase"],
               mib(fold["rss_peak_increase"]), "")
    if fold["vram_peak_increase"]:
        memory.add("model load: peak VRAM increase", fold["vram_peak_increase"], mib(fold["vram_peak_increase"]), "")
    steps = result["step_peaks"]
    if steps:
        for name in ("unpatched", "patched"):
            memory.add(f"512 px batch-2 step, {name}: peak RSS increase", steps[name]["rss_peak_increase"],
                       mib(steps[name]["rss_peak_increase"]), "activations")
            if steps[name]["vram_peak_increase"]:
                memory.add(f"512 px batch-2 step, {name}: peak VRAM increase", steps[name]["vram_peak_increase"],
                           mib(steps[name]["vram_peak_increase"]), "")

    growth = Table(f"Growth over {len(result['clones']['tensor_growth'])} iterations "
                   f"(target: < 1 % of the adapter = {int(limit)} B)",
                   ["iterations of", "live tensor bytes", "RSS bytes", "VRAM bytes", "verdict", "median ms per iteration"])
    for label, key in (("clone + load + run", "clones"), ("re-execute with a new weight + load + run", "reexecutions")):
        g = result[key]
        tensors, rss = g["tensor_growth"][-1], g["rss_growth"][-1]
        verdict = "holds" if max(tensors, rss, g["vram_growth"]) < limit else "MISSED"
        growth.add(label, tensors, rss, g["vram_growth"], verdict, ms(g["seconds_per_iteration"]["median_s"]))

    return [memory, growth, costs_table(result["costs"])]


def costs_table(costs: dict) -> Table:
    table = Table("Host-side costs of the patch (median, one intra-op thread)",
                  ["model", "ConsistentIDApplyModel (ms)", "clone + drop (ms)", "patch move per model load (ms)",
                   "patch bookkeeping per step (ms)"])
    for arch, c in costs.items():
        table.add({"sd15": "SD1.5", "sdxl": "SDXL"}[arch], f"{c['apply_s']['median_s'] * 1000:.2f}",
                  f"{c['clone_s']['median_s'] * 1000:.2f}", f"{c['patch_move_per_load_s']['median_s'] * 1000:.2f}",
                  f"{c['patch_host_per_step_s']['median_s'] * 1000:.3f}")
    return table


def plot(result: dict, machine: str, path: str) -> None:
    plt = benchlib.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    parts = dict(result["checkpoint_parts"])
    parts["ID patch (apply)"] = result["apply"]["tensor_bytes_added"]
    parts["weight backup while loaded"] = result["lora_fold_load"]["tensor_bytes_added"]
    for name, peaks in result["step_peaks"].items():
        parts[f"step peak, {name}"] = peaks["rss_peak_increase"]
    bars = left.barh(list(parts), [v / 2**20 for v in parts.values()], color="#2f7ed8")
    left.bar_label(bars, labels=[f"{v / 2**20:.1f}" for v in parts.values()], padding=2, fontsize=8)
    left.set_xlabel("MiB")
    left.set_title("SD1.5 adapter memory", fontsize=10)
    left.tick_params(axis="y", labelsize=8)
    limit = GROWTH_LIMIT * result["adapter_bytes"]
    for key, label, colour in (("clones", "clones", "#2f7ed8"), ("reexecutions", "re-executions", "#d9534f")):
        g = result[key]
        steps = range(1, len(g["tensor_growth"]) + 1)
        right.plot(steps, [v / 2**20 for v in g["tensor_growth"]], "-o", ms=3, color=colour, label=f"{label}: live tensors")
        right.plot(steps, [v / 2**20 for v in g["rss_growth"]], "--", color=colour, label=f"{label}: RSS")
    right.axhline(limit / 2**20, color="black", lw=0.8, ls=":", label="1 % of the adapter")
    right.axhline(-limit / 2**20, color="black", lw=0.8, ls=":")
    right.set_xlabel("iteration")
    right.set_ylabel("growth since the warm-up (MiB)")
    right.set_title("Growth over clones and re-executions", fontsize=10)
    right.legend(fontsize=7)
    benchlib.save_figure(fig, path, machine, fontsize=8)


def main(argv=None) -> int:
    args = parse_args(argv)
    device, host, machine = benchlib.start(args.device)
    costs = {}
    for arch in ("sd15", "sdxl"):
        benchlib.log_progress(f"{arch}: host-side costs on a meta-device UNet")
        costs[arch] = host_costs(host, arch, args.repeats)
        benchlib.free_memory()
    if args.costs_only:
        costs_table(costs).print()
        benchlib.write_json(f"{args.output}_costs.json", {"machine": machine, "costs": costs})
        return 0
    result = sd15(host, device, args)
    result["costs"] = costs
    for table in report(result, machine):
        table.print()
    png = benchlib.results_path(f"{args.output}.png")
    plot(result, machine, png)
    benchlib.write_json(f"{args.output}.json", {"machine": machine, **result})
    print(f"plot: {os.path.relpath(png, benchlib.REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
