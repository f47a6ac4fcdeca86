"""Optimizers: `AdamWEMA` (AdamW + fp32 EMA in one pass; native kernels from `csrc/` when built, torch's fused
AdamW + a foreach EMA otherwise), the trainer-facing EMA views over it, and the native extension's loader/builder
(`python -m coredi_fast.optim.native build`).

The names are imported on first use, so that `python -m coredi_fast.optim.native` runs its module once."""
import importlib

_EXPORTS = {
    "AdamWEMA": "adamw_ema", "BACKENDS": "adamw_ema", "resolve_fused_ema": "adamw_ema",
    "OptimizerEMA": "ema_views", "ShardedEMA": "ema_views", "ema_view": "ema_views",
}

__all__ = sorted(_EXPORTS) + ["native"]


def __getattr__(name):
    if name == "native":
        return importlib.import_module(".native", __name__)
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
