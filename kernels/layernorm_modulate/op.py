"""The LayerNorm + modulate ops as `torch.library` custom ops, with autograd, fake kernels and backend dispatch.

Registered ops (namespace `coredi`):
    layernorm_modulate_fwd(x, shift, scale, eps) -> (out, mean, rstd)
    layernorm_modulate_bwd(dout, x, scale, mean, rstd) -> (dx, dshift, dscale)
    gated_residual_layernorm_modulate_fwd(x, y, gate, shift, scale, eps) -> (h, out, mean, rstd)
    gated_residual_layernorm_modulate_bwd(dout, dh_in, h, y, gate, scale, mean, rstd) -> (dx, dy, dgate, dshift, dscale)
The `_fwd` ops carry the autograd formula (through the `_bwd` ops); mean/rstd are non-differentiable outputs kept
for the backward. Parameter gradients from the `_bwd` ops are fp32 (float64 for float64 inputs) and are cast to
the parameters' dtype by the autograd formula. Double backward is not supported.

Why `custom_op` and not `triton_op`: `triton_op` registers its body as the fake kernel and is traced through by
torch.compile, which would fix the backend choice at trace time and, under TRITON_INTERPRET=1, run interpreted
kernels on fake tensors. As opaque custom ops, the ops pick their backend (`coredi_kernels.backend`) at every call,
behave the same under torch.compile, and the registration tested on CPU is the one that runs on the GPU.
"""
from typing import Optional

import torch
from torch import Tensor

from .._utils import MAX_TRITON_COLUMNS, TRITON_DTYPES, has_triton
from ..backend import select_backend
from . import reference

if has_triton():
    from . import _kernels
else:  # CPU-only torch builds without triton: only the PyTorch backend exists
    _kernels = None


# ---------------------------------------------------------------------------------------------------------------
# Input checks (they run in the real and the fake kernels, so torch.compile reports bad inputs at trace time)
# ---------------------------------------------------------------------------------------------------------------


