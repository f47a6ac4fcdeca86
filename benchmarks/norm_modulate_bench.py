"""The benchmarks LayerNorm + modulate and RMSNorm + modulate share; bench_layernorm_modulate.py and
bench_rmsnorm_modulate.py run them for their norm (`NormModulateBenchmarks` with a `NormBench`).

Providers: `ours` (coredi_kernels, Triton on CUDA), `eager` (what the model runs: its norm, then modulate; the gated
form adds `x + gate·y` first), `compile` (the eager formula under torch.compile(dynamic=False)).
Modes: `fwd` (inputs without grad) and `fwd+bwd` (forward, then torch.autograd.grad of every input, the RMSNorm
weight included).

Byte model: the traffic a fused kernel cannot avoid; every provider is credited with the same bytes, so GB/s is an
*effective* bandwidth (the unfused providers move more). N = B·T·D activation values of s bytes, P = B·D values of
each modulation parameter (s bytes), R = B·T rows with fp32 statistics of S bytes each (LayerNorm: mean and rstd,
S = 8; RMSNorm: rstd, S = 4), the RMSNorm weight's D values are negligible:
    plain   fwd: read x, shift, scale [, w]; write out, stats                          2·N·s + 2·P·s + R·S
            bwd: read x, dout, scale [, w], stats; write dx, dshift, dscale [, dw]     3·N·s + 3·P·s + R·S
    gated   fwd: read x, y, gate, shift, scale [, w]; write h, out, stats            4·N·s + 3·P·s + R·S
            bwd: read h, y, dout, dh, gate, scale [, w], stats;
                 write dx, dy, dgate, dshift, dscale [, dw]                          6·N·s + 5·P·s + R·S
    fwd+bwd = fwd + bwd.
Reference points (H100, perf_anchors.md): copy 2.93 TB/s; Inductor ~1.1 TB/s on DiT's LayerNorm+modulate fwd;
target >= 2.5 TB/s.
"""
import functools
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from coredi_kernels.norm_modulate import _kernels

EPS = 1e-6
PROVIDERS = ("ours", "eager", "compile")
MODES = ("fwd", "fwd+bwd")
FWD_SWEEP = [(bm, w) for bm in (1, 2, 4, 8) for w in (4, 8, 16)]


@dataclass(frozen=True)
class NormBench:
    """What differs between the two norms' benchmarks."""

    name: str  # "layernorm" | "rmsnorm": the launchers are `[gated_residual_]{name}_modulate_{fwd,bwd}`
    ops: tuple  # the labels of (plain, gated) in the results
    ours: tuple  # the public functions of (plain, gated): (x, [y, gate,] shift, scale, [weight,] eps)
    eager_norm: Callable  # (x, weight or None) -> what the model's unfused norm computes
    shapes: tuple  # ((profile, shape, dtype), ...)
    bwd_sweep_rows: tuple  # rows per backward program to sweep (divisors-ish of T)

    @property
    def takes_weight(self) -> bool:
        return self.name == "rmsnorm"

    @property
    def stats_bytes(self) -> int:
        """fp32 statistics per row: RMSNorm's rstd, LayerNorm's mean and rstd."""
        return 4 if self.takes_weight else 8

    def shape(self, profile: str):
        return next((shape, dtype) for name, shape, dtype in self.shapes if name == profile)

    def is_gated(self, op: str) -> bool:
        return op == self.ops[1]

    def launcher(self, op: str, direction: str) -> Callable:
        prefix = "gated_residual_" if self.is_gated(op) else ""
        return getattr(_kernels, f"{prefix}{self.name}_modulate_{direction}")


def eager_fn(bench: NormBench, op: str) -> Callable:
    """The unfused formula over the benchmark's inputs: (x, [y, gate,] shift, scale[, weight])."""

    def plain(x, shift, scale, weight=None):
        return bench.eager_norm(x, weight) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    def gated(x, y, gate, shift, scale, weight=None):
        h = x + gate.unsqueeze(1) * y
        return h, plain(h, shift, scale, weight)

    return gated if bench.is_gated(op) else plain


@functools.lru_cache(maxsize=None)
def compiled(bench: NormBench, op: str) -> Callable:
    return torch.compile(eager_fn(bench, op), dynamic=False)


def provider_fn(bench: NormBench, op: str, provider: str) -> Callable:
    if provider == "ours":
        return functools.partial(bench.ours[bench.is_gated(op)], eps=EPS)
    return eager_fn(bench, op) if provider == "eager" else compiled(bench, op)


def bytes_moved(bench: NormBench, op: str, mode: str, shape, dtype) -> int:
    B, T, D = shape
    s = torch.finfo(dtype).bits // 8
    N, P, R = B * T * D, B * D, B * T
    gated = bench.is_gated(op)
    fwd = (4 * N * s + 3 * P * s if gated else 2 * N * s + 2 * P * s) + bench.stats_bytes * R
    bwd = (6 * N * s + 5 * P * s if gated else 3 * N * s + 3 * P * s) + bench.stats_bytes * R
    return fwd if mode == "fwd" else fwd + bwd


