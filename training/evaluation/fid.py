"""Fréchet distance between two feature sets (the "FID" column).

FID proper uses Inception-v3 pool features (2048-d) with the TF-ported weights of pytorch-fid.
Those weights are not installable offline, so the features come from a local encoder chosen by
the caller (DINO CLS or CLIP image embeddings); the distance formula is the standard one:

    d^2 = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))

with sample means and unbiased covariances.  The values are *not* comparable with published FID
numbers (other features, and evaluation sets far smaller than the 10k-50k images FID is meant for).
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import linalg

logger = logging.getLogger("consistentid.evaluate")

MIN_IMAGES = 10
# Added to both covariance diagonals when the product's square root comes out non-finite.
JITTER = 1e-6


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of Gaussians fitted to the rows of ``a`` [N, D] and ``b`` [M, D]."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be [N, D] with the same D; got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"a covariance needs at least 2 samples per set; got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    root = _sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():
        # Few samples in many dimensions make both covariances singular; nudge them off zero.
        logger.warning("Fréchet distance: singular covariances, adding %.0e to their diagonals", JITTER)
        eye = np.eye(len(cov_a)) * JITTER
        root = _sqrtm((cov_a + eye) @ (cov_b + eye))
    if np.iscomplexobj(root):
        # Round-off gives tiny imaginary parts; a large one means the result cannot be trusted.
        if np.abs(root.imag).max() > 1e-3 * max(1.0, np.abs(root.real).max()):
            logger.warning("Fréchet distance: imaginary part %.3g in the matrix square root",
                           np.abs(root.imag).max())
        root = root.real
    diff = mu_a - mu_b
    value = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(root))
    # The exact value is never negative; round-off can push a distance of 0 slightly below it.
    return max(value, 0.0)


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    result = linalg.sqrtm(matrix)
    # scipy < 1.14 returns (root, error estimate) when asked, and only the root otherwise.
    return result[0] if isinstance(result, tuple) else result


def fid_or_reason(generated: np.ndarray, real: np.ndarray, min_images: int = MIN_IMAGES) -> tuple[float | None, str]:
    """(distance, "") when both sets hold ``min_images`` or more, else (None, why not)."""
    n_gen, n_real = len(generated), len(real)
    if n_gen < max(min_images, 2) or n_real < max(min_images, 2):
        return None, f"FID needs at least {max(min_images, 2)} images per set; got {n_gen} generated, {n_real} real"
    note = ""
    dim = generated.shape[1]
    if min(n_gen, n_real) <= dim:
        note = f"fewer images than feature dimensions ({min(n_gen, n_real)} <= {dim}): covariances are rank-deficient"
    return frechet_distance(generated, real), note
