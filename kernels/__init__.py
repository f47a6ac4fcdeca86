"""coredi_kernels: fused Triton ops for DiT/SiT training, usable on their own (needs only torch and triton).

Every op runs its Triton kernels on CUDA tensors and the same math in PyTorch elsewhere; `force_backend` or the
environment variable COREDI_KERNELS_BACKEND (triton | torch | auto) overrides the choice.
"""
from .backend import force_backend
from .layernorm_modulate import (
    GatedResidualLayerNormModulate,
    LayerNormModulate,
    gated_residual_layernorm_modulate,
    layernorm_modulate,
)

__version__ = "0.1.0"

__all__ = [
    "GatedResidualLayerNormModulate",
    "LayerNormModulate",
    "force_backend",
    "gated_residual_layernorm_modulate",
    "layernorm_modulate",
]
