"""Drop-in: `patch_dit` / `patch_jit` on models written in the style of five public DiT codebases
(tests/dit_codebases.py: DiT, REPA, fast-DiT, LightningDiT, JiT) give the unpatched model's outputs and every
gradient, run the fused ops at every site they count, read rotary modules into the fused op's RoPE tables, and
refuse at patch time — naming the module, leaving the model untouched — what they cannot take.

Counting: a TorchDispatchMode counts the `coredi::*` ops that run in one forward + backward, and a wrapper around
the attention dispatcher counts the attentions it runs. Equality: float64 on the PyTorch path (to ~1e-12), float32
with the Triton kernels under the interpreter (to ~1e-5). `python tests/test_patch_codebases.py` prints the table
of docs/drop_in.md from the same cases.
"""
import copy
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch._dynamo
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import coredi_kernels.patch_forwards as patch_forwards
from coredi_kernels import force_backend, patch_dit, patch_jit, patch_report, qk_norm_rope
from coredi_kernels.patch import is_dit_patched
from coredi_kernels.patch_rotary import rotary_tables
from dit_codebases import (
    DiTStyle,
    FastDiTStyle,
    GridRotaryEmbedding,
    JiTRMSNorm,
    JiTStyle,
    LightningBlock,
    LightningDiTStyle,
    repa_style,
)
from test_patch_dit import assert_same

FP64 = dict(atol=1e-10, rtol=1e-10)
FP32_INTERPRETER = dict(atol=2e-5, rtol=2e-5)


