"""LayerNorm + adaLN modulate (+ gated residual): coredi_kernels vs eager PyTorch vs torch.compile.

    pytest benchmarks/bench_layernorm_modulate.py --bench-profile=real      # (256, 256, 1152) bf16 on CUDA
    pytest benchmarks/bench_layernorm_modulate.py --bench-profile=real --bench-sweep   # + tile sweeps

Providers: `ours` (coredi_kernels, Triton on CUDA), `eager` (what DiT runs: F.layer_norm without affine, then
modulate; the gated form adds `x + gate·y` first), `compile` (the eager formula under torch.compile(dynamic=False)).
Modes: `fwd` (inputs without grad) and `fwd+bwd` (forward, then torch.autograd.grad of every input).

Byte model: the traffic a fused kernel cannot avoid; every provider is credited with the same bytes, so GB/s is an
*effective* bandwidth (the unfused providers move more). N = B·T·D activation values of s bytes, P = B·D values of
each modulation parameter (s bytes), R = B·T rows with fp32 mean and rstd (4 bytes each):
    layernorm_modulate        fwd: read x, shift, scale; write out, mean, rstd     2·N·s + 2·P·s + 2·R·4
                              bwd: read x, dout, scale, mean, rstd; write dx,
                                   dshift, dscale                                  3·N·s + 3·P·s + 2·R·4
    gated_residual_ln_mod     fwd: read x, y, gate, shift, scale; write h, out,
                                   mean, rstd                                      4·N·s + 3·P·s + 2·R·4
                              bwd: read h, y, dout, dh, gate, scale, mean, rstd;
                                   write dx, dy, dgate, dshift, dscale             6·N·s + 5·P·s + 2·R·4
    fwd+bwd = fwd + bwd.
Reference points (H100, perf_anchors.md): copy 2.93 TB/s; Inductor ~1.1 TB/s on the fwd; target >= 2.5 TB/s.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

from coredi_kernels import gated_residual_layernorm_modulate, layernorm_modulate
from coredi_kernels.layernorm_modulate import _kernels

EPS = 1e-6
SHAPES = {"tiny": ((2, 16, 64), torch.float32), "real": ((256, 256, 1152), torch.bfloat16)}
OPS = ("layernorm_modulate", "gated_residual_ln_mod")
PROVIDERS = ("ours", "eager", "compile")
MODES = ("fwd", "fwd+bwd")


def eager_layernorm_modulate(x, shift, scale):
    return F.layer_norm(x, x.shape[-1:], eps=EPS) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def eager_gated_residual_layernorm_modulate(x, y, gate, shift, scale):
    h = x + gate.unsqueeze(1) * y
    return h, eager_layernorm_modulate(h, shift, scale)


def ours_layernorm_modulate(x, shift, scale):
    return layernorm_modulate(x, shift, scale, EPS)


def ours_gated_residual_layernorm_modulate(x, y, gate, shift, scale):
    return gated_residual_layernorm_modulate(x, y, gate, shift, scale, EPS)


EAGER = {
    "layernorm_modulate": eager_layernorm_modulate,
    "gated_residual_ln_mod": eager_gated_residual_layernorm_modulate,
}
OURS = {"layernorm_modulate": ours_layernorm_modulate, "gated_residual_ln_mod": ours_gated_residual_layernorm_modulate}


@functools.lru_cache(maxsize=None)
def compiled(op: str):
    return torch.compile(EAGER[op], dynamic=False)


def provider_fn(op: str, provider: str):
    return {"ours": OURS[op], "eager": EAGER[op], "compile": compiled(op) if provider == "compile" else None}[provider]


def bytes_moved(op: str, mode: str, shape, dtype) -> int:
    B, T, D = shape
    s = torch.finfo(dtype).bits // 8
    N, P, R = B * T * D, B * D, B * T
    fwd = {"layernorm_modulate": 2 * N * s + 2 * P * s, "gated_residual_ln_mod": 4 * N * s + 3 * P * s}[op] + 8 * R
    bwd = {"layernorm_modulate": 3 * N * s + 3 * P * s, "gated_residual_ln_mod": 6 * N * s + 5 * P * s}[op] + 8 * R
    return fwd if mode == "fwd" else fwd + bwd


def make_inputs(op: str, shape, dtype, device, requires_grad: bool):
    B, T, D = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    names = ["x", "shift", "scale"] if op == "layernorm_modulate" else ["x", "y", "gate", "shift", "scale"]
    shapes = {"x": (B, T, D), "y": (B, T, D), "gate": (B, D), "shift": (B, D), "scale": (B, D)}
    return [
        torch.randn(shapes[n], generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad) for n in names
    ]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", OPS)
def test_layernorm_modulate(measure, bench_profile, bench_device, op, provider, mode):
    shape, dtype = SHAPES[bench_profile]
    fn = provider_fn(op, provider)
    inputs = make_inputs(op, shape, dtype, bench_device, requires_grad=mode != "fwd")
    if mode == "fwd":

        def work():
            with torch.no_grad():
                return fn(*inputs)

    else:
        n_outputs = 1 if op == "layernorm_modulate" else 2
        cotangents = [torch.randn(shape, device=bench_device, dtype=dtype) for _ in range(n_outputs)]

        def work():
            outputs = fn(*inputs)
            outputs = (outputs,) if isinstance(outputs, torch.Tensor) else outputs
            return torch.autograd.grad(outputs, inputs, cotangents)

    measure(
        work,
        bytes_moved=bytes_moved(op, mode, shape, dtype),
        op=op,
        mode=mode,
        provider=provider,
        shape="x".join(map(str, shape)),
        dtype=str(dtype).removeprefix("torch."),
    )


# ---------------------------------------------------------------------------------------------------------------
# Tile sweeps (--bench-sweep, real profile): the launchers with explicit tiles, to tune the heuristics in _kernels
# ---------------------------------------------------------------------------------------------------------------

FWD_SWEEP = [(bm, w) for bm in (1, 2, 4, 8) for w in (4, 8, 16)]
BWD_SWEEP = [(bm, w, r) for bm in (1, 2, 4) for w in (4, 8) for r in (32, 64, 128, 256)]


@pytest.mark.parametrize("block_m, num_warps", FWD_SWEEP, ids=[f"bm{b}-w{w}" for b, w in FWD_SWEEP])
@pytest.mark.parametrize("op", OPS)
def test_sweep_forward_tiles(measure, bench_sweep, bench_profile, bench_device, op, block_m, num_warps):
    if not bench_sweep:
        pytest.skip("tile sweeps run with --bench-sweep on the real profile")
    shape, dtype = SHAPES[bench_profile]
    inputs = make_inputs(op, shape, dtype, bench_device, requires_grad=False)
    if op == "layernorm_modulate":
        launcher = _kernels.layernorm_modulate_fwd
    else:
        launcher = _kernels.gated_residual_layernorm_modulate_fwd
    measure(
        lambda: launcher(*inputs, EPS, block_m=block_m, num_warps=num_warps),
        bytes_moved=bytes_moved(op, "fwd", shape, dtype),
        op=op,
        mode="fwd-sweep",
        provider=f"bm{block_m}-w{num_warps}",
        shape="x".join(map(str, shape)),
        dtype=str(dtype).removeprefix("torch."),
    )


@pytest.mark.parametrize("block_m, num_warps, rows", BWD_SWEEP, ids=[f"bm{b}-w{w}-r{r}" for b, w, r in BWD_SWEEP])
@pytest.mark.parametrize("op", OPS)
def test_sweep_backward_tiles(measure, bench_sweep, bench_profile, bench_device, op, block_m, num_warps, rows):
    if not bench_sweep:
        pytest.skip("tile sweeps run with --bench-sweep on the real profile")
    shape, dtype = SHAPES[bench_profile]
    inputs = make_inputs(op, shape, dtype, bench_device, requires_grad=False)
    dout = torch.randn(shape, device=bench_device, dtype=dtype)
    tiles = dict(block_m=block_m, num_warps=num_warps, rows_per_program=rows)
    if op == "layernorm_modulate":
        x, shift, scale = inputs
        _, mean, rstd = _kernels.layernorm_modulate_fwd(x, shift, scale, EPS)

        def work():
            return _kernels.layernorm_modulate_bwd(dout, x, scale, mean, rstd, **tiles)

    else:
        x, y, gate, shift, scale = inputs
        h, _, mean, rstd = _kernels.gated_residual_layernorm_modulate_fwd(x, y, gate, shift, scale, EPS)
        dh_in = torch.randn_like(dout)

        def work():
            return _kernels.gated_residual_layernorm_modulate_bwd(dout, dh_in, h, y, gate, scale, mean, rstd, **tiles)

    measure(
        work,
        bytes_moved=bytes_moved(op, "fwd+bwd", shape, dtype) - bytes_moved(op, "fwd", shape, dtype),
        op=op,
        mode="bwd-sweep",
        provider=f"bm{block_m}-w{num_warps}-r{rows}",
        shape="x".join(map(str, shape)),
        dtype=str(dtype).removeprefix("torch."),
    )
