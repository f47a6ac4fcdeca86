"""Pure-PyTorch qk-norm + RoPE: the oracle for tests and the CPU backend of the op.

JiT's attention prologue on the packed projection qkv (B, T, 3, H, Dh):

    q, k, v = qkv.unbind(2)                               each (B, T, H, Dh)
    q̂ = q·rstd_q·w_q,   rstd_q = 1/sqrt(mean_Dh(q²) + eps)    (RMSNorm over each head's Dh channels; k alike)
    q' = R_t q̂                                            (RoPE: rotate channel pairs by the angles of token t)

The LayerNorm form (`layer_norm=True`: the qk-norm of timm's Attention, REPA, LightningDiT's LayerNorm models)
centres each head row first and adds a bias: q̂ = (q − mean_Dh(q))·rstd·w_q + b_q, rstd from the centred row.

R_t rotates each consecutive channel pair (2j, 2j + 1) by the angle whose cos/sin are cos[t, j], sin[t, j]:
(a, b) -> (a·cos − b·sin, b·cos + a·sin) — the interleaved layout of `coredi_fast.models.rope` (JiT's). Prefix
tokens carry cos = 1, sin = 0 in the tables, so the op needs no prefix count. v passes through unchanged.

Two kinds of functions live here:

* `qk_norm_rope_ref` — the plain formula, differentiable by autograd, computed in float32 (float64 for float64
  inputs). Tests take its float64 gradients with `torch.autograd.grad`.
* `qk_norm_rope_fwd_torch` / `qk_norm_rope_bwd_torch` — the contracts of the Triton launchers in `_kernels` (same
  output layouts, hand-written backward), used by the `torch` backend.

Output layout (every function here and the kernels): q, k, v are (B, H, T, Dh) tensors laid out in memory as
(B, T, H, Dh), i.e. `buffer.transpose(1, 2)` of a contiguous (B, T, H, Dh) buffer — what an eager JiT hands to
attention (see `_kernels` for why).
"""
from typing import Optional

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _norm(x: Tensor, weight: Optional[Tensor], eps: float, bias: Optional[Tensor] = None,
          layer_norm: bool = False) -> Tensor:
    """x (..., Dh) in the compute dtype -> x·rstd·weight (+ bias); layer_norm: x centred first."""
    if layer_norm:
        x = x - x.mean(dim=-1, keepdim=True)
    normed = x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        normed = normed * weight.to(x.dtype)
    return normed + bias.to(x.dtype) if bias is not None else normed


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False) -> Tensor:
    """Rotate the channel pairs of x (B, T, ..., Dh) by the angles of cos/sin (T, Dh/2) (by minus them: inverse)."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)                        # (B, T, ..., Dh/2) each
    shape = (cos.shape[0],) + (1,) * (x.dim() - 3) + (cos.shape[1],)      # (T, 1.., Dh/2): shared by heads
    cos, sin = cos.to(x.dtype).reshape(shape), sin.to(x.dtype).reshape(shape)
    if inverse:
        sin = -sin
    return torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)


def _heads_first(x: Tensor) -> Tensor:
    """A (B, T, H, Dh) tensor as the (B, H, T, Dh) view attention takes."""
    return x.transpose(1, 2)


def _op_layout(x: Tensor) -> Tensor:
    """A (B, H, T, Dh) tensor in the op's layout (a no-op when it already is)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def empty_heads_first(qkv: Tensor) -> Tensor:
    """An uninitialized (B, H, T, Dh) tensor in qkv's dtype laid out (B, T, H, Dh) in memory: the op's outputs."""
    B, T, _, H, Dh = qkv.shape
    return qkv.new_empty_strided((B, H, T, Dh), (T * H * Dh, Dh, H * Dh, 1))


# ---------------------------------------------------------------------------------------------------------------
# Differentiable reference
# ---------------------------------------------------------------------------------------------------------------


