"""One table for a CUDA machine: SD1.5 and SDXL steps without and with ConsistentID in fp16, the
encode of one photo, peak VRAM.  Started by ``benchmarks/gpu_check.sh`` (see there).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/gpu_check.py                 # CUDA
    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/gpu_check.py --device cpu --tiny --arch sd15

Steps: SD1.5 at 512 px (64x64 latent) and SDXL at 1024 px (128x128), batch 2 (cond + uncond),
fp16, random weights of the real shapes, ComfyUI's own attention choice; unpatched and with
ConsistentIDApplyModel's patch (LoRA folded), measured as unet_step.py measures (blocks of
consecutive steps after a warm-up, alternated), plus the ID term of one step alone and the LoRA
fold per model load.  Encode: one 640 px photo through insightface (stand-in models, so that part
is not the real detector's cost), BiSeNet and CLIP ViT-H (6 region images + photo + zero image).
Peak VRAM: torch's high-water mark of allocated memory during one forward (model weights
included) and during the encode.

``--tiny`` runs the same code on small latents (8x8) and fewer samples: it checks the script on a
machine without a GPU, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
import unet_step  # noqa: E402
from benchlib import Case, Table, ms  # noqa: E402

import torch  # noqa: E402

GIB = 2**30
FULL_LATENT = {"sd15": 64, "sdxl": 128}
TINY_LATENT = 8


class NoCudaError(SystemExit):
    """Raised (exit status 2) when the check is asked to run on a GPU that is not there."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu only together with --tiny")
    parser.add_argument("--tiny", action="store_true", help="8x8 latents, few samples: checks the script, not the GPU")
    parser.add_argument("--arch", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    parser.add_argument("--blocks", type=int, default=None, help="blocks per case (default 2; --tiny: 1)")
    parser.add_argument("--steps", type=int, default=None, help="steps per block (default 5; --tiny: 2)")
    parser.add_argument("--encode-repeats", type=int, default=None, help="timed encodes (default 5; --tiny: 1)")
    parser.add_argument("--skip-encode", action="store_true")
    parser.add_argument("--output", default=None,
                        help="JSON file stem; default gpu_check in benchmarks/results, with --tiny a temporary file")
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.tiny:
        parser.error("--device cpu needs --tiny: full-size steps on the CPU are benchmarks/unet_step.py's job")
    tiny = args.tiny
    args.blocks = args.blocks or (1 if tiny else 2)
    args.steps = args.steps or (2 if tiny else 5)
    args.encode_repeats = args.encode_repeats if args.encode_repeats is not None else (1 if tiny else 5)
    return args


def require_cuda(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        built = torch.version.cuda or "no CUDA (a CPU-only build)"
        raise NoCudaError(
            f"gpu_check needs a CUDA GPU, and torch.cuda.is_available() is False here (torch {torch.__version__}, "
            f"built with {built}). Run it on a machine with an NVIDIA GPU and a CUDA build of torch; to check the "
            "script itself on this machine: bash benchmarks/gpu_check.sh --dry-run")


class PeakMemory:
    """Peak VRAM on CUDA (torch's allocated high-water mark), peak RSS of the process on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self._inner = benchlib.PeakVRAM(device) if device.type == "cuda" else benchlib.PeakRSS()

    def __enter__(self):
        self._inner.__enter__()
        return self

    def __exit__(self, *exc):
        self._inner.__exit__(*exc)

    @property
    def peak(self) -> int:
        return self._inner.peak


def memory_label(device: torch.device) -> str:
    return "peak VRAM (GiB)" if device.type == "cuda" else "peak RSS (GiB; CPU dry run)"


def step_dtype(arch: str, device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.float16
    return torch.float32 if arch == "sd15" else torch.bfloat16  # the CPU has no fast fp16 convolutions


def check_step(host, args, arch: str, device: torch.device) -> dict:
    """Steady-state steps unpatched vs patched, peak memory per forward, ID term, LoRA fold."""
    import comfy.model_management
    from tools import random_models

    dtype = step_dtype(arch, device)
    side = TINY_LATENT if args.tiny else FULL_LATENT[arch]
    benchlib.log_progress(f"{arch}: building the random UNet ({dtype}), latent {side}x{side}")
    embeds = benchlib.random_face_embeds(host, arch)
    model = random_models.comfy_unet(arch, seed=0, dtype=dtype)
    ckpt = unet_step.make_checkpoint(host, arch, device, dtype)
    variants = unet_step.comfy_variants(host, model, ckpt, embeds, ["full"], fold_lora=True)
    inputs = unet_step.StepInputs(arch, device, dtype, benchlib.id_tokens(ckpt, embeds), side)
    del ckpt
    cases = [Case(name, unet_step.comfy_forward(variants[name], inputs), setup=unet_step.loader(variants[name]))
             for name in ("unpatched", "full")]
    steady = benchlib.time_blocks(cases, device, args.blocks, args.steps, warmup=1, progress=benchlib.log_progress)
    peaks = {}
    for case in cases:
        case.setup()
        with PeakMemory(device) as peak:
            case.run()
        peaks[case.name] = peak.peak
    id_term = unet_step.id_term_costs(host, variants["full"], inputs, device, repeats=3 if args.tiny else 7)
    switch = unet_step.switch_costs(variants["unpatched"], variants["full"], device, repeats=2 if args.tiny else 3)
    comfy.model_management.unload_all_models()
    del model, variants, cases
    comfy.model_management.soft_empty_cache()
    benchlib.free_memory()
    return {"arch": arch, "dtype": str(dtype).replace("torch.", ""), "latent": side, "batch": 2,
            "steady": {name: timing.as_dict() for name, timing in steady.items()},
            "ratio": benchlib.ratio(steady, "full", "unpatched"), "peak_bytes": peaks,
            "id_term": id_term, "switch": switch}


def check_encode(host, args, device: torch.device) -> dict:
    """One photo through the pack's encode (insightface stand-ins, BiSeNet, ViT-H), as the node runs it."""
    import comfy.model_management
    import preprocessing

    benchlib.log_progress("encode: placing and loading the random-weight ViT-H, BiSeNet, insightface stand-ins")
    preprocessing.place_models(host)
    clip_vision, analysis, parser = preprocessing.load_models(host)
    pipeline = host.pack_submodule("consistentid_core.face.pipeline")
    vision = host.pack_submodule("nodes.glue.vision").comfy_vision_encoder(clip_vision)
    parser = preprocessing.FaceLayoutParser(parser)  # every photo gets the 5 regions of a face
    photo = preprocessing.photo(0)
    encode = Case("encode one photo", lambda: pipeline.encode_references([photo], analysis, parser, vision, "sd15"))
    timing = benchlib.time_cases([encode], device, max(1, args.encode_repeats), warmup=0 if args.tiny else 1)
    with PeakMemory(device) as peak:
        encode.run()
    del clip_vision, analysis, parser, vision
    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()
    benchlib.free_memory()
    return {"timing": timing[encode.name].as_dict(), "peak_bytes": peak.peak}


def report(steps: list[dict], encode: dict | None, device: torch.device, machine: str, tiny: bool) -> Table:
    title = f"GPU check; {machine}" + ("  [DRY RUN on tiny inputs: the numbers mean nothing]" if tiny else "")
    label = memory_label(device)
    table = Table(title, ["what", "unpatched (ms)", "with ConsistentID (ms)", "ratio",
                          f"{label}: unpatched / patched", "ID term per step (ms)", "LoRA fold per load (ms)"])
    for r in steps:
        t = {name: v["median_s"] for name, v in r["steady"].items()}
        pixels = r["latent"] * 8
        table.add(f"{r['arch'].upper()} step, {pixels} px, batch 2, {r['dtype']}", ms(t["unpatched"]), ms(t["full"]),
                  f"{r['ratio']:.3f}",
                  f"{r['peak_bytes']['unpatched'] / GIB:.2f} / {r['peak_bytes']['full'] / GIB:.2f}",
                  ms(r["id_term"]["sdpa"]["median_s"]), ms(r["switch"]["to_patched"]["median_s"]))
    if encode is not None:
        table.add("encode one photo (analysis, parsing, ViT-H x 7)", "-", ms(encode["timing"]["median_s"]), "-",
                  f"{encode['peak_bytes'] / GIB:.2f}", "-", "-")
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    require_cuda(args.device)
    device, host, machine = benchlib.start(args.device)
    encode = None if args.skip_encode else check_encode(host, args, device)
    steps = [check_step(host, args, arch, device) for arch in args.arch]
    table = report(steps, encode, device, machine, args.tiny)
    table.print()
    if device.type == "cuda":
        print(f"peak VRAM of the whole check: {torch.cuda.max_memory_allocated(device) / GIB:.2f} GiB allocated, "
              f"{torch.cuda.max_memory_reserved(device) / GIB:.2f} GiB reserved")
    data = {"machine": machine, "tiny": args.tiny, "steps": steps, "encode": encode,
            "load_average": benchlib.load_average()}
    if args.output is None and args.tiny:
        path = os.path.join(tempfile.gettempdir(), "gpu_check_dry_run.json")
        with open(path, "w") as handle:
            json.dump(data, handle, indent=2, default=str)
    else:
        path = benchlib.write_json(f"{args.output or 'gpu_check'}.json", data)
    print(f"raw numbers: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
