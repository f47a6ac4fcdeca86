"""`patch_dit(model)`: swap coredi_kernels' fused ops into a SiT/DiT/REPA/ReDi-style model, in place.
(`patch_jit(model)`, at the end of this file, does the same with the RMSNorm ops and the fused qk-norm + RoPE for
JiT-style models.)

The model is found by attribute names only (it may be coredi_fast's SiT or the public SiT/DiT code built on timm's
`Attention`/`Mlp`):

    model.blocks[i]                .norm1, .attn, .norm2, .mlp, .adaLN_modulation   called as block(x, c)
    model.blocks[i].attn           .qkv, .proj, .num_heads  [, .q_norm, .k_norm, .norm, .proj_drop, .scale]
    model.final_layer              .norm_final, .linear, .adaLN_modulation          called as final_layer(x, c)

norm1 / norm2 / norm_final must be LayerNorms without affine parameters, as in DiT. Only `forward`s are replaced
(per module instance, by a picklable `functools.partial`): parameters, buffers, state-dict names and the model's
own `forward` (label dropout, REPA projections, unpatchify, learn_sigma) stay as they are.

What each option swaps in:
    attention            attn.forward = qkv -> (q_norm, k_norm) -> `attention` (the dispatcher) -> proj
    layernorm_modulate   block.forward and final_layer.forward use `layernorm_modulate` for every
                         `modulate(norm(x), shift, scale)`, the residual adds stay separate
    fuse_residual        (needs layernorm_modulate) every residual add is fused with the norm that follows it:
                         inside a block `x + gate_msa·attn` with norm2, and across blocks `x + gate_mlp·mlp` with
                         the NEXT block's norm1 (or the final layer's norm). The adaLN outputs depend only on c, so
                         block i computes the next consumer's shift/scale itself and hands (x, normed x,
                         modulation) over; the next consumer uses the hand-over only when it is called with that
                         very x and c (an identity check), else it computes its own. A depth-N model then runs 2N+1
                         fused norm passes and no separate residual add, with the model's loop unchanged.

Activation checkpointing: when the model has `grad_checkpointing = True` (coredi_fast's SiT, timm models) and
grad is on, or when any saved-tensor hooks are active (torch.utils.checkpoint, activation offloading), blocks do
not hand over across their boundary, so a recomputed block runs exactly the ops of its first run; the boundary
residual add is then a separate op (2N+1 fused passes plus N adds). Reentrant checkpointing recomputes from
detached copies and simply takes the unfused path. Under torch.compile the hook check is skipped: a compiled model
that checkpoints inside its forward must set `grad_checkpointing = True` or be patched with fuse_residual=False.

Wrapping: the patched model may be wrapped afterwards in DDP, `torch.compile(model)` or per-block
`block.compile()`. The hand-over crosses the compiled regions and is addressed by object identity, not by a block
index, so the blocks share their compiled graphs: per grad mode and sequence length, one for the first block,
one for the blocks in between and one for the last, whatever the depth (tests/test_compiled_blocks.py). With
fuse_residual a block reads the NEXT block's
adaLN weights, so sharding parameters per block (FSDP, ZeRO-3) needs fuse_residual=False; ZeRO-1/2 are fine.

`unpatch_dit(model)` restores the original forwards. Patching twice with the same options does nothing.
"""
import functools
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from .attention import attention as dispatch_attention
from .layernorm_modulate import gated_residual_layernorm_modulate, layernorm_modulate
from .qk_norm_rope import qk_norm_rope
from .rmsnorm_modulate import gated_residual_rmsnorm_modulate, rmsnorm_modulate

_PATCH_ATTR = "_coredi_patch"


# ---------------------------------------------------------------------------------------------------------------
# The hand-over between consecutive consumers of the residual stream
# ---------------------------------------------------------------------------------------------------------------


def _saved_tensor_hooks_active() -> bool:
    """True inside torch.utils.checkpoint (or any saved-tensor hooks): recomputation must repeat the same ops."""
    if torch.compiler.is_compiling():
        return False
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


class _Consumer:
    """One consumer of the residual stream (a block, or the final layer) as the hand-over sees it.

    The block before it holds this object (as `successor`) and the consumer holds it too (as `me`): the hand-over
    is addressed by object identity, never by a block index. Under per-block `torch.compile` an index would be a
    Python int that differs per block, and dynamo would guard on it and recompile every block's forward until it
    hits `recompile_limit`; an identity comparison between objects is guarded the same way for every block.
    """

    def __init__(self, module: nn.Module, is_final: bool):
        self.module = module
        self.is_final = is_final  # the final layer: 2 modulation chunks and `norm_final`, else 6 and `norm1`

    @property
    def chunks(self) -> int:
        return 2 if self.is_final else 6

    @property
    def norm(self) -> nn.Module:
        return self.module.norm_final if self.is_final else self.module.norm1


