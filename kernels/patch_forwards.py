"""The forwards `patch_dit` / `patch_jit` install (module first: they are bound with functools.partial).

One block forward and one final-layer forward serve both patches: `rms` picks the norm (LayerNorm without affine
for patch_dit, RMSNorm with its weight for patch_jit), the `AdaLNLayout` how the modulation splits (a 4-way adaLN
without shift gets a zero shift), `ExtraArgument` the rope a block may take after (x, c). One attention forward
serves every patched attention (`AttentionPlan` says which path it takes).
"""
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from .attention import attention as dispatch_attention
from .layernorm_modulate import gated_residual_layernorm_modulate, layernorm_modulate
from .patch_chain import Consumer, ResidualChain
from .patch_rotary import RopeReader
from .patch_structure import RMS, AdaLNLayout, AttentionPlan, ExtraArgument, eps_attribute
from .qk_norm_rope import qk_layernorm_rope, qk_norm_rope
from .rmsnorm_modulate import gated_residual_rmsnorm_modulate, rmsnorm_modulate


def rmsnorm_args(norm: nn.Module, x: Tensor) -> tuple[Optional[Tensor], float]:
    """(weight, eps) of an RMSNorm, read at call time (parameters may be swapped after patching)."""
    eps = eps_attribute(norm)
    if eps is None:  # nn.RMSNorm(eps=None) uses the input dtype's machine epsilon
        eps = torch.finfo(x.dtype).eps
    return norm.weight, float(eps)


def _norm_modulate(rms: bool, norm: nn.Module, x: Tensor, shift: Optional[Tensor], scale: Tensor) -> Tensor:
    """norm(x)·(1 + scale) + shift (no shift: a zero one, exact), x (B, T, D), shift/scale (B, D)."""
    shift = shift if shift is not None else torch.zeros_like(scale)
    if rms:
        return rmsnorm_modulate(x, shift, scale, *rmsnorm_args(norm, x))
    return layernorm_modulate(x, shift, scale, norm.eps)


def _gated_norm_modulate(rms: bool, norm: nn.Module, x: Tensor, branch: Tensor, gate: Tensor,
                         shift: Optional[Tensor], scale: Tensor) -> tuple[Tensor, Tensor]:
    """h = x + gate·branch and norm(h)·(1 + scale) + shift in one op -> (h, normed h)."""
    shift = shift if shift is not None else torch.zeros_like(scale)
    if rms:
        return gated_residual_rmsnorm_modulate(x, branch, gate, shift, scale, *rmsnorm_args(norm, x))
    return gated_residual_layernorm_modulate(x, branch, gate, shift, scale, norm.eps)


def fused_block_forward(block: nn.Module, rms: bool, layout: AdaLNLayout, extra: ExtraArgument,
                        chain: Optional[ResidualChain], me: Optional[Consumer], successor: Optional[Consumer],
                        x: Tensor, c: Tensor, *args, **kwargs) -> Tensor:
    """A DiT/JiT block with fused norms: x (B, T, D), c (B, D)[, rope] -> (B, T, D). chain is None without
    fuse_residual; `me` is this block in the chain, `successor` the consumer its output is handed to (None: no
    hand-over). The rope, if the block takes one, goes to block.attn as its second argument."""
    rope = extra.take(args, kwargs)
    hands_over = chain is not None and successor is not None and chain.active(x)  # decided on the block's input
    handed = chain.take(me, x, c) if chain is not None else None
    if handed is None:
        mods = block.adaLN_modulation(c).chunk(layout.chunks, dim=-1)
        normed = _norm_modulate(rms, block.norm1, x, *layout.first_norm(mods))
    else:
        mods, normed = handed
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = layout.block(mods)
    branch = block.attn(normed) if extra.name is None else block.attn(normed, rope)   # (B, T, D)
    if chain is None:
        x = x + gate_msa.unsqueeze(1) * branch
        normed = _norm_modulate(rms, block.norm2, x, shift_mlp, scale_mlp)
    else:
        x, normed = _gated_norm_modulate(rms, block.norm2, x, branch, gate_msa, shift_mlp, scale_mlp)
    branch = block.mlp(normed)                                                          # (B, T, D)
    if not hands_over:
        return x + gate_mlp.unsqueeze(1) * branch
    next_mods = successor.module.adaLN_modulation(c).chunk(successor.layout.chunks, dim=-1)
    x, normed = _gated_norm_modulate(rms, successor.norm, x, branch, gate_mlp,
                                     *successor.layout.first_norm(next_mods))
    chain.put(successor, x, c, next_mods, normed)
    return x


