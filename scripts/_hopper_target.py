"""Compile Triton kernels for a Hopper GPU (sm_90a) on a machine that has none: the Triton-internals half of
`hopper_compile_check.py`.

Triton's JIT asks its *active driver* for the target to compile for (`get_current_target()`), plus the current
device and stream, before it compiles; only loading and launching the binary need a real GPU. So:

* `HopperStandInDriver` answers those questions as an H100 would (GPUTarget("cuda", 90, 32), device 0, stream 0)
  and raises `NoGPUError`, naming what was asked, for everything that needs a GPU (loading a module, launching,
  benchmarking, device properties). Triton's real CudaDriver is not used: it builds a helper against libcuda.
* `CompileRecorder` patches `JITFunction.run` so that every launch `kernel[grid](...)` becomes a *warmup* (compile,
  do not launch: `run(..., warmup=True)` returns the CompiledKernel), and `JITFunction._do_compile` so that each
  real compilation is timed and the log of Triton's own ptxas run is captured.
* Registers and spills are not in a CompiledKernel's metadata until its binary is loaded on a GPU. Triton already
  runs its bundled ptxas with `-v --gpu-name=sm_90a` to build the cubin; with the knob
  `knobs.nvidia.dump_ptxas_log` it prints that log, which the recorder captures and `parse_ptxas_log` reads ("Used N
  registers", "N bytes spill stores", "N bytes spill loads"). These are the numbers of the very cubin Triton built,
  with the flags Triton used. Shared memory is `kernel.metadata.shared`.

Supported releases are listed in `RELEASES` (the internals used here were read from each one's runtime/jit.py,
compiler/compiler.py, backends/driver.py and backends/nvidia/compiler.py); any other release fails clearly.
"""
from __future__ import annotations

import contextlib
import io
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Releases whose internals this file was checked against: JITFunction.run(*args, grid, warmup, **kwargs) and
# JITFunction._do_compile(...) exist, CUDABackend.make_cubin runs `ptxas -v` and prints the log when
# knobs.nvidia.dump_ptxas_log is set, backends.nvidia.compiler.get_ptxas(arch) returns the bundled ptxas.
# The value: the extra flags that release passes its ptxas (for the report; 3.8 added --regAllocOptLevel=2).
RELEASES = {
    "3.6": "-lineinfo",
    "3.8": "-lineinfo --regAllocOptLevel=2",
}

# H100 SXM: registers per thread ptxas may use, shared memory per block (opt-in maximum; Triton checks a kernel
# against it only when loading it, so a compile-only check must do it itself), streaming multiprocessors.
MAX_REGISTERS = 255
H100_MAX_SHARED_BYTES = 232448
H100_SM_COUNT = 132


class UnsupportedTritonError(RuntimeError):
    """The imported Triton is not a release this check knows."""


class NoGPUError(RuntimeError):
    """Something asked the stand-in driver for what only a real GPU has."""


def triton_release() -> str:
    """'major.minor' of the imported triton; UnsupportedTritonError unless it is one of RELEASES and has the hooks
    this file patches."""
    import triton

    release = ".".join(triton.__version__.split(".")[:2])
    if release not in RELEASES:
        raise UnsupportedTritonError(
            f"triton {triton.__version__} ({triton.__file__}) is not a release this check was written for "
            f"({', '.join(RELEASES)}): read its runtime/jit.py, backends/driver.py and backends/nvidia/compiler.py, "
            f"then add it to RELEASES in {__file__}")
    from triton.runtime.jit import JITFunction

    missing = [name for name, ok in (
        ("JITFunction.run", hasattr(JITFunction, "run")),
        ("JITFunction._do_compile", hasattr(JITFunction, "_do_compile")),
        ("knobs.nvidia.dump_ptxas_log", hasattr(_knobs().nvidia, "dump_ptxas_log")),
        ("backends.nvidia.compiler.get_ptxas", hasattr(_nvidia_compiler(), "get_ptxas")),
    ) if not ok]  # fmt: skip
    if missing:
        raise UnsupportedTritonError(f"triton {triton.__version__} lacks {', '.join(missing)}")
    return release


def _knobs():
    from triton import knobs

    return knobs


def _nvidia_compiler():
    from triton.backends.nvidia import compiler

    return compiler


def ptxas_tool(arch: int) -> tuple[str, str]:
    """(path, CUDA release) of the ptxas Triton itself compiles `arch` with (its bundled one unless
    TRITON_PTXAS_PATH points elsewhere)."""
    tool = _nvidia_compiler().get_ptxas(arch)
    return tool.path, tool.version


def gpu_arch_name(arch: int) -> str:
    """The --gpu-name Triton passes ptxas for compute capability `arch` (90 -> sm_90a)."""
    return _nvidia_compiler().sm_arch_from_capability(arch)


