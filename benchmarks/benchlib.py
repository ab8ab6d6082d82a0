"""What every benchmark script shares: timing, memory measurement, ComfyUI set-up, tables, plots.

Timing rules: a number is the median of at least 5 runs after warm-up, and cases that are
compared are measured side by side in one process, so that a machine that slows down (other
jobs, thermal limits) slows every case alike.  Two ways to alternate them:

* ``time_blocks``: the way a sampler runs a model.  Each case is loaded once per block, runs one
  untimed warm-up forward, then a block of consecutive timed forwards; the blocks of the cases
  alternate.  This is what a user pays per step.
* ``time_cases``: run by run, with an untimed ``setup`` before every run.  Right for cheap calls;
  for models that share weights (ComfyUI clones) the setup re-patches the weights before every
  timed call, which measures the first forward after a model switch, not a step.
"""

from __future__ import annotations

import atexit
import gc
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")

# Appended, never prepended: ComfyUI has a top-level ``nodes`` module and this repository a
# ``nodes`` package, and ComfyUI's must win.
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)

import torch  # noqa: E402

MIB = 2**20


# --- devices ------------------------------------------------------------------------------------

def pick_device(choice: str = "auto") -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    else:
        where = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return f"{where}; torch {torch.__version__}; Python {platform.python_version()}; {platform.system()}"


# --- timing -------------------------------------------------------------------------------------

@dataclass
class Timing:
    """Wall-clock samples, and on the CPU the process's CPU time of the same runs.

    CPU time does not count the time this process waited while other processes had the cores,
    so on a shared machine its ratios are the steadier cross-check of the wall-clock ones.
    """

    samples: list[float]
    cpu_samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def cpu_median(self) -> float | None:
        return statistics.median(self.cpu_samples) if self.cpu_samples else None

    @property
    def spread(self) -> tuple[float, float]:
        return min(self.samples), max(self.samples)

    def as_dict(self) -> dict:
        out = {"median_s": self.median, "min_s": self.spread[0], "max_s": self.spread[1], "samples_s": self.samples}
        if self.cpu_samples:
            out.update(cpu_median_s=self.cpu_median, cpu_samples_s=self.cpu_samples)
        return out


@dataclass
class Case:
    """One thing to time. ``setup`` runs untimed before every timed call (e.g. loading a model)."""

    name: str
    run: Callable[[], object]
    setup: Callable[[], object] | None = None


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    return time_and_cpu(fn, device)[0]


