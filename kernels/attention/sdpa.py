"""torch's own attention kernels, each forced through `torch.nn.attention.sdpa_kernel([SDPBackend.X])`.

The declared limits follow torch's `sdp_utils.cpp` (flash: sm80+, fp16/bf16, head dim <= 256; memory-efficient:
sm50+, head dim a multiple of the GEMM alignment, 16-byte aligned storage; cuDNN: sm80+, fp16/bf16, head dim a
multiple of 8, <= 256 on sm90/sm100 with a recent cuDNN and <= 128 elsewhere). Where torch exposes its checks
(`torch.backends.cuda.can_use_*_attention`), their verdict is final; its reasons are printed by C++ on stderr, so
they are captured from there. Every check also honours torch's global switches (`torch.backends.cuda.enable_*_sdp`,
an enclosing `sdpa_kernel` context, deterministic mode), which the dispatcher includes in its cache key.

`sdpa_kernel` is traced by torch.compile (the backend is fixed in the graph), so these backends work under
`torch.compile(fullgraph=True)`.
"""
import os
import re
import sys
import tempfile
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .base import AttentionBackend, AttentionSignature

_HALF = (torch.float16, torch.bfloat16)
_CPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_ALL_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def sdpa_switches() -> tuple:
    """torch's global SDPA state that changes which kernels may run (part of the dispatcher's cache key)."""
    cuda = torch.backends.cuda
    return (
        cuda.flash_sdp_enabled(),
        cuda.mem_efficient_sdp_enabled(),
        getattr(cuda, "cudnn_sdp_enabled", lambda: True)(),
        cuda.math_sdp_enabled(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )


def _probe_tensors(sig: AttentionSignature) -> tuple[Tensor, Tensor, Tensor]:
    """Stand-ins with the call's shapes, dtype, device and grad flag that allocate one row each (expanded views)."""

    def probe(seq, dim):
        row = torch.empty(dim, dtype=sig.dtype, device=sig.device, requires_grad=sig.requires_grad)
        return row.expand(sig.batch, sig.heads, seq, dim)

    return probe(sig.seq_q, sig.head_dim), probe(sig.seq_k, sig.head_dim), probe(sig.seq_k, sig.head_dim_v)


def _sdpa_params(q: Tensor, k: Tensor, v: Tensor):
    params = torch.backends.cuda.SDPAParams
    try:
        return params(q, k, v, None, 0.0, False, False)  # (..., attn_mask, dropout, is_causal, enable_gqa)
    except TypeError:  # torch < 2.5 has no enable_gqa argument
        return params(q, k, v, None, 0.0, False)


_NATIVE_WARNING = re.compile(r"Warning:\s*(.*?)(?:\s*\(function \w+\))?\s*$")


def capture_native_warnings(fn: Callable[[], object]) -> list[str]:
    """Run fn and return the warnings that C++ (TORCH_WARN) printed on the process's stderr meanwhile.

    torch's `can_use_*_attention(params, debug=True)` explains itself only there. The redirect lasts for one call
    and only happens when a backend is rejected (once per kind of call; the result is cached).
    """
    messages: list[str] = []
    sys.stderr.flush()
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings(record=True) as python_warnings:
        warnings.simplefilter("always")
        saved = os.dup(2)
        try:
            os.dup2(sink.fileno(), 2)
            fn()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        sink.seek(0)
        for line in sink.read().decode(errors="replace").splitlines():
            match = _NATIVE_WARNING.search(line)
            if match:
                messages.append(match.group(1))
            elif line.strip():
                print(line, file=sys.stderr)  # not ours: give it back
        messages += [str(w.message) for w in python_warnings]
    return messages


def torch_verdict(check: str, sig: AttentionSignature) -> list[str]:
    """torch's `torch.backends.cuda.<check>` on stand-in tensors: [] if it accepts, else its reasons."""
    fn = getattr(torch.backends.cuda, check, None)
    if fn is None or not hasattr(torch.backends.cuda, "SDPAParams"):
        return []  # older torch: the declared checks are all we have
    q, k, v = _probe_tensors(sig)
    with torch.set_grad_enabled(sig.requires_grad):
        params = _sdpa_params(q, k, v)
        if fn(params, False):
            return []
        reasons = capture_native_warnings(lambda: fn(params, True))
    return reasons or [f"torch.backends.cuda.{check}() returned False"]


def _switch_reason(enabled: bool, what: str, switch: str) -> list[str]:
    if enabled:
        return []
    return [f"{what} is switched off (torch.backends.cuda.{switch}(False) or an enclosing sdpa_kernel context)"]


class _SdpaBackend(AttentionBackend):
    sdp_backend: SDPBackend

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]) -> Tensor:
        with sdpa_kernel([self.sdp_backend]):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)


