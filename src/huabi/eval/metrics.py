"""The statistics of FID, KID, Inception Score and CLIP score, on feature arrays. Pure maths, no I/O.

Conventions follow the reference implementations so that the same features give the
same numbers (the tests check this against pytorch-fid, clean-fid and torch-fidelity):

* FID: mean and unbiased covariance (``np.cov``) of float64 features; the matrix square
  root of ``sigma_1 @ sigma_2`` with ``scipy.linalg.sqrtm``, retried with ``eps * I``
  added to both covariances when the product is singular, and the imaginary part dropped
  when it is numerical noise (pytorch-fid / clean-fid);
* KID: the unbiased MMD^2 estimate with the cubic polynomial kernel
  ``(x.y / d + 1) ** 3``, averaged over random subsets drawn with
  ``np.random.RandomState(seed).choice(n, size, replace=False)`` (torch-fidelity's
  defaults: 100 subsets of 1000, seed 2020);
* IS: ``exp(E[KL(p(y|x) || p(y))])`` over 10 splits of the shuffled logits, in float64
  (torch-fidelity's ``logits_unbiased`` convention);
* CLIP score: ``100 * max(cos(text, image), 0)`` averaged over pairs (torchmetrics).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from huabi.errors import HuabiError

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
IS_SPLITS = 10
RNG_SEED = 2020


@dataclass(frozen=True)
class FeatureStatistics:
    """Mean and covariance of a feature set (what FID compares); ``count`` images."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int


def feature_statistics(features: np.ndarray) -> FeatureStatistics:
    features = _as_2d(features, "features")
    if len(features) < 2:
        raise HuabiError(f"FID needs at least 2 images per set, got {len(features)}")
    features = features.astype(np.float64)
    return FeatureStatistics(mu=features.mean(axis=0), sigma=np.cov(features, rowvar=False), count=len(features))


def frechet_distance(stats_1: FeatureStatistics, stats_2: FeatureStatistics, *, eps: float = 1e-6) -> float:
    """Fréchet distance between two Gaussians: |mu1-mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2))."""
    from scipy import linalg

    mu_1, mu_2 = np.atleast_1d(stats_1.mu), np.atleast_1d(stats_2.mu)
    sigma_1, sigma_2 = np.atleast_2d(stats_1.sigma), np.atleast_2d(stats_2.sigma)
    if mu_1.shape != mu_2.shape or sigma_1.shape != sigma_2.shape:
        raise HuabiError(f"FID: the two feature sets have different dimensions ({mu_1.shape[0]} vs {mu_2.shape[0]})")
    diff = mu_1 - mu_2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's "singular matrix" notice: handled just below
        covmean = linalg.sqrtm(sigma_1.dot(sigma_2))
        if not np.isfinite(covmean).all():
            # a singular product (fewer images than dimensions): regularise as the references do
            offset = np.eye(sigma_1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma_1 + offset).dot(sigma_2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise HuabiError(f"FID: the matrix square root has a large imaginary part ({np.max(np.abs(covmean.imag)):.3g})")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma_1) + np.trace(sigma_2) - 2 * np.trace(covmean))


def fid_from_features(features_1: np.ndarray, features_2: np.ndarray) -> float:
    return frechet_distance(feature_statistics(features_1), feature_statistics(features_2))


def polynomial_kernel(x: np.ndarray, y: np.ndarray, *, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    """Unbiased MMD^2 from the three kernel matrices of two equal-sized subsets."""
    m = k_xx.shape[0]
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


@dataclass(frozen=True)
class KIDResult:
    mean: float
    std: float
    subsets: int
    subset_size: int


def kernel_inception_distance(features_1: np.ndarray, features_2: np.ndarray, *, subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, seed: int = RNG_SEED) -> KIDResult:
    """KID: the mean (and std) of the unbiased polynomial-kernel MMD^2 over random subsets.

    ``subset_size`` larger than a set is reduced to the smaller set's size (clean-fid does
    the same; torch-fidelity refuses), and the result says which size was used.
    """
    features_1, features_2 = _as_2d(features_1, "features_1"), _as_2d(features_2, "features_2")
    if features_1.shape[1] != features_2.shape[1]:
        raise HuabiError(f"KID: the two feature sets have different dimensions ({features_1.shape[1]} vs {features_2.shape[1]})")
    if subsets < 1:
        raise HuabiError(f"KID: subsets must be >= 1, got {subsets}")
    size = min(subset_size, len(features_1), len(features_2))
    if size < 2:
        raise HuabiError(f"KID needs at least 2 images per set, got {len(features_1)} and {len(features_2)}")
    features_1, features_2 = features_1.astype(np.float64), features_2.astype(np.float64)
    rng = np.random.RandomState(seed)
    values = np.empty(subsets)
    for i in range(subsets):
        x = features_1[rng.choice(len(features_1), size, replace=False)]
        y = features_2[rng.choice(len(features_2), size, replace=False)]
        values[i] = mmd2_unbiased(polynomial_kernel(x, x), polynomial_kernel(x, y), polynomial_kernel(y, y))
    return KIDResult(mean=float(values.mean()), std=float(values.std()), subsets=subsets, subset_size=size)


@dataclass(frozen=True)
class ISResult:
    mean: float
    std: float
    splits: int


def inception_score(logits: np.ndarray, *, splits: int = IS_SPLITS, shuffle: bool = True, seed: int = RNG_SEED) -> ISResult:
    """exp(E_x KL(p(y|x) || p(y))) per split of the (shuffled) images; mean and std over splits."""
    logits = _as_2d(logits, "logits").astype(np.float64)
    n = len(logits)
    if splits < 1 or n < splits:
        raise HuabiError(f"Inception Score: {n} images cannot be cut into {splits} splits")
    if shuffle:
        logits = logits[np.random.RandomState(seed).permutation(n)]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        rows = slice(i * n // splits, (i + 1) * n // splits)
        log_marginal = np.log(p[rows].mean(axis=0, keepdims=True))
        kl = (p[rows] * (log_p[rows] - log_marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return ISResult(mean=float(np.mean(scores)), std=float(np.std(scores)), splits=splits)


def clip_score(text_features: np.ndarray, image_features: np.ndarray) -> float:
    """Mean of 100 * max(cos, 0) over matching rows (torchmetrics' CLIPScore)."""
    text, image = _as_2d(text_features, "text features").astype(np.float64), _as_2d(image_features, "image features").astype(np.float64)
    if text.shape != image.shape:
        raise HuabiError(f"CLIP score: {len(text)} prompts for {len(image)} images (shapes {text.shape} vs {image.shape})")
    text = text / np.linalg.norm(text, axis=1, keepdims=True)
    image = image / np.linalg.norm(image, axis=1, keepdims=True)
    return float((100.0 * np.clip((text * image).sum(axis=1), 0, None)).mean())


def _as_2d(array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2 or array.shape[0] == 0:
        raise HuabiError(f"{what}: expected a non-empty [images, dims] array, got shape {array.shape}")
    return array
