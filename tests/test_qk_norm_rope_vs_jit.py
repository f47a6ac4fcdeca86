"""qk-norm + RoPE (coredi_kernels) against coredi_fast's JiT, whose attention prologue it replaces: the float64
oracle of test_kernel_qk_norm_rope.py equals JiT's q_norm/k_norm RMSNorm and `apply_rope` with `rope_2d_tables`, and
in bf16 the op stays within 2x of an eager JiT's own error (GPU: JiT-B and JiT-H head sizes).

Kept apart from test_kernel_qk_norm_rope.py, which imports nothing from coredi_fast so that it also runs where only
coredi-kernels is installed.
"""
import pytest
import torch

from coredi_fast.models.jit import RMSNorm
from coredi_fast.models.rope import apply_rope, rope_2d_tables
from coredi_kernels import force_backend
from coredi_kernels.qk_norm_rope import reference
from test_kernel_qk_norm_rope import (EPS, GPU_SHAPES, GRID, PREFIX, assert_close, cotangents_for, float64, grads,
                                      make_inputs, run, run_oracle)


# ---------------------------------------------------------------------------------------------------------------
# The oracle is JiT's math
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim", [8, 20])
def test_oracle_is_jit_eager_math_and_reference(head_dim):
    """The oracle equals coredi_fast's JiT prologue (q_norm/k_norm RMSNorm, then apply_rope with rope_2d_tables) in
    float64, and reference.qk_norm_rope_ref; the written-out tables equal rope_2d_tables."""
    inputs = float64(make_inputs(head_dim))
    cos, sin = rope_2d_tables(head_dim, GRID, PREFIX, dtype=torch.float64)
    torch.testing.assert_close(inputs["cos"], cos, atol=1e-7, rtol=0)
    torch.testing.assert_close(inputs["sin"], sin, atol=1e-7, rtol=0)
    inputs["cos"], inputs["sin"] = cos, sin
    q_norm, k_norm = RMSNorm(head_dim).double(), RMSNorm(head_dim).double()
    with torch.no_grad():
        q_norm.weight.copy_(inputs["q_weight"])
        k_norm.weight.copy_(inputs["k_weight"])
    q, k, v = inputs["qkv"].unbind(2)
    # coredi_fast's RMSNorm computes in float32 whatever the input: compare its math on float64 by hand instead.
    jit_q = apply_rope(q * torch.rsqrt(q.square().mean(-1, keepdim=True) + q_norm.eps) * q_norm.weight, cos, sin)
    jit_k = apply_rope(k * torch.rsqrt(k.square().mean(-1, keepdim=True) + k_norm.eps) * k_norm.weight, cos, sin)
    want = run_oracle(inputs)
    for got, expected in zip((jit_q.transpose(1, 2), jit_k.transpose(1, 2), v.transpose(1, 2)), want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for got, expected in zip(reference.qk_norm_rope_ref(*inputs.values(), EPS), want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # ... and in float32, coredi_fast's modules themselves agree with the oracle.
    inputs32 = make_inputs(head_dim)
    q32, k32, _ = inputs32["qkv"].unbind(2)
    cos32, sin32 = rope_2d_tables(head_dim, GRID, PREFIX)
    with torch.no_grad():
        q_norm.float().weight.copy_(inputs32["q_weight"])
        jit_q32 = apply_rope(q_norm(q32), cos32, sin32).transpose(1, 2)
    assert_close(jit_q32, run_oracle(inputs32)[0], torch.float32, "JiT float32")


# ---------------------------------------------------------------------------------------------------------------
# bf16: ours vs fp32 within 2x of PyTorch's own bf16 error (tiny on the interpreter, JiT head sizes on a GPU)
# ---------------------------------------------------------------------------------------------------------------


def jit_eager(inputs):
    """What an eager JiT computes in the inputs' dtype: RMSNorm in fp32 cast back (coredi_fast's RMSNorm), then
    apply_rope in fp32 cast back; transposed views for attention."""
    qkv = inputs["qkv"]
    q, k, v = qkv.unbind(2)
    outputs = []
    for x, weight in ((q, inputs["q_weight"]), (k, inputs["k_weight"])):
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + EPS) * weight.float()).to(x.dtype)
        outputs.append(apply_rope(normed, inputs["cos"], inputs["sin"]).transpose(1, 2))
    return outputs[0], outputs[1], v.transpose(1, 2)


def check_bf16_error_budget(batch, tokens, heads, head_dim, device):
    inputs = make_inputs(head_dim, torch.bfloat16, tokens=tokens, heads=heads, batch=batch, device=device)
    fp32 = {k: v.float() if v is not None else None for k, v in inputs.items()}
    cots = cotangents_for(inputs)
    ref_out, torch_out, ours_out = jit_eager(fp32), jit_eager(inputs), run(inputs)
    ref_grads = grads(jit_eager, fp32, [c.float() for c in cots])
    torch_grads, ours_grads = grads(jit_eager, inputs, cots), grads(run, inputs, cots)

    def check(name, ours, theirs, ref):
        ours_err = (ours.float() - ref).abs().max().item()
        torch_err = (theirs.float() - ref).abs().max().item()
        atol = 1e-2 * max(1.0, ref.abs().max().item())
        assert ours_err <= 2 * torch_err + atol, f"{name}: ours {ours_err:.3g} vs torch {torch_err:.3g} (+{atol:.3g})"

    for name, ours, theirs, ref in zip("qkv", ours_out, torch_out, ref_out, strict=True):
        check(name, ours, theirs, ref)
    for name in ref_grads:
        check(f"d{name}", ours_grads[name], torch_grads[name], ref_grads[name])


def test_bf16_error_budget_interpreter():
    with force_backend("triton"):
        check_bf16_error_budget(2, PREFIX + 9, 2, 20, "cpu")


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_bf16_error_budget(shape):
    check_bf16_error_budget(*shape, "cuda")
