"""Triton kernels and launchers for LayerNorm or RMSNorm + adaLN modulate, optionally fused with the gated residual.

One forward and one backward kernel serve both norms; constexpr flags pick the variant at compile time
(IS_RMS_NORM, HAS_WEIGHT, HAS_RESIDUAL, HAS_DH_IN), so each variant compiles to its own specialized kernel.

Forward, one pass over the rows of the flattened (M = B·T, D) input, b = row // T:
    h   = x + gate[b]·y                             (HAS_RESIDUAL; h is rounded to x's dtype and stored)
    c   = h − mean_D(h)   (LayerNorm),   c = h   (RMSNorm)
    x̂   = c·rstd,   rstd = 1/sqrt(mean_D(c²) + eps)
    out = x̂·w·(1 + scale[b]) + shift[b]             (w only if HAS_WEIGHT: JiT's RMSNorm weight)
rstd (and LayerNorm's mean), fp32 one per row, are stored for the backward, which recomputes x̂ instead of storing it.

Each forward program normalizes BLOCK_M whole rows. The modulation row is chosen per *row* (row // T): a tile may
span two samples when T is not a multiple of BLOCK_M (JiT's T = 256 patches + 32 in-context tokens is not a multiple
of every BLOCK_M). When it is, every tile lies in one sample and the kernel loads the (1, D) parameter rows once
(ROWS_SHARE_SAMPLE).

Backward. With g = dout·(1 + scale[b]) (the gradient of n = x̂·w) and gx = g·w (the gradient of x̂):
    dh      = rstd·(gx − mean_D(gx) − x̂·mean_D(gx·x̂)) + dh_in      (RMSNorm has no mean_D(gx) term)
    dy      = gate[b]·dh,   dx = dh
    dscale  = Σ_t dout·n,   dshift = Σ_t dout,   dgate = Σ_t dh·y     (sums over the T rows of sample b)
    dweight = Σ_b Σ_t g·x̂                                           (sum over every row)
The sums are made deterministic by the grid: program (b, c) walks rows [c·R, (c+1)·R) of sample b only, accumulates
in registers, and writes one fp32 partial row per gradient into a (B, C, D) buffer; the launcher sums the C partials
(and the B samples for dweight). No atomics, so results are bit-identical from run to run. R is large enough
(>= 64 rows on a GPU) that the partials add only a few percent to the traffic.

All arithmetic is fp32 after loading (the interpreter cannot do bf16 arithmetic, and fp32 statistics are the
point). Launchers take contiguous rows; the (B, D) parameters may have any row stride (adaLN `chunk` views); the
weight is made contiguous.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._utils import cdiv, row_tile_config, rows_per_backward_program

# Tile sizes (values per tile): the forward holds ~4 row-sized tensors live, the backward ~8 plus accumulators.
FWD_TILE_ELEMENTS = 4096
BWD_TILE_ELEMENTS = 2048
# Rows per backward program at least this many, so the (B, C, D) fp32 partial sums stay a small share of traffic.
MIN_BWD_ROWS_PER_PROGRAM = 64
# Backward programs to aim for per SM: enough to hide the latency of each program's row loop.
BWD_PROGRAMS_PER_SM = 8


@triton.jit
def _norm_modulate_fwd_kernel(
    X,  # input rows (M, D), contiguous
    Y,  # residual branch rows (M, D) (only read if HAS_RESIDUAL)
    GATE,  # (B, D) gate rows, row stride stride_gate (only read if HAS_RESIDUAL)
    W,  # (D,) norm weight (only read if HAS_WEIGHT)
    SHIFT,  # (B, D) shift rows, row stride stride_shift
    SCALE,  # (B, D) scale rows, row stride stride_scale
    H,  # output residual stream rows (M, D) (only written if HAS_RESIDUAL)
    OUT,  # output rows (M, D)
    MEAN,  # (M,) fp32 mean of each normalized row (only written for LayerNorm)
    RSTD,  # (M,) fp32 1/sqrt(mean(c²) + eps) of each normalized row
    M,  # number of rows, B·T
    T,  # rows per sample
    D,  # columns
    stride_gate,
    stride_shift,
    stride_scale,
    eps,
    IS_RMS_NORM: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    ROWS_SHARE_SAMPLE: tl.constexpr,  # T % BLOCK_M == 0: each tile lies inside one sample
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < M
    col_mask = cols < D
    mask = row_mask[:, None] & col_mask[None, :]
    offsets = rows.to(tl.int64)[:, None] * D + cols[None, :]

    # Which modulation row each row reads: per row in general (a tile may span two samples), once per tile when
    # tiles never cross a sample boundary.
    if ROWS_SHARE_SAMPLE:
        param_rows = ((pid * BLOCK_M) // T).to(tl.int64)
        param_mask = col_mask[None, :]
    else:
        param_rows = (rows // T).to(tl.int64)[:, None]
        param_mask = mask
    param_cols = cols[None, :]

    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        y = tl.load(Y + offsets, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(GATE + param_rows * stride_gate + param_cols, mask=param_mask, other=0.0).to(tl.float32)
        # Round the new residual stream to its storage dtype first, so the statistics describe the stored h that
        # the backward reads back.
        h = (x + gate * y).to(H.dtype.element_ty)
        tl.store(H + offsets, h, mask=mask)
        x = h.to(tl.float32)

    if IS_RMS_NORM:
        centered = x  # masked lanes hold 0
    else:
        mean = tl.sum(x, axis=1) / D
        centered = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / D + eps)
    if not IS_RMS_NORM:
        tl.store(MEAN + rows, mean, mask=row_mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)

    normed = centered * rstd[:, None]
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        normed = normed * w[None, :]
    shift = tl.load(SHIFT + param_rows * stride_shift + param_cols, mask=param_mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + param_rows * stride_scale + param_cols, mask=param_mask, other=0.0).to(tl.float32)
    out = normed * (1.0 + scale) + shift
    tl.store(OUT + offsets, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _norm_modulate_bwd_kernel(
    DOUT,  # upstream gradient of out (M, D), contiguous
    DH_IN,  # upstream gradient of h (M, D) (only read if HAS_DH_IN)
    X,  # the normalized rows (M, D): x, or h for the residual variant
    Y,  # residual branch rows (M, D) (only read if HAS_RESIDUAL)
    GATE,  # (B, D) gate rows (only read if HAS_RESIDUAL)
    W,  # (D,) norm weight (only read if HAS_WEIGHT)
    SCALE,  # (B, D) scale rows
    MEAN,  # (M,) fp32 from the forward (only read for LayerNorm)
    RSTD,  # (M,) fp32 from the forward
    DX,  # output (M, D): gradient of x (= dh for the residual variant)
    DY,  # output (M, D): gradient of y (only written if HAS_RESIDUAL)
    DSHIFT_PART,  # output (B, C, D) fp32: per-program partial sums of dshift
    DSCALE_PART,  # output (B, C, D) fp32: partial sums of dscale
    DGATE_PART,  # output (B, C, D) fp32: partial sums of dgate (only written if HAS_RESIDUAL)
    DW_PART,  # output (B, C, D) fp32: partial sums of dweight (only written if HAS_WEIGHT)
    T,  # rows per sample
    D,  # columns
    rows_per_program,  # R: rows of one sample each program walks (a multiple of BLOCK_M)
    stride_gate,
    stride_scale,
    IS_RMS_NORM: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_DH_IN: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    sample = tl.program_id(0)
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D

    # One sample per program: its modulation rows (and the weight) are loaded once.
    scale = tl.load(SCALE + sample.to(tl.int64) * stride_scale + cols, mask=col_mask, other=0.0).to(tl.float32)
    one_plus_scale = (1.0 + scale)[None, :]
    if HAS_RESIDUAL:
        gate = tl.load(GATE + sample.to(tl.int64) * stride_gate + cols, mask=col_mask, other=0.0).to(tl.float32)
        gate = gate[None, :]
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]

    acc_dshift = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_dscale = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_dgate = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_dw = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    t_start = chunk * rows_per_program
    t_end = tl.minimum(t_start + rows_per_program, T)
    for t0 in range(t_start, t_end, BLOCK_M):
        t = t0 + tl.arange(0, BLOCK_M)
        row_mask = t < t_end
        rows = sample.to(tl.int64) * T + t
        mask = row_mask[:, None] & col_mask[None, :]
        offsets = rows[:, None] * D + cols[None, :]

        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(DOUT + offsets, mask=mask, other=0.0).to(tl.float32)
        if not IS_RMS_NORM:
            mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        if IS_RMS_NORM:
            xhat = x * rstd[:, None]  # 0 outside the mask
        else:
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)

        g = dout * one_plus_scale
        if HAS_WEIGHT:
            gx = g * w
            normed = xhat * w
            acc_dw += g * xhat
        else:
            gx = g
            normed = xhat
        if IS_RMS_NORM:
            mean_gxhat = tl.sum(gx * xhat, axis=1) / D
            dh = rstd[:, None] * (gx - xhat * mean_gxhat[:, None])
        else:  # LayerNorm's centering puts the row mean of gx into the gradient too
            mean_gx = tl.sum(gx, axis=1) / D
            mean_gxhat = tl.sum(gx * xhat, axis=1) / D
            dh = rstd[:, None] * (gx - mean_gx[:, None] - xhat * mean_gxhat[:, None])
        if HAS_DH_IN:
            dh += tl.load(DH_IN + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offsets, dh.to(DX.dtype.element_ty), mask=mask)

        acc_dshift += dout
        acc_dscale += dout * normed
        if HAS_RESIDUAL:
            y = tl.load(Y + offsets, mask=mask, other=0.0).to(tl.float32)
            tl.store(DY + offsets, (gate * dh).to(DY.dtype.element_ty), mask=mask)
            acc_dgate += dh * y  # y is 0 outside the mask

    part = (sample.to(tl.int64) * num_chunks + chunk) * D + cols
    tl.store(DSHIFT_PART + part, tl.sum(acc_dshift, axis=0), mask=col_mask)
    tl.store(DSCALE_PART + part, tl.sum(acc_dscale, axis=0), mask=col_mask)
    if HAS_RESIDUAL:
        tl.store(DGATE_PART + part, tl.sum(acc_dgate, axis=0), mask=col_mask)
    if HAS_WEIGHT:
        tl.store(DW_PART + part, tl.sum(acc_dw, axis=0), mask=col_mask)


# ---------------------------------------------------------------------------------------------------------------
# Launchers. Inputs: x, y, dout, dh_in (B, T, D); gate, shift, scale (B, D); weight (D,) or None; mean (B, T) fp32
# for LayerNorm, None for RMSNorm; rstd (B, T) fp32.
# `block_m` / `num_warps` override the heuristic tile (tests use it to make tiles cross samples; tuning sweeps).
# ---------------------------------------------------------------------------------------------------------------


def _rows(t: Tensor) -> Tensor:
    """t with contiguous rows (a no-op for contiguous tensors)."""
    return t.contiguous()


def _param_rows(p: Tensor) -> Tensor:
    """A (B, D) parameter whose columns are contiguous; any row stride is passed to the kernel as is."""
    return p if p.stride(-1) == 1 else p.contiguous()


def norm_modulate_fwd(
    x: Tensor, y: Optional[Tensor], gate: Optional[Tensor], weight: Optional[Tensor], shift: Tensor, scale: Tensor,
    eps: float, *, is_rms_norm: bool, block_m: Optional[int] = None, num_warps: Optional[int] = None,
) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
    """Both norms, with or without the residual (y, gate both None: without).

    -> h (B, T, D) (out itself without the residual), out (B, T, D) in x's dtype, mean (B, T) fp32 (None for
    RMSNorm), rstd (B, T) fp32.
    """
    B, T, D = x.shape
    M = B * T
    x = _rows(x)
    has_residual = y is not None
    y = _rows(y) if has_residual else x
    gate = _param_rows(gate) if has_residual else x
    has_weight = weight is not None
    weight = weight.contiguous() if has_weight else x
    shift, scale = _param_rows(shift), _param_rows(scale)

    out = torch.empty_like(x)
    h = torch.empty_like(x) if has_residual else out
    rstd = torch.empty((B, T), dtype=torch.float32, device=x.device)
    mean = None if is_rms_norm else torch.empty((B, T), dtype=torch.float32, device=x.device)
    if M == 0:
        return h, out, mean, rstd

    config = row_tile_config(D, FWD_TILE_ELEMENTS)
    block_m = block_m or config.BLOCK_M
    _norm_modulate_fwd_kernel[(cdiv(M, block_m),)](
        x, y, gate, weight, shift, scale, h, out, rstd if is_rms_norm else mean, rstd,
        M, T, D,
        gate.stride(0) if has_residual else 0, shift.stride(0), scale.stride(0),
        eps,
        IS_RMS_NORM=is_rms_norm,
        HAS_RESIDUAL=has_residual,
        HAS_WEIGHT=has_weight,
        ROWS_SHARE_SAMPLE=(T % block_m == 0),
        BLOCK_M=block_m,
        BLOCK_D=config.BLOCK_D,
        num_warps=num_warps or config.num_warps,
    )  # fmt: skip
    return h, out, mean, rstd


def backward_rows_per_program(B: int, T: int, block_m: int, device: torch.device) -> int:
    """Rows of one sample per backward program (programs never span two samples: per-sample partial sums)."""
    return rows_per_backward_program(T, block_m, device, MIN_BWD_ROWS_PER_PROGRAM, BWD_PROGRAMS_PER_SM, groups=B)


def norm_modulate_bwd(
    dout: Tensor, dh_in: Optional[Tensor], x: Tensor, y: Optional[Tensor], gate: Optional[Tensor],
    weight: Optional[Tensor], scale: Tensor, mean: Optional[Tensor], rstd: Tensor, *, block_m: Optional[int] = None,
    num_warps: Optional[int] = None, rows_per_program: Optional[int] = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Both norms (mean None: RMSNorm), with or without the residual (y, gate both None: without).

    -> dx (B, T, D) in x's dtype, dy (B, T, D) in y's dtype (dx itself without the residual), and the fp32
    parameter gradients by name: shift, scale (B, D), gate (B, D) with the residual, weight (D,) with a weight.
    """
    B, T, D = x.shape
    has_residual = y is not None
    has_weight = weight is not None
    dout, x = _rows(dout), _rows(x)
    y = _rows(y) if has_residual else x
    dh_in = _rows(dh_in) if dh_in is not None else None
    gate = _param_rows(gate) if has_residual else x
    weight = weight.contiguous() if has_weight else x
    scale = _param_rows(scale)
    rstd = _rows(rstd)
    mean = _rows(mean) if mean is not None else None

    config = row_tile_config(D, BWD_TILE_ELEMENTS, elements_per_thread=8)
    block_m = block_m or config.BLOCK_M
    if rows_per_program is None:
        rows_per_program = backward_rows_per_program(B, T, block_m, x.device)
    elif rows_per_program % block_m != 0:
        raise ValueError(f"rows_per_program ({rows_per_program}) must be a multiple of block_m ({block_m})")
    num_chunks = max(cdiv(T, rows_per_program), 1)

    dx = torch.empty_like(x)
    dy = torch.empty_like(y) if has_residual else dx
    # Partial rows: dshift, dscale, then dgate and dweight when present. Every (sample, chunk) program writes its
    # full partial rows, so only an empty problem needs zeros.
    names = ["shift", "scale"] + ["gate"] * has_residual + ["weight"] * has_weight
    alloc = torch.empty if B * T > 0 else torch.zeros
    parts = dict(zip(names, alloc((len(names), B, num_chunks, D), dtype=torch.float32, device=x.device)))
    if B * T > 0:
        _norm_modulate_bwd_kernel[(B, num_chunks)](
            dout, dh_in if dh_in is not None else dout, x, y, gate, weight, scale, mean if mean is not None else rstd,
            rstd, dx, dy, parts["shift"], parts["scale"], parts.get("gate", dx), parts.get("weight", dx),
            T, D, rows_per_program,
            gate.stride(0) if has_residual else 0, scale.stride(0),
            IS_RMS_NORM=mean is None,
            HAS_RESIDUAL=has_residual,
            HAS_DH_IN=dh_in is not None,
            HAS_WEIGHT=has_weight,
            BLOCK_M=block_m,
            BLOCK_D=config.BLOCK_D,
            num_warps=num_warps or config.num_warps,
        )  # fmt: skip
    # The second stage of the deterministic reduction (separate tensors, so the op's outputs do not alias).
    sums = {name: part.sum(dim=1) for name, part in parts.items()}  # (B, D) each
    if has_weight:
        sums["weight"] = sums["weight"].sum(dim=0)                  # (D,)
    return dx, dy, sums


