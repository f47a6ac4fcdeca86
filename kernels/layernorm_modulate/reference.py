"""Pure-PyTorch LayerNorm + adaLN modulate: the oracle for tests and the CPU backend of the ops.

Two kinds of functions live here:

* `*_ref` — the plain formula, differentiable by autograd, computed in the input dtype or upcast. Tests take
  their gradients with `torch.autograd.grad` in float64.
* `*_fwd_torch` / `*_bwd_torch` — the same contract as the Triton launchers (statistics out, hand-written
  backward in), used by the `torch` backend. They compute in float32 (float64 for float64 inputs).

Shapes: x, y (B, T, D); shift, scale, gate (B, D), one row per sample; mean, rstd (B, T).
LayerNorm has no affine parameters (DiT's norm1/norm2 use `elementwise_affine=False`).
"""
from typing import Optional

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------------
# Differentiable references
# ---------------------------------------------------------------------------------------------------------------


def _layernorm_no_affine(x: Tensor, eps: float) -> Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = (x - mean).square().mean(dim=-1, keepdim=True)  # biased, as in LayerNorm
    return (x - mean) * torch.rsqrt(var + eps)


def layernorm_modulate_ref(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6, upcast: bool = False) -> Tensor:
    """LN(x)·(1 + scale) + shift per sample. x (B, T, D), shift/scale (B, D) -> (B, T, D) in x's dtype.

    upcast=True computes in float64 (the test oracle); else in the inputs' dtype like an eager model.
    """
    dtype = x.dtype
    if upcast:
        x, shift, scale = x.double(), shift.double(), scale.double()
    out = _layernorm_no_affine(x, eps) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    return out.to(dtype)


def gated_residual_layernorm_modulate_ref(
    x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6, upcast: bool = False
) -> tuple[Tensor, Tensor]:
    """h = x + gate·y, out = LN(h)·(1 + scale) + shift. x, y (B, T, D), gate/shift/scale (B, D) -> (h, out).

    h is rounded to x's dtype before it is normalized, as an unfused model stores the residual stream.
    """
    dtype = x.dtype
    if upcast:
        x, y, gate = x.double(), y.double(), gate.double()
    h = (x + gate.unsqueeze(1) * y).to(dtype)
    return h, layernorm_modulate_ref(h, shift, scale, eps, upcast=upcast)


# ---------------------------------------------------------------------------------------------------------------
# The `torch` backend: explicit forward with saved statistics, explicit backward
# ---------------------------------------------------------------------------------------------------------------


def _normalize(x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """x̂, mean, rstd of x (B, T, D) in the compute dtype."""
    xc = x.to(compute_dtype(x.dtype))
    var, mean = torch.var_mean(xc, dim=-1, correction=0)
    rstd = torch.rsqrt(var + eps)
    return (xc - mean.unsqueeze(-1)) * rstd.unsqueeze(-1), mean, rstd


def _modulate(xhat: Tensor, shift: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    cd = xhat.dtype
    return (xhat * (1 + scale.to(cd).unsqueeze(1)) + shift.to(cd).unsqueeze(1)).to(dtype)


def layernorm_modulate_fwd_torch(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """-> out (B, T, D) in x's dtype, mean (B, T), rstd (B, T) in the compute dtype."""
    xhat, mean, rstd = _normalize(x, eps)
    return _modulate(xhat, shift, scale, x.dtype), mean, rstd


def gated_residual_layernorm_modulate_fwd_torch(
    x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> h, out (B, T, D) in x's dtype, mean, rstd (B, T) of h."""
    cd = compute_dtype(x.dtype)
    h = (x.to(cd) + gate.to(cd).unsqueeze(1) * y.to(cd)).to(x.dtype)
    xhat, mean, rstd = _normalize(h, eps)
    return h, _modulate(xhat, shift, scale, x.dtype), mean, rstd


def _layernorm_modulate_bwd_math(
    dout: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """dx, dshift, dscale, all in the compute dtype (see `layernorm_modulate_bwd_torch`)."""
    cd = compute_dtype(x.dtype)
    dout = dout.to(cd)
    mean, rstd = mean.to(cd).unsqueeze(-1), rstd.to(cd).unsqueeze(-1)
    xhat = (x.to(cd) - mean) * rstd
    g = dout * (1 + scale.to(cd).unsqueeze(1))
    dx = rstd * (g - g.mean(dim=-1, keepdim=True) - xhat * (g * xhat).mean(dim=-1, keepdim=True))
    return dx, dout.sum(dim=1), (dout * xhat).sum(dim=1)


def layernorm_modulate_bwd_torch(
    dout: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of out = LN(x)·(1 + scale) + shift.

    dx = rstd·(g − mean(g) − x̂·mean(g·x̂)) with g = dout·(1 + scale);
    dshift = Σ_t dout; dscale = Σ_t dout·x̂.
    -> dx (B, T, D) in x's dtype, dshift, dscale (B, D) in the compute dtype.
    """
    dx, dshift, dscale = _layernorm_modulate_bwd_math(dout, x, scale, mean, rstd)
    return dx.to(x.dtype), dshift, dscale


def gated_residual_layernorm_modulate_bwd_torch(
    dout: Tensor,
    dh_in: Optional[Tensor],
    h: Tensor,
    y: Tensor,
    gate: Tensor,
    scale: Tensor,
    mean: Tensor,
    rstd: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (h, out) = (x + gate·y, LN(h)·(1 + scale) + shift); dh_in is the upstream gradient of h.

    dh = (LN-modulate backward of dout) + dh_in; dx = dh, dy = gate·dh, dgate = Σ_t dh·y.
    -> dx, dy (B, T, D) in h's / y's dtype; dgate, dshift, dscale (B, D) in the compute dtype.
    """
    cd = compute_dtype(h.dtype)
    dh, dshift, dscale = _layernorm_modulate_bwd_math(dout, h, scale, mean, rstd)
    if dh_in is not None:
        dh = dh + dh_in.to(cd)
    dy = gate.to(cd).unsqueeze(1) * dh
    dgate = (dh * y.to(cd)).sum(dim=1)
    return dh.to(h.dtype), dy.to(y.dtype), dgate, dshift, dscale
