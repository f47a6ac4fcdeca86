"""`patch_dit(model)` / `patch_jit(model)`: swap coredi_kernels' fused ops into a DiT-family model, in place.

    patch_dit   LayerNorm models: DiT, SiT, REPA, fast-DiT, ReDi, LightningDiT with LayerNorms
    patch_jit   RMSNorm models:   JiT, LightningDiT with RMSNorms (its released configuration)

The model is found by attribute names only (coredi_fast's models, or the public code built on timm's
`Attention`/`Mlp` and its look-alikes):

    model.blocks[i]          .norm1, .attn, .norm2, .mlp, .adaLN_modulation  called as block(x, c) or block(x, c, rope)
    model.blocks[i].attn     .qkv, .proj, .num_heads [, .q_norm, .k_norm, .norm, .proj_drop, .scale]   attn(x[, rope])
    model.final_layer        .norm_final, .linear, .adaLN_modulation            called as final_layer(x, c)
    model.in_context_len, model.in_context_start (optional)                      JiT's in-context class tokens

`adaLN_modulation` gives 6 chunks (shift, scale, gate for attention and MLP) or 4 (scale, gate for each, no shift:
LightningDiT's wo_shift); the final layer's gives 2. A block's extra argument (a rope: a (cos, sin) pair of (T, Dh/2)
tables, or a rotary module holding `freqs_cos` / `freqs_sin` like JiT's and LightningDiT's, see `patch_rotary`) is
handed to its attention. Everything is checked before anything changes (`patch_structure`): a structure the patch
cannot take is refused with a ValueError naming the module and what did not fit, and the model is left untouched.
Only `forward`s are replaced (per module instance, by a picklable `functools.partial`): parameters, buffers,
state-dict names and the model's own `forward` (label dropout, REPA projections, unpatchify, learn_sigma,
forward_with_cfg) stay as they are. `patch_report(model)` says what was swapped in, counted.

What is swapped in:
    attention            attn.forward = qkv -> [q/k norm + RoPE] -> `attention` (the dispatcher) -> proj. With
                         RMSNorm (JiT, LightningDiT) or LayerNorm (timm, REPA) q_norm / k_norm, qk-norm and RoPE run
                         as one `qk_norm_rope` / `qk_layernorm_rope` op (patch_jit patches only those attentions;
                         patch_dit patches every attention, running the model's rotary module itself where there
                         is no qk-norm to fuse)
    norm + modulate      every `modulate(norm(x), shift, scale)` in the blocks and the final layer runs as one
                         `layernorm_modulate` / `rmsnorm_modulate` op; the residual adds stay separate
    fuse_residual        every residual add is fused with the norm that follows it: inside a block `x + gate_msa·attn`
                         with norm2, and across blocks `x + gate_mlp·mlp` with the NEXT block's norm1 (or the final
                         layer's norm). The adaLN outputs depend only on c, so block i computes the next consumer's
                         shift/scale itself and hands (x, normed x, modulation) over; the next consumer uses the
                         hand-over only when it is called with that very x and c (an identity check), else it computes
                         its own. A depth-N model then runs 2N+1 fused norm passes and no separate residual add, with
                         the model's loop unchanged (except across JiT's in-context tokens, added before one block and
                         cut before the final layer).

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
fuse_residual a block reads the NEXT block's adaLN weights, so sharding parameters per block (FSDP, ZeRO-3) needs
fuse_residual=False; ZeRO-1/2 are fine.

`unpatch_dit(model)` restores the original forwards (of either patch). Patching twice with the same options does
nothing; with other options, the first patch is undone first.
"""
import functools
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from .patch_chain import ResidualChain, chain_consumers
from .patch_forwards import fused_attention_forward, fused_block_forward, fused_final_forward
from .patch_structure import LAYER, RMS, ModelPlan, plan_model

_PATCH_ATTR = "_coredi_patch"


@dataclass
class _PatchRecord:
    options: tuple
    plan: ModelPlan
    fuse_residual: bool
    originals: list = field(default_factory=list)  # (module, its instance-level forward before patching or None)


