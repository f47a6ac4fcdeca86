"""Attention kernels from optional packages: FlashAttention-3 (`flash_attn_interface`), FlashAttention-2
(`flash_attn`) and xformers. None of them is needed; each is used only when installed and working.

They take (B, T, H, D) tensors: the (B, H, T, D) inputs are passed as transposed views (no copies; a DiT's q, k, v
are views of its qkv projection laid out (B, T, 3, H, D), so the transposed views are dense in the last dim), and
the (B, T, H, D) output is returned as a transposed view.

xformers wheels are built against one torch version: with another, `import xformers.ops` succeeds with a warning
and the kernels fail at their first call. So xformers is only trusted after a small probe call on the same device,
dtype and head dim (forward, and backward when gradients are needed) agrees with torch's math; the failure or
mismatch is the reason shown.
"""
import functools
import importlib
import warnings
from typing import Optional

import torch
from torch import Tensor

from .base import AttentionBackend, AttentionSignature

_HALF = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def import_optional(module: str):
    """(module, None) or (None, reason); warnings raised while importing are kept in the reason."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            mod = importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 - any import failure (ABI, missing CUDA libs) means "unusable"
            return None, f"`import {module}` failed: {type(error).__name__}: {_first_line(error)}"
    if caught and module.startswith("xformers"):
        mod.__coredi_import_warnings__ = [_first_line(w.message) for w in caught]
    return mod, None


def _first_line(message) -> str:
    text = str(message).strip()
    return text.splitlines()[0] if text else ""


def _bthd(t: Tensor) -> Tensor:
    return t.transpose(1, 2)


class FlashAttn3(AttentionBackend):
    name = "flash_attn_3"
    summary = "FlashAttention-3 (flash_attn_interface, Hopper only)"
    package = "flash_attn_interface"
    install_hint = " (FlashAttention-3: build flash-attention's hopper/ directory)"
    min_capability = (9, 0)
    max_capability = (9, 0)
    max_head_dim = 256
    head_dim_multiple = 8

    def runtime_reasons(self, sig: AttentionSignature) -> list[str]:
        module, reason = import_optional("flash_attn_interface")
        if reason:
            return [reason]
        return [] if hasattr(module, "flash_attn_func") else ["flash_attn_interface has no flash_attn_func"]

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]) -> Tensor:
        module, _ = import_optional("flash_attn_interface")
        out = module.flash_attn_func(_bthd(q), _bthd(k), _bthd(v), softmax_scale=scale, causal=False)
        if isinstance(out, tuple):  # some FA3 releases also return the log-sum-exp
            out = out[0]
        return _bthd(out)


class FlashAttn2(AttentionBackend):
    name = "flash_attn_2"
    summary = "FlashAttention-2 (flash_attn package)"
    package = "flash_attn"
    install_hint = " (pip install flash-attn --no-build-isolation; builds from source)"
    min_capability = (8, 0)
    max_head_dim = 256

    def extra_reasons(self, sig: AttentionSignature) -> list[str]:
        consumer = sig.capability is not None and ((8, 6) <= sig.capability <= (8, 9) or sig.capability[0] == 12)
        if consumer and sig.requires_grad and sig.head_dim > 192:
            return ["its backward pass supports head dim <= 192 on sm86-sm89/sm12x GPUs"]
        return []

    def runtime_reasons(self, sig: AttentionSignature) -> list[str]:
        module, reason = import_optional("flash_attn")
        if reason:
            return [reason]
        version = getattr(module, "__version__", "0")
        if not version.startswith("2."):
            return [f"flash_attn {version} is installed; this backend needs 2.x"]
        return []

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]) -> Tensor:
        module, _ = import_optional("flash_attn")
        out = module.flash_attn_func(_bthd(q), _bthd(k), _bthd(v), dropout_p=0.0, softmax_scale=scale, causal=False)
        return _bthd(out)


class Xformers(AttentionBackend):
    name = "xformers"
    summary = "xformers memory_efficient_attention"
    package = "xformers"
    dtypes = {"cuda": (torch.float16, torch.bfloat16, torch.float32)}
    min_capability = (7, 0)
    head_dim_multiple = 8
    needs_equal_head_dims = False

    def extra_reasons(self, sig: AttentionSignature) -> list[str]:
        if sig.dtype == torch.bfloat16 and sig.capability is not None and sig.capability < (8, 0):
            return ["bfloat16 needs sm80+"]
        return []

    def runtime_reasons(self, sig: AttentionSignature) -> list[str]:
        module, reason = import_optional("xformers.ops")
        if reason:
            return [reason]
        failure = probe_xformers(sig.device, sig.dtype, sig.head_dim, sig.head_dim_v, sig.requires_grad)
        if failure is None:
            return []
        built_for = getattr(module, "__coredi_import_warnings__", None)
        return [failure] + ([f"xformers warned at import: {built_for[0]}"] if built_for else [])

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]) -> Tensor:
        module, _ = import_optional("xformers.ops")
        return _bthd(module.memory_efficient_attention(_bthd(q), _bthd(k), _bthd(v), scale=scale))


@functools.lru_cache(maxsize=None)
def probe_xformers(device, dtype, head_dim: int, head_dim_v: int, backward: bool) -> Optional[str]:
    """Run xformers once on a tiny problem; None if it works and matches torch's math, else why not."""
    module, _ = import_optional("xformers.ops")
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype).requires_grad_(backward)

    q, k, v = rand(2, 5, 2, head_dim), rand(2, 7, 2, head_dim), rand(2, 7, 2, head_dim_v)  # (B, T, H, D)
    try:
        out = module.memory_efficient_attention(q, k, v)
        if backward:
            out.float().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as error:  # noqa: BLE001 - a broken build fails in many ways; all mean "do not use"
        return f"xformers is installed but its kernel fails here: {type(error).__name__}: {_first_line(error)}"
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * head_dim**-0.5
    expected = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double())
    error = (out.double() - expected).abs().max().item()
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    if not error <= tolerance:
        return f"xformers runs but its result is off by {error:.3g} (tolerance {tolerance}) on a probe"
    return None