def fused_final_forward(final: nn.Module, rms: bool, layout: AdaLNLayout, chain: Optional[ResidualChain],
                        me: Optional[Consumer], x: Tensor, c: Tensor) -> Tensor:
    """The final layer: linear(norm(x)·(1 + scale) + shift), x (B, T, D), c (B, D) -> (B, T, out)."""
    handed = chain.take(me, x, c) if chain is not None else None
    if handed is None:
        mods = final.adaLN_modulation(c).chunk(layout.chunks, dim=-1)
        normed = _norm_modulate(rms, final.norm_final, x, *layout.first_norm(mods))
    else:
        normed = handed[1]
    return final.linear(normed)


def fused_attention_forward(attn: nn.Module, plan: AttentionPlan, ropes: RopeReader, x: Tensor, *args,
                            **kwargs) -> Tensor:
    """Self-attention through the dispatcher: x (B, T, D)[, rope] -> (B, T, D).

    qkv -> q, k, v -> the attention dispatcher (with the model's `scale`, default 1/sqrt(Dh)) -> [norm] -> proj
    [-> proj_drop]. With RMSNorm or LayerNorm q_norm / k_norm (plan.qk_norm) the qk-norms and the rope run as one
    `qk_norm_rope` / `qk_layernorm_rope` op from the packed projection (weights, biases and eps read at every
    call); otherwise the model's q_norm / k_norm modules and rotary module run as the model runs them.

    The model's own forward runs instead where this one would compute something else: a rope it does not know
    (warned), attention dropout in training (plan.dropout_fallback), q_norm and k_norm with different eps.
    """
    rope = plan.extra.take(args, kwargs)
    tables = ropes.tables(rope)
    if tables is None or (not plan.fused_qk and rope is not None and not ropes.is_checked_module(rope)):
        warnings.warn(f"{type(attn).__name__}: got a rope of type {type(rope).__name__} that the patch does not "
                      f"read; this attention runs the model's own forward", stacklevel=2)
        return type(attn).forward(attn, x, *args, **kwargs)
    dropout = plan.dropout_fallback and attn.training and getattr(getattr(attn, "attn_drop", None), "p", 0.0) > 0
    if dropout or (plan.fused_qk and eps_attribute(attn.q_norm) != eps_attribute(attn.k_norm)):
        return type(attn).forward(attn, x, *args, **kwargs)
    B, T, _ = x.shape
    qkv = attn.qkv(x).reshape(B, T, 3, attn.num_heads, -1)                  # (B, T, 3, H, Dh)
    if plan.qk_norm == RMS:
        # eps from qkv: an nn.RMSNorm(eps=None) uses the machine epsilon of the dtype it normalizes (q's, under
        # autocast not x's).
        (q_weight, eps), (k_weight, _) = rmsnorm_args(attn.q_norm, qkv), rmsnorm_args(attn.k_norm, qkv)
        q, k, v = qk_norm_rope(qkv, q_weight, k_weight, *tables, eps)        # 3 x (B, H, T, Dh)
    elif plan.qk_norm is not None:  # LayerNorms
        q_norm, k_norm = attn.q_norm, attn.k_norm
        q, k, v = qk_layernorm_rope(qkv, q_norm.weight, q_norm.bias, k_norm.weight, k_norm.bias, *tables,
                                    q_norm.eps)
    else:
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                      # 3 x (B, H, T, Dh), views
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        if q_norm is not None:
            q = q_norm(q)
        if k_norm is not None:
            k = k_norm(k)
        if rope is not None:  # a rotary module checked at patch time, applied as the model applies it
            q, k = rope(q), rope(k)
    out = dispatch_attention(q, k, v, scale=getattr(attn, "scale", None))   # (B, H, T, Dh)
    out = out.transpose(1, 2).reshape(B, T, -1)                             # (B, T, H * Dh)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    out = attn.proj(out)
    proj_drop = getattr(attn, "proj_drop", None)
    return proj_drop(out) if proj_drop is not None else out
