"""The optional native extension `coredi_native` (built by CMake from `csrc/`): find it, load it, build it.

    python -m coredi_fast.optim.native build              # cmake configure + build into build/native (CPU + CUDA)
    python -m coredi_fast.optim.native build --cpu-only   # the CPU kernel only (what CI builds)
    python -m coredi_fast.optim.native info               # where the library is, what it was built for, its ops

The same build by hand:

    cmake -S . -B build/native -DCMAKE_PREFIX_PATH="$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')"
    cmake --build build/native -j

Where the library is looked for (the first that exists wins): $COREDI_NATIVE_LIB, then
`<repository>/build/native/libcoredi_native.so`. With COREDI_BUILD_NATIVE=1 a missing library is built on first use
(under a file lock, so the ranks of a job build it once).

A library built against another torch version is not used (C++ extensions are tied to one torch build): `info`
says so, and `build` rebuilds it. Nothing here is needed for coredi_fast to work: without the library,
`AdamWEMA` uses torch's fused AdamW and a foreach EMA.
"""
from __future__ import annotations

import argparse
import functools
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

LIBRARY_NAME = "libcoredi_native.so"
ENV_LIBRARY = "COREDI_NATIVE_LIB"
ENV_BUILD = "COREDI_BUILD_NATIVE"
ENV_REQUIRE = "COREDI_REQUIRE_NATIVE"
OP_NAME = "coredi_native::adamw_ema_step_"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BUILD_DIR = REPO_ROOT / "build" / "native"


@dataclass
class NativeStatus:
    """What `load()` found. `devices`: device types with a kernel ("cpu", "cuda"); `error`: why it is unusable."""
    path: Optional[Path] = None
    loaded: bool = False
    build_info: str = ""
    devices: tuple = ()
    error: str = ""
    searched: list = field(default_factory=list)

    def describe(self) -> str:
        if self.loaded:
            return f"coredi_native loaded from {self.path} ({self.build_info}); kernels for {', '.join(self.devices)}"
        where = ", ".join(str(p) for p in self.searched) or "nowhere"
        return f"coredi_native not available: {self.error or 'not found'} (searched {where})"


def library_candidates() -> list[Path]:
    """Paths tried, in order: $COREDI_NATIVE_LIB, then the default build folder."""
    paths = []
    if os.environ.get(ENV_LIBRARY):
        paths.append(Path(os.environ[ENV_LIBRARY]).expanduser())
    paths.append(DEFAULT_BUILD_DIR / LIBRARY_NAME)
    return paths


def _has_kernel(dispatch_key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, dispatch_key)
    except RuntimeError:  # the op is not registered (library not loaded)
        return False


def _kernel_devices() -> tuple:
    return tuple(d for d, key in (("cpu", "CPU"), ("cuda", "CUDA")) if _has_kernel(key))


@functools.lru_cache(maxsize=None)
def load() -> NativeStatus:
    """Load the library once per process (cached). Never raises: the status says what happened."""
    status = NativeStatus(searched=library_candidates())
    if _has_kernel("CPU"):  # loaded already (e.g. by torch.ops.load_library elsewhere)
        status.loaded, status.devices = True, _kernel_devices()
        status.build_info = torch.ops.coredi_native.build_info()
        return status
    path = next((p for p in status.searched if p.is_file()), None)
    if path is None and os.environ.get(ENV_BUILD, "") == "1":
        try:
            path = build(verbose=False)
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            status.error = f"{ENV_BUILD}=1 but the build failed: {e}"
            return status
    if path is None:
        status.error = (f"{LIBRARY_NAME} not built (build it with `python -m coredi_fast.optim.native build`, or set "
                        f"{ENV_LIBRARY})")
        return status
    status.path = path
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as e:
        status.error = f"{path} does not load ({e}); rebuild it with `python -m coredi_fast.optim.native build`"
        return status
    status.build_info = torch.ops.coredi_native.build_info()
    built_for = dict(item.split("=", 1) for item in status.build_info.split(";")).get("torch", "unknown")
    if built_for != torch.__version__:
        status.error = (f"{path} was built for torch {built_for}, this is torch {torch.__version__}; rebuild it with "
                        "`python -m coredi_fast.optim.native build`")
        return status
    status.loaded, status.devices = True, _kernel_devices()
    return status


