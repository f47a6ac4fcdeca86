"""scripts/hopper_compile_check.py: every coredi_kernels Triton kernel compiles for Hopper (sm_90a) without spills,
under our Triton (3.8, the venv's) and the GPU machines' (3.6, a side folder), on a machine without a GPU.

The check runs as a subprocess (it must import triton itself, without TRITON_INTERPRET, which conftest sets for this
process). The two releases run concurrently (~20 s each on 2 cores). Triton 3.6 comes from $COREDI_TRITON36_PATH
(default build/triton36: `pip install --no-deps --target build/triton36 triton==3.6.0`); the test skips without it
unless COREDI_REQUIRE_TRITON36=1 (CI), where it fails.
"""
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "hopper_compile_check.py"
TIMEOUT_S = 600

NORM = ["_norm_modulate_fwd_kernel", "_norm_modulate_bwd_kernel"]
QK = ["_qk_norm_rope_fwd_kernel", "_qk_norm_rope_bwd_kernel"]
JOINT = ["_project_fwd_kernel", "_embed_inputs_kernel", "_patch_gemm_kernel", "_embed_bwd_kernel",
         "_resize_adjoint_kernel", "_project_bwd_kernel"]
# Backward kernels whose program count comes from the SM count: on an H100 they must fill its 132 SMs.
SM_FILLING = {"_norm_modulate_bwd_kernel", "_qk_norm_rope_bwd_kernel", "_project_bwd_kernel"}
H100_SMS, MAX_SHARED = 132, 232448


def expected_cases() -> dict:
    """case id -> the kernels its launchers compile (written out here, independently of the script)."""
    cases = {}
    for dtype in ("float32", "bfloat16"):
        for op in ("layernorm_modulate", "gated_residual_layernorm_modulate"):
            cases[f"{op}/sit-xl2/{dtype}"] = NORM
        for model in ("sit-xl2", "jit-b16", "jit-h16"):
            for op in ("rmsnorm_modulate", "gated_residual_rmsnorm_modulate"):
                cases[f"{op}/{model}/{dtype}"] = NORM
        for model in ("jit-b16", "jit-h16"):
            cases[f"qk_norm_rope/{model}/{dtype}"] = QK
        cases[f"qk_layernorm_rope/sit-xl2/{dtype}"] = QK
        cases[f"joint_embedding/sit-xl2/{dtype}"] = JOINT
    cases["joint_embedding/sit-xl2/bfloat16+keep+tf32"] = JOINT
    return cases


def triton36_path() -> Path:
    path = Path(os.environ.get("COREDI_TRITON36_PATH") or "build/triton36")
    return path if path.is_absolute() else ROOT / path


def check_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_check(out_dir: Path, name: str, *args: str, pythonpath: Path | None = None) -> tuple:
    """Start the check in its own process (output to files: two can run at once). -> (process, log, json)."""
    env = check_env()
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), *filter(None, [env.get("PYTHONPATH")])])
    log, report = out_dir / f"{name}.log", out_dir / f"{name}.json"
    with open(log, "w") as stdout:
        process = subprocess.Popen([sys.executable, str(SCRIPT), "--json", str(report), *args], cwd=ROOT, env=env,
                                   stdout=stdout, stderr=subprocess.STDOUT)
    return process, log, report


def finish(started: tuple) -> tuple:
    """-> (exit status, output, report dict or None)."""
    process, log, report = started
    try:
        status = process.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        status = None
    output = log.read_text()
    return status, output, json.loads(report.read_text()) if report.exists() else None


@pytest.fixture(scope="module")
def check_runs(request, tmp_path_factory):
    """The full check of each release whose test was selected, started together (they take ~20 s each on 2 cores).
    -> {release: (status, output, report), or the reason it cannot run}."""
    selected = {item.callspec.params["release"] for item in request.session.items
                if item.originalname == "test_every_kernel_compiles_for_sm90a_without_spills"}
    out = tmp_path_factory.mktemp("hopper_compile")
    started, runs = {}, {}
    if "3.8" in selected:
        started["3.8"] = start_check(out, "triton38")
    path = triton36_path()
    if "3.6" in selected and (path / "triton" / "__init__.py").exists():
        started["3.6"] = start_check(out, "triton36", "--triton-path", str(path), pythonpath=path)
    elif "3.6" in selected:
        runs["3.6"] = (f"triton 3.6 is not installed at {path} (pip install --no-deps --target build/triton36 "
                       f"triton==3.6.0, or set COREDI_TRITON36_PATH)")
    runs.update({release: finish(run) for release, run in started.items()})
    return runs


