"""Fused LayerNorm or RMSNorm + adaLN modulate (+ gated residual add): one implementation for DiT/SiT blocks
(LayerNorm without affine) and JiT-style blocks (RMSNorm with an optional learned weight).

Ladder: `_kernels` (one forward and one backward Triton kernel, specialized by IS_RMS_NORM / HAS_WEIGHT /
HAS_RESIDUAL flags, and their launchers) -> `op` (torch.library ops `coredi::*`, autograd, backend dispatch,
functional API) -> `module` (drop-in nn.Modules). `reference` holds the pure-PyTorch math of both norms.
`coredi_kernels.layernorm_modulate` and `coredi_kernels.rmsnorm_modulate` are each norm's public face.
"""
from .module import GatedResidualLayerNormModulate, GatedResidualRMSNormModulate, LayerNormModulate, RMSNormModulate
from .op import gated_residual_layernorm_modulate, gated_residual_rmsnorm_modulate, layernorm_modulate, rmsnorm_modulate

__all__ = [
    "GatedResidualLayerNormModulate",
    "GatedResidualRMSNormModulate",
    "LayerNormModulate",
    "RMSNormModulate",
    "gated_residual_layernorm_modulate",
    "gated_residual_rmsnorm_modulate",
    "layernorm_modulate",
    "rmsnorm_modulate",
]
