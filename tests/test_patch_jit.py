"""`patch_jit` (coredi_kernels' fused RMSNorm + modulate, gated residuals and qk-norm + RoPE swapped into a JiT)
on coredi_fast's JiT: the patched model gives the unpatched model's outputs and every gradient, runs the fused ops
it should (counted), falls back where fusing would change the result, and refuses models it cannot fuse.

The ops themselves are tested in test_kernel_rmsnorm_modulate.py and test_kernel_qk_norm_rope.py, which import
nothing from coredi_fast.
"""
import copy

import pytest
import torch

from coredi_fast.models import create_model
from coredi_kernels import force_backend
from coredi_kernels.patch import is_dit_patched, patch_dit, patch_jit, unpatch_dit


def randomize_(model, std=0.1):
    """Random weights everywhere but the fixed position table (adaLN-Zero would otherwise zero every gate and hide
    mistakes); RMSNorm weights near 1."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if "norm" in name else 0.0))
    return model


def tiny_jit(**overrides):
    kwargs = dict(input_size=8, in_channels=3, feature_channels=2, num_classes=10)
    return randomize_(create_model("JiT-Micro/2", **{**kwargs, **overrides}))


def jit_inputs(model, batch=3):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(batch, *model.input_shape, generator=g)
    return x, torch.rand(batch, generator=g), torch.randint(0, 10, (batch,), generator=g)


def outputs_and_grads(model, x, t, y):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = model(x, t, y, force_drop_ids=torch.zeros_like(y))
    (out * torch.linspace(-1, 2, out.numel()).reshape(out.shape)).sum().backward()
    grads = {"input": x.grad}
    grads.update({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    return out.detach(), grads


def assert_same(got, want, tol=None):
    tol = tol or {"atol": 2e-5, "rtol": 2e-5}
    (out, grads), (ref_out, ref_grads) = got, want
    torch.testing.assert_close(out, ref_out, **tol)
    assert ref_out.abs().mean() > 1e-2
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        assert ref is not None and ref.abs().max() > 0, name
        torch.testing.assert_close(grads[name], ref, **tol, msg=name)


class OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the coredi RMSNorm and qk-norm + RoPE ops that run."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if "rmsnorm_modulate" in name or "qk_norm_rope" in name:
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fuse_residual", [True, False], ids=["fuse-residual", "norms-only"])
@pytest.mark.parametrize("in_context_len", [2, 0], ids=["in-context", "no-in-context"])
def test_patched_jit_equals_unpatched(fuse_residual, in_context_len):
    model = tiny_jit(in_context_len=in_context_len)
    x, t, y = jit_inputs(model)
    want = outputs_and_grads(model, x, t, y)
    patched = patch_jit(copy.deepcopy(model), fuse_residual=fuse_residual)
    assert is_dit_patched(patched)
    with force_backend("torch"), OpCounter() as counter:
        got = outputs_and_grads(patched, x, t, y)
    assert_same(got, want)
    # Depth 2: five norm passes (norm1, norm2 per block, norm_final), each one op. With fuse_residual the residual
    # add inside each block is fused (2 gated ops), and across consumers (block 0 -> block 1 -> final layer) only
    # where the consumer sees the previous output as is: not with class tokens (inserted at block 1, cut before the
    # final layer).
    fused_fwd = counter.counts.get("coredi.gated_residual_rmsnorm_modulate_fwd", 0)
    plain_fwd = counter.counts.get("coredi.rmsnorm_modulate_fwd", 0)
    assert fused_fwd + plain_fwd == 5
    expected_fused = (2 + (2 if in_context_len == 0 else 0)) if fuse_residual else 0
    assert fused_fwd == expected_fused
    unpatch_dit(patched)
    assert_same(outputs_and_grads(patched, x, t, y), want, tol=dict(atol=0, rtol=0))


def test_patched_jit_with_grad_checkpointing_and_dropout_in_eval():
    model = tiny_jit(grad_checkpointing=True, proj_dropout=0.5)
    model.eval()  # dropout off; the label is kept through force_drop_ids
    x, t, y = jit_inputs(model)
    want = outputs_and_grads(model, x, t, y)
    got = outputs_and_grads(patch_jit(copy.deepcopy(model)), x, t, y)
    assert_same(got, want)


def test_patched_jit_triton_kernels_under_the_interpreter():
    model = tiny_jit()
    x, t, y = jit_inputs(model, batch=2)
    want = outputs_and_grads(model, x, t, y)
    with force_backend("triton"):
        got = outputs_and_grads(patch_jit(copy.deepcopy(model)), x, t, y)
    assert_same(got, want, tol=dict(atol=1e-4, rtol=1e-4))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_patched_jit_fuses_qk_norm_rope(backend):
    """fuse_qk_rope: each block's q_norm, k_norm and RoPE run as one qk_norm_rope op (the Triton kernels under the
    interpreter on CPU), with the unpatched model's outputs and every gradient (q_norm/k_norm weights included);
    patching again with fuse_qk_rope=False restores the model's attention, and unpatching everything."""
    model = tiny_jit()
    x, t, y = jit_inputs(model, batch=2)
    want = outputs_and_grads(model, x, t, y)
    patched = patch_jit(copy.deepcopy(model), fuse_residual=False)  # fuse_qk_rope=True is the default
    with force_backend(backend), OpCounter() as counter:
        got = outputs_and_grads(patched, x, t, y)
    assert counter.counts.get("coredi.qk_norm_rope_fwd") == len(model.blocks)
    assert counter.counts.get("coredi.qk_norm_rope_bwd") == len(model.blocks)
    assert_same(got, want, tol=dict(atol=1e-4, rtol=1e-4))
    assert all(want[1][f"blocks.{i}.attn.{n}_norm.weight"].abs().max() > 0 for i in range(2) for n in "qk")

    patch_jit(patched, fuse_residual=False, fuse_qk_rope=False)
    assert all("forward" not in block.attn.__dict__ for block in patched.blocks)
    with OpCounter() as counter:
        assert_same(outputs_and_grads(patched, x, t, y), want)
    assert "coredi.qk_norm_rope_fwd" not in counter.counts
    unpatch_dit(patched)
    assert_same(outputs_and_grads(patched, x, t, y), want, tol=dict(atol=0, rtol=0))


