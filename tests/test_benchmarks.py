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
