"""The LayerNorm / RMSNorm + modulate ops as `torch.library` custom ops, with autograd, fake kernels and backend
dispatch.

Registered ops (namespace `coredi`; `?`: may be None):
    layernorm_modulate_fwd(x, shift, scale, eps) -> (out, mean, rstd)
    layernorm_modulate_bwd(dout, x, scale, mean, rstd) -> (dx, dshift, dscale)
    gated_residual_layernorm_modulate_fwd(x, y, gate, shift, scale, eps) -> (h, out, mean, rstd)
    gated_residual_layernorm_modulate_bwd(dout, dh_in?, h, y, gate, scale, mean, rstd)
        -> (dx, dy, dgate, dshift, dscale)
    rmsnorm_modulate_fwd(x, weight?, shift, scale, eps) -> (out, rstd)
    rmsnorm_modulate_bwd(dout, x, weight?, scale, rstd) -> (dx, dweight, dshift, dscale)
    gated_residual_rmsnorm_modulate_fwd(x, y, gate, weight?, shift, scale, eps) -> (h, out, rstd)
    gated_residual_rmsnorm_modulate_bwd(dout, dh_in?, h, y, gate, weight?, scale, rstd)
        -> (dx, dy, dgate, dweight, dshift, dscale)
The `_fwd` ops carry the autograd formula (through the `_bwd` ops); mean/rstd are non-differentiable outputs kept
for the backward. All four pairs follow one layout, so one autograd formula serves them: a `_bwd` op takes
(dout, [dh_in,] saved...), where `saved` is (the normalized rows x or h, [y, gate,] [weight,] scale, [mean,] rstd),
and returns one gradient per tensor input of its `_fwd` op, in that op's order. `weight` is the RMSNorm's (D,)
weight or None; a `_bwd` op called without a weight returns an empty (0,) dweight (custom ops cannot return None).
Parameter gradients from the `_bwd` ops are fp32 (float64 for float64 inputs) and are cast to the parameters'
dtypes by the autograd formula. Double backward is not supported.

Why `custom_op` and not `triton_op`: `triton_op` registers its body as the fake kernel and is traced through by
torch.compile, which would fix the backend choice at trace time and, under TRITON_INTERPRET=1, run interpreted
kernels on fake tensors. As opaque custom ops, the ops pick their backend (`coredi_kernels.backend`) at every call,
behave the same under torch.compile, and the registration tested on CPU is the one that runs on the GPU.
"""
from typing import Optional

import torch
from torch import Tensor

from .._utils import has_triton
from ..backend import row_kernel_reasons, select_backend
from . import reference
from .reference import compute_dtype

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


def _check_inputs(
    op: str, x: Tensor, eps: float, y: Optional[Tensor] = None, weight: Optional[Tensor] = None, **params: Tensor
) -> None:
    """x (B, T, D); y of x's shape (any float dtype); every parameter (B, D); weight (D,) or None; all on x's
    device."""
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
    if weight is not None:
        _check_float_tensor(f"{op}: weight", weight)
        if tuple(weight.shape) != (D,):
            raise ValueError(f"{op}: weight must have shape (D,) = ({D},), got {tuple(weight.shape)}")
        if weight.device != x.device:
            raise ValueError(f"{op}: weight is on {weight.device} but x is on {x.device}")


def _use_triton(op: str, x: Tensor, *params: Optional[Tensor]) -> bool:
    reasons = row_kernel_reasons(_kernels is not None, (x, *params), x.shape[-1], "D")
    return select_backend(op, x.device, reasons) == "triton"


def _stats_like(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[:2], dtype=compute_dtype(x.dtype))


def _param_grad_like(p: Tensor, x: Tensor) -> Tensor:
    return p.new_empty(p.shape, dtype=compute_dtype(x.dtype))


def _weight_grad(dweight: Optional[Tensor], x: Tensor) -> Tensor:
    """The op's dweight output: the gradient, or an empty (0,) tensor when there is no weight."""
    return dweight if dweight is not None else x.new_empty((0,), dtype=compute_dtype(x.dtype))


