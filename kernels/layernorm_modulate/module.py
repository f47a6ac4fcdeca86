"""Drop-in modules for DiT/SiT blocks: `modulate(norm(x), shift, scale)` and its fusion with the gated residual."""
from torch import Tensor, nn

from .op import gated_residual_layernorm_modulate, layernorm_modulate


def _check_hidden_size(cls: str, hidden_size: int, eps: float) -> None:
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size <= 0:
        raise ValueError(f"{cls}: hidden_size must be a positive int, got {hidden_size!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"{cls}: eps must be a positive number, got {eps!r}")


def _check_width(cls: str, x: Tensor, hidden_size: int) -> None:
    if x.shape[-1] != hidden_size:
        raise ValueError(f"{cls}: x has {x.shape[-1]} features, the module was built for hidden_size={hidden_size}")


class LayerNormModulate(nn.Module):
    """LN(x)·(1 + scale) + shift with a LayerNorm without affine (DiT's `modulate(norm1(x), shift, scale)`).

    forward(x (B, T, D), shift (B, D), scale (B, D)) -> (B, T, D). No parameters.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        _check_hidden_size(type(self).__name__, hidden_size, eps)
        self.hidden_size = hidden_size
        self.eps = float(eps)

    def forward(self, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        _check_width(type(self).__name__, x, self.hidden_size)
        return layernorm_modulate(x, shift, scale, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class GatedResidualLayerNormModulate(nn.Module):
    """h = x + gate·y, out = LN(h)·(1 + scale) + shift: one sub-block's residual add and the next one's norm.

    forward(x (B, T, D), y (B, T, D), gate (B, D), shift (B, D), scale (B, D)) -> (h, out), both (B, T, D).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        _check_hidden_size(type(self).__name__, hidden_size, eps)
        self.hidden_size = hidden_size
        self.eps = float(eps)

    def forward(self, x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        _check_width(type(self).__name__, x, self.hidden_size)
        return gated_residual_layernorm_modulate(x, y, gate, shift, scale, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
