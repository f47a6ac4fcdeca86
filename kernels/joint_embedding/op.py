"""The CoReDi joint embedding as `torch.library` custom ops, with autograd, fake kernels and backend dispatch.

Registered ops (namespace `coredi`):
    joint_embedding_fwd(features, weight, ..., out_dtype)
        -> (tokens, target, z_hat, scatter, batch_mean, batch_var, count, projected, patches)
    joint_embedding_bwd(dtokens, dz_hat, dscatter, ...)
        -> (dweight, dnorm_weight, dnorm_bias, dpatch_weight, dpatch_bias)
`joint_embedding` (below) is the functional API; it also updates the BatchNorm running statistics and derives
the covariance of the normalized features from the scatter matrix.

Each op runs its stages on one backend (Triton kernels from `_kernels`, or the PyTorch math from `reference`) and
does the small glue in torch, identical for both:
    forward   project (p and partial statistics) -> merge partials [+ all-reduce] -> norm constants -> embed
    backward  patch-weight GEMM; embed_bwd (dẑ and partial sums) -> [all-reduce] -> coefficients -> project_bwd
With `sync_stats` the statistics (count, Σp, scatter) and, in the backward, the sums the norm's gradient needs
(Σdẑ, Σdẑ·x̂, and the scatter's gradient) are summed over the default process group, so an R-rank run has the
statistics and gradients of the global batch, exactly as `cross_rank_sum`-based PyTorch code computes them.

Gradients reach weight (W), norm_weight/norm_bias, patch_weight, patch_bias and pos_embed. They do NOT reach
features, x, the noises, t, feature_keep, feature_mean/std or the running statistics (the training objective never
needs them: the encoder is frozen and the data and noise are inputs); an autograd graph through those inputs sees
zero gradient. `target` is always detached (the stop-gradient target of CoReDi). Double backward is not supported.

Why `custom_op` and not `triton_op`: see `coredi_kernels.norm_modulate.op` (the backend is picked at every
call, also under torch.compile, and the registration tested on CPU is the one that runs on the GPU).
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .._utils import TRITON_DTYPES, has_triton
from ..backend import select_backend
from . import reference

if has_triton():
    from . import _kernels
else:  # CPU-only torch builds without triton: only the PyTorch backend exists
    _kernels = None

# Limits of the Triton kernels: a token's input vector (K + 1 values) and d·p² gradient columns are held in
# registers; the resize adjoint unrolls (2·H/√L)·(2·W/√L) taps.
MAX_TRITON_PATCH_VALUES = 256
MAX_TRITON_FEATURE_CHANNELS = 64
MAX_TRITON_RESIZE_RATIO = 4


# ---------------------------------------------------------------------------------------------------------------
# Input checks (they run in the real and the fake kernels, so torch.compile reports bad inputs at trace time)
# ---------------------------------------------------------------------------------------------------------------


def _check_tensor(name: str, t, shape: Optional[tuple] = None, device=None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"joint_embedding: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"joint_embedding: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"joint_embedding: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"joint_embedding: {name} is on {t.device} but features are on {device}")


def _check_inputs(
    features, weight, feature_mean, feature_std, x, noise_x, noise_z, t, feature_keep, patch_weight, patch_bias,
    pos_embed, norm_weight, norm_bias, running_mean, running_var, normalize, batch_stats, eps, feature_scale,
) -> None:
    _check_tensor("features", features)
    if features.dim() != 3:
        raise ValueError(f"joint_embedding: features must have shape (B, L, D), got {tuple(features.shape)}")
    B, L, D = features.shape
    dev = features.device
    side = math.isqrt(L)
    if L < 1 or side * side != L:
        raise ValueError(f"joint_embedding: features has L={L} tokens, not a square grid (e.g. 256 = 16x16)")
    _check_tensor("weight", weight, device=dev)
    if weight.dim() != 2 or weight.shape[0] != D or weight.shape[1] < 1:
        raise ValueError(f"joint_embedding: weight must have shape (D, d) = ({D}, d), got {tuple(weight.shape)}")
    d = weight.shape[1]
    _check_tensor("feature_mean", feature_mean, (D,), dev)
    _check_tensor("feature_std", feature_std, (D,), dev)
    _check_tensor("x", x, device=dev)
    if x.dim() != 4 or x.shape[0] != B:
        raise ValueError(f"joint_embedding: x must have shape (B, C, H, W) with B={B}, got {tuple(x.shape)}")
    _, C, H, W = x.shape
    _check_tensor("noise_x", noise_x, x.shape, dev)
    _check_tensor("noise_z", noise_z, (B, d, H, W), dev)
    _check_tensor("t", t, (B,), dev)
    if feature_keep is not None:
        if not isinstance(feature_keep, Tensor) or tuple(feature_keep.shape) != (B,):
            shape = tuple(feature_keep.shape) if isinstance(feature_keep, Tensor) else type(feature_keep).__name__
            raise ValueError(f"joint_embedding: feature_keep must be a ({B},) tensor, got {shape}")
        if feature_keep.device != dev:
            raise ValueError(f"joint_embedding: feature_keep is on {feature_keep.device} but features are on {dev}")
    _check_tensor("patch_weight", patch_weight, device=dev)
    if patch_weight.dim() != 4 or patch_weight.shape[1] != C + d or patch_weight.shape[2] != patch_weight.shape[3]:
        raise ValueError(
            f"joint_embedding: patch_weight must have shape (hidden, C + d, p, p) = (hidden, {C + d}, p, p), "
            f"got {tuple(patch_weight.shape)}"
        )
    hidden, _, p, _ = patch_weight.shape
    if H % p or W % p:
        raise ValueError(f"joint_embedding: the image grid {H}x{W} is not a multiple of the patch size {p}")
    if H % side or W % side:
        raise ValueError(
            f"joint_embedding: the image grid {H}x{W} must be an integer multiple of the feature grid side {side} "
            f"(L={L})"
        )
    if patch_bias is not None:
        _check_tensor("patch_bias", patch_bias, (hidden,), dev)
    if pos_embed is not None:
        T = (H // p) * (W // p)
        _check_tensor("pos_embed", pos_embed, device=dev)
        if tuple(pos_embed.shape) not in ((1, T, hidden), (T, hidden)):
            raise ValueError(
                f"joint_embedding: pos_embed must have shape (1, T, hidden) = (1, {T}, {hidden}), "
                f"got {tuple(pos_embed.shape)}"
            )
    for name, value in (("norm_weight", norm_weight), ("norm_bias", norm_bias), ("running_mean", running_mean),
                        ("running_var", running_var)):  # fmt: skip
        if value is not None:
            _check_tensor(name, value, (d,), dev)
    if (running_mean is None) != (running_var is None):
        raise ValueError("joint_embedding: running_mean and running_var must be given together")
    if normalize and not batch_stats and running_mean is None:
        raise ValueError("joint_embedding: batch_stats=False (eval mode) needs running_mean and running_var")
    if normalize and batch_stats and B * L < 2:
        raise ValueError(f"joint_embedding: batch statistics need at least 2 tokens, got B*L = {B * L}")
    if not eps > 0:
        raise ValueError(f"joint_embedding: eps must be > 0, got {eps}")
    if not (math.isfinite(feature_scale) and feature_scale > 0):
        raise ValueError(f"joint_embedding: feature_scale must be a finite number > 0, got {feature_scale}")


def _triton_reasons(
    tensors: tuple, out_dtype: torch.dtype, channels: int, d: int, p: int, side: int, height: int, width: int
) -> list[str]:
    """This op's objections to running on the Triton kernels: tensors' dtypes, C + d = `channels`, patch size p,
    feature grid side √L and image size."""
    reasons = []
    if _kernels is None:
        reasons.append("the Triton kernels could not be imported")
    for dtype in [t.dtype for t in tensors if t is not None] + [out_dtype]:
        if dtype not in TRITON_DTYPES:
            reasons.append(f"dtype {dtype} is not one of the kernels' dtypes {TRITON_DTYPES}")
            break
    if channels * p * p + 1 > MAX_TRITON_PATCH_VALUES:
        reasons.append(f"a patch holds (C + d)·p² = {channels * p * p} values (> {MAX_TRITON_PATCH_VALUES - 1})")
    if d > MAX_TRITON_FEATURE_CHANNELS:
        reasons.append(f"d = {d} feature channels > {MAX_TRITON_FEATURE_CHANNELS}")
    if max(height, width) // side > MAX_TRITON_RESIZE_RATIO:
        reasons.append(f"resize ratio {max(height, width) // side} > {MAX_TRITON_RESIZE_RATIO}")
    return reasons


def _use_triton(features: Tensor, tensors: tuple, out_dtype: torch.dtype, patch_weight: Tensor, d: int, height: int,
                width: int) -> bool:
    reasons = _triton_reasons(
        tensors, out_dtype, patch_weight.shape[1], d, patch_weight.shape[-1], math.isqrt(features.shape[1]), height,
        width,
    )  # fmt: skip
    return select_backend("joint_embedding", features.device, reasons) == "triton"


def _precision(device: torch.device, allow_tf32: bool) -> str:
    """tl.dot precision of the big dots: TF32 where torch allows it for the same work, else 3xTF32 (fp32-accurate).
    The interpreter ignores it."""
    if device.type != "cuda":
        return "ieee"
    return "tf32" if allow_tf32 else "tf32x3"


# ---------------------------------------------------------------------------------------------------------------
# Glue shared by both backends
# ---------------------------------------------------------------------------------------------------------------


def _all_reduce_(tensor: Tensor) -> Tensor:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def merge_statistics(counts: Tensor, sums: Tensor, scatters: Tensor, sync: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Chan's parallel merge of per-partial statistics, then (sync) across ranks the same way.

    counts (P,), sums (P, d), scatters (P, d, d) about each partial's own mean -> count (), mean (d,), scatter
    (d, d) = Σ (p − mean)(p − mean)ᵀ over all tokens. Centring every partial before merging avoids the
    cancellation of Σp² − N·mean² when |mean| ≫ std.
    """
    count = counts.sum()
    total = sums.sum(dim=0)
    mean = total / count
    deviation = sums / counts[:, None] - mean
    scatter = scatters.sum(dim=0) + torch.einsum("p,pi,pj->ij", counts, deviation, deviation)
    if sync:
        head = _all_reduce_(torch.cat([count.reshape(1), total]))
        global_count, global_mean = head[0].clone(), head[1:] / head[0]
        deviation = mean - global_mean
        scatter = _all_reduce_(scatter + count * torch.outer(deviation, deviation))
        count, mean = global_count, global_mean
    return count, mean, scatter