class _ResidualChain:
    """Carries a block's fused (residual add + next norm) result to the consumer after it: one slot, so at most one
    hand-over is alive at a time."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._slot: Optional[tuple] = None  # (consumer, x, c, grad mode, modulation chunks, normed x)

    def active(self) -> bool:
        if getattr(self.model, "grad_checkpointing", False) and torch.is_grad_enabled():
            return False
        return not _saved_tensor_hooks_active()

    def put(self, consumer: _Consumer, x: Tensor, c: Tensor, mods: tuple, normed: Tensor) -> None:
        self._slot = (consumer, x, c, torch.is_grad_enabled(), mods, normed)

    def take(self, consumer: _Consumer, x: Tensor, c: Tensor) -> Optional[tuple]:
        """(modulation chunks, normed x) if `consumer` is being called on the x and c handed over to it, in the same
        grad mode (a reentrant checkpoint runs blocks under no_grad: their hand-over has no graph), else None."""
        slot, self._slot = self._slot, None
        if slot is None or not self.active():
            return None
        target, slot_x, slot_c, grad_mode, mods, normed = slot
        if target is consumer and slot_x is x and slot_c is c and grad_mode == torch.is_grad_enabled():
            return mods, normed
        return None

    def __getstate__(self):  # copies (deepcopy for EMA, pickling) never carry a pending hand-over
        return dict(self.__dict__, _slot=None)


def _chain_consumers(blocks: list, final: nn.Module, breaks: frozenset = frozenset()) -> tuple[list, list]:
    """(me, successor) per block and for the final layer: the _Consumer each one is, and the one its output is
    handed to (None for the final layer and for a block whose successor is in `breaks`: consumer positions that do
    not get their predecessor's output as is, e.g. JiT's in-context class tokens)."""
    consumers = [_Consumer(block, False) for block in blocks] + [_Consumer(final, True)]
    successors = [None if i + 1 in breaks else consumers[i + 1] for i in range(len(blocks))] + [None]
    return consumers, successors


# ---------------------------------------------------------------------------------------------------------------
# Patched forwards (module first: they are bound with functools.partial)
# ---------------------------------------------------------------------------------------------------------------


def fused_attention_forward(attn: nn.Module, x: Tensor) -> Tensor:
    """timm/DiT self-attention through the dispatcher: x (B, T, D) -> (B, T, D)."""
    B, T, _ = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(B, T, 3, heads, -1)                  # (B, T, 3, H, Dh)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                 # 3 x (B, H, T, Dh), views
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    out = dispatch_attention(q, k, v, scale=getattr(attn, "scale", None))  # (B, H, T, Dh)
    out = out.transpose(1, 2).reshape(B, T, -1)                    # (B, T, H * Dh)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    out = attn.proj(out)
    proj_drop = getattr(attn, "proj_drop", None)
    return proj_drop(out) if proj_drop is not None else out


def fused_block_forward(block: nn.Module, chain: Optional[_ResidualChain], me: Optional[_Consumer],
                        successor: Optional[_Consumer], x: Tensor, c: Tensor) -> Tensor:
    """A DiT block with fused norms: x (B, T, D), c (B, D) -> (B, T, D). chain is None without fuse_residual;
    `me` is this block in the chain, `successor` the consumer its output is handed to (None: no hand-over)."""
    handed = chain.take(me, x, c) if chain is not None else None
    if handed is None:
        mods = block.adaLN_modulation(c).chunk(6, dim=-1)
        normed = layernorm_modulate(x, mods[0], mods[1], block.norm1.eps)
    else:
        mods, normed = handed
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
    branch = block.attn(normed)                                                      # (B, T, D)
    if chain is None:
        x = x + gate_msa.unsqueeze(1) * branch
        normed = layernorm_modulate(x, shift_mlp, scale_mlp, block.norm2.eps)
    else:
        x, normed = gated_residual_layernorm_modulate(x, branch, gate_msa, shift_mlp, scale_mlp, block.norm2.eps)
    branch = block.mlp(normed)                                                       # (B, T, D)
    if chain is None or successor is None or not chain.active():
        return x + gate_mlp.unsqueeze(1) * branch
    next_mods = successor.module.adaLN_modulation(c).chunk(successor.chunks, dim=-1)
    x, normed = gated_residual_layernorm_modulate(x, branch, gate_mlp, next_mods[0], next_mods[1],
                                                  successor.norm.eps)
    chain.put(successor, x, c, next_mods, normed)
    return x


def fused_final_forward(final: nn.Module, chain: Optional[_ResidualChain], me: Optional[_Consumer], x: Tensor,
                        c: Tensor) -> Tensor:
    """DiT's final layer: linear(LN(x)·(1 + scale) + shift), x (B, T, D), c (B, D) -> (B, T, p·p·C)."""
    handed = chain.take(me, x, c) if chain is not None else None
    if handed is None:
        shift, scale = final.adaLN_modulation(c).chunk(2, dim=-1)
        normed = layernorm_modulate(x, shift, scale, final.norm_final.eps)
    else:
        normed = handed[1]
    return final.linear(normed)


