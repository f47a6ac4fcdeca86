"""What Nsight Systems / Nsight Compute see of a training step: NVTX ranges and a profiling window.

    with nvtx_range("backward"):                 # a context manager ...
        loss.backward()

    @nvtx_range("optimizer")                     # ... or a decorator
    def step(): ...

    annotate_module(model, "denoiser", methods=("forward", "forward_tokens"))   # a range around these calls

    window = ProfilerWindow.parse("100:110", device)    # run.profile_steps: steps [100, 110)
    window.before_step(step)  ... train step ...  window.after_step(step + 1)

The training loop's ranges (docs/profiling.md explains each and gives the nsys / ncu commands):

    step                         one optimizer step, everything below
      data                       next(loader): waiting for the batch
      encoder                    the frozen DINOv2 forward (no grad)
      forward                    the objective: projector, joint embedding, noise, loss
        denoiser                 the SiT/DiT forward
      backward                   loss.backward() (autograd runs CUDA backward kernels on its own thread)
      optimizer                  clipping, AdamW (with the fused EMA, the EMA update too), zero_grad
      ema                        the separate fp32 EMA update (empty with optim.fused_ema)

Ranges are pushed only when CUDA is available (torch.cuda.nvtx), and never inside a torch.compile trace; otherwise
entering one costs a flag check. `set_nvtx_enabled` overrides the choice (tests), as does COREDI_NVTX=0|1.
The window calls torch.cuda.profiler.start()/stop() (cudaProfilerStart/Stop) around whole steps, with a device
synchronize on each side, for `nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop`.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from typing import Optional

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

_enabled: Optional[bool] = None   # decided at first use
_pushed = threading.local()       # per thread: a stack of "did __enter__ push?" flags


def nvtx_enabled() -> bool:
    """Whether ranges are pushed: COREDI_NVTX if set, else torch.cuda.is_available() (decided once)."""
    global _enabled
    if _enabled is None:
        env = os.environ.get("COREDI_NVTX", "").strip()
        _enabled = env == "1" if env in ("0", "1") else torch.cuda.is_available()
    return _enabled


def set_nvtx_enabled(enabled: Optional[bool]) -> None:
    """Force ranges on/off (None: decide again from the environment at next use)."""
    global _enabled
    _enabled = enabled


class nvtx_range(contextlib.ContextDecorator):
    """An NVTX push/pop range named `name` around a block or a function; a no-op without CUDA."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        if not isinstance(name, str) or not name:
            raise ValueError(f"nvtx_range needs a non-empty name, got {name!r}")
        self.name = name

    def __enter__(self):
        push = nvtx_enabled() and not torch.compiler.is_compiling()
        stack = getattr(_pushed, "stack", None)
        if stack is None:
            stack = _pushed.stack = []
        stack.append(push)  # the matching __exit__ pops only what this __enter__ pushed
        if push:
            torch.cuda.nvtx.range_push(self.name)
        return self

    def __exit__(self, *exc) -> bool:
        if _pushed.stack.pop():
            torch.cuda.nvtx.range_pop()
        return False


def _call_in_range(name: str, method, *args, **kwargs):
    with nvtx_range(name):
        return method(*args, **kwargs)


class ModuleAnnotation:
    """Handle returned by `annotate_module`; `remove()` restores the methods."""

    def __init__(self, module: nn.Module, previous: dict):
        self.module, self.previous = module, previous

    def remove(self) -> None:
        for method, value in self.previous.items():
            if value is None:
                self.module.__dict__.pop(method, None)
            else:
                self.module.__dict__[method] = value


def annotate_module(module: nn.Module, name: str, methods=("forward",)) -> ModuleAnnotation:
    """Run `module`'s `methods` (called directly or, for forward, through `module(...)`) inside an NVTX range
    `name`. Each method is wrapped on the instance by a `functools.partial` over the bound method, so the module
    still deep-copies and pickles. Not for modules compiled as a whole (the range would sit inside the graph)."""
    previous = {}
    for method in methods:
        previous[method] = module.__dict__.get(method)
        setattr(module, method, functools.partial(_call_in_range, name, getattr(module, method)))
    return ModuleAnnotation(module, previous)


class ProfilerWindow:
    """Calls torch.cuda.profiler.start() before step `start` and stop() after step `stop - 1`: the capture holds
    exactly the steps [start, stop). A run resumed inside the window starts capturing at its first step.
    Inactive (with a log line) when the device is not CUDA."""

    def __init__(self, start: int, stop: int, device: torch.device):
        if not 0 <= start < stop:
            raise ValueError(f"profile window needs 0 <= start < stop, got {start}:{stop}")
        self.start, self.stop = start, stop
        self.device = torch.device(device)
        self.active = self.device.type == "cuda"
        self.capturing = False
        if not self.active:
            logger.info("profile window %d:%d ignored: the device is %s, not CUDA", start, stop, self.device)

    @classmethod
    def parse(cls, text: Optional[str], device: torch.device) -> Optional["ProfilerWindow"]:
        """From run.profile_steps ("A:B") or None."""
        if not text:
            return None
        from .training.config import parse_step_window

        start, stop = parse_step_window(text)
        return cls(start, stop, device)

    def before_step(self, step: int) -> None:
        """Call with the number of steps done so far, before running the next one."""
        if self.active and not self.capturing and self.start <= step < self.stop:
            torch.cuda.synchronize(self.device)  # earlier steps' queued work stays out of the capture
            torch.cuda.profiler.start()
            self.capturing = True

    def after_step(self, steps_done: int) -> None:
        """Call with the number of steps done after the step finished."""
        if self.capturing and steps_done >= self.stop:
            torch.cuda.synchronize(self.device)  # the window's last kernels finish inside the capture
            torch.cuda.profiler.stop()
            self.capturing = False

    def close(self) -> None:
        """Stop a capture still open (the run ended inside the window)."""
        if self.capturing:
            self.after_step(self.stop)
