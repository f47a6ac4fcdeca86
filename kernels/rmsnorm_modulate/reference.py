"""Pure-PyTorch RMSNorm + adaLN modulate: the oracle for tests and the CPU backend of the ops.

As in `layernorm_modulate.reference`, two kinds of functions live here:

* `*_ref` — the plain formula, differentiable by autograd (tests take float64 gradients of it).
* `*_fwd_torch` / `*_bwd_torch` — the same contract as the Triton launchers (rstd out, hand-written backward in),
  used by the `torch` backend. They compute in float32 (float64 for float64 inputs).

Shapes: x, y (B, T, D); shift, scale, gate (B, D), one row per sample; weight (D,) or None; rstd (B, T).
RMSNorm: x̂ = x·rstd, rstd = 1/sqrt(mean_D(x²) + eps); the normalized row is n = x̂·weight (JiT's RMSNorm has a
learned weight, initialized to ones) and the op returns n·(1 + scale) + shift.
"""
from typing import Optional

import torch
from torch import Tensor

from ..layernorm_modulate.reference import compute_dtype

# ---------------------------------------------------------------------------------------------------------------
# Differentiable references
# ---------------------------------------------------------------------------------------------------------------


def _rmsnorm(x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    normed = x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)
    return normed * weight if weight is not None else normed


def rmsnorm_modulate_ref(
    x: Tensor, shift: Tensor, scale: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6, upcast: bool = False
) -> Tensor:
    """RMSNorm(x)·weight·(1 + scale) + shift per sample. x (B, T, D), shift/scale (B, D), weight (D,) or None.

    upcast=True computes in float64 (the test oracle); else in the inputs' dtype. Returns x's dtype.
    """
    dtype = x.dtype
    if upcast:
        x, shift, scale = x.double(), shift.double(), scale.double()
        weight = weight.double() if weight is not None else None
    out = _rmsnorm(x, weight, eps) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    return out.to(dtype)


def gated_residual_rmsnorm_modulate_ref(
    x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, weight: Optional[Tensor] = None,
    eps: float = 1e-6, upcast: bool = False,
) -> tuple[Tensor, Tensor]:
    """h = x + gate·y, out = RMSNorm(h)·weight·(1 + scale) + shift -> (h, out), both in x's dtype.

    h is rounded to x's dtype before it is normalized, as an unfused model stores the residual stream.
    """
    dtype = x.dtype
    if upcast:
        x, y, gate = x.double(), y.double(), gate.double()
    h = (x + gate.unsqueeze(1) * y).to(dtype)
    return h, rmsnorm_modulate_ref(h, shift, scale, weight, eps, upcast=upcast)


# ---------------------------------------------------------------------------------------------------------------
# The `torch` backend: explicit forward with saved rstd, explicit backward
# ---------------------------------------------------------------------------------------------------------------


def _normalize(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """x̂ and rstd of x (B, T, D) in the compute dtype."""
    xc = x.to(compute_dtype(x.dtype))
    rstd = torch.rsqrt(xc.square().mean(dim=-1) + eps)
    return xc * rstd.unsqueeze(-1), rstd


def _modulate(xhat: Tensor, weight: Optional[Tensor], shift: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    cd = xhat.dtype
    normed = xhat * weight.to(cd) if weight is not None else xhat
    return (normed * (1 + scale.to(cd).unsqueeze(1)) + shift.to(cd).unsqueeze(1)).to(dtype)


def rmsnorm_modulate_fwd_torch(
    x: Tensor, weight: Optional[Tensor], shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """-> out (B, T, D) in x's dtype, rstd (B, T) in the compute dtype."""
    xhat, rstd = _normalize(x, eps)
    return _modulate(xhat, weight, shift, scale, x.dtype), rstd


def gated_residual_rmsnorm_modulate_fwd_torch(
    x: Tensor, y: Tensor, gate: Tensor, weight: Optional[Tensor], shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """-> h, out (B, T, D) in x's dtype, rstd (B, T) of h."""
    cd = compute_dtype(x.dtype)
    h = (x.to(cd) + gate.to(cd).unsqueeze(1) * y.to(cd)).to(x.dtype)
    xhat, rstd = _normalize(h, eps)
    return h, _modulate(xhat, weight, shift, scale, x.dtype), rstd


def _rmsnorm_modulate_bwd_math(
    dout: Tensor, x: Tensor, weight: Optional[Tensor], scale: Tensor, rstd: Tensor
) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """dx, dweight (or None), dshift, dscale in the compute dtype.

    With x̂ = x·rstd, n = x̂·w, g = dout·(1 + scale) (the gradient of n) and gx = g·w (the gradient of x̂):
        dx = rstd·(gx − x̂·mean_D(gx·x̂)),  dweight = Σ_{b,t} g·x̂,
        dshift = Σ_t dout,  dscale = Σ_t dout·n.
    """
    cd = compute_dtype(x.dtype)
    dout = dout.to(cd)
    rstd = rstd.to(cd).unsqueeze(-1)
    xhat = x.to(cd) * rstd
    g = dout * (1 + scale.to(cd).unsqueeze(1))
    if weight is None:
        gx, normed, dweight = g, xhat, None
    else:
        w = weight.to(cd)
        gx, normed, dweight = g * w, xhat * w, (g * xhat).sum(dim=(0, 1))
    dx = rstd * (gx - xhat * (gx * xhat).mean(dim=-1, keepdim=True))
    return dx, dweight, dout.sum(dim=1), (dout * normed).sum(dim=1)


def rmsnorm_modulate_bwd_torch(
    dout: Tensor, x: Tensor, weight: Optional[Tensor], scale: Tensor, rstd: Tensor
) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """Gradients of out = RMSNorm(x)·w·(1 + scale) + shift (formulas in `_rmsnorm_modulate_bwd_math`).

    -> dx (B, T, D) in x's dtype; dweight (D,) (None without weight), dshift, dscale (B, D) in the compute dtype.
    """
    dx, dweight, dshift, dscale = _rmsnorm_modulate_bwd_math(dout, x, weight, scale, rstd)
    return dx.to(x.dtype), dweight, dshift, dscale


def gated_residual_rmsnorm_modulate_bwd_torch(
    dout: Tensor, dh_in: Optional[Tensor], h: Tensor, y: Tensor, gate: Tensor, weight: Optional[Tensor],
    scale: Tensor, rstd: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Tensor, Tensor]:
    """Gradients of (h, out) = (x + gate·y, RMSNorm(h)·w·(1 + scale) + shift); dh_in is the upstream gradient of h.

    dh = (RMSNorm-modulate backward of dout) + dh_in; dx = dh, dy = gate·dh, dgate = Σ_t dh·y.
    -> dx, dy (B, T, D) in h's / y's dtype; dgate (B, D), dweight (D,) or None, dshift, dscale (B, D) in the
    compute dtype.
    """
    cd = compute_dtype(h.dtype)
    dh, dweight, dshift, dscale = _rmsnorm_modulate_bwd_math(dout, h, weight, scale, rstd)
    if dh_in is not None:
        dh = dh + dh_in.to(cd)
    dy = gate.to(cd).unsqueeze(1) * dh
    dgate = (dh * y.to(cd)).sum(dim=1)
    return dh.to(h.dtype), dy.to(y.dtype), dgate, dweight, dshift, dscale
