"""The RMSNorm + modulate ops as `torch.library` custom ops, with autograd, fake kernels and backend dispatch.

Registered ops (namespace `coredi`), mirroring the LayerNorm ones (see `layernorm_modulate.op` for why these are
opaque `custom_op`s rather than `triton_op`s):
    rmsnorm_modulate_fwd(x, weight?, shift, scale, eps) -> (out, rstd)
    rmsnorm_modulate_bwd(dout, x, weight?, scale, rstd) -> (dx, dweight, dshift, dscale)
    gated_residual_rmsnorm_modulate_fwd(x, y, gate, weight?, shift, scale, eps) -> (h, out, rstd)
    gated_residual_rmsnorm_modulate_bwd(dout, dh_in?, h, y, gate, weight?, scale, rstd)
        -> (dx, dy, dgate, dweight, dshift, dscale)
`weight` is the RMSNorm's (D,) weight or None. A `_bwd` op called without a weight returns an empty (0,) dweight
(custom ops cannot return None). Gradients of the (B, D) / (D,) parameters come back fp32 (float64 for float64
inputs) and are cast to the parameters' dtypes by the autograd formula. Double backward is not supported.
"""
from typing import Optional

import torch
from torch import Tensor

from .._utils import has_triton
from ..backend import select_backend
from ..layernorm_modulate.op import _check_float_tensor, _check_inputs, _param_grad_like, _stats_like, _triton_reasons
from . import reference
from .reference import compute_dtype

if has_triton():
    from . import _kernels
else:  # CPU-only torch builds without triton: only the PyTorch backend exists
    _kernels = None


def _check_weight(op: str, x: Tensor, weight: Optional[Tensor]) -> None:
    if weight is None:
        return
    _check_float_tensor(f"{op}: weight", weight)
    if tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"{op}: weight must have shape (D,) = ({x.shape[-1]},), got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"{op}: weight is on {weight.device} but x is on {x.device}")


def _use_triton(op: str, x: Tensor, weight: Optional[Tensor], *params: Tensor) -> bool:
    tensors = params if weight is None else (*params, weight)
    return select_backend(op, x.device, _triton_reasons(x, *tensors)) == "triton"


def _weight_grad(dweight: Optional[Tensor], x: Tensor) -> Tensor:
    """The op's dweight output: the gradient, or an empty (0,) tensor when there is no weight."""
    return dweight if dweight is not None else x.new_empty((0,), dtype=compute_dtype(x.dtype))


def _weight_grad_like(weight: Optional[Tensor], x: Tensor) -> Tensor:
    shape = (0,) if weight is None else weight.shape
    return x.new_empty(shape, dtype=compute_dtype(x.dtype))


def _to_param_dtype(grad: Tensor, weight: Optional[Tensor]) -> Optional[Tensor]:
    return None if weight is None else grad.to(weight.dtype)