@pytest.mark.parametrize("release", ["3.8", "3.6"])
def test_every_kernel_compiles_for_sm90a_without_spills(check_runs, release):
    run = check_runs[release]
    if isinstance(run, str):
        if os.environ.get("COREDI_REQUIRE_TRITON36") == "1":
            pytest.fail(f"COREDI_REQUIRE_TRITON36=1 but {run}")
        pytest.skip(run)
    status, output, report = run
    assert status == 0, f"the check failed (exit {status}) with triton {release}:\n{output[-6000:]}"
    assert report is not None, output[-3000:]
    assert report["ok"] and report["problems"] == [], report["problems"]
    assert report["triton_version"].startswith(release + "."), report["triton_version"]
    if release == "3.6":
        assert Path(report["triton_file"]).resolve().is_relative_to(triton36_path().resolve())
    assert report["arch_name"] == "sm_90a" and report["sm_count"] == H100_SMS
    assert output.strip().splitlines()[-1].startswith("VERDICT: OK"), output[-2000:]

    expected = expected_cases()
    rows = report["kernels"]
    assert {r["case"] for r in rows} == set(expected)
    for case, kernels in expected.items():
        compiled = sorted(r["kernel"] for r in rows if r["case"] == case)
        assert compiled == sorted(kernels), case
    for r in rows:
        where = f"{r['kernel']} in {r['case']} (triton {release})"
        assert 0 < r["registers"] <= 255, where
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack_frame"] == 0, where
        assert 0 <= r["shared"] <= MAX_SHARED, where
        assert r["num_warps"] in (1, 2, 4, 8, 16) and r["num_stages"] >= 1, where
        assert r["cached"] or r["compile_s"] > 0, where
        assert r["problems"] == [], where
        # The launch heuristics saw an H100 (on the CPU they would make one program per sample or column block).
        if r["kernel"] in SM_FILLING:
            assert math.prod(r["grid"]) >= H100_SMS, where
    # ... and the joint embedding's launchers took their GPU tiles (on the CPU they take interpreter tiles).
    from coredi_kernels.joint_embedding import _kernels as je

    gpu_tiles = {"_project_fwd_kernel": ("BLOCK_M", je.PROJECT_BLOCK_M),
                 "_patch_gemm_kernel": ("BLOCK_T", je.GEMM_BLOCK_T),
                 "_resize_adjoint_kernel": ("BLOCK_R", je.ADJOINT_BLOCK_R)}
    for r in rows:
        if r["kernel"] in gpu_tiles:
            name, value = gpu_tiles[r["kernel"]]
            assert r["constexprs"][name] == value, (r["kernel"], r["case"], r["constexprs"])
    # Identical specializations compile once; the first compile of each kernel hash is not a cached row.
    first = {}
    for r in rows:
        first.setdefault(r["hash"], r)
    assert all(not r["cached"] for r in first.values())


NEGATIVE_CASES = '''
import torch
import triton
import triton.language as tl


@triton.jit
def _register_hog_kernel(X, Y, N, BLOCK: tl.constexpr):
    """A 16384-column LayerNorm row on one warp: 512 values per thread stay live across two reductions."""
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < N, other=0.0)
    c = x - tl.sum(x, axis=0) / N
    tl.store(Y + offs, c * tl.rsqrt(tl.sum(c * c, axis=0) / N + 1e-6), mask=offs < N)


@triton.jit
def _uncompilable_kernel(X, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)  # BLOCK = 48 is not a power of two
    tl.store(X + offs, tl.load(X + offs))


def run():
    x = torch.empty(16384)
    _register_hog_kernel[(1,)](x, torch.empty_like(x), 16384, BLOCK=16384, num_warps=1)
    _uncompilable_kernel[(1,)](x, BLOCK=48)


CASES = [dict(id="negative/bad-kernels", op="test", shape="(16384,)", dtype="float32",
              kernels=["_register_hog_kernel", "_uncompilable_kernel"], run=run)]
'''


def test_check_fails_on_spills_and_compile_errors(tmp_path):
    """The check can fail: a kernel that spills and one that does not compile give exit 1 and are named."""
    extra = tmp_path / "bad_kernels.py"
    extra.write_text(textwrap.dedent(NEGATIVE_CASES))
    status, output, report = finish(start_check(tmp_path, "negative", "--cases", "none", "--extra-cases", str(extra)))
    assert status == 1, output[-3000:]
    verdict = output.strip().splitlines()[-1]
    assert verdict.startswith("VERDICT: FAIL"), verdict
    assert "_register_hog_kernel" in verdict and "register spills" in verdict, verdict
    assert "_uncompilable_kernel" in verdict and "compile error" in verdict, verdict
    rows = {r["kernel"]: r for r in report["kernels"]}
    assert rows["_register_hog_kernel"]["spill_stores"] > 0 and rows["_register_hog_kernel"]["spill_loads"] > 0
    assert "power of 2" in rows["_uncompilable_kernel"]["problems"][0]
    assert not report["ok"] and len(report["problems"]) == 2, report["problems"]


def test_check_refuses_an_unknown_triton_release(tmp_path):
    fake = tmp_path / "triton"
    fake.mkdir()
    (fake / "__init__.py").write_text('__version__ = "9.9.0"\n')
    command = [sys.executable, str(SCRIPT), "--triton-path", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, env=check_env(), capture_output=True, text=True, timeout=TIMEOUT_S,
                            check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "triton 9.9.0" in result.stderr and "not a release this check was written for" in result.stderr