def qk_norm_rope_ref(
    qkv: Tensor, q_weight: Optional[Tensor], k_weight: Optional[Tensor], cos: Optional[Tensor],
    sin: Optional[Tensor], eps: float = 1e-6, *, q_bias: Optional[Tensor] = None, k_bias: Optional[Tensor] = None,
    layer_norm: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """qkv (B, T, 3, H, Dh); weights (Dh,) or None; cos, sin (T, Dh/2) or both None (no rotation); layer_norm: the
    LayerNorm form with biases (Dh,) or None.

    -> q, k, v, each (B, H, T, Dh) in qkv's dtype (v is a view of qkv). Statistics and rotation run in float32
    (float64 for float64 qkv), with one rounding to qkv's dtype at the end.
    """
    cd = compute_dtype(qkv.dtype)
    q, k, v = qkv.unbind(2)
    outputs = []
    for x, weight, bias in ((q, q_weight, q_bias), (k, k_weight, k_bias)):
        y = _norm(x.to(cd), weight, eps, bias, layer_norm)
        if cos is not None:
            y = _rotate(y, cos, sin)
        outputs.append(_heads_first(y.to(qkv.dtype)))
    return outputs[0], outputs[1], _heads_first(v)


# ---------------------------------------------------------------------------------------------------------------
# The `torch` backend: the op's contract, explicit backward
# ---------------------------------------------------------------------------------------------------------------


def qk_norm_rope_fwd_torch(
    qkv: Tensor, q_weight: Optional[Tensor], k_weight: Optional[Tensor], cos: Optional[Tensor],
    sin: Optional[Tensor], eps: float, *, q_bias: Optional[Tensor] = None, k_bias: Optional[Tensor] = None,
    layer_norm: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> q, k, v (B, H, T, Dh) in qkv's dtype, each a transposed view of its own contiguous (B, T, H, Dh) buffer
    (v a copy: the op's outputs may not alias its input)."""
    q, k, _ = qk_norm_rope_ref(qkv, q_weight, k_weight, cos, sin, eps, q_bias=q_bias, k_bias=k_bias,
                               layer_norm=layer_norm)
    # clone, not contiguous(): an empty v counts as contiguous and would come back as a view of qkv
    return _op_layout(q), _op_layout(k), _heads_first(qkv[:, :, 2].clone(memory_format=torch.contiguous_format))


def qk_norm_rope_bwd_torch(
    dq: Tensor, dk: Tensor, dv: Tensor, qkv: Tensor, q_weight: Optional[Tensor], k_weight: Optional[Tensor],
    cos: Optional[Tensor], sin: Optional[Tensor], eps: float,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Gradients of (q, k, v) = qk_norm_rope(qkv, ...) given dq, dk, dv (B, H, T, Dh), any strides.

    Per head row x (Dh) with x̂ = x·rstd, n = x̂·w, y = R n:
        dn = Rᵀ dy (rotation by minus the angle),   gx = dn·w
        dx = rstd·(gx − x̂·mean_Dh(gx·x̂)),   dw = Σ_{b,t,h} dn·x̂,   dv passes through.
    rstd is recomputed from qkv (cheaper than storing it: the backward reads the whole row anyway).
    -> dqkv (B, T, 3, H, Dh) in qkv's dtype; dq_weight, dk_weight (Dh,) in the compute dtype (None without weight).
    """
    dqkv, dq_weight, dk_weight, _, _ = qk_layernorm_rope_bwd_torch(dq, dk, dv, qkv, q_weight, None, k_weight, None,
                                                                   cos, sin, eps, layer_norm=False)
    return dqkv, dq_weight, dk_weight


def qk_layernorm_rope_bwd_torch(
    dq: Tensor, dk: Tensor, dv: Tensor, qkv: Tensor, q_weight: Optional[Tensor], q_bias: Optional[Tensor],
    k_weight: Optional[Tensor], k_bias: Optional[Tensor], cos: Optional[Tensor], sin: Optional[Tensor], eps: float,
    layer_norm: bool = True,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """The backward of the LayerNorm form (layer_norm=False: the RMSNorm one, without biases): with x centred,
    dx = rstd·(gx − mean_Dh(gx) − x̂·mean_Dh(gx·x̂)) and db = Σ_{b,t,h} dn. -> dqkv (B, T, 3, H, Dh) in qkv's
    dtype; dq_weight, dk_weight, dq_bias, dk_bias (Dh,) in the compute dtype (None where there is none)."""
    cd = compute_dtype(qkv.dtype)
    x = qkv[:, :, :2].to(cd)                                                    # (B, T, 2, H, Dh)
    if layer_norm:
        x = x - x.mean(dim=-1, keepdim=True)
    dy = torch.stack((dq.transpose(1, 2), dk.transpose(1, 2)), dim=2).to(cd)  # (B, T, 2, H, Dh)
    rstd = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)
    xhat = x * rstd
    dn = _rotate(dy, cos, sin, inverse=True) if cos is not None else dy
    ones = x.new_ones(x.shape[-1])
    w = torch.stack([ones if p is None else p.to(cd) for p in (q_weight, k_weight)])  # (2, Dh)
    gx = dn * w[:, None, :]                                                     # w broadcast over (2, H, Dh)
    centred_gx = gx - gx.mean(dim=-1, keepdim=True) if layer_norm else gx
    dx = rstd * (centred_gx - xhat * (gx * xhat).mean(dim=-1, keepdim=True))
    dqkv = torch.cat((dx.to(qkv.dtype), dv.transpose(1, 2).unsqueeze(2).to(qkv.dtype)), dim=2)
    dw, db = (dn * xhat).sum(dim=(0, 1, 3)), dn.sum(dim=(0, 1, 3))             # (2, Dh) each
    # clones: the op's outputs may not alias each other
    return (dqkv,) + tuple(g.clone() if p is not None else None
                           for g, p in ((dw[0], q_weight), (dw[1], k_weight), (db[0], q_bias), (db[1], k_bias)))
