"""Regularizers that keep CoReDi's learned feature projection from collapsing (DESIGN §2.6, method.md §2.2.6).

With stop-gradient targets and BatchNorm the scale-collapse path (W -> 0) is closed, but the d channels can still
align to one direction (dimensional collapse). Each function returns an unweighted scalar; the projector multiplies
by `reg_weight`.

* `orthogonality_loss`: ||W^T W - I_d||_F^2, keeps the columns of W orthonormal like a PCA basis.
* `covariance_loss`: VICReg's off-diagonal covariance term (Bardes et al. 2022), decorrelates the channels.
* `vf_loss`: VA-VAE's vision-foundation alignment (Yao et al. 2025, LightningDiT `vavae/.../contperceptual.py`):
  a margin cosine term and a margin distance-matrix term between an up-projection U z_hat and the encoder features.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .cross_rank import cross_rank_sum


def orthogonality_loss(weight: torch.Tensor) -> torch.Tensor:
    """||W^T W - I_d||_F^2 for W: (D, d) (columns are the projection directions). Returns a scalar.

    Zero exactly when the columns are orthonormal (e.g. a PCA init); its gradient 4 W (W^T W - I) reaches only W.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must have shape (D, d), got {tuple(weight.shape)}")
    gram = weight.T @ weight
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return (gram - eye).pow(2).sum()


def covariance_loss(z: torch.Tensor) -> torch.Tensor:
    """VICReg off-diagonal covariance loss over all tokens. z: (..., d), e.g. (B, L, d). Returns a scalar.

        C = 1/(N-1) sum_n (z_n - mean)(z_n - mean)^T   over the N = B*L tokens
        L = (1/d) sum_{i != j} C_ij^2

    Under DDP/DeepSpeed the tokens of every rank count (N is the global token count), as VICReg gathers its
    embeddings across GPUs; with one process this is the plain formula.
    """
    if z.ndim < 2:
        raise ValueError(f"z must have shape (..., N, d) with several tokens, got {tuple(z.shape)}")
    dim = z.shape[-1]
    tokens = z.reshape(-1, dim)
    if tokens.shape[0] < 2:
        raise ValueError(f"covariance_loss needs at least 2 tokens, got {tokens.shape[0]}")
    count = cross_rank_sum(tokens.new_tensor(float(tokens.shape[0])))
    centered = tokens - cross_rank_sum(tokens.sum(dim=0)) / count
    cov = cross_rank_sum(centered.T @ centered) / (count - 1)
    off_diagonal = cov - torch.diag_embed(torch.diagonal(cov))
    return off_diagonal.pow(2).sum() / dim


class VFLoss(NamedTuple):
    """The two VA-VAE terms; their sum is the loss."""
    cos: torch.Tensor   # margin cosine similarity, scalar
    dist: torch.Tensor  # margin distance-matrix similarity, scalar


def vf_loss(z_up: torch.Tensor, features: torch.Tensor, margin_cos: float = 0.5,
            margin_dist: float = 0.25) -> VFLoss:
    """VA-VAE's vision-foundation loss.

    Args:
        z_up: (B, L, D) up-projected features U z_hat (carries the gradient).
        features: (B, L, D) the encoder features to align with (no gradient expected).
        margin_cos: m1; token pairs (z_up_i, f_i) with cosine >= 1 - m1 cost nothing.
        margin_dist: m2; same-image similarity differences below m2 cost nothing.

    Returns VFLoss(cos, dist):
        cos  = mean_{b,i} ReLU(1 - m1 - cos(z_up_bi, f_bi))
        dist = mean_{b,i,j} ReLU(|cos(z_up_bi, z_up_bj) - cos(f_bi, f_bj)| - m2)

    As in the VA-VAE code, `dist` averages over all L*L ordered pairs of each image, the diagonal included (there
    both similarities are 1, so those entries are 0): it equals (L-1)/L times the mean over pairs i != j.
    """
    if z_up.ndim != 3 or features.shape != z_up.shape:
        raise ValueError(f"z_up and features must both have shape (B, L, D), got {tuple(z_up.shape)} and "
                         f"{tuple(features.shape)}")
    z_unit = F.normalize(z_up, dim=-1, eps=1e-8)
    f_unit = F.normalize(features, dim=-1, eps=1e-8)
    cos_pairs = (z_unit * f_unit).sum(dim=-1)                           # (B, L)
    cos_term = F.relu(1.0 - margin_cos - cos_pairs).mean()
    z_similarity = z_unit @ z_unit.transpose(1, 2)                       # (B, L, L)
    f_similarity = f_unit @ f_unit.transpose(1, 2)
    dist_term = F.relu((z_similarity - f_similarity).abs() - margin_dist).mean()
    return VFLoss(cos_term, dist_term)
