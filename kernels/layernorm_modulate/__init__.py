"""Fused LayerNorm + adaLN modulate (+ gated residual add) for DiT/SiT blocks.

The LayerNorm face of `coredi_kernels.norm_modulate`, which implements LayerNorm and RMSNorm with one pair of Triton
kernels and one op registration. Also here for tests and benchmarks: `_kernels` (the launchers the ops call; None
without triton) and `reference` (the pure-PyTorch math), both shared with `coredi_kernels.rmsnorm_modulate`.
"""
from ..norm_modulate import reference  # noqa: F401 (re-exported, see above)
from ..norm_modulate.module import GatedResidualLayerNormModulate, LayerNormModulate
from ..norm_modulate.op import _kernels, gated_residual_layernorm_modulate, layernorm_modulate  # noqa: F401 (_kernels)

__all__ = [
    "GatedResidualLayerNormModulate", "LayerNormModulate", "gated_residual_layernorm_modulate", "layernorm_modulate"
]
