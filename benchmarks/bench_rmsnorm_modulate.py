"""RMSNorm + adaLN modulate (+ gated residual), JiT's norms: coredi_kernels vs eager PyTorch vs torch.compile.

    pytest benchmarks/bench_rmsnorm_modulate.py --bench-profile=real     # JiT-H/16: (256, 256 + 32, 1280) bf16
    pytest benchmarks/bench_rmsnorm_modulate.py --bench-profile=real --bench-sweep   # + tile sweeps

Providers: `ours` (coredi_kernels, Triton on CUDA), `eager` (what JiT runs: RMSNorm in fp32 with its weight, cast
back, then modulate; the gated form adds `x + gate·y` first), `compile` (the eager formula under
torch.compile(dynamic=False)). Modes: `fwd` (inputs without grad) and `fwd+bwd` (forward, then
torch.autograd.grad of every input, the RMSNorm weight included).

T = 256 patch tokens + 32 in-context class tokens = 288 rows per sample, so forward tiles cross sample boundaries.

Byte model (the traffic a fused kernel cannot avoid; every provider is credited with the same bytes, so GB/s is an
*effective* bandwidth): N = B·T·D activation values of s bytes, P = B·D values per modulation parameter, R = B·T
rows with an fp32 rstd, W = D weight values (negligible):
    rmsnorm_modulate        fwd: read x, shift, scale, w; write out, rstd            2·N·s + 2·P·s + R·4
                            bwd: read x, dout, scale, w, rstd; write dx, dshift,
                                 dscale, dweight                                     3·N·s + 3·P·s + R·4
    gated_residual_rms_mod  fwd: read x, y, gate, shift, scale, w; write h, out,
                                 rstd                                                4·N·s + 3·P·s + R·4
                            bwd: read h, y, dout, dh, gate, scale, w, rstd; write
                                 dx, dy, dgate, dshift, dscale, dweight              6·N·s + 5·P·s + R·4
    fwd+bwd = fwd + bwd.
Reference points (H100, perf_anchors.md): copy 2.93 TB/s; Inductor ~1.1 TB/s on DiT's LayerNorm+modulate.
"""
import functools

import pytest
import torch

from coredi_kernels.rmsnorm_modulate import _kernels, gated_residual_rmsnorm_modulate, rmsnorm_modulate

EPS = 1e-6
SHAPES = {"tiny": ((2, 16 + 4, 64), torch.float32), "real": ((256, 256 + 32, 1280), torch.bfloat16)}
OPS = ("rmsnorm_modulate", "gated_residual_rms_mod")
PROVIDERS = ("ours", "eager", "compile")
MODES = ("fwd", "fwd+bwd")