def is_available(device_type: str = "cpu") -> bool:
    """True when the library is loaded and has a kernel for `device_type` ("cpu" | "cuda")."""
    status = load()
    return status.loaded and device_type in status.devices


def build(build_dir: Optional[Path] = None, cpu_only: bool = False, cuda_arch: Optional[str] = None,
          jobs: Optional[int] = None, verbose: bool = True) -> Path:
    """Configure and build the library with CMake against this interpreter's torch; returns the library's path.

    cpu_only: -DCOREDI_WITH_CUDA=OFF (else AUTO: the CUDA kernels when nvcc works). cuda_arch: e.g. "90" or
    "80;90" (default: the visible GPU's, else 80;90). Ranks building at once wait for each other (file lock)."""
    if not (REPO_ROOT / "CMakeLists.txt").is_file():  # an installed (non-editable) copy has no C++ sources
        raise RuntimeError(f"no CMakeLists.txt in {REPO_ROOT}: this coredi_fast is an installed copy without the "
                           f"native sources; build from a checkout (cd <checkout> && python -m "
                           f"coredi_fast.optim.native build) and point ${ENV_LIBRARY} at the library")
    cmake = shutil.which("cmake")
    if cmake is None:
        raise RuntimeError("cmake is not installed (pip install cmake, or your system's package)")
    build_dir = Path(build_dir or DEFAULT_BUILD_DIR)
    build_dir.mkdir(parents=True, exist_ok=True)
    configure = [cmake, "-S", str(REPO_ROOT), "-B", str(build_dir), f"-DPython3_EXECUTABLE={sys.executable}",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                 f"-DCOREDI_WITH_CUDA={'OFF' if cpu_only else 'AUTO'}"]
    if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
        configure += ["-G", "Ninja"]
    if cuda_arch:
        configure.append(f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}")
    compile_ = [cmake, "--build", str(build_dir), "-j", str(jobs or os.cpu_count() or 2)]
    output = None if verbose else subprocess.PIPE
    import fcntl

    with open(build_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for cmd in (configure, compile_):
            proc = subprocess.run(cmd, stdout=output, stderr=subprocess.STDOUT if output else None, text=True)
            if proc.returncode != 0:
                tail = (proc.stdout or "")[-3000:]
                raise RuntimeError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}\n{tail}")
    path = build_dir / LIBRARY_NAME
    if not path.is_file():
        raise RuntimeError(f"the build finished but {path} is missing")
    return path


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coredi_fast.optim.native", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="configure and build the library with CMake")
    b.add_argument("--build-dir", type=Path, default=None, help=f"default: {DEFAULT_BUILD_DIR}")
    b.add_argument("--cpu-only", action="store_true", help="skip the CUDA kernels (-DCOREDI_WITH_CUDA=OFF)")
    b.add_argument("--cuda-arch", default=None, help='CMAKE_CUDA_ARCHITECTURES, e.g. "90" or "80;90"')
    b.add_argument("-j", "--jobs", type=int, default=None, help="parallel compile jobs (default: all cores)")
    sub.add_parser("info", help="say where the library is and what it can run")
    args = parser.parse_args(argv)
    if args.command == "build":
        path = build(args.build_dir, cpu_only=args.cpu_only, cuda_arch=args.cuda_arch, jobs=args.jobs)
        print(f"built {path}")
        if args.build_dir is not None and Path(args.build_dir).resolve() != DEFAULT_BUILD_DIR:
            print(f"(not the default location: export {ENV_LIBRARY}={path})")
            return 0
    print(load().describe())
    return 0 if load().loaded else 1


if __name__ == "__main__":
    sys.exit(main())
