"""Cost of turning reference photos into ConsistentID embeds, and what the caches save.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/preprocessing.py [--repeats 5] [--photos 1 2 4]

Models (random weights of the real layouts, built once into the test-model cache): CLIP ViT-H/14
loaded by ComfyUI's CLIPVisionLoader and run through ComfyUI exactly as the encode node runs it;
facexlib's BiSeNet; insightface's FaceAnalysis on the buffalo_l stand-ins (tools/insightface_standins.py).
The stand-ins are tiny ONNX graphs that find saturated squares, so the "face analysis" time
here is insightface's own overhead plus a trivial model, NOT the cost of the real SCRFD-10G
detector and ResNet-50 ArcFace; parsing and CLIP are the real networks' cost.

For the stage timings and the scaling the parser's random output is replaced by a fixed face
layout (its forward still runs in full), so that every photo has the 5 regions of a real face:
photo + 5 regions + the zero image = 7 CLIP images per photo.  The ComfyUI graph part uses the
parser exactly as the loader node returns it.

Reported: per stage, one photo; the whole encode for 1, 2, 4 photos; a second encode of the same
photos through the pack's cache; and a graph (loaders, 2 photos, Encode Face, preview) queued
in ComfyUI: cold, re-queued unchanged (ComfyUI's own output cache), re-queued with only
``combine`` changed, so that Encode Face runs again on the same photos and models (our cache),
and the same with our cache emptied first (what every such re-run cost before).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import Case, Table, ms  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.append(os.path.join(benchlib.REPO_ROOT, "tests"))
from face_standins import face_label_map  # noqa: E402

PHOTO_SIZE = 640
FACE = (192, 192, 128)  # centre x, centre y, side: a stand-in "face" the detector finds at stride 32
VIT_H_FILE = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
CID_FILE = "ConsistentID-v1.bin"
PARSER_FILE = "face_parsing.pth"
COMBINES = ("average", "norm_average", "first")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--photos", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--skip-graph", action="store_true", help="leave out the ComfyUI graph runs")
    parser.add_argument("--output", default="preprocessing")
    return parser.parse_args(argv)


def photo(index: int) -> np.ndarray:
    """A 640 px photo the stand-in detector sees a face in (SD1.5's official colour order feeds RGB
    to insightface, which then reads blue as red), on a grey background that differs per index."""
    from tools.insightface_standins import red_square_image

    image = red_square_image(PHOTO_SIZE, ((FACE[0], FACE[1], FACE[2], 255),), color="blue")
    gen = np.random.default_rng(index)
    # Equal in R, G and B: the stand-in detector's "redness" of grey is exactly 0.
    grey = gen.integers(0, 48, size=(PHOTO_SIZE, PHOTO_SIZE, 1), dtype=np.uint8)
    square = image.any(axis=-1, keepdims=True)
    return np.where(square, image, np.repeat(grey, 3, axis=-1))


class FaceLayoutParser(torch.nn.Module):
    """Runs the BiSeNet in full and answers with a fixed face layout (see the module doc)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        x, y, side = FACE
        half = side // 2
        self.net = net
        labels = face_label_map(PHOTO_SIZE, (x - half, y - half, x + half, y + half))
        self.register_buffer("labels", torch.from_numpy(labels.astype(np.int64)), persistent=False)
        self.eval()

    def forward(self, x):
        self.net(x)
        labels = torch.nn.functional.interpolate(self.labels[None, None].float(), size=x.shape[-2:], mode="nearest")
        logits = torch.nn.functional.one_hot(labels[0, 0].long(), 19).permute(2, 0, 1)[None].to(x.dtype)
        return logits, logits, logits


# --- set-up ---------------------------------------------------------------------------------------

