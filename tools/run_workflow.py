"""Make a portrait from a photo and a prompt through an example workflow, headless, in this process.

    COMFYUI_PATH=/path/to/ComfyUI python tools/run_workflow.py --image me.jpg --prompt "A man, in a forest"

The workflow (default ``sd15_portrait``) comes from ``example_workflows/api/<name>_api.json``.  Model
files are looked up in ComfyUI's model folders (``extra_model_paths.yaml`` included); when one is
missing, the command lists which file goes into which folder and stops.  ``--smoke`` runs the
same graph on random weights built on the fly to check an install: its pictures are noise.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import shutil
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # run as a script (run.sh): the repository's packages, ``tools`` among them
    sys.path.append(REPO_ROOT)
WORKFLOW_DIR = os.path.join(REPO_ROOT, "example_workflows", "api")
PROMPT_NODES = {"ConsistentIDApply", "ConsistentIDConditioning"}
INSIGHTFACE_FILES = ("det_10g.onnx", "w600k_r50.onnx")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", help="reference photo of the person (required unless --smoke)")
    parser.add_argument("--target", help="the photo the face is put into, for face_inpaint (required there unless --smoke)")
    parser.add_argument("--prompt", default=None, help="what to draw; the workflow's prompt when omitted")
    parser.add_argument("--negative", default=None, help="negative prompt; the workflow's when omitted")
    parser.add_argument("--workflow", default="sd15_portrait", help="name in example_workflows/api (without _api.json) or a path")
    parser.add_argument("--checkpoint", help="base model file name in models/checkpoints (overrides the workflow's)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "out"), help="folder for the PNGs (default: ./out)")
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI folder (default: $COMFYUI_PATH)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    parser.add_argument("--smoke", action="store_true", help="random weights, tiny size, 2 steps: checks the install, draws NOISE")
    parser.add_argument("--attention", choices=("auto", "pytorch", "sub-quadratic", "split"), default="auto",
                        help="ComfyUI's attention backend; auto: pytorch on the CPU (faster there than ComfyUI's "
                             "CPU default, sub-quadratic), ComfyUI's own choice on a GPU")
    parser.add_argument("--unet-dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="weights of the base model's UNet; auto: bf16 for an SDXL smoke run on the CPU (its "
                             "fp32 UNet alone is 10 GB), ComfyUI's own choice otherwise (fp32 on the CPU, fp16 on "
                             "most GPUs); bf16 halves the memory of a CPU run")
    args = parser.parse_args(argv)
    if not args.comfyui:
        parser.error("tell where ComfyUI is: --comfyui PATH or COMFYUI_PATH=PATH")
    if not args.image and not args.smoke:
        parser.error("--image is required (or --smoke to check the install without weights)")
    return args


def has_accelerator() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or bool(mps and mps.is_available())


def choose_unet_dtype(requested: str, smoke: bool, cpu: bool, prompt: dict) -> str | None:
    """ComfyHost's ``unet_dtype`` for ``--unet-dtype``: None leaves ComfyUI's own choice."""
    if requested != "auto":
        return requested
    if smoke and cpu:
        from tools import smoke_models

        return "bf16" if smoke_models.workflow_arch(prompt) == "sdxl" else None
    return None


def load_workflow(name: str) -> dict:
    path = name if os.path.isfile(name) else os.path.join(WORKFLOW_DIR, f"{name}_api.json")
    if not os.path.isfile(path):
        known = sorted(f[: -len("_api.json")] for f in os.listdir(WORKFLOW_DIR) if f.endswith("_api.json"))
        raise SystemExit(f"no workflow {name!r}; known: {', '.join(known)}")
    with open(path) as f:
        return json.load(f)


def is_target_photo(node: dict) -> bool:
    """A LoadImage of the photo a face is put into (face_inpaint), which --image must not replace."""
    return node["class_type"] == "LoadImage" and node.get("_meta", {}).get("title", "").startswith("Target")


def customise(prompt: dict, args, photo_name: str | None, target_name: str | None = None) -> dict:
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if is_target_photo(node):
            if target_name:
                inputs["image"] = target_name
        elif kind == "LoadImage" and photo_name:
            inputs["image"] = photo_name
        if kind in PROMPT_NODES:
            if args.prompt is not None:
                inputs["text"] = args.prompt
            if args.negative is not None:
                inputs["negative_text"] = args.negative
        if kind == "CheckpointLoaderSimple" and args.checkpoint:
            inputs["ckpt_name"] = args.checkpoint
        if kind in ("KSampler", "ConsistentIDKSampler", "ConsistentIDMergeStep") and args.steps:
            inputs["steps"] = args.steps
            if "merge_step" in inputs:
                inputs["merge_step"] = min(inputs["merge_step"], args.steps - 1)
        if kind in ("KSampler", "ConsistentIDKSampler") and args.seed is not None:
            inputs["seed"] = args.seed
        if kind == "EmptyLatentImage":
            inputs["width"] = args.width or inputs["width"]
            inputs["height"] = args.height or inputs["height"]
    return prompt


def missing_model_files(host, prompt: dict) -> list[tuple[str, str]]:
    """(file, folder it belongs in) for every model file the workflow names but ComfyUI cannot find."""
    wanted = {
        "CheckpointLoaderSimple": ("ckpt_name", "checkpoints"),
        "ConsistentIDModelLoader": ("consistentid_file", "consistentid"),
        "CLIPVisionLoader": ("clip_name", "clip_vision"),
    }
    missing = []
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind in wanted:
            key, folder = wanted[kind]
            if host.full_path(folder, inputs[key]) is None:
                missing.append((inputs[key], host.folder(folder)[0]))
        elif kind == "ConsistentIDFaceParserLoader":
            folder, _, name = inputs["parser_file"].partition("/")
            if host.full_path(folder, name) is None:
                missing.append((name, host.folder(folder)[0]))
        elif kind == "ConsistentIDFaceAnalysisLoader":
            roots = host.folder("insightface")
            model = inputs["model_name"]
            for name in INSIGHTFACE_FILES:
                if not any(os.path.isfile(os.path.join(r, "models", model, name)) for r in roots):
                    missing.append((name, os.path.join(roots[0], "models", model)))
    return sorted(set(missing))


def printer(titles: dict):
    state = {"node": None, "last": 0.0}

    def on_event(event: str, data: dict):
        if event == "executing" and data.get("node"):
            state["node"] = data["node"]
            print(f"[{time.strftime('%H:%M:%S')}] {titles.get(data['node'], data['node'])}", flush=True)
        elif event == "progress" and data.get("max"):
            now = time.monotonic()
            if data["value"] == data["max"] or now - state["last"] > 2:
                state["last"] = now
                print(f"    {data['value']}/{data['max']}", flush=True)

    return on_event


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("consistentid").setLevel(logging.INFO)
    prompt = load_workflow(args.workflow)
    if not args.smoke and not args.target and any(is_target_photo(n) for n in prompt.values()):
        print("This workflow puts the face into a photo of yours: give that photo with --target PHOTO")
        return 2
    titles = {k: v.get("_meta", {}).get("title", v["class_type"]) for k, v in prompt.items()}
    os.makedirs(args.out, exist_ok=True)
    input_dir = tempfile.mkdtemp(prefix="consistentid-input-")
    atexit.register(shutil.rmtree, input_dir, ignore_errors=True)
    base = None
    if args.smoke:
        print("SMOKE MODE: random weights, the pictures are NOISE. This only checks that the install works.")
        from tools import smoke_models

        base = tempfile.mkdtemp(prefix="consistentid-smoke-")
        # Its model files are links to (or, across file systems, copies of) the cached stand-ins.
        atexit.register(shutil.rmtree, base, ignore_errors=True)
    from tools.comfy_host import ComfyHost, WorkflowError

    cpu = args.cpu or args.smoke or not has_accelerator()
    attention = args.attention if args.attention != "auto" else ("pytorch" if cpu else None)
    unet_dtype = choose_unet_dtype(args.unet_dtype, args.smoke, cpu, prompt)
    if unet_dtype is not None:
        print(f"UNet weights in {unet_dtype} (--unet-dtype {args.unet_dtype})")
    host = ComfyHost(args.comfyui, cpu=cpu, base_directory=base, output_directory=os.path.abspath(args.out),
                     input_directory=input_dir, on_event=printer(titles), attention=attention, unet_dtype=unet_dtype)
    photo_name = target_name = None
    if args.smoke:
        prompt = smoke_models.prepare(host, prompt, input_dir)
    else:
        photo_name = "reference" + os.path.splitext(args.image)[1].lower()
        shutil.copy(args.image, os.path.join(input_dir, photo_name))
        if args.target:
            target_name = "target" + os.path.splitext(args.target)[1].lower()
            shutil.copy(args.target, os.path.join(input_dir, target_name))
    prompt = customise(prompt, args, photo_name, target_name)
    missing = missing_model_files(host, prompt)
    if missing:
        print("Model files are missing. Put each file into the folder shown, then run again:")
        for name, folder in missing:
            print(f"  {name:<48} -> {folder}")
        print("See the model table in README.md for where to get them.")
        return 2
    try:
        result = host.run(prompt)
    except WorkflowError as exc:
        print(f"The workflow failed:\n{exc}")
        return 1
    for kind, dtype in sorted(host.loaded_unet_dtypes().items()):
        print(f"base model: {kind}, UNet weights {dtype}")
    images = [img for out in result.get("outputs", {}).values() for img in out.get("images", []) if img.get("type") == "output"]
    for img in images:
        print(os.path.join(args.out, img.get("subfolder", ""), img["filename"]))
    if args.smoke:
        print("SMOKE MODE finished: the install works. The pictures above are NOISE from random weights.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
