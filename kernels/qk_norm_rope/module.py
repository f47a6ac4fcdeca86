"""Drop-in module for JiT's attention prologue: `QKNormRoPE` owns the q and k RMSNorm weights.

A JiT attention's `q_norm.weight` / `k_norm.weight` map onto `q_weight` / `k_weight` one to one (both (Dh,),
initialized to ones like JiT's RMSNorm).
"""
from typing import Optional

import torch
from torch import Tensor, nn

from .op import qk_norm_rope


class QKNormRoPE(nn.Module):
    """q, k, v = RoPE(RMSNorm(q)·q_weight), RoPE(RMSNorm(k)·k_weight), v from the packed qkv projection.

    forward(qkv (B, T, 3, H, Dh), cos (T, Dh/2) or None, sin (T, Dh/2) or None) -> q, k, v, each (B, H, T, Dh).
    Parameters: q_weight, k_weight (Dh,) unless elementwise_affine=False.
    """

    def __init__(self, head_dim: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        cls = type(self).__name__
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
            raise ValueError(f"{cls}: head_dim must be a positive int, got {head_dim!r}")
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
            raise ValueError(f"{cls}: eps must be a positive number, got {eps!r}")
        if not isinstance(elementwise_affine, bool):
            raise TypeError(f"{cls}: elementwise_affine must be a bool, got {elementwise_affine!r}")
        self.head_dim = head_dim
        self.eps = float(eps)
        self.q_weight = nn.Parameter(torch.ones(head_dim)) if elementwise_affine else None
        self.k_weight = nn.Parameter(torch.ones(head_dim)) if elementwise_affine else None

    def forward(
        self, qkv: Tensor, cos: Optional[Tensor] = None, sin: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        if qkv.dim() != 5 or qkv.shape[-1] != self.head_dim:
            raise ValueError(f"{type(self).__name__}: qkv must be (B, T, 3, H, Dh) with Dh = head_dim = "
                             f"{self.head_dim}, got {tuple(qkv.shape)}")
        return qk_norm_rope(qkv, self.q_weight, self.k_weight, cos, sin, self.eps)

    def extra_repr(self) -> str:
        return f"{self.head_dim}, eps={self.eps}, elementwise_affine={self.q_weight is not None}"
