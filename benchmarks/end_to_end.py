"""Seconds per image for an example workflow in ComfyUI, once per attention backend.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/end_to_end.py [--size 512 --steps 30 --images 2]

The workflow (default ``sd15_portrait``, what ``tools/run_workflow.py`` runs) on the smoke mode's
random-weight models (``tools/smoke_models.py``: the real SD1.5 checkpoint layout, ViT-H, BiSeNet,
insightface stand-ins), at ``--size`` px and ``--steps`` steps, the photo and the prompt of the
workflow.  Every backend runs in its own process (ComfyUI picks its attention kernel once).  Per
backend: the first image (loads every model, encodes the photo, samples, decodes) and then
``--images - 1`` more with a new seed, queued as a user does in one ComfyUI session, so that
ComfyUI's cache leaves only the sampler and the VAE to run.  Per image the time of each node that
ran is kept (from ComfyUI's ``executing`` events).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import Table  # noqa: E402

BACKENDS = ("sub-quadratic", "pytorch", "split", "default")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflow", default="sd15_portrait", help="name in example_workflows/api (SD1.5 workflows)")
    parser.add_argument("--backends", nargs="+", default=["sub-quadratic", "pytorch"], choices=BACKENDS)
    parser.add_argument("--size", type=int, default=512, help="width and height in px")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--images", type=int, default=2, help="images per backend: the first cold, the rest re-queued")
    parser.add_argument("--malloc", default="default", choices=sorted(benchlib.MALLOC_SETTINGS),
                        help="glibc malloc settings of the ComfyUI processes (see benchlib.MALLOC_SETTINGS)")
    parser.add_argument("--append", action="store_true", help="keep the results already in the output file")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per backend process")
    parser.add_argument("--output", default="end_to_end", help="file stem under benchmarks/results/")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.images < 1 or args.steps < 1:
        parser.error("--images and --steps must be at least 1")
    return args


class NodeClock:
    """Seconds per node of one queued prompt, from the executor's ``executing`` events.

    A node's time runs from its ``executing`` event to the next one (the last ends with ``None``,
    the end of the prompt); nodes ComfyUI took from its cache send no such event.
    """

    def __init__(self, clock=time.perf_counter):
        self._clock = clock
        self.current: tuple[str, float] | None = None
        self.seconds: dict[str, float] = {}

    def reset(self) -> None:
        self.current, self.seconds = None, {}

    def __call__(self, event: str, data: dict) -> None:
        if event != "executing":
            return
        now = self._clock()
        if self.current is not None:
            node, began = self.current
            self.seconds[node] = self.seconds.get(node, 0.0) + now - began
        node = data.get("node")
        self.current = (str(node), now) if node is not None else None


def workflow_prompt(name: str, size: int, steps: int, seed: int, host, input_dir: str) -> dict:
    """The workflow as the runner's ``--smoke --width --height --steps --seed`` would queue it."""
    from tools import run_workflow, smoke_models

    prompt = smoke_models.prepare(host, run_workflow.load_workflow(name), input_dir)
    options = SimpleNamespace(prompt=None, negative=None, checkpoint=None, steps=steps, seed=seed,
                              width=size, height=size)
    return run_workflow.customise(prompt, options, None)


