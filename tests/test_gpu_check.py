"""The GPU check's contract, tested where CI runs: `scripts/gpu_check.py --cpu-smoke` runs every stage end to end
with tiny shapes, and what comes back is what the GPU tool can carry.

The GPU tool returns at most 8 files from $OUT and the last 12,000 printed characters; a lent GPU comes rarely,
for ~10 minutes. So: at most 6 files in $OUT, the final printout (headline tables and stage summary) under 10,000
characters, every measured row in results.md, and a non-zero exit naming the stage when one fails or is cut off
(its rows measured before the cut kept). The report's own arithmetic is checked on made-up rows.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check_report as report  # noqa: E402

FINAL_MARK = "=== GPU check on "


def run_check(out: Path, *args, timeout=900):
    env = dict(os.environ, OUT=str(out))
    env.pop("COREDI_BENCH_ROWS", None)
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--cpu-smoke", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def markdown_rows(markdown: str, table: str) -> list:
    """The data rows of `## table` in results.md, each a {column: cell} dict."""
    lines = markdown.split(f"## {table}\n", 1)[1].split("\n## ", 1)[0].strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One whole CPU-smoke run: (exit status, printed text, $OUT, the rows it measured)."""
    out = tmp_path_factory.mktemp("gpu_check_out")
    code, printed = run_check(out)
    rows = ROOT / "build" / "gpu_check" / "rows.jsonl"  # read now: the next run of the check replaces it
    measured = [json.loads(line) for line in rows.read_text().splitlines()] if rows.is_file() else []
    return code, printed, out, measured


