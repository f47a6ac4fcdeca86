"""RMSNorm + adaLN modulate (+ gated residual), JiT's norms: coredi_kernels vs eager PyTorch vs torch.compile.

    pytest benchmarks/bench_rmsnorm_modulate.py --bench-profile=real     # JiT-H/16: (256, 256 + 32, 1280) bf16
    pytest benchmarks/bench_rmsnorm_modulate.py --bench-profile=real --bench-sweep   # + tile sweeps

`eager` is what JiT runs: RMSNorm in fp32 with its weight, cast back, then modulate. T = 256 patch tokens + 32
in-context class tokens = 288 rows per sample, so forward tiles cross sample boundaries. Providers, modes and the
byte model (RMSNorm stores one fp32 rstd per row) are in norm_modulate_bench.py, shared with
bench_layernorm_modulate.py.
"""
import torch

from coredi_kernels import gated_residual_rmsnorm_modulate, rmsnorm_modulate
from norm_modulate_bench import EPS, NormBench, NormModulateBenchmarks


def eager_rmsnorm(x, weight):
    """JiT's RMSNorm: fp32 statistics and weight product, back to the input dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + EPS) * weight.float()).to(x.dtype)


RMSNORM = NormBench(
    name="rmsnorm",
    ops=("rmsnorm_modulate", "gated_residual_rms_mod"),
    ours=(rmsnorm_modulate, gated_residual_rmsnorm_modulate),
    eager_norm=eager_rmsnorm,
    shapes=(("tiny", (2, 16 + 4, 64), torch.float32), ("real", (256, 256 + 32, 1280), torch.bfloat16)),
    bwd_sweep_rows=(32, 64, 96, 144),
)


class TestRMSNormModulate(NormModulateBenchmarks):
    bench = RMSNORM
