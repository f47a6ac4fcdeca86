"""Fused LayerNorm + adaLN modulate (+ gated residual add) for DiT/SiT blocks.

Ladder: `_kernels` (Triton kernels and launchers) -> `op` (torch.library ops `coredi::*`, autograd, backend
dispatch, functional API) -> `module` (drop-in nn.Modules). `reference` holds the pure-PyTorch math.
"""
from .module import GatedResidualLayerNormModulate, LayerNormModulate
from .op import gated_residual_layernorm_modulate, layernorm_modulate

__all__ = [
    "GatedResidualLayerNormModulate",
    "LayerNormModulate",
    "gated_residual_layernorm_modulate",
    "layernorm_modulate",
]
