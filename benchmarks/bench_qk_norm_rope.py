"""qk-norm + RoPE (JiT's attention prologue): coredi_kernels vs eager PyTorch vs torch.compile.

    pytest benchmarks/bench_qk_norm_rope.py --bench-profile=real     # JiT-B/16 and JiT-H/16, 256 px, batch 128, bf16
    pytest benchmarks/bench_qk_norm_rope.py --bench-profile=real --bench-sweep   # + the launchers' tile sweeps
    pytest benchmarks/bench_qk_norm_rope.py -q --benchmark-disable   # smoke test (tiny shapes on CPU)

Shapes (B, T, H, Dh): T = 256 patch tokens + 32 in-context class tokens = 288; JiT-B/16 has H = 12 heads of
Dh = 64, JiT-H/16 H = 16 heads of Dh = 80 (not a power of two). The tiny profile keeps the head dims with B = 2,
T = 4 + 4·4, H = 2 (on CPU `ours` runs the PyTorch backend, as `auto` does there).

Providers: `ours` (`coredi_kernels.qk_norm_rope`, Triton on CUDA), `eager` (what coredi_fast's JiTAttention runs:
q_norm and k_norm — RMSNorm in fp32 with its weight, cast back — then `apply_rope` on q and k in fp32, cast back,
and the (B, H, T, Dh) views for attention), `compile` (the eager function under torch.compile(dynamic=False)).
Inputs as in a JiT under bf16 autocast: qkv bf16, the RMSNorm weights fp32 parameters, the RoPE tables fp32.
Modes: `fwd` (no grad) and `fwd+bwd` (forward, then torch.autograd.grad of qkv and both weights, with cotangents
for q, k and v).

Byte model: the traffic the fused op cannot avoid, credited to every provider, so GB/s is an *effective* bandwidth.
N = B·T·H·Dh values of s bytes in each of q, k, v:
    fwd: read qkv, write q, k, v                                                     3·N·s + 3·N·s = 6·N·s
    bwd: read dq, dk, dv and the q and k parts of qkv, write dqkv                    3·N·s + 2·N·s + 3·N·s = 8·N·s
    fwd+bwd = 14·N·s.
The weights, the (T, Dh/2) tables and the backward's fp32 partial sums are negligible. (Eager's v is a view of
qkv, so its forward moves less for v — and far more for q and k, through ~10 elementwise kernels.)
"""
import functools

import pytest
import torch

from coredi_fast.models.rope import apply_rope, rope_2d_tables
from coredi_kernels import qk_norm_rope
from coredi_kernels.qk_norm_rope import _kernels

EPS = 1e-6
PROVIDERS = ("ours", "eager", "compile")
MODES = ("fwd", "fwd+bwd")
# model -> profile -> ((B, T, H, Dh), number of prefix tokens, dtype)
SHAPES = {
    "JiT-B/16": {"tiny": ((2, 4 + 16, 2, 64), 4, torch.float32), "real": ((128, 32 + 256, 12, 64), 32, torch.bfloat16)},
    "JiT-H/16": {"tiny": ((2, 4 + 16, 2, 80), 4, torch.float32), "real": ((128, 32 + 256, 16, 80), 32, torch.bfloat16)},
}
FWD_SWEEP = [(bs, w) for bs in (16, 32, 64, 128) for w in (2, 4, 8)]
BWD_SWEEP = [(bs, w, r) for bs in (16, 32) for w in (4, 8) for r in (512, 2048, 8192)]


def eager_rmsnorm(x, weight):
    """coredi_fast's JiT RMSNorm (q_norm, k_norm): fp32 statistics and weight product, back to the input dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + EPS) * weight.float()).to(x.dtype)


def eager(qkv, q_weight, k_weight, cos, sin):
    """JiTAttention's prologue: qkv (B, T, 3, H, Dh) -> q, k, v (B, H, T, Dh)."""
    q, k, v = qkv.unbind(2)
    q = apply_rope(eager_rmsnorm(q, q_weight), cos, sin)
    k = apply_rope(eager_rmsnorm(k, k_weight), cos, sin)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


@functools.lru_cache(maxsize=None)
def compiled():
    return torch.compile(eager, dynamic=False)


def provider_fn(provider: str):
    if provider == "ours":
        return functools.partial(qk_norm_rope, eps=EPS)
    return eager if provider == "eager" else compiled()


