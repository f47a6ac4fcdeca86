"""The GPU check: one command, one card, at most 540 s, and every number it measures comes back.

    bash scripts/gpu_check.sh                    # on a GPU machine (the same as: python3 scripts/gpu_check.py)
    python3 scripts/gpu_check.py --cpu-smoke     # the same stages end to end with tiny shapes on a CPU (CI runs it)
    python3 scripts/gpu_check.py --stages train_step,gpu_tests   # a rerun of some stages (env and install always)

Stages, in order of value (a stage that does not fit the time left is skipped, and says so):
    env           the card, driver, torch / triton / CUDA / cuDNN versions, the commit and a source digest
    install       a clean `pip install --target .site . ./kernels` (the previous folder removed first: pip keeps an
                  old one), then a check that the packages the stages import are this checkout's (paths and contents)
    native        the optional one-pass AdamW + EMA extension, built for this card (without it, `ours` runs torch's
                  fused AdamW and the foreach EMA, and the table's optimizer column says so)
    train_step    the SiT-XL/2 CoReDi training step at batch 128 in bf16: eager, per-block torch.compile, ours,
                  ours + compile (ms, img/s, MFU, peak GiB), after each variant's estimated peak memory; a variant
                  the estimate says cannot fit the card is skipped with that message instead of dying of OOM
    gpu_tests     every GPU-marked correctness test (bf16 tolerances, kernels on the card, the CUDA-graph encoder,
                  the native optimizer)
    bench_ops     the fused ops against eager and torch.compile, the encoder's CUDA graph, the optimizer step
    qk_norm_rope  JiT's fused qk-norm + RoPE
    rest          SiT-XL/2 blocks alone; the training step through DDP and DeepSpeed (world size 1)

Time: one budget (--budget, default 540 s) counted from this script's start, install included. A stage gets at most
its own limit and what is left once the report's reserve is set aside. At its limit a stage gets SIGINT, so pytest
still writes its summary, JUnit XML and benchmark JSON, then SIGKILL after a grace period.

Results: every row is printed the moment it is measured (`[row] table | ...`) and appended to one rows file, so a
stage that is cut off keeps every row it finished. At the end $OUT (default gpu_results/) holds three files:
results.md (the card and versions on top, every table with its speed-up column, the GPU tests), summary.txt (each
stage's status, rc and seconds) and gpu_check_logs.tar.gz (every log, JSON and XML). The last thing printed is the
headline tables and the stage summary, under 10,000 characters. Exit status: 0 when every stage that ran passed,
1 when one failed or was cut off (the summary names it), 2 for bad arguments.
"""
import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check_report as report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ROW_PREFIX = "[row]"           # the benchmarks' printed rows (benchmarks/results_rows.py), echoed live
REPORT_RESERVE_S = 10          # kept back from the budget for the report and the tarball
KILL_GRACE_S = 15              # after SIGINT, before SIGKILL
STAGE_NAMES = ("env", "install", "native", "train_step", "gpu_tests", "bench_ops", "qk_norm_rope", "rest")
ALWAYS = ("env", "install")
OP_BENCHMARKS = ("layernorm_modulate", "rmsnorm_modulate", "joint_embedding", "encoder", "optimizer", "attention")
# --inject STAGE=KIND replaces a stage's commands, to test the check's own contract: a stage that fails, and one
# that measures a row and then hangs until its time limit stops it.
INJECTED = {
    "fail": "import sys; print('injected failure'); sys.exit(3)",
    "hang": ("import sys, time; sys.path.insert(0, 'benchmarks'); import results_rows; "
             "results_rows.emit('injected', {'provider': 'before the hang', 'ms': 1.0}); time.sleep(3600)"),
}


@dataclass
class Stage:
    """One step of the check: commands run in order (the first failure ends the stage) under one time limit."""
    name: str
    limit_s: float                 # the most it may take
    min_s: float                   # less time than this left: skip it (it could not finish anything useful)
    commands: list                 # argv lists
    env: dict = field(default_factory=dict)
    needs: tuple = ()              # stages that must have passed