# ---------------------------------------------------------------------------------------------------------------
# Checks (all run before anything is changed, so a bad model is left untouched)
# ---------------------------------------------------------------------------------------------------------------


def _require(obj, path: str, *names: str) -> None:
    for name in names:
        if getattr(obj, name, None) is None:
            raise ValueError(f"patch_dit: the model has no `{path}.{name}` (expected a SiT/DiT-style model)")


def _check_norm(norm, path: str) -> None:
    if _is_rmsnorm(norm):
        raise ValueError(f"patch_dit: `{path}` is an RMSNorm (a JiT-style model): use patch_jit")
    if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
        raise ValueError(f"patch_dit: `{path}` must be an nn.LayerNorm over the last dim, got {type(norm).__name__}")
    if norm.weight is not None or norm.bias is not None:
        raise ValueError(f"patch_dit: `{path}` has affine parameters; the fused op needs elementwise_affine=False")


def _blocks_of(model: nn.Module) -> list:
    _require(model, "model", "blocks")
    blocks = list(model.blocks)
    if not blocks:
        raise ValueError("patch_dit: `model.blocks` is empty")
    return blocks


def _check_model(model: nn.Module, layernorm_modulate: bool, attention: bool) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_dit: model must be an nn.Module, got {type(model).__name__}")
    for i, block in enumerate(_blocks_of(model)):
        path = f"model.blocks.{i}"
        _require(block, path, "attn")
        if attention:
            _require(block.attn, f"{path}.attn", "qkv", "proj", "num_heads")
            dropout = getattr(block.attn, "attn_drop", None)
            if dropout is not None and getattr(dropout, "p", 0.0) > 0:
                raise ValueError(f"patch_dit: `{path}.attn.attn_drop` has p > 0; the attention dispatch has no dropout")
            if getattr(block.attn, "gate", None) is not None:
                raise ValueError(f"patch_dit: `{path}.attn.gate` (gated attention) is not supported")
        if layernorm_modulate:
            _require(block, path, "norm1", "norm2", "mlp", "adaLN_modulation")
            _check_norm(block.norm1, f"{path}.norm1")
            _check_norm(block.norm2, f"{path}.norm2")
    if layernorm_modulate:
        _require(model, "model", "final_layer")
        _require(model.final_layer, "model.final_layer", "norm_final", "linear", "adaLN_modulation")
        _check_norm(model.final_layer.norm_final, "model.final_layer.norm_final")


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _PatchRecord:
    options: tuple
    originals: list = field(default_factory=list)  # (module, its instance-level forward before patching or None)


def _set_forward(record: _PatchRecord, module: nn.Module, forward) -> None:
    record.originals.append((module, module.__dict__.get("forward")))
    module.forward = forward  # an instance attribute: shadows the class's forward for this module only