def test_smoke_run_passes_and_fits_what_the_gpu_tool_returns(smoke):
    code, printed, out, _ = smoke
    assert code == 0, printed[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_check_logs.tar.gz", "results.md", "summary.txt"]  # <= 6 files, no folders
    final = printed[printed.rindex(FINAL_MARK):]
    assert len(final) < 10_000
    assert final.rstrip().splitlines()[-2].startswith("exit 0")  # the stage summary comes last
    for stage in ("env", "install", "native", "train_step", "gpu_tests", "bench_ops", "qk_norm_rope", "rest"):
        assert f"\n{stage} " in final, stage


def test_every_measured_row_is_in_results_md(smoke):
    code, printed, out, rows = smoke
    markdown = (out / "results.md").read_text()
    per_table = {}
    for row in rows:
        per_table.setdefault(row["table"], []).append(row)
    for table in ("train step", "memory estimate", "encoder", "layernorm_modulate", "qk_norm_rope",
                  "train step engines"):
        assert table in per_table, f"no {table!r} rows measured"
    for table, measured in per_table.items():
        shown = markdown_rows(markdown, table)
        assert len(shown) == len(measured), table
        for got, want in zip(shown, measured):
            assert got.get("provider", "-") == str(want.get("provider", "-"))
    # The train step: eager and ours measured on CPU (compile needs the real profile), ours against eager.
    step = {r["provider"]: r for r in markdown_rows(markdown, "train step")}
    assert {"eager", "ours"} <= set(step)
    ratio = float(step["ours"]["x eager"])
    assert ratio == pytest.approx(float(step["eager"]["ms"]) / float(step["ours"]["ms"]), rel=0.02)
    # The card and the versions head the page.
    assert "| torch |" in markdown and "| source digest |" in markdown and "| coredi_kernels from |" in markdown


def test_a_failing_and_a_hanging_stage_make_the_exit_non_zero(tmp_path):
    code, printed = run_check(tmp_path, "--stages", "gpu_tests,bench_ops", "--inject", "gpu_tests=fail",
                              "--inject", "bench_ops=hang", "--stage-limit", "bench_ops=3", timeout=300)
    assert code == 1
    summary = (tmp_path / "summary.txt").read_text()
    assert "failed: gpu_tests" in summary and "cut off: bench_ops" in summary
    # The row measured before the hang survived the cut, in the results file and on the console.
    assert markdown_rows((tmp_path / "results.md").read_text(), "injected")[0]["provider"] == "before the hang"
    assert "[row] injected | provider=before the hang" in printed


def test_bad_arguments_are_refused_naming_them(tmp_path):
    code, printed = run_check(tmp_path, "--stages", "train_stepp", timeout=60)
    assert code == 2 and "unknown stage 'train_stepp'" in printed
    code, printed = run_check(tmp_path, "--inject", "bench_ops=explode", timeout=60)
    assert code == 2 and "--inject" in printed


# ----------------------------------------------------------------------------------------------- the report


def test_speedups_are_baseline_ms_over_row_ms_per_case():
    rows = [dict(op="ln", mode="fwd", provider="compile", ms=2.0), dict(op="ln", mode="fwd", provider="ours", ms=0.5),
            dict(op="ln", mode="bwd", provider="compile", ms=3.0), dict(op="ln", mode="bwd", provider="ours", ms=4.0),
            dict(op="ln", mode="x", provider="ours", ms=1.0)]
    got = [r["x compile"] for r in report.add_speedups(rows)]
    assert got == [1.0, 4.0, 1.0, 0.75, None]  # the last case has no baseline


def test_baseline_falls_back_to_eager_then_torch_and_ignores_optimizer_labels():
    rows = [dict(model="m", provider="eager", optimizer="AdamW", ms=10.0),
            dict(model="m", provider="ours", optimizer="AdamWEMA[native]", ms=8.0)]
    assert [r["x eager"] for r in report.add_speedups(rows)] == [1.0, 1.25]
    rows = [dict(provider="torch", ms=3.0), dict(provider="native", ms=1.5)]
    assert [r["x torch"] for r in report.add_speedups(rows)] == [1.0, 2.0]


def test_verdict_names_failed_and_cut_off_stages():
    stages = [dict(name="env", status="ok"), dict(name="gpu_tests", status="failed"),
              dict(name="bench_ops", status="cut off"), dict(name="rest", status="skipped")]
    code, line = report.verdict(stages)
    assert code == 1 and "failed: gpu_tests" in line and "cut off: bench_ops" in line and "skipped: rest" in line
    assert report.verdict([dict(name="env", status="ok"), dict(name="rest", status="skipped")])[0] == 0


def test_junit_summary_counts_outcomes(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="t" name="a"/>'
                   '<testcase classname="t" name="b"><failure message="AssertionError: 3 != 4">tb</failure></testcase>'
                   '<testcase classname="t" name="c"><skipped message="needs a CUDA GPU"/></testcase>'
                   '<testcase classname="t" name="d"><error message="boom"/></testcase></testsuite></testsuites>')
    got = report.junit_summary(xml)
    assert (got["passed"], got["failed"], got["skipped"], got["errors"]) == (1, 1, 1, 1)
    assert got["failures"] == [("t::b", "AssertionError: 3 != 4"), ("t::d", "boom")]
    assert report.junit_summary(tmp_path / "missing.xml") == {}


def test_headline_leaves_out_what_does_not_fit_and_keeps_the_stage_summary_last():
    small = [dict(provider="compile", ms=1.0), dict(provider="ours", ms=0.5)]
    huge = [dict(provider="eager", ms=float(i), note="x" * 80) for i in range(200)]
    stages = [dict(name="train_step", status="ok", rc=0, seconds=100.0)]
    text = report.headline({"gpu": "H100"}, stages, {"train step": small, "bulky": huge}, {}, budget=3000)
    assert len(text) <= 3000
    assert "--- train step" in text and "--- bulky" not in text and "results.md only, for room: bulky" in text
    assert text.rstrip().endswith("exit 0 (every stage ran and passed)")


def test_install_check_refuses_a_stale_copy(tmp_path):
    """pip keeps an old --target folder: a copy whose files differ from the checkout must fail the install stage."""
    import shutil

    site = tmp_path / "site"
    shutil.copytree(ROOT / "kernels", site / "coredi_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "coredi_fast", site / "coredi_fast", ignore=shutil.ignore_patterns("__pycache__"))
    argv = [sys.executable, "scripts/gpu_check_env.py", "--site", str(site), "--packages-only"]
    env = dict(os.environ, PYTHONPATH=str(site))
    fresh = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert f"coredi_kernels from: {site / 'coredi_kernels'}" in fresh.stdout
    with open(site / "coredi_kernels" / "patch.py", "a") as f:
        f.write("# an older version\n")
    stale = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert stale.returncode == 1
    assert "differs from the checkout's kernels/patch.py" in stale.stdout
