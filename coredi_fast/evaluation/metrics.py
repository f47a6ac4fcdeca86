"""Sample-quality metrics on feature arrays: Fréchet distance (FID/sFID), Inception Score, precision and recall.

Pure math, no network: the inputs are features that `features.py` extracted. Everything follows OpenAI's ADM
evaluator (guided-diffusion `evaluations/evaluator.py`), which is how the ImageNet numbers in the papers were made:

* FID / sFID: ‖μ1−μ2‖² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½), with scipy's `sqrtm` in float64 and the pytorch-fid/TTUR fallback
  (add eps·I to both covariances) when the product is singular. `frechet_distance_eigh` is a second, symmetric
  eigendecomposition route (torch, float64) used to cross-check it.
* Inception Score: exp(E_x[KL(p(y|x) ‖ p(y))]) per split, mean and std over splits (ADM: splits of 5000 samples).
* Precision / recall (Kynkäänniemi et al. 2019): each set's manifold is the union of balls around its points whose
  radius is the distance to the k-th nearest neighbour (k=3). Precision is the share of fake points inside the real
  manifold, recall the share of real points inside the fake one.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Optional, Tuple

import numpy as np
import torch
from scipy import linalg
from scipy.special import xlogy

# ADM's ManifoldEstimator distance blocks: 10000 x 10000 squared distances (400 MB in fp32) at a time.
PR_BATCH_SIZE = 10000


# ---------------------------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------------------------

def feature_statistics(features) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of features (N, D) -> (mu (D,), sigma (D, D)), float64, `np.cov(rowvar=False)` (ddof 1)."""
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be a 2-D array (N, D), got shape {features.shape}")
    if features.shape[0] < 2:
        raise ValueError(f"features needs at least 2 rows to estimate a covariance, got {features.shape[0]}")
    features = features.astype(np.float64, copy=False)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _check_gaussian(mu1, sigma1, mu2, sigma2) -> Tuple[np.ndarray, ...]:
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    for name, mu in (("mu1", mu1), ("mu2", mu2)):
        if mu.ndim != 1:
            raise ValueError(f"{name} must be a vector (D,), got shape {mu.shape}")
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 have different lengths: {mu1.shape} vs {mu2.shape}")
    d = mu1.shape[0]
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        if sigma.shape != (d, d):
            raise ValueError(f"{name} must be a ({d}, {d}) covariance to match the means, got shape {sigma.shape}")
        if not np.isfinite(sigma).all():
            raise ValueError(f"{name} has non-finite entries")
    return mu1, sigma1, mu2, sigma2


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), as ADM/pytorch-fid compute it (float64).

    mu*: (D,) means; sigma*: (D, D) covariances. When sqrtm(sigma1 @ sigma2) is not finite (a singular product, e.g.
    fewer samples than dimensions) eps·I is added to both covariances and it is taken again, with a warning. A
    complex square root whose diagonal has an imaginary part above 1e-3 raises ValueError; a smaller one is numerical
    noise and is dropped.
    """
    mu1, sigma1, mu2, sigma2 = _check_gaussian(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"frechet_distance: the covariance product is singular; adding {eps:g} to the diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: the matrix square root has an imaginary component of "
                             f"{np.max(np.abs(covmean.imag)):.3g}; the covariances are not valid")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def clamp_distance(name: str, value: float) -> Tuple[float, Optional[str]]:
    """(max(value, 0), a note when it was negative). A Fréchet distance is >= 0, but on tiny sample sets (fewer
    samples than feature dimensions) the rounding of the matrix square root can leave it slightly below 0; it is
    reported as 0 with the note, and the caller keeps the raw value (evaluate.py: "raw_metrics" in its JSON)."""
    if value >= 0:
        return value, None
    return 0.0, (f"{name} came out as {value:.6g} (a Fréchet distance cannot be negative: rounding in the matrix "
                 f"square root, usually from too few samples) and is reported as 0; raw_metrics keeps the value")


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    # scipy >= 1.16 deprecates `disp`, older releases print a warning for ill-conditioned input; ours decides itself.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        result = linalg.sqrtm(matrix)
    return result[0] if isinstance(result, tuple) else result


def frechet_distance_eigh(mu1, sigma1, mu2, sigma2, device: Optional[torch.device] = None) -> float:
    """The same distance through symmetric eigendecompositions (torch, float64, CPU or GPU).

    Tr((Σ1Σ2)^½) = Σ_i sqrt(λ_i(Σ1^½ Σ2 Σ1^½)): the product is similar to a symmetric PSD matrix, so `eigh` gives its
    spectrum without a general matrix square root. Tiny negative eigenvalues (rounding) are clamped to 0. Needs no eps
    for singular covariances, so it can differ from `frechet_distance` there by about D·eps·(trace scale).
    """
    mu1, sigma1, mu2, sigma2 = _check_gaussian(mu1, sigma1, mu2, sigma2)
    device = torch.device(device) if device is not None else torch.device("cpu")
    s1 = torch.from_numpy(sigma1).to(device)
    s2 = torch.from_numpy(sigma2).to(device)
    evals, evecs = torch.linalg.eigh((s1 + s1.T) / 2)
    root1 = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    inner = root1 @ s2 @ root1
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum().item()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


# ---------------------------------------------------------------------------------------------------------------
# Inception Score
# ---------------------------------------------------------------------------------------------------------------

def _looks_like_probabilities(scores: np.ndarray) -> bool:
    return bool((scores >= 0).all() and (scores <= 1).all() and np.allclose(scores.sum(axis=1), 1.0, atol=1e-3))


def inception_score(logits_or_probs, splits: int = 10, *, split_size: Optional[int] = None,
                    from_logits: Optional[bool] = None) -> Tuple[float, float]:
    """Inception Score: mean and std over splits of exp(mean_x KL(p(y|x) ‖ p(y))), float64.

    logits_or_probs: (N, K) class logits or probabilities p(y|x). `from_logits=None` decides by looking: rows that are
        non-negative and sum to 1 are probabilities, anything else is logits (softmax is applied).
    splits: number of contiguous, near-equal chunks (np.array_split), each with its own marginal p(y).
    split_size: ADM's way instead: chunks of `split_size` rows in order (ADM uses 5000; the last chunk may be
        smaller). When given, `splits` is ignored.
    Returns (mean, std) with the std over splits (ddof 0, as improved-GAN). 0·log 0 counts as 0.
    """
    scores = np.asarray(logits_or_probs, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] < 1 or scores.shape[1] < 1:
        raise ValueError(f"logits_or_probs must be a non-empty 2-D array (N, K), got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("logits_or_probs has non-finite entries")
    if from_logits is None:
        from_logits = not _looks_like_probabilities(scores)
    if from_logits:
        shifted = scores - scores.max(axis=1, keepdims=True)
        probs = np.exp(shifted)
        probs /= probs.sum(axis=1, keepdims=True)
    else:
        if (scores < 0).any():
            raise ValueError("logits_or_probs: probabilities must be non-negative (pass from_logits=True for logits)")
        probs = scores / scores.sum(axis=1, keepdims=True)

    n = probs.shape[0]
    if split_size is not None:
        if split_size < 1:
            raise ValueError(f"split_size must be >= 1, got {split_size}")
        chunks = [probs[i:i + split_size] for i in range(0, n, split_size)]
    else:
        if not 1 <= splits <= n:
            raise ValueError(f"splits must be between 1 and the number of rows ({n}), got {splits}")
        chunks = np.array_split(probs, splits)
    values = []
    for part in chunks:
        marginal = part.mean(axis=0, keepdims=True)
        # KL(p || p̄) = Σ p log p − Σ p log p̄; where p > 0, p̄ > 0 too, so only 0·log 0 needs xlogy.
        kl = (xlogy(part, part) - xlogy(part, marginal)).sum(axis=1).mean()
        values.append(np.exp(kl))
    return float(np.mean(values)), float(np.std(values))


# ---------------------------------------------------------------------------------------------------------------
# Precision and recall (k-NN manifolds)
# ---------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def full_fp32():
    """Turns TF32 off for CUDA matmuls and convolutions inside the block (TF32 keeps 10 mantissa bits, and would
    shift distances and features by ~1e-3 relative). Restores the previous settings."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _as_features(name: str, features, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features)
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, D), got shape {tuple(tensor.shape)}")
    return tensor.to(device=device, dtype=dtype)


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, D), (m, D) -> (n, m) squared Euclidean distances through the Gram matrix, clamped at 0 (as ADM)."""
    return (a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)[None]).clamp_min_(0)


def _squared_knn_radii(x: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """(N, D) -> (N,) squared distance of every point to its k-th nearest neighbour, itself excluded."""
    n = x.shape[0]
    radii = torch.empty(n, dtype=x.dtype, device=x.device)
    for start in range(0, n, batch_size):
        rows = x[start:start + batch_size]
        best = None  # (rows, k+1) smallest squared distances so far, the point itself (0) included
        for col in range(0, n, batch_size):
            block = _squared_distances(rows, x[col:col + batch_size])
            candidates = block if best is None else torch.cat([best, block], dim=1)
            best = candidates.topk(min(k + 1, candidates.shape[1]), dim=1, largest=False).values
        radii[start:start + batch_size] = best[:, k]
    return radii


def _pr_setup(device, dtype) -> Tuple[torch.device, torch.dtype]:
    device = torch.device(device) if device is not None else torch.device("cpu")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return device, dtype


def knn_radii(features, k: int = 3, *, device=None, dtype: torch.dtype = torch.float32,
              batch_size: int = PR_BATCH_SIZE) -> np.ndarray:
    """Distance of each point of features (N, D) to its k-th nearest other point -> (N,) float64 array.

    Points are centred first (distances do not change, the Gram-matrix formula loses less to cancellation). Needs
    N > k. Works in blocks of `batch_size` rows and columns, so 50k x 50k fits in memory.
    """
    device, dtype = _pr_setup(device, dtype)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    x = _as_features("features", features, device, dtype)
    if x.shape[0] <= k:
        raise ValueError(f"features needs more than k={k} points for k-NN radii, got {x.shape[0]}")
    with torch.inference_mode(), full_fp32():
        x = x - x.mean(0)
        return _squared_knn_radii(x, k, batch_size).sqrt().cpu().double().numpy()


def precision_recall(real_features, fake_features, k: int = 3, *, device=None, dtype: torch.dtype = torch.float32,
                     batch_size: int = PR_BATCH_SIZE) -> Tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), ADM's `ManifoldEstimator` with nhood k.

    real_features: (N, D) reference features; fake_features: (M, D) sample features; each needs more than k rows.
    precision = share of fake points within some real point's k-NN ball (d(fake, real_j) <= r_real_j);
    recall    = share of real points within some fake point's k-NN ball.
    Distances are computed on `device` in `dtype` (ADM: fp16 when finite, else fp32) in blocks of `batch_size`.
    Returns (precision, recall).
    """
    device, dtype = _pr_setup(device, dtype)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    real = _as_features("real_features", real_features, device, dtype)
    fake = _as_features("fake_features", fake_features, device, dtype)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real_features and fake_features have different widths: {real.shape[1]} vs "
                         f"{fake.shape[1]}")
    for name, x in (("real_features", real), ("fake_features", fake)):
        if x.shape[0] <= k:
            raise ValueError(f"{name} needs more than k={k} points, got {x.shape[0]}")
    with torch.inference_mode(), full_fp32():
        centre = real.mean(0)
        real, fake = real - centre, fake - centre
        real_r2 = _squared_knn_radii(real, k, batch_size)
        fake_r2 = _squared_knn_radii(fake, k, batch_size)
        fake_inside = torch.zeros(fake.shape[0], dtype=torch.bool, device=device)
        real_inside = torch.zeros(real.shape[0], dtype=torch.bool, device=device)
        for r in range(0, real.shape[0], batch_size):
            for f in range(0, fake.shape[0], batch_size):
                d2 = _squared_distances(real[r:r + batch_size], fake[f:f + batch_size])  # (rows real, cols fake)
                fake_inside[f:f + batch_size] |= (d2 <= real_r2[r:r + batch_size, None]).any(0)
                real_inside[r:r + batch_size] |= (d2 <= fake_r2[None, f:f + batch_size]).any(1)
        return fake_inside.double().mean().item(), real_inside.double().mean().item()