def eager_rmsnorm(x, weight):
    """JiT's RMSNorm: fp32 statistics and weight product, back to the input dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + EPS) * weight.float()).to(x.dtype)


def eager_rmsnorm_modulate(x, shift, scale, weight):
    return eager_rmsnorm(x, weight) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def eager_gated_residual_rmsnorm_modulate(x, y, gate, shift, scale, weight):
    h = x + gate.unsqueeze(1) * y
    return h, eager_rmsnorm_modulate(h, shift, scale, weight)


def ours_rmsnorm_modulate(x, shift, scale, weight):
    return rmsnorm_modulate(x, shift, scale, weight, EPS)


def ours_gated_residual_rmsnorm_modulate(x, y, gate, shift, scale, weight):
    return gated_residual_rmsnorm_modulate(x, y, gate, shift, scale, weight, EPS)


EAGER = {"rmsnorm_modulate": eager_rmsnorm_modulate, "gated_residual_rms_mod": eager_gated_residual_rmsnorm_modulate}
OURS = {"rmsnorm_modulate": ours_rmsnorm_modulate, "gated_residual_rms_mod": ours_gated_residual_rmsnorm_modulate}


@functools.lru_cache(maxsize=None)
def compiled(op: str):
    return torch.compile(EAGER[op], dynamic=False)


def provider_fn(op: str, provider: str):
    return {"ours": OURS[op], "eager": EAGER[op], "compile": compiled(op) if provider == "compile" else None}[provider]


def bytes_moved(op: str, mode: str, shape, dtype) -> int:
    B, T, D = shape
    s = torch.finfo(dtype).bits // 8
    N, P, R = B * T * D, B * D, B * T
    fwd = {"rmsnorm_modulate": 2 * N * s + 2 * P * s, "gated_residual_rms_mod": 4 * N * s + 3 * P * s}[op] + 4 * R
    bwd = {"rmsnorm_modulate": 3 * N * s + 3 * P * s, "gated_residual_rms_mod": 6 * N * s + 5 * P * s}[op] + 4 * R
    return fwd if mode == "fwd" else fwd + bwd


def make_inputs(op: str, shape, dtype, device, requires_grad: bool):
    """x[, y, gate], shift, scale in `dtype`; the RMSNorm weight in fp32 (a parameter under autocast)."""
    B, T, D = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    names = ["x", "shift", "scale"] if op == "rmsnorm_modulate" else ["x", "y", "gate", "shift", "scale"]
    shapes = {"x": (B, T, D), "y": (B, T, D), "gate": (B, D), "shift": (B, D), "scale": (B, D)}
    tensors = [torch.randn(shapes[n], generator=g).to(device=device, dtype=dtype) for n in names]
    tensors.append(1 + 0.1 * torch.randn(D, generator=g).to(device=device))
    return [t.requires_grad_(requires_grad) for t in tensors]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", OPS)
def test_rmsnorm_modulate(measure, bench_profile, bench_device, op, provider, mode):
    shape, dtype = SHAPES[bench_profile]
    fn = provider_fn(op, provider)
    inputs = make_inputs(op, shape, dtype, bench_device, requires_grad=mode != "fwd")
    if mode == "fwd":

        def work():
            with torch.no_grad():
                return fn(*inputs)

    else:
        n_outputs = 1 if op == "rmsnorm_modulate" else 2
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
# Tile sweeps (--bench-sweep, real profile): the launchers with explicit tiles, to tune the heuristics
# ---------------------------------------------------------------------------------------------------------------

FWD_SWEEP = [(bm, w) for bm in (1, 2, 4, 8) for w in (4, 8, 16)]
BWD_SWEEP = [(bm, w, r) for bm in (1, 2, 4) for w in (4, 8) for r in (32, 64, 96, 144)]


def _launcher_args(op, inputs):
    """(x[, y, gate], weight, shift, scale) in the launchers' argument order."""
    *acts, shift, scale, weight = inputs
    return (*acts, weight, shift, scale)


@pytest.mark.parametrize("block_m, num_warps", FWD_SWEEP, ids=[f"bm{b}-w{w}" for b, w in FWD_SWEEP])
@pytest.mark.parametrize("op", OPS)
def test_sweep_forward_tiles(measure, bench_sweep, bench_profile, bench_device, op, block_m, num_warps):
    if not bench_sweep:
        pytest.skip("tile sweeps run with --bench-sweep on the real profile")
    shape, dtype = SHAPES[bench_profile]
    args = _launcher_args(op, make_inputs(op, shape, dtype, bench_device, requires_grad=False))
    if op == "rmsnorm_modulate":
        launcher = _kernels.rmsnorm_modulate_fwd
    else:
        launcher = _kernels.gated_residual_rmsnorm_modulate_fwd
    measure(
        lambda: launcher(*args, EPS, block_m=block_m, num_warps=num_warps),
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
    args = _launcher_args(op, make_inputs(op, shape, dtype, bench_device, requires_grad=False))
    dout = torch.randn(shape, device=bench_device, dtype=dtype)
    tiles = dict(block_m=block_m, num_warps=num_warps, rows_per_program=rows)
    if op == "rmsnorm_modulate":
        x, weight, shift, scale = args
        _, rstd = _kernels.rmsnorm_modulate_fwd(x, weight, shift, scale, EPS)

        def work():
            return _kernels.rmsnorm_modulate_bwd(dout, x, weight, scale, rstd, **tiles)

    else:
        x, y, gate, weight, shift, scale = args
        h, _, rstd = _kernels.gated_residual_rmsnorm_modulate_fwd(x, y, gate, weight, shift, scale, EPS)
        dh_in = torch.randn_like(dout)

        def work():
            return _kernels.gated_residual_rmsnorm_modulate_bwd(dout, dh_in, h, y, gate, weight, scale, rstd, **tiles)

    measure(
        work,
        bytes_moved=bytes_moved(op, "fwd+bwd", shape, dtype) - bytes_moved(op, "fwd", shape, dtype),
        op=op,
        mode="bwd-sweep",
        provider=f"bm{block_m}-w{num_warps}-r{rows}",
        shape="x".join(map(str, shape)),
        dtype=str(dtype).removeprefix("torch."),
    )