def randomize_(model, std=0.1):
    """Random weights everywhere but the fixed position table (adaLN-Zero would zero every gate and hide mistakes);
    norm weights near 1."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if "norm" in name else 0.0))
    return model


# ---------------------------------------------------------------------------------------------------------------
# The cases: one model per codebase and variant, with what the patch must fuse in it
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    build: Callable
    patch: Callable
    qk_fused: int        # attentions that must run the fused qk-norm (+ RoPE) op
    dispatched: int      # attentions that must run through the attention dispatcher
    channels: int = 4
    recomputed: bool = False  # every block checkpointed: its forward ops run again in the backward

    def model(self):
        return randomize_(self.build())


def split_outputs(out):
    """A model's outputs as a list: REPA's (x, zs) flattened."""
    if isinstance(out, tuple):
        return [out[0], *out[1]]
    return [out]


def fast_dit(use_reentrant):
    model = FastDiTStyle(8, 2, 4, 64, 2, 4, 10, learn_sigma=True)
    model.use_reentrant = use_reentrant
    return model


CASES = {
    "DiT": Case(lambda: DiTStyle(8, 2, 4, 64, 2, 4, 10, learn_sigma=True), patch_dit, 0, 2),
    "REPA": Case(lambda: repa_style(qk_norm=False), patch_dit, 0, 3),
    "REPA qk-norm": Case(lambda: repa_style(qk_norm=True), patch_dit, 3, 3),
    "fast-DiT": Case(lambda: fast_dit(False), patch_dit, 0, 2, recomputed=True),
    "fast-DiT reentrant": Case(lambda: fast_dit(True), patch_dit, 0, 2, recomputed=True),
    "LightningDiT": Case(lambda: LightningDiTStyle(), patch_jit, 0, 0),  # released: no qk-norm
    "LightningDiT qk-norm": Case(lambda: LightningDiTStyle(use_qknorm=True), patch_jit, 2, 2),
    "LightningDiT qk-norm, no RoPE": Case(lambda: LightningDiTStyle(use_qknorm=True, use_rope=False),
                                          patch_jit, 2, 2),
    "LightningDiT wo_shift": Case(lambda: LightningDiTStyle(use_qknorm=True, wo_shift=True), patch_jit, 2, 2),
    "LightningDiT checkpointed": Case(lambda: LightningDiTStyle(use_qknorm=True, use_checkpoint=True),
                                      patch_jit, 2, 2, recomputed=True),
    "LightningDiT LayerNorm": Case(lambda: LightningDiTStyle(use_rmsnorm=False, use_swiglu=False),
                                   patch_dit, 0, 2),
    "LightningDiT LayerNorm qk-norm": Case(lambda: LightningDiTStyle(use_rmsnorm=False, use_qknorm=True),
                                           patch_dit, 2, 2),
    "LightningDiT LayerNorm wo_shift": Case(lambda: LightningDiTStyle(use_rmsnorm=False, wo_shift=True),
                                            patch_dit, 0, 2),
    "JiT": Case(lambda: JiTStyle(), patch_jit, 4, 4, channels=3),
}
INTERPRETER_CASES = ["DiT", "REPA qk-norm", "fast-DiT reentrant", "LightningDiT", "LightningDiT qk-norm",
                     "LightningDiT LayerNorm qk-norm", "LightningDiT LayerNorm wo_shift", "JiT"]


def inputs(case, dtype=torch.float32, batch=2):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(batch, case.channels, 8, 8, generator=g, dtype=torch.float64).to(dtype)
    return x, torch.rand(batch, generator=g, dtype=torch.float64).to(dtype), torch.randint(0, 10, (batch,),
                                                                                           generator=g)


def outputs_and_grads(model, x, t, y, forward=None):
    """Outputs and the gradients of a fixed weighted sum of them w.r.t. the input and every parameter."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    outs = split_outputs((forward or model)(x, t, y))
    loss = sum((o * torch.linspace(-1, 2, o.numel(), dtype=o.dtype).reshape(o.shape)).sum() for o in outs)
    loss.backward()
    grads = {"input": x.grad}
    grads.update({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    return [o.detach() for o in outs], grads


def max_differences(got, want):
    """For the outputs, then for every gradient: (the largest |Δ|, the largest |Δ| of a tensor relative to that
    tensor's largest |value|). Gradients that are zero in exact arithmetic are left out of the relative figure
    (k_norm's bias: softmax ignores a shift shared by all keys): their reference is rounding noise."""
    (outs, grads), (ref_outs, ref_grads) = got, want
    assert grads.keys() == ref_grads.keys()
    largest = max(g.abs().max() for g in ref_grads.values())
    figures = []
    for pairs in (list(zip(outs, ref_outs, strict=True)), [(grads[n], g) for n, g in ref_grads.items()]):
        absolute = max((a - b).abs().max().item() for a, b in pairs)
        relative = max(((a - b).abs().max() / b.abs().max()).item() for a, b in pairs
                       if b.abs().max() > 1e-8 * largest)
        figures.append((absolute, relative))
    return figures


class OpCounter(TorchDispatchMode):
    """Counts the coredi ops that run (forward and backward), and the attentions the dispatcher runs."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.counts = Counter()
        dispatch = patch_forwards.dispatch_attention

        def counted(*args, **kwargs):
            self.counts["attention_dispatch"] += 1
            return dispatch(*args, **kwargs)

        monkeypatch.setattr(patch_forwards, "dispatch_attention", counted)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "coredi":
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def count(self, suffix, *names):
        return sum(self.counts[f"{name}_{suffix}"] for name in names)


NORM_OPS = ("layernorm_modulate", "gated_residual_layernorm_modulate", "rmsnorm_modulate",
            "gated_residual_rmsnorm_modulate")
QK_OPS = ("qk_norm_rope", "qk_layernorm_rope")


# ---------------------------------------------------------------------------------------------------------------
# Same outputs and gradients, every site fused
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_patched_model_equals_unpatched_in_float64_and_fuses_every_site(name, monkeypatch):
    case = CASES[name]
    model = case.model().double()
    x, t, y = inputs(case, torch.float64)
    want = outputs_and_grads(model, x, t, y)
    patched = case.patch(copy.deepcopy(model))
    assert patched.state_dict().keys() == model.state_dict().keys()
    with force_backend("torch"), OpCounter(monkeypatch) as counter:
        got = outputs_and_grads(patched, x, t, y)
    assert_same(got, want, FP64)

    depth = len(model.blocks)
    runs = 2 if case.recomputed else 1  # checkpointed blocks run their forward again in the backward
    sites = 2 * depth + 1
    assert counter.count("fwd", *NORM_OPS) == sites + (runs - 1) * 2 * depth  # every adaLN norm site, fused
    assert counter.count("bwd", *NORM_OPS) == sites
    assert counter.count("fwd", *QK_OPS) == runs * case.qk_fused
    assert counter.count("bwd", *QK_OPS) == case.qk_fused
    assert counter.counts["attention_dispatch"] == runs * case.dispatched
    report = patch_report(patched)
    assert (report.blocks, report.attentions_fused_qk, report.attentions_dispatched) == (depth, case.qk_fused,
                                                                                         case.dispatched)
    assert (report.norm_sites, report.norm_sites_fused) == (sites, sites)


@pytest.mark.parametrize("name", INTERPRETER_CASES)
def test_patched_model_equals_unpatched_with_triton_kernels_in_float32(name):
    """The Triton kernels under the interpreter (TRITON_INTERPRET=1 on CPU) at the same tiny shapes."""
    case = CASES[name]
    model = case.model()
    x, t, y = inputs(case)
    want = outputs_and_grads(model, x, t, y)
    patched = case.patch(copy.deepcopy(model))
    with force_backend("triton"):
        got = outputs_and_grads(patched, x, t, y)
    assert_same(got, want, FP32_INTERPRETER)


@pytest.mark.parametrize("name", ["DiT", "LightningDiT"])
def test_forward_with_cfg_of_the_patched_model(name):
    case = CASES[name]
    model = case.model().double()
    x, t, y = inputs(case, torch.float64, batch=4)
    with torch.no_grad():
        want = model.forward_with_cfg(x, t, y, 4.0)
        got = case.patch(model).forward_with_cfg(x, t, y, 4.0)
    torch.testing.assert_close(got, want, **FP64)


def test_jit_dropout_in_training_draws_the_same_masks(monkeypatch):
    """JiT's projection dropout (middle blocks) in training: the patched model calls the same dropout modules in the
    same order, so from one seed it draws the same masks; attention dropout makes those attentions run the model's
    own forward in training (the dispatcher has no dropout), and in eval they run the fused op again."""
    for attn_drop, fused_in_training in ((0.0, 4), (0.3, 2)):
        model = randomize_(JiTStyle(attn_drop=attn_drop, proj_drop=0.5)).double().train()
        x, t, y = inputs(CASES["JiT"], torch.float64)
        torch.manual_seed(1)
        want = outputs_and_grads(model, x, t, y)
        patched = patch_jit(copy.deepcopy(model))
        torch.manual_seed(1)
        with OpCounter(monkeypatch) as counter:
            got = outputs_and_grads(patched, x, t, y)
        assert_same(got, want, FP64)
        assert counter.count("fwd", *QK_OPS) == fused_in_training
        patched.eval()
        with OpCounter(monkeypatch) as counter, torch.no_grad():
            patched(x, t, y)
        assert counter.count("fwd", *QK_OPS) == 4


class CompiledLightningBlock(LightningBlock):
    """LightningDiT decorates its blocks' forward with @torch.compile (here the eager backend: no Inductor build)."""

    forward = torch.compile(LightningBlock.forward, backend="eager")


def test_blocks_whose_forward_is_torch_compiled_as_in_lightningdit():
    """The patch reads the call convention through the compile wrapper and replaces the compiled forward."""
    model = randomize_(LightningDiTStyle(use_qknorm=True)).double()
    for block in model.blocks:
        block.__class__ = CompiledLightningBlock
    x, t, y = inputs(CASES["LightningDiT"], torch.float64)
    want = outputs_and_grads(model, x, t, y)
    patched = patch_jit(copy.deepcopy(model))
    assert patch_report(patched).attentions_fused_qk == 2
    assert_same(outputs_and_grads(patched, x, t, y), want, FP64)


@pytest.mark.parametrize("name, build, graphs", [
    ("LightningDiT qk-norm", lambda: LightningDiTStyle(use_qknorm=True, depth=6), 3),  # first, middle, last
    ("JiT", lambda: JiTStyle(depth=6), 4),  # and the block the class tokens join (more tokens)
])
def test_per_block_compile_of_a_patched_model_with_a_rotary_module(name, build, graphs):
    """`block.compile()` after patching (LightningDiT compiles its blocks): the rope module is read inside the
    compiled region, the blocks share their graphs whatever the depth (dynamo fails instead of falling back at the
    recompile limit), and the model computes what the unpatched one does."""
    model = randomize_(build())
    x, t, y = inputs(CASES[name])
    want = outputs_and_grads(model, x, t, y)
    patched = patch_jit(copy.deepcopy(model))
    compiled = []

    def count_graphs(gm, example_inputs):
        compiled.append(gm)
        return gm.forward

    for block in patched.blocks:
        block.compile(backend=count_graphs)
    torch._dynamo.reset()  # the graphs other tests compiled for the same forwards count toward the limit
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for _ in range(2):
            got = outputs_and_grads(patched, x, t, y)
    assert_same(got, want, FP32_INTERPRETER)
    assert len(compiled) == graphs


# ---------------------------------------------------------------------------------------------------------------
# Rotary modules: the layout of the test modules, and the op against each module's own output
# ---------------------------------------------------------------------------------------------------------------


def eva_angles(head_dim, grid, prefix=0, theta=10000.0):
    """EVA-02's 2D RoPE written out per channel: token (r, c) after `prefix` identity rows, channel pair j rotated by
    r·θ_j for j < Dh/4, c·θ_(j − Dh/4) after, θ_i = theta^(−i / (Dh/4)); both channels of a pair alike. (T, Dh)."""
    quarter = head_dim // 4
    angles = torch.zeros(prefix + grid * grid, head_dim, dtype=torch.float64)
    for r in range(grid):
        for c in range(grid):
            for channel in range(head_dim):
                j = channel // 2
                position, i = (r, j) if j < quarter else (c, j - quarter)
                angles[prefix + r * grid + c, channel] = position * theta ** (-i / quarter)
    return angles


@pytest.mark.parametrize("prefix", [0, 3])
def test_rotary_module_has_the_eva_frequency_layout(prefix):
    rope = GridRotaryEmbedding(dim=8, pt_seq_len=4, num_cls_token=prefix)  # Dh = 16
    angles = eva_angles(16, 4, prefix)
    torch.testing.assert_close(rope.freqs_cos.double(), angles.cos(), atol=1e-6, rtol=0)
    torch.testing.assert_close(rope.freqs_sin.double(), angles.sin(), atol=1e-6, rtol=0)
    q = torch.randn(2, 3, prefix + 16, 16, dtype=torch.float64)
    a, b = q[..., 0::2], q[..., 1::2]
    cos, sin = angles[:, 0::2].cos(), angles[:, 0::2].sin()
    rotated = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    torch.testing.assert_close(rope(q), rotated, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("prefix", [0, 2])
def test_op_with_tables_read_from_a_rotary_module_equals_the_module(backend, prefix):
    """q, k from `qk_norm_rope` with the tables read from the module = the module applied to the RMS-normed q, k
    (JiT's order: qk-norm, then rope), q/k weights included; v passes through."""
    B, H, Dh, grid = 2, 2, 16, 4
    T = prefix + grid * grid
    rope = GridRotaryEmbedding(Dh // 2, grid, prefix, as_buffers=False)
    qkv = torch.randn(B, T, 3, H, Dh)
    q_norm, k_norm = JiTRMSNorm(Dh), JiTRMSNorm(Dh)
    with torch.no_grad():
        q_norm.weight.normal_(1.0, 0.1)
        k_norm.weight.normal_(1.0, 0.1)
    cos, sin = rotary_tables(rope)
    assert cos.shape == sin.shape == (T, Dh // 2)
    with force_backend(backend):
        q, k, v = qk_norm_rope(qkv, q_norm.weight, k_norm.weight, cos, sin, 1e-6)
    heads_first = qkv.permute(2, 0, 3, 1, 4)  # (3, B, H, T, Dh), as the models lay q/k out for their rope
    torch.testing.assert_close(q, rope(q_norm(heads_first[0])), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(k, rope(k_norm(heads_first[1])), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(v, heads_first[2], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Refusals at patch time: a named module, what did not fit, the model untouched
# ---------------------------------------------------------------------------------------------------------------


class HalfSplitRotary(nn.Module):
    """Rotate-half over the two halves of Dh (GPT-NeoX style): pairs (j, j + Dh/2), not (2j, 2j + 1)."""

    def __init__(self, rope):
        super().__init__()
        self.freqs_cos, self.freqs_sin = rope.freqs_cos, rope.freqs_sin

    def forward(self, t):
        a, b = t.chunk(2, dim=-1)
        return t * self.freqs_cos + torch.cat((-b, a), dim=-1) * self.freqs_sin


def unequal_pair_angles(model):
    rope = model.feat_rope
    rope.freqs_cos = rope.freqs_cos.clone()
    rope.freqs_cos[:, 1::2] = 0.5


def half_split(model):
    model.feat_rope = HalfSplitRotary(model.feat_rope)


def five_way_adaln(model):
    model.blocks[1].adaLN_modulation[-1] = nn.Linear(64, 5 * 64)


class MaskedBlock(LightningBlock):
    def forward(self, x, c, rope, mask, scale):  # a convention the patch cannot tell
        return super().forward(x, c, rope)


def three_extra_arguments(model):
    model.blocks[0].__class__ = MaskedBlock


class NoRopeAttention(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.inner = attn
        self.qkv, self.proj, self.num_heads = attn.qkv, attn.proj, attn.num_heads

    def forward(self, x):
        return self.inner(x)


def attention_without_rope(model):
    model.blocks[1].attn = NoRopeAttention(model.blocks[1].attn)


def final_layer_with_extra(model):
    final = model.final_layer
    final.forward = lambda x, c, rope=None: type(final).forward(final, x, c)


REFUSALS = {
    "half-split rope": (LightningDiTStyle, dict(use_qknorm=True), patch_jit, half_split,
                        r"`model.feat_rope` \(HalfSplitRotary\) cannot be read .* rotate-half"),
    "pair angles differ": (LightningDiTStyle, dict(use_qknorm=True), patch_jit, unequal_pair_angles,
                           r"`model.feat_rope` .* two channels of a pair .* different angles"),
    "rope narrower than heads": (LightningDiTStyle, dict(use_qknorm=True), patch_jit,
                                 lambda m: setattr(m, "feat_rope", GridRotaryEmbedding(4, 4)),
                                 r"`model.feat_rope` .* rotates 8 channels but .* Dh = 16"),
    "5-way adaLN": (LightningDiTStyle, dict(use_rmsnorm=False), patch_dit, five_way_adaln,
                    r"`model.blocks.1.adaLN_modulation` gives 320 outputs for D = 64; patch_dit takes 6·D .* or 4·D"),
    "block arguments": (LightningDiTStyle, dict(), patch_jit, three_extra_arguments,
                        r"`model.blocks.0.forward` takes \['rope', 'mask', 'scale'\] after its inputs"),
    "attention takes no rope": (LightningDiTStyle, dict(use_rmsnorm=False), patch_dit, attention_without_rope,
                                r"`model.blocks.1.forward` takes `feat_rope` after \(x, c\) but "
                                r"`model.blocks.1.attn.forward` takes nothing after x"),
    "final layer arguments": (JiTStyle, dict(), patch_jit, final_layer_with_extra,
                              r"`model.final_layer.forward` takes an argument after \(x, c\)"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_unsupported_structures_are_refused_at_patch_time_and_the_model_is_untouched(name):
    cls, kwargs, patch, alter, message = REFUSALS[name]
    model = randomize_(cls(**kwargs))
    alter(model)
    x, t, y = inputs(CASES["JiT" if cls is JiTStyle else "DiT"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    instance_forwards = {m: m.__dict__.get("forward") for m in model.modules()}
    with torch.no_grad():
        try:
            before = model(x, t, y)
        except Exception:  # some of these models do not even run as they are
            before = None
    with pytest.raises(ValueError, match=message):
        patch(model)
    assert not is_dit_patched(model) and patch_report(model) is None
    assert {m: m.__dict__.get("forward") for m in model.modules()} == instance_forwards
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    if before is not None:
        with torch.no_grad():
            torch.testing.assert_close(model(x, t, y), before, atol=0, rtol=0)


def test_a_rope_the_patch_does_not_know_runs_the_models_own_attention():
    """A rope created after patching (not checked then) is not read: that attention warns once and runs the
    model's own forward, with the model's numbers."""
    model = randomize_(LightningDiTStyle(use_qknorm=True)).double()
    x, t, y = inputs(CASES["LightningDiT"], torch.float64)
    with torch.no_grad():
        want = model(x, t, y)
        patched = patch_jit(copy.deepcopy(model))
        patched.feat_rope = GridRotaryEmbedding(8, 4).double()  # a new module: the same tables, unchecked
        with pytest.warns(UserWarning, match="rope of type GridRotaryEmbedding that the patch does not read"):
            got = patched(x, t, y)
    torch.testing.assert_close(got, want, **FP64)


def test_patch_report_counts_and_names_what_runs():
    report = patch_jit(randomize_(JiTStyle()))
    text = str(patch_report(report))
    assert "patch_jit: 4 blocks" in text and "attention: 4/4 fused qk-norm (+ RoPE)" in text
    assert "norm + modulate: 9/9 sites fused" in text
    assert "rope: model.feat_rope, model.feat_rope_incontext" in text
    released = patch_report(patch_jit(randomize_(LightningDiTStyle())))
    assert released.attentions_fused_qk == 0 and "no RMSNorm/LayerNorm q_norm and k_norm" in str(released)


# ---------------------------------------------------------------------------------------------------------------
# The table of docs/drop_in.md
# ---------------------------------------------------------------------------------------------------------------


def _table():
    """One row per case: fused counts, op calls per training step, float64 and float32-interpreter differences."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (the float32 column uses the Triton interpreter)")

    class _Patch:  # monkeypatch for OpCounter outside pytest
        def setattr(self, obj, name, value):
            setattr(obj, name, value)

    original = patch_forwards.dispatch_attention
    print("| case | attentions: fused qk-norm (+RoPE) / dispatched / total | adaLN norm sites fused | "
          "fused op calls per step (fwd + bwd) | float64 torch: outputs, grads, max abs (rel) | "
          "float32 Triton interpreter: outputs, grads, max abs (rel) |")
    print("|---|---|---|---|---|---|")
    for name, case in CASES.items():
        model = case.model().double()
        x, t, y = inputs(case, torch.float64)
        want = outputs_and_grads(model, x, t, y)
        patched = case.patch(copy.deepcopy(model))
        with force_backend("torch"), OpCounter(_Patch()) as counter:
            got = outputs_and_grads(patched, x, t, y)
        patch_forwards.dispatch_attention = original
        fp64 = max_differences(got, want)
        model32 = case.model()
        x, t, y = inputs(case)
        want = outputs_and_grads(model32, x, t, y)
        with force_backend("triton"):
            fp32 = max_differences(outputs_and_grads(case.patch(copy.deepcopy(model32)), x, t, y), want)
        report = patch_report(patched)
        ops = sum(n for op, n in counter.counts.items() if op != "attention_dispatch")
        print(f"| {name} | {report.attentions_fused_qk} / {report.attentions_dispatched} / {report.blocks} | "
              f"{report.norm_sites_fused}/{report.norm_sites} | {ops} (+ {counter.counts['attention_dispatch']} "
              f"dispatched attentions) | {_pair(fp64)} | {_pair(fp32)} |")


def _pair(figures):
    (out_abs, out_rel), (grad_abs, grad_rel) = figures
    return f"{out_abs:.0e} ({out_rel:.0e}), {grad_abs:.0e} ({grad_rel:.0e})"


if __name__ == "__main__":
    _table()
