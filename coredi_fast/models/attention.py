"""Multi-head self-attention of SiT/DiT blocks, with timm's parameter names (`qkv`, `proj`, `q_norm`, `k_norm`).

Every attention product in the models goes through the single function `dot_product_attention(q, k, v)` below,
which runs `coredi_kernels.attention`: the fastest kernel the device has (cuDNN SDPA on H100, FlashAttention-2 on
other GPUs, torch's flash kernel on CPU), overridable with $COREDI_ATTENTION_BACKEND or
`coredi_kernels.attention.force_attention_backend(name)`; `explain_attention(q, k, v)` says what runs and why.
"""
import torch
import torch.nn as nn

from coredi_kernels.attention import attention


def dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention, no mask, no dropout, scale 1/sqrt(head_dim): (B, H, T, Dh) x3 -> (B, H, T, Dh)."""
    return attention(q, k, v)


class Attention(nn.Module):
    """Self-attention over tokens (B, T, D) -> (B, T, D), the same computation and parameters as timm's
    `Attention(dim, num_heads, qkv_bias=True[, qk_norm=True, norm_layer=nn.LayerNorm])` that public SiT uses.

    qk_norm: LayerNorm (affine, eps 1e-5) over each head's queries and keys, as REPA's `--qk-norm` option builds it.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim)  # (B, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                    # 3 x (B, H, T, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        x = dot_product_attention(q, k, v)                                # (B, H, T, Dh)
        x = x.transpose(1, 2).reshape(B, T, D)                            # (B, T, D)
        return self.proj(x)
