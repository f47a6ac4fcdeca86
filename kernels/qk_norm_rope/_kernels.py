"""Triton kernels and launchers for JiT's attention prologue: per-head RMSNorm of q and k (qk-norm), then RoPE
(and the same with a per-head LayerNorm, the qk-norm of timm/REPA/LightningDiT's LayerNorm models: IS_LAYER_NORM).

The packed projection qkv (B, T, 3, H, Dh), contiguous, is read as a matrix of B·T·3·H *head rows* of Dh values:
head row s holds token s // 3H, part (s // H) % 3 (0: q, 1: k, 2: v), head s % H. One grid over all head rows
serves q, k and v alike, so every program reads one contiguous span of qkv.

Forward, per head row x (Dh values, all arithmetic fp32):
    q, k rows:  y = R_t (x·rstd·w),  rstd = 1/sqrt(mean_Dh(x²) + eps),  w = q_weight or k_weight (or 1)
                LayerNorm: x centred first (x − mean_Dh(x)), and + b (q_bias or k_bias) after w
    v rows:     y = x
R_t rotates the channel pairs (2j, 2j + 1) by the angle of token t = token % T: (a, b) -> (a·cos − b·sin,
b·cos + a·sin), cos/sin read from the (T, Dh/2) tables. A tile of head rows is reshaped to (rows, Dh/2, 2) and split
into its even and odd channels (`tl.split`), rotated, and joined back, so loads and stores stay contiguous 16-byte
vectors; Dh need not be a power of two (Dh = 80 for JiT-H: the padded lanes are masked).

Output layout. q, k and v are each written to their own buffer laid out (B, T, H, Dh) in memory and returned as
(B, H, T, Dh) tensors with strides (T·H·Dh, Dh, H·Dh, 1) — exactly the transposed views an eager JiT passes to
attention, and the layout the attention kernels want: cuDNN SDPA allocates its output in q's layout, so a
(B, T, H, Dh) q makes the output's `transpose(1, 2).reshape(B, T, D)` before `proj` free, and the upstream gradient
that reshape hands back in the backward has the output's layout again. A contiguous (B, H, T, Dh) q would cost a
copy of the attention output in the forward (and a re-layout of its gradient for cuDNN's backward). FlashAttention
takes (B, T, H, Dh) natively.

Why v is a copy written by this kernel, not a view of qkv: SDPA would take the strided view without an extra pass,
but a custom op may not return a view of its input, and a view made outside the op would send v's gradient around
the op's backward: autograd would then add a zero-filled (B, T, 3, H, Dh) gradient carrying dv to the op's dqkv,
two extra full passes over dqkv per step. Copying v here costs one extra read and write of v (a third of qkv) in the
forward, and the backward kernel writes dv into dqkv in the same pass as dq and dk — the stack that eager autograd
runs anyway.

Backward, per q/k head row with x̂ = x·rstd (rstd recomputed: the row is read anyway, so storing it would only add
traffic), n = x̂·w and upstream gradient dy:
    dn = R_tᵀ dy  (rotation by minus the angle),   gx = dn·w
    dx = rstd·(gx − x̂·mean_Dh(gx·x̂)),   dw = Σ over q (or k) head rows of dn·x̂
v rows copy dv into dqkv. dq, dk, dv may have any strides with a unit last stride (SDPA's gradients come in its
own layouts). The weight gradients are reduced in two deterministic stages, as in norm_modulate's backward: program
p walks a fixed span of `rows_per_program` head rows, accumulates dn·x̂ in registers and writes one fp32 partial row
per weight into a (P, 2, Dh) buffer; the launcher sums the P partials. No atomics: bit-identical results run to run.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._utils import cdiv, row_tile_config, rows_per_backward_program
from .reference import empty_heads_first

# Tile sizes (values per tile): the forward holds ~4 tile-sized tensors live, the backward ~8 plus two accumulators.
FWD_TILE_ELEMENTS = 4096
BWD_TILE_ELEMENTS = 2048
# Head rows per backward program at least this many, so the (P, 2, Dh) fp32 partials stay a small share of traffic.
MIN_BWD_ROWS_PER_PROGRAM = 256
# Backward programs to aim for per SM: enough to hide the latency of each program's loop.
BWD_PROGRAMS_PER_SM = 8


@triton.jit
def _split_head_rows(s, H, T):
    """Head rows s (int64) of qkv -> (part: 0 q, 1 k, 2 v; head h; token index b·T + t; position t)."""
    three_h = 3 * H
    token = s // three_h
    j = s - token * three_h
    part = j // H
    return part, j - part * H, token, token % T


@triton.jit
def _rotate_pairs(x, cos, sin, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """x (BLOCK_S, BLOCK_D) -> each channel pair (2j, 2j + 1) rotated: (a·cos − b·sin, b·cos + a·sin), with cos and
    sin (BLOCK_S, BLOCK_D / 2) per pair."""
    even, odd = tl.split(tl.reshape(x, [BLOCK_S, BLOCK_D // 2, 2]))
    return tl.reshape(tl.join(even * cos - odd * sin, odd * cos + even * sin), [BLOCK_S, BLOCK_D])


@triton.jit
def _load_rope_tables(COS, SIN, t, row_mask, Dh, BLOCK_D: tl.constexpr):
    """cos, sin (BLOCK_S, BLOCK_D / 2) fp32 of the tokens at positions t; padded pairs get the identity rotation."""
    half = Dh // 2
    pairs = tl.arange(0, BLOCK_D // 2)
    mask = row_mask[:, None] & (pairs < half)[None, :]
    offsets = t[:, None] * half + pairs[None, :]
    cos = tl.load(COS + offsets, mask=mask, other=1.0).to(tl.float32)
    sin = tl.load(SIN + offsets, mask=mask, other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def _centred(x, col_mask, Dh):
    """x − its mean over the Dh real lanes of each row (LayerNorm); padded lanes stay 0."""
    mean = tl.sum(x, axis=1) / Dh
    return tl.where(col_mask[None, :], x - mean[:, None], 0.0)


@triton.jit
def _load_pair(QP, KP, cols, col_mask, absent, HAS_Q: tl.constexpr, HAS_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """The q and k (Dh,) parameter rows in fp32 (a weight or a bias); `absent` where there is none, 0 on padding."""
    q = tl.full([BLOCK_D], absent, tl.float32)
    k = tl.full([BLOCK_D], absent, tl.float32)
    if HAS_Q:
        q = tl.load(QP + cols, mask=col_mask, other=0.0).to(tl.float32)
    if HAS_K:
        k = tl.load(KP + cols, mask=col_mask, other=0.0).to(tl.float32)
    return q, k


@triton.jit
def _qk_norm_rope_fwd_kernel(
    QKV,  # (B·T·3·H, Dh) head rows, contiguous
    QW,  # (Dh,) q_norm weight (only read if HAS_Q_WEIGHT)
    KW,  # (Dh,) k_norm weight (only read if HAS_K_WEIGHT)
    QB,  # (Dh,) q_norm bias (only read if HAS_Q_BIAS)
    KB,  # (Dh,) k_norm bias (only read if HAS_K_BIAS)
    COS,  # (T, Dh/2) cos of each pair's angle, contiguous (only read if HAS_ROPE)
    SIN,  # (T, Dh/2) sin
    Q,  # output (B·T·H, Dh): q in (B, T, H, Dh) memory order
    K,  # output (B·T·H, Dh): k
    V,  # output (B·T·H, Dh): v
    n_rows,  # B·T·3·H
    H,
    T,
    Dh,
    eps,
    HAS_Q_WEIGHT: tl.constexpr,
    HAS_K_WEIGHT: tl.constexpr,
    HAS_Q_BIAS: tl.constexpr,
    HAS_K_BIAS: tl.constexpr,
    IS_LAYER_NORM: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    BLOCK_S: tl.constexpr,  # head rows per program
    BLOCK_D: tl.constexpr,  # next power of two >= Dh
):
    s = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_D)
    row_mask = s < n_rows
    col_mask = cols < Dh
    mask = row_mask[:, None] & col_mask[None, :]
    part, h, token, t = _split_head_rows(s, H, T)
    is_q = (part == 0)[:, None]

    x = tl.load(QKV + s[:, None] * Dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if IS_LAYER_NORM:  # centre the q and k rows in place; v rows keep their values (one tile fewer held live)
        mean = tl.sum(x, axis=1) / Dh
        x = tl.where(col_mask[None, :] & (part < 2)[:, None], x - mean[:, None], x)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / Dh + eps)  # masked lanes hold 0
    wq, wk = _load_pair(QW, KW, cols, col_mask, 1.0, HAS_Q_WEIGHT, HAS_K_WEIGHT, BLOCK_D)
    y = x * rstd[:, None] * tl.where(is_q, wq[None, :], wk[None, :])
    if HAS_Q_BIAS or HAS_K_BIAS:
        bq, bk = _load_pair(QB, KB, cols, col_mask, 0.0, HAS_Q_BIAS, HAS_K_BIAS, BLOCK_D)
        y += tl.where(is_q, bq[None, :], bk[None, :])
    if HAS_ROPE:
        cos, sin = _load_rope_tables(COS, SIN, t, row_mask, Dh, BLOCK_D)
        y = _rotate_pairs(y, cos, sin, BLOCK_S, BLOCK_D)
    y = tl.where((part == 2)[:, None], x, y)  # v passes through (its statistics above are simply unused)

    # Each head row goes to the buffer of its part; the three masks are disjoint.
    out = (token * H + h)[:, None] * Dh + cols[None, :]
    tl.store(Q + out, y.to(Q.dtype.element_ty), mask=mask & is_q)
    tl.store(K + out, y.to(K.dtype.element_ty), mask=mask & (part == 1)[:, None])
    tl.store(V + out, y.to(V.dtype.element_ty), mask=mask & (part == 2)[:, None])


@triton.jit
def _qk_norm_rope_bwd_kernel(
    DQ,  # upstream gradient of q, (B, H, T, Dh) with strides (stride_qb, stride_qh, stride_qt, 1)
    DK,  # of k, strides (stride_kb, stride_kh, stride_kt, 1)
    DV,  # of v, strides (stride_vb, stride_vh, stride_vt, 1)
    QKV,  # (B·T·3·H, Dh) head rows, contiguous (the forward's input)
    QW,  # (Dh,) (only read if HAS_Q_WEIGHT)
    KW,  # (Dh,) (only read if HAS_K_WEIGHT)
    COS,  # (T, Dh/2) (only read if HAS_ROPE)
    SIN,
    DQKV,  # output (B·T·3·H, Dh), contiguous like QKV
    DW_PART,  # output (P, PARTS, Dh) fp32: per-program partial sums of dq_weight (row 0), dk_weight (row 1),
              # dq_bias (row 2), dk_bias (row 3)
    n_rows,
    H,
    T,
    Dh,
    eps,
    rows_per_program,  # head rows each program walks (a multiple of BLOCK_S)
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    HAS_Q_WEIGHT: tl.constexpr,
    HAS_K_WEIGHT: tl.constexpr,
    HAS_Q_BIAS: tl.constexpr,
    HAS_K_BIAS: tl.constexpr,
    IS_LAYER_NORM: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    PARTS: tl.constexpr,  # rows of DW_PART per program: 2, or 4 with biases
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < Dh
    wq, wk = _load_pair(QW, KW, cols, col_mask, 1.0, HAS_Q_WEIGHT, HAS_K_WEIGHT, BLOCK_D)
    acc_dwq = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    acc_dwk = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    acc_dbq = tl.zeros([BLOCK_D], dtype=tl.float32)  # reduced per tile: two fewer tile-sized accumulators
    acc_dbk = tl.zeros([BLOCK_D], dtype=tl.float32)

    start = pid.to(tl.int64) * rows_per_program
    end = tl.minimum(start + rows_per_program, n_rows)
    for s0 in range(start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < end)[:, None] & col_mask[None, :]
        part, h, token, t = _split_head_rows(s, H, T)
        b = token // T
        is_q = (part == 0)[:, None]
        is_k = (part == 1)[:, None]
        is_v = (part == 2)[:, None]

        # The upstream gradient of each head row, from the tensor of its part (disjoint masks: one load per lane).
        dq_off = (b * stride_qb + h * stride_qh + t * stride_qt)[:, None] + cols[None, :]
        dk_off = (b * stride_kb + h * stride_kh + t * stride_kt)[:, None] + cols[None, :]
        dv_off = (b * stride_vb + h * stride_vh + t * stride_vt)[:, None] + cols[None, :]
        dy = tl.load(DQ + dq_off, mask=mask & is_q, other=0.0).to(tl.float32)
        dy += tl.load(DK + dk_off, mask=mask & is_k, other=0.0).to(tl.float32)
        dy += tl.load(DV + dv_off, mask=mask & is_v, other=0.0).to(tl.float32)

        rows = s[:, None] * Dh + cols[None, :]
        x = tl.load(QKV + rows, mask=mask & (part < 2)[:, None], other=0.0).to(tl.float32)  # v is not needed
        if IS_LAYER_NORM:
            x = _centred(x, col_mask, Dh)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / Dh + eps)
        xhat = x * rstd[:, None]
        dn = dy
        if HAS_ROPE:
            cos, sin = _load_rope_tables(COS, SIN, t, s < end, Dh, BLOCK_D)
            dn = _rotate_pairs(dy, cos, -sin, BLOCK_S, BLOCK_D)  # Rᵀ: the rotation by minus the angle
        if HAS_Q_WEIGHT:
            acc_dwq += tl.where(is_q, dn * xhat, 0.0)
        if HAS_K_WEIGHT:
            acc_dwk += tl.where(is_k, dn * xhat, 0.0)
        if HAS_Q_BIAS:
            acc_dbq += tl.sum(tl.where(is_q, dn, 0.0), axis=0)
        if HAS_K_BIAS:
            acc_dbk += tl.sum(tl.where(is_k, dn, 0.0), axis=0)
        gx = dn * tl.where(is_q, wq[None, :], wk[None, :])
        mean_gx_xhat = tl.sum(gx * xhat, axis=1) / Dh
        if IS_LAYER_NORM:  # the centring's term: gx − mean(gx) − x̂·mean(gx·x̂)
            gx -= (tl.sum(gx, axis=1) / Dh)[:, None]
        dx = rstd[:, None] * (gx - xhat * mean_gx_xhat[:, None])
        tl.store(DQKV + rows, tl.where(is_v, dy, dx).to(DQKV.dtype.element_ty), mask=mask)

    part_row = pid.to(tl.int64) * PARTS * Dh + cols
    if HAS_Q_WEIGHT:
        tl.store(DW_PART + part_row, tl.sum(acc_dwq, axis=0), mask=col_mask)
    if HAS_K_WEIGHT:
        tl.store(DW_PART + part_row + Dh, tl.sum(acc_dwk, axis=0), mask=col_mask)
    if HAS_Q_BIAS:
        tl.store(DW_PART + part_row + 2 * Dh, acc_dbq, mask=col_mask)
    if HAS_K_BIAS:
        tl.store(DW_PART + part_row + 3 * Dh, acc_dbk, mask=col_mask)


# ---------------------------------------------------------------------------------------------------------------
# Launchers (the contracts of the `coredi::qk_norm_rope_*` ops). qkv (B, T, 3, H, Dh); weights (Dh,) or None;
# cos, sin (T, Dh/2) or both None. `block_s` / `num_warps` / `rows_per_program` override the heuristics (tests use
# them to make tiles straddle q/k/v and tokens and to split the reduction over many programs; tuning sweeps).
# ---------------------------------------------------------------------------------------------------------------


def _optional(t: Optional[Tensor], fallback: Tensor) -> Tensor:
    """A contiguous t, or any valid pointer for an argument the kernel's flags say it never reads."""
    return t.contiguous() if t is not None else fallback