@dataclass
class Outcome:
    name: str
    status: str = "not run"        # ok | failed | cut off | skipped
    rc: object = None
    seconds: float = 0.0
    note: str = ""

    def as_dict(self) -> dict:
        return dict(name=self.name, status=self.status, rc=self.rc, seconds=self.seconds, note=self.note)


# ----------------------------------------------------------------------------------------------- the plan


def pytest_argv(*args) -> list:
    """pytest with output uncaptured (-s: rows print live), names of tests in the log (-v), no cache writes."""
    return [sys.executable, "-m", "pytest", "-s", "-v", "-rfEs", "-p", "no:cacheprovider", *args]


def plan(args, work: Path, site: Path) -> list:
    """The stages for a GPU run, or with tiny shapes for --cpu-smoke."""
    smoke = args.cpu_smoke
    profile = "--bench-profile=tiny" if smoke else "--bench-profile=real"

    def bench(name, *files, extra=()):
        return pytest_argv(profile, f"--benchmark-json={work / (name + '.json')}", *extra, *files)

    # GPU: build/native, for this card's architecture (CMake's default); it persists on a warm machine, so a rerun
    # builds incrementally. CPU smoke: the C++ part in the work folder, leaving a developer's build/native alone.
    native = [sys.executable, "-m", "coredi_fast.optim.native", "build", "--jobs", str(os.cpu_count() or 2)]
    native += ["--cpu-only", "--build-dir", str(work / "native")] if smoke else []
    gpu_tests = ["tests/test_kernel_attention.py", "tests/test_encoder_cuda_graph.py"] if smoke else ["tests/"]
    stages = [
        Stage("env", 30, 5, [[sys.executable, "scripts/gpu_check_env.py", "--json", str(work / "env.json")]]),
        Stage("install", 90, 15, [
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
             "--target", str(site), ".", "./kernels"],  # coredi_fast, and coredi-kernels (its own distribution)
            [sys.executable, "scripts/gpu_check_env.py", "--site", str(site), "--packages-only",
             "--json", str(work / "install.json")]]),
        # From the checkout, not the installed copy: CMake needs CMakeLists.txt and csrc/ (not installed).
        Stage("native", 150, 30, [native], env={"PYTHONPATH": ""}),
        Stage("train_step", 300, 60,
              [bench("train_step", "benchmarks/bench_train_step.py", extra=("-k", "test_train_step"))],
              env={} if smoke else {"BENCH_TRAIN_MODELS": "SiT-XL/2"}, needs=("install",)),
        Stage("gpu_tests", 150, 30, [pytest_argv("-m", "gpu", f"--junitxml={work / 'gpu_tests.xml'}", *gpu_tests)],
              needs=("install",)),
        Stage("bench_ops", 150, 40, [bench("bench_ops", *(f"benchmarks/bench_{name}.py" for name in OP_BENCHMARKS))],
              needs=("install",)),
        Stage("qk_norm_rope", 90, 30, [bench("qk_norm_rope", "benchmarks/bench_qk_norm_rope.py")], needs=("install",)),
        Stage("rest", 150, 40, [bench("rest", "benchmarks/bench_dit_block.py", "benchmarks/bench_train_step.py",
                                      extra=("-k", "test_dit_blocks or test_engine_step"))],
              env={} if smoke else {"BENCH_TRAIN_MODELS": "SiT-XL/2"}, needs=("install",)),
    ]
    for stage in stages:
        if stage.name in args.stage_limit:
            stage.limit_s = args.stage_limit[stage.name]
            stage.min_s = min(stage.min_s, stage.limit_s)
        if stage.name in args.inject:  # for testing the check itself: this stage breaks as a real one can
            stage.commands = [[sys.executable, "-c", INJECTED[args.inject[stage.name]]]]
    return [s for s in stages if s.name in ALWAYS or args.stages is None or s.name in args.stages]


# ----------------------------------------------------------------------------------------------- running


def echo(line: str) -> None:
    print(line, flush=True)


