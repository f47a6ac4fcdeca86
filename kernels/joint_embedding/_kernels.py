"""Triton kernels and launchers of the CoReDi joint embedding.

Forward, three kernels around one tiny all-reduce (done by the caller, `op.py`):

  A `_project_fwd_kernel`   rows of f (B·L, D) → p = ((f − μ_f)/σ_f)·W (fp32, N = d padded to ≥ 16 for tl.dot),
                            plus per-program statistics of its BLOCK_M rows: Σp and the tile-centred scatter
                            Σ(p − p̄_tile)(p − p̄_tile)ᵀ. The caller merges them (Chan's formula: exact, no
                            cancellation) and all-reduces them across ranks. Reading f once is this kernel's cost.
  B `_embed_inputs_kernel`  one program per BLOCK_T patch tokens: builds each token's input vector (K = (C + d)·p²
                            values) — x_t from x, noise_x, t; z_t from the 4 bilinear taps of p, the norm (μ, a, b
                            per channel), noise_z, t and the keep mask — and writes it with a trailing 1 (the
                            backward's weight and bias gradient is one GEMM on these rows), and the velocity target
                            [x − ε_x, z − ε_z].
  B' `_patch_gemm_kernel`   tokens = inputs·W_peᵀ + bias + pos on BLOCK_T × BLOCK_H tiles (tl.dot, K ≤ 256).

Backward, three kernels and one cuBLAS GEMM (the caller does the GEMM and the all-reduce):

  C `_embed_bwd_kernel`     dtokens (B·T, hidden) @ W_pe[:, z columns] → dL/dz on the image grid, times keep·t.
  D `_resize_adjoint_kernel` one program per BLOCK_R cells of the token grid: gathers the ≤ 2r × 2r image pixels whose
                            bilinear taps reach each cell (the adjoint of the resize, no atomics), adds ẑ's own
                            gradient, and writes per-program Σdẑ and Σdẑ·x̂ (the norm's backward needs their
                            global sums).
  E `_project_bwd_kernel`   dW = ((f − μ_f)/σ_f)ᵀ·dp, split over (D blocks, row ranges) with fp32 partials summed by
                            the caller; dp = a·dẑ + (p − μ)·M + c is rebuilt in registers from dẑ and p (the norm's
                            and the scatter matrix's backward folded into a, c (d,) and M (d, d)).

All reductions are deterministic (fixed per-program partials summed by torch, no atomics). Every value is fp32
after loading (the interpreter cannot do bf16 arithmetic). Dots on the big operands take `precision` ("ieee",
"tf32" or "tf32x3", chosen by the caller from torch's TF32 flags); the small d×d dots are always "ieee".
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._utils import cdiv, next_power_of_2, num_sms

# GPU tiles. Chosen to compile without register spills for sm_90 (ptxas -v, bf16 SiT-XL/2 shapes); not yet timed:
# `benchmarks/bench_joint_embedding.py --bench-sweep` measures the alternatives.
# Forward projection: BLOCK_M rows of f, BLOCK_K columns per step.
PROJECT_BLOCK_M = 64
PROJECT_BLOCK_K = 64
# Embedding: BLOCK_T tokens per input-vector program; BLOCK_T x BLOCK_H tiles of the patch GEMM; the backward's
# dtokens GEMM walks hidden in BLOCK_H slices.
INPUTS_BLOCK_T = 16
GEMM_BLOCK_T = 64
GEMM_BLOCK_H = 64
EMBED_BLOCK_T = 64
EMBED_BLOCK_H = 64
# Resize adjoint: BLOCK_R token-grid cells per program.
ADJOINT_BLOCK_R = 64
# Weight gradient: BLOCK_K columns of f per program, BLOCK_M rows per step; programs per SM to aim for.
GRAD_BLOCK_K = 64
GRAD_BLOCK_M = 64
GRAD_PROGRAMS_PER_SM = 4
# tl.dot needs every dimension >= 16.
MIN_DOT = 16


def dot_width(n: int) -> int:
    """A tl.dot dimension covering n: a power of two >= 16."""
    return max(MIN_DOT, next_power_of_2(n))


def _block(n: int, cap: int) -> int:
    return min(cap, dot_width(n))


# ---------------------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _project_fwd_kernel(
    F,  # (M, D) encoder tokens, row stride stride_f, unit column stride
    MEAN_F,  # (D,) fp32 standardization mean
    INV_STD_F,  # (D,) fp32 1 / standardization std
    W,  # (D, N) fp32 projection, contiguous
    P,  # out (M, N) fp32 projected tokens
    PART_SUM,  # out (programs, BLOCK_N) fp32: Σ p over the program's rows
    PART_SCATTER,  # out (programs, BLOCK_N, BLOCK_N) fp32: Σ (p − tile mean)(p − tile mean)ᵀ
    M,  # rows, B·L
    D,  # encoder channels
    N,  # projected channels d
    stride_f,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    f_rows = F + rows.to(tl.int64)[:, None] * stride_f

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < D
        mask = row_mask[:, None] & k_mask[None, :]
        f = tl.load(f_rows + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        mu = tl.load(MEAN_F + ks, mask=k_mask, other=0.0)
        inv_std = tl.load(INV_STD_F + ks, mask=k_mask, other=0.0)
        # Standardize in registers (not folded into W): with |μ_f| ≫ σ_f, f·(W/σ) − (μ/σ)·W would cancel.
        standardized = tl.where(mask, (f - mu[None, :]) * inv_std[None, :], 0.0)
        w = tl.load(W + ks[:, None] * N + cols[None, :], mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(standardized, w, acc, input_precision=PRECISION)

    out_mask = row_mask[:, None] & col_mask[None, :]
    tl.store(P + rows.to(tl.int64)[:, None] * N + cols[None, :], acc, mask=out_mask)

    # Tile statistics. Masked rows and columns of acc are exactly 0.
    count = tl.minimum(M - pid * BLOCK_M, BLOCK_M).to(tl.float32)
    tile_sum = tl.sum(acc, axis=0)
    centered = tl.where(row_mask[:, None], acc - (tile_sum / count)[None, :], 0.0)
    scatter = tl.dot(tl.trans(centered), centered, input_precision="ieee")
    tl.store(PART_SUM + pid * BLOCK_N + cols, tile_sum)
    square = tl.arange(0, BLOCK_N)[:, None] * BLOCK_N + cols[None, :]
    tl.store(PART_SCATTER + pid * BLOCK_N * BLOCK_N + square, scatter)


@triton.jit
def _source_index(dst, scale, SIDE):
    """Bilinear source taps (align_corners=False, as torch): dst pixel index -> (lo, hi, weight of hi)."""
    src = tl.maximum((dst.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
    lo = src.to(tl.int32)  # src >= 0: truncation is floor
    hi = tl.minimum(lo + 1, SIDE - 1)
    return lo, hi, src - lo.to(tl.float32)


@triton.jit
def _embed_inputs_kernel(
    PROJ,  # (B·L, N) fp32 projected tokens p
    NORM_MEAN,  # (N,) fp32: z = (p − mean)·scale + shift
    NORM_SCALE,  # (N,) fp32
    NORM_SHIFT,  # (N,) fp32
    X,  # (B, C, H, W) image stream, contiguous
    NOISE_X,  # (B, C, H, W) contiguous
    NOISE_Z,  # (B, N, H, W) contiguous
    TIME,  # (B,) fp32
    KEEP,  # (B,) fp32 feature keep mask (only read if HAS_KEEP)
    PATCHES,  # out (B·T, K + 1): each token's input vector, columns (channel, i, j), and a trailing 1
    TARGET,  # out (B, C + N, H, W): [x − noise_x, z − noise_z]
    M,  # tokens, B·T
    T,  # tokens per sample
    K,  # (C + N)·p²
    N,  # feature channels d
    C,  # image channels
    H,
    W,
    GRID_W,  # W / p, patches per row
    SIDE,  # √L, side of the feature grid
    scale_h,  # SIDE / H
    scale_w,  # SIDE / W
    PATCH: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,  # >= K + 1
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < M
    ks = tl.arange(0, BLOCK_K)

    # Token -> (sample, patch row, patch column); column k -> (channel, i, j) -> pixel (py, px).
    sample = rows // T
    token = rows % T
    py = (token // GRID_W)[:, None] * PATCH + ((ks % (PATCH * PATCH)) // PATCH)[None, :]
    px = (token % GRID_W)[:, None] * PATCH + (ks % PATCH)[None, :]
    channel = (ks // (PATCH * PATCH))[None, :]
    valid = row_mask[:, None] & (ks < K)[None, :]
    is_image = valid & (channel < C)
    is_feature = valid & (channel >= C)
    pixel = py * W + px
    sample64 = sample.to(tl.int64)[:, None]
    t = tl.load(TIME + sample, mask=row_mask, other=0.0)[:, None]

    # Image channels: x_t = t·x + (1 − t)·ε_x.
    image_offsets = (sample64 * C + channel) * H * W + pixel
    xv = tl.load(X + image_offsets, mask=is_image, other=0.0).to(tl.float32)
    nx = tl.load(NOISE_X + image_offsets, mask=is_image, other=0.0).to(tl.float32)

    # Feature channels: z = Norm(bilinear taps of p), z_t = keep·(t·z + (1 − t)·ε_z).
    feature = tl.where(is_feature, channel - C, 0)
    y0, y1, wy = _source_index(py, scale_h, SIDE)
    x0, x1, wx = _source_index(px, scale_w, SIDE)
    cell = sample64 * SIDE * SIDE
    p00 = tl.load(PROJ + (cell + y0 * SIDE + x0) * N + feature, mask=is_feature, other=0.0)
    p01 = tl.load(PROJ + (cell + y0 * SIDE + x1) * N + feature, mask=is_feature, other=0.0)
    p10 = tl.load(PROJ + (cell + y1 * SIDE + x0) * N + feature, mask=is_feature, other=0.0)
    p11 = tl.load(PROJ + (cell + y1 * SIDE + x1) * N + feature, mask=is_feature, other=0.0)
    # Interpolating p and normalizing afterwards equals normalizing first: the norm is affine per channel and the
    # bilinear weights sum to 1.
    interpolated = (1.0 - wy) * ((1.0 - wx) * p00 + wx * p01) + wy * ((1.0 - wx) * p10 + wx * p11)
    mean = tl.load(NORM_MEAN + feature, mask=is_feature, other=0.0)
    scale = tl.load(NORM_SCALE + feature, mask=is_feature, other=0.0)
    shift = tl.load(NORM_SHIFT + feature, mask=is_feature, other=0.0)
    z = (interpolated - mean) * scale + shift
    feature_offsets = (sample64 * N + feature) * H * W + pixel
    nz = tl.load(NOISE_Z + feature_offsets, mask=is_feature, other=0.0).to(tl.float32)
    z_t = t * z + (1.0 - t) * nz
    if HAS_KEEP:
        z_t = z_t * tl.load(KEEP + sample, mask=row_mask, other=0.0)[:, None]

    target = tl.where(is_image, xv - nx, z - nz)
    target_offsets = (sample64 * (C + N) + channel) * H * W + pixel
    tl.store(TARGET + target_offsets, target.to(TARGET.dtype.element_ty), mask=valid)
    inputs = tl.where(is_image, t * xv + (1.0 - t) * nx, tl.where(is_feature, z_t, 1.0))  # 1 in column K
    patch_offsets = rows.to(tl.int64)[:, None] * (K + 1) + ks[None, :]
    tl.store(PATCHES + patch_offsets, inputs.to(PATCHES.dtype.element_ty), mask=row_mask[:, None] & (ks <= K)[None, :])


@triton.jit
def _patch_gemm_kernel(
    PATCHES,  # (M, K + 1) token input vectors (column K, the constant 1, is not read)
    WPE_T,  # (BLOCK_K, HIDDEN) transposed patch weight, rows ordered (channel, i, j), zero rows from K on
    BIAS,  # (HIDDEN,) (only read if HAS_BIAS)
    POS,  # (T, HIDDEN) position table, contiguous (only read if HAS_POS)
    TOKENS,  # out (M, HIDDEN)
    M,
    T,
    HIDDEN,
    K,
    HAS_BIAS: tl.constexpr,
    HAS_POS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ks = tl.arange(0, BLOCK_K)
    row_mask = rows < M
    h_mask = hs < HIDDEN
    rows64 = rows.to(tl.int64)[:, None]
    inputs = tl.load(PATCHES + rows64 * (K + 1) + ks[None, :], mask=row_mask[:, None] & (ks < K)[None, :], other=0.0)
    weight = tl.load(WPE_T + ks[:, None] * HIDDEN + hs[None, :], mask=h_mask[None, :], other=0.0)
    # 16-bit values are exact in TF32, so for bf16/fp16 inputs "tf32" equals a bf16/fp16 dot (fp32 accumulation).
    out = tl.dot(inputs.to(tl.float32), weight.to(tl.float32), input_precision=PRECISION)  # (BLOCK_T, BLOCK_H)
    if HAS_BIAS:
        out += tl.load(BIAS + hs, mask=h_mask, other=0.0).to(tl.float32)[None, :]
    out_mask = row_mask[:, None] & h_mask[None, :]
    if HAS_POS:
        token = (rows % T).to(tl.int64)[:, None]
        out += tl.load(POS + token * HIDDEN + hs[None, :], mask=out_mask, other=0.0).to(tl.float32)
    tl.store(TOKENS + rows64 * HIDDEN + hs[None, :], out.to(TOKENS.dtype.element_ty), mask=out_mask)


# ---------------------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _embed_bwd_kernel(
    DTOKENS,  # (B·T, HIDDEN) upstream gradient of the tokens, contiguous
    WPE,  # (HIDDEN, K) patch weight, contiguous; the feature columns start at C·p²
    TIME,  # (B,) fp32
    KEEP,  # (B,) fp32 (only read if HAS_KEEP)
    DZ,  # out (B, N, H, W) fp32: dL/dz on the image grid
    M,  # tokens, B·T
    T,
    HIDDEN,
    K,
    N,
    C,
    H,
    W,
    GRID_W,
    PATCH: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_KZ: tl.constexpr,  # >= N·p²
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < M
    kz = tl.arange(0, BLOCK_KZ)
    kz_mask = kz < N * PATCH * PATCH
    first_feature_column = C * PATCH * PATCH

    acc = tl.zeros((BLOCK_T, BLOCK_KZ), dtype=tl.float32)
    dtoken_rows = DTOKENS + rows.to(tl.int64)[:, None] * HIDDEN
    for h0 in range(0, HIDDEN, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_mask = hs < HIDDEN
        dtok = tl.load(dtoken_rows + hs[None, :], mask=row_mask[:, None] & h_mask[None, :], other=0.0)
        weight = tl.load(
            WPE + hs[:, None] * K + first_feature_column + kz[None, :], mask=h_mask[:, None] & kz_mask[None, :],
            other=0.0,
        )  # fmt: skip
        acc = tl.dot(dtok.to(tl.float32), weight.to(tl.float32), acc, input_precision=PRECISION)

    # z_t = keep·(t·z + (1 − t)·ε_z): dL/dz = keep·t·dL/dz_t.
    sample = rows // T
    factor = tl.load(TIME + sample, mask=row_mask, other=0.0)
    if HAS_KEEP:
        factor = factor * tl.load(KEEP + sample, mask=row_mask, other=0.0)
    token = rows % T
    feature = kz // (PATCH * PATCH)
    py = (token // GRID_W)[:, None] * PATCH + ((kz % (PATCH * PATCH)) // PATCH)[None, :]
    px = (token % GRID_W)[:, None] * PATCH + (kz % PATCH)[None, :]
    offsets = (sample.to(tl.int64)[:, None] * N + feature[None, :]) * H * W + py * W + px
    tl.store(DZ + offsets, acc * factor[:, None], mask=row_mask[:, None] & kz_mask[None, :])


@triton.jit
def _adjoint_weight(dst, cell, scale, SIDE):
    """Weight of source cell `cell` in the bilinear value at pixel `dst` (0 when its taps miss the cell)."""
    lo, hi, frac = _source_index(dst, scale, SIDE)
    return tl.where(lo == cell, 1.0 - frac, 0.0) + tl.where(hi == cell, frac, 0.0)


@triton.jit
def _resize_adjoint_kernel(
    DZ,  # (B, N, H, W) fp32 gradient on the image grid
    DZHAT_IN,  # (B·L, N) upstream gradient of ẑ (only read if HAS_DZHAT_IN)
    PROJ,  # (B·L, N) fp32 projected tokens p
    NORM_MEAN,  # (N,) fp32 the statistics the forward normalized with: x̂ = (p − mean)·rstd
    NORM_RSTD,  # (N,) fp32
    DZHAT,  # out (B·L, N) fp32 gradient of ẑ
    PART,  # out (programs, 2, BLOCK_N) fp32: Σ dẑ and Σ dẑ·x̂ over the program's cells
    R,  # token-grid cells, B·L
    L,
    N,
    H,
    W,
    SIDE,
    scale_h,  # SIDE / H
    scale_w,  # SIDE / W
    RATIO_H: tl.constexpr,  # H / SIDE
    RATIO_W: tl.constexpr,  # W / SIDE
    HAS_DZHAT_IN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    sample = rows // L
    cell = rows % L
    cy = cell // SIDE
    cx = cell % SIDE
    planes = DZ + (sample.to(tl.int64)[:, None] * N + cols[None, :]) * H * W  # (BLOCK_R, BLOCK_N) channel planes

    # With an integer ratio r, only pixels r·c − ⌈r/2⌉ ... r·c − ⌈r/2⌉ + 2r − 1 have a tap on cell c.
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for oy in tl.static_range(2 * RATIO_H):
        py = cy * RATIO_H - (RATIO_H + 1) // 2 + oy
        wy = tl.where((py >= 0) & (py < H), _adjoint_weight(py, cy, scale_h, SIDE), 0.0)
        for ox in tl.static_range(2 * RATIO_W):
            px = cx * RATIO_W - (RATIO_W + 1) // 2 + ox
            wx = tl.where((px >= 0) & (px < W), _adjoint_weight(px, cx, scale_w, SIDE), 0.0)
            weight = wy * wx
            tap_mask = mask & (weight != 0.0)[:, None]
            dz = tl.load(planes + (py * W + px)[:, None], mask=tap_mask, other=0.0)
            acc += weight[:, None] * dz

    offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
    if HAS_DZHAT_IN:
        acc += tl.load(DZHAT_IN + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(DZHAT + offsets, acc, mask=mask)

    p = tl.load(PROJ + offsets, mask=mask, other=0.0)
    mean = tl.load(NORM_MEAN + cols, mask=col_mask, other=0.0)
    rstd = tl.load(NORM_RSTD + cols, mask=col_mask, other=0.0)
    xhat = (p - mean[None, :]) * rstd[None, :]
    part = PART + pid * 2 * BLOCK_N + cols
    tl.store(part, tl.sum(acc, axis=0))
    tl.store(part + BLOCK_N, tl.sum(acc * xhat, axis=0))


@triton.jit
def _project_bwd_kernel(
    F,  # (M, D) encoder tokens, row stride stride_f
    MEAN_F,  # (D,) fp32
    INV_STD_F,  # (D,) fp32
    DZHAT,  # (M, N) fp32 gradient of ẑ
    PROJ,  # (M, N) fp32 projected tokens
    CENTER,  # (N,) fp32 batch mean μ of p
    ALPHA,  # (N,) fp32
    OFFSET,  # (N,) fp32
    MIX,  # (BLOCK_N, BLOCK_N) fp32, zero-padded: dp = alpha·dẑ + (p − μ)·MIX + offset
    PART,  # out (splits, D, N) fp32 partial dW of each row range
    M,
    D,
    N,
    stride_f,
    rows_per_program,  # a multiple of BLOCK_M
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    kb = tl.program_id(0)
    split = tl.program_id(1)
    ks = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = ks < D
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    mu_f = tl.load(MEAN_F + ks, mask=k_mask, other=0.0)
    inv_std = tl.load(INV_STD_F + ks, mask=k_mask, other=0.0)
    center = tl.load(CENTER + cols, mask=col_mask, other=0.0)
    alpha = tl.load(ALPHA + cols, mask=col_mask, other=0.0)
    offset = tl.load(OFFSET + cols, mask=col_mask, other=0.0)
    mix = tl.load(MIX + tl.arange(0, BLOCK_N)[:, None] * BLOCK_N + cols[None, :])

    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    r_start = split * rows_per_program
    r_end = tl.minimum(r_start + rows_per_program, M)
    for r0 in range(r_start, r_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_mask = rows < r_end
        rows64 = rows.to(tl.int64)[:, None]
        mask = row_mask[:, None] & col_mask[None, :]
        dzhat = tl.load(DZHAT + rows64 * N + cols[None, :], mask=mask, other=0.0)
        p = tl.load(PROJ + rows64 * N + cols[None, :], mask=mask, other=0.0)
        centered = tl.where(mask, p - center[None, :], 0.0)
        dp = alpha[None, :] * dzhat + tl.dot(centered, mix, input_precision="ieee") + offset[None, :]
        dp = tl.where(mask, dp, 0.0)
        f_mask = row_mask[:, None] & k_mask[None, :]
        f = tl.load(F + rows64 * stride_f + ks[None, :], mask=f_mask, other=0.0).to(tl.float32)
        standardized = tl.where(f_mask, (f - mu_f[None, :]) * inv_std[None, :], 0.0)
        acc = tl.dot(tl.trans(standardized), dp, acc, input_precision=PRECISION)

    out = PART + split.to(tl.int64) * D * N + ks[:, None] * N + cols[None, :]
    tl.store(out, acc, mask=k_mask[:, None] & col_mask[None, :])


# ---------------------------------------------------------------------------------------------------------------
# Launchers. Shapes as in `reference` (the same contract as its `*_torch` functions). `block_*` arguments override
# the tiles (tests use them to make tiles cross samples and split rows; tuning sweeps).
# ---------------------------------------------------------------------------------------------------------------


def _rows(t: Tensor) -> Tensor:
    """A 2-D view with unit column stride (copies only when the columns are strided)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _standardization(feature_mean: Tensor, feature_std: Tensor) -> tuple[Tensor, Tensor]:
    return feature_mean.float().contiguous(), feature_std.float().reciprocal().contiguous()


