"""The benchmarks' scheduling and summary logic (benchmarks/benchlib.py, unet_step.py), without timings.

Nothing here asserts how long anything takes: the timed callables are counters, and the summary
math is checked on made-up samples.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import benchlib  # noqa: E402
import unet_step  # noqa: E402

CPU = torch.device("cpu")


def test_block_schedule_runs_every_case_once_per_round_and_rotates_the_order():
    order = benchlib.block_schedule(["a", "b", "c"], blocks=4)
    assert order == [(0, "a"), (0, "b"), (0, "c"), (1, "b"), (1, "c"), (1, "a"),
                     (2, "c"), (2, "a"), (2, "b"), (3, "a"), (3, "b"), (3, "c")]
    # no case follows the same case in every round
    followers = {name: {order[i + 1][1] for i in range(len(order) - 1) if order[i][1] == name} for name in "abc"}
    assert all(len(after) >= 2 for after in followers.values()), followers


def test_block_schedule_refuses_nonsense():
    with pytest.raises(ValueError, match="at least 1"):
        benchlib.block_schedule(["a"], blocks=0)
    with pytest.raises(ValueError, match="distinct"):
        benchlib.block_schedule(["a", "a"], blocks=1)


def test_time_blocks_loads_once_per_block_then_runs_consecutive_steps():
    log: list[str] = []

    def case(name):
        return benchlib.Case(name, run=lambda: log.append(f"run {name}"), setup=lambda: log.append(f"load {name}"))

    timings = benchlib.time_blocks([case("u"), case("p")], CPU, blocks=2, steps=3, warmup=1)
    block = lambda name: [f"load {name}"] + [f"run {name}"] * 4  # noqa: E731  (1 warm-up + 3 timed)
    assert log == block("u") + block("p") + block("p") + block("u")
    for name in ("u", "p"):
        timing = timings[name]
        assert len(timing.samples) == 6 and len(timing.cpu_samples) == 6
        assert len(timing.first_after_load) == 2  # one warm-up per block, kept apart from the samples
        assert timing.block_of_sample == [0, 0, 0, 1, 1, 1]
        assert len(timing.page_faults) == (6 if benchlib.page_faults() is not None else 0)
        assert set(timing.as_dict()) >= {"median_s", "cpu_median_s", "first_after_load_s", "block_of_sample"}


def test_time_blocks_refuses_zero_steps():
    with pytest.raises(ValueError, match="steps"):
        benchlib.time_blocks([benchlib.Case("a", run=lambda: None)], CPU, blocks=1, steps=0)


def test_ratio_and_verdict():
    timings = {
        "unpatched": benchlib.Timing([10.0, 12.0, 11.0], [20.0, 22.0, 21.0]),
        "full": benchlib.Timing([11.0, 11.5, 30.0], [21.0, 21.5, 50.0]),  # one outlier: the median ignores it
    }
    assert benchlib.ratio(timings, "full", "unpatched") == pytest.approx(11.5 / 11.0, rel=1e-12)
    assert benchlib.ratio(timings, "full", "unpatched", by_cpu=True) == pytest.approx(21.5 / 21.0, rel=1e-12)
    assert benchlib.ratio({"a": benchlib.Timing([1.0]), "b": benchlib.Timing([2.0])}, "a", "b", by_cpu=True) is None
    assert benchlib.verdict(1.02, 1.02, 1.05) == "holds"
    assert benchlib.verdict(1.04, 1.02, 1.05) == "within noise"
    assert benchlib.verdict(1.06, 1.02, 1.05) == "MISSED"
    assert benchlib.verdict(1.04, 1.02) == "MISSED"


def test_load_average_is_three_numbers_where_the_os_has_it():
    load = benchlib.load_average()
    if hasattr(os, "getloadavg"):
        assert isinstance(load, list) and len(load) == 3 and all(x >= 0 for x in load)


def _block_dict(samples, cpu, first):
    return benchlib.BlockTiming(samples, cpu, first_after_load=first, block_of_sample=[0] * len(samples)).as_dict()


def test_unet_step_summary_gives_medians_ratios_and_the_verdict():
    result = {
        "arch": "sd15", "backend": "pytorch",
        "steady": {
            "unpatched": _block_dict([7.0, 7.2, 7.1, 7.4, 6.9], [14.0, 14.1, 14.2, 14.3, 14.4], [9.0, 8.0]),
            "full": _block_dict([7.3, 7.1, 7.2, 7.25, 9.0], [14.2, 14.3, 14.4, 14.5, 14.6], [10.0, 12.0, 11.0]),
            "lora_only": _block_dict([7.0, 7.1, 7.2, 7.1, 7.0], [], []),
        },
        "alternating": {"unpatched": benchlib.Timing([10.0, 10.0, 10.0]).as_dict(),
                        "full": benchlib.Timing([11.0, 10.5, 10.8]).as_dict()},
    }
    summary = unet_step.summarize(result)
    assert summary["median_s"] == {"unpatched": 7.1, "full": 7.25, "lora_only": 7.1}
    assert summary["ratio"]["full"] == pytest.approx(7.25 / 7.1, rel=1e-12)
    assert summary["ratio"]["lora_only"] == pytest.approx(1.0, rel=1e-12)
    assert summary["cpu_ratio"]["full"] == pytest.approx(14.4 / 14.2, rel=1e-12)
    assert summary["cpu_ratio"]["lora_only"] is None  # no CPU samples: no CPU ratio, not a wrong one
    assert summary["verdict"] == "within noise"  # 1.021: above 1.02, below 1.05
    assert summary["alternating_ratio"] == pytest.approx(10.8 / 10.0, rel=1e-12)
    assert summary["first_after_load_s"] == {"unpatched": 9.0, "full": 11.0}
    assert unet_step.summarize({"arch": "sdxl", "backend": "pytorch", "skipped": "no memory"}) == {}


def test_unet_step_child_gets_the_parents_settings():
    args = unet_step.parse_args(["--blocks", "3", "--steps", "2", "--sdxl-latent", "96", "--cases", "unpatched", "full"])
    argv = unet_step.child_argv(args, "sdxl", "pytorch", "/tmp/out.json")
    child = unet_step.parse_args(argv[2:])
    assert (child.blocks, child.steps, child.sdxl_latent, child.cases) == (3, 2, 96, ["unpatched", "full"])
    assert unet_step.latent_side(child, "sdxl") == 96 and unet_step.latent_side(child, "sd15") == 64
    assert '"backend": "pytorch"' in child.child


def test_unet_step_refuses_zero_blocks():
    with pytest.raises(SystemExit):
        unet_step.parse_args(["--blocks", "0"])


def test_step_inputs_put_the_cond_row_first_and_match_the_latent():
    id_tokens = torch.arange(2 * 4 * 768, dtype=torch.float32).reshape(2, 4, 768)
    inputs = unet_step.StepInputs("sd15", CPU, torch.float32, id_tokens, side=16)
    assert inputs.x.shape == (2, 4, 16, 16)
    assert inputs.text_and_id.shape == (2, 81, 768)
    assert torch.equal(inputs.text_and_id[:, 77:], id_tokens)
    assert inputs.time_ids[0].tolist() == [128.0, 128.0, 0.0, 0.0, 128.0, 128.0]


def test_node_clock_charges_each_node_until_the_next_event():
    import end_to_end

    ticks = iter([10.0, 10.5, 13.0, 13.25, 20.0])
    clock = end_to_end.NodeClock(clock=lambda: next(ticks))
    clock("executing", {"node": "7"})      # 10.0
    clock("progress", {"value": 1})        # ignored, reads no time
    clock("executing", {"node": "10"})     # 10.5: node 7 took 0.5 s
    clock("executing", {"node": "7"})      # 13.0: node 10 took 2.5 s
    clock("executing", {"node": "11"})     # 13.25: node 7 again, 0.25 s more
    clock("executing", {"node": None})     # 20.0: the prompt ended, node 11 took 6.75 s
    assert clock.seconds == pytest.approx({"7": 0.75, "10": 2.5, "11": 6.75}, rel=1e-12)
    clock.reset()
    assert clock.seconds == {} and clock.current is None


def test_steady_malloc_keeps_freed_memory_and_default_changes_nothing():
    default = benchlib.child_environment("default")
    steady = benchlib.child_environment("steady")
    assert {k: v for k, v in default.items() if k.startswith("MALLOC_")} == \
        {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    assert steady["MALLOC_MMAP_MAX_"] == "0" and int(steady["MALLOC_TRIM_THRESHOLD_"]) >= 2**32
    with pytest.raises(KeyError):
        benchlib.child_environment("fast")


def test_gpu_check_without_a_gpu_names_the_missing_cuda_and_the_dry_run(tmp_path):
    import subprocess

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_check.sh")
    # COMFYUI_PATH only has to exist for the script to get as far as the CUDA check
    env = dict(os.environ, PYTHON=sys.executable, COMFYUI_PATH=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "no CUDA GPU here" in done.stderr and "--dry-run" in done.stderr
    assert done.stdout == ""  # nothing measured, no table


def test_gpu_check_refuses_full_size_steps_on_the_cpu():
    import gpu_check

    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--device", "cpu"])
    args = gpu_check.parse_args(["--device", "cpu", "--tiny"])
    assert (args.blocks, args.steps, args.encode_repeats) == (1, 2, 1)
    gpu_check.require_cuda("cpu")  # the dry run never asks for CUDA
    if not torch.cuda.is_available():
        with pytest.raises(gpu_check.NoCudaError, match="--dry-run"):
            gpu_check.require_cuda("cuda")


@pytest.mark.comfyui
@pytest.mark.slow
def test_gpu_check_dry_run_prints_its_table_on_the_cpu(tmp_path):
    import json
    import subprocess

    from comfy_harness import comfyui_path_or_skip

    comfyui = comfyui_path_or_skip()
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_check.sh")
    env = dict(os.environ, PYTHON=sys.executable, COMFYUI_PATH=comfyui)
    done = subprocess.run(["bash", script, "--dry-run", "--arch", "sd15", "--skip-encode"], env=env,
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DRY RUN" in done.stderr and "DRY RUN" in done.stdout  # never mistaken for GPU numbers
    row = next(line for line in done.stdout.splitlines() if line.startswith("| SD15 step"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "SD15 step, 64 px, batch 2, float32"
    assert float(cells[3]) > 0  # the ratio of two measured medians
    path = done.stdout.strip().splitlines()[-1].removeprefix("raw numbers: ")
    with open(path) as handle:
        data = json.load(handle)
    assert data["tiny"] is True and [s["arch"] for s in data["steps"]] == ["sd15"]
    assert set(data["steps"][0]["steady"]) == {"unpatched", "full"}
