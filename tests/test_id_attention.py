"""ID-token attention patch math, row selection, mask placement and the merge-step fraction."""

import math

import pytest
import torch

from consistentid_core.prompt.conditioning import merge_fraction
from consistentid_core.errors import PromptError
from consistentid_core.model.id_attention import (
    IDPatchSettings,
    IDProjections,
    id_attention_delta,
    resample_mask,
    rows_for_batch,
    sdpa_attention,
    token_grid,
)
from numeric import SAME_MATH_FP32, assert_close


def test_rows_follow_cond_or_uncond_chunks():
    assert rows_for_batch([1, 0], 4, 1) == [(1, 0), (1, 0), (0, 0), (0, 0)]
    assert rows_for_batch([0, 1], 4, 2) == [(0, 0), (0, 1), (1, 0), (1, 0)]
    assert rows_for_batch([0], 3, 3) == [(0, 0), (0, 1), (0, 2)]
    with pytest.raises(PromptError, match="latent batch has 3 images but the ConsistentID embeds hold 2"):
        rows_for_batch([0, 1], 6, 2)


def test_token_grid_follows_the_unet_downsampling():
    assert token_grid((2, 4, 64, 64), 4096) == (64, 64)
    assert token_grid((2, 4, 64, 64), 256) == (16, 16)
    assert token_grid((1, 4, 9, 7), 6) == (3, 2)  # 9x7 -> 5x4 -> 3x2
    with pytest.raises(PromptError):
        token_grid((1, 4, 8, 8), 7)


def test_mask_is_resampled_to_the_layer_grid():
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0
    small = resample_mask(mask, (1, 4, 64, 64), 16 * 16)
    assert small.shape == (1, 256, 1)
    grid = small.view(16, 16)
    assert torch.allclose(grid[:, :8], torch.ones(16, 8)) and torch.allclose(grid[:, 8:], torch.zeros(16, 8))