def make_inputs(model: str, profile: str, device, requires_grad: bool):
    """qkv (B, T, 3, H, Dh) in the profile's dtype, fp32 weights near 1, fp32 2D RoPE tables (prefix angle 0)."""
    (B, T, H, Dh), prefix, dtype = SHAPES[model][profile]
    g = torch.Generator(device="cpu").manual_seed(0)
    qkv = torch.randn(B, T, 3, H, Dh, generator=g).to(device=device, dtype=dtype)
    weights = [(1 + 0.1 * torch.randn(Dh, generator=g)).to(device) for _ in range(2)]
    grid = int(round((T - prefix) ** 0.5))
    cos, sin = (t.to(device) for t in rope_2d_tables(Dh, grid, prefix))
    leaves = [t.requires_grad_(requires_grad) for t in (qkv, *weights)]
    return leaves, (cos, sin)


def bytes_moved(model: str, profile: str, mode: str) -> int:
    (B, T, H, Dh), _, dtype = SHAPES[model][profile]
    n, s = B * T * H * Dh, torch.finfo(dtype).bits // 8
    return 6 * n * s if mode == "fwd" else 14 * n * s


def labels(model: str, profile: str, mode: str, provider: str) -> dict:
    """The row's labels, in the column order of the other op benchmarks."""
    shape, _, dtype = SHAPES[model][profile]
    return dict(op="qk_norm_rope", model=model, mode=mode, provider=provider, shape="x".join(map(str, shape)),
                dtype=str(dtype).removeprefix("torch."))


@pytest.mark.parametrize("model", list(SHAPES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_providers(measure, bench_profile, bench_device, model, provider, mode):
    fn = provider_fn(provider)
    leaves, tables = make_inputs(model, bench_profile, bench_device, requires_grad=mode != "fwd")
    if mode == "fwd":

        def work():
            with torch.no_grad():
                return fn(*leaves, *tables)

    else:
        (B, T, H, Dh), _, dtype = SHAPES[model][bench_profile]
        cotangents = [torch.randn(B, H, T, Dh, device=bench_device, dtype=dtype) for _ in range(3)]

        def work():
            return torch.autograd.grad(fn(*leaves, *tables), leaves, cotangents)

    measure(work, bytes_moved=bytes_moved(model, bench_profile, mode), **labels(model, bench_profile, mode, provider))


# Tile sweeps (--bench-sweep, real profile): the launchers with explicit tiles, to tune the heuristics in
# coredi_kernels.qk_norm_rope._kernels.


@pytest.mark.parametrize("model", list(SHAPES))
@pytest.mark.parametrize("block_s, num_warps", FWD_SWEEP, ids=[f"bs{b}-w{w}" for b, w in FWD_SWEEP])
def test_sweep_forward_tiles(measure, bench_sweep, bench_profile, bench_device, model, block_s, num_warps):
    if not bench_sweep:
        pytest.skip("tile sweeps run with --bench-sweep on the real profile")
    leaves, tables = make_inputs(model, bench_profile, bench_device, requires_grad=False)
    measure(lambda: _kernels.qk_norm_rope_fwd(*leaves, *tables, EPS, block_s=block_s, num_warps=num_warps),
            bytes_moved=bytes_moved(model, bench_profile, "fwd"),
            **labels(model, bench_profile, "fwd-sweep", f"bs{block_s}-w{num_warps}"))


@pytest.mark.parametrize("model", list(SHAPES))
@pytest.mark.parametrize("block_s, num_warps, rows", BWD_SWEEP, ids=[f"bs{b}-w{w}-r{r}" for b, w, r in BWD_SWEEP])
def test_sweep_backward_tiles(measure, bench_sweep, bench_profile, bench_device, model, block_s, num_warps, rows):
    if not bench_sweep:
        pytest.skip("tile sweeps run with --bench-sweep on the real profile")
    leaves, tables = make_inputs(model, bench_profile, bench_device, requires_grad=False)
    upstream = _kernels.qk_norm_rope_fwd(*leaves, *tables, EPS)  # stand-ins with the op's output layout
    fwd_bytes = bytes_moved(model, bench_profile, "fwd")
    measure(lambda: _kernels.qk_norm_rope_bwd(*upstream, *leaves, *tables, EPS, block_s=block_s,
                                              num_warps=num_warps, rows_per_program=rows),
            bytes_moved=bytes_moved(model, bench_profile, "fwd+bwd") - fwd_bytes,
            **labels(model, bench_profile, "bwd-sweep", f"bs{block_s}-w{num_warps}-r{rows}"))
