"""Benchmark harness for `benchmarks/bench_*.py` (pytest-benchmark).

    pytest benchmarks/                              # real shapes on a GPU, tiny shapes on CPU
    pytest benchmarks/ --bench-profile=real         # real shapes; skips without CUDA
    pytest benchmarks/ --benchmark-disable          # CI smoke test: every benchmark runs once, untimed
    pytest benchmarks/ --bench-sweep                # also the kernels' tile sweeps (tuning data, real profile)

Profiles (`--bench-profile` or $BENCH_PROFILE): `tiny` = CPU-sized shapes, `real` = the training shapes on CUDA.
Default: `real` when CUDA is available, else `tiny`.

Timing: a GPU call only queues work, so each timed round runs `calls_per_round` back-to-back calls and then
synchronizes; the time per call is the round time / calls_per_round (launch overhead hides behind the queue, as it
does in a training step). Every benchmark records the per-call time, effective GB/s or TFLOP/s, the GPU, the
torch/triton versions and the git commit in `benchmark.extra_info` (`--benchmark-json` keeps them); a table of all
rows is printed at the end of the session.
"""
import functools
import os
import subprocess
from pathlib import Path

import torch

# Triton must see TRITON_INTERPRET before it is first imported (the ops import it): CPU runs use the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

import results_rows  # noqa: E402  (benchmarks/ is on sys.path: pytest inserts the conftest's folder)

PROFILES = ("tiny", "real")
_ROWS: list[dict] = []  # one per timed benchmark, for the end-of-session table


def pytest_addoption(parser):
    group = parser.getgroup("coredi benchmarks")
    group.addoption(
        "--bench-profile",
        choices=PROFILES,
        default=None,
        help="tiny: CPU-sized shapes; real: training shapes on CUDA (skips without it). "
        "Default: $BENCH_PROFILE, else real with CUDA, else tiny.",
    )
    group.addoption("--bench-sweep", action="store_true", help="also run the kernels' tile-size sweeps (real profile)")


def pytest_collect_file(file_path: Path, parent):
    """Collect `bench_*.py` (pytest's default pattern is test_*.py, and pyproject.toml is shared with tests/)."""
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)  # files named on the command line are collected anyway
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def bench_profile(request) -> str:
    profile = request.config.getoption("--bench-profile") or os.environ.get("BENCH_PROFILE") or None
    if profile is None:
        profile = "real" if torch.cuda.is_available() else "tiny"
    if profile not in PROFILES:
        raise pytest.UsageError(f"BENCH_PROFILE must be one of {PROFILES}, got {profile!r}")
    if profile == "real" and not torch.cuda.is_available():
        pytest.skip("the real benchmark profile needs a CUDA GPU")
    return profile


@pytest.fixture(scope="session")
def bench_device(bench_profile) -> torch.device:
    return torch.device("cuda" if bench_profile == "real" else "cpu")


@pytest.fixture(scope="session")
def bench_sweep(request, bench_profile) -> bool:
    return bool(request.config.getoption("--bench-sweep")) and bench_profile == "real"


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.lru_cache(maxsize=None)
def environment_info() -> dict:
    """GPU name, versions and git commit, recorded with every number."""
    root = Path(__file__).resolve().parent.parent

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "triton": triton_version,
        "git_sha": sha + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else ""),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }


@pytest.fixture
def measure(benchmark, bench_profile, bench_device):
    """measure(fn, bytes_moved=..., flops=..., **labels): time fn() (one call of the work) with synchronized rounds.

    Labels (e.g. op, mode, provider, shape, dtype) go into extra_info and the end-of-session table. The row (labels,
    ms, GB/s, TFLOP/s) is returned, and emitted at once to table `labels["op"]` of the GPU check's rows file
    (`results_rows.py`) unless emit=False (a caller that emits a richer row of its own); None when timing is off.
    """

    def run(fn, *, bytes_moved=None, flops=None, calls_per_round=None, rounds=None, emit=True, **labels):
        real = bench_profile == "real"
        calls = calls_per_round or (20 if real else 1)
        rounds = rounds or (25 if real else 5)

        def timed_round():
            for _ in range(calls):
                fn()
            sync(bench_device)

        benchmark.extra_info.update(environment_info(), profile=bench_profile, calls_per_round=calls, **labels)
        if benchmark.disabled:  # --benchmark-disable: pytest-benchmark runs the round once, untimed (smoke test)
            benchmark.pedantic(timed_round)
            return None
        fn()  # warm-up outside the timed rounds: compilation, Triton JIT, caches
        sync(bench_device)
        benchmark.pedantic(timed_round, rounds=rounds, warmup_rounds=1, iterations=1)

        seconds = benchmark.stats.stats.median / calls
        row = dict(labels, ms=seconds * 1e3)
        if bytes_moved is not None:
            row["GB/s"] = bytes_moved / seconds / 1e9
        if flops is not None:
            row["TFLOP/s"] = flops / seconds / 1e12
        benchmark.extra_info.update({k: v for k, v in row.items() if k not in labels}, bytes_moved=bytes_moved)
        _ROWS.append(row)
        if emit:
            results_rows.emit(str(labels.get("op", "benchmark")), row)
        return row

    return run


def pytest_terminal_summary(terminalreporter):
    """A compact table of every timed row, with the speed-up over the `compile` provider of the same case."""
    if not _ROWS:
        return
    case_keys = [k for k in _ROWS[0] if k not in ("provider", "ms", "GB/s", "TFLOP/s")]
    compiled = {tuple(r.get(k) for k in case_keys): r["ms"] for r in _ROWS if r.get("provider") == "compile"}
    for r in _ROWS:
        base = compiled.get(tuple(r.get(k) for k in case_keys))
        r["x compile"] = base / r["ms"] if base else None
    columns = list(dict.fromkeys(k for r in _ROWS for k in r))

    def fmt(v):
        if v is None:
            return "-"
        return f"{v:.3f}" if isinstance(v, float) and v < 100 else (f"{v:.0f}" if isinstance(v, float) else str(v))

    table = [columns] + [[fmt(r.get(c)) for c in columns] for r in _ROWS]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    info = environment_info()
    title = f"coredi benchmarks on {info['device']} (torch {info['torch']}, triton {info['triton']}, {info['git_sha']})"
    terminalreporter.write_sep("-", title)
    for row in table:
        terminalreporter.write_line("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
