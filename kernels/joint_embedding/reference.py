"""Pure-PyTorch CoReDi joint embedding: the test oracle and the `torch` backend of the op.

Two kinds of functions live here:

* `joint_embedding_ref` — the plain formula, written the way the unfused training code computes it (standardize,
  project, BatchNorm, resize, noise, concatenate, patch-embed), differentiable by autograd, in the inputs' dtypes
  or upcast to float64 (the oracle of the tests).
* `*_torch` — the stages of the fused op with the same contract as the Triton launchers in `_kernels` (projection
  with partial statistics, embedding, and their hand-written backward), used by the `torch` backend. They compute
  in float32 (float64 when an input is float64).

Shapes: features f (B, L, D) on a √L×√L grid; weight W (D, d); x, noise_x (B, C, H, W); noise_z (B, d, H, W);
t, feature_keep (B,); patch_weight (hidden, C + d, p, p); patch tokens (B, T, hidden), T = (H/p)·(W/p).
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """The dtype the math runs in: float64 when any of `tensors` is float64, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def grid_side(num_tokens: int) -> int:
    """√L for a square token grid (the caller has checked that L is a perfect square)."""
    return math.isqrt(num_tokens)


# ---------------------------------------------------------------------------------------------------------------
# The oracle
# ---------------------------------------------------------------------------------------------------------------


class ReferenceOutput(NamedTuple):
    tokens: Tensor  # (B, T, hidden)
    target: Tensor  # (B, C + d, H, W): [x − noise_x, sg(z) − noise_z]
    z_hat: Tensor  # (B, L, d): s·Norm(p)
    projected: Tensor  # (B, L, d): p before the norm
    batch_mean: Tensor  # (d,)
    batch_var: Tensor  # (d,) biased
    covariance: Tensor  # (d, d) covariance of Norm(p) over all tokens (unbiased), before the feature scale
    running_mean: Optional[Tensor]  # the updated running statistics (copies; None without them)
    running_var: Optional[Tensor]


def joint_embedding_ref(
    features: Tensor,
    weight: Tensor,
    x: Tensor,
    noise_x: Tensor,
    noise_z: Tensor,
    t: Tensor,
    patch_weight: Tensor,
    patch_bias: Optional[Tensor] = None,
    pos_embed: Optional[Tensor] = None,
    *,
    feature_keep: Optional[Tensor] = None,
    feature_mean: Optional[Tensor] = None,
    feature_std: Optional[Tensor] = None,
    normalize: bool = True,
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    feature_scale: float = 1.0,
    upcast: bool = False,
) -> ReferenceOutput:
    """The unfused computation, step by step (see the module docstring for shapes).

    The projection, norm and resize run in float32 (float64 with `upcast`) like the training code's projector;
    z_t is cast to the image stream's dtype before the concatenation and the patch embedding runs in the patch
    weight's dtype. The running statistics are updated on copies, which are returned.
    """
    cd = torch.float64 if upcast else compute_dtype(features, weight)
    if upcast:
        x, noise_x, noise_z, patch_weight = x.double(), noise_x.double(), noise_z.double(), patch_weight.double()
        patch_bias = patch_bias.double() if patch_bias is not None else None
        pos_embed = pos_embed.double() if pos_embed is not None else None
    B, L, _ = features.shape
    d = weight.shape[1]
    standardized = features.to(cd)
    if feature_mean is not None:
        standardized = standardized - feature_mean.to(cd)
    if feature_std is not None:
        standardized = standardized / feature_std.to(cd)
    projected = standardized @ weight.to(cd)  # (B, L, d)
    flat = projected.reshape(-1, d)

    new_mean = running_mean.detach().clone().to(cd) if running_mean is not None else None
    new_var = running_var.detach().clone().to(cd) if running_var is not None else None
    if normalize:
        normalized = F.batch_norm(
            flat, new_mean, new_var, _opt(norm_weight, cd), _opt(norm_bias, cd), training or new_mean is None,
            momentum, eps,
        )  # fmt: skip
    else:
        normalized = flat
    z_hat = (normalized * feature_scale).reshape(B, L, d)

    side = grid_side(L)
    H, W = x.shape[-2:]
    grid = z_hat.transpose(1, 2).reshape(B, d, side, side)
    z = grid if (H, W) == (side, side) else F.interpolate(grid, size=(H, W), mode="bilinear", align_corners=False)
    tb = t.to(cd).view(-1, 1, 1, 1)
    x_t = tb * x + (1 - tb) * noise_x
    z_t = tb * z + (1 - tb) * noise_z
    if feature_keep is not None:
        z_t = z_t * feature_keep.to(z_t.dtype).view(-1, 1, 1, 1)
    inputs = torch.cat([x_t.to(x.dtype), z_t.to(x.dtype)], dim=1).to(patch_weight.dtype)
    p = patch_weight.shape[-1]
    tokens = F.conv2d(inputs, patch_weight, patch_bias, stride=p).flatten(2).transpose(1, 2)  # (B, T, hidden)
    if pos_embed is not None:
        tokens = tokens + pos_embed.reshape(1, -1, tokens.shape[-1])
    target = torch.cat([x - noise_x, (z.detach() - noise_z).to(x.dtype)], dim=1)

    detached = flat.detach()
    centered = normalized - normalized.mean(dim=0)
    covariance = centered.T @ centered / (flat.shape[0] - 1)
    return ReferenceOutput(
        tokens, target, z_hat, projected, detached.mean(dim=0), detached.var(dim=0, correction=0), covariance,
        new_mean, new_var,
    )  # fmt: skip