# ---------------------------------------------------------------------------------------------------------------
# RMSNorm + modulate
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("coredi::rmsnorm_modulate_fwd", mutates_args=())
def rmsnorm_modulate_fwd(
    x: Tensor, weight: Optional[Tensor], shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """out = RMSNorm(x)·weight·(1 + scale) + shift. x (B, T, D), shift/scale (B, D) -> out (B, T, D), rstd (B, T)."""
    _check_inputs("rmsnorm_modulate", x, eps, shift=shift, scale=scale)
    _check_weight("rmsnorm_modulate", x, weight)
    x = x.contiguous()  # outputs are contiguous on both backends, as the fake kernel promises
    if _use_triton("rmsnorm_modulate", x, weight, shift, scale):
        return _kernels.rmsnorm_modulate_fwd(x, weight, shift, scale, eps)
    return reference.rmsnorm_modulate_fwd_torch(x, weight, shift, scale, eps)


@rmsnorm_modulate_fwd.register_fake
def _(x, weight, shift, scale, eps):
    _check_inputs("rmsnorm_modulate", x, eps, shift=shift, scale=scale)
    _check_weight("rmsnorm_modulate", x, weight)
    return x.new_empty(x.shape), _stats_like(x)


@torch.library.custom_op("coredi::rmsnorm_modulate_bwd", mutates_args=())
def rmsnorm_modulate_bwd(
    dout: Tensor, x: Tensor, weight: Optional[Tensor], scale: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> dx (B, T, D) in x's dtype; dweight (D,) or (0,), dshift, dscale (B, D) fp32 (float64 for float64 x)."""
    dout, x = dout.contiguous(), x.contiguous()
    if _use_triton("rmsnorm_modulate_bwd", x, weight, scale):
        dx, dweight, dshift, dscale = _kernels.rmsnorm_modulate_bwd(dout, x, weight, scale, rstd)
    else:
        dx, dweight, dshift, dscale = reference.rmsnorm_modulate_bwd_torch(dout, x, weight, scale, rstd)
    return dx, _weight_grad(dweight, x), dshift, dscale


@rmsnorm_modulate_bwd.register_fake
def _(dout, x, weight, scale, rstd):
    grad = _param_grad_like(scale, x)
    return x.new_empty(x.shape), _weight_grad_like(weight, x), grad, grad.new_empty(grad.shape)


def _rmsnorm_modulate_setup(ctx, inputs, output):
    x, weight, shift, scale, _ = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, scale, rstd)
    ctx.shift_dtype = shift.dtype
    ctx.mark_non_differentiable(rstd)


def _rmsnorm_modulate_backward(ctx, dout, _drstd):
    x, weight, scale, rstd = ctx.saved_tensors
    dx, dweight, dshift, dscale = torch.ops.coredi.rmsnorm_modulate_bwd(dout, x, weight, scale, rstd)
    return dx, _to_param_dtype(dweight, weight), dshift.to(ctx.shift_dtype), dscale.to(scale.dtype), None


rmsnorm_modulate_fwd.register_autograd(_rmsnorm_modulate_backward, setup_context=_rmsnorm_modulate_setup)


# ---------------------------------------------------------------------------------------------------------------
# Gated residual + RMSNorm + modulate
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("coredi::gated_residual_rmsnorm_modulate_fwd", mutates_args=())
def gated_residual_rmsnorm_modulate_fwd(
    x: Tensor, y: Tensor, gate: Tensor, weight: Optional[Tensor], shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """h = x + gate·y, out = RMSNorm(h)·weight·(1 + scale) + shift -> h, out (B, T, D) in x's dtype, rstd (B, T)."""
    _check_inputs("gated_residual_rmsnorm_modulate", x, eps, y=y, gate=gate, shift=shift, scale=scale)
    _check_weight("gated_residual_rmsnorm_modulate", x, weight)
    x, y = x.contiguous(), y.contiguous()
    if _use_triton("gated_residual_rmsnorm_modulate", x, weight, y, gate, shift, scale):
        return _kernels.gated_residual_rmsnorm_modulate_fwd(x, y, gate, weight, shift, scale, eps)
    return reference.gated_residual_rmsnorm_modulate_fwd_torch(x, y, gate, weight, shift, scale, eps)


@gated_residual_rmsnorm_modulate_fwd.register_fake
def _(x, y, gate, weight, shift, scale, eps):
    _check_inputs("gated_residual_rmsnorm_modulate", x, eps, y=y, gate=gate, shift=shift, scale=scale)
    _check_weight("gated_residual_rmsnorm_modulate", x, weight)
    return x.new_empty(x.shape), x.new_empty(x.shape), _stats_like(x)


@torch.library.custom_op("coredi::gated_residual_rmsnorm_modulate_bwd", mutates_args=())
def gated_residual_rmsnorm_modulate_bwd(
    dout: Tensor, dh_in: Optional[Tensor], h: Tensor, y: Tensor, gate: Tensor, weight: Optional[Tensor],
    scale: Tensor, rstd: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dh_in: upstream gradient of h, or None. -> dx (= dh), dy (B, T, D); dgate (B, D), dweight (D,) or (0,),
    dshift, dscale (B, D), all fp32."""
    dout, h, y = dout.contiguous(), h.contiguous(), y.contiguous()
    dh_in = dh_in.contiguous() if dh_in is not None else None
    args = (dout, dh_in, h, y, gate, weight, scale, rstd)
    if _use_triton("gated_residual_rmsnorm_modulate_bwd", h, weight, y, gate, scale):
        dx, dy, dgate, dweight, dshift, dscale = _kernels.gated_residual_rmsnorm_modulate_bwd(*args)
    else:
        dx, dy, dgate, dweight, dshift, dscale = reference.gated_residual_rmsnorm_modulate_bwd_torch(*args)
    return dx, dy, dgate, _weight_grad(dweight, h), dshift, dscale


@gated_residual_rmsnorm_modulate_bwd.register_fake
def _(dout, dh_in, h, y, gate, weight, scale, rstd):
    grad = _param_grad_like(scale, h)
    return (h.new_empty(h.shape), y.new_empty(y.shape), grad, _weight_grad_like(weight, h),
            grad.new_empty(grad.shape), grad.new_empty(grad.shape))


def _gated_setup(ctx, inputs, output):
    _, y, gate, weight, shift, scale, _ = inputs
    h, _, rstd = output
    ctx.save_for_backward(h, y, gate, weight, scale, rstd)
    ctx.shift_dtype = shift.dtype
    ctx.mark_non_differentiable(rstd)
    # An unused h or out gets None instead of a materialized zero tensor (saves a (B, T, D) read).
    ctx.set_materialize_grads(False)


def _gated_backward(ctx, dh_in, dout, _drstd):
    h, y, gate, weight, scale, rstd = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(h)
    dx, dy, dgate, dweight, dshift, dscale = torch.ops.coredi.gated_residual_rmsnorm_modulate_bwd(
        dout, dh_in, h, y, gate, weight, scale, rstd
    )
    return (dx, dy, dgate.to(gate.dtype), _to_param_dtype(dweight, weight), dshift.to(ctx.shift_dtype),
            dscale.to(scale.dtype), None)


gated_residual_rmsnorm_modulate_fwd.register_autograd(_gated_backward, setup_context=_gated_setup)


# ---------------------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------------------


def rmsnorm_modulate(
    x: Tensor, shift: Tensor, scale: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6
) -> Tensor:
    """RMSNorm (optionally with a weight), then adaLN modulation: RMSNorm(x)·weight·(1 + scale) + shift, per sample.

    Args:
        x: (B, T, D) fp16, bf16 or fp32 (float64 runs on the PyTorch backend only). T may include prefix tokens
            (JiT's in-context class tokens): the modulation is per sample, not per token.
        shift, scale: (B, D), one modulation row per sample (any float dtype; any row stride).
        weight: (D,) RMSNorm weight (JiT's `norm.weight`), or None for a parameter-free RMSNorm.
        eps: added to mean(x²).
    Returns:
        (B, T, D) in x's dtype. rstd and all arithmetic are fp32.
    """
    return torch.ops.coredi.rmsnorm_modulate_fwd(x, weight, shift, scale, eps)[0]


def gated_residual_rmsnorm_modulate(
    x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, weight: Optional[Tensor] = None,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """The gated residual add of one JiT sub-block fused with the modulated RMSNorm of the next.

    h = x + gate·y (the new residual stream, rounded to x's dtype), out = RMSNorm(h)·weight·(1 + scale) + shift.

    Args:
        x: (B, T, D) residual stream. y: (B, T, D) branch output; its dtype may differ from x's (autocast).
        gate, shift, scale: (B, D), one row per sample. weight: (D,) or None.
    Returns:
        h (B, T, D) and out (B, T, D), both in x's dtype.
    """
    h, out, _ = torch.ops.coredi.gated_residual_rmsnorm_modulate_fwd(x, y, gate, weight, shift, scale, eps)
    return h, out