def _check_float_tensor(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_inputs(op: str, x: Tensor, eps: float, y: Optional[Tensor] = None, **params: Tensor) -> None:
    """x (B, T, D); y of x's shape (any float dtype); every parameter (B, D); all on x's device."""
    _check_float_tensor(f"{op}: x", x)
    if x.dim() != 3 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have shape (B, T, D) with D > 0, got {tuple(x.shape)}")
    B, _, D = x.shape
    if y is not None:
        _check_float_tensor(f"{op}: y", y)
        if y.shape != x.shape:
            raise ValueError(f"{op}: y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
        if y.device != x.device:
            raise ValueError(f"{op}: y is on {y.device} but x is on {x.device}")
    for name, p in params.items():
        _check_float_tensor(f"{op}: {name}", p)
        if tuple(p.shape) != (B, D):
            raise ValueError(
                f"{op}: {name} must have shape (B, D) = {(B, D)} (one row per sample), got {tuple(p.shape)}"
            )
        if p.device != x.device:
            raise ValueError(f"{op}: {name} is on {p.device} but x is on {x.device}")
    if not eps > 0:
        raise ValueError(f"{op}: eps must be > 0, got {eps}")


def _triton_reasons(x: Tensor, *params: Tensor) -> list[str]:
    """This op's objections to running these inputs on the Triton kernels."""
    reasons = []
    if _kernels is None:
        reasons.append("the Triton kernels could not be imported")
    for t in (x, *params):
        if t.dtype not in TRITON_DTYPES:
            reasons.append(f"dtype {t.dtype} is not one of the kernels' dtypes {TRITON_DTYPES}")
            break
    if x.shape[-1] > MAX_TRITON_COLUMNS:
        reasons.append(f"D = {x.shape[-1]} > {MAX_TRITON_COLUMNS} columns does not fit a row in registers")
    return reasons


def _use_triton(op: str, x: Tensor, *params: Tensor) -> bool:
    return select_backend(op, x.device, _triton_reasons(x, *params)) == "triton"


def _stats_like(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[:2], dtype=reference.compute_dtype(x.dtype))


def _param_grad_like(p: Tensor, x: Tensor) -> Tensor:
    return p.new_empty(p.shape, dtype=reference.compute_dtype(x.dtype))


# ---------------------------------------------------------------------------------------------------------------
# LayerNorm + modulate
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("coredi::layernorm_modulate_fwd", mutates_args=())
def layernorm_modulate_fwd(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """out = LN(x)·(1 + scale) + shift. x (B, T, D), shift/scale (B, D) -> out (B, T, D), mean, rstd (B, T)."""
    _check_inputs("layernorm_modulate", x, eps, shift=shift, scale=scale)
    x = x.contiguous()  # outputs are contiguous on both backends, as the fake kernel promises
    if _use_triton("layernorm_modulate", x, shift, scale):
        return _kernels.layernorm_modulate_fwd(x, shift, scale, eps)
    return reference.layernorm_modulate_fwd_torch(x, shift, scale, eps)


@layernorm_modulate_fwd.register_fake
def _(x, shift, scale, eps):
    _check_inputs("layernorm_modulate", x, eps, shift=shift, scale=scale)
    return x.new_empty(x.shape), _stats_like(x), _stats_like(x)


@torch.library.custom_op("coredi::layernorm_modulate_bwd", mutates_args=())
def layernorm_modulate_bwd(
    dout: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """-> dx (B, T, D) in x's dtype, dshift, dscale (B, D) in fp32 (float64 for float64 x)."""
    dout, x = dout.contiguous(), x.contiguous()
    if _use_triton("layernorm_modulate_bwd", x, scale):
        return _kernels.layernorm_modulate_bwd(dout, x, scale, mean, rstd)
    return reference.layernorm_modulate_bwd_torch(dout, x, scale, mean, rstd)


@layernorm_modulate_bwd.register_fake
def _(dout, x, scale, mean, rstd):
    return x.new_empty(x.shape), _param_grad_like(scale, x), _param_grad_like(scale, x)


def _layernorm_modulate_setup(ctx, inputs, output):
    x, shift, scale, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, scale, mean, rstd)
    ctx.shift_dtype = shift.dtype
    ctx.mark_non_differentiable(mean, rstd)


def _layernorm_modulate_backward(ctx, dout, _dmean, _drstd):
    x, scale, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale = torch.ops.coredi.layernorm_modulate_bwd(dout, x, scale, mean, rstd)
    return dx, dshift.to(ctx.shift_dtype), dscale.to(scale.dtype), None


layernorm_modulate_fwd.register_autograd(_layernorm_modulate_backward, setup_context=_layernorm_modulate_setup)


# ---------------------------------------------------------------------------------------------------------------
# Gated residual + LayerNorm + modulate
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("coredi::gated_residual_layernorm_modulate_fwd", mutates_args=())
def gated_residual_layernorm_modulate_fwd(
    x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """h = x + gate·y, out = LN(h)·(1 + scale) + shift. -> h, out (B, T, D) in x's dtype, mean, rstd (B, T) of h."""
    _check_inputs("gated_residual_layernorm_modulate", x, eps, y=y, gate=gate, shift=shift, scale=scale)
    x, y = x.contiguous(), y.contiguous()
    if _use_triton("gated_residual_layernorm_modulate", x, y, gate, shift, scale):
        return _kernels.gated_residual_layernorm_modulate_fwd(x, y, gate, shift, scale, eps)
    return reference.gated_residual_layernorm_modulate_fwd_torch(x, y, gate, shift, scale, eps)


@gated_residual_layernorm_modulate_fwd.register_fake
def _(x, y, gate, shift, scale, eps):
    _check_inputs("gated_residual_layernorm_modulate", x, eps, y=y, gate=gate, shift=shift, scale=scale)
    return x.new_empty(x.shape), x.new_empty(x.shape), _stats_like(x), _stats_like(x)


@torch.library.custom_op("coredi::gated_residual_layernorm_modulate_bwd", mutates_args=())
def gated_residual_layernorm_modulate_bwd(
    dout: Tensor, dh_in: Optional[Tensor], h: Tensor, y: Tensor, gate: Tensor, scale: Tensor, mean: Tensor,
    rstd: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dh_in: upstream gradient of h, or None. -> dx (= dh), dy (B, T, D); dgate, dshift, dscale (B, D) in fp32."""
    dout, h, y = dout.contiguous(), h.contiguous(), y.contiguous()
    dh_in = dh_in.contiguous() if dh_in is not None else None
    if _use_triton("gated_residual_layernorm_modulate_bwd", h, y, gate, scale):
        return _kernels.gated_residual_layernorm_modulate_bwd(dout, dh_in, h, y, gate, scale, mean, rstd)
    return reference.gated_residual_layernorm_modulate_bwd_torch(dout, dh_in, h, y, gate, scale, mean, rstd)


@gated_residual_layernorm_modulate_bwd.register_fake
def _(dout, dh_in, h, y, gate, scale, mean, rstd):
    grad = _param_grad_like(scale, h)
    return h.new_empty(h.shape), y.new_empty(y.shape), grad, grad.new_empty(grad.shape), grad.new_empty(grad.shape)


def _gated_setup(ctx, inputs, output):
    _, y, gate, shift, scale, _ = inputs
    h, _, mean, rstd = output
    ctx.save_for_backward(h, y, gate, scale, mean, rstd)
    ctx.shift_dtype = shift.dtype
    ctx.mark_non_differentiable(mean, rstd)
    # An unused h or out gets None instead of a materialized zero tensor (saves a (B, T, D) read).
    ctx.set_materialize_grads(False)


def _gated_backward(ctx, dh_in, dout, _dmean, _drstd):
    h, y, gate, scale, mean, rstd = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(h)
    dx, dy, dgate, dshift, dscale = torch.ops.coredi.gated_residual_layernorm_modulate_bwd(
        dout, dh_in, h, y, gate, scale, mean, rstd
    )
    return dx, dy, dgate.to(gate.dtype), dshift.to(ctx.shift_dtype), dscale.to(scale.dtype), None


gated_residual_layernorm_modulate_fwd.register_autograd(_gated_backward, setup_context=_gated_setup)


# ---------------------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------------------


def layernorm_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """LayerNorm without affine, then adaLN modulation: LN(x)·(1 + scale) + shift, per sample.

    Args:
        x: (B, T, D) fp16, bf16 or fp32 (float64 runs on the PyTorch backend only).
        shift, scale: (B, D), one modulation row per sample (any float dtype; any row stride).
        eps: added to the variance.
    Returns:
        (B, T, D) in x's dtype. Statistics and all arithmetic are fp32.
    """
    return torch.ops.coredi.layernorm_modulate_fwd(x, shift, scale, eps)[0]


def gated_residual_layernorm_modulate(
    x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """The gated residual add of one DiT sub-block fused with the modulated norm of the next.

    h = x + gate·y (the new residual stream, rounded to x's dtype), out = LN(h)·(1 + scale) + shift.

    Args:
        x: (B, T, D) residual stream. y: (B, T, D) branch output (attention or MLP); its dtype may differ from
            x's (under autocast a DiT's residual stream is fp32 while the branch outputs are bf16).
        gate, shift, scale: (B, D), one row per sample.
    Returns:
        h (B, T, D) and out (B, T, D), both in x's dtype (the residual stream's).
    """
    h, out, _, _ = torch.ops.coredi.gated_residual_layernorm_modulate_fwd(x, y, gate, shift, scale, eps)
    return h, out