def pump(stream, log, echo_rows: bool) -> None:
    """Copy a stage's output to its log line by line, echoing the measured rows to the console as they come."""
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        log.write(line)
        log.flush()
        if echo_rows and ROW_PREFIX in line:  # pytest -v may print the test's name first on the same line
            echo(line[line.index(ROW_PREFIX):].rstrip("\n"))


def run_command(argv: list, env: dict, log, timeout: float) -> tuple:
    """(rc, cut_off): run argv in its own process group; at `timeout` SIGINT the group, SIGKILL after the grace."""
    log.write(f"$ {shlex.join(argv)}\n")
    log.flush()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    reader = threading.Thread(target=pump, args=(proc.stdout, log, True), daemon=True)
    reader.start()
    cut_off = False
    try:
        proc.wait(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        cut_off = True
        _signal_group(proc, signal.SIGINT)
        try:
            proc.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=5)
    return proc.returncode, cut_off


def _signal_group(proc, sig) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def run_stage(stage: Stage, env: dict, logs: Path, deadline: float) -> Outcome:
    """Runs one stage inside what is left of the budget; never raises for the stage's own failures."""
    outcome = Outcome(stage.name)
    left = deadline - time.monotonic() - REPORT_RESERVE_S - KILL_GRACE_S
    if left < stage.min_s:
        outcome.status, outcome.note = "skipped", f"needs >= {stage.min_s:.0f} s, {max(left, 0):.0f} s left"
        echo(f"=== {stage.name}: skipped ({outcome.note})")
        return outcome
    limit = min(stage.limit_s, left)
    echo(f"=== {stage.name} (limit {limit:.0f} s)")
    start = time.monotonic()
    stage_env = dict(env, **stage.env, COREDI_GPU_CHECK_STAGE=stage.name)
    with open(logs / f"{stage.name}.log", "a", encoding="utf-8") as log:
        for argv in stage.commands:
            remaining = limit - (time.monotonic() - start)
            rc, cut_off = run_command(argv, stage_env, log, remaining)
            outcome.rc = rc
            if cut_off:
                outcome.status, outcome.note = "cut off", f"SIGINT at its {limit:.0f} s limit"
                break
            if rc != 0:
                outcome.status, outcome.note = "failed", failure_note(logs / f"{stage.name}.log", rc)
                break
        else:
            outcome.status = "ok"
    outcome.seconds = time.monotonic() - start
    tail = (logs / f"{stage.name}.log").read_text(encoding="utf-8", errors="replace").splitlines()[-3:]
    echo(f"--- {stage.name}: {outcome.status} in {outcome.seconds:.0f} s" + "".join(f"\n    {t}" for t in tail))
    return outcome


def failure_note(log: Path, rc: int) -> str:
    """pytest's closing line ('2 failed, 40 passed in 31.0s') when the log has one, else the exit status."""
    lines = [t.strip(" =") for t in log.read_text(encoding="utf-8", errors="replace").splitlines() if t.strip()]
    closing = next((t for t in reversed(lines) if " in " in t and any(w in t for w in ("passed", "failed",
                                                                                          "error", "skipped"))), "")
    return f"exited {rc}" + (f": {closing}" if closing else "")


def base_env(site: Path, rows: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1",
               COREDI_BENCH_ROWS=str(rows))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return env


def run_all(stages: list, env: dict, logs: Path, deadline: float, site: Path, native_lib: Path) -> list:
    """Runs the stages in order; returns their outcomes as dicts (for the report)."""
    outcomes = {}
    for stage in stages:
        unmet = [n for n in stage.needs if n in outcomes and outcomes[n].status != "ok"]
        if unmet:
            outcomes[stage.name] = Outcome(stage.name, "skipped", note=f"{', '.join(unmet)} did not pass")
            echo(f"=== {stage.name}: skipped ({outcomes[stage.name].note})")
            continue
        if stage.name == "install":
            shutil.rmtree(site, ignore_errors=True)  # a clean install: pip keeps what an old --target folder has
        outcomes[stage.name] = run_stage(stage, env, logs, deadline)
        if stage.name == "native" and outcomes["native"].status == "ok" and native_lib.is_file():
            env["COREDI_NATIVE_LIB"] = str(native_lib)  # the installed copy would look for it beside itself
    return [o.as_dict() for o in outcomes.values()]