def time_and_cpu(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def time_cases(cases: list[Case], device: torch.device, repeats: int = 5, warmup: int = 1,
               progress: Callable[[str], None] | None = None) -> dict[str, Timing]:
    """Medians of ``repeats`` timed runs per case, the cases interleaved run by run.

    The order of the cases rotates from round to round, so that none of them always runs right
    after a model switch or right after another case's allocations.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    samples: dict[str, list[float]] = {case.name: [] for case in cases}
    cpu: dict[str, list[float]] = {case.name: [] for case in cases}
    for round_index in range(warmup + repeats):
        shift = round_index % len(cases)
        for case in cases[shift:] + cases[:shift]:
            if case.setup is not None:
                case.setup()
            seconds, cpu_seconds = time_and_cpu(case.run, device)
            if round_index >= warmup:
                samples[case.name].append(seconds)
                cpu[case.name].append(cpu_seconds)
            if progress is not None:
                phase = "warm-up" if round_index < warmup else f"run {round_index - warmup + 1}/{repeats}"
                progress(f"{case.name}: {phase} {seconds * 1000:.1f} ms (CPU {cpu_seconds * 1000:.0f} ms)")
    on_cpu = device.type == "cpu"
    return {name: Timing(values, cpu[name] if on_cpu else []) for name, values in samples.items()}


@dataclass
class BlockTiming(Timing):
    """Steady-state samples of one case (``time_blocks``), with what came before them.

    ``first_after_load``: the untimed warm-up forward of each block, i.e. the first forward after
    the case was (re)loaded; ``block_of_sample``: the block each sample belongs to.
    """

    first_after_load: list[float] = field(default_factory=list)
    block_of_sample: list[int] = field(default_factory=list)
    page_faults: list[int] = field(default_factory=list)  # minor faults of each sample, where counted

    def as_dict(self) -> dict:
        out = super().as_dict()
        out.update(first_after_load_s=self.first_after_load, block_of_sample=self.block_of_sample,
                   page_faults=self.page_faults)
        return out


def block_schedule(names: list[str], blocks: int) -> list[tuple[int, str]]:
    """(block round, case name) in the order ``time_blocks`` runs them.

    Every case runs once per round; the order rotates by one case per round, so that no case
    always follows the same other case (whose allocations, or weight restore, it would inherit).
    """
    if blocks < 1:
        raise ValueError("blocks must be at least 1")
    if len(set(names)) != len(names):
        raise ValueError(f"case names must be distinct: {names}")
    order = []
    for round_index in range(blocks):
        shift = round_index % len(names) if names else 0
        order += [(round_index, name) for name in names[shift:] + names[:shift]]
    return order


def time_blocks(cases: list[Case], device: torch.device, blocks: int = 2, steps: int = 3, warmup: int = 1,
                progress: Callable[[str], None] | None = None) -> dict[str, BlockTiming]:
    """Steady-state time per call of every case: ``blocks`` x ``steps`` samples each.

    Per block a case runs its ``setup`` (load the model) untimed, ``warmup`` untimed calls (the
    first is kept as ``first_after_load``), then ``steps`` timed consecutive calls.
    """
    if steps < 1:
        raise ValueError("steps must be at least 1")
    by_name = {case.name: case for case in cases}
    result = {name: BlockTiming([], []) for name in by_name}
    for block, name in block_schedule(list(by_name), blocks):
        case, timing = by_name[name], result[name]
        if case.setup is not None:
            case.setup()
        for index in range(warmup):
            seconds, _ = time_and_cpu(case.run, device)
            if index == 0:
                timing.first_after_load.append(seconds)
        for step in range(steps):
            faults_before = page_faults()
            seconds, cpu_seconds = time_and_cpu(case.run, device)
            if faults_before is not None:
                timing.page_faults.append(page_faults() - faults_before)
            timing.samples.append(seconds)
            if device.type == "cpu":
                timing.cpu_samples.append(cpu_seconds)
            timing.block_of_sample.append(block)
            if progress is not None:
                progress(f"{name}: block {block + 1}/{blocks}, step {step + 1}/{steps}: "
                         f"{seconds * 1000:.0f} ms (CPU {cpu_seconds * 1000:.0f} ms)")
    return result


def ratio(timings: dict[str, Timing], case: str, baseline: str, by_cpu: bool = False) -> float | None:
    """Median of ``case`` over median of ``baseline`` (wall clock, or process CPU time)."""
    if by_cpu:
        num, den = timings[case].cpu_median, timings[baseline].cpu_median
        return None if num is None or den is None else num / den
    return timings[case].median / timings[baseline].median


def verdict(value: float, target: float, accepted: float | None = None) -> str:
    """'holds' at or below the target, 'within noise' up to ``accepted``, else 'MISSED'."""
    if value <= target:
        return "holds"
    if accepted is not None and value <= accepted:
        return "within noise"
    return "MISSED"


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none): how busy the machine was."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


# --- processes ----------------------------------------------------------------------------------

# glibc's malloc serves large blocks with fresh mmap()s and hands them back on free, so a CPU
# forward that allocates big temporaries (oneDNN's weight reorders, attention chunks) can fault in
# the same pages again in every step: measured 464 000 minor faults (1.8 GB) per SD1.5 forward
# at 8x8 latents, about half its time.  Whether that happens depends on the heap's history (which
# model was loaded before), so two cases doing the same arithmetic can differ by 10 % or more.
# "steady": no mmap for malloc, and freed memory stays with the process: no fault after warm-up.
MALLOC_SETTINGS = {
    "default": {},
    "steady": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)},
}


def child_environment(malloc: str = "default") -> dict[str, str]:
    """This process's environment for a child, with the glibc malloc settings named ``malloc``."""
    env = dict(os.environ)
    env.update(MALLOC_SETTINGS[malloc])
    return env


def page_faults() -> int | None:
    """Minor page faults of this process so far (None where the OS does not count them)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):
        return None


# --- memory -------------------------------------------------------------------------------------

def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class PeakRSS:
    """The highest resident set size inside a ``with`` block, in bytes (``.peak``, ``.start``).

    On Linux the kernel's own high-water mark is reset and read (exact); elsewhere a thread
    samples the RSS every millisecond, which can miss a spike shorter than that.
    """

    _CLEAR_REFS = "/proc/self/clear_refs"

    def __init__(self):
        self.start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._kernel = False

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        self.start = rss_bytes()
        self._kernel = self._reset_kernel_peak()
        if not self._kernel:
            self.peak = self.start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._kernel:
            self.peak = max(self._kernel_peak(), rss_bytes())
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())

    @property
    def increase(self) -> int:
        return self.peak - self.start

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_bytes())

    def _reset_kernel_peak(self) -> bool:
        try:
            with open(self._CLEAR_REFS, "w") as handle:
                handle.write("5")  # "5": reset the peak RSS (VmHWM) to the current RSS
            return self._kernel_peak() > 0
        except OSError:
            return False

    @staticmethod
    def _kernel_peak() -> int:
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0


class PeakVRAM:
    """Peak CUDA memory allocated by torch inside a ``with`` block (0 on the CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = 0
        self.peak = 0

    def __enter__(self) -> "PeakVRAM":
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)

    @property
    def increase(self) -> int:
        return self.peak - self.start


def vram_allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def live_tensor_bytes(device_type: str | None = None) -> int:
    """Bytes of every distinct tensor storage that Python objects still reach.

    Unlike the RSS this does not move with the allocator's caching, so a growth of a few bytes
    is a real leak.  Parameters count too; storages shared by views are counted once.
    """
    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.is_meta:
                continue
            if device_type is not None and obj.device.type != device_type:
                continue
            storage = obj.untyped_storage()
            seen[storage.data_ptr() or id(storage)] = storage.nbytes()
        except (RuntimeError, ReferenceError):  # tensors without storage (e.g. functional wrappers)
            continue
    return sum(seen.values())


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages of the given tensors (nested dicts, lists and modules too)."""
    seen: dict[int, int] = {}

    def visit(value):
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, torch.nn.Module):
            for tensor in list(value.parameters()) + list(value.buffers()):
                visit(tensor)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(tensors)
    return sum(seen.values())


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    _release_freed_heap()


def _release_freed_heap() -> None:
    # glibc keeps freed chunks in the heap; giving them back makes the next phase's RSS its own.
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass


# --- ComfyUI ------------------------------------------------------------------------------------

def comfyui_path() -> str:
    path = os.environ.get("COMFYUI_PATH", "").strip()
    if not path:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout (v0.3.64 is tested), e.g. "
                         "COMFYUI_PATH=/path/to/ComfyUI python benchmarks/unet_step.py")
    return os.path.abspath(os.path.expanduser(path))


# ComfyUI's attention backends by their command-line names (as tools/comfy_host.py and the
# runner spell them), and the kernel function that each makes ``optimized_attention``.
ATTENTION_KERNELS = {"sub-quadratic": "attention_sub_quad", "pytorch": "attention_pytorch", "split": "attention_split"}


def start_comfyui(device: torch.device, base_directory: str | None = None, attention: str | None = None,
                  **host_options):
    """ComfyUI with this pack loaded in process, its folders under a temporary directory.

    Everything a benchmark needs is built there with random weights, so the user's own
    ComfyUI folders are neither read nor written.  ``attention``: one of ATTENTION_KERNELS, as
    the matching command-line switch would choose it (None: ComfyUI's own choice).
    ``host_options`` go to ComfyHost (e.g. ``on_event``).
    """
    from tools.comfy_host import ComfyHost

    base = base_directory
    if base is None:
        base = tempfile.mkdtemp(prefix="cid-bench-comfyui-")
        atexit.register(shutil.rmtree, base, True)
    import inspect

    options = dict(host_options)
    if attention is not None and "attention" in inspect.signature(ComfyHost).parameters:
        options["attention"] = attention  # the command-line switch, set before ComfyUI picks its kernel
    host = ComfyHost(comfyui_path(), cpu=device.type == "cpu", base_directory=base, **options)
    if attention is not None:
        select_attention(attention)
    return host


def select_attention(name: str) -> str:
    """Makes ComfyUI's ``optimized_attention`` the kernel of backend ``name``; returns the kernel's name.

    The UNet's CrossAttention and the pack's plain-attention path look the module global up at
    every call, so re-pointing it (and its masked twin) switches the UNet step.  Normally the
    command-line switch has chosen it already and nothing changes; this is the fallback for a
    host that cannot pass the switch.
    """
    import comfy.ldm.modules.attention as comfy_attention

    kernel = getattr(comfy_attention, ATTENTION_KERNELS[name])
    if comfy_attention.optimized_attention is not kernel:
        logging.getLogger("consistentid.bench").warning(
            "ComfyUI chose %s; switching its attention to %s", comfy_attention.optimized_attention.__name__,
            kernel.__name__)
        comfy_attention.optimized_attention = kernel
        comfy_attention.optimized_attention_masked = kernel
    return kernel.__name__


def start(device_choice: str, attention: str | None = None):
    """(device, ComfyUI host, machine description): what every ComfyUI benchmark starts with."""
    logging.basicConfig(level=logging.WARNING)
    device = pick_device(device_choice)
    host = start_comfyui(device, attention=attention)
    return device, host, machine_description(device)


# --- random ConsistentID inputs -----------------------------------------------------------------

def adapter_checkpoint(host, arch: str, seed: int = 3, dtype: torch.dtype = torch.float32):
    """A ConsistentID checkpoint with random weights of the real layout, without the FacialEncoder.

    The adapter (rank-128 LoRA on every attention layer, to_k_ip/to_v_ip on the cross-attention
    layers) and the ID projection are what the UNet patch uses; the FacialEncoder only feeds the
    text conditioning.  LoRA ups are small but non-zero, as after training.
    """
    attention = host.pack_submodule("training.attention_processors")
    models = host.pack_submodule("consistentid_core.model.networks")
    checkpoint = host.pack_submodule("consistentid_core.model.checkpoint")
    torch.manual_seed(seed)
    modules = torch.nn.ModuleList(attention.build_processors(arch).values())
    adapter: dict[int, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for key, tensor in modules.state_dict().items():
            index, name = key.split(".", 1)
            if name.endswith("up.weight"):
                tensor = tensor.normal_(0, 1e-3)
            adapter.setdefault(int(index), {})[name] = tensor.to(dtype).contiguous()
    del modules
    proj = models.build_image_proj(arch).to(dtype).eval().requires_grad_(False)
    return checkpoint.ConsistentIDCheckpoint(arch, None, proj, adapter, path=f"random-consistentid-{arch}.bin")


def random_face_embeds(host, arch: str, n: int = 1, seed: int = 5):
    embeds = host.pack_submodule("consistentid_core.embeds")
    gen = torch.Generator().manual_seed(seed)
    names = ["Face", "Left_Eye", "Left_Ear", "Nose", "Upper_Lip"]
    return embeds.FaceEmbeds(
        arch=arch,
        id_embeds=torch.nn.functional.normalize(torch.randn(n, 512, generator=gen), dim=-1),
        clip_embeds=torch.randn(n, 257, 1280, generator=gen),
        region_embeds=torch.randn(n, 5, 257, 1280, generator=gen),
        region_valid=torch.ones(n, 5, dtype=torch.bool),
        region_names=[list(names)] * n,
        uncond_clip_embeds=torch.randn(1, 257, 1280, generator=gen),
        sources=[f"random {i}" for i in range(n)],
        checkpoint="",  # made by no file: the apply node then has no file name to compare
    )


def id_tokens(ckpt, embeds) -> torch.Tensor:
    """The 4 ID tokens of the identity and of the zero image, [2, 4, width]: what the official
    pipeline appends to the text tokens of the cond and the uncond row."""
    proj = ckpt.image_proj
    dtype = proj.norm.weight.dtype
    shortcut = ckpt.arch == "sdxl"
    with torch.no_grad():
        cond = proj(embeds.id_embeds[:1].to(dtype), embeds.clip_embeds[:1].to(dtype), shortcut=shortcut)
        uncond = proj(torch.zeros(1, 512, dtype=dtype), embeds.uncond_clip_embeds.to(dtype), shortcut=shortcut)
    return torch.cat([cond, uncond]).float()


# --- output -------------------------------------------------------------------------------------

@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[object]] = field(default_factory=list)

    def add(self, *cells) -> None:
        self.rows.append(list(cells))

    def markdown(self) -> str:
        cells = [[_cell(c) for c in row] for row in self.rows]
        lines = ["| " + " | ".join(self.headers) + " |", "|" + "|".join("---" for _ in self.headers) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines)

    def print(self) -> None:
        print(f"\n{self.title}\n")
        print(self.markdown())
        print(flush=True)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def mib(num_bytes: float) -> str:
    return f"{num_bytes / MIB:.1f}"


def results_path(name: str) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    return os.path.join(RESULTS_DIR, name)


def previous_results(stem: str) -> list[dict]:
    """The ``results`` list of ``results/<stem>.json`` (what ``--append`` keeps), [] when there is none."""
    path = results_path(f"{stem}.json")
    if not os.path.isfile(path):
        return []
    with open(path) as handle:
        return json.load(handle).get("results", [])


def write_json(name: str, data: dict) -> str:
    path = results_path(name)
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2, default=str)
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display is needed, or wanted, on a benchmark machine
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str, title: str, fontsize: int = 8) -> None:
    """Titles the figure (the machine it ran on), lays it out, writes the PNG and frees it."""
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def log_progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)