def _set_forward(record: _PatchRecord, module: nn.Module, forward) -> None:
    record.originals.append((module, module.__dict__.get("forward")))
    module.forward = forward  # an instance attribute: shadows the class's forward for this module only


def _check_bools(who: str, **options) -> None:
    for arg, value in options.items():
        if not isinstance(value, bool):
            raise TypeError(f"{who}: {arg} must be a bool, got {value!r}")


def _already(model: nn.Module, options: tuple) -> bool:
    """True if `model` is patched with `options`; a model patched with other options is unpatched first."""
    existing = model.__dict__.get(_PATCH_ATTR) if isinstance(model, nn.Module) else None
    if existing is not None:
        if existing.options == options:
            return True
        unpatch_dit(model)
    return False


def _apply(model: nn.Module, plan: ModelPlan, options: tuple, fuse_residual: bool) -> nn.Module:
    record = _PatchRecord(options, plan, fuse_residual)
    blocks = list(model.blocks)
    for block, block_plan in zip(blocks, plan.blocks):
        if block_plan.attention is not None:
            _set_forward(record, block.attn,
                         functools.partial(fused_attention_forward, block.attn, block_plan.attention, plan.rope))
    if plan.norm is not None:
        rms = plan.norm == RMS
        final = model.final_layer
        chain = ResidualChain(model) if fuse_residual else None
        consumers = successors = [None] * (len(blocks) + 1)  # without fuse_residual nothing is handed over
        if fuse_residual:
            consumers, successors = chain_consumers(blocks, [p.layout for p in plan.blocks], final,
                                                    plan.final_layout, plan.breaks)
        for block, block_plan, me, successor in zip(blocks, plan.blocks, consumers, successors):
            _set_forward(record, block, functools.partial(fused_block_forward, block, rms, block_plan.layout,
                                                          block_plan.extra, chain, me, successor))
        _set_forward(record, final,
                     functools.partial(fused_final_forward, final, rms, plan.final_layout, chain, consumers[-1]))
    model.__dict__[_PATCH_ATTR] = record
    return model


def patch_dit(
    model: nn.Module, *, layernorm_modulate: bool = True, attention: bool = True, fuse_residual: bool = True
) -> nn.Module:
    """Swap the fused ops into a DiT-style model with LayerNorms in place (see the module docstring); returns it.

    Raises ValueError naming the missing or unsuitable part (e.g. `model.blocks.0.norm1`) before changing
    anything. Patching again with other options first restores the original forwards.
    """
    _check_bools("patch_dit", layernorm_modulate=layernorm_modulate, attention=attention,
                 fuse_residual=fuse_residual)
    if fuse_residual and not layernorm_modulate:
        raise ValueError("patch_dit: fuse_residual=True fuses residual adds into the norms: it needs "
                         "layernorm_modulate=True")
    options = (layernorm_modulate, attention, fuse_residual)
    if _already(model, options):
        return model
    plan = plan_model(model, "patch_dit", LAYER if layernorm_modulate else None, attention, fused_qk_only=False)
    return _apply(model, plan, options, fuse_residual)


def patch_jit(model: nn.Module, *, fuse_residual: bool = True, fuse_qk_rope: bool = True) -> nn.Module:
    """Swap the fused RMSNorm + modulate ops (and qk-norm + RoPE) into a model with RMSNorms in place; returns it.

    JiT, or LightningDiT with RMSNorms (see the module docstring). norm1 / norm2 / norm_final must be RMSNorms
    (their `weight` and eps are read at every call). With fuse_residual, the gated residual adds are fused with the
    norm that follows, inside each block and across blocks — except into block `in_context_start` (it sees the
    class tokens prepended) and into the final layer when class tokens are in use (it sees them cut off).

    With fuse_qk_rope, each attention with RMSNorm (or LayerNorm) `q_norm` / `k_norm` runs qkv -> `qk_norm_rope`
    (both norms and the rope in one pass) -> the attention dispatcher -> proj; the rope it gets — (cos, sin) tables
    or a rotary module, checked against the op now — is read into the op's tables. An attention without such q/k
    norms keeps its forward. Activation checkpointing, wrapping and sharding behave as for `patch_dit`;
    `unpatch_dit` / `is_dit_patched` undo and detect this patch too.
    """
    _check_bools("patch_jit", fuse_residual=fuse_residual, fuse_qk_rope=fuse_qk_rope)
    options = ("jit", fuse_residual, fuse_qk_rope)
    if _already(model, options):
        return model
    plan = plan_model(model, "patch_jit", RMS, fuse_qk_rope, fused_qk_only=True)
    return _apply(model, plan, options, fuse_residual)