class SdpaCudnn(_SdpaBackend):
    name = "sdpa_cudnn"
    summary = "torch SDPA, cuDNN kernel (fastest at head dim 72 on H100)"
    sdp_backend = getattr(SDPBackend, "CUDNN_ATTENTION", None)
    min_capability = (8, 0)
    max_head_dim = 256  # 128 unless sm90/sm100 with cuDNN > 9.22: torch's verdict has the exact limit
    head_dim_multiple = 8

    def extra_reasons(self, sig: AttentionSignature) -> list[str]:
        found = []
        if self.sdp_backend is None:
            found.append("this torch has no cuDNN SDPA backend")
        if max(sig.batch, sig.heads) > 65535:
            found.append(f"batch ({sig.batch}) and heads ({sig.heads}) must be <= 65535")
        if sig.seq_k == 1:
            found.append("key/value sequence length 1 is not supported")
        if torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled():
            found.append("cuDNN SDPA is not deterministic and torch.use_deterministic_algorithms(True) is on")
        return found

    def runtime_reasons(self, sig: AttentionSignature) -> list[str]:
        cudnn_on = getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: True)()
        return _switch_reason(cudnn_on, "cuDNN SDPA", "enable_cudnn_sdp") or torch_verdict(
            "can_use_cudnn_attention", sig
        )


class SdpaFlash(_SdpaBackend):
    name = "sdpa_flash"
    summary = "torch SDPA, FlashAttention-2 kernel (CUDA) / flash kernel (CPU)"
    sdp_backend = SDPBackend.FLASH_ATTENTION
    device_types = ("cuda", "cpu")
    dtypes = {"cuda": _HALF, "cpu": _CPU_DTYPES}

    def extra_reasons(self, sig: AttentionSignature) -> list[str]:
        if sig.device.type != "cuda":
            return []
        found = []
        if sig.capability is not None and not (8, 0) <= sig.capability <= (12, 1):
            found.append(f"needs a GPU in sm80..sm121, this GPU is sm{sig.capability[0]}{sig.capability[1]}")
        if max(sig.head_dim, sig.head_dim_v) > 256:
            found.append(f"head dim {max(sig.head_dim, sig.head_dim_v)} > 256")
        consumer = sig.capability is not None and ((8, 6) <= sig.capability <= (8, 9) or sig.capability[0] == 12)
        if consumer and sig.requires_grad and 192 < sig.head_dim <= 224:
            found.append("the backward pass does not support head dims in (192, 224] on sm86-sm89/sm12x")
        return found

    def runtime_reasons(self, sig: AttentionSignature) -> list[str]:
        switched = _switch_reason(torch.backends.cuda.flash_sdp_enabled(), "flash SDPA", "enable_flash_sdp")
        if switched or sig.device.type != "cuda":
            return switched
        return torch_verdict("can_use_flash_attention", sig)


class SdpaEfficient(_SdpaBackend):
    name = "sdpa_efficient"
    summary = "torch SDPA, memory-efficient (CUTLASS) kernel"
    sdp_backend = SDPBackend.EFFICIENT_ATTENTION
    dtypes = {"cuda": (torch.float16, torch.bfloat16, torch.float32)}
    min_capability = (5, 0)
    needs_equal_head_dims = False

    def extra_reasons(self, sig: AttentionSignature) -> list[str]:
        found = []
        tensor_cores = sig.capability is None or sig.capability >= (8, 0)
        if sig.dtype == torch.bfloat16 and not tensor_cores:
            found.append("bfloat16 needs sm80+")
        # The CUTLASS kernels load whole 128-bit vectors: 8 half values or 4 fp32 values (sm80+).
        alignment = 8 if sig.dtype in _HALF else (4 if tensor_cores else 1)
        if sig.head_dim % alignment or sig.head_dim_v % alignment:
            found.append(f"head dims must be multiples of {alignment} for {str(sig.dtype).removeprefix('torch.')}")
        if not sig.aligned:
            found.append("q, k, v storage offsets must be 16-byte aligned")
        return found

    def runtime_reasons(self, sig: AttentionSignature) -> list[str]:
        on = torch.backends.cuda.mem_efficient_sdp_enabled()
        return _switch_reason(on, "memory-efficient SDPA", "enable_mem_efficient_sdp") or torch_verdict(
            "can_use_efficient_attention", sig
        )


class SdpaMath(_SdpaBackend):
    name = "sdpa_math"
    summary = "torch SDPA, math reference (any device; materializes the T x T scores)"
    sdp_backend = SDPBackend.MATH
    device_types = ("cuda", "cpu", "mps", "xpu", "meta")
    dtypes = {device: _ALL_FLOATS for device in device_types}
    needs_contiguous_last_dim = False
    needs_equal_head_dims = False

    def runtime_reasons(self, sig: AttentionSignature) -> list[str]:
        return _switch_reason(torch.backends.cuda.math_sdp_enabled(), "math SDPA", "enable_math_sdp")
