"""coredi_kernels.patch_dit: a patched SiT/DiT gives the unpatched model's outputs and every gradient, runs the
fused ops the expected number of times, and unpatches cleanly.

Models: coredi_fast's SiT (`create_model`) and the public SiT structure built on timm's Attention/Mlp
(`RefSiT` of tests/test_sit_compat.py), with REPA projections and with torch.utils.checkpoint in its forward.
Weights are randomized (adaLN-Zero would otherwise zero every gate and hide mistakes).
"""
import copy
from collections import Counter

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from coredi_fast.models import create_model
from coredi_kernels import force_backend
from coredi_kernels.layernorm_modulate import _kernels
from coredi_kernels.patch import is_dit_patched, patch_dit, unpatch_dit
from test_sit_compat import RefSiT, randomize_

ATOL = dict(atol=2e-5, rtol=2e-5)
DEPTH = 2


def our_sit(learn_sigma=False, **overrides):
    model = create_model("SiT-Micro/2", input_size=8, num_classes=10, learn_sigma=learn_sigma, num_heads=4,
                         **overrides)
    return randomize_(model)


def public_sit(learn_sigma=False, **kwargs):
    return randomize_(RefSiT(8, 2, 4, 64, DEPTH, 4, 10, learn_sigma=learn_sigma, **kwargs))


def inputs(batch=3):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    return x, torch.rand(batch, generator=g), torch.randint(0, 10, (batch,), generator=g)


def run_ours(model, x, t, y):
    """Prediction and sigma channels of our SiT, with labels kept (force_drop_ids = 0)."""
    out = model(x, t, y, force_drop_ids=torch.zeros_like(y), return_sigma=model.learn_sigma)
    return list(out) if isinstance(out, tuple) else [out]


def run_public(model, x, t, y):
    out, zs = model(x, t, y)
    return [out, *zs]


def outputs_and_grads(model, run, x, t, y):
    """Outputs, and the gradients of a fixed weighted sum of them w.r.t. the input and every parameter."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    outs = run(model, x, t, y)
    weights = [torch.linspace(-1, 2, o.numel()).reshape(o.shape) for o in outs]
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    loss.backward()
    grads = {"input": x.grad}
    grads.update({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    return [o.detach() for o in outs], grads


def assert_same(got, want, tol=ATOL):
    (outs, grads), (ref_outs, ref_grads) = got, want
    assert len(outs) == len(ref_outs)
    for o, r in zip(outs, ref_outs):
        torch.testing.assert_close(o, r, **tol)
        assert r.abs().mean() > 1e-3  # a real output was compared
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        assert ref is not None and ref.abs().max() > 0, name
        torch.testing.assert_close(grads[name], ref, **tol, msg=name)


class OpCounter(TorchDispatchMode):
    """Counts coredi ops and adds whose result has the residual stream's shape (B, T, D)."""

    def __init__(self, stream_shape):
        super().__init__()
        self.stream_shape, self.counts = tuple(stream_shape), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.namespace == "coredi":
            self.counts[name] += 1
        elif name in ("add", "add_") and isinstance(out, torch.Tensor) and tuple(out.shape) == self.stream_shape:
            self.counts["stream_add"] += 1
        return out


def count_ops(model, run, batch=3):
    x, t, y = inputs(batch)
    counter = OpCounter((batch, 16, 64))
    with torch.no_grad(), counter:
        run(model, x, t, y)
    return counter.counts


# ---------------------------------------------------------------------------------------------------------------
# Same outputs and gradients
# ---------------------------------------------------------------------------------------------------------------

OPTIONS = {
    "all": dict(),
    "no_fuse_residual": dict(fuse_residual=False),
    "attention_only": dict(layernorm_modulate=False, fuse_residual=False),
    "norms_only": dict(attention=False),
}


@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_our_sit_patched_equals_unpatched(options, learn_sigma):
    model = our_sit(learn_sigma)
    want = outputs_and_grads(model, run_ours, *inputs())
    patch_dit(model, **OPTIONS[options])
    assert_same(outputs_and_grads(model, run_ours, *inputs()), want)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_public_timm_sit_with_repa_projection_patched_equals_unpatched(learn_sigma):
    """REPA reads the tokens after block 1 between two blocks: the hand-over must survive that."""
    model = public_sit(learn_sigma, z_dims=(24,), projector_dim=32, encoder_depth=1)
    want = outputs_and_grads(model, run_public, *inputs())
    patch_dit(model)
    assert_same(outputs_and_grads(model, run_public, *inputs()), want)
    assert count_ops(model, run_public)["gated_residual_layernorm_modulate_fwd"] == 2 * DEPTH