def patch_dit(
    model: nn.Module, *, layernorm_modulate: bool = True, attention: bool = True, fuse_residual: bool = True
) -> nn.Module:
    """Swap the fused ops into a SiT/DiT-style model in place (see the module docstring); returns the model.

    Raises ValueError naming the missing or unsuitable attribute (e.g. `model.blocks.0.norm1`) before changing
    anything. Patching again with other options first restores the original forwards.
    """
    for arg, value in dict(layernorm_modulate=layernorm_modulate, attention=attention,
                           fuse_residual=fuse_residual).items():
        if not isinstance(value, bool):
            raise TypeError(f"patch_dit: {arg} must be a bool, got {value!r}")
    if fuse_residual and not layernorm_modulate:
        raise ValueError("patch_dit: fuse_residual=True fuses residual adds into the norms: it needs "
                         "layernorm_modulate=True")
    options = (layernorm_modulate, attention, fuse_residual)
    existing = model.__dict__.get(_PATCH_ATTR) if isinstance(model, nn.Module) else None
    if existing is not None:
        if existing.options == options:
            return model
        unpatch_dit(model)
    _check_model(model, layernorm_modulate, attention)

    record = _PatchRecord(options)
    blocks = _blocks_of(model)
    if attention:
        for block in blocks:
            _set_forward(record, block.attn, functools.partial(fused_attention_forward, block.attn))
    if layernorm_modulate:
        final = model.final_layer
        chain = _ResidualChain(model) if fuse_residual else None
        consumers = successors = [None] * (len(blocks) + 1)  # without fuse_residual nothing is handed over
        if fuse_residual:
            consumers, successors = _chain_consumers(blocks, final)
        for block, me, successor in zip(blocks, consumers, successors):
            _set_forward(record, block, functools.partial(fused_block_forward, block, chain, me, successor))
        _set_forward(record, final, functools.partial(fused_final_forward, final, chain, consumers[-1]))
    model.__dict__[_PATCH_ATTR] = record
    return model


def unpatch_dit(model: nn.Module) -> nn.Module:
    """Restore the forwards `patch_dit` replaced; a model that is not patched is returned unchanged."""
    record = model.__dict__.pop(_PATCH_ATTR, None)
    if record is None:
        return model
    for module, previous in reversed(record.originals):
        if previous is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = previous
    return model


def is_dit_patched(model: nn.Module) -> bool:
    """True if `patch_dit` has patched this model (and it was not unpatched since)."""
    return _PATCH_ATTR in model.__dict__


# ---------------------------------------------------------------------------------------------------------------
# JiT-style models: RMSNorm (with a weight) + modulate
# ---------------------------------------------------------------------------------------------------------------


def _is_rmsnorm(norm) -> bool:
    """torch's nn.RMSNorm over the last dim, or a JiT/LLaMA-style `*RMSNorm` module with a (D,) `weight`."""
    if isinstance(norm, getattr(nn, "RMSNorm", ())):
        return len(norm.normalized_shape) == 1
    weight = getattr(norm, "weight", None)
    return (isinstance(norm, nn.Module) and type(norm).__name__.endswith("RMSNorm")
            and (weight is None or weight.dim() == 1)
            and (getattr(norm, "eps", None) is not None or getattr(norm, "variance_epsilon", None) is not None))


def _eps_attribute(norm: nn.Module):
    """An RMSNorm's eps as configured (None: the input dtype's machine epsilon)."""
    eps = getattr(norm, "eps", None)
    return eps if eps is not None else getattr(norm, "variance_epsilon", None)


def _rmsnorm_args(norm: nn.Module, x: Tensor) -> tuple[Optional[Tensor], float]:
    """(weight, eps) of an RMSNorm, read at call time (parameters may be swapped after patching)."""
    eps = _eps_attribute(norm)
    if eps is None:  # nn.RMSNorm(eps=None) uses the input dtype's machine epsilon
        eps = torch.finfo(x.dtype).eps
    return norm.weight, float(eps)


def fused_jit_block_forward(block: nn.Module, chain: Optional[_ResidualChain], me: Optional[_Consumer],
                            successor: Optional[_Consumer], x: Tensor, c: Tensor, rope) -> Tensor:
    """A JiT block with fused RMSNorm + modulate: x (B, T, D), c (B, D), rope (passed to attn) -> (B, T, D).
    chain, me and successor as in `fused_block_forward`."""
    handed = chain.take(me, x, c) if chain is not None else None
    if handed is None:
        mods = block.adaLN_modulation(c).chunk(6, dim=-1)
        normed = rmsnorm_modulate(x, mods[0], mods[1], *_rmsnorm_args(block.norm1, x))
    else:
        mods, normed = handed
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
    branch = block.attn(normed, rope)                                                # (B, T, D)
    if chain is None:
        x = x + gate_msa.unsqueeze(1) * branch
        normed = rmsnorm_modulate(x, shift_mlp, scale_mlp, *_rmsnorm_args(block.norm2, x))
    else:
        x, normed = gated_residual_rmsnorm_modulate(x, branch, gate_msa, shift_mlp, scale_mlp,
                                                    *_rmsnorm_args(block.norm2, x))
    branch = block.mlp(normed)                                                       # (B, T, D)
    if chain is None or successor is None or not chain.active():
        return x + gate_mlp.unsqueeze(1) * branch
    next_mods = successor.module.adaLN_modulation(c).chunk(successor.chunks, dim=-1)
    x, normed = gated_residual_rmsnorm_modulate(x, branch, gate_mlp, next_mods[0], next_mods[1],
                                                *_rmsnorm_args(successor.norm, x))
    chain.put(successor, x, c, next_mods, normed)
    return x