def make_inputs(bench: NormBench, op: str, shape, dtype, device, requires_grad: bool) -> list:
    """x[, y, gate], shift, scale in `dtype`; then RMSNorm's weight in fp32 (a parameter under autocast)."""
    B, T, D = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    names = ["x", "y", "gate", "shift", "scale"] if bench.is_gated(op) else ["x", "shift", "scale"]
    shapes = {"x": (B, T, D), "y": (B, T, D), "gate": (B, D), "shift": (B, D), "scale": (B, D)}
    tensors = [torch.randn(shapes[n], generator=g).to(device=device, dtype=dtype) for n in names]
    if bench.takes_weight:
        tensors.append(1 + 0.1 * torch.randn(D, generator=g).to(device=device))
    return [t.requires_grad_(requires_grad) for t in tensors]


def launcher_args(bench: NormBench, inputs: list) -> list:
    """The inputs in the launchers' argument order: (x, [y, gate,] [weight,] shift, scale)."""
    if not bench.takes_weight:
        return list(inputs)
    *acts, shift, scale, weight = inputs
    return [*acts, weight, shift, scale]


def labels(shape, dtype) -> dict:
    return dict(shape="x".join(map(str, shape)), dtype=str(dtype).removeprefix("torch."))


class NormModulateBenchmarks:
    """Run for one norm by a subclass that sets `bench`; `op` and the backward sweep come from it."""

    bench: NormBench

    def pytest_generate_tests(self, metafunc):
        if "op" in metafunc.fixturenames:
            metafunc.parametrize("op", self.bench.ops)
        if "rows" in metafunc.fixturenames:
            sweep = [(bm, w, r) for bm in (1, 2, 4) for w in (4, 8) for r in self.bench.bwd_sweep_rows]
            metafunc.parametrize("block_m, num_warps, rows", sweep, ids=[f"bm{b}-w{w}-r{r}" for b, w, r in sweep])

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("provider", PROVIDERS)
    def test_providers(self, measure, bench_profile, bench_device, op, provider, mode):
        shape, dtype = self.bench.shape(bench_profile)
        fn = provider_fn(self.bench, op, provider)
        inputs = make_inputs(self.bench, op, shape, dtype, bench_device, requires_grad=mode != "fwd")
        if mode == "fwd":

            def work():
                with torch.no_grad():
                    return fn(*inputs)

        else:
            n_outputs = 2 if self.bench.is_gated(op) else 1
            cotangents = [torch.randn(shape, device=bench_device, dtype=dtype) for _ in range(n_outputs)]

            def work():
                outputs = fn(*inputs)
                outputs = (outputs,) if isinstance(outputs, torch.Tensor) else outputs
                return torch.autograd.grad(outputs, inputs, cotangents)

        bytes_ = bytes_moved(self.bench, op, mode, shape, dtype)
        measure(work, bytes_moved=bytes_, op=op, mode=mode, provider=provider, **labels(shape, dtype))

    # Tile sweeps (--bench-sweep, real profile): the launchers with explicit tiles, to tune the heuristics in
    # coredi_kernels.norm_modulate._kernels.

    @pytest.mark.parametrize("block_m, num_warps", FWD_SWEEP, ids=[f"bm{b}-w{w}" for b, w in FWD_SWEEP])
    def test_sweep_forward_tiles(self, measure, bench_sweep, bench_profile, bench_device, op, block_m, num_warps):
        if not bench_sweep:
            pytest.skip("tile sweeps run with --bench-sweep on the real profile")
        shape, dtype = self.bench.shape(bench_profile)
        args = launcher_args(self.bench, make_inputs(self.bench, op, shape, dtype, bench_device, requires_grad=False))
        launcher = self.bench.launcher(op, "fwd")
        measure(
            lambda: launcher(*args, EPS, block_m=block_m, num_warps=num_warps),
            bytes_moved=bytes_moved(self.bench, op, "fwd", shape, dtype),
            op=op,
            mode="fwd-sweep",
            provider=f"bm{block_m}-w{num_warps}",
            **labels(shape, dtype),
        )

    def test_sweep_backward_tiles(self, measure, bench_sweep, bench_profile, bench_device, op, block_m, num_warps,
                                  rows):
        if not bench_sweep:
            pytest.skip("tile sweeps run with --bench-sweep on the real profile")
        shape, dtype = self.bench.shape(bench_profile)
        args = launcher_args(self.bench, make_inputs(self.bench, op, shape, dtype, bench_device, requires_grad=False))
        dout = torch.randn(shape, device=bench_device, dtype=dtype)
        forward = self.bench.launcher(op, "fwd")(*args, EPS)
        num_stats = 1 if self.bench.takes_weight else 2
        # The backward's arguments: (dout, [dh_in,] normalized rows, [y, gate,] [weight,] scale, *stats), the
        # normalized rows being x or the gated forward's h.
        if self.bench.is_gated(op):
            upstream, normalized = [dout, torch.randn_like(dout)], forward[0]
        else:
            upstream, normalized = [dout], args[0]
        bwd_args = (*upstream, normalized, *args[1:-2], args[-1], *forward[-num_stats:])
        launcher = self.bench.launcher(op, "bwd")
        fwd_bytes = bytes_moved(self.bench, op, "fwd", shape, dtype)
        measure(
            lambda: launcher(*bwd_args, block_m=block_m, num_warps=num_warps, rows_per_program=rows),
            bytes_moved=bytes_moved(self.bench, op, "fwd+bwd", shape, dtype) - fwd_bytes,
            op=op,
            mode="bwd-sweep",
            provider=f"bm{block_m}-w{num_warps}-r{rows}",
            **labels(shape, dtype),
        )
