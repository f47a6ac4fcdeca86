"""What `patch_dit` / `patch_jit` read from a model before changing anything, and why they refuse one.

`plan_model` walks the model once and returns a `ModelPlan` — per block: how its adaLN output splits, whether it
takes an extra argument after (x, c) (a rope) and how its attention is patched — or raises a ValueError naming the
module and what did not fit. Nothing is changed before the plan is complete, so a refused model is left as it was.

What is taken:
    blocks            block(x, c) or block(x, c, rope) (any name for the rope, positional or keyword); the rope
                      goes to block.attn as its second argument, as in LightningDiT and JiT
    adaLN             6 chunks (shift, scale, gate for attention and MLP, DiT) or 4 (scale, gate for each, no shift:
                      LightningDiT's wo_shift); the final layer's 2 (shift, scale)
    norms             LayerNorms without affine parameters (patch_dit) or RMSNorms (patch_jit)
    attention         qkv, proj, num_heads; q_norm / k_norm both RMSNorms or both LayerNorms over the head dim -> the
                      fused qk-norm + RoPE op (`qk_norm_rope` / `qk_layernorm_rope`), other q/k norms (none, mixed)
                      run as the model's modules; rope as (cos, sin) tables or a rotary module (`patch_rotary`),
                      checked against the op here
"""
import inspect
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from .patch_rotary import RopeReader, is_rotary_module, rotary_mismatch

LAYER, RMS = "layernorm", "rmsnorm"


# ---------------------------------------------------------------------------------------------------------------
# Norms
# ---------------------------------------------------------------------------------------------------------------


def is_rmsnorm(norm) -> bool:
    """torch's nn.RMSNorm over the last dim, or a JiT/LLaMA-style `*RMSNorm` module with a (D,) `weight`."""
    if isinstance(norm, getattr(nn, "RMSNorm", ())):
        return len(norm.normalized_shape) == 1
    weight = getattr(norm, "weight", None)
    return (isinstance(norm, nn.Module) and type(norm).__name__.endswith("RMSNorm")
            and (weight is None or weight.dim() == 1)
            and (getattr(norm, "eps", None) is not None or getattr(norm, "variance_epsilon", None) is not None))


def eps_attribute(norm: nn.Module):
    """An RMSNorm's eps as configured (None: the input dtype's machine epsilon)."""
    eps = getattr(norm, "eps", None)
    return eps if eps is not None else getattr(norm, "variance_epsilon", None)


def is_head_layernorm(norm) -> bool:
    """An nn.LayerNorm over the last dim (timm's qk-norm), with or without weight and bias."""
    return isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1


def qk_norm_kind(attn: nn.Module) -> Optional[str]:
    """RMS or LAYER when q_norm and k_norm are both of a kind the fused op computes, else None."""
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if is_rmsnorm(q_norm) and is_rmsnorm(k_norm):
        return RMS
    if is_head_layernorm(q_norm) and is_head_layernorm(k_norm):
        return LAYER
    return None


def _norm_width(norm) -> Optional[int]:
    shape = getattr(norm, "normalized_shape", None)
    if shape:
        return int(shape[-1])
    weight = getattr(norm, "weight", None)
    return int(weight.shape[0]) if weight is not None else None


def _check_norm(norm, path: str, kind: str, who: str) -> None:
    if kind == RMS:
        if not is_rmsnorm(norm):
            raise ValueError(f"{who}: `{path}` must be an RMSNorm over the last dim (a JiT-style model), got "
                             f"{type(norm).__name__}; SiT/DiT models with LayerNorms: use patch_dit")
        return
    if is_rmsnorm(norm):
        raise ValueError(f"{who}: `{path}` is an RMSNorm (a JiT-style model): use patch_jit")
    if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
        raise ValueError(f"{who}: `{path}` must be an nn.LayerNorm over the last dim, got {type(norm).__name__}")
    if norm.weight is not None or norm.bias is not None:
        raise ValueError(f"{who}: `{path}` has affine parameters; the fused op needs elementwise_affine=False")


