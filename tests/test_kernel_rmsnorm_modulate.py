"""coredi_kernels RMSNorm + adaLN modulate (+ gated residual): values and every gradient against float64 math.

The tests shared with LayerNorm (both backends, tiles across samples, layouts, registration, bf16 error budget,
GPU) live in norm_modulate_suite.py and run here for RMSNorm, with and without its weight (`TestRMSNormModulate`).
This file adds what only RMSNorm has: the float64 oracle checked against an RMSNorm written out in the test (and
`F.rms_norm`), the weight the modules own and JiT's in-context tokens. `patch_jit` on coredi_fast's JiT is tested
in test_patch_jit.py: this file, like every test_kernel_*.py, imports nothing from coredi_fast.
"""
import pytest
import torch
import torch.nn.functional as F

from coredi_kernels.rmsnorm_modulate import (
    GatedResidualRMSNormModulate,
    RMSNormModulate,
    gated_residual_rmsnorm_modulate,
    rmsnorm_modulate,
)
from norm_modulate_suite import EPS, NormCase, NormModulateTests, assert_close, float64, grads, make_inputs


def jit_rmsnorm(h, inputs):
    """What an unfused JiT block's RMSNorm computes: fp32 statistics and weight product, back to the input dtype."""
    hf = h.float()
    return (hf * torch.rsqrt(hf.square().mean(-1, keepdim=True) + EPS) * inputs["weight"].float()).to(h.dtype)


# JiT-H's width; 256 patches + 32 in-context class tokens per sample; fp32 gradients within 1e-3 on the GPU.
RMSNORM = NormCase("rmsnorm", RMSNormModulate, GatedResidualRMSNormModulate, width=1280, tokens=256 + 32,
                   narrow_width=768, gpu_grad_atol=1e-3, unfused_norm=jit_rmsnorm)
reference = RMSNORM.reference


class TestRMSNormModulate(NormModulateTests):
    norm = RMSNORM

    def test_in_context_tokens_share_their_sample_modulation(self, backend):
        """JiT prepends L class tokens to the T patch tokens: the op sees T + L rows per sample, all modulated by
        the sample's row. Normalizing the two parts separately gives the same rows (RMSNorm is per token)."""
        B, L, T, D = 3, 4, 9, 40
        inputs = self.inputs("plain", B, L + T, D, param_spread=5.0)
        whole = self.run("plain", inputs)[0]
        parts = [self.run("plain", dict(inputs, x=inputs["x"][:, sl]))[0] for sl in (slice(0, L), slice(L, None))]
        torch.testing.assert_close(whole, torch.cat(parts, dim=1), rtol=1e-6, atol=1e-6)
        assert_close(whole, self.reference("plain", float64(inputs))[0], torch.float32, "out")


def test_reference_matches_rmsnorm_written_out():
    """out[b, t, i] = x[b, t, i] / sqrt(Σ_j x[b, t, j]² / D + eps) · w[i] · (1 + scale[b, i]) + shift[b, i]."""
    inputs = float64(make_inputs(RMSNORM, "gated", 3, 5, 48, torch.float64))
    x, y, gate, shift, scale, w = (inputs[k] for k in ("x", "y", "gate", "shift", "scale", "weight"))
    expected = torch.empty_like(x)
    for b in range(3):
        for t in range(5):
            rms = (sum(v * v for v in x[b, t].tolist()) / 48 + EPS) ** 0.5
            expected[b, t] = x[b, t] / rms * w * (1 + scale[b]) + shift[b]
    torch.testing.assert_close(reference.rmsnorm_modulate_ref(x, shift, scale, w, EPS), expected, rtol=1e-12,
                               atol=1e-12)
    rms_norm = F.rms_norm(x, (48,), w, eps=EPS) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(rms_norm, expected, rtol=1e-12, atol=1e-12)

    h_expected = x + gate[:, None, :] * y
    h, out = reference.gated_residual_rmsnorm_modulate_ref(x, y, gate, shift, scale, None, EPS)
    torch.testing.assert_close(h, h_expected, rtol=0, atol=0)
    expected = F.rms_norm(h_expected, (48,), eps=EPS) * (1 + scale[:, None, :]) + shift[:, None, :]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_modules_own_the_weight():
    """The modules' weight starts at ones (none with elementwise_affine=False) and gets the reference's gradient."""
    inputs = make_inputs(RMSNORM, "plain", 2, 5, 40, torch.float32)
    x, shift, scale, w = (inputs[k] for k in ("x", "shift", "scale", "weight"))
    plain, gated = RMSNormModulate(40, eps=1e-5), GatedResidualRMSNormModulate(40)
    assert torch.equal(plain.weight, torch.ones(40)) and torch.equal(gated.weight, torch.ones(40))
    assert RMSNormModulate(40, elementwise_affine=False).weight is None
    with torch.no_grad():
        plain.weight.copy_(w)
    plain(x, shift, scale).sum().backward()
    want = grads(lambda o, i: (reference.rmsnorm_modulate_ref(i["x"], i["shift"], i["scale"], i["weight"], 1e-5),),
                 "plain", float64(inputs), [torch.ones(2, 5, 40).double()])
    assert_close(plain.weight.grad, want["weight"], torch.float32, "dweight")


def test_bad_weights_raise_errors_naming_the_argument():
    x, y = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    p, w = torch.randn(2, 8), torch.randn(8)
    cases = [
        (lambda: rmsnorm_modulate(x, p, p, torch.randn(4)), ValueError, "weight must have shape"),
        (lambda: rmsnorm_modulate(x, p, p, w.long()), TypeError, "weight must be a floating-point"),
        (lambda: gated_residual_rmsnorm_modulate(x, y, p, p, p, w[:3]), ValueError, "weight must have shape"),
        (lambda: RMSNormModulate(8, elementwise_affine=1), TypeError, "elementwise_affine"),
    ]
    for fn, error, message in cases:
        with pytest.raises(error, match=message):
            fn()
