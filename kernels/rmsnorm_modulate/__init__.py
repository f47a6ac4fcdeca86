"""Fused RMSNorm + adaLN modulate (+ gated residual add) for JiT-style blocks (RMSNorm with a learned weight).

The RMSNorm face of `coredi_kernels.norm_modulate`; `_kernels` and `reference` as in
`coredi_kernels.layernorm_modulate`.
"""
from ..norm_modulate import reference  # noqa: F401 (re-exported, see above)
from ..norm_modulate.module import GatedResidualRMSNormModulate, RMSNormModulate
from ..norm_modulate.op import _kernels, gated_residual_rmsnorm_modulate, rmsnorm_modulate  # noqa: F401 (_kernels)

__all__ = ["GatedResidualRMSNormModulate", "RMSNormModulate", "gated_residual_rmsnorm_modulate", "rmsnorm_modulate"]
