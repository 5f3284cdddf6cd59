"""The Fréchet distance between Gaussians fitted to two sets of features (as FID does).

Computed in float64 numpy: the statistics of a few thousand feature vectors are cheap, and the
matrix square root needs the precision.
"""

from __future__ import annotations

import numpy as np


def gaussian_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) of features (N, D): the sample mean and the unbiased covariance (ddof = 1)."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features: expected shape (N >= 2, D), got {f.shape}")
    if not np.all(np.isfinite(f)):
        raise ValueError("features: contain NaN or inf (are the images finite?)")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Σ^{1/2} of a symmetric positive semi-definite matrix; rounding's tiny negative
    eigenvalues are set to 0."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """d² = ‖μ₁ - μ₂‖² + Tr(Σ₁ + Σ₂ - 2 (Σ₁ Σ₂)^{1/2}), the squared 2-Wasserstein distance
    between N(μ₁, Σ₁) and N(μ₂, Σ₂).

    Tr (Σ₁Σ₂)^{1/2} = Σᵢ √λᵢ with λᵢ the eigenvalues of Σ₁Σ₂, which equal those of the symmetric
    positive semi-definite M = Σ₁^{1/2} Σ₂ Σ₁^{1/2} (similar matrices). Taking them from M with
    ``eigh`` gives a real result with no imaginary residue to discard, also for singular Σ
    (fewer samples than dimensions); eigenvalues that rounding makes slightly negative count
    as 0, and a total that rounding makes slightly negative is returned as 0.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    for name, value, shape in (
        ("mu1", mu1, (d,)),
        ("mu2", mu2, (d,)),
        ("sigma1", sigma1, (d, d)),
        ("sigma2", sigma2, (d, d)),
    ):
        if value.shape != shape:
            raise ValueError(f"{name}: expected shape {shape} (D = len(mu1)), got {value.shape}")
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{name}: contains NaN or inf")
    root1 = _psd_sqrt(sigma1)
    m = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((m + m.T) / 2)  # symmetrise away rounding
    trace_sqrt = np.sum(np.sqrt(np.clip(eig, 0.0, None)))
    diff = mu1 - mu2
    d2 = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    return float(max(d2, 0.0))


def features_frechet_distance(features1, features2) -> float:
    """The Fréchet distance between Gaussians fitted to two feature sets (N₁, D) and (N₂, D)."""
    mu1, sigma1 = gaussian_statistics(features1)
    mu2, sigma2 = gaussian_statistics(features2)
    return frechet_distance(mu1, sigma1, mu2, sigma2)
