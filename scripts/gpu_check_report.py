"""The GPU check's report: every measured row as tables, in `results.md` and, the headline part, on the console.

Input: the rows file the benchmarks append to as they measure (`benchmarks/results_rows.py`; one JSON object per
line with its `table`), the environment facts (`scripts/gpu_check_env.py`), the stages' outcomes and the GPU tests'
JUnit XML. Each table gets a speed-up column against its baseline provider measured in the same run (`compile`,
else `eager`, else `torch`), so every ratio is side by side on one card.

Pure functions of their inputs: tests/test_gpu_check.py checks them on made-up rows.
"""
import json
import xml.etree.ElementTree as ET
from pathlib import Path

# Columns that are measurements (not part of what makes a case) and the providers a ratio is taken against.
METRICS = ("ms", "GB/s", "TFLOP/s", "img/s", "MFU %", "peak GiB", "est. GiB")
NOT_CASE = set(METRICS) | {"provider", "optimizer", "stage", "table"}
BASELINES = ("compile", "eager", "torch")
# Tables in the order the console shows them (the rest follow in the order they were measured).
HEADLINE_ORDER = ("train step", "memory estimate", "encoder", "optimizer", "layernorm_modulate",
                  "gated_residual_layernorm_modulate", "joint_embedding", "attention")
CONSOLE_BUDGET = 9500  # characters of the final printout (the GPU tool returns the last 12,000)


def read_rows(path: Path) -> list:
    """The rows file's records in the order they were measured; a torn last line (a killed writer) is skipped."""
    rows = []
    if not Path(path).is_file():
        return rows
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def group_tables(rows: list) -> dict:
    """{table name: [rows without the bookkeeping keys]}, tables and rows in measurement order."""
    tables = {}
    for row in rows:
        tables.setdefault(row.get("table", "benchmark"), []).append(
            {k: v for k, v in row.items() if k not in ("table", "stage")})
    return tables


def add_speedups(rows: list) -> list:
    """Adds `x <baseline>` (baseline ms / row ms) to rows that have a baseline provider for the same case."""
    providers = {r.get("provider") for r in rows}
    baseline = next((b for b in BASELINES if b in providers), None)
    if baseline is None or not any("ms" in r for r in rows):
        return rows

    def case(r):
        return tuple((k, str(v)) for k, v in r.items() if k not in NOT_CASE and not k.startswith("x "))

    base_ms = {case(r): r["ms"] for r in rows if r.get("provider") == baseline and r.get("ms")}
    column = f"x {baseline}"
    out = []
    for r in rows:
        base = base_ms.get(case(r))
        out.append(dict(r, **{column: base / r["ms"] if base and r.get("ms") else None}))
    return out


def format_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else (f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}")
    return str(value)


def _columns(rows: list) -> list:
    return list(dict.fromkeys(k for r in rows for k in r))


def markdown_table(rows: list) -> str:
    columns = _columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(format_value(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def text_table(rows: list) -> str:
    columns = _columns(rows)
    cells = [columns] + [[format_value(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)).rstrip() for row in cells)


def junit_summary(path: Path) -> dict:
    """{'passed', 'failed', 'errors', 'skipped', 'failures': [(test, first line of the message)]} from JUnit XML;
    {} when the file is missing or unreadable (the stage died before pytest wrote it)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    counts = dict(passed=0, failed=0, errors=0, skipped=0, failures=[])
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}".lstrip(":")
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
        else:
            counts["failed" if outcome.tag == "failure" else "errors"] += 1
            message = (outcome.get("message") or outcome.text or "").strip().splitlines()
            counts["failures"].append((name, message[0][:200] if message else ""))
    return counts


def tests_line(summary: dict) -> str:
    if not summary:
        return "GPU tests: no JUnit report (the stage did not finish or did not run)"
    line = (f"GPU tests: {summary['passed']} passed, {summary['failed']} failed, {summary['errors']} errors, "
            f"{summary['skipped']} skipped")
    return "\n".join([line] + [f"  FAILED {name}: {message}" for name, message in summary["failures"]])


def stage_lines(stages: list) -> list:
    """One line per stage: name, status, seconds, rc, note."""
    lines = []
    for s in stages:
        rc = "" if s.get("rc") is None else f" rc={s['rc']}"
        note = f"  ({s['note']})" if s.get("note") else ""
        lines.append(f"{s['name']:<18} {s['status']:<8} {s.get('seconds', 0):6.1f} s{rc}{note}")
    return lines


def verdict(stages: list) -> tuple:
    """(exit status, one line): non-zero when a stage failed or was cut off; the line names them."""
    bad = {status: [s["name"] for s in stages if s["status"] == status] for status in ("failed", "cut off")}
    skipped = [s["name"] for s in stages if s["status"] == "skipped"]
    parts = [f"{status}: {', '.join(names)}" for status, names in bad.items() if names]
    if skipped:
        parts.append(f"skipped: {', '.join(skipped)}")
    code = 1 if bad["failed"] or bad["cut off"] else 0
    return code, f"exit {code}" + (f" ({'; '.join(parts)})" if parts else " (every stage ran and passed)")


def env_line(env: dict) -> str:
    keys = ("gpu", "smi driver_version", "torch", "triton", "cuda", "cudnn", "commit", "source digest")
    return " | ".join(f"{k.replace('smi ', '')} {env[k]}" for k in keys if k in env)


def ordered_tables(tables: dict) -> list:
    first = [name for name in HEADLINE_ORDER if name in tables]
    return first + [name for name in tables if name not in first]


def results_markdown(env: dict, stages: list, tables: dict, tests: dict, command: str) -> str:
    """The whole results page: the card and versions, the command, the stages, every table, the GPU tests."""
    code, line = verdict(stages)
    parts = ["# GPU check results", "", f"Command: `{command}`", "", "| fact | value |", "|---|---|"]
    parts += [f"| {k} | {v} |" for k, v in env.items()]
    parts += ["", "## Stages", "", "```", *stage_lines(stages), line, "```", ""]
    for name in ordered_tables(tables):
        parts += [f"## {name}", "", markdown_table(add_speedups(tables[name])), ""]
    parts += ["## GPU tests", "", "```", tests_line(tests), "```", ""]
    return "\n".join(parts)


def headline(env: dict, stages: list, tables: dict, tests: dict, budget: int = CONSOLE_BUDGET) -> str:
    """The final printout: the environment, the tables in headline order while they fit `budget` characters, the
    GPU tests, then the stage summary (always last, always whole)."""
    code, line = verdict(stages)
    tail = "\n".join(["=== stages", *stage_lines(stages), line])
    head = "=== GPU check on " + env_line(env)
    test_block = tests_line(tests)
    used = len(head) + len(tail) + len(test_block) + 200
    blocks, left_out = [], []
    for name in ordered_tables(tables):
        block = f"--- {name}\n{text_table(add_speedups(tables[name]))}"
        if used + len(block) + 1 <= budget:
            blocks.append(block)
            used += len(block) + 1
        else:
            left_out.append(name)
    if left_out:
        blocks.append(f"(in results.md only, for room: {', '.join(left_out)})")
    return "\n".join([head, *blocks, test_block, tail])
