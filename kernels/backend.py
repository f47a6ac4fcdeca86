"""Which implementation an op runs: the Triton kernels or the pure-PyTorch math.

One switch for every coredi_kernels op, read at each call (so it also holds inside `torch.compile`d code, where
the ops are opaque custom ops that run this selection when they execute):

* `force_backend("triton" | "torch" | "auto")` — a context manager (tests use it to run both paths);
* else the environment variable `COREDI_KERNELS_BACKEND` = `triton` | `torch` | `auto`;
* else `auto`: Triton for CUDA tensors, PyTorch for anything else (on CPU the PyTorch math is much faster than the
  Triton interpreter).

Forcing `triton` where it cannot run raises an error that lists why; `auto` falls back to PyTorch quietly.
Triton on CPU tensors needs the interpreter (`TRITON_INTERPRET=1` set before triton is imported).

The forced value is process-wide rather than thread-local on purpose: autograd runs CUDA backward passes on its
own threads, and a thread-local setting would send the forward and the backward to different backends.
"""
import contextlib
import os
from collections.abc import Iterable, Iterator

import torch

from ._utils import MAX_TRITON_COLUMNS, TRITON_DTYPES, has_triton, is_interpreter

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "COREDI_KERNELS_BACKEND"

_forced: list[str] = []  # a stack, so force_backend nests


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def requested_backend() -> str:
    """The backend asked for: innermost `force_backend`, else $COREDI_KERNELS_BACKEND, else 'auto'."""
    if _forced:
        return _forced[-1]
    return _check_name(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


@contextlib.contextmanager
def force_backend(name: str) -> Iterator[None]:
    """Run the coredi_kernels ops inside the block with backend `name` ('triton', 'torch' or 'auto')."""
    _forced.append(_check_name(name, "force_backend(name)"))
    try:
        yield
    finally:
        _forced.pop()


def triton_unsupported_reasons(device: torch.device) -> list[str]:
    """Why the Triton kernels cannot run on tensors of `device` (empty list: they can)."""
    if not has_triton():
        return ["the triton package is not installed"]
    if device.type == "cuda":
        return []
    if device.type == "cpu":
        return [] if is_interpreter() else ["CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"]
    return [f"device type {device.type!r} is not supported by the Triton kernels"]


def row_kernel_reasons(kernels_loaded: bool, tensors: Iterable, row_width: int, width_name: str) -> list[str]:
    """A row-wise op's own objections to its Triton kernels (for `select_backend`): kernels that failed to import,
    a tensor whose dtype they lack (None entries are absent arguments), rows too wide for registers."""
    reasons = []
    if not kernels_loaded:
        reasons.append("the Triton kernels could not be imported")
    for t in tensors:
        if t is not None and t.dtype not in TRITON_DTYPES:
            reasons.append(f"dtype {t.dtype} is not one of the kernels' dtypes {TRITON_DTYPES}")
            break
    if row_width > MAX_TRITON_COLUMNS:
        reasons.append(f"{width_name} = {row_width} > {MAX_TRITON_COLUMNS} columns does not fit a row in registers")
    return reasons


def select_backend(op_name: str, device: torch.device, op_reasons: Iterable[str] = ()) -> str:
    """'triton' or 'torch' for one call of `op_name` on `device`.

    `op_reasons` are the op's own objections to these inputs (dtype, size), added to the device's.
    """
    requested = requested_backend()
    if requested == "torch":
        return "torch"
    reasons = triton_unsupported_reasons(device) + list(op_reasons)
    if requested == "triton":
        if reasons:
            raise RuntimeError(f"{op_name}: backend 'triton' was forced but cannot run: " + "; ".join(reasons))
        return "triton"
    return "triton" if device.type == "cuda" and not reasons else "torch"
