"""LayerNorm + adaLN modulate (+ gated residual), DiT's norms: coredi_kernels vs eager PyTorch vs torch.compile.

    pytest benchmarks/bench_layernorm_modulate.py --bench-profile=real      # (256, 256, 1152) bf16 on CUDA
    pytest benchmarks/bench_layernorm_modulate.py --bench-profile=real --bench-sweep   # + tile sweeps

`eager` is what DiT runs: F.layer_norm without affine, then modulate. Providers, modes and the byte model (LayerNorm
stores fp32 mean and rstd per row) are in norm_modulate_bench.py, shared with bench_rmsnorm_modulate.py.
"""
import torch
import torch.nn.functional as F

from coredi_kernels import gated_residual_layernorm_modulate, layernorm_modulate
from norm_modulate_bench import EPS, NormBench, NormModulateBenchmarks

LAYERNORM = NormBench(
    name="layernorm",
    ops=("layernorm_modulate", "gated_residual_ln_mod"),
    ours=(layernorm_modulate, gated_residual_layernorm_modulate),
    eager_norm=lambda x, weight: F.layer_norm(x, x.shape[-1:], eps=EPS),
    shapes=(("tiny", (2, 16, 64), torch.float32), ("real", (256, 256, 1152), torch.bfloat16)),
    bwd_sweep_rows=(32, 64, 128, 256),
)


class TestLayerNormModulate(NormModulateBenchmarks):
    bench = LAYERNORM
