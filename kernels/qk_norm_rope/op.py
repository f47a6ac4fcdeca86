"""The qk-norm + RoPE op as `torch.library` custom ops, with autograd, fake kernels and backend dispatch.

Registered ops (namespace `coredi`; `?`: may be None):
    qk_norm_rope_fwd(qkv, q_weight?, k_weight?, cos?, sin?, eps) -> (q, k, v)
    qk_norm_rope_bwd(dq, dk, dv, qkv, q_weight?, k_weight?, cos?, sin?, eps) -> (dqkv, dq_weight, dk_weight)
    qk_layernorm_rope_fwd(qkv, q_weight?, q_bias?, k_weight?, k_bias?, cos?, sin?, eps) -> (q, k, v)
    qk_layernorm_rope_bwd(dq, dk, dv, qkv, q_weight?, q_bias?, k_weight?, k_bias?, cos?, sin?, eps)
        -> (dqkv, dq_weight, dq_bias, dk_weight, dk_bias)
The `qk_layernorm_rope` pair is the same prologue with a per-head LayerNorm (centred, with a bias) as qk-norm, the
qk-norm of timm's Attention (REPA's, LightningDiT's LayerNorm models); both pairs run the same Triton kernels.
qkv is (B, T, 3, H, Dh); q, k, v are (B, H, T, Dh) laid out (B, T, H, Dh) in memory (`_kernels` says why). The
`_fwd` op carries the autograd formula (through the `_bwd` op), which recomputes the RMS statistics from the saved
qkv. A `_bwd` op called without a weight (or bias) returns an empty (0,) gradient for it (custom ops cannot return
None); weight and bias gradients are fp32 (float64 for float64 qkv) and are cast to the parameters' dtypes by the
autograd formula. cos and sin (RoPE tables, buffers) get no gradient. Double backward is not supported.

Backend choice and the reason for `custom_op` rather than `triton_op` are as in `coredi_kernels.norm_modulate.op`:
Triton on CUDA tensors, the PyTorch math elsewhere, `force_backend` / $COREDI_KERNELS_BACKEND override it, and the
Triton kernels run on CPU tensors under the interpreter (TRITON_INTERPRET=1) when 'triton' is forced.
"""
from typing import Optional

import torch
from torch import Tensor

from .._utils import has_triton
from ..backend import row_kernel_reasons, select_backend
from . import reference
from .reference import compute_dtype, empty_heads_first

if has_triton():
    from . import _kernels
else:  # CPU-only torch builds without triton: only the PyTorch backend exists
    _kernels = None

OP = "qk_norm_rope"


# ---------------------------------------------------------------------------------------------------------------
# Input checks (they run in the real and the fake kernels, so torch.compile reports bad inputs at trace time)
# ---------------------------------------------------------------------------------------------------------------


def _check_float_tensor(name: str, t, op: str = OP) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_same_device(name: str, t: Tensor, qkv: Tensor, op: str = OP) -> None:
    if t.device != qkv.device:
        raise ValueError(f"{op}: {name} is on {t.device} but qkv is on {qkv.device}")


