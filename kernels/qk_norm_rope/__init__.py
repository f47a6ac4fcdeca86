"""Fused qk-norm + RoPE for JiT-style attention: per-head RMSNorm of q and k, then 2D rotary embedding, read from
the packed qkv projection in one pass and written in the layout attention takes (`qk_layernorm_rope`: the same with
a per-head LayerNorm, the qk-norm of timm/REPA/LightningDiT's LayerNorm models).

Ladder: `_kernels` (one forward and one backward Triton kernel and their launchers) -> `op` (torch.library ops
`coredi::qk_norm_rope_*`, autograd, backend dispatch, functional API) -> `module` (a drop-in nn.Module).
`reference` holds the pure-PyTorch math (the oracle and the CPU backend).
"""
from .module import QKNormRoPE
from .op import _kernels, qk_layernorm_rope, qk_norm_rope  # noqa: F401 (_kernels: the launchers, for tests)

__all__ = ["QKNormRoPE", "qk_layernorm_rope", "qk_norm_rope"]
