"""Attention dispatch for DiT self-attention: cuDNN / flash / memory-efficient / math SDPA, FlashAttention-2/3 and
xformers when installed, chosen per device with readable reasons (`explain_attention`).

Files: `base` (the call signature and the backend interface), `sdpa` (torch's kernels), `external` (optional
packages), `dispatch` (priority lists, overrides, caching, `attention`).
"""
from .base import AttentionBackend, AttentionSignature
from .dispatch import (
    ATTENTION_BACKENDS,
    BACKEND_NAMES,
    ENV_VAR,
    attention,
    attention_priority,
    clear_attention_cache,
    explain_attention,
    force_attention_backend,
    select_attention_backend,
)

__all__ = [
    "ATTENTION_BACKENDS",
    "BACKEND_NAMES",
    "ENV_VAR",
    "AttentionBackend",
    "AttentionSignature",
    "attention",
    "attention_priority",
    "clear_attention_cache",
    "explain_attention",
    "force_attention_backend",
    "select_attention_backend",
]
