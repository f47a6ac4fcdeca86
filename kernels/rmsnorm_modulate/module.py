"""Drop-in modules for JiT blocks: `modulate(rmsnorm(x), shift, scale)` and its fusion with the gated residual.

Each module owns the RMSNorm's weight (`weight`, (D,), initialized to ones like JiT's / LLaMA's RMSNorm), so a
JiT block's `norm1.weight` maps onto it one to one.
"""
import torch
from torch import Tensor, nn

from ..layernorm_modulate.module import _check_hidden_size, _check_width
from .op import gated_residual_rmsnorm_modulate, rmsnorm_modulate


class _RMSNormModulateBase(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        _check_hidden_size(type(self).__name__, hidden_size, eps)
        if not isinstance(elementwise_affine, bool):
            raise TypeError(f"{type(self).__name__}: elementwise_affine must be a bool, got {elementwise_affine!r}")
        self.hidden_size = hidden_size
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(hidden_size)) if elementwise_affine else None

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, elementwise_affine={self.weight is not None}"


class RMSNormModulate(_RMSNormModulateBase):
    """RMSNorm(x)·weight·(1 + scale) + shift (JiT's `modulate(norm1(x), shift, scale)`).

    forward(x (B, T, D), shift (B, D), scale (B, D)) -> (B, T, D). Parameter: weight (D,) unless
    elementwise_affine=False.
    """

    def forward(self, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        _check_width(type(self).__name__, x, self.hidden_size)
        return rmsnorm_modulate(x, shift, scale, self.weight, self.eps)


class GatedResidualRMSNormModulate(_RMSNormModulateBase):
    """h = x + gate·y, out = RMSNorm(h)·weight·(1 + scale) + shift: one sub-block's residual add and the next one's
    norm.

    forward(x (B, T, D), y (B, T, D), gate (B, D), shift (B, D), scale (B, D)) -> (h, out), both (B, T, D).
    """

    def forward(self, x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        _check_width(type(self).__name__, x, self.hidden_size)
        return gated_residual_rmsnorm_modulate(x, y, gate, shift, scale, self.weight, self.eps)