class NormConstants(NamedTuple):
    """ẑ = (p − mean)·scale + shift; x̂ = (p − mean)·rstd. All (d,)."""

    mean: Tensor
    rstd: Tensor
    scale: Tensor
    shift: Tensor


def norm_constants(
    batch_mean: Tensor, batch_var: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
    norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], normalize: bool, batch_stats: bool, eps: float,
    feature_scale: float,
) -> NormConstants:
    """The per-channel affine map from p to ẑ = s·Norm(p) (s·p without the norm)."""
    cd = batch_mean.dtype
    if not normalize:
        zeros = torch.zeros_like(batch_mean)
        return NormConstants(zeros, torch.ones_like(batch_mean), torch.full_like(batch_mean, feature_scale), zeros)
    if batch_stats:
        mean, var = batch_mean, batch_var
    else:
        mean, var = running_mean.to(cd), running_var.to(cd)
    rstd = torch.rsqrt(var + eps)
    gamma = norm_weight.to(cd) if norm_weight is not None else torch.ones_like(rstd)
    shift = feature_scale * norm_bias.to(cd) if norm_bias is not None else torch.zeros_like(rstd)
    return NormConstants(mean, rstd, feature_scale * gamma * rstd, shift)


def backward_coefficients(
    parts: Tensor, dscatter: Optional[Tensor], count: Tensor, constants: NormConstants,
    norm_weight: Optional[Tensor], normalize: bool, batch_stats: bool, feature_scale: float, sync: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fold the norm's and the scatter matrix's backward into dp = alpha·dẑ + (p − μ)·mix + offset.

    parts (P, 2, d): partial Σdẑ and Σdẑ·x̂. With batch statistics (global means over all N tokens):
        dp = a·(dẑ − mean(dẑ) − x̂·mean(dẑ·x̂)) + (dS + dSᵀ)(p − μ),   a = s·γ·rstd
    and x̂ = (p − μ)·rstd, so the x̂ term joins the mix matrix as a diagonal. dγ = s·Σdẑ·x̂ and dβ = s·Σdẑ are the
    local sums (each rank's own parameter gradient; data parallelism adds them).
    -> alpha (d,), offset (d,), mix (d, d), dnorm_weight (d,), dnorm_bias (d,).
    """
    local = parts.sum(dim=0)  # (2, d)
    d = local.shape[1]
    dnorm_bias, dnorm_weight = feature_scale * local[0], feature_scale * local[1]
    dS = dscatter.to(local.dtype) if dscatter is not None else local.new_zeros(d, d)
    if sync:
        reduced = _all_reduce_(torch.cat([local.flatten(), dS.flatten()]))
        local, dS = reduced[: 2 * d].reshape(2, d), reduced[2 * d :].reshape(d, d)
    mix = dS + dS.T
    offset = torch.zeros_like(local[0])
    if not normalize:
        return torch.full_like(offset, feature_scale), offset, mix, dnorm_weight, dnorm_bias
    gamma = norm_weight.to(local.dtype) if norm_weight is not None else torch.ones_like(offset)
    alpha = feature_scale * gamma * constants.rstd
    if batch_stats:
        offset = -alpha * local[0] / count
        mix = mix - torch.diag(alpha * constants.rstd * local[1] / count)
    return alpha, offset, mix, dnorm_weight, dnorm_bias


# ---------------------------------------------------------------------------------------------------------------
# Forward op
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("coredi::joint_embedding_fwd", mutates_args=())
def joint_embedding_fwd(
    features: Tensor,
    weight: Tensor,
    feature_mean: Tensor,
    feature_std: Tensor,
    x: Tensor,
    noise_x: Tensor,
    noise_z: Tensor,
    t: Tensor,
    feature_keep: Optional[Tensor],
    patch_weight: Tensor,
    patch_bias: Optional[Tensor],
    pos_embed: Optional[Tensor],
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    normalize: bool,
    batch_stats: bool,
    eps: float,
    feature_scale: float,
    sync_stats: bool,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """See `joint_embedding`. -> tokens (B, T, hidden) out_dtype, target (B, C + d, H, W) x's dtype, z_hat (B, L, d),
    scatter (d, d), batch_mean (d,), batch_var (d,), count (), projected (B, L, d), patches (B·T, K + 1) out_dtype;
    the statistics in the compute dtype (fp32, float64 for float64 inputs)."""
    _check_inputs(
        features, weight, feature_mean, feature_std, x, noise_x, noise_z, t, feature_keep, patch_weight, patch_bias,
        pos_embed, norm_weight, norm_bias, running_mean, running_var, normalize, batch_stats, eps, feature_scale,
    )  # fmt: skip
    B, L, _ = features.shape
    d = weight.shape[1]
    cd = reference.compute_dtype(features, weight, x)
    keep = feature_keep.to(cd) if feature_keep is not None else None
    tensors = (features, weight, x, noise_x, noise_z, patch_weight, patch_bias, pos_embed)
    triton = _use_triton(features, tensors, out_dtype, patch_weight, d, *x.shape[-2:])
    if triton:
        projected, counts, sums, scatters = _kernels.project(
            features, weight, feature_mean, feature_std,
            precision=_precision(features.device, torch.backends.cuda.matmul.allow_tf32),
        )  # fmt: skip
    else:
        projected, counts, sums, scatters = reference.project_torch(features, weight, feature_mean, feature_std, cd)

    count, batch_mean, scatter = merge_statistics(counts, sums, scatters, sync_stats)
    batch_var = torch.diagonal(scatter) / count
    constants = norm_constants(
        batch_mean, batch_var, running_mean, running_var, norm_weight, norm_bias, normalize, batch_stats, eps,
        feature_scale,
    )  # fmt: skip
    embed_args = (
        projected, constants.mean, constants.scale, constants.shift, x, noise_x, noise_z, t, keep, patch_weight,
        patch_bias, pos_embed, out_dtype,
    )  # fmt: skip
    if triton:
        precision = _precision(x.device, torch.backends.cudnn.allow_tf32)
        tokens, target, patches = _kernels.embed(*embed_args, precision=precision)
    else:
        tokens, target, patches = reference.embed_torch(*embed_args)
    z_hat = ((projected - constants.mean) * constants.scale + constants.shift).reshape(B, L, d)
    return tokens, target, z_hat, scatter, batch_mean, batch_var, count, projected.reshape(B, L, d), patches


@joint_embedding_fwd.register_fake
def _(
    features, weight, feature_mean, feature_std, x, noise_x, noise_z, t, feature_keep, patch_weight, patch_bias,
    pos_embed, norm_weight, norm_bias, running_mean, running_var, normalize, batch_stats, eps, feature_scale,
    sync_stats, out_dtype,
):
    _check_inputs(
        features, weight, feature_mean, feature_std, x, noise_x, noise_z, t, feature_keep, patch_weight, patch_bias,
        pos_embed, norm_weight, norm_bias, running_mean, running_var, normalize, batch_stats, eps, feature_scale,
    )  # fmt: skip
    B, L, _ = features.shape
    d = weight.shape[1]
    _, C, H, W = x.shape
    hidden, channels, p, _ = patch_weight.shape
    T = (H // p) * (W // p)
    cd = reference.compute_dtype(features, weight, x)
    stats = features.new_empty((d,), dtype=cd)
    return (
        x.new_empty((B, T, hidden), dtype=out_dtype),
        x.new_empty((B, C + d, H, W)),
        features.new_empty((B, L, d), dtype=cd),
        features.new_empty((d, d), dtype=cd),
        stats,
        stats.new_empty((d,)),
        features.new_empty((), dtype=cd),
        features.new_empty((B, L, d), dtype=cd),
        x.new_empty((B * T, channels * p * p + 1), dtype=out_dtype),
    )


# ---------------------------------------------------------------------------------------------------------------
# Backward op
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("coredi::joint_embedding_bwd", mutates_args=())
def joint_embedding_bwd(
    dtokens: Tensor,
    dz_hat: Optional[Tensor],
    dscatter: Optional[Tensor],
    features: Tensor,
    feature_mean: Tensor,
    feature_std: Tensor,
    t: Tensor,
    feature_keep: Optional[Tensor],
    patch_weight: Tensor,
    norm_weight: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    projected: Tensor,
    patches: Tensor,
    batch_mean: Tensor,
    batch_var: Tensor,
    count: Tensor,
    normalize: bool,
    batch_stats: bool,
    eps: float,
    feature_scale: float,
    sync_stats: bool,
    height: int,
    width: int,
    projection_grad: bool,
    patch_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of the joint embedding from those of tokens, z_hat and scatter (dz_hat, dscatter may be None).

    projection_grad / patch_grad: compute the projection side (W and the norm's affine parameters: kernels C, D, E)
    / the patch side (patch weight and bias: one GEMM); the other side comes back as zeros.
    -> dweight (D, d), dnorm_weight (d,), dnorm_bias (d,), dpatch_weight (hidden, C + d, p, p), dpatch_bias (hidden,),
    all in the compute dtype.
    """
    cd = projected.dtype
    D = features.shape[-1]
    d = projected.shape[-1]
    hidden, channels, p, _ = patch_weight.shape
    dtokens = dtokens.contiguous()
    triton = _use_triton(features, (features, projected, dtokens, patch_weight), dtokens.dtype, patch_weight, d,
                         height, width)

    if patch_grad:
        # [patches, 1]ᵀ·dtokens: the patch weight's and the bias's gradient in one pass over dtokens.
        grads = (patches.T @ dtokens.reshape(-1, hidden)).to(cd)  # (K + 1, hidden)
        dpatch_weight = grads[:-1].T.reshape(hidden, channels, p, p).contiguous()
        dpatch_bias = grads[-1].clone()  # not a view: op outputs must own their storage
    else:
        dpatch_weight = patch_weight.new_zeros(patch_weight.shape, dtype=cd)
        dpatch_bias = patch_weight.new_zeros((hidden,), dtype=cd)

    if not projection_grad:
        zeros = projected.new_zeros((d,))
        return projected.new_zeros((D, d)), zeros, zeros.clone(), dpatch_weight, dpatch_bias

    constants = norm_constants(
        batch_mean, batch_var, running_mean, running_var, norm_weight, None, normalize, batch_stats, eps,
        feature_scale,
    )  # fmt: skip
    projected = projected.reshape(-1, d)
    keep = feature_keep.to(cd) if feature_keep is not None else None
    image_channels = channels - d
    if triton:
        dzhat, parts = _kernels.embed_bwd(
            dtokens, dz_hat, projected, constants.mean, constants.rstd, t, keep, patch_weight, image_channels,
            height, width, precision=_precision(dtokens.device, torch.backends.cudnn.allow_tf32),
        )  # fmt: skip
    else:
        dzhat, parts = reference.embed_bwd_torch(
            dtokens, dz_hat, projected, constants.mean, constants.rstd, t, keep, patch_weight, image_channels,
            height, width,
        )  # fmt: skip
    alpha, offset, mix, dnorm_weight, dnorm_bias = backward_coefficients(
        parts, dscatter, count, constants, norm_weight, normalize, batch_stats, feature_scale, sync_stats
    )
    project_args = (features, feature_mean, feature_std, dzhat, projected, batch_mean, alpha, offset, mix)
    if triton:
        dweight = _kernels.project_bwd(
            *project_args, precision=_precision(features.device, torch.backends.cuda.matmul.allow_tf32)
        )
    else:
        dweight = reference.project_bwd_torch(*project_args)
    return dweight, dnorm_weight, dnorm_bias, dpatch_weight, dpatch_bias


@joint_embedding_bwd.register_fake
def _(
    dtokens, dz_hat, dscatter, features, feature_mean, feature_std, t, feature_keep, patch_weight, norm_weight,
    running_mean, running_var, projected, patches, batch_mean, batch_var, count, normalize, batch_stats, eps,
    feature_scale, sync_stats, height, width, projection_grad, patch_grad,
):
    d = projected.shape[-1]
    hidden = patch_weight.shape[0]
    return (
        projected.new_empty((features.shape[-1], d)),
        projected.new_empty((d,)),
        projected.new_empty((d,)),
        projected.new_empty(patch_weight.shape),
        projected.new_empty((hidden,)),
    )


# ---------------------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------------------

_INPUTS = (
    "features", "weight", "feature_mean", "feature_std", "x", "noise_x", "noise_z", "t", "feature_keep",
    "patch_weight", "patch_bias", "pos_embed", "norm_weight", "norm_bias", "running_mean", "running_var",
    "normalize", "batch_stats", "eps", "feature_scale", "sync_stats", "out_dtype",
)  # fmt: skip


def _setup_context(ctx, inputs, output):
    args = dict(zip(_INPUTS, inputs, strict=True))
    tokens, target, _, _, batch_mean, batch_var, count, projected, patches = output
    # The running statistics are updated in place after the forward: save them only when the norm used them.
    uses_running = args["normalize"] and not args["batch_stats"]
    ctx.save_for_backward(
        args["features"], args["feature_mean"], args["feature_std"], args["t"], args["feature_keep"],
        args["patch_weight"], args["norm_weight"], args["running_mean"] if uses_running else None,
        args["running_var"] if uses_running else None, projected, patches, batch_mean, batch_var, count,
    )  # fmt: skip
    ctx.mark_non_differentiable(target, batch_mean, batch_var, count, projected, patches)
    ctx.set_materialize_grads(False)
    ctx.flags = {k: args[k] for k in ("normalize", "batch_stats", "eps", "feature_scale", "sync_stats")}
    ctx.image_size = tuple(args["x"].shape[-2:])
    ctx.tokens_shape, ctx.tokens_dtype = tokens.shape, tokens.dtype
    ctx.dtypes = {k: args[k].dtype for k in ("weight", "patch_weight", "patch_bias", "pos_embed", "norm_weight",
                                             "norm_bias") if args[k] is not None}  # fmt: skip
    ctx.pos_shape = args["pos_embed"].shape if args["pos_embed"] is not None else None


def _backward(ctx, dtokens, _dtarget, dz_hat, dscatter, *_non_differentiable):
    (features, feature_mean, feature_std, t, feature_keep, patch_weight, norm_weight, running_mean, running_var,
     projected, patches, batch_mean, batch_var, count) = ctx.saved_tensors  # fmt: skip
    needs = dict(zip(_INPUTS, ctx.needs_input_grad, strict=True))
    projection_grad = needs["weight"] or needs["norm_weight"] or needs["norm_bias"]
    patch_grad = needs["patch_weight"] or needs["patch_bias"]
    if dtokens is None:
        dtokens = torch.zeros(ctx.tokens_shape, dtype=ctx.tokens_dtype, device=projected.device)
    flags = ctx.flags
    dweight, dnorm_weight, dnorm_bias, dpatch_weight, dpatch_bias = torch.ops.coredi.joint_embedding_bwd(
        dtokens, dz_hat, dscatter, features, feature_mean, feature_std, t, feature_keep, patch_weight, norm_weight,
        running_mean, running_var, projected, patches, batch_mean, batch_var, count, flags["normalize"],
        flags["batch_stats"], flags["eps"], flags["feature_scale"], flags["sync_stats"], *ctx.image_size,
        projection_grad, patch_grad,
    )  # fmt: skip
    grads = dict.fromkeys(_INPUTS)
    for name, value in (("weight", dweight), ("patch_weight", dpatch_weight), ("patch_bias", dpatch_bias),
                        ("norm_weight", dnorm_weight), ("norm_bias", dnorm_bias)):  # fmt: skip
        if needs[name]:
            grads[name] = value.to(ctx.dtypes[name])
    if needs["pos_embed"]:
        grads["pos_embed"] = dtokens.sum(dim=0).reshape(ctx.pos_shape).to(ctx.dtypes["pos_embed"])
    return tuple(grads.values())


joint_embedding_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------------------


class JointEmbeddingOutput(NamedTuple):
    """What `joint_embedding` returns (statistics span all ranks with `sync_stats`).

    tokens: (B, T, hidden) patch_embed(cat(x_t, z_t)) + bias + pos: the transformer's input (`forward_tokens`).
    target: (B, C + d, H, W) velocity target [x − noise_x, sg(z) − noise_z], detached.
    z_hat: (B, L, d) s·Norm(p) on the encoder's token grid, with gradient (monitors, the vf regularizer).
    projected: (B, L, d) p = ((f − mean)/std)·W before the norm, detached.
    batch_mean, batch_var: (d,) mean and biased variance of p over all tokens, detached.
    covariance: (d, d) unbiased covariance of Norm(p) (before the feature scale) over all tokens, with gradient:
        VICReg's covariance regularizer is the mean of its squared off-diagonal entries (sum / d).
    count: () number of tokens the statistics span.
    """

    tokens: Tensor
    target: Tensor
    z_hat: Tensor
    projected: Tensor
    batch_mean: Tensor
    batch_var: Tensor
    covariance: Tensor
    count: Tensor


def default_sync_stats() -> bool:
    """True when a default process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def joint_embedding(
    features: Tensor,
    weight: Tensor,
    x: Tensor,
    noise_x: Tensor,
    noise_z: Tensor,
    t: Tensor,
    patch_weight: Tensor,
    patch_bias: Optional[Tensor] = None,
    pos_embed: Optional[Tensor] = None,
    *,
    feature_keep: Optional[Tensor] = None,
    feature_mean: Optional[Tensor] = None,
    feature_std: Optional[Tensor] = None,
    normalize: bool = True,
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    num_batches_tracked: Optional[Tensor] = None,
    training: bool = True,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    feature_scale: float = 1.0,
    sync_stats: Optional[bool] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> JointEmbeddingOutput:
    """CoReDi's joint input: project encoder features, normalize, resize, noise both streams and patch-embed them.

        p      = ((f − feature_mean) / feature_std) · W                        (B, L, d)
        ẑ      = s · BatchNorm(p)      (statistics over all B·L tokens; s·p without the norm)
        z      = bilinear resize of ẑ's √L×√L grid onto H×W (align_corners=False)
        x_t    = t·x + (1 − t)·ε_x,   z_t = keep · (t·z + (1 − t)·ε_z)
        tokens = Conv2d_p(cat(x_t, z_t)) + bias + pos_embed                   (B, T, hidden)

    Args:
        features: (B, L, D) encoder tokens on a square grid (frozen: no gradient flows to them).
        weight: (D, d) projection W (learned: CoReDi; a fixed PCA basis with requires_grad=False: ReDi).
        x, noise_x: (B, C, H, W) image stream and its noise. noise_z: (B, d, H, W). t: (B,), t = 1 is data.
        patch_weight, patch_bias: the patch embedding's Conv2d (hidden, C + d, p, p), (hidden,) (stride p).
        pos_embed: (1, T, hidden) or (T, hidden) added to the tokens.
        feature_keep: (B,) bool/float; 0 zeroes a sample's feature input z_t (feature dropout).
        feature_mean, feature_std: (D,) dataset standardization (default 0 and 1). ReDi's PCA centring folds in
            as feature_mean + feature_std·pca_mean.
        normalize: apply the BatchNorm (CoReDi) or not (ReDi's PCA).
        norm_weight, norm_bias, running_mean, running_var, num_batches_tracked, momentum, eps: the BatchNorm's
            parameters and state, with nn.BatchNorm1d's semantics (training: batch statistics and a running
            update, momentum=None is the cumulative average; eval: running statistics; no running statistics:
            always batch statistics). The running statistics are updated in place.
        training: the BatchNorm's mode.
        feature_scale: s, a gain after the norm.
        sync_stats: sum the statistics and their gradients over the default process group (None: when one with
            more than one rank is initialized).
        out_dtype: dtype of tokens (default: patch_weight's, promoted with pos_embed's, as `conv(x) + pos`).
    Returns:
        `JointEmbeddingOutput`. Gradients reach weight, norm_weight/bias, patch_weight/bias and pos_embed.
    """
    if not isinstance(normalize, bool) or not isinstance(training, bool):
        raise TypeError("joint_embedding: normalize and training must be bools")
    if momentum is not None and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"joint_embedding: momentum must be in [0, 1] or None, got {momentum}")
    D = features.shape[-1] if isinstance(features, Tensor) else 0
    if feature_mean is None:
        feature_mean = features.new_zeros((D,), dtype=torch.float32)
    if feature_std is None:
        feature_std = features.new_ones((D,), dtype=torch.float32)
    if out_dtype is None:
        out_dtype = patch_weight.dtype
        if pos_embed is not None:
            out_dtype = torch.promote_types(out_dtype, pos_embed.dtype)
    if sync_stats is None:
        sync_stats = default_sync_stats()
    batch_stats = training or running_mean is None
    tokens, target, z_hat, scatter, batch_mean, batch_var, count, projected, _ = torch.ops.coredi.joint_embedding_fwd(
        features, weight, feature_mean, feature_std, x, noise_x, noise_z, t, feature_keep, patch_weight, patch_bias,
        pos_embed, norm_weight, norm_bias, running_mean, running_var, normalize, batch_stats, float(eps),
        float(feature_scale), bool(sync_stats), out_dtype,
    )  # fmt: skip
    if normalize and training and running_mean is not None:
        _update_running_stats(running_mean, running_var, num_batches_tracked, batch_mean, batch_var, count, momentum)
    covariance = _normalized_covariance(scatter, count, normalize, batch_stats, running_var, norm_weight, eps)
    return JointEmbeddingOutput(tokens, target, z_hat, projected, batch_mean, batch_var, covariance, count)


@torch.no_grad()
def _update_running_stats(running_mean, running_var, num_batches_tracked, batch_mean, batch_var, count, momentum):
    """nn.BatchNorm1d's update: running = (1 − m)·running + m·batch, with the unbiased batch variance."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is None:  # cumulative moving average, as BatchNorm with momentum=None
        if num_batches_tracked is None:
            raise ValueError("joint_embedding: momentum=None (cumulative average) needs num_batches_tracked")
        factor = 1.0 / num_batches_tracked.to(batch_mean.dtype)
    else:
        factor = momentum
    unbiased = batch_var * (count / (count - 1).clamp(min=1))
    running_mean.lerp_(batch_mean.to(running_mean.dtype), factor)
    running_var.lerp_(unbiased.to(running_var.dtype), factor)


def _normalized_covariance(scatter, count, normalize, batch_stats, running_var, norm_weight, eps) -> Tensor:
    """Cov(Norm(p)) = diag(a)·S·diag(a)/(N − 1), a = γ·rstd: differentiable through S (and rstd = f(S) with batch
    statistics), so the covariance regularizer's gradient reaches W through the op's scatter output."""
    if not normalize:
        return scatter / (count - 1)
    if batch_stats:
        var = torch.diagonal(scatter) / count
    else:
        var = running_var.to(scatter.dtype)
    scale = torch.rsqrt(var + eps)
    if norm_weight is not None:
        scale = scale * norm_weight.to(scale.dtype)
    return scale[:, None] * scatter * scale[None, :] / (count - 1)
