"""`python scripts/digits_study.py` / `python -m coredi_fast.study`: the whole CPU study in one command.

    python scripts/digits_study.py --out docs/study           # every group, resumable (see --groups)
    python scripts/digits_study.py --out docs/study --groups uncond      # one stage; the report shows all groups
    python scripts/digits_study.py --out docs/study --estimate-only      # how long the runs still to do will take
    python scripts/digits_study.py --out /tmp/q --quick       # seconds: a smoke run (numbers are meaningless)
    python scripts/digits_study.py --out docs/study --report-only   # rebuild tables and plots from cached runs
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

from .groups import GROUP_NAMES, GROUPS
from .variants import VARIANT_NAMES

DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_KEY_SEEDS = (3, 4)


def build_parser() -> argparse.ArgumentParser:
    groups = "; ".join(f"{g.name}: {g.title}" for g in GROUPS)
    parser = argparse.ArgumentParser(prog="digits_study.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/study", help="study folder (runs/ cache, results.*, plots)")
    parser.add_argument("--groups", nargs="+", default=list(GROUP_NAMES), choices=GROUP_NAMES, metavar="GROUP",
                        help=f"groups to train (default all). {groups}. The report always shows every group with "
                             f"cached runs")
    parser.add_argument("--quick", action="store_true", help="tiny settings, one seed, one process: seconds")
    parser.add_argument("--workers", type=int, default=None, help="processes of one thread each (default 2; "
                        "quick: 1)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help=f"seeds for every variant of every "
                        f"group (default {' '.join(map(str, DEFAULT_SEEDS))}; quick: 0)")
    parser.add_argument("--key-seeds", type=int, nargs="*", default=None, help=f"extra seeds for each group's key "
                        f"variants (default {' '.join(map(str, DEFAULT_KEY_SEEDS))}; quick: none)")
    parser.add_argument("--variants", nargs="+", default=None, choices=VARIANT_NAMES, metavar="NAME",
                        help=f"train only these variants of the chosen groups (default: each group's own; all "
                             f"names: {', '.join(VARIANT_NAMES)})")
    parser.add_argument("--steps", type=int, default=None, help="training steps (eval checkpoints scale along)")
    parser.add_argument("--model", default=None, help="SiT zoo name of the groups without their own model "
                        "(default SiT-Micro/2; the tiny-* groups always use SiT-Tiny/2)")
    parser.add_argument("--report-only", action="store_true", help="no training: report the cached runs")
    parser.add_argument("--estimate-only", action="store_true", help="print how long the runs still to do would "
                        "take, then stop")
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


def _base_config(args):
    from .runner import StudyConfig

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
    return config


def _plans(args, base):
    """(StudyPlan, StudyConfig) of every chosen group that has variants left after --variants."""
    from .runner import StudyPlan

    seeds = tuple(args.seeds) if args.seeds is not None else ((0,) if args.quick else None)
    key_seeds = tuple(args.key_seeds) if args.key_seeds is not None else (() if args.quick else None)
    plans = []
    for group in GROUPS:
        if group.name not in args.groups:
            continue
        variants = tuple(v for v in group.variants if args.variants is None or v in args.variants)
        if not variants:
            continue
        group_seeds = seeds if seeds is not None else group.seeds
        extra = key_seeds if key_seeds is not None else group.key_seeds
        plans.append((StudyPlan(variants=variants, seeds=group_seeds, key_variants=group.key_variants,
                                extra_seeds=tuple(s for s in extra if s not in group_seeds), group=group.name),
                      group.config(base)))
    return plans


def _cached(out: Path, base) -> dict:
    """{group name: (config, its valid cached runs)} for every group."""
    from .cache import cached_runs

    return {g.name: (g.config(base), cached_runs(out, g.name, g.config(base), list(g.variants))) for g in GROUPS}


def _sections(out: Path, base, cached: dict, quick: bool, log):
    """The report's sections: every group with cached runs, with its reference rows and step timing."""
    from .report_groups import build_section
    from .runner import measure_timing
    from .variants import get_variants

    sections = {}
    for group in GROUPS:
        config, runs = cached[group.name]
        if not runs:
            continue
        results = list(runs)
        if group.reference is not None:
            reference_config, reference_runs = cached[group.reference]
            if reference_config.fingerprint() == config.fingerprint():
                results = [r for r in reference_runs if r["variant"] in group.reference_variants] + results
        present = {r["variant"] for r in results}
        # In the group's order: the main group's timing cache is keyed on its variants in this order.
        names = [v for v in group.reference_variants + group.variants if v in present]
        timing = measure_timing(out, config, names, steps=2 if quick else 10, rounds=1 if quick else 3, log=log,
                                group=group.name)
        sections[group.name] = build_section(group, config, results, timing, get_variants(names))
    return sections