def _unit_last_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def qk_norm_rope_fwd(
    qkv: Tensor, q_weight: Optional[Tensor], k_weight: Optional[Tensor], cos: Optional[Tensor],
    sin: Optional[Tensor], eps: float, *, block_s: Optional[int] = None, num_warps: Optional[int] = None,
    q_bias: Optional[Tensor] = None, k_bias: Optional[Tensor] = None, layer_norm: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> q, k, v, each (B, H, T, Dh) in qkv's dtype with (B, T, H, Dh) memory order (see the module docstring).
    layer_norm: LayerNorm qk-norm (q_bias / k_bias (Dh,) or None) instead of RMSNorm (no biases)."""
    B, T, _, H, Dh = qkv.shape
    qkv = qkv.contiguous()
    q, k, v = empty_heads_first(qkv), empty_heads_first(qkv), empty_heads_first(qkv)
    n_rows = B * T * 3 * H
    if n_rows == 0:
        return q, k, v
    # The LayerNorm form holds the biases' tile too: half the rows per tile keeps it within the RMSNorm form's
    # registers (sm_90a at Dh = 72: 96 per thread instead of 169-205 with the full tile, hopper_compile_check.py).
    config = row_tile_config(Dh, FWD_TILE_ELEMENTS // (2 if layer_norm else 1), max_block_m=128)
    block_s = block_s or config.BLOCK_M
    _qk_norm_rope_fwd_kernel[(cdiv(n_rows, block_s),)](
        qkv, _optional(q_weight, qkv), _optional(k_weight, qkv), _optional(q_bias, qkv), _optional(k_bias, qkv),
        _optional(cos, qkv), _optional(sin, qkv),
        q, k, v,
        n_rows, H, T, Dh, float(eps),
        HAS_Q_WEIGHT=q_weight is not None,
        HAS_K_WEIGHT=k_weight is not None,
        HAS_Q_BIAS=q_bias is not None,
        HAS_K_BIAS=k_bias is not None,
        IS_LAYER_NORM=layer_norm,
        HAS_ROPE=cos is not None,
        BLOCK_S=block_s,
        BLOCK_D=config.BLOCK_D,
        num_warps=num_warps or config.num_warps,
    )  # fmt: skip
    return q, k, v


def backward_rows_per_program(n_rows: int, block_s: int, device: torch.device) -> int:
    """Head rows per backward program (all B·T·3·H rows form one group: the weight partials are per program)."""
    return rows_per_backward_program(n_rows, block_s, device, MIN_BWD_ROWS_PER_PROGRAM, BWD_PROGRAMS_PER_SM)


def qk_norm_rope_bwd(
    dq: Tensor, dk: Tensor, dv: Tensor, qkv: Tensor, q_weight: Optional[Tensor], k_weight: Optional[Tensor],
    cos: Optional[Tensor], sin: Optional[Tensor], eps: float, *, block_s: Optional[int] = None,
    num_warps: Optional[int] = None, rows_per_program: Optional[int] = None,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """dq, dk, dv (B, H, T, Dh), any strides. -> dqkv (B, T, 3, H, Dh) contiguous in qkv's dtype; dq_weight,
    dk_weight (Dh,) fp32 (None without that weight)."""
    dqkv, dq_weight, dk_weight, _, _ = qk_layernorm_rope_bwd(
        dq, dk, dv, qkv, q_weight, None, k_weight, None, cos, sin, eps, block_s=block_s, num_warps=num_warps,
        rows_per_program=rows_per_program, layer_norm=False)
    return dqkv, dq_weight, dk_weight


def qk_layernorm_rope_bwd(
    dq: Tensor, dk: Tensor, dv: Tensor, qkv: Tensor, q_weight: Optional[Tensor], q_bias: Optional[Tensor],
    k_weight: Optional[Tensor], k_bias: Optional[Tensor], cos: Optional[Tensor], sin: Optional[Tensor], eps: float,
    *, block_s: Optional[int] = None, num_warps: Optional[int] = None, rows_per_program: Optional[int] = None,
    layer_norm: bool = True,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """The backward of the LayerNorm form (layer_norm=False: RMSNorm, without biases). -> dqkv (B, T, 3, H, Dh)
    contiguous in qkv's dtype; dq_weight, dk_weight, dq_bias, dk_bias (Dh,) fp32 (None where there is none)."""
    B, T, _, H, Dh = qkv.shape
    qkv = qkv.contiguous()
    dq, dk, dv = _unit_last_stride(dq), _unit_last_stride(dk), _unit_last_stride(dv)
    n_rows = B * T * 3 * H
    config = row_tile_config(Dh, BWD_TILE_ELEMENTS, elements_per_thread=8, max_block_m=128)
    block_s = block_s or config.BLOCK_M
    if rows_per_program is None:
        rows_per_program = backward_rows_per_program(n_rows, block_s, qkv.device)
    elif rows_per_program % block_s != 0:
        raise ValueError(f"rows_per_program ({rows_per_program}) must be a multiple of block_s ({block_s})")
    num_programs = max(cdiv(n_rows, rows_per_program), 1)

    dqkv = torch.empty_like(qkv)
    params = (q_weight, k_weight, q_bias, k_bias)
    has_params = any(p is not None for p in params)
    n_parts = 4 if q_bias is not None or k_bias is not None else 2
    # Every program writes its full partial rows, so only an empty problem needs zeros.
    alloc = torch.empty if n_rows > 0 else torch.zeros
    parts = alloc((num_programs, n_parts, Dh), dtype=torch.float32, device=qkv.device) if has_params else None
    if n_rows > 0:
        _qk_norm_rope_bwd_kernel[(num_programs,)](
            dq, dk, dv, qkv, _optional(q_weight, qkv), _optional(k_weight, qkv), _optional(cos, qkv),
            _optional(sin, qkv), dqkv, parts if has_params else dqkv,
            n_rows, H, T, Dh, float(eps), rows_per_program,
            dq.stride(0), dq.stride(1), dq.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            HAS_Q_WEIGHT=q_weight is not None,
            HAS_K_WEIGHT=k_weight is not None,
            HAS_Q_BIAS=q_bias is not None,
            HAS_K_BIAS=k_bias is not None,
            IS_LAYER_NORM=layer_norm,
            HAS_ROPE=cos is not None,
            PARTS=n_parts,
            BLOCK_S=block_s,
            BLOCK_D=config.BLOCK_D,
            num_warps=num_warps or config.num_warps,
        )  # fmt: skip
    # The second stage of the deterministic reduction: one sum per parameter (separate tensors, so the op's outputs
    # do not alias each other).
    return (dqkv,) + tuple(parts[:, row].sum(dim=0) if p is not None else None for row, p in enumerate(params))