def test_fused_jit_attention_falls_back_where_fusing_would_differ():
    """The fused attention runs the model's own forward for attention dropout in training, q/k eps that differ and
    a rope that is not a (cos, sin) pair; attentions without RMSNorm q_norm/k_norm are not patched at all."""
    model = tiny_jit()
    x, t, y = jit_inputs(model, batch=2)
    patched = patch_jit(copy.deepcopy(model))
    attn = patched.blocks[0].attn
    tokens, rope = torch.randn(2, 16, 64), (patched.rope_cos, patched.rope_sin)
    want = type(attn).forward(attn, tokens, rope)

    def qk_ops(*args):
        with OpCounter() as counter:
            out = attn(*args)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        return counter.counts.get("coredi.qk_norm_rope_fwd", 0)

    assert qk_ops(tokens, rope) == 1
    attn.attn_drop = torch.nn.Dropout(0.5)  # the model's forward has no attention dropout: same values
    assert qk_ops(tokens, rope) == 0
    attn.eval()
    assert qk_ops(tokens, rope) == 1
    attn.k_norm.eps = 1e-5
    with OpCounter() as counter:
        attn(tokens, rope)
    assert "coredi.qk_norm_rope_fwd" not in counter.counts
    attn.k_norm.eps = attn.q_norm.eps

    class Tables:  # an iterable the model's forward unpacks, but not a (cos, sin) pair: not fused
        def __iter__(self):
            return iter(rope)

    assert qk_ops(tokens, Tables()) == 0 and qk_ops(tokens, rope) == 1

    plain = tiny_jit()
    plain.blocks[1].attn.k_norm = torch.nn.Identity()
    patch_jit(plain)
    assert "forward" in plain.blocks[0].attn.__dict__ and "forward" not in plain.blocks[1].attn.__dict__
    plain(x, t, y)


def test_patch_jit_refuses_models_it_cannot_fuse():
    sit = create_model("SiT-Micro/2", input_size=8, num_classes=10)
    with pytest.raises(ValueError, match=r"model.blocks.0.norm1.*RMSNorm"):
        patch_jit(sit)
    jit = tiny_jit()
    with pytest.raises(ValueError, match=r"model.blocks.0.norm1.*patch_jit"):
        patch_dit(jit)
    del jit.final_layer.norm_final
    with pytest.raises(ValueError, match="model.final_layer.norm_final"):
        patch_jit(jit)
    assert not is_dit_patched(jit)
    with pytest.raises(TypeError, match="fuse_residual"):
        patch_jit(tiny_jit(), fuse_residual="yes")
    with pytest.raises(TypeError, match="fuse_qk_rope"):
        patch_jit(tiny_jit(), fuse_qk_rope=1)


@pytest.mark.gpu
def test_gpu_patched_jit_under_autocast():
    model = tiny_jit(input_size=32, hidden_size=128, num_heads=4).cuda()
    x, t, y = (v.cuda() for v in jit_inputs(model, batch=4))
    patched = patch_jit(copy.deepcopy(model))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = model(x, t, y, force_drop_ids=torch.zeros_like(y)).float()
        got = patched(x, t, y, force_drop_ids=torch.zeros_like(y)).float()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