def _require(obj, path: str, who: str, *names: str) -> None:
    for name in names:
        if getattr(obj, name, None) is None:
            raise ValueError(f"{who}: the model has no `{path}.{name}` (expected a SiT/DiT/JiT-style model)")


# ---------------------------------------------------------------------------------------------------------------
# adaLN layouts and call conventions
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdaLNLayout:
    """How a consumer's adaLN output splits into chunks (one shared object per layout: see `LAYOUTS`).

    6: shift, scale, gate for attention, then for the MLP (DiT); 4: scale, gate for each with no shift
    (LightningDiT's wo_shift); 2: the final layer's shift, scale.
    """

    chunks: int

    def first_norm(self, mods: tuple) -> tuple:
        """(shift or None, scale) of the consumer's first norm (norm1, or the final layer's norm_final)."""
        return (None, mods[0]) if self.chunks == 4 else (mods[0], mods[1])

    def block(self, mods: tuple) -> tuple:
        """(shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), shifts None without shift."""
        if self.chunks == 4:
            scale_msa, gate_msa, scale_mlp, gate_mlp = mods
            return None, scale_msa, gate_msa, None, scale_mlp, gate_mlp
        return tuple(mods)


LAYOUTS = {n: AdaLNLayout(n) for n in (6, 4, 2)}


_INTERNED: dict = {}


def interned(value):
    """One shared object per distinct (frozen, hashable) value. The objects the patched forwards are bound with
    must be shared between blocks: dynamo guards a bound object by identity, so one object per block would
    recompile every block's forward (tests/test_compiled_blocks.py)."""
    return _INTERNED.setdefault(value, value)


@dataclass(frozen=True)
class ExtraArgument:
    """The argument a module takes after its inputs ((x, c) for a block, x for an attention): a rope. name None:
    it takes none. `take` reads it from a patched forward's *args / **kwargs, as Python would bind it."""

    name: Optional[str] = None

    def take(self, args: tuple, kwargs: dict):
        if self.name is None:
            if args or kwargs:
                raise TypeError(f"forward() got unexpected arguments after its inputs: {len(args)} positional, "
                                f"keywords {sorted(kwargs)}")
            return None
        if len(args) > 1 or (args and kwargs) or (kwargs and set(kwargs) - {self.name}):
            raise TypeError(f"forward() takes one argument `{self.name}` after its inputs, got {len(args)} "
                            f"positional and keywords {sorted(kwargs)}")
        return args[0] if args else kwargs.get(self.name)


