"""Pure-PyTorch LayerNorm / RMSNorm + adaLN modulate: the oracle for tests and the CPU backend of the ops.

Two kinds of functions live here, each for both norms:

* `*_ref` — the plain formula, differentiable by autograd, computed in the input dtype or upcast. Tests take
  their gradients with `torch.autograd.grad` in float64.
* `*_fwd_torch` / `*_bwd_torch` — the same contracts as the Triton launchers in `_kernels` (statistics out,
  hand-written backward in), used by the `torch` backend. They compute in float32 (float64 for float64 inputs).

Shapes: x, y (B, T, D); shift, scale, gate (B, D), one row per sample; weight (D,) or None; mean, rstd (B, T).
LayerNorm has no affine parameters (DiT's norm1/norm2 use `elementwise_affine=False`): x̂ = (x − mean)·rstd with
rstd = 1/sqrt(var + eps). RMSNorm: x̂ = x·rstd with rstd = 1/sqrt(mean_D(x²) + eps); the normalized row is
n = x̂·weight (JiT's RMSNorm has a learned weight, initialized to ones). Both ops return n·(1 + scale) + shift.
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


def _norm(x: Tensor, weight: Optional[Tensor], eps: float, is_rms_norm: bool) -> Tensor:
    if is_rms_norm:
        normed = x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)
    else:
        mean = x.mean(dim=-1, keepdim=True)
        var = (x - mean).square().mean(dim=-1, keepdim=True)  # biased, as in LayerNorm
        normed = (x - mean) * torch.rsqrt(var + eps)
    return normed * weight if weight is not None else normed


def norm_modulate_ref(
    x: Tensor, shift: Tensor, scale: Tensor, weight: Optional[Tensor], eps: float, upcast: bool, *,
    is_rms_norm: bool,
) -> Tensor:
    """norm(x)·weight·(1 + scale) + shift per sample -> (B, T, D) in x's dtype.

    upcast=True computes in float64 (the test oracle); else in the inputs' dtype like an eager model.
    """
    dtype = x.dtype
    if upcast:
        x, shift, scale = x.double(), shift.double(), scale.double()
        weight = weight.double() if weight is not None else None
    out = _norm(x, weight, eps, is_rms_norm) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    return out.to(dtype)


def gated_residual_norm_modulate_ref(
    x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, weight: Optional[Tensor], eps: float,
    upcast: bool, *, is_rms_norm: bool,
) -> tuple[Tensor, Tensor]:
    """h = x + gate·y, out = norm(h)·weight·(1 + scale) + shift -> (h, out), both in x's dtype.

    h is rounded to x's dtype before it is normalized, as an unfused model stores the residual stream.
    """
    dtype = x.dtype
    if upcast:
        x, y, gate = x.double(), y.double(), gate.double()
    h = (x + gate.unsqueeze(1) * y).to(dtype)
    return h, norm_modulate_ref(h, shift, scale, weight, eps, upcast, is_rms_norm=is_rms_norm)


def layernorm_modulate_ref(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6, upcast: bool = False) -> Tensor:
    """LN(x)·(1 + scale) + shift per sample. x (B, T, D), shift/scale (B, D) -> (B, T, D) in x's dtype."""
    return norm_modulate_ref(x, shift, scale, None, eps, upcast, is_rms_norm=False)


def gated_residual_layernorm_modulate_ref(
    x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6, upcast: bool = False
) -> tuple[Tensor, Tensor]:
    """h = x + gate·y, out = LN(h)·(1 + scale) + shift. x, y (B, T, D), gate/shift/scale (B, D) -> (h, out)."""
    return gated_residual_norm_modulate_ref(x, y, gate, shift, scale, None, eps, upcast, is_rms_norm=False)


def rmsnorm_modulate_ref(
    x: Tensor, shift: Tensor, scale: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6, upcast: bool = False
) -> Tensor:
    """RMSNorm(x)·weight·(1 + scale) + shift per sample. x (B, T, D), shift/scale (B, D), weight (D,) or None."""
    return norm_modulate_ref(x, shift, scale, weight, eps, upcast, is_rms_norm=True)