def _real_class_counts() -> list:
    from ..data import DigitsDataset

    labels = DigitsDataset(image_size=16, channels=1, split="train").labels()
    return [int((labels == k).sum()) for k in range(10)]


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run (or resume) the chosen groups and write the report of every group; returns the written paths, the main
    group's summary ("summary") and every group's ("summaries")."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from .cache import restore_from_results
    from .estimate import costs_from_runs, describe, estimate
    from .report_groups import write_report
    from .runner import load_job, plan_jobs, run_study

    base = _base_config(args)
    plans = _plans(args, base)
    workers = args.workers if args.workers is not None else (1 if args.quick else 2)
    if workers < 1:
        raise SystemExit(f"--workers must be >= 1, got {workers}")
    out = Path(args.out)
    log = lambda message: print(message, flush=True)  # noqa: E731
    out.mkdir(parents=True, exist_ok=True)
    restored = restore_from_results(out)
    if restored:
        log(f"cache: restored {restored} runs from {out / 'results.json'} into {out / 'runs'} (no samples)")

    def announce(todo):
        if todo:
            known = costs_from_runs((config, run) for config, runs in _cached(out, base).values() for run in runs)
            for line in describe(estimate(todo, known, workers), workers):
                log(line)

    started = time.perf_counter()
    sessions_path = out / "sessions.json"
    sessions = json.loads(sessions_path.read_text()) if sessions_path.is_file() else []
    if args.estimate_only:
        todo = [job for job in plan_jobs(plans) if load_job(out, job) is None]
        log(f"study: {len(todo)} runs to do in {', '.join(args.groups)}")
        announce(todo)
        return {"paths": {}, "summary": None, "summaries": {}}
    if not args.report_only:
        cached_before = sum(len(runs) for _, runs in _cached(out, base).values())
        with _LoadSampler() as load:
            run_study(out, plans, workers=workers, log=log, announce=announce)
        trained = sum(len(runs) for _, runs in _cached(out, base).values()) - cached_before
        if trained > 0:  # a session that only reused cached runs changes nothing worth recording
            sessions.append({
                "finished": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": "python scripts/digits_study.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "machine": _machine(), "torch": torch.__version__, "workers": f"{workers} process(es) x 1 thread",
                "runs trained": trained, "runs cached": cached_before,
                "wall seconds": round(time.perf_counter() - started, 1),
                "1-min load average (mean, max)": load.summary(),
            })
            _write_text(sessions_path, json.dumps(sessions, indent=1) + "\n")
    cached = _cached(out, base)
    results = [run for _, runs in cached.values() for run in runs]
    if not results:
        raise SystemExit(f"no cached runs with these settings in {out / 'runs'}"
                         + (" (--report-only trains nothing)" if args.report_only else ""))
    sections = _sections(out, base, cached, args.quick, log)
    meta = {"mode": "quick" if args.quick else "full", "runs": len(results),
            "runs per group": {name: len(runs) for name, (_, runs) in cached.items() if runs},
            "sum of the runs' own wall times (s)": round(sum(r.get("wall_seconds") or 0.0 for r in results), 1),
            "sessions": sessions}
    paths = write_report(out, sections, meta, asdict(base), _real_class_counts())
    log(f"done in {(time.perf_counter() - started) / 60:.1f} min: {', '.join(str(p) for p in paths.values())}")
    return {"paths": paths, "summary": sections["main"].summary if "main" in sections else None,
            "summaries": {name: section.summary for name, section in sections.items()}}
