"""Float comparisons that hold on any CPU, BLAS and thread count.

Two computations of the same value in float32 agree only up to rounding, and rounding depends on
the order of additions (the BLAS kernel, the thread count, fused operations).  An element-wise
``atol`` fails whenever a value lands near zero while its neighbours are large, so these helpers
compare a whole tensor by its relative error, ``|actual - expected| / |expected|`` in the
Frobenius norm, which scales with the magnitude of what is compared.
"""

from __future__ import annotations

import torch

# float32 re-association gives relative errors around 1e-7 per operation; deep stacks of layers
# (a UNet) accumulate more.  These are the tolerances the tests use, named by what they compare.
SAME_MATH_FP32 = 1e-5        # one formula written two ways (a few matmuls)
DEEP_NET_FP32 = 1e-3         # two implementations of a whole UNet or encoder
BF16 = 3e-2                  # bfloat16 against float32: 8 mantissa bits, accumulated over a network


def relative_error(actual, expected) -> float:
    """``|actual - expected| / |expected|`` over the whole tensor (Frobenius norm), in float64."""
    actual = torch.as_tensor(actual).detach().to(torch.float64)
    expected = torch.as_tensor(expected).detach().to(torch.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    if not (torch.isfinite(actual).all() and torch.isfinite(expected).all()):
        raise AssertionError("a compared tensor holds NaN or Inf")
    scale = expected.norm().item()
    diff = (actual - expected).norm().item()
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


def assert_close(actual, expected, rtol: float = SAME_MATH_FP32, what: str = "") -> None:
    """The two tensors agree within ``rtol`` relative error of the whole tensor."""
    error = relative_error(actual, expected)
    assert error <= rtol, f"{what or 'tensors'}: relative error {error:.3g} > {rtol:.3g}"


def assert_differs(actual, expected, at_least: float = 1e-3, what: str = "") -> None:
    """The two tensors differ by more than ``at_least`` relative error: a real change, not rounding."""
    error = relative_error(actual, expected)
    assert error > at_least, f"{what or 'tensors'}: relative difference {error:.3g} <= {at_least:.3g}"
