"""coredi_kernels LayerNorm + adaLN modulate (+ gated residual): values and every gradient against float64 math.

The tests shared with RMSNorm (both backends, tiles across samples, layouts, registration, bf16 error budget, GPU)
live in norm_modulate_suite.py and run here for LayerNorm (`TestLayerNormModulate`). This file adds the float64
oracle's own check against `F.layer_norm` and the backend-selection rules every coredi_kernels op follows.
"""
import pytest
import torch
import torch.nn.functional as F

from coredi_kernels import GatedResidualLayerNormModulate, LayerNormModulate, force_backend
from coredi_kernels import backend as backend_mod
from norm_modulate_suite import EPS, NormCase, NormModulateTests, float64, make_inputs

# SiT-XL's width; 256 tokens (a 256x256 image, patch 2); fp32 gradients within 1e-4 on the GPU. An unfused DiT block
# normalizes with nn.LayerNorm without affine, in the input dtype.
LAYERNORM = NormCase("layernorm", LayerNormModulate, GatedResidualLayerNormModulate, width=1152, tokens=256,
                     narrow_width=640, gpu_grad_atol=1e-4,
                     unfused_norm=lambda h, inputs: F.layer_norm(h, h.shape[-1:], eps=EPS))
reference = LAYERNORM.reference


class TestLayerNormModulate(NormModulateTests):
    norm = LAYERNORM


def test_reference_matches_f_layer_norm():
    inputs = float64(make_inputs(LAYERNORM, "gated", 3, 5, 48, torch.float64))
    x, y, gate, shift, scale = (inputs[k] for k in ("x", "y", "gate", "shift", "scale"))
    expected = F.layer_norm(x, (48,), eps=EPS) * (1 + scale[:, None, :]) + shift[:, None, :]
    torch.testing.assert_close(reference.layernorm_modulate_ref(x, shift, scale, EPS), expected, rtol=1e-12, atol=1e-12)

    h_expected = x + gate[:, None, :] * y
    h, out = reference.gated_residual_layernorm_modulate_ref(x, y, gate, shift, scale, EPS)
    torch.testing.assert_close(h, h_expected, rtol=0, atol=0)
    expected = F.layer_norm(h_expected, (48,), eps=EPS) * (1 + scale[:, None, :]) + shift[:, None, :]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_backend_selection_rules(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(backend_mod.ENV_VAR, raising=False)
    assert backend_mod.requested_backend() == "auto"
    assert backend_mod.select_backend("op", cpu) == "torch"
    assert backend_mod.select_backend("op", torch.device("cuda")) in ("triton", "torch")
    monkeypatch.setenv(backend_mod.ENV_VAR, "triton")
    assert backend_mod.select_backend("op", cpu) == "triton"  # the interpreter is on in these tests
    with force_backend("torch"):
        assert backend_mod.select_backend("op", cpu) == "torch"
        with force_backend("auto"):
            assert backend_mod.requested_backend() == "auto"
        assert backend_mod.requested_backend() == "torch"
    with force_backend("triton"), pytest.raises(RuntimeError, match="myop.*bad dtype"):
        backend_mod.select_backend("myop", cpu, ["bad dtype"])
    monkeypatch.setattr(backend_mod, "is_interpreter", lambda: False)
    with force_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        backend_mod.select_backend("myop", cpu)
    monkeypatch.setenv(backend_mod.ENV_VAR, "cuda-please")
    with pytest.raises(ValueError, match="COREDI_KERNELS_BACKEND"):
        backend_mod.requested_backend()
    with pytest.raises(ValueError, match="force_backend"):
        with force_backend("fast"):
            pass
