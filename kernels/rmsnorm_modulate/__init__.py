"""Fused RMSNorm + adaLN modulate (+ gated residual add) for JiT-style blocks (RMSNorm with a learned weight).

Ladder, as for `layernorm_modulate`: `_kernels` (Triton kernels and launchers) -> `op` (torch.library ops
`coredi::*`, autograd, backend dispatch, functional API) -> `module` (drop-in nn.Modules). `reference` holds the
pure-PyTorch math.
"""
from .module import GatedResidualRMSNormModulate, RMSNormModulate
from .op import gated_residual_rmsnorm_modulate, rmsnorm_modulate

__all__ = [
    "GatedResidualRMSNormModulate",
    "RMSNormModulate",
    "gated_residual_rmsnorm_modulate",
    "rmsnorm_modulate",
]