def _weight_grad_like(weight: Optional[Tensor], x: Tensor) -> Tensor:
    return x.new_empty((0,) if weight is None else weight.shape, dtype=compute_dtype(x.dtype))


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
    args = (dout, dh_in, h, y, gate, scale, mean, rstd)
    if _use_triton("gated_residual_layernorm_modulate_bwd", h, y, gate, scale):
        return _kernels.gated_residual_layernorm_modulate_bwd(*args)
    return reference.gated_residual_layernorm_modulate_bwd_torch(*args)


@gated_residual_layernorm_modulate_bwd.register_fake
def _(dout, dh_in, h, y, gate, scale, mean, rstd):
    grad = _param_grad_like(scale, h)
    return h.new_empty(h.shape), y.new_empty(y.shape), grad, grad.new_empty(grad.shape), grad.new_empty(grad.shape)


# ---------------------------------------------------------------------------------------------------------------
# RMSNorm + modulate
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("coredi::rmsnorm_modulate_fwd", mutates_args=())
def rmsnorm_modulate_fwd(
    x: Tensor, weight: Optional[Tensor], shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """out = RMSNorm(x)·weight·(1 + scale) + shift. x (B, T, D), shift/scale (B, D) -> out (B, T, D), rstd (B, T)."""
    _check_inputs("rmsnorm_modulate", x, eps, weight=weight, shift=shift, scale=scale)
    x = x.contiguous()  # outputs are contiguous on both backends, as the fake kernel promises
    if _use_triton("rmsnorm_modulate", x, shift, scale, weight):
        return _kernels.rmsnorm_modulate_fwd(x, weight, shift, scale, eps)
    return reference.rmsnorm_modulate_fwd_torch(x, weight, shift, scale, eps)


@rmsnorm_modulate_fwd.register_fake
def _(x, weight, shift, scale, eps):
    _check_inputs("rmsnorm_modulate", x, eps, weight=weight, shift=shift, scale=scale)
    return x.new_empty(x.shape), _stats_like(x)


@torch.library.custom_op("coredi::rmsnorm_modulate_bwd", mutates_args=())
def rmsnorm_modulate_bwd(
    dout: Tensor, x: Tensor, weight: Optional[Tensor], scale: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> dx (B, T, D) in x's dtype; dweight (D,) or (0,), dshift, dscale (B, D) fp32 (float64 for float64 x)."""
    dout, x = dout.contiguous(), x.contiguous()
    if _use_triton("rmsnorm_modulate_bwd", x, scale, weight):
        dx, dweight, dshift, dscale = _kernels.rmsnorm_modulate_bwd(dout, x, weight, scale, rstd)
    else:
        dx, dweight, dshift, dscale = reference.rmsnorm_modulate_bwd_torch(dout, x, weight, scale, rstd)
    return dx, _weight_grad(dweight, x), dshift, dscale


@rmsnorm_modulate_bwd.register_fake
def _(dout, x, weight, scale, rstd):
    grad = _param_grad_like(scale, x)
    return x.new_empty(x.shape), _weight_grad_like(weight, x), grad, grad.new_empty(grad.shape)


@torch.library.custom_op("coredi::gated_residual_rmsnorm_modulate_fwd", mutates_args=())
def gated_residual_rmsnorm_modulate_fwd(
    x: Tensor, y: Tensor, gate: Tensor, weight: Optional[Tensor], shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """h = x + gate·y, out = RMSNorm(h)·weight·(1 + scale) + shift -> h, out (B, T, D) in x's dtype, rstd (B, T)."""
    op = "gated_residual_rmsnorm_modulate"
    _check_inputs(op, x, eps, y=y, weight=weight, gate=gate, shift=shift, scale=scale)
    x, y = x.contiguous(), y.contiguous()
    if _use_triton(op, x, y, gate, shift, scale, weight):
        return _kernels.gated_residual_rmsnorm_modulate_fwd(x, y, gate, weight, shift, scale, eps)
    return reference.gated_residual_rmsnorm_modulate_fwd_torch(x, y, gate, weight, shift, scale, eps)


@gated_residual_rmsnorm_modulate_fwd.register_fake
def _(x, y, gate, weight, shift, scale, eps):
    _check_inputs("gated_residual_rmsnorm_modulate", x, eps, y=y, weight=weight, gate=gate, shift=shift, scale=scale)
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
    if _use_triton("gated_residual_rmsnorm_modulate_bwd", h, y, gate, scale, weight):
        dx, dy, dgate, dweight, dshift, dscale = _kernels.gated_residual_rmsnorm_modulate_bwd(*args)
    else:
        dx, dy, dgate, dweight, dshift, dscale = reference.gated_residual_rmsnorm_modulate_bwd_torch(*args)
    return dx, dy, dgate, _weight_grad(dweight, h), dshift, dscale


@gated_residual_rmsnorm_modulate_bwd.register_fake
def _(dout, dh_in, h, y, gate, weight, scale, rstd):
    grad = _param_grad_like(scale, h)
    return (h.new_empty(h.shape), y.new_empty(y.shape), grad, _weight_grad_like(weight, h),
            grad.new_empty(grad.shape), grad.new_empty(grad.shape))


# ---------------------------------------------------------------------------------------------------------------
# Autograd: one formula for the four `_fwd` ops (the layout is in the module docstring)
# ---------------------------------------------------------------------------------------------------------------


def _register_autograd(fwd_op, bwd_op, *, gated: bool, is_rms_norm: bool) -> None:
    """fwd_op's inputs: (x, [y, gate,] [weight,] shift, scale, eps); outputs: ([h,] out, [mean,] rstd)."""
    num_stats = 1 if is_rms_norm else 2

    def setup_context(ctx, inputs, output):
        *tensors, _eps = inputs
        stats = output[-num_stats:]
        rows = output[0] if gated else tensors[0]  # the normalized rows: h, or x itself
        *middle, _shift, scale = tensors[1:]      # [y, gate,] [weight]
        ctx.save_for_backward(rows, *middle, scale, *stats)
        # Each gradient is returned in its input's dtype (None: an absent weight gets no gradient).
        ctx.input_dtypes = [t.dtype if t is not None else None for t in tensors]
        ctx.mark_non_differentiable(*stats)
        if gated:
            # An unused h or out gets None instead of a materialized zero tensor (saves a (B, T, D) read).
            ctx.set_materialize_grads(False)

    def backward(ctx, *grads):
        saved = ctx.saved_tensors  # read once: checkpointing's unpack hooks allow a single unpack
        *dh_in, dout = grads[:-num_stats]  # (dout,) or (dh_in, dout)
        if dout is None:
            dout = torch.zeros_like(saved[0])
        input_grads = bwd_op(dout, *dh_in, *saved)
        casts = [None if dtype is None else g.to(dtype) for g, dtype in zip(input_grads, ctx.input_dtypes, strict=True)]
        return (*casts, None)

    fwd_op.register_autograd(backward, setup_context=setup_context)


_register_autograd(layernorm_modulate_fwd, torch.ops.coredi.layernorm_modulate_bwd, gated=False, is_rms_norm=False)
_register_autograd(gated_residual_layernorm_modulate_fwd, torch.ops.coredi.gated_residual_layernorm_modulate_bwd,
                   gated=True, is_rms_norm=False)
_register_autograd(rmsnorm_modulate_fwd, torch.ops.coredi.rmsnorm_modulate_bwd, gated=False, is_rms_norm=True)
_register_autograd(gated_residual_rmsnorm_modulate_fwd, torch.ops.coredi.gated_residual_rmsnorm_modulate_bwd,
                   gated=True, is_rms_norm=True)


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
