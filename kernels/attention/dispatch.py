"""Attention dispatch: run the first backend of the device's priority list that has no reason not to run.

    out = attention(q, k, v)                      # (B, H, T, D) -> (B, H, T, D), non-causal, no mask
    print(explain_attention(q, k, v))             # every backend, and why it was or was not chosen

Which backend is asked for, first match wins:
    1. the argument `backend=` of `attention`;
    2. the innermost `force_attention_backend(name)` context;
    3. the environment variable COREDI_ATTENTION_BACKEND;
    4. "auto": the priority list of the device (`attention_priority`).
A forced backend that cannot run raises a ValueError listing its reasons; "auto" never fails (sdpa_math runs
anything torch can).

The choice is cached per kind of call (device, dtype, shapes, layout flags, grad, the request and torch's global
SDPA switches), so a call costs one dictionary lookup on top of the kernel. Under torch.compile the choice runs at
trace time (`assume_constant_result`) and the chosen kernel is baked into the graph: changing the request or the
environment later does not recompile a graph that is already compiled.
"""
import contextlib
import os
from collections.abc import Iterator
from typing import Optional

import torch
from torch import Tensor

from .base import AttentionBackend, AttentionSignature, call_key, is_installed
from .external import FlashAttn2, FlashAttn3, Xformers, import_optional, probe_xformers
from .sdpa import SdpaCudnn, SdpaEfficient, SdpaFlash, SdpaMath, sdpa_switches

ENV_VAR = "COREDI_ATTENTION_BACKEND"

ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    backend.name: backend
    for backend in (SdpaCudnn(), FlashAttn3(), FlashAttn2(), SdpaFlash(), SdpaEfficient(), Xformers(), SdpaMath())
}
BACKEND_NAMES = tuple(ATTENTION_BACKENDS)

_HOPPER = ("sdpa_cudnn", "flash_attn_3", "flash_attn_2", "sdpa_flash", "sdpa_efficient", "xformers", "sdpa_math")
# Elsewhere (Ampere, Ada, Blackwell) cuDNN SDPA measured slower than FlashAttention-2 (perf_anchors.md section 2).
_OTHER_CUDA = ("flash_attn_2", "sdpa_flash", "sdpa_cudnn", "flash_attn_3", "sdpa_efficient", "xformers", "sdpa_math")


def attention_priority(device_type: str, capability: Optional[tuple[int, int]] = None) -> tuple[str, ...]:
    """The order in which "auto" tries the backends on a device type (and CUDA compute capability)."""
    if device_type == "cuda":
        return _HOPPER if capability is not None and tuple(capability)[0] == 9 else _OTHER_CUDA
    if device_type == "cpu":
        return ("sdpa_flash", "sdpa_math")
    return ("sdpa_math",)


# ---------------------------------------------------------------------------------------------------------------
# What is requested
# ---------------------------------------------------------------------------------------------------------------

_forced: list[str] = []  # a stack, so force_attention_backend nests; process-wide like coredi_kernels.backend


def _check_name(name, source: str) -> str:
    if not isinstance(name, str) or name not in BACKEND_NAMES + ("auto",):
        raise ValueError(f"{source} must be 'auto' or one of {', '.join(BACKEND_NAMES)}; got {name!r}")
    return name


@contextlib.contextmanager
def force_attention_backend(name: str) -> Iterator[None]:
    """Run every `attention` call inside the block on backend `name` (or 'auto'); nests."""
    _forced.append(_check_name(name, "force_attention_backend(name)"))
    try:
        yield
    finally:
        _forced.pop()


def _requested(backend: Optional[str], forced: Optional[str]) -> str:
    if backend is not None:
        return _check_name(backend, "attention(backend=...)")
    if forced is not None:
        return forced
    env = os.environ.get(ENV_VAR, "").strip().lower()
    return _check_name(env, f"${ENV_VAR}") if env else "auto"


# ---------------------------------------------------------------------------------------------------------------
# Choosing
# ---------------------------------------------------------------------------------------------------------------


def backend_reasons(sig: AttentionSignature) -> dict[str, list[str]]:
    """Every backend's reasons not to run a call with signature `sig` ([] = it can)."""
    return {name: backend.reasons(sig) for name, backend in ATTENTION_BACKENDS.items()}


def choose(sig: AttentionSignature, requested: str) -> tuple[Optional[str], str]:
    """(backend name, "") or (None, error message) for a call with signature `sig`."""
    if requested != "auto":
        reasons = ATTENTION_BACKENDS[requested].reasons(sig)
        if not reasons:
            return requested, ""
        return None, (
            f"attention backend {requested!r} was forced but cannot run {sig.describe()}: " + "; ".join(reasons)
            + f". Use 'auto' or another backend; explain_attention(q, k, v) lists them all."
        )
    for name in attention_priority(sig.device.type, sig.capability):
        if not ATTENTION_BACKENDS[name].reasons(sig):
            return name, ""
    return None, f"no attention backend can run {sig.describe()}:\n{explain(sig, requested)}"


_cache: dict[tuple, tuple[Optional[str], str]] = {}
_MAX_CACHE = 4096


@torch.compiler.assume_constant_result
def _chosen_backend(key: tuple, backend: Optional[str], forced: Optional[str]) -> str:
    """The cached choice for a call summarized by `key` (plain Python: runs at trace time under torch.compile)."""
    requested = _requested(backend, forced)
    cache_key = (key, requested, sdpa_switches())
    found = _cache.get(cache_key)
    if found is None:
        if len(_cache) >= _MAX_CACHE:
            _cache.clear()
        found = _cache[cache_key] = choose(AttentionSignature.from_key(key), requested)
    name, error = found
    if name is None:
        raise ValueError(error)
    return name


