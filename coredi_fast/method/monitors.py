"""Collapse monitors for the learned feature space (method.md §2.2.9). All run without autograd, in float64.

* `effective_rank(z)`: how many channels of z carry variance (d when balanced, 1 at dimensional collapse).
* `subspace_angles(W, P)`: how far the learned projection has drifted from the PCA basis.
* `channel_std(x)`: per-channel spread over tokens (pre-norm std -> 0 is scale collapse).
"""
import math

import torch


@torch.no_grad()
def token_covariance(z: torch.Tensor) -> torch.Tensor:
    """(d, d) float64 covariance of z: (..., d) over all tokens, 1/(N-1) normalization."""
    tokens = z.detach().reshape(-1, z.shape[-1]).to(torch.float64)
    if tokens.shape[0] < 2:
        raise ValueError(f"need at least 2 tokens for a covariance, got {tokens.shape[0]}")
    centered = tokens - tokens.mean(dim=0)
    return centered.T @ centered / (tokens.shape[0] - 1)


@torch.no_grad()
def spectral_effective_rank(eigenvalues: torch.Tensor) -> float:
    """Roy & Vetterli (2007) effective rank of a PSD matrix from its eigenvalues (k,).

    p_k = lambda_k / sum(lambda), erank = exp(-sum_k p_k log p_k), with 0 log 0 = 0: between 1 (one direction holds
    all the variance) and k (all equal). Returns 0.0 for an all-zero spectrum (nothing left to rank).
    """
    spectrum = eigenvalues.detach().to(torch.float64).clamp_min(0.0)
    total = spectrum.sum()
    if total <= 0:
        return 0.0
    p = spectrum / total
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


@torch.no_grad()
def effective_rank(z: torch.Tensor) -> float:
    """Effective rank of Cov(z) for z: (..., d) (tokens over all leading dims). See `spectral_effective_rank`."""
    return spectral_effective_rank(torch.linalg.eigvalsh(token_covariance(z)))


def _orthonormal_basis(matrix: torch.Tensor) -> torch.Tensor:
    """(D, r) orthonormal basis of the column span (r = numerical rank), via SVD so rank deficiency is handled."""
    u, s, _ = torch.linalg.svd(matrix, full_matrices=False)
    if s.numel() == 0 or s[0] == 0:
        return u[:, :0]
    tolerance = s[0] * max(matrix.shape) * torch.finfo(s.dtype).eps
    return u[:, : int((s > tolerance).sum())]


@torch.no_grad()
def subspace_angles(weight: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Principal angles in degrees between span(weight) and span(basis), ascending.

    Args:
        weight: (D, k1), the subspace is spanned by its columns (the projector's W).
        basis: (D, k2), spanned by its columns (pass `pca_components[:d].T` for the PCA basis).

    Returns (min(k1, k2),) float64: arccos of the singular values of Q_w^T Q_b for orthonormal bases Q. 0 means the
    spaces share that direction; 90 means orthogonal. Entries are NaN when either matrix has lower rank (e.g. W
    collapsed to 0) and no angle exists for them.
    """
    if weight.ndim != 2 or basis.ndim != 2 or weight.shape[0] != basis.shape[0]:
        raise ValueError(f"weight (D, k1) and basis (D, k2) need the same D, got {tuple(weight.shape)} and "
                         f"{tuple(basis.shape)}")
    q_weight = _orthonormal_basis(weight.detach().to(torch.float64))
    q_basis = _orthonormal_basis(basis.detach().to(torch.float64))
    count = min(weight.shape[1], basis.shape[1])
    angles = torch.full((count,), float("nan"), dtype=torch.float64, device=weight.device)
    cosines = torch.linalg.svdvals(q_weight.T @ q_basis).clamp(-1.0, 1.0)  # descending -> angles ascending
    angles[: cosines.numel()] = torch.rad2deg(torch.arccos(cosines))
    return angles


@torch.no_grad()
def channel_std(x: torch.Tensor) -> torch.Tensor:
    """(d,) float64 per-channel standard deviation of x: (..., d) over all tokens (unbiased)."""
    tokens = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    if tokens.shape[0] < 2:
        raise ValueError(f"need at least 2 tokens for a standard deviation, got {tokens.shape[0]}")
    return tokens.std(dim=0, correction=1)