# ----------------------------------------------------------------------------------------------- the report


def write_outputs(out: Path, work: Path, stages: list, command: str) -> tuple:
    """results.md, summary.txt and the logs' tarball in `out`; returns (exit status, the final printout)."""
    env = {}
    for name in ("env.json", "install.json"):
        if (work / name).is_file():
            env.update(json.loads((work / name).read_text()))
    tables = report.group_tables(report.read_rows(work / "rows.jsonl"))
    tests = report.junit_summary(work / "gpu_tests.xml")
    code, line = report.verdict(stages)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(report.results_markdown(env, stages, tables, tests, command))
    (out / "summary.txt").write_text("\n".join([*report.stage_lines(stages), line]) + "\n")
    def logs_only(info):  # not the installed copy, not the native build
        return None if info.name.split("/")[1:2] in (["site"], ["native"]) else info

    with tarfile.open(out / "gpu_check_logs.tar.gz", "w:gz") as tar:
        tar.add(work, arcname="gpu_check", filter=logs_only)
    return code, report.headline(env, stages, tables, tests)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: tests the check itself")
    parser.add_argument("--budget", type=float, default=None, help="seconds for everything (GPU 540, CPU smoke 600)")
    parser.add_argument("--out", type=Path, default=None, help="where the 3 result files go (default $OUT, else "
                        "gpu_results/)")
    parser.add_argument("--stages", default=None, help=f"comma-separated subset of {', '.join(STAGE_NAMES)} "
                        "(env and install always run)")
    parser.add_argument("--stage-limit", action="append", default=[], metavar="STAGE=SECONDS",
                        help="override one stage's time limit (repeatable)")
    parser.add_argument("--inject", action="append", default=[], metavar="STAGE=fail|hang",
                        help="make STAGE fail, or hang after one row (tests the check's exit status and summary)")
    args = parser.parse_args(argv)
    for name in [] if args.stages is None else args.stages.split(","):
        if name not in STAGE_NAMES:
            parser.error(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")
    args.stages = None if args.stages is None else set(args.stages.split(","))
    injected = dict(item.partition("=")[::2] for item in args.inject)
    for name, kind in injected.items():
        if name not in STAGE_NAMES or kind not in INJECTED:
            parser.error(f"--inject wants STAGE=fail or STAGE=hang with a stage of {', '.join(STAGE_NAMES)}")
    args.inject = injected
    limits = {}
    for item in args.stage_limit:
        name, _, seconds = item.partition("=")
        if name not in STAGE_NAMES or not seconds.replace(".", "", 1).isdigit():
            parser.error(f"--stage-limit wants STAGE=SECONDS with a stage of {', '.join(STAGE_NAMES)}, got {item!r}")
        limits[name] = float(seconds)
    args.stage_limit = limits
    if args.budget is None:
        args.budget = 600.0 if args.cpu_smoke else 540.0
    if args.out is None:
        args.out = Path(os.environ.get("OUT") or ROOT / "gpu_results")
    return args


def main(argv=None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    deadline = started + args.budget
    command = "python3 scripts/gpu_check.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    work = ROOT / "build" / "gpu_check"          # logs, rows, JSON and XML: all of it goes into the tarball
    site = work / "site" if args.cpu_smoke else ROOT / ".site"
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    echo(f"GPU check: budget {args.budget:.0f} s, results to {args.out}, logs in {work}")
    native_lib = (work / "native" if args.cpu_smoke else ROOT / "build" / "native") / "libcoredi_native.so"
    stages = run_all(plan(args, work, site), base_env(site, work / "rows.jsonl"), work / "logs", deadline, site,
                     native_lib)
    code, printout = write_outputs(args.out, work, stages, command)
    echo("")
    echo(printout)
    echo(f"wall {time.monotonic() - started:.0f} s of the {args.budget:.0f} s budget; results in {args.out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