def _projections(hidden=64, context=32, identities=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    wk = {"a": torch.randn(hidden, context, generator=gen)}
    wv = {"a": torch.randn(hidden, context, generator=gen)}
    cond = torch.randn(identities, 4, context, generator=gen)
    uncond = torch.randn(1, 4, context, generator=gen)
    return IDProjections.build(wk, wv, cond, uncond), wk["a"], wv["a"], cond, uncond


def test_delta_is_weight_times_attention_over_the_row_tokens():
    proj, wk, wv, cond, uncond = _projections()
    q = torch.randn(4, 16, 64)
    opts = {"n_heads": 4, "cond_or_uncond": [1, 0], "sigmas": torch.tensor([5.0, 5.0, 5.0, 5.0])}
    delta = id_attention_delta(q, opts, "a", proj, IDPatchSettings(weight=0.7), sdpa_attention)
    tokens = torch.cat([uncond.expand(2, -1, -1), cond.expand(2, -1, -1)])
    expected = 0.7 * sdpa_attention(q, tokens @ wk.T, tokens @ wv.T, 4)
    assert_close(delta, expected, SAME_MATH_FP32)


def test_sigma_window_and_zero_weight_switch_the_patch_off():
    proj = _projections()[0]
    q = torch.randn(2, 16, 64)
    settings = IDPatchSettings(weight=1.0, sigma_start=10.0, sigma_end=1.0)
    inside = {"n_heads": 4, "cond_or_uncond": [0, 1], "sigmas": torch.tensor([3.0])}
    outside = dict(inside, sigmas=torch.tensor([0.5]))
    assert id_attention_delta(q, inside, "a", proj, settings, sdpa_attention) is not None
    assert id_attention_delta(q, outside, "a", proj, settings, sdpa_attention) is None
    assert id_attention_delta(q, inside, "a", proj, IDPatchSettings(weight=0.0), sdpa_attention) is None


def test_per_image_identities_and_masks():
    proj, wk, wv, cond, uncond = _projections(identities=2)
    q = torch.randn(4, 16, 64)
    mask = torch.ones(2, 4, 4)
    mask[1] = 0.0  # the second latent image gets no identity
    opts = {"n_heads": 4, "cond_or_uncond": [0, 1], "original_shape": (2, 4, 4, 4)}
    delta = id_attention_delta(q, opts, "a", proj, IDPatchSettings(mask=mask), sdpa_attention)
    first = sdpa_attention(q[:1], cond[0:1] @ wk.T, cond[0:1] @ wv.T, 4)
    assert_close(delta[0:1], first, SAME_MATH_FP32)
    assert torch.count_nonzero(delta[1]) == 0 and torch.count_nonzero(delta[3]) == 0
    assert torch.count_nonzero(delta[2]) > 0


def test_each_batch_layout_is_built_once_and_reused_by_later_steps():
    proj, wk, wv, cond, uncond = _projections(identities=2)
    k1, v1 = proj.for_rows("a", [(0, 0), (0, 1), (1, 0), (1, 0)], "cpu", torch.float32)
    k2, v2 = proj.for_rows("a", [(0, 0), (0, 1), (1, 0), (1, 0)], "cpu", torch.float32)
    assert k1 is k2 and v1 is v2  # no new tensors in a later step
    assert_close(k1[1], cond[1] @ wk.T, SAME_MATH_FP32)
    assert_close(v1[3], uncond[0] @ wv.T, SAME_MATH_FP32)
    k3, _ = proj.for_rows("a", [(1, 0), (0, 0)], "cpu", torch.float32)
    assert k3 is not k1
    assert_close(k3[0], uncond[0] @ wk.T, SAME_MATH_FP32)
    half, _ = proj.for_rows("a", [(1, 0), (0, 0)], "cpu", torch.float16)
    assert half.dtype == torch.float16
    for n in range(2 * IDProjections.MAX_LAYOUTS):  # many odd layouts stay bounded per layer
        proj.for_rows("a", [(0, 0)] * (n + 1), "cpu", torch.float32)
    assert len([k for k in proj._batches if k[2] == torch.float32]) <= IDProjections.MAX_LAYOUTS


def test_warm_moves_only_the_keys_asked_for():
    gen = torch.Generator().manual_seed(0)
    weights = {key: torch.randn(8, 4, generator=gen) for key in ("a", "b", "c")}
    proj = IDProjections.build(weights, weights, torch.randn(1, 4, 4, generator=gen), torch.randn(1, 4, 4, generator=gen))
    proj.warm("cpu", torch.float16, keys=("b",))
    assert [key for key, _device, dtype in proj._moved if dtype == torch.float16] == ["b"]


class _Unreadable:
    """A sigmas stand-in that fails when read: proves a patch never looked at it."""

    def detach(self):
        raise AssertionError("the sigma was read")

    def __getitem__(self, index):
        raise AssertionError("the sigma was read")


def test_the_whole_schedule_never_reads_the_sigma():
    proj = _projections()[0]
    q = torch.randn(2, 16, 64)
    opts = {"n_heads": 4, "cond_or_uncond": [0, 1], "sigmas": _Unreadable()}
    assert IDPatchSettings().whole_schedule
    assert id_attention_delta(q, opts, "a", proj, IDPatchSettings(weight=0.5), sdpa_attention) is not None
    with pytest.raises(AssertionError, match="the sigma was read"):
        id_attention_delta(q, opts, "a", proj, IDPatchSettings(sigma_start=10.0), sdpa_attention)


def test_the_sigma_of_a_step_is_read_once_and_follows_changes():
    from consistentid_core.model.id_attention import current_sigma

    sigmas = torch.tensor([3.0, 3.0])
    assert current_sigma({"sigmas": sigmas}) == 3.0
    sigmas.fill_(2.0)  # an in-place change bumps the version counter
    assert current_sigma({"sigmas": sigmas}) == 2.0
    assert current_sigma({"sigmas": torch.tensor([1.5])}) == 1.5
    with torch.inference_mode():
        frozen = torch.tensor([0.25])
        assert current_sigma({"sigmas": frozen}) == current_sigma({"sigmas": frozen}) == 0.25
    assert current_sigma({"sigmas": [4.0]}) == 4.0 and current_sigma({}) is None


def test_a_mask_is_resampled_once_per_layer_shape():
    proj = _projections(identities=2)[0]
    mask = torch.rand(2, 8, 8)
    settings = IDPatchSettings(mask=mask)
    opts = {"n_heads": 4, "cond_or_uncond": [0, 1], "original_shape": (2, 4, 8, 8)}
    q = torch.randn(4, 16, 64)
    first = id_attention_delta(q, opts, "a", proj, settings, sdpa_attention)
    rows = settings.mask_rows((2, 4, 8, 8), 16, 4, 2, q.device, q.dtype)
    assert rows is settings.mask_rows((2, 4, 8, 8), 16, 4, 2, q.device, q.dtype)
    assert torch.equal(id_attention_delta(q, opts, "a", proj, settings, sdpa_attention), first)
    small = resample_mask(mask, (2, 4, 8, 8), 16)
    assert torch.allclose(rows, small[[0, 1, 0, 1]])


def test_merge_fraction_puts_the_boundary_between_the_merge_step_and_the_next():
    sigmas = [14.6, 9.0, 5.0, 2.0, 1.0, 0.5, 0.0]
    # a stand-in for model_sampling: percent grows as sigma falls, monotone on log sigma
    percent_of = lambda s: 1 - math.log(s + 1) / math.log(16)  # noqa: E731
    sigma_of = lambda p: math.exp((1 - p) * math.log(16)) - 1  # noqa: E731
    for merge_step in range(5):
        p = merge_fraction(sigmas, merge_step, percent_of)
        boundary = sigma_of(p)
        assert sigmas[merge_step + 1] < boundary < sigmas[merge_step]
        text_steps = [i for i in range(6) if sigmas[i] >= boundary]
        assert text_steps == list(range(merge_step + 1))
    assert merge_fraction(sigmas, 5, percent_of) == 1.0
    with pytest.raises(PromptError, match="merge_step must be between 0 and 5 for 6 steps, got 6"):
        merge_fraction(sigmas, 6, percent_of)
    with pytest.raises(PromptError):
        merge_fraction(sigmas, -1, percent_of)