def test_our_sit_with_grad_checkpointing():
    model = our_sit(grad_checkpointing=True)
    want = outputs_and_grads(model, run_ours, *inputs())
    patch_dit(model)
    assert_same(outputs_and_grads(model, run_ours, *inputs()), want)
    counter = OpCounter((3, 16, 64))
    x, t, y = inputs()
    with counter:  # grad on: blocks are checkpointed, no hand-over across block boundaries
        run_ours(model, x, t, y)
    assert counter.counts["layernorm_modulate_fwd"] == DEPTH + 1
    assert counter.counts["gated_residual_layernorm_modulate_fwd"] == DEPTH
    assert counter.counts["stream_add"] == 1 + DEPTH  # position embedding + one residual add per block


class CheckpointedRefSiT(RefSiT):
    """Public-style SiT whose forward wraps every block in torch.utils.checkpoint."""

    use_reentrant = False

    def forward(self, x, t, y):
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            h = checkpoint(block, h, c, use_reentrant=self.use_reentrant)
        out = self.final_layer(h, c)
        B, p, g = x.shape[0], self.patch, x.shape[-1] // self.patch
        out = out.view(B, g, g, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(B, self.out_channels, g * p, g * p), []


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_public_sit_checkpointing_inside_its_forward(use_reentrant):
    model = randomize_(CheckpointedRefSiT(8, 2, 4, 64, DEPTH, 4, 10, learn_sigma=False))
    model.use_reentrant = use_reentrant
    want = outputs_and_grads(model, run_public, *inputs())
    patch_dit(model)
    assert_same(outputs_and_grads(model, run_public, *inputs()), want)


def test_triton_kernels_under_the_interpreter_on_a_micro_model(monkeypatch):
    """The Triton LayerNorm kernels forced (TRITON_INTERPRET=1 on CPU), depth 2, width 32, 16 tokens."""
    launches = Counter()
    for name in ("layernorm_modulate_fwd", "layernorm_modulate_bwd", "gated_residual_layernorm_modulate_fwd",
                 "gated_residual_layernorm_modulate_bwd"):
        launcher = getattr(_kernels, name)
        monkeypatch.setattr(_kernels, name, lambda *a, _f=launcher, _n=name, **k: launches.update([_n]) or _f(*a, **k))
    model = randomize_(create_model("SiT-Micro/1", input_size=4, num_classes=10, hidden_size=32, num_heads=2))
    want = outputs_and_grads(model, run_ours, *inputs_micro())
    assert not launches  # the unpatched model runs no kernel
    patch_dit(model)
    with force_backend("triton"):
        got = outputs_and_grads(model, run_ours, *inputs_micro())
    assert_same(got, want, tol=dict(atol=5e-5, rtol=5e-5))
    assert launches == Counter({"layernorm_modulate_fwd": 1, "layernorm_modulate_bwd": 1,
                                "gated_residual_layernorm_modulate_fwd": 4, "gated_residual_layernorm_modulate_bwd": 4})


def inputs_micro(batch=2):
    g = torch.Generator().manual_seed(3)
    return torch.randn(batch, 4, 4, 4, generator=g), torch.rand(batch, generator=g), torch.tensor([1, 7])


def test_torch_compile_of_the_patched_model():
    model = our_sit()
    want = outputs_and_grads(model, run_ours, *inputs())
    patch_dit(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    outs, grads = outputs_and_grads(compiled, run_ours, *inputs())
    grads = {name.removeprefix("_orig_mod."): g for name, g in grads.items()}
    assert_same((outs, grads), want)


def test_a_block_called_on_another_tensor_ignores_the_hand_over():
    """A loop that changes x between blocks (here: a copy) must not receive the previous block's normed x."""
    model = public_sit()
    x, t, y = inputs()

    def custom_loop(m):
        h = m.x_embedder(x) + m.pos_embed
        c = m.t_embedder(t) + m.y_embedder.embedding_table(y)
        for block in m.blocks:
            h = block(h.clone() * 1.5, c)
        return m.final_layer(h + 0.25, c)

    with torch.no_grad():
        want = custom_loop(model)
        patch_dit(model)
        counter = OpCounter((3, 16, 64))
        with counter:
            got = custom_loop(model)
    torch.testing.assert_close(got, want, **ATOL)
    assert counter.counts["layernorm_modulate_fwd"] == DEPTH + 1  # every consumer normalized its own input


# ---------------------------------------------------------------------------------------------------------------
# How many fused passes run
# ---------------------------------------------------------------------------------------------------------------


def test_fused_op_counts():
    model = our_sit()
    unpatched = count_ops(model, run_ours)
    assert unpatched["stream_add"] == 1 + 2 * DEPTH + (2 * DEPTH + 1)  # pos embed, residuals, modulate shifts
    patch_dit(model)
    fused = count_ops(model, run_ours)
    assert fused["layernorm_modulate_fwd"] + fused["gated_residual_layernorm_modulate_fwd"] == 2 * DEPTH + 1
    assert fused["layernorm_modulate_fwd"] == 1  # only block 0's norm1 has no residual add before it
    assert fused["stream_add"] == 1  # the position embedding; no separate residual add is left
    patch_dit(model, fuse_residual=False)
    unfused = count_ops(model, run_ours)
    assert unfused["layernorm_modulate_fwd"] == 2 * DEPTH + 1 and unfused["gated_residual_layernorm_modulate_fwd"] == 0
    assert unfused["stream_add"] == 1 + 2 * DEPTH


# ---------------------------------------------------------------------------------------------------------------
# Unpatching, idempotence, copies
# ---------------------------------------------------------------------------------------------------------------


def test_unpatch_restores_the_original_forwards():
    model = public_sit()
    with torch.no_grad():
        before = run_public(model, *inputs())[0]
    patch_dit(model)
    assert is_dit_patched(model) and "forward" in model.blocks[0].__dict__
    unpatch_dit(model)
    assert not is_dit_patched(model)
    for module in model.modules():
        assert "forward" not in module.__dict__, type(module).__name__
    assert count_ops(model, run_public) == Counter({"stream_add": 1 + 2 * DEPTH + 2 * DEPTH + 1})
    with torch.no_grad():
        torch.testing.assert_close(run_public(model, *inputs())[0], before, atol=0, rtol=0)
    assert unpatch_dit(model) is model  # unpatching an unpatched model is a no-op


def test_patching_is_idempotent_and_options_can_change():
    model = our_sit()
    patch_dit(model)
    forward = model.blocks[0].forward
    assert patch_dit(model) is model and model.blocks[0].forward is forward
    patch_dit(model, attention=False)
    assert "forward" not in model.blocks[0].attn.__dict__
    assert count_ops(model, run_ours)["gated_residual_layernorm_modulate_fwd"] == 2 * DEPTH
    unpatch_dit(model)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_deepcopy_of_a_patched_model_is_patched_and_independent():
    model = our_sit()
    want = outputs_and_grads(model, run_ours, *inputs())
    patch_dit(model)
    run_ours(model, *inputs())  # leaves no hand-over behind to copy
    ema = copy.deepcopy(model)
    assert ema.blocks[0].forward.args[0] is ema.blocks[0]
    assert_same(outputs_and_grads(ema, run_ours, *inputs()), want)
    assert count_ops(ema, run_ours)["layernorm_modulate_fwd"] == 1
    assert set(ema.state_dict()) == set(our_sit().state_dict())  # nothing added to the state dict


# ---------------------------------------------------------------------------------------------------------------
# Bad models and arguments
# ---------------------------------------------------------------------------------------------------------------


def test_missing_or_unsuitable_attributes_are_named():
    model = our_sit()
    del model.blocks[1].norm1
    with pytest.raises(ValueError, match=r"no `model.blocks.1.norm1`"):
        patch_dit(model)
    assert not is_dit_patched(model) and all("forward" not in m.__dict__ for m in model.modules())

    model = our_sit()
    model.blocks[0].attn.qkv = None
    with pytest.raises(ValueError, match=r"no `model.blocks.0.attn.qkv`"):
        patch_dit(model)
    patch_dit(model, attention=False)  # the norms alone do not need qkv

    model = our_sit()
    del model.final_layer
    with pytest.raises(ValueError, match=r"no `model.final_layer`"):
        patch_dit(model)

    with pytest.raises(ValueError, match=r"no `model.blocks`"):
        patch_dit(nn.Linear(2, 2))

    model = our_sit()
    model.blocks[0].norm2 = nn.LayerNorm(64)  # affine, unlike DiT
    with pytest.raises(ValueError, match=r"`model.blocks.0.norm2` has affine parameters"):
        patch_dit(model)

    model = public_sit()
    model.blocks[1].attn.attn_drop = nn.Dropout(0.1)
    with pytest.raises(ValueError, match=r"`model.blocks.1.attn.attn_drop` has p > 0"):
        patch_dit(model)


def test_bad_options():
    with pytest.raises(ValueError, match="fuse_residual=True .* needs layernorm_modulate=True"):
        patch_dit(our_sit(), layernorm_modulate=False)
    with pytest.raises(TypeError, match="attention must be a bool"):
        patch_dit(our_sit(), attention=1)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        patch_dit("SiT-XL/2")


# ---------------------------------------------------------------------------------------------------------------
# GPU: bf16 autocast training step, patched vs unpatched
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_autocast_patched_close_to_unpatched():
    model = create_model("SiT-B/2", input_size=16, num_classes=10, depth=4)
    randomize_(model).cuda()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, 16, 16, generator=g).cuda()
    t, y = torch.rand(8, generator=g).cuda(), torch.randint(0, 10, (8,), generator=g).cuda()

    def step(m):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(x, t, y, force_drop_ids=torch.zeros_like(y))
        out.float().square().mean().backward()
        return out.float(), {n: p.grad.float().clone() for n, p in m.named_parameters() if p.grad is not None}

    ref_out, ref_grads = step(model)
    patch_dit(model)
    out, grads = step(model)
    assert (out - ref_out).abs().max() <= 0.05 * ref_out.abs().max()
    for name, ref in ref_grads.items():
        rel = (grads[name] - ref).norm() / ref.norm().clamp_min(1e-12)
        assert rel < 0.05, (name, rel.item())