def fused_jit_final_forward(final: nn.Module, chain: Optional[_ResidualChain], me: Optional[_Consumer], x: Tensor,
                            c: Tensor) -> Tensor:
    """JiT's final layer: linear(RMSNorm(x)·w·(1 + scale) + shift), x (B, T, D), c (B, D) -> (B, T, out)."""
    handed = chain.take(me, x, c) if chain is not None else None
    if handed is None:
        shift, scale = final.adaLN_modulation(c).chunk(2, dim=-1)
        normed = rmsnorm_modulate(x, shift, scale, *_rmsnorm_args(final.norm_final, x))
    else:
        normed = handed[1]
    return final.linear(normed)


def _qk_rope_fusable(attn: nn.Module) -> bool:
    """True for a JiT-style attention the fused qk-norm + RoPE forward can replace: qkv and proj layers, num_heads,
    RMSNorm q_norm / k_norm (their weight and eps are read at every call)."""
    return (all(getattr(attn, name, None) is not None for name in ("qkv", "proj", "num_heads"))
            and _is_rmsnorm(getattr(attn, "q_norm", None)) and _is_rmsnorm(getattr(attn, "k_norm", None)))


def _rope_tables(rope) -> Optional[tuple]:
    """coredi_fast's JiT passes rope as (cos, sin) (T, Dh/2) tables, or None: -> (cos, sin) / (None, None); any
    other form (public JiT's rotary module, called on q and k) -> None: the fused op does not apply."""
    if rope is None:
        return None, None
    if isinstance(rope, (tuple, list)) and len(rope) == 2 and all(isinstance(t, Tensor) for t in rope):
        return tuple(rope)
    return None


def fused_jit_attention_forward(attn: nn.Module, x: Tensor, rope=None) -> Tensor:
    """JiT self-attention with qk-norm + RoPE fused: x (B, T, D), rope (cos, sin) (T, Dh/2) or None -> (B, T, D).

    qkv -> `qk_norm_rope` (one pass from the packed projection to q, k, v in attention's layout) -> the attention
    dispatcher with the model's scale (default 1/sqrt(Dh)) -> proj (-> proj_drop), as coredi_fast's JiTAttention.
    Calls the model's own forward when the fused path would compute something else: attention dropout in training
    (the dispatcher has none), q_norm and k_norm with different eps, or a rope that is not a (cos, sin) pair.
    """
    tables = _rope_tables(rope)
    attn_drop = getattr(attn, "attn_drop", None)
    dropout = attn.training and attn_drop is not None and getattr(attn_drop, "p", 0.0) > 0
    if tables is None or dropout or _eps_attribute(attn.q_norm) != _eps_attribute(attn.k_norm):
        return type(attn).forward(attn, x, rope)
    B, T, _ = x.shape
    qkv = attn.qkv(x).reshape(B, T, 3, attn.num_heads, -1)                 # (B, T, 3, H, Dh)
    # eps from qkv: an nn.RMSNorm(eps=None) uses the machine epsilon of the dtype it normalizes (q's, under autocast
    # not x's).
    (q_weight, eps), (k_weight, _) = _rmsnorm_args(attn.q_norm, qkv), _rmsnorm_args(attn.k_norm, qkv)
    q, k, v = qk_norm_rope(qkv, q_weight, k_weight, *tables, eps)            # 3 x (B, H, T, Dh)
    out = dispatch_attention(q, k, v, scale=getattr(attn, "scale", None))  # (B, H, T, Dh)
    out = attn.proj(out.transpose(1, 2).reshape(B, T, -1))                 # (B, T, D)
    proj_drop = getattr(attn, "proj_drop", None)
    return proj_drop(out) if proj_drop is not None else out


def _check_rmsnorm(norm, path: str) -> None:
    if not _is_rmsnorm(norm):
        raise ValueError(f"patch_jit: `{path}` must be an RMSNorm over the last dim (a JiT-style model), got "
                         f"{type(norm).__name__}; SiT/DiT models with LayerNorms: use patch_dit")