def _opt(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return t.to(dtype) if t is not None else None


# ---------------------------------------------------------------------------------------------------------------
# Layout helpers: bilinear resize as two matrices, patches as rows
# ---------------------------------------------------------------------------------------------------------------


def resize_matrix(side: int, size: int, dtype: torch.dtype, device) -> Tensor:
    """(size, side) matrix R of 1-D linear interpolation with align_corners=False: R @ v resizes v (side,) to size.

    Bilinear resizing is separable, so the 2-D resize of a (side, side) grid is R_h · grid · R_wᵀ and its adjoint
    is R_hᵀ · dgrid · R_w. Built from the same source-index rule as torch's upsampling (src = (i + ½)·side/size − ½,
    clamped at 0), independently of F.interpolate, which the oracle uses.
    """
    src = ((torch.arange(size, dtype=torch.float64) + 0.5) * (side / size) - 0.5).clamp(min=0)
    lo = src.floor().long().clamp(max=side - 1)
    hi = (lo + 1).clamp(max=side - 1)
    frac = src - lo
    matrix = torch.zeros(size, side, dtype=torch.float64)
    rows = torch.arange(size)
    matrix.index_put_((rows, lo), 1 - frac, accumulate=True)
    matrix.index_put_((rows, hi), frac, accumulate=True)
    return matrix.to(dtype=dtype, device=device)


def to_patches(image: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B·T, C·p·p) rows, one per patch (row-major over the patch grid), columns ordered (c, i, j)
    like a flattened Conv2d weight."""
    B, C, H, W = image.shape
    patches = image.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, H/p, W/p, C, p, p)
    return patches.reshape(B * (H // p) * (W // p), C * p * p)


def from_patches(rows: Tensor, batch: int, channels: int, height: int, width: int, p: int) -> Tensor:
    """Inverse of `to_patches`: (B·T, C·p·p) -> (B, C, H, W)."""
    grid = rows.reshape(batch, height // p, width // p, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(batch, channels, height, width)


# ---------------------------------------------------------------------------------------------------------------
# The `torch` backend: the op's stages with the Triton launchers' contract
# ---------------------------------------------------------------------------------------------------------------


def project_torch(
    features: Tensor, weight: Tensor, feature_mean: Tensor, feature_std: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """p = ((f − mean)/std)·W and its statistics as one partial (the whole local batch).

    -> projected (B·L, d), counts (1,), sums (1, d), scatters (1, d, d) = Σ (p − p̄)(p − p̄)ᵀ, all in `dtype`
    (the compute dtype).
    """
    cd = dtype
    d = weight.shape[1]
    standardized = (features.reshape(-1, features.shape[-1]).to(cd) - feature_mean.to(cd)) / feature_std.to(cd)
    projected = standardized @ weight.to(cd)
    total = projected.sum(dim=0)
    centered = projected - total / projected.shape[0]
    counts = projected.new_full((1,), float(projected.shape[0]))
    return projected, counts, total.reshape(1, d), (centered.T @ centered).reshape(1, d, d)


def embed_torch(
    projected: Tensor,
    norm_mean: Tensor,
    norm_scale: Tensor,
    norm_shift: Tensor,
    x: Tensor,
    noise_x: Tensor,
    noise_z: Tensor,
    t: Tensor,
    feature_keep: Optional[Tensor],
    patch_weight: Tensor,
    patch_bias: Optional[Tensor],
    pos_embed: Optional[Tensor],
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """Tokens of cat(x_t, z_t) with z = resize((p − norm_mean)·norm_scale + norm_shift).

    projected (B·L, d); norm_* (d,); feature_keep (B,) float or None; pos_embed (T, hidden) or None.
    -> tokens (B, T, hidden) in out_dtype, target (B, C + d, H, W) in x's dtype, patches (B·T, K + 1) in out_dtype
    (each token's input vector, K = (C + d)·p², and a trailing 1, for the backward).
    """
    cd = projected.dtype
    B, _, H, W = x.shape
    d = projected.shape[1]
    side = grid_side(projected.shape[0] // B)
    p = patch_weight.shape[-1]
    z_hat = (projected - norm_mean) * norm_scale + norm_shift  # (B·L, d)
    grid = z_hat.reshape(B, side, side, d).permute(0, 3, 1, 2)  # (B, d, side, side)
    rh, rw = resize_matrix(side, H, cd, x.device), resize_matrix(side, W, cd, x.device)
    z = torch.einsum("hy,bdyx,wx->bdhw", rh, grid, rw)  # bilinear resize onto the image grid
    tb = t.to(cd).view(-1, 1, 1, 1)
    x32, nx, nz = x.to(cd), noise_x.to(cd), noise_z.to(cd)
    x_t = tb * x32 + (1 - tb) * nx
    z_t = tb * z + (1 - tb) * nz
    if feature_keep is not None:
        z_t = z_t * feature_keep.to(cd).view(-1, 1, 1, 1)
    rows = to_patches(torch.cat([x_t, z_t], dim=1), p).to(out_dtype)  # (B·T, K), rounded like the conv's input
    weight = patch_weight.reshape(patch_weight.shape[0], -1).to(cd)  # (hidden, K)
    tokens = rows.to(cd) @ weight.T
    if patch_bias is not None:
        tokens = tokens + patch_bias.to(cd)
    T = rows.shape[0] // B
    tokens = tokens.reshape(B, T, -1)
    if pos_embed is not None:
        tokens = tokens + pos_embed.reshape(T, -1).to(cd)
    target = torch.cat([x32 - nx, z - nz], dim=1).to(x.dtype)
    patches = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return tokens.to(out_dtype), target, patches


def embed_bwd_torch(
    dtokens: Tensor,
    dz_hat: Optional[Tensor],
    projected: Tensor,
    norm_mean: Tensor,
    norm_rstd: Tensor,
    t: Tensor,
    feature_keep: Optional[Tensor],
    patch_weight: Tensor,
    image_channels: int,
    height: int,
    width: int,
) -> tuple[Tensor, Tensor]:
    """Gradient of the tokens with respect to ẑ (the normalized, scaled projection on the token grid).

    dtokens (B, T, hidden); dz_hat (B·L, d) or None (ẑ's own upstream gradient, added); projected (B·L, d);
    norm_mean, norm_rstd (d,) the statistics the forward normalized with (x̂ = (p − mean)·rstd).
    -> dẑ (B·L, d) and partial sums (1, 2, d): Σ dẑ and Σ dẑ·x̂ over the rows (the norm's backward needs them).
    """
    cd = projected.dtype
    B = dtokens.shape[0]
    d = projected.shape[1]
    side = grid_side(projected.shape[0] // B)
    p = patch_weight.shape[-1]
    weight_z = patch_weight.reshape(patch_weight.shape[0], -1)[:, image_channels * p * p :].to(cd)  # (hidden, d·p²)
    drows = dtokens.reshape(-1, dtokens.shape[-1]).to(cd) @ weight_z  # (B·T, d·p²)
    factor = t.to(cd) if feature_keep is None else t.to(cd) * feature_keep.to(cd)
    dz = from_patches(drows, B, d, height, width, p) * factor.view(-1, 1, 1, 1)  # dL/dz (B, d, H, W)
    rh, rw = resize_matrix(side, height, cd, dz.device), resize_matrix(side, width, cd, dz.device)
    dgrid = torch.einsum("hy,bdhw,wx->bdyx", rh, dz, rw)  # the resize's adjoint
    dzh = dgrid.permute(0, 2, 3, 1).reshape(-1, d)
    if dz_hat is not None:
        dzh = dzh + dz_hat.reshape(-1, d).to(cd)
    xhat = (projected - norm_mean) * norm_rstd
    sums = torch.stack([dzh.sum(dim=0), (dzh * xhat).sum(dim=0)]).unsqueeze(0)
    return dzh, sums


def project_bwd_torch(
    features: Tensor,
    feature_mean: Tensor,
    feature_std: Tensor,
    dz_hat: Tensor,
    projected: Tensor,
    center: Tensor,
    alpha: Tensor,
    offset: Tensor,
    mix: Tensor,
) -> Tensor:
    """dW = ((f − mean)/std)ᵀ·dp with dp = alpha·dẑ + (p − center)·mix + offset (the norm's and the scatter
    matrix's backward, folded by the caller into the (d,) vectors alpha, offset and the (d, d) matrix mix).

    -> dW (D, d) in the compute dtype.
    """
    cd = projected.dtype
    dp = alpha * dz_hat + (projected - center) @ mix + offset
    standardized = (features.reshape(-1, features.shape[-1]).to(cd) - feature_mean.to(cd)) / feature_std.to(cd)
    return standardized.T @ dp