def _extra_parameter(module: nn.Module, path: str, inputs: int, who: str) -> Optional[inspect.Parameter]:
    """The parameter of module.forward after its `inputs` leading ones (None: there is none); refuses a forward
    whose convention cannot be told (fewer inputs, *args/**kwargs only, more than one required extra)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        raise ValueError(f"{who}: cannot read the signature of `{path}.forward`") from None
    named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if len(named) < inputs or any(p.kind == p.KEYWORD_ONLY for p in named[:inputs]):
        names = ", ".join(p.name for p in params)
        raise ValueError(f"{who}: `{path}.forward({names})` does not take its {inputs} input(s) positionally "
                         f"(expected forward(x, c[, rope]) for a block, forward(x[, rope]) for an attention)")
    extra = named[inputs:]
    if len(extra) > 1 and any(p.default is p.empty for p in extra[1:]):
        raise ValueError(f"{who}: `{path}.forward` takes {[p.name for p in extra]} after its inputs; it can take at "
                         f"most one (a rope, handed to the attention)")
    if not extra:
        return None
    if extra[0].default is not extra[0].empty and extra[0].default is not None:
        raise ValueError(f"{who}: `{path}.forward`'s `{extra[0].name}` defaults to {extra[0].default!r}; the patch "
                         f"passes None when it is left out")
    return extra[0]


# ---------------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionPlan:
    """How one attention is patched: qk_norm — RMS or LAYER: q_norm/k_norm and the rope through the fused
    qk-norm + RoPE op; None: the model's q_norm/k_norm modules and rotary module, then the dispatcher.
    dropout_fallback — in training with attention dropout (p > 0 at call time), the model's own forward runs
    (patch_jit; patch_dit refuses models with attention dropout)."""

    extra: ExtraArgument
    qk_norm: Optional[str]
    dropout_fallback: bool  # read attn.attn_drop at every call (patch_jit)

    @property
    def fused_qk(self) -> bool:
        return self.qk_norm is not None


@dataclass
class BlockPlan:
    path: str
    layout: Optional[AdaLNLayout]  # None when the norms are not patched
    extra: ExtraArgument
    attention: Optional[AttentionPlan]  # None: the attention keeps its forward
    attention_note: str  # what runs in the attention, for `patch_report`


@dataclass
class ModelPlan:
    who: str
    norm: Optional[str]  # LAYER or RMS; None: the norms are not patched
    blocks: list
    final_layout: Optional[AdaLNLayout]
    rope: RopeReader
    breaks: frozenset = field(default_factory=frozenset)  # consumers whose input is not the previous output


def _head_dim(attn: nn.Module) -> Optional[int]:
    qkv = getattr(attn, "qkv", None)
    if isinstance(qkv, nn.Linear) and qkv.out_features % (3 * attn.num_heads) == 0:
        return qkv.out_features // (3 * attn.num_heads)
    return getattr(attn, "head_dim", None)


def _adaln_layout(module: nn.Module, path: str, width: Optional[int], allowed: tuple, who: str) -> AdaLNLayout:
    linears = [m for m in module.adaLN_modulation.modules() if isinstance(m, nn.Linear)]
    if not linears or not width:
        raise ValueError(f"{who}: cannot tell how `{path}.adaLN_modulation` splits: it needs an nn.Linear (its last "
                         f"one gives the output width) and a norm of known width")
    out = linears[-1].out_features
    if out % width or out // width not in allowed:
        takes = " or ".join({6: "6·D (shift, scale, gate ×2)", 4: "4·D (scale, gate ×2, LightningDiT's wo_shift)",
                             2: "2·D (shift, scale)"}[n] for n in allowed)
        raise ValueError(f"{who}: `{path}.adaLN_modulation` gives {out} outputs for D = {width}; {who} takes {takes}")
    return LAYOUTS[out // width]


def _plan_attention(attn: nn.Module, path: str, who: str, replace: bool,
                    fused_only: bool) -> tuple[Optional[AttentionPlan], str]:
    """(plan or None to keep the model's forward, a note on what runs)."""
    kind = qk_norm_kind(attn)
    if not replace:
        return None, "the model's own attention (not patched)"
    if fused_only and kind is None:
        return None, "the model's own attention: no RMSNorm/LayerNorm q_norm and k_norm for the fused qk-norm op"
    _require(attn, path, who, "qkv", "proj", "num_heads")
    if getattr(attn, "gate", None) is not None:
        raise ValueError(f"{who}: `{path}.gate` (gated attention) is not supported")
    dropout = getattr(getattr(attn, "attn_drop", None), "p", 0.0) > 0
    if dropout and not fused_only:
        raise ValueError(f"{who}: `{path}.attn_drop` has p > 0; the attention dispatch has no dropout")
    param = _extra_parameter(attn, path, 1, who)
    plan = interned(AttentionPlan(interned(ExtraArgument(param.name if param else None)), kind, fused_only))
    q_norm = getattr(attn, "q_norm", None)
    if kind is not None:
        note = f"fused qk-norm ({type(q_norm).__name__}) (+ RoPE) op, attention dispatcher"
    elif q_norm is None or isinstance(q_norm, nn.Identity):
        note = "attention dispatcher (no qk-norm to fuse; a rope runs as the model's module)"
    else:
        note = (f"attention dispatcher; q_norm/k_norm ({type(q_norm).__name__}) and a rope run as the model's "
                f"modules")
    if dropout:
        note += "; the model's own attention in training (attention dropout)"
    return plan, note


def plan_model(model: nn.Module, who: str, norm: Optional[str], attention: bool, fused_qk_only: bool) -> ModelPlan:
    """Read `model` for `who` ('patch_dit' / 'patch_jit'). norm: LAYER or RMS to patch the norm sites, None to leave
    them; attention: replace attentions; fused_qk_only: replace only those whose q_norm/k_norm the fused op
    computes (patch_jit).
    Raises TypeError / ValueError (naming the module and what did not fit) without changing anything."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: model must be an nn.Module, got {type(model).__name__}")
    _require(model, "model", who, "blocks")
    blocks = list(model.blocks)
    if not blocks:
        raise ValueError(f"{who}: `model.blocks` is empty")
    plans = []
    for i, block in enumerate(blocks):
        path = f"model.blocks.{i}"
        _require(block, path, who, "attn")
        layout = None
        if norm is not None:
            _require(block, path, who, "norm1", "norm2", "mlp", "adaLN_modulation")
            _check_norm(block.norm1, f"{path}.norm1", norm, who)
            _check_norm(block.norm2, f"{path}.norm2", norm, who)
            layout = _adaln_layout(block, path, _norm_width(block.norm1), (6, 4), who)
        param = None
        if norm is not None:  # the patched block takes the block's arguments and hands an extra one to attn
            param = _extra_parameter(block, path, 2, who)
            if param is not None and _extra_parameter(block.attn, f"{path}.attn", 1, who) is None:
                raise ValueError(f"{who}: `{path}.forward` takes `{param.name}` after (x, c) but `{path}.attn.forward` "
                                 f"takes nothing after x: the patch hands a block's extra argument (a rope) to its "
                                 f"attention")
        extra = interned(ExtraArgument(param.name if param else None))
        attn_plan, note = _plan_attention(block.attn, f"{path}.attn", who, attention, fused_qk_only)
        plans.append(BlockPlan(path, layout, extra, attn_plan, note))

    final_layout = None
    if norm is not None:
        _require(model, "model", who, "final_layer")
        final = model.final_layer
        _require(final, "model.final_layer", who, "norm_final", "linear", "adaLN_modulation")
        _check_norm(final.norm_final, "model.final_layer.norm_final", norm, who)
        final_layout = _adaln_layout(final, "model.final_layer", _norm_width(final.norm_final), (2,), who)
        if _extra_parameter(final, "model.final_layer", 2, who) is not None:
            raise ValueError(f"{who}: `model.final_layer.forward` takes an argument after (x, c); the patch takes "
                             f"final_layer(x, c)")

    replaced = [(plan, block.attn) for plan, block in zip(plans, blocks) if plan.attention is not None]
    rotary = []
    if replaced:
        head_dim = _head_dim(replaced[0][1])
        for name, module in model.named_modules():
            if is_rotary_module(module):
                reason = rotary_mismatch(module, head_dim)
                if reason is not None:
                    hint = "fuse_qk_rope=False" if who == "patch_jit" else "attention=False"
                    raise ValueError(f"{who}: `model.{name}` ({type(module).__name__}) cannot be read into the fused "
                                     f"op's RoPE tables: {reason}. Patch with {hint} to keep the model's attention")
                rotary.append((f"model.{name}", module))

    breaks = frozenset()
    if getattr(model, "in_context_len", 0):  # JiT's class tokens: prepended before one block, cut before the final
        breaks = frozenset({int(getattr(model, "in_context_start", 0)), len(blocks)})
    return ModelPlan(who, norm, plans, final_layout, RopeReader(rotary), breaks)