def project(
    features: Tensor, weight: Tensor, feature_mean: Tensor, feature_std: Tensor, *, precision: str = "ieee",
    block_m: Optional[int] = None, block_k: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> projected (B·L, d) fp32, counts (P,), sums (P, d), scatters (P, d, d): one partial per program."""
    f = _rows(features)
    M, D = f.shape
    d = weight.shape[1]
    block_m = block_m or (min(PROJECT_BLOCK_M, dot_width(M)) if f.is_cuda else dot_width(min(M, 256)))
    block_k = block_k or _block(D, PROJECT_BLOCK_K if f.is_cuda else 1024)
    block_n = dot_width(d)
    programs = cdiv(M, block_m)
    mean, inv_std = _standardization(feature_mean, feature_std)
    projected = torch.empty((M, d), dtype=torch.float32, device=f.device)
    sums = torch.empty((programs, block_n), dtype=torch.float32, device=f.device)
    scatters = torch.empty((programs, block_n, block_n), dtype=torch.float32, device=f.device)
    _project_fwd_kernel[(programs,)](
        f, mean, inv_std, weight.float().contiguous(), projected, sums, scatters,
        M, D, d, f.stride(0),
        PRECISION=precision, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n,
        num_warps=4,
    )  # fmt: skip
    counts = (M - torch.arange(programs, device=f.device, dtype=torch.float32) * block_m).clamp(max=block_m)
    return projected, counts, sums[:, :d], scatters[:, :d, :d]


def embed(
    projected: Tensor, norm_mean: Tensor, norm_scale: Tensor, norm_shift: Tensor, x: Tensor, noise_x: Tensor,
    noise_z: Tensor, t: Tensor, feature_keep: Optional[Tensor], patch_weight: Tensor, patch_bias: Optional[Tensor],
    pos_embed: Optional[Tensor], out_dtype: torch.dtype, *, precision: str = "ieee", block_t: Optional[int] = None,
    block_h: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> tokens (B, T, hidden) in out_dtype, target (B, C + d, H, W) in x's dtype, patches (B·T, K + 1) in out_dtype.

    Two kernels: the input vectors (written anyway: the weight gradient needs them), then the patch GEMM. Building
    the vectors and multiplying them in one kernel spills registers at every tile tried (ptxas, sm_90), and the
    split costs one read of the (B·T, K + 1) patches, ~4% of the tokens' bytes at SiT-XL/2.
    """
    B, C, H, W = x.shape
    d = projected.shape[1]
    hidden, channels, p, _ = patch_weight.shape
    T = (H // p) * (W // p)
    M = B * T
    K = channels * p * p
    side = round((projected.shape[0] // B) ** 0.5)
    block_k = dot_width(K + 1)
    x, noise_x, noise_z = x.contiguous(), noise_x.contiguous(), noise_z.contiguous()
    target = torch.empty((B, C + d, H, W), dtype=x.dtype, device=x.device)
    patches = torch.empty((M, K + 1), dtype=out_dtype, device=x.device)
    keep = feature_keep.float().contiguous() if feature_keep is not None else t
    block_rows = block_t or (INPUTS_BLOCK_T if x.is_cuda else dot_width(min(M, 256)))
    _embed_inputs_kernel[(cdiv(M, block_rows),)](
        projected, norm_mean.float().contiguous(), norm_scale.float().contiguous(), norm_shift.float().contiguous(),
        x, noise_x, noise_z, t.float().contiguous(), keep, patches, target,
        M, T, K, d, C, H, W, W // p, side, side / H, side / W,
        PATCH=p, HAS_KEEP=feature_keep is not None, BLOCK_T=block_rows, BLOCK_K=block_k,
        num_warps=4,
    )  # fmt: skip

    weight_t = patch_weight.new_zeros((block_k, hidden))
    weight_t[:K] = patch_weight.reshape(hidden, K).T
    bias = patch_bias.contiguous() if patch_bias is not None else weight_t
    pos = pos_embed.reshape(T, hidden).contiguous() if pos_embed is not None else weight_t
    tokens = torch.empty((B, T, hidden), dtype=out_dtype, device=x.device)
    block_t = block_t or (GEMM_BLOCK_T if x.is_cuda else dot_width(min(M, 256)))
    block_h = block_h or _block(hidden, GEMM_BLOCK_H if x.is_cuda else 4096)
    _patch_gemm_kernel[(cdiv(M, block_t), cdiv(hidden, block_h))](
        patches, weight_t, bias, pos, tokens,
        M, T, hidden, K,
        HAS_BIAS=patch_bias is not None, HAS_POS=pos_embed is not None, PRECISION=precision,
        BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_H=block_h,
        num_warps=4,
    )  # fmt: skip
    return tokens, target, patches


def embed_bwd(
    dtokens: Tensor, dz_hat: Optional[Tensor], projected: Tensor, norm_mean: Tensor, norm_rstd: Tensor, t: Tensor,
    feature_keep: Optional[Tensor], patch_weight: Tensor, image_channels: int, height: int, width: int, *,
    precision: str = "ieee", block_t: Optional[int] = None, block_h: Optional[int] = None,
    block_r: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """-> dẑ (B·L, d) fp32 and partial sums (P, 2, d): Σ dẑ and Σ dẑ·x̂ per program."""
    B, T, hidden = dtokens.shape
    R, d = projected.shape
    L = R // B
    side = round(L**0.5)
    _, channels, p, _ = patch_weight.shape
    K = channels * p * p
    M = B * T
    dtokens = dtokens.contiguous()
    weight = patch_weight.reshape(hidden, K).contiguous()
    keep = feature_keep.float().contiguous() if feature_keep is not None else t
    t = t.float().contiguous()
    dz = torch.empty((B, d, height, width), dtype=torch.float32, device=dtokens.device)
    block_t = block_t or (EMBED_BLOCK_T if dtokens.is_cuda else dot_width(min(M, 256)))
    block_h = block_h or _block(hidden, EMBED_BLOCK_H if dtokens.is_cuda else 4096)
    _embed_bwd_kernel[(cdiv(M, block_t),)](
        dtokens, weight, t, keep, dz,
        M, T, hidden, K, d, image_channels, height, width, width // p,
        PATCH=p, HAS_KEEP=feature_keep is not None, PRECISION=precision,
        BLOCK_T=block_t, BLOCK_KZ=dot_width(d * p * p), BLOCK_H=block_h,
        num_warps=4,
    )  # fmt: skip

    block_r = block_r or (ADJOINT_BLOCK_R if dtokens.is_cuda else next_power_of_2(min(R, 1024)))
    block_n = next_power_of_2(d)
    programs = cdiv(R, block_r)
    dzhat = torch.empty((R, d), dtype=torch.float32, device=dtokens.device)
    parts = torch.empty((programs, 2, block_n), dtype=torch.float32, device=dtokens.device)
    dz_hat_in = _rows(dz_hat) if dz_hat is not None else dzhat
    _resize_adjoint_kernel[(programs,)](
        dz, dz_hat_in, projected, norm_mean.float().contiguous(), norm_rstd.float().contiguous(), dzhat, parts,
        R, L, d, height, width, side, side / height, side / width,
        RATIO_H=height // side, RATIO_W=width // side, HAS_DZHAT_IN=dz_hat is not None,
        BLOCK_R=block_r, BLOCK_N=block_n,
        num_warps=4,
    )  # fmt: skip
    return dzhat, parts[:, :, :d]


def backward_rows_per_program(M: int, D: int, block_m: int, block_k: int, device: torch.device) -> int:
    """Rows of f per weight-gradient program: enough programs to fill the GPU; on the interpreter, all rows in
    one program per column block (its cost grows with the number of programs)."""
    if device.type != "cuda":
        rows = M
    else:
        splits = max(1, cdiv(GRAD_PROGRAMS_PER_SM * num_sms(device), cdiv(D, block_k)))
        rows = cdiv(M, splits)
    return cdiv(max(rows, 1), block_m) * block_m


def project_bwd(
    features: Tensor, feature_mean: Tensor, feature_std: Tensor, dz_hat: Tensor, projected: Tensor, center: Tensor,
    alpha: Tensor, offset: Tensor, mix: Tensor, *, precision: str = "ieee", block_m: Optional[int] = None,
    block_k: Optional[int] = None, rows_per_program: Optional[int] = None,
) -> Tensor:
    """-> dW (D, d) fp32."""
    f = _rows(features)
    M, D = f.shape
    d = projected.shape[1]
    block_m = block_m or (GRAD_BLOCK_M if f.is_cuda else dot_width(min(M, 1024)))
    block_k = block_k or _block(D, GRAD_BLOCK_K if f.is_cuda else 1024)
    block_n = dot_width(d)
    if rows_per_program is None:
        rows_per_program = backward_rows_per_program(M, D, block_m, block_k, f.device)
    elif rows_per_program % block_m:
        raise ValueError(f"rows_per_program ({rows_per_program}) must be a multiple of block_m ({block_m})")
    splits = cdiv(M, rows_per_program)
    mean, inv_std = _standardization(feature_mean, feature_std)
    padded_mix = torch.zeros((block_n, block_n), dtype=torch.float32, device=f.device)
    padded_mix[:d, :d] = mix
    parts = torch.empty((splits, D, d), dtype=torch.float32, device=f.device)
    _project_bwd_kernel[(cdiv(D, block_k), splits)](
        f, mean, inv_std, dz_hat.contiguous(), projected, center.float().contiguous(), alpha.float().contiguous(),
        offset.float().contiguous(), padded_mix, parts,
        M, D, d, f.stride(0), rows_per_program,
        PRECISION=precision, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n,
        num_warps=4,
    )  # fmt: skip
    return parts.sum(dim=0)