def place_models(host) -> None:
    from tools import random_models

    models = host.folder_paths.models_dir
    random_models.consistentid_checkpoint(os.path.join(models, "consistentid", CID_FILE))
    random_models.face_parser(os.path.join(models, "consistentid", PARSER_FILE))
    random_models.clip_vision_vit_h(os.path.join(models, "clip_vision", VIT_H_FILE))
    random_models.insightface_buffalo_l(os.path.join(models, "insightface", "models", "buffalo_l"))
    host.folder_paths.filename_list_cache.clear()


def load_models(host):
    """The models as the loader nodes load them."""
    import comfy.clip_vision
    import comfy.model_management

    models = host.folder_paths.models_dir
    clip_vision = comfy.clip_vision.load(os.path.join(models, "clip_vision", VIT_H_FILE))
    analysis = host.pack_submodule("consistentid_core.face.analysis").get_face_analysis(
        os.path.join(models, "insightface", "models", "buffalo_l"), "CPU")
    parser = host.pack_submodule("consistentid_core.face.parser").get_face_parser(
        os.path.join(models, "consistentid", PARSER_FILE), comfy.model_management.get_torch_device())
    return clip_vision, analysis, parser


# --- stages ---------------------------------------------------------------------------------------

def stage_cases(host, clip_vision, analysis, parser, device) -> list[Case]:
    from PIL import Image

    core = lambda name: host.pack_submodule(f"consistentid_core.{name}")  # noqa: E731
    face_analysis, parsing, clip, pipeline = core("face.analysis"), core("face.parsing"), core("face.clip_features"), core("face.pipeline")
    parser_module, constants = core("face.parser"), core("constants")
    vision_glue = host.pack_submodule("nodes.glue.vision")
    vision = vision_glue.comfy_vision_encoder(clip_vision)
    rgb = photo(0)
    ref = pipeline.analyse_reference(rgb, analysis, parser, "sd15")
    crops = parsing.region_images(Image.fromarray(rgb), ref.regions)[: constants.MAX_REGIONS]
    pixels = torch.cat([torch.stack([clip.clip_pixel_values(Image.fromarray(rgb))]
                                    + [clip.clip_pixel_values(c) for c in crops]), clip.zero_pixel_values(1)])
    return [
        Case("face analysis (insightface, stand-in models)",
             lambda: face_analysis.detect_faces(analysis, rgb, 640, "official", "sd15")),
        Case("parsing (BiSeNet at 512 px)", lambda: parser_module.parse_image(parser, Image.fromarray(rgb), 512)),
        Case("regions: masks, crops, CLIP preprocessing",
             lambda: [clip.clip_pixel_values(c) for c in parsing.region_images(
                 Image.fromarray(rgb), parsing.select_regions(parsing.label_masks(ref.label_map)))]),
        Case(f"CLIP ViT-H: photo + {len(crops)} regions + zero image",
             lambda: clip.encode_pixels(vision, pixels)),
    ]


def scaling_cases(host, clip_vision, analysis, parser, counts) -> tuple[list[Case], dict]:
    pipeline = host.pack_submodule("consistentid_core.face.pipeline")
    encode_cache = host.pack_submodule("consistentid_core.face.encode_cache")
    vision = host.pack_submodule("nodes.glue.vision").comfy_vision_encoder(clip_vision)
    cache = encode_cache.EncodeCache()
    cases = []
    for n in counts:
        photos = [photo(i) for i in range(n)]

        def cold(photos=photos):
            return pipeline.encode_references(photos, analysis, parser, vision, "sd15")

        def cached(photos=photos):
            return pipeline.encode_references(photos, analysis, parser, vision, "sd15", cache=cache,
                                              vision_model=clip_vision)

        cases.append(Case(f"{n} photo(s): encode", cold))
        cases.append(Case(f"{n} photo(s): encode again, pack cache hit", cached))
    return cases, {"cache": cache}


# --- the graph --------------------------------------------------------------------------------------

