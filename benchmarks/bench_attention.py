"""Attention backends of coredi_kernels.attention at DiT shapes: forward and forward+backward, TFLOP/s.

    pytest benchmarks/bench_attention.py --bench-profile=real     # B=256, H=16, T=256, Dh=72 bf16 (+ T=1024) on CUDA
    pytest benchmarks/bench_attention.py                          # tiny fp32 shapes on CPU

Providers: every backend in `BACKEND_NAMES` (skipped, with its reasons, where it cannot run) and `auto` (what the
dispatcher picks; the chosen name is recorded in `extra_info`). Modes: `fwd` (no grad) and `fwd+bwd` (forward,
then torch.autograd.grad of q, k, v).

FLOPs counted at the real head dim (FA2 pads 72 to 96 internally; that padding is not credited):
    fwd = 4·B·H·T²·Dh (two matmuls, 2 FLOPs per multiply-add); fwd+bwd = 3.5 × fwd (backward = 2.5 × forward).
Reference points (H100, perf_anchors.md section 2, T=256, B=256): cuDNN fwd+bwd 1.62 ms (167 TFLOP/s), flash
2.74 ms (99 TFLOP/s), memory-efficient 3.64 ms.
"""
import pytest
import torch

from coredi_kernels.attention import ATTENTION_BACKENDS, BACKEND_NAMES, attention, select_attention_backend

SHAPES = {
    "tiny": [((2, 2, 64, 72), torch.float32), ((1, 2, 129, 72), torch.float32)],
    "real": [((256, 16, 256, 72), torch.bfloat16), ((64, 16, 1024, 72), torch.bfloat16)],  # 256 px and 512 px
}
PROVIDERS = ("auto",) + BACKEND_NAMES
MODES = ("fwd", "fwd+bwd")


def attention_flops(shape, mode: str) -> float:
    B, H, T, D = shape
    forward = 4 * B * H * T * T * D
    return forward if mode == "fwd" else 3.5 * forward


@pytest.mark.parametrize("shape_index", [0, 1], ids=["short", "long"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_attention(measure, bench_profile, bench_device, provider, mode, shape_index):
    shape, dtype = SHAPES[bench_profile][shape_index]
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g).to(bench_device, dtype).requires_grad_(mode != "fwd") for _ in "qkv")
    backend = None if provider == "auto" else provider
    if backend is not None:
        reasons = ATTENTION_BACKENDS[backend].not_supported_reasons(q, k, v)
        if reasons:
            pytest.skip(f"{backend} cannot run here: {'; '.join(reasons)}")
    chosen = select_attention_backend(q, k, v, backend=backend)

    if mode == "fwd":

        def work():
            with torch.no_grad():
                return attention(q, k, v, backend=backend)

    else:
        cotangent = torch.randn_like(q)

        def work():
            return torch.autograd.grad(attention(q, k, v, backend=backend), (q, k, v), cotangent)

    measure(
        work,
        flops=attention_flops(shape, mode),
        op="attention",
        mode=mode,
        provider=provider if provider != "auto" else f"auto={chosen}",
        shape="x".join(map(str, shape)),
        dtype=str(dtype).removeprefix("torch."),
    )