# ---------------------------------------------------------------------------------------------------------------
# The launchers of each op (the contracts of the `coredi::*` ops; tests and benchmarks call them with explicit tiles)
# ---------------------------------------------------------------------------------------------------------------


def layernorm_modulate_fwd(
    x: Tensor, shift: Tensor, scale: Tensor, eps: float, *, block_m: Optional[int] = None,
    num_warps: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> out (B, T, D) in x's dtype, mean (B, T), rstd (B, T) fp32."""
    tiles = dict(block_m=block_m, num_warps=num_warps)
    _, out, mean, rstd = norm_modulate_fwd(x, None, None, None, shift, scale, eps, is_rms_norm=False, **tiles)
    return out, mean, rstd


def gated_residual_layernorm_modulate_fwd(
    x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float, *, block_m: Optional[int] = None,
    num_warps: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> h, out (B, T, D) in x's dtype, mean (B, T), rstd (B, T) fp32 of h."""
    tiles = dict(block_m=block_m, num_warps=num_warps)
    return norm_modulate_fwd(x, y, gate, None, shift, scale, eps, is_rms_norm=False, **tiles)


def rmsnorm_modulate_fwd(
    x: Tensor, weight: Optional[Tensor], shift: Tensor, scale: Tensor, eps: float, *, block_m: Optional[int] = None,
    num_warps: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """-> out (B, T, D) in x's dtype, rstd (B, T) fp32."""
    tiles = dict(block_m=block_m, num_warps=num_warps)
    _, out, _, rstd = norm_modulate_fwd(x, None, None, weight, shift, scale, eps, is_rms_norm=True, **tiles)
    return out, rstd


def gated_residual_rmsnorm_modulate_fwd(
    x: Tensor, y: Tensor, gate: Tensor, weight: Optional[Tensor], shift: Tensor, scale: Tensor, eps: float, *,
    block_m: Optional[int] = None, num_warps: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> h, out (B, T, D) in x's dtype, rstd (B, T) fp32 of h."""
    tiles = dict(block_m=block_m, num_warps=num_warps)
    h, out, _, rstd = norm_modulate_fwd(x, y, gate, weight, shift, scale, eps, is_rms_norm=True, **tiles)
    return h, out, rstd


def layernorm_modulate_bwd(
    dout: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor, *, block_m: Optional[int] = None,
    num_warps: Optional[int] = None, rows_per_program: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> dx (B, T, D) in x's dtype, dshift (B, D), dscale (B, D) fp32."""
    tiles = dict(block_m=block_m, num_warps=num_warps, rows_per_program=rows_per_program)
    dx, _, sums = norm_modulate_bwd(dout, None, x, None, None, None, scale, mean, rstd, **tiles)
    return dx, sums["shift"], sums["scale"]


def gated_residual_layernorm_modulate_bwd(
    dout: Tensor, dh_in: Optional[Tensor], h: Tensor, y: Tensor, gate: Tensor, scale: Tensor, mean: Tensor,
    rstd: Tensor, *, block_m: Optional[int] = None, num_warps: Optional[int] = None,
    rows_per_program: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> dx (= dh), dy (B, T, D) in h's / y's dtype; dgate, dshift, dscale (B, D) fp32."""
    tiles = dict(block_m=block_m, num_warps=num_warps, rows_per_program=rows_per_program)
    dx, dy, sums = norm_modulate_bwd(dout, dh_in, h, y, gate, None, scale, mean, rstd, **tiles)
    return dx, dy, sums["gate"], sums["shift"], sums["scale"]


def rmsnorm_modulate_bwd(
    dout: Tensor, x: Tensor, weight: Optional[Tensor], scale: Tensor, rstd: Tensor, *,
    block_m: Optional[int] = None, num_warps: Optional[int] = None, rows_per_program: Optional[int] = None,
) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """-> dx (B, T, D) in x's dtype, dweight (D,) fp32 or None, dshift (B, D), dscale (B, D) fp32."""
    tiles = dict(block_m=block_m, num_warps=num_warps, rows_per_program=rows_per_program)
    dx, _, sums = norm_modulate_bwd(dout, None, x, None, None, weight, scale, None, rstd, **tiles)
    return dx, sums.get("weight"), sums["shift"], sums["scale"]


def gated_residual_rmsnorm_modulate_bwd(
    dout: Tensor, dh_in: Optional[Tensor], h: Tensor, y: Tensor, gate: Tensor, weight: Optional[Tensor],
    scale: Tensor, rstd: Tensor, *, block_m: Optional[int] = None, num_warps: Optional[int] = None,
    rows_per_program: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Tensor, Tensor]:
    """-> dx (= dh), dy (B, T, D) in h's / y's dtype; dgate (B, D), dweight (D,) or None, dshift, dscale fp32."""
    tiles = dict(block_m=block_m, num_warps=num_warps, rows_per_program=rows_per_program)
    dx, dy, sums = norm_modulate_bwd(dout, dh_in, h, y, gate, weight, scale, None, rstd, **tiles)
    return dx, dy, sums["gate"], sums.get("weight"), sums["shift"], sums["scale"]