def run_child(args) -> int:
    import torch

    spec = json.loads(args.child)
    backend = spec["backend"]
    clock = NodeClock()
    began = time.perf_counter()
    device = torch.device("cpu") if not torch.cuda.is_available() else torch.device("cuda")
    host = benchlib.start_comfyui(device, attention=None if backend == "default" else backend, on_event=clock)
    import comfy.ldm.modules.attention

    result = {"backend": backend, "comfy_attention": comfy.ldm.modules.attention.optimized_attention.__name__,
              "machine": benchlib.machine_description(device), "startup_s": time.perf_counter() - began,
              "workflow": args.workflow, "size": args.size, "steps": args.steps, "images": [],
              "load_average_start": benchlib.load_average()}
    benchlib.log_progress(f"{backend}: placing the random-weight models (built once, then cached)")
    input_dir = host.folder_paths.get_input_directory()
    os.makedirs(input_dir, exist_ok=True)
    titles = {}
    for index in range(args.images):
        prompt = workflow_prompt(args.workflow, args.size, args.steps, 2024 + index, host, input_dir)
        titles = {k: v.get("_meta", {}).get("title", v["class_type"]) for k, v in prompt.items()}
        clock.reset()
        began = time.perf_counter()
        host.run(prompt, cached=True)
        seconds = time.perf_counter() - began
        nodes = {titles.get(k, k): v for k, v in clock.seconds.items()}
        result["images"].append({"seconds": seconds, "nodes_s": nodes})
        benchlib.log_progress(f"{backend}: image {index + 1}/{args.images}: {seconds:.1f} s "
                              + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(nodes.items(), key=lambda kv: -kv[1])[:4]))
    result["load_average_end"] = benchlib.load_average()
    with open(spec["output"], "w") as handle:
        json.dump(result, handle, indent=2)
    return 0


def child_argv(args, backend: str, output: str) -> list[str]:
    spec = json.dumps({"backend": backend, "output": output})
    return [sys.executable, os.path.abspath(__file__), "--workflow", args.workflow, "--size", str(args.size),
            "--steps", str(args.steps), "--images", str(args.images), "--child", spec]


def measure(args, backend: str) -> dict:
    benchlib.log_progress(f"=== {backend}: a process of its own")
    with tempfile.TemporaryDirectory(prefix="cid-end-to-end-") as folder:
        output = os.path.join(folder, "result.json")
        try:
            done = subprocess.run(child_argv(args, backend, output), timeout=args.timeout,
                                  env=benchlib.child_environment(args.malloc))
        except subprocess.TimeoutExpired:
            return {"backend": backend, "malloc": args.malloc, "skipped": f"did not finish within {args.timeout:.0f} s"}
        if done.returncode != 0 or not os.path.isfile(output):
            return {"backend": backend, "malloc": args.malloc, "skipped": f"the process ended with code {done.returncode}"}
        with open(output) as handle:
            result = json.load(handle)
    result["malloc"] = args.malloc
    return result


def sampler_seconds(image: dict) -> float | None:
    """Seconds of the sampling node(s) of one image (KSampler titles as the example workflows name them)."""
    found = [v for k, v in image["nodes_s"].items() if "sampler" in k.lower()]
    return sum(found) if found else None


def report(results: list[dict], args) -> Table:
    table = Table(f"{args.workflow} at {args.size}x{args.size}, {args.steps} steps, random weights; seconds per image",
                  ["backend", "malloc", "first image (s): loads, encodes, samples, decodes", "next image (s): new seed",
                   "sampler per step (s)", "vs the first backend (next image)"])
    reference = None
    for r in results:
        if "skipped" in r:
            table.add(r["backend"], r.get("malloc", "default"), f"skipped: {r['skipped']}", "-", "-", "-")
            continue
        images = r["images"]
        first = images[0]["seconds"]
        later = [image["seconds"] for image in images[1:]]
        nxt = sorted(later)[len(later) // 2] if later else None
        sampling = sampler_seconds(images[-1])
        reference = reference if reference is not None else (nxt or first)
        table.add(f"{r['backend']} ({r['comfy_attention']})", r.get("malloc", "default"), f"{first:.1f}", f"{nxt:.1f}" if nxt else "-",
                  f"{sampling / args.steps:.2f}" if sampling else "-", f"{(nxt or first) / reference:.2f}x")
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    started = benchlib.load_average()
    results = benchlib.previous_results(args.output) if args.append else []
    for backend in args.backends:
        result = measure(args, backend)
        key = (result["backend"], result["malloc"])
        results = [r for r in results if (r["backend"], r.get("malloc", "default")) != key] + [result]
        benchlib.write_json(f"{args.output}.json", {"load_average": {"start": started, "now": benchlib.load_average()},
                                                    "settings": vars(args), "results": results})
    report(results, args).print()
    print(f"load average (1, 5, 15 min): at the start {started}, at the end {benchlib.load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