def gated_residual_rmsnorm_modulate_ref(
    x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, weight: Optional[Tensor] = None,
    eps: float = 1e-6, upcast: bool = False,
) -> tuple[Tensor, Tensor]:
    """h = x + gate·y, out = RMSNorm(h)·weight·(1 + scale) + shift -> (h, out), both in x's dtype."""
    return gated_residual_norm_modulate_ref(x, y, gate, shift, scale, weight, eps, upcast, is_rms_norm=True)


# ---------------------------------------------------------------------------------------------------------------
# The `torch` backend: explicit forward with saved statistics, explicit backward
# ---------------------------------------------------------------------------------------------------------------


def norm_modulate_fwd_torch(
    x: Tensor, y: Optional[Tensor], gate: Optional[Tensor], weight: Optional[Tensor], shift: Tensor, scale: Tensor,
    eps: float, *, is_rms_norm: bool,
) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
    """Both norms, with or without the residual (y, gate both None: without; h is then x).

    -> h, out (B, T, D) in x's dtype; mean (None for RMSNorm), rstd (B, T) in the compute dtype.
    """
    cd = compute_dtype(x.dtype)
    h = x if y is None else (x.to(cd) + gate.to(cd).unsqueeze(1) * y.to(cd)).to(x.dtype)
    hc = h.to(cd)
    if is_rms_norm:
        mean, rstd = None, torch.rsqrt(hc.square().mean(dim=-1) + eps)
        xhat = hc * rstd.unsqueeze(-1)
    else:
        var, mean = torch.var_mean(hc, dim=-1, correction=0)
        rstd = torch.rsqrt(var + eps)
        xhat = (hc - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    normed = xhat * weight.to(cd) if weight is not None else xhat
    out = (normed * (1 + scale.to(cd).unsqueeze(1)) + shift.to(cd).unsqueeze(1)).to(x.dtype)
    return h, out, mean, rstd


def norm_modulate_bwd_torch(
    dout: Tensor, dh_in: Optional[Tensor], x: Tensor, y: Optional[Tensor], gate: Optional[Tensor],
    weight: Optional[Tensor], scale: Tensor, mean: Optional[Tensor], rstd: Tensor,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Gradients of (h, out) = (x + gate·y, norm(h)·w·(1 + scale) + shift); mean None: RMSNorm; y, gate None: no
    residual (x is then h itself); dh_in is the upstream gradient of h, or None.

    With x̂ the normalized row, n = x̂·w, g = dout·(1 + scale) (the gradient of n) and gx = g·w (the gradient of x̂):
        dh = rstd·(gx − mean_D(gx) − x̂·mean_D(gx·x̂)) + dh_in    (RMSNorm has no mean_D(gx) term)
        dx = dh,  dy = gate·dh,  dgate = Σ_t dh·y,  dshift = Σ_t dout,  dscale = Σ_t dout·n,  dweight = Σ_{b,t} g·x̂.
    -> dx (B, T, D) in x's dtype, dy (B, T, D) in y's dtype (dx itself without the residual), and the parameter
    gradients by name in the compute dtype: shift, scale (B, D), gate (B, D) with the residual, weight (D,) with a
    weight.
    """
    cd = compute_dtype(x.dtype)
    dout = dout.to(cd)
    rstd = rstd.to(cd).unsqueeze(-1)
    xhat = x.to(cd) * rstd if mean is None else (x.to(cd) - mean.to(cd).unsqueeze(-1)) * rstd
    g = dout * (1 + scale.to(cd).unsqueeze(1))
    gx, normed = (g, xhat) if weight is None else (g * weight.to(cd), xhat * weight.to(cd))
    if mean is None:
        dh = rstd * (gx - xhat * (gx * xhat).mean(dim=-1, keepdim=True))
    else:
        dh = rstd * (gx - gx.mean(dim=-1, keepdim=True) - xhat * (gx * xhat).mean(dim=-1, keepdim=True))
    if dh_in is not None:
        dh = dh + dh_in.to(cd)

    grads = {"shift": dout.sum(dim=1), "scale": (dout * normed).sum(dim=1)}
    if weight is not None:
        grads["weight"] = (g * xhat).sum(dim=(0, 1))
    dx = dh.to(x.dtype)
    if y is None:
        return dx, dx, grads
    grads["gate"] = (dh * y.to(cd)).sum(dim=1)
    return dx, (gate.to(cd).unsqueeze(1) * dh).to(y.dtype), grads


# The contracts of the `coredi::*` ops, as in `_kernels`.


def layernorm_modulate_fwd_torch(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """-> out (B, T, D) in x's dtype, mean (B, T), rstd (B, T) in the compute dtype."""
    _, out, mean, rstd = norm_modulate_fwd_torch(x, None, None, None, shift, scale, eps, is_rms_norm=False)
    return out, mean, rstd


def gated_residual_layernorm_modulate_fwd_torch(
    x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> h, out (B, T, D) in x's dtype, mean, rstd (B, T) of h."""
    return norm_modulate_fwd_torch(x, y, gate, None, shift, scale, eps, is_rms_norm=False)


def rmsnorm_modulate_fwd_torch(
    x: Tensor, weight: Optional[Tensor], shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """-> out (B, T, D) in x's dtype, rstd (B, T) in the compute dtype."""
    _, out, _, rstd = norm_modulate_fwd_torch(x, None, None, weight, shift, scale, eps, is_rms_norm=True)
    return out, rstd


def gated_residual_rmsnorm_modulate_fwd_torch(
    x: Tensor, y: Tensor, gate: Tensor, weight: Optional[Tensor], shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """-> h, out (B, T, D) in x's dtype, rstd (B, T) of h."""
    h, out, _, rstd = norm_modulate_fwd_torch(x, y, gate, weight, shift, scale, eps, is_rms_norm=True)
    return h, out, rstd


def layernorm_modulate_bwd_torch(
    dout: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """-> dx (B, T, D) in x's dtype, dshift, dscale (B, D) in the compute dtype."""
    dx, _, grads = norm_modulate_bwd_torch(dout, None, x, None, None, None, scale, mean, rstd)
    return dx, grads["shift"], grads["scale"]


def gated_residual_layernorm_modulate_bwd_torch(
    dout: Tensor, dh_in: Optional[Tensor], h: Tensor, y: Tensor, gate: Tensor, scale: Tensor, mean: Tensor,
    rstd: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> dx, dy (B, T, D) in h's / y's dtype; dgate, dshift, dscale (B, D) in the compute dtype."""
    dx, dy, grads = norm_modulate_bwd_torch(dout, dh_in, h, y, gate, None, scale, mean, rstd)
    return dx, dy, grads["gate"], grads["shift"], grads["scale"]


def rmsnorm_modulate_bwd_torch(
    dout: Tensor, x: Tensor, weight: Optional[Tensor], scale: Tensor, rstd: Tensor
) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """-> dx (B, T, D) in x's dtype; dweight (D,) (None without weight), dshift, dscale (B, D) in the compute dtype."""
    dx, _, grads = norm_modulate_bwd_torch(dout, None, x, None, None, weight, scale, None, rstd)
    return dx, grads.get("weight"), grads["shift"], grads["scale"]


def gated_residual_rmsnorm_modulate_bwd_torch(
    dout: Tensor, dh_in: Optional[Tensor], h: Tensor, y: Tensor, gate: Tensor, weight: Optional[Tensor],
    scale: Tensor, rstd: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Tensor, Tensor]:
    """-> dx, dy (B, T, D) in h's / y's dtype; dgate (B, D), dweight (D,) or None, dshift, dscale (B, D) in the
    compute dtype."""
    dx, dy, grads = norm_modulate_bwd_torch(dout, dh_in, h, y, gate, weight, scale, None, rstd)
    return dx, dy, grads["gate"], grads.get("weight"), grads["shift"], grads["scale"]