def graph(combine: str) -> dict:
    return {
        "1": {"class_type": "ConsistentIDModelLoader", "inputs": {"consistentid_file": CID_FILE}},
        "2": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": VIT_H_FILE}},
        "3": {"class_type": "ConsistentIDFaceAnalysisLoader", "inputs": {"model_name": "buffalo_l", "provider": "CPU"}},
        "4": {"class_type": "ConsistentIDFaceParserLoader",
              "inputs": {"parser_file": f"consistentid/{PARSER_FILE}", "device": "auto"}},
        "5": {"class_type": "LoadImage", "inputs": {"image": "bench_photo_0.png"}},
        "6": {"class_type": "LoadImage", "inputs": {"image": "bench_photo_1.png"}},
        "7": {"class_type": "ImageBatch", "inputs": {"image1": ["5", 0], "image2": ["6", 0]}},
        "8": {"class_type": "ConsistentIDEncodeFace",
              "inputs": {"consistentid": ["1", 0], "clip_vision": ["2", 0], "face_analysis": ["3", 0],
                         "face_parser": ["4", 0], "image": ["7", 0], "face_select": "first", "combine": combine,
                         "on_no_face": "zeros", "color_order": "official"}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 1]}},
    }


def executed_nodes(host) -> list[str]:
    """Ids of the nodes that ran in the last prompt (ComfyUI reports the cached ones separately)."""
    cached = set()
    ran = []
    for event, data in host.server.messages:
        if event == "execution_cached":
            cached.update(data.get("nodes", []))
        elif event == "executing" and data.get("node") is not None and data["node"] not in cached:
            ran.append(data["node"])
    return ran


def graph_runs(host, repeats: int) -> dict:
    from PIL import Image

    cache = host.pack_submodule("consistentid_core.face.encode_cache").ENCODE_CACHE
    for i in range(2):
        Image.fromarray(photo(10 + i)).save(os.path.join(host.folder_paths.get_input_directory(), f"bench_photo_{i}.png"))
    cache.clear()
    combine = iter(COMBINES * (4 * repeats + 4))
    rows: dict[str, list[float]] = {}
    nodes: dict[str, list[str]] = {}

    def queue(label, prompt, empty_our_cache=False):
        if empty_our_cache:
            cache.clear()
        hits = cache.hits
        began = time.perf_counter()
        host.run(prompt, cached=True)
        rows.setdefault(label, []).append(time.perf_counter() - began)
        nodes[label] = executed_nodes(host)
        benchlib.log_progress(f"graph, {label}: {rows[label][-1] * 1000:.0f} ms, ran {nodes[label]}, "
                              f"pack cache hits {cache.hits - hits}")

    first = graph(next(combine))
    queue("cold: loads the models, encodes 2 photos", first)
    for _ in range(repeats):
        queue("re-queued unchanged: ComfyUI's cache", first)
    for _ in range(repeats):
        # combine changes nothing Encode Face computes per photo, but it is an input: the node runs.
        queue("combine changed: Encode Face runs, pack cache hit", graph(next(combine)))
        queue("combine changed, pack cache emptied: Encode Face runs in full", graph(next(combine)), True)
    return {label: {"timing": benchlib.Timing(v).as_dict(), "executed": nodes[label]} for label, v in rows.items()}


# --- report ---------------------------------------------------------------------------------------

def report(stages, scaling, counts, runs, machine) -> list[Table]:
    tables = []
    stage_table = Table(f"Encoding one 640 px photo, by stage (median); {machine}", ["stage", "ms", "share"])
    total = sum(t.median for t in stages.values())
    for name, timing in stages.items():
        stage_table.add(name, ms(timing.median), f"{100 * timing.median / total:.0f} %")
    tables.append(stage_table)

    scale = Table("Whole encode (analysis + parsing + regions + one CLIP pass) by number of photos",
                  ["photos", "CLIP images", "encode (ms)", "per photo (ms)", "again, pack cache hit (ms)", "speed-up"])
    for n in counts:
        cold = scaling[f"{n} photo(s): encode"].median
        hit = scaling[f"{n} photo(s): encode again, pack cache hit"].median
        scale.add(n, 6 * n + 1, ms(cold), ms(cold / n), ms(hit), f"{cold / hit:.0f}x")
    tables.append(scale)

    if runs:
        graph_table = Table("A graph in ComfyUI (loaders, 2 photos, Encode Face, preview), queued again and again",
                            ["run", "ms (median)", "nodes that ran"])
        for label, entry in runs.items():
            graph_table.add(label, ms(entry["timing"]["median_s"]), ", ".join(entry["executed"]) or "none")
        tables.append(graph_table)
    return tables