def make_stand_in_driver(arch: int = 90, warp_size: int = 32):
    """A driver object for `triton.runtime.driver.set_active`: compiles for `arch`, can do nothing else."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class HopperStandInDriver(DriverBase):
        """Reports a CUDA device of compute capability `arch` (device 0, stream 0); refuses GPU work."""

        def __init__(self):
            super().__init__()
            self.target = GPUTarget("cuda", arch, warp_size)

        @classmethod
        def is_active(cls):
            return False  # never picked by Triton's own driver discovery

        # What the JIT asks before compiling.
        def get_current_target(self):
            return self.target

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            if device != 0:
                raise NoGPUError(f"the stand-in driver has device 0 only, asked for {device}")

        def get_current_stream(self, device=None):
            return 0

        def get_device_capability(self, device=None):
            return divmod(arch, 10)

        def map_python_to_cpp_type(self, ty: str) -> str:
            from triton.backends.nvidia.driver import ty_to_cpp

            return ty_to_cpp(ty)

        # What needs a GPU.
        def _no_gpu(self, what: str):
            raise NoGPUError(f"{what} needs a GPU; the Hopper stand-in driver only compiles (was a kernel "
                             f"launched without warmup=True?)")

        @property
        def utils(self):
            self._no_gpu("driver.utils (load_binary, get_device_properties)")

        @property
        def launcher_cls(self):
            self._no_gpu("driver.launcher_cls (launching a kernel)")

        def get_active_torch_device(self):
            self._no_gpu("get_active_torch_device")

        def get_device_interface(self):
            self._no_gpu("get_device_interface")

        def get_benchmarker(self):
            self._no_gpu("get_benchmarker (autotuning, do_bench)")

        def get_empty_cache_for_benchmark(self):
            self._no_gpu("get_empty_cache_for_benchmark")

        def clear_cache(self, cache):
            self._no_gpu("clear_cache")

    return HopperStandInDriver()


@contextlib.contextmanager
def stand_in_driver(arch: int = 90):
    """Make the stand-in the active Triton driver inside the block."""
    from triton.runtime import driver

    previous = driver._active  # not `driver.active`: with no GPU, creating the default driver fails
    driver.set_active(make_stand_in_driver(arch))
    try:
        yield driver.active
    finally:
        driver._active = previous


# ---------------------------------------------------------------------------------------------------------------
# ptxas log
# ---------------------------------------------------------------------------------------------------------------

_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass
class PtxasResources:
    registers: int
    stack_frame: int
    spill_stores: int
    spill_loads: int


def parse_ptxas_log(log: str, kernel_name: str) -> PtxasResources | None:
    """Resources of entry `kernel_name` from a `ptxas -v` log (None when the log does not describe it)."""
    start = log.find(f"Compiling entry function '{kernel_name}'")
    if start < 0:
        return None
    section = log[start:]
    registers, spills = _REGISTERS.search(section), _SPILLS.search(section)
    if registers is None or spills is None:
        return None
    stack, stores, loads = map(int, spills.groups())
    return PtxasResources(int(registers.group(1)), stack, stores, loads)


# ---------------------------------------------------------------------------------------------------------------
# Recording compilations
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Compilation:
    """One compiled specialization (a CompiledKernel), with what its compilation printed and took."""

    kernel: Any  # triton CompiledKernel
    seconds: float
    ptxas_log: str


@dataclass
class Launch:
    """One `kernel[grid](...)` a launcher made, turned into a warmup."""

    kernel_name: str
    grid: tuple
    constexprs: dict  # the launch's keyword arguments that are plain values (constexprs, num_warps, ...)
    compiled: Any = None  # the CompiledKernel, None when compiling failed
    compilation: Compilation | None = None  # None when the JIT's in-process cache already held it
    error: str | None = None


@dataclass
class CompileRecorder:
    """Patches JITFunction so launches compile without running; collects one `Launch` per launch.

    Compile errors do not propagate: they are recorded on the launch (the launcher then goes on to its next
    kernel), so one run reports every kernel that fails."""

    launches: list = field(default_factory=list)
    _compilations: dict = field(default_factory=dict)  # id(CompiledKernel) -> Compilation
    _on_launch: Callable[[Launch], None] | None = None

    @contextlib.contextmanager
    def patched(self, on_launch: Callable[[Launch], None] | None = None):
        from triton.runtime.jit import JITFunction

        original_run, original_compile = JITFunction.run, JITFunction._do_compile
        recorder = self
        self._on_launch = on_launch

        def run(jit_fn, *args, grid, warmup, **kwargs):
            plain = {k: v for k, v in kwargs.items() if isinstance(v, (bool, int, float, str))}
            launch = Launch(kernel_name=_jit_name(jit_fn), grid=_grid_tuple(grid), constexprs=plain)
            try:
                launch.compiled = original_run(jit_fn, *args, grid=grid, warmup=True, **kwargs)
            except NoGPUError:
                raise
            except Exception as error:  # a compile error of this kernel: record it, keep going
                launch.error = f"{type(error).__name__}: {error}"
            if launch.compiled is not None:
                launch.compilation = recorder._compilations.pop(id(launch.compiled), None)
            recorder.launches.append(launch)
            if recorder._on_launch is not None:
                recorder._on_launch(launch)
            return launch.compiled

        def do_compile(jit_fn, *args, **kwargs):
            knobs = _knobs()
            saved = knobs.nvidia.dump_ptxas_log
            knobs.nvidia.dump_ptxas_log = True
            printed = io.StringIO()
            start = time.perf_counter()
            try:  # on a ptxas error Triton prints the whole PTX; the exception it raises holds ptxas's stderr
                with contextlib.redirect_stdout(printed):
                    kernel = original_compile(jit_fn, *args, **kwargs)
            finally:
                knobs.nvidia.dump_ptxas_log = saved
            if kernel is not None:
                recorder._compilations[id(kernel)] = Compilation(kernel, time.perf_counter() - start,
                                                                 printed.getvalue())
            return kernel

        JITFunction.run, JITFunction._do_compile = run, do_compile
        try:
            yield self
        finally:
            JITFunction.run, JITFunction._do_compile = original_run, original_compile
            self._on_launch = None


def _jit_name(jit_fn) -> str:
    fn = getattr(jit_fn, "fn", None)
    return getattr(fn, "__name__", None) or getattr(jit_fn, "__name__", repr(jit_fn))


def _grid_tuple(grid) -> tuple:
    return tuple(grid) if isinstance(grid, (tuple, list)) else (str(grid),)
