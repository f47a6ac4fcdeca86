"""How evenly samples cover the classes, as the judge reads them: the test of an unconditional model's coverage.

    counts = class_counts(predicted, 10)        # [n_0, ..., n_9], ints
    stats = class_spread(counts)                # class_min, class_max, class_kl, class_entropy, class_chi2(_p)

With p_k = n_k / N and K classes:

* class_min, class_max: the rarest and the commonest class's share (max / min is their ratio; infinite when a class
  is missing, which is why the shares are what is stored);
* class_kl: KL(p || uniform) = sum_k p_k log(K p_k) in nats (0 for perfectly even samples, log K for one class);
* class_entropy: H(p) / log K, the normalized entropy (1 = even);
* class_chi2, class_chi2_p: Pearson's chi-square statistic sum_k (n_k - N/K)^2 / (N/K) against the uniform
  distribution, and its p-value with K - 1 degrees of freedom (small: the imbalance is more than sampling noise).

Even a perfectly uniform sampler shows some spread at finite N: `expected_uniform_kl(N, K)` is the first-order
expected KL of N uniform draws, (K - 1) / (2N), 0.011 nats for 400 samples of 10 classes.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch

SPREAD_KEYS = ("class_min", "class_max", "class_kl", "class_entropy", "class_chi2", "class_chi2_p")


def class_counts(predicted: torch.Tensor, num_classes: int) -> List[int]:
    """predicted (N,) integer classes in [0, num_classes) -> per-class counts (num_classes ints)."""
    if predicted.ndim != 1:
        raise ValueError(f"predicted must be a 1-D tensor of classes, got shape {tuple(predicted.shape)}")
    if predicted.numel() and not 0 <= int(predicted.min()) <= int(predicted.max()) < num_classes:
        raise ValueError(f"predicted classes must lie in [0, {num_classes}), got values in "
                         f"[{int(predicted.min())}, {int(predicted.max())}]")
    return torch.bincount(predicted.long(), minlength=num_classes).tolist()


def class_spread(counts: Sequence[int]) -> Dict[str, float]:
    """The spread statistics of per-class counts (see the module docstring); ValueError for no samples."""
    from scipy import stats

    counts = [int(c) for c in counts]
    total, k = sum(counts), len(counts)
    if total <= 0 or k < 2 or min(counts) < 0:
        raise ValueError(f"counts must be >= 0 over at least 2 classes with a positive total, got {counts}")
    shares = [c / total for c in counts]
    kl = sum(p * math.log(k * p) for p in shares if p > 0)
    expected = total / k
    chi2 = sum((c - expected) ** 2 for c in counts) / expected
    return {"class_min": min(shares), "class_max": max(shares), "class_kl": kl,
            "class_entropy": 1.0 - kl / math.log(k), "class_chi2": chi2,
            "class_chi2_p": float(stats.chi2.sf(chi2, k - 1))}


def expected_uniform_kl(samples: int, classes: int) -> float:
    """First-order expected KL(p || uniform) of `samples` draws from a uniform distribution over `classes`."""
    return (classes - 1) / (2.0 * samples)