def plot(stages, scaling, counts, runs, machine, path) -> None:
    plt = benchlib.pyplot()
    panels = 3 if runs else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.4 * panels, 4.4))
    names = list(stages)
    bars = axes[0].barh([n.split(":")[0].split(" (")[0] for n in names], [stages[n].median * 1000 for n in names],
                        color="#2f7ed8")
    axes[0].bar_label(bars, labels=[f"{stages[n].median * 1000:.0f}" for n in names], padding=2, fontsize=8)
    axes[0].set_xlabel("ms, one photo (median)")
    axes[0].set_title("Stages", fontsize=10)
    axes[0].tick_params(axis="y", labelsize=8)

    cold = [scaling[f"{n} photo(s): encode"].median for n in counts]
    hit = [scaling[f"{n} photo(s): encode again, pack cache hit"].median for n in counts]
    axes[1].plot(counts, cold, "-o", color="#d9534f", label="encode")
    axes[1].plot(counts, hit, "-o", color="#2f7ed8", label="same photos again (pack cache)")
    axes[1].set_xticks(counts)
    axes[1].set_xlabel("reference photos")
    axes[1].set_ylabel("seconds (median)")
    axes[1].set_yscale("log")
    axes[1].set_title("Scaling with the number of photos", fontsize=10)
    axes[1].legend(fontsize=8)

    if runs:
        labels = list(runs)
        values = [runs[k]["timing"]["median_s"] for k in labels]
        short = ["cold", "re-queued\n(ComfyUI cache)", "combine changed\n(pack cache)", "combine changed\n(no pack cache)"]
        bars = axes[2].bar(short[: len(labels)], values, color=["#9aa5b1", "#5cb85c", "#2f7ed8", "#d9534f"])
        axes[2].bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=2, fontsize=8)
        axes[2].set_yscale("log")
        axes[2].set_ylabel("seconds per queued graph (median)")
        axes[2].set_title("Graph re-runs in ComfyUI", fontsize=10)
        axes[2].tick_params(axis="x", labelsize=7)
    benchlib.save_figure(fig, path, machine, fontsize=8)


def main(argv=None) -> int:
    args = parse_args(argv)
    device, host, machine = benchlib.start(args.device)
    benchlib.log_progress("placing the random-weight models (built once, then cached)")
    place_models(host)
    clip_vision, analysis, raw_parser = load_models(host)
    parser = FaceLayoutParser(raw_parser)

    stages = benchlib.time_cases(stage_cases(host, clip_vision, analysis, parser, device), device,
                                 args.repeats, args.warmup, benchlib.log_progress)
    cases, _ = scaling_cases(host, clip_vision, analysis, parser, args.photos)
    # At least one warm-up round: it is what fills the cache that the "again" cases hit.
    scaling = benchlib.time_cases(cases, device, args.repeats, max(1, args.warmup), benchlib.log_progress)
    del clip_vision, analysis, raw_parser, parser
    benchlib.free_memory()
    runs = {} if args.skip_graph else graph_runs(host, args.repeats)

    for table in report(stages, scaling, args.photos, runs, machine):
        table.print()
    png = benchlib.results_path(f"{args.output}.png")
    plot(stages, scaling, args.photos, runs, machine, png)
    benchlib.write_json(f"{args.output}.json", {
        "machine": machine,
        "stages": {k: v.as_dict() for k, v in stages.items()},
        "scaling": {k: v.as_dict() for k, v in scaling.items()},
        "graph": runs,
    })
    print(f"plot: {os.path.relpath(png, benchlib.REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
