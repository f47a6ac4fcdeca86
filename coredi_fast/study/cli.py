"""`python scripts/digits_study.py` / `python -m coredi_fast.study`: the whole CPU study in one command.

    python scripts/digits_study.py --out docs/study           # ~half an hour on 2 CPU cores, resumable
    python scripts/digits_study.py --out /tmp/q --quick       # seconds: a smoke run (numbers are meaningless)
    python scripts/digits_study.py --out docs/study --report-only   # rebuild tables and plot from cached runs
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional, Sequence

from .variants import VARIANT_NAMES

DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_KEY_SEEDS = (3, 4)
KEY_VARIANTS = ("sit", "redi", "redi-bn", "coredi", "coredi-lz0.1", "jit", "jit-coredi",
                "jit-coredi-lz0.1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="digits_study.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/study", help="study folder (runs/ cache, results.*, plot)")
    parser.add_argument("--quick", action="store_true", help="tiny settings, one seed, one process: seconds")
    parser.add_argument("--workers", type=int, default=None, help="processes of one thread each (default 2; "
                        "quick: 1)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help=f"seeds for every variant (default "
                        f"{' '.join(map(str, DEFAULT_SEEDS))}; quick: 0)")
    parser.add_argument("--key-seeds", type=int, nargs="*", default=None, help=f"extra seeds for "
                        f"{', '.join(KEY_VARIANTS)} (default {' '.join(map(str, DEFAULT_KEY_SEEDS))}; quick: none)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANT_NAMES), choices=VARIANT_NAMES,
                        metavar="NAME", help=f"variants to run (default all: {', '.join(VARIANT_NAMES)})")
    parser.add_argument("--steps", type=int, default=None, help="training steps (eval checkpoints scale along)")
    parser.add_argument("--model", default=None, help="SiT zoo name (default SiT-Micro/2; SiT-Tiny/2 is ~6x slower)")
    parser.add_argument("--report-only", action="store_true", help="no training: report the cached runs")
    return parser


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


class _LoadSampler:
    """Samples the 1-minute load average every `every` seconds in a background thread while in the `with` block:
    the study's own workers add about their count, the rest is other users of the CPU (reported, not hidden)."""

    def __init__(self, every: float = 15.0):
        self.every = every
        self.samples = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.every):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> list:
        return [round(sum(self.samples) / len(self.samples), 2), round(max(self.samples), 2)] if self.samples else []


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run (or resume) the study and write the report; returns the written paths and the summary."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from .report import summarize, write_report
    from .runner import StudyConfig, StudyPlan, load_run, measure_timing, run_study
    from .variants import get_variants

    config = StudyConfig.quick() if args.quick else StudyConfig()
    if args.steps is not None:
        if args.steps < 4:
            raise SystemExit(f"--steps must be >= 4, got {args.steps}")
        fractions = [s / config.steps for s in config.eval_steps]
        config = replace(config, steps=args.steps, eval_steps=tuple(sorted({max(1, round(f * args.steps))
                                                                            for f in fractions})))
    if args.model is not None:
        from ..models import MODEL_CONFIGS

        if args.model not in MODEL_CONFIGS:
            raise SystemExit(f"--model {args.model!r} is not a SiT zoo name (e.g. SiT-Micro/2, SiT-Tiny/2)")
        config = replace(config, model=args.model)
    seeds = tuple(args.seeds) if args.seeds is not None else ((0,) if args.quick else DEFAULT_SEEDS)
    key_seeds = tuple(args.key_seeds) if args.key_seeds is not None else (() if args.quick else DEFAULT_KEY_SEEDS)
    workers = args.workers if args.workers is not None else (1 if args.quick else 2)
    if workers < 1:
        raise SystemExit(f"--workers must be >= 1, got {workers}")
    plan = StudyPlan(variants=tuple(args.variants), seeds=seeds, key_variants=KEY_VARIANTS,
                     extra_seeds=tuple(s for s in key_seeds if s not in seeds))
    out = Path(args.out)
    log = lambda message: print(message, flush=True)  # noqa: E731
    out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    sessions_path = out / "sessions.json"
    sessions = json.loads(sessions_path.read_text()) if sessions_path.is_file() else []
    timing_of = lambda: measure_timing(out, config, plan.variants, steps=2 if args.quick else 10,  # noqa: E731
                                       rounds=1 if args.quick else 3, log=log)
    if args.report_only:
        results = [r for r in (load_run(out, v, s, config) for v, s in plan.jobs()) if r is not None]
        if not results:
            raise SystemExit(f"--report-only: no cached runs with these settings in {out / 'runs'}")
        timing = timing_of()
    else:
        cached = sum(load_run(out, v, s, config) is not None for v, s in plan.jobs())
        with _LoadSampler() as load:
            results = run_study(out, config, plan, workers=workers, log=log)
            timing = timing_of()
        if len(results) > cached:  # a session that only reused cached runs changes nothing worth recording
            sessions.append({
                "finished": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": "python scripts/digits_study.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "machine": _machine(), "torch": torch.__version__, "workers": f"{workers} process(es) x 1 thread",
                "runs trained": len(results) - cached, "runs cached": cached,
                "wall seconds": round(time.perf_counter() - started, 1),
                "1-min load average (mean, max)": load.summary(),
            })
            _write_text(sessions_path, json.dumps(sessions, indent=1) + "\n")
    summary = summarize(results, timing, get_variants(plan.variants), config)
    meta = {"mode": "quick" if args.quick else "full", "runs": len(results),
            "sum of the runs' own wall times (s)": round(sum(r["wall_seconds"] for r in results), 1),
            "sessions": sessions}
    paths = write_report(out, summary, results, timing, meta, asdict(config))
    log(f"done in {(time.perf_counter() - started) / 60:.1f} min: {', '.join(str(p) for p in paths.values())}")
    return {"paths": paths, "summary": summary}