def _check_jit_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_jit: model must be an nn.Module, got {type(model).__name__}")
    _require(model, "model", "blocks")
    if not list(model.blocks):
        raise ValueError("patch_jit: `model.blocks` is empty")
    for i, block in enumerate(model.blocks):
        path = f"model.blocks.{i}"
        for name in ("norm1", "attn", "norm2", "mlp", "adaLN_modulation"):
            if getattr(block, name, None) is None:
                raise ValueError(f"patch_jit: the model has no `{path}.{name}` (expected a JiT-style model)")
        _check_rmsnorm(block.norm1, f"{path}.norm1")
        _check_rmsnorm(block.norm2, f"{path}.norm2")
    for name in ("norm_final", "linear", "adaLN_modulation"):
        if getattr(getattr(model, "final_layer", None), name, None) is None:
            raise ValueError(f"patch_jit: the model has no `model.final_layer.{name}` (expected a JiT-style model)")
    _check_rmsnorm(model.final_layer.norm_final, "model.final_layer.norm_final")


def patch_jit(model: nn.Module, *, fuse_residual: bool = True, fuse_qk_rope: bool = True) -> nn.Module:
    """Swap the fused RMSNorm + modulate ops (and qk-norm + RoPE) into a JiT-style model in place; returns the model.

    The model is found by attribute names (coredi_fast's JiT or JiT's public `model_jit.py`):

        model.blocks[i]        .norm1, .attn, .norm2, .mlp, .adaLN_modulation      called as block(x, c, rope)
        model.final_layer      .norm_final, .linear, .adaLN_modulation             called as final_layer(x, c)
        model.in_context_len, model.in_context_start (optional)                     JiT's in-context class tokens

    norm1 / norm2 / norm_final must be RMSNorms (their `weight` is read at every call). Every
    `modulate(norm(x), shift, scale)` becomes `rmsnorm_modulate`; with fuse_residual, the gated residual adds are
    fused with the norm that follows, inside each block and across blocks as in `patch_dit` — except into block
    `in_context_start` (it sees the class tokens prepended) and into the final layer when class tokens are in use
    (it sees them cut off), whose tokens are not the previous block's output.

    With fuse_qk_rope, each block's attention whose `attn` has `qkv`, `proj`, `num_heads` and RMSNorm `q_norm` /
    `k_norm` (others keep their forward) runs `fused_jit_attention_forward`: qkv projection -> `qk_norm_rope` (the
    q/k RMSNorms and RoPE in one pass; their weights and eps read at every call) -> the attention dispatcher ->
    proj, as coredi_fast's JiTAttention does (it calls the dispatcher too). It falls back to the model's forward per
    call where fusing would change the result (see that function). Activation checkpointing, wrapping and
    sharding behave as for `patch_dit`; `unpatch_dit` / `is_dit_patched` undo and detect this patch too.
    """
    for arg, value in dict(fuse_residual=fuse_residual, fuse_qk_rope=fuse_qk_rope).items():
        if not isinstance(value, bool):
            raise TypeError(f"patch_jit: {arg} must be a bool, got {value!r}")
    options = ("jit", fuse_residual, fuse_qk_rope)
    existing = model.__dict__.get(_PATCH_ATTR) if isinstance(model, nn.Module) else None
    if existing is not None:
        if existing.options == options:
            return model
        unpatch_dit(model)
    _check_jit_model(model)

    record = _PatchRecord(options)
    blocks = list(model.blocks)
    final = model.final_layer
    breaks = set()
    if getattr(model, "in_context_len", 0):
        breaks |= {int(getattr(model, "in_context_start", 0)), len(blocks)}
    chain = _ResidualChain(model) if fuse_residual else None
    consumers = successors = [None] * (len(blocks) + 1)  # without fuse_residual nothing is handed over
    if fuse_residual:
        consumers, successors = _chain_consumers(blocks, final, frozenset(breaks))
    for block, me, successor in zip(blocks, consumers, successors):
        _set_forward(record, block, functools.partial(fused_jit_block_forward, block, chain, me, successor))
        if fuse_qk_rope and _qk_rope_fusable(block.attn):
            _set_forward(record, block.attn, functools.partial(fused_jit_attention_forward, block.attn))
    _set_forward(record, final, functools.partial(fused_jit_final_forward, final, chain, consumers[-1]))
    model.__dict__[_PATCH_ATTR] = record
    return model
