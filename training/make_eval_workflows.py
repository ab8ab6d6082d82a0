"""ComfyUI API workflows that generate the evaluation set: one per (reference, prompt, seed).

Usage::

    python -m training.make_eval_workflows --references refs/ --out eval_set/ --seeds 2024 2025

Writes into ``--out``:

* ``workflows/<identity>__p<NN>__s<seed>.json``: the template (default
  ``example_workflows/api/sd15_portrait_api.json``) with the reference photo in ``LoadImage``, the prompt
  in ``ConsistentIDApply``'s ``text``, the seed in every ``KSampler`` and a ``SaveImage`` prefix
  ``<prefix>/<identity>/p<NN>_s<seed>``;
* ``input/<prefix>/<identity>.<ext>``: copies of the reference photos; copy the ``input`` folder's
  contents into ComfyUI's ``input`` folder so ``LoadImage`` finds them;
* ``manifest.json``: every workflow with its identity, prompt, group, seed and output prefix; pass
  it to ``training.evaluate --prompts`` with ``--generated`` set to ComfyUI's ``output`` folder.

Queue them on a running ComfyUI by POSTing ``{"prompt": <file contents>}`` to its ``/prompt``
endpoint, one request per file.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import sys

from consistentid_core.errors import EvaluationError

from .evaluation.layout import BUILTIN, MANIFEST_FORMAT, load_references, read_text_prompts
from .evaluation.prompts import fill

logger = logging.getLogger("consistentid.evaluate")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TEMPLATE = os.path.join(REPO_ROOT, "example_workflows", "api", "sd15_portrait_api.json")
DEFAULT_PREFIX = "consistentid_eval"
DEFAULT_SEEDS = (2024,)


def _nodes(workflow: dict, class_type: str) -> list[dict]:
    return [n for n in workflow.values() if isinstance(n, dict) and n.get("class_type") == class_type]


def check_template(workflow: dict, path: str) -> None:
    """The template must have exactly one LoadImage and ConsistentIDApply, and a KSampler and SaveImage."""
    counts = {t: len(_nodes(workflow, t)) for t in ("LoadImage", "ConsistentIDApply", "KSampler", "SaveImage")}
    wrong = [f"{t} x{n}" for t, n in counts.items()
             if (n != 1 if t in ("LoadImage", "ConsistentIDApply") else n == 0)]
    if wrong:
        raise EvaluationError(
            f"workflow template {path} does not fit: it needs one LoadImage, one ConsistentIDApply and at least "
            f"one KSampler and SaveImage in ComfyUI API format; found {', '.join(wrong)}")


def build_workflow(template: dict, image_name: str, prompt: str, seed: int, output_prefix: str) -> dict:
    workflow = copy.deepcopy(template)
    _nodes(workflow, "LoadImage")[0]["inputs"]["image"] = image_name
    _nodes(workflow, "ConsistentIDApply")[0]["inputs"]["text"] = prompt
    for sampler in _nodes(workflow, "KSampler"):
        sampler["inputs"]["seed"] = int(seed)
    for saver in _nodes(workflow, "SaveImage"):
        saver["inputs"]["filename_prefix"] = output_prefix
    return workflow


def make_workflows(references, out_dir, prompts: str = BUILTIN, seeds=DEFAULT_SEEDS, class_word: str = "person",
                   template_path: str = DEFAULT_TEMPLATE, prefix: str = DEFAULT_PREFIX) -> dict:
    """Write workflows, reference copies and the manifest; returns the manifest."""
    if not os.path.isfile(template_path):
        raise EvaluationError(f"workflow template {template_path} does not exist (--template)")
    with open(template_path, encoding="utf-8") as fh:
        template = json.load(fh)
    check_template(template, template_path)
    if not seeds:
        raise EvaluationError("no seeds given (--seeds)")
    refs = load_references(references, class_word)
    templates = read_text_prompts(prompts)
    flow_dir = os.path.join(out_dir, "workflows")
    input_dir = os.path.join(out_dir, "input", prefix)
    os.makedirs(flow_dir, exist_ok=True)
    os.makedirs(input_dir, exist_ok=True)
    items = []
    for identity, ref in refs.items():
        image_name = identity + os.path.splitext(ref.path)[1].lower()
        shutil.copyfile(ref.path, os.path.join(input_dir, image_name))
        for index, (group, text) in enumerate(templates):
            prompt = fill(text, ref.class_word)
            for seed in seeds:
                output_prefix = f"{prefix}/{identity}/p{index:02d}_s{seed}"
                name = f"{identity}__p{index:02d}__s{seed}.json"
                workflow = build_workflow(template, f"{prefix}/{image_name}", prompt, seed, output_prefix)
                with open(os.path.join(flow_dir, name), "w", encoding="utf-8") as fh:
                    json.dump(workflow, fh, indent=1)
                items.append({"workflow": f"workflows/{name}", "identity": identity, "reference": ref.path,
                              "prompt_index": index, "group": group, "prompt": prompt, "seed": int(seed),
                              "output_prefix": output_prefix})
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "template": os.path.abspath(template_path),
                "prompts": prompts, "seeds": [int(s) for s in seeds],
                "class_words": {i: r.class_word for i, r in refs.items()}, "items": items}
    with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
    logger.info("wrote %d workflows for %d identities into %s", len(items), len(refs), flow_dir)
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.make_eval_workflows", description=__doc__.split("\n\n")[0])
    p.add_argument("--references", required=True, help="reference folder (layout as for training.evaluate)")
    p.add_argument("--out", required=True, help="output folder for workflows/, input/ and manifest.json")
    p.add_argument("--prompts", default=BUILTIN, help="prompt .txt with {class}, or 'builtin' (the 45 prompts)")
    p.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS))
    p.add_argument("--class-word", default="person", help="for identities not in references/class_words.json")
    p.add_argument("--template", default=DEFAULT_TEMPLATE, help="ComfyUI API-format workflow to start from")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="subfolder name in ComfyUI's input and output folders")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        manifest = make_workflows(args.references, args.out, args.prompts, args.seeds, args.class_word,
                                  args.template, args.prefix)
    except EvaluationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(manifest['items'])} workflows in {os.path.join(args.out, 'workflows')}; copy "
          f"{os.path.join(args.out, 'input')}/* into ComfyUI/input, queue the workflows, then run\n"
          f"  python -m training.evaluate --references {args.references} --generated ComfyUI/output "
          f"--prompts {os.path.join(args.out, 'manifest.json')} --out results/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