def _check_inputs(
    qkv: Tensor, q_weight: Optional[Tensor], k_weight: Optional[Tensor], cos: Optional[Tensor],
    sin: Optional[Tensor], eps: float, q_bias: Optional[Tensor] = None, k_bias: Optional[Tensor] = None,
    op: str = OP,
) -> None:
    """qkv (B, T, 3, H, Dh); weights, biases (Dh,) or None; cos, sin (T, Dh/2) or both None; all on qkv's device."""
    _check_float_tensor("qkv", qkv, op)
    if qkv.dim() != 5 or qkv.shape[2] != 3 or qkv.shape[3] == 0 or qkv.shape[4] == 0:
        raise ValueError(f"{op}: qkv must have shape (B, T, 3, H, Dh) with H, Dh > 0 (the qkv projection reshaped), "
                         f"got {tuple(qkv.shape)}")
    _, T, _, _, Dh = qkv.shape
    for name, weight in (("q_weight", q_weight), ("k_weight", k_weight), ("q_bias", q_bias), ("k_bias", k_bias)):
        if weight is None:
            continue
        _check_float_tensor(name, weight, op)
        if tuple(weight.shape) != (Dh,):
            raise ValueError(f"{op}: {name} must have shape (Dh,) = ({Dh},), got {tuple(weight.shape)}")
        _check_same_device(name, weight, qkv, op)
    if (cos is None) != (sin is None):
        raise ValueError(f"{op}: cos and sin must both be tensors (RoPE) or both None (no rotation), got "
                         f"cos={'None' if cos is None else 'a tensor'} and sin={'None' if sin is None else 'a tensor'}")
    if cos is not None:
        if Dh % 4:
            raise ValueError(f"{op}: qkv's head dim Dh = {Dh} must be divisible by 4 for 2D RoPE (Dh/2 channel pairs, "
                             f"half of them per grid axis)")
        for name, table in (("cos", cos), ("sin", sin)):
            _check_float_tensor(name, table, op)
            if tuple(table.shape) != (T, Dh // 2):
                raise ValueError(f"{op}: {name} must have shape (T, Dh/2) = {(T, Dh // 2)} (one angle per token and "
                                 f"channel pair), got {tuple(table.shape)}")
            _check_same_device(name, table, qkv, op)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{op}: eps must be > 0, got {eps!r}")


def _use_triton(op: str, qkv: Tensor, *others: Optional[Tensor]) -> bool:
    reasons = row_kernel_reasons(_kernels is not None, (qkv, *others), qkv.shape[-1], "Dh")
    return select_backend(op, qkv.device, reasons) == "triton"


def _weight_grad(dweight: Optional[Tensor], qkv: Tensor) -> Tensor:
    """The op's dweight output: the gradient, or an empty (0,) tensor when there is no weight."""
    return dweight if dweight is not None else qkv.new_empty((0,), dtype=compute_dtype(qkv.dtype))


def _weight_grad_like(weight: Optional[Tensor], qkv: Tensor) -> Tensor:
    return qkv.new_empty((0,) if weight is None else weight.shape, dtype=compute_dtype(qkv.dtype))


def _grads_as_dtypes(grads: tuple, dtypes: list) -> list:
    """The bwd op's parameter gradients (empty for a missing parameter) cast to each parameter's dtype, or None."""
    return [None if dtype is None else g.to(dtype) for g, dtype in zip(grads, dtypes, strict=True)]


# ---------------------------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("coredi::qk_norm_rope_fwd", mutates_args=())
def qk_norm_rope_fwd(
    qkv: Tensor, q_weight: Optional[Tensor], k_weight: Optional[Tensor], cos: Optional[Tensor],
    sin: Optional[Tensor], eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """q, k = RoPE(RMSNorm(q)·q_weight), RoPE(RMSNorm(k)·k_weight); v copied. -> q, k, v (B, H, T, Dh)."""
    _check_inputs(qkv, q_weight, k_weight, cos, sin, eps)
    args = (qkv.contiguous(), q_weight, k_weight, cos, sin, eps)
    if _use_triton(OP, qkv, q_weight, k_weight, cos, sin):
        return _kernels.qk_norm_rope_fwd(*args)
    return reference.qk_norm_rope_fwd_torch(*args)


@qk_norm_rope_fwd.register_fake
def _(qkv, q_weight, k_weight, cos, sin, eps):
    _check_inputs(qkv, q_weight, k_weight, cos, sin, eps)
    return empty_heads_first(qkv), empty_heads_first(qkv), empty_heads_first(qkv)


@torch.library.custom_op("coredi::qk_norm_rope_bwd", mutates_args=())
def qk_norm_rope_bwd(
    dq: Tensor, dk: Tensor, dv: Tensor, qkv: Tensor, q_weight: Optional[Tensor], k_weight: Optional[Tensor],
    cos: Optional[Tensor], sin: Optional[Tensor], eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (B, H, T, Dh), any strides. -> dqkv (B, T, 3, H, Dh) contiguous in qkv's dtype; dq_weight,
    dk_weight (Dh,) or (0,) in fp32 (float64 for float64 qkv)."""
    args = (dq, dk, dv, qkv.contiguous(), q_weight, k_weight, cos, sin, eps)
    if _use_triton(f"{OP}_bwd", qkv, q_weight, k_weight, cos, sin):
        dqkv, dq_weight, dk_weight = _kernels.qk_norm_rope_bwd(*args)
    else:
        dqkv, dq_weight, dk_weight = reference.qk_norm_rope_bwd_torch(*args)
    return dqkv, _weight_grad(dq_weight, qkv), _weight_grad(dk_weight, qkv)


@qk_norm_rope_bwd.register_fake
def _(dq, dk, dv, qkv, q_weight, k_weight, cos, sin, eps):
    return qkv.new_empty(qkv.shape), _weight_grad_like(q_weight, qkv), _weight_grad_like(k_weight, qkv)


# ---------------------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    qkv, q_weight, k_weight, cos, sin, eps = inputs
    ctx.save_for_backward(qkv, q_weight, k_weight, cos, sin)
    ctx.eps = eps
    ctx.weight_dtypes = [w.dtype if w is not None else None for w in (q_weight, k_weight)]


def _backward(ctx, dq, dk, dv):
    qkv, q_weight, k_weight, cos, sin = ctx.saved_tensors  # read once: checkpointing's unpack hooks allow one unpack
    dqkv, dq_weight, dk_weight = torch.ops.coredi.qk_norm_rope_bwd(dq, dk, dv, qkv, q_weight, k_weight, cos, sin,
                                                                   ctx.eps)
    return dqkv, *_grads_as_dtypes((dq_weight, dk_weight), ctx.weight_dtypes), None, None, None


qk_norm_rope_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------------------


def qk_norm_rope(
    qkv: Tensor, q_weight: Optional[Tensor], k_weight: Optional[Tensor], cos: Optional[Tensor],
    sin: Optional[Tensor], eps: float = 1e-6,
) -> tuple[Tensor, Tensor, Tensor]:
    """JiT's attention prologue in one pass: per-head RMSNorm of q and k (qk-norm), then RoPE; v passes through.

    Args:
        qkv: (B, T, 3, H, Dh) fp16, bf16 or fp32 — the qkv projection reshaped, `linear(x).reshape(B, T, 3, H, Dh)`
            (float64 runs on the PyTorch backend only). Dh need not be a power of two.
        q_weight, k_weight: (Dh,) RMSNorm weights (JiT's `q_norm.weight`, `k_norm.weight`), or None (no affine).
        cos, sin: (T, Dh/2) cos/sin of each token's angle per channel pair (`coredi_fast.models.rope.rope_2d_tables`;
            in-context/prefix tokens have angle 0), any float dtype; or both None for qk-norm alone. Dh must be
            divisible by 4 with RoPE (2D RoPE: half the pairs per grid axis).
        eps: added to mean(x²) of each head row.
    Returns:
        q, k, v: (B, H, T, Dh) in qkv's dtype, ready for attention (laid out (B, T, H, Dh) in memory, as eager JiT's
        transposed views are). Statistics and rotation are fp32, rounded once.
    """
    return torch.ops.coredi.qk_norm_rope_fwd(qkv, q_weight, k_weight, cos, sin, eps)


# ---------------------------------------------------------------------------------------------------------------
# The LayerNorm form
# ---------------------------------------------------------------------------------------------------------------

LN_OP = "qk_layernorm_rope"


@torch.library.custom_op("coredi::qk_layernorm_rope_fwd", mutates_args=())
def qk_layernorm_rope_fwd(
    qkv: Tensor, q_weight: Optional[Tensor], q_bias: Optional[Tensor], k_weight: Optional[Tensor],
    k_bias: Optional[Tensor], cos: Optional[Tensor], sin: Optional[Tensor], eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """q, k = RoPE(LayerNorm(q)·q_weight + q_bias), RoPE(LayerNorm(k)·k_weight + k_bias); v copied."""
    _check_inputs(qkv, q_weight, k_weight, cos, sin, eps, q_bias, k_bias, LN_OP)
    args = (qkv.contiguous(), q_weight, k_weight, cos, sin, eps)
    if _use_triton(LN_OP, qkv, q_weight, k_weight, q_bias, k_bias, cos, sin):
        return _kernels.qk_norm_rope_fwd(*args, q_bias=q_bias, k_bias=k_bias, layer_norm=True)
    return reference.qk_norm_rope_fwd_torch(*args, q_bias=q_bias, k_bias=k_bias, layer_norm=True)


@qk_layernorm_rope_fwd.register_fake
def _(qkv, q_weight, q_bias, k_weight, k_bias, cos, sin, eps):
    _check_inputs(qkv, q_weight, k_weight, cos, sin, eps, q_bias, k_bias, LN_OP)
    return empty_heads_first(qkv), empty_heads_first(qkv), empty_heads_first(qkv)


@torch.library.custom_op("coredi::qk_layernorm_rope_bwd", mutates_args=())
def qk_layernorm_rope_bwd(
    dq: Tensor, dk: Tensor, dv: Tensor, qkv: Tensor, q_weight: Optional[Tensor], q_bias: Optional[Tensor],
    k_weight: Optional[Tensor], k_bias: Optional[Tensor], cos: Optional[Tensor], sin: Optional[Tensor], eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> dqkv (B, T, 3, H, Dh) contiguous in qkv's dtype; dq_weight, dq_bias, dk_weight, dk_bias (Dh,) or (0,)
    in fp32 (float64 for float64 qkv)."""
    args = (dq, dk, dv, qkv.contiguous(), q_weight, q_bias, k_weight, k_bias, cos, sin, eps)
    if _use_triton(f"{LN_OP}_bwd", qkv, q_weight, k_weight, q_bias, k_bias, cos, sin):
        dqkv, dqw, dkw, dqb, dkb = _kernels.qk_layernorm_rope_bwd(*args)
    else:
        dqkv, dqw, dkw, dqb, dkb = reference.qk_layernorm_rope_bwd_torch(*args)
    return dqkv, *(_weight_grad(g, qkv) for g in (dqw, dqb, dkw, dkb))


@qk_layernorm_rope_bwd.register_fake
def _(dq, dk, dv, qkv, q_weight, q_bias, k_weight, k_bias, cos, sin, eps):
    return qkv.new_empty(qkv.shape), *(_weight_grad_like(p, qkv) for p in (q_weight, q_bias, k_weight, k_bias))


def _ln_setup_context(ctx, inputs, output):
    qkv, q_weight, q_bias, k_weight, k_bias, cos, sin, eps = inputs
    ctx.save_for_backward(qkv, q_weight, q_bias, k_weight, k_bias, cos, sin)
    ctx.eps = eps
    ctx.param_dtypes = [p.dtype if p is not None else None for p in (q_weight, q_bias, k_weight, k_bias)]


def _ln_backward(ctx, dq, dk, dv):
    saved = ctx.saved_tensors  # read once: checkpointing's unpack hooks allow one unpack
    dqkv, *param_grads = torch.ops.coredi.qk_layernorm_rope_bwd(dq, dk, dv, *saved, ctx.eps)
    return dqkv, *_grads_as_dtypes(tuple(param_grads), ctx.param_dtypes), None, None, None


qk_layernorm_rope_fwd.register_autograd(_ln_backward, setup_context=_ln_setup_context)


def qk_layernorm_rope(
    qkv: Tensor, q_weight: Optional[Tensor], q_bias: Optional[Tensor], k_weight: Optional[Tensor],
    k_bias: Optional[Tensor], cos: Optional[Tensor], sin: Optional[Tensor], eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor]:
    """`qk_norm_rope` with a per-head LayerNorm as qk-norm (timm's `Attention(qk_norm=True)`, REPA, LightningDiT's
    LayerNorm models): q̂ = (q − mean(q))/sqrt(var(q) + eps)·q_weight + q_bias, k alike, then RoPE; v passes through.

    Args as `qk_norm_rope`, plus q_bias, k_bias: (Dh,) or None (the q_norm / k_norm LayerNorms' `bias`). Returns
    q, k, v (B, H, T, Dh) in qkv's dtype, laid out (B, T, H, Dh) in memory.
    """
    return torch.ops.coredi.qk_layernorm_rope_fwd(qkv, q_weight, q_bias, k_weight, k_bias, cos, sin, eps)
