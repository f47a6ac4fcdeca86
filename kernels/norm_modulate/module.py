"""Drop-in modules: `modulate(norm(x), shift, scale)` and its fusion with the gated residual, for DiT/SiT blocks
(LayerNorm without affine, no parameters) and JiT blocks (RMSNorm owning its weight).

The RMSNorm modules own the norm's weight (`weight`, (D,), initialized to ones like JiT's / LLaMA's RMSNorm), so a
JiT block's `norm1.weight` maps onto it one to one.
"""
import torch
from torch import Tensor, nn

from .op import gated_residual_layernorm_modulate, gated_residual_rmsnorm_modulate, layernorm_modulate, rmsnorm_modulate


class _NormModulateBase(nn.Module):
    """hidden_size and eps, checked at construction; forward checks x's width against hidden_size."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        cls = type(self).__name__
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"{cls}: hidden_size must be a positive int, got {hidden_size!r}")
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
            raise ValueError(f"{cls}: eps must be a positive number, got {eps!r}")
        self.hidden_size = hidden_size
        self.eps = float(eps)

    def _check_width(self, x: Tensor) -> None:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"{type(self).__name__}: x has {x.shape[-1]} features, the module was built for "
                             f"hidden_size={self.hidden_size}")

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class LayerNormModulate(_NormModulateBase):
    """LN(x)·(1 + scale) + shift with a LayerNorm without affine (DiT's `modulate(norm1(x), shift, scale)`).

    forward(x (B, T, D), shift (B, D), scale (B, D)) -> (B, T, D). No parameters.
    """

    def forward(self, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        self._check_width(x)
        return layernorm_modulate(x, shift, scale, self.eps)


class GatedResidualLayerNormModulate(_NormModulateBase):
    """h = x + gate·y, out = LN(h)·(1 + scale) + shift: one sub-block's residual add and the next one's norm.

    forward(x (B, T, D), y (B, T, D), gate (B, D), shift (B, D), scale (B, D)) -> (h, out), both (B, T, D).
    """

    def forward(self, x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        self._check_width(x)
        return gated_residual_layernorm_modulate(x, y, gate, shift, scale, self.eps)


class _RMSNormModulateBase(_NormModulateBase):
    def __init__(self, hidden_size: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__(hidden_size, eps)
        if not isinstance(elementwise_affine, bool):
            raise TypeError(f"{type(self).__name__}: elementwise_affine must be a bool, got {elementwise_affine!r}")
        self.weight = nn.Parameter(torch.ones(hidden_size)) if elementwise_affine else None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, elementwise_affine={self.weight is not None}"


class RMSNormModulate(_RMSNormModulateBase):
    """RMSNorm(x)·weight·(1 + scale) + shift (JiT's `modulate(norm1(x), shift, scale)`).

    forward(x (B, T, D), shift (B, D), scale (B, D)) -> (B, T, D). Parameter: weight (D,) unless
    elementwise_affine=False.
    """

    def forward(self, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        self._check_width(x)
        return rmsnorm_modulate(x, shift, scale, self.weight, self.eps)


class GatedResidualRMSNormModulate(_RMSNormModulateBase):
    """h = x + gate·y, out = RMSNorm(h)·weight·(1 + scale) + shift: one sub-block's residual add and the next one's
    norm.

    forward(x (B, T, D), y (B, T, D), gate (B, D), shift (B, D), scale (B, D)) -> (h, out), both (B, T, D).
    """

    def forward(self, x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        self._check_width(x)
        return gated_residual_rmsnorm_modulate(x, y, gate, shift, scale, self.weight, self.eps)