def clear_attention_cache() -> None:
    """Forget cached choices, package lookups, imports and probes (e.g. after installing flash-attn or xformers)."""
    _cache.clear()
    is_installed.cache_clear()
    import_optional.cache_clear()
    probe_xformers.cache_clear()


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


def _check_qkv(q, k, v) -> None:
    for arg, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"attention: {arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {arg} must be 4-D (B, H, T, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"attention: {arg} must be floating point, got {t.dtype}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"attention: {arg} is {t.dtype} on {t.device}, q is {q.dtype} on {q.device}")
    B, H, _, D = q.shape
    if tuple(k.shape[:2]) != (B, H) or k.shape[3] != D:
        raise ValueError(f"attention: k must be (B, H, Tk, D) = ({B}, {H}, Tk, {D}) like q, got {tuple(k.shape)}")
    if tuple(v.shape[:3]) != tuple(k.shape[:3]):
        raise ValueError(f"attention: v must be (B, H, Tk, Dv) with k's (B, H, Tk) = {tuple(k.shape[:3])}, "
                         f"got {tuple(v.shape)}")
    if min(q.shape[2], k.shape[2], D) == 0:
        raise ValueError(f"attention: empty sequence or head dim: q {tuple(q.shape)}, k {tuple(k.shape)}")


def attention(
    q: Tensor, k: Tensor, v: Tensor, *, backend: Optional[str] = None, scale: Optional[float] = None
) -> Tensor:
    """softmax(q kᵀ · scale) v over the last two dims: DiT self-attention (non-causal, no mask, no dropout).

    Args:
        q: (B, H, Tq, D); k: (B, H, Tk, D); v: (B, H, Tk, Dv); same dtype and device. Any strides (views of a
            packed qkv projection are fine); kernels that need stride 1 in the last dim are skipped otherwise.
        backend: one of `BACKEND_NAMES` to force, or "auto"; None defers to `force_attention_backend`, then
            $COREDI_ATTENTION_BACKEND, then "auto".
        scale: the softmax scale; None means 1/sqrt(D).
    Returns:
        (B, H, Tq, Dv) in q's dtype (possibly a transposed view of a (B, Tq, H, Dv) buffer).
    """
    _check_qkv(q, k, v)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"attention: scale must be a float or None, got {scale!r}")
    name = _chosen_backend(call_key(q, k, v), backend, _forced[-1] if _forced else None)
    return ATTENTION_BACKENDS[name](q, k, v, None if scale is None else float(scale))


def select_attention_backend(
    q: Tensor, k: Tensor, v: Tensor, *, backend: Optional[str] = None,
    device_capability: Optional[tuple[int, int]] = None,
) -> str:
    """The name of the backend `attention(q, k, v, backend=backend)` runs (not cached: recomputed each time).

    device_capability: pretend the CUDA device has this (major, minor) compute capability.
    Raises ValueError when a forced backend cannot run.
    """
    _check_qkv(q, k, v)
    sig = AttentionSignature.of(q, k, v, device_capability)
    name, error = choose(sig, _requested(backend, _forced[-1] if _forced else None))
    if name is None:
        raise ValueError(error)
    return name


def explain(sig: AttentionSignature, requested: str) -> str:
    """A table of every backend for a call: rank in the priority list, status, reasons."""
    priority = attention_priority(sig.device.type, sig.capability)
    reasons = backend_reasons(sig)
    if requested == "auto":
        chosen = next((name for name in priority if not reasons[name]), None)
    else:
        chosen = requested if not reasons[requested] else None
    order = list(priority) + [name for name in BACKEND_NAMES if name not in priority]
    rows = []
    for name in order:
        rank = str(priority.index(name) + 1) if name in priority else "-"
        if name == chosen:
            status, why = "CHOSEN", ATTENTION_BACKENDS[name].summary
        elif reasons[name]:
            status, why = "unsupported", "; ".join(reasons[name])
        elif requested != "auto":
            status, why = "usable", f"not chosen: {requested!r} was forced"
        elif name in priority:
            status, why = "usable", "not chosen: a backend ranked higher was"
        else:
            status, why = "usable", f"not in the priority list for {sig.device.type}"
        rows.append((rank, name, status, why))
    width = max(len(name) for name in BACKEND_NAMES)
    lines = [f"attention for {sig.describe()}; requested: {requested}",
             f"  {'#':>2}  {'backend':<{width}}  {'status':<11}  details"]
    lines += [f"  {rank:>2}  {name:<{width}}  {status:<11}  {why}" for rank, name, status, why in rows]
    if chosen is None and requested != "auto":
        lines.append(f"  forced backend {requested!r} cannot run: attention() raises ValueError")
    return "\n".join(lines)


def explain_attention(
    q: Tensor, k: Tensor, v: Tensor, *, backend: Optional[str] = None,
    device_capability: Optional[tuple[int, int]] = None,
) -> str:
    """A readable table of every attention backend for attention(q, k, v): which one runs and why the others don't.

    backend: explain a forced request instead of the current one. device_capability: as in
    `select_attention_backend`.
    """
    _check_qkv(q, k, v)
    sig = AttentionSignature.of(q, k, v, device_capability)
    return explain(sig, _requested(backend, _forced[-1] if _forced else None))
