"""Fused qk-norm + RoPE for JiT-style attention: per-head RMSNorm of q and k, then 2D rotary embedding, read from
the packed qkv projection in one pass and written in the layout attention takes.

Ladder: `_kernels` (one forward and one backward Triton kernel and their launchers) -> `op` (torch.library ops
`coredi::qk_norm_rope_*`, autograd, backend dispatch, functional API) -> `module` (a drop-in nn.Module).
`reference` holds the pure-PyTorch math (the oracle and the CPU backend).
"""
from .module import QKNormRoPE
from .op import _kernels, qk_norm_rope  # noqa: F401 (_kernels: the launchers, for tests and benchmarks)

__all__ = ["QKNormRoPE", "qk_norm_rope"]
