"""What SiT (`sit.py`) and JiT (`jit.py`) share: adaLN-Zero's modulation and gated residual, and the argument check
of their constructors. Both model files import this one and neither imports the other (the zoo, `zoo.py`, sits
above both)."""
import numbers

import torch


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of normalized tokens: x (B, T, D), shift/scale (B, D) -> x * (1 + scale) + shift."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """adaLN-Zero residual: x, y (B, T, D), gate (B, D) -> x + gate * y (the gate is zero at init)."""
    return x + gate.unsqueeze(1) * y


def check_positive_int(arg: str, value) -> None:
    """TypeError unless `value` is an int (not a bool), ValueError unless it is >= 1; both name `arg`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{arg} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{arg} must be >= 1, got {value}")