def unpatch_dit(model: nn.Module) -> nn.Module:
    """Restore the forwards `patch_dit` / `patch_jit` replaced; a model that is not patched is returned unchanged."""
    record = model.__dict__.pop(_PATCH_ATTR, None)
    if record is None:
        return model
    for module, previous in reversed(record.originals):
        if previous is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = previous
    return model


@dataclass(frozen=True)
class PatchReport:
    """What `patch_dit` / `patch_jit` swapped into a model, counted per forward pass (from what the patch read;
    `notes` name the attentions that do not run the fused qk-norm + RoPE op and what runs instead)."""

    patch: str
    blocks: int
    attentions_fused_qk: int      # q/k norms (and the rope) as one qk_norm_rope op, then the dispatcher
    attentions_dispatched: int    # every patched attention: through the attention dispatcher
    norm_sites: int               # modulate(norm(x)) sites: 2 per block and the final layer's
    norm_sites_fused: int         # of them, run as one fused norm + modulate op
    residual_adds_fused: int      # residual adds fused into the next norm (no activation checkpointing)
    rotary_modules: tuple = ()    # the model's rotary modules, read into the op's RoPE tables
    notes: tuple = ()

    def __str__(self) -> str:
        lines = [f"{self.patch}: {self.blocks} blocks",
                 f"  attention: {self.attentions_fused_qk}/{self.blocks} fused qk-norm (+ RoPE), "
                 f"{self.attentions_dispatched}/{self.blocks} through the attention dispatcher",
                 f"  norm + modulate: {self.norm_sites_fused}/{self.norm_sites} sites fused, "
                 f"{self.residual_adds_fused} residual adds fused into them"]
        if self.rotary_modules:
            lines.append(f"  rope: {', '.join(self.rotary_modules)} (rotary modules checked against the op)")
        return "\n".join(lines + [f"  {note}" for note in self.notes])


def patch_report(model: nn.Module) -> Optional[PatchReport]:
    """What the patch on `model` swapped in (None if it is not patched)."""
    record = model.__dict__.get(_PATCH_ATTR)
    if record is None:
        return None
    plan = record.plan
    blocks = len(plan.blocks)
    patched = [p.attention for p in plan.blocks if p.attention is not None]
    residual = 0
    if plan.norm is not None and record.fuse_residual:  # each block's inner add, each hand-over to the next consumer
        residual = blocks + sum(1 for i in range(1, blocks + 1) if i not in plan.breaks)
    unfused = {}  # note -> the blocks it applies to
    for i, p in enumerate(plan.blocks):
        if p.attention is None or not p.attention.fused_qk or "dropout" in p.attention_note:
            unfused.setdefault(p.attention_note, []).append(str(i))
    notes = tuple(f"model.blocks[{', '.join(ids)}].attn: {note}" for note, ids in unfused.items())
    return PatchReport(plan.who, blocks, sum(p.fused_qk for p in patched), len(patched), 2 * blocks + 1,
                       2 * blocks + 1 if plan.norm is not None else 0, residual, plan.rope.names, notes)


def is_dit_patched(model: nn.Module) -> bool:
    """True if `patch_dit` or `patch_jit` has patched this model (and it was not unpatched since)."""
    return _PATCH_ATTR in model.__dict__
