"""Benchmark rows leave the process the moment they are measured: one JSON line in a file and one printed line.

The GPU check (`scripts/gpu_check.py`) sets $COREDI_BENCH_ROWS to its rows file and runs pytest with `-s`, so every
row is on disk and on the console before the next benchmark starts. A stage that is cut off (SIGINT at its time
limit, an out-of-memory crash, a hung kernel) keeps every row it finished; the end-of-session tables of
`conftest.py` and `bench_train_step.py` print only when pytest gets that far. Without the variable nothing is written
or printed here: plain `pytest benchmarks/` shows the usual tables at the end.
"""
import json
import os

ENV_ROWS = "COREDI_BENCH_ROWS"    # path of the JSON-lines file (appended to)
ENV_STAGE = "COREDI_GPU_CHECK_STAGE"  # the GPU check's stage name, recorded with each row
ROW_PREFIX = "[row]"              # what the GPU check echoes from a stage's output


def format_value(value) -> str:
    """A number as the tables show it: 3 significant decimals below 100, none above; None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def format_row(table: str, row: dict) -> str:
    """One printable line: `[row] table | key=value key=value ...`."""
    cells = " ".join(f"{key}={format_value(value)}" for key, value in row.items())
    return f"{ROW_PREFIX} {table} | {cells}"


def emit(table: str, row: dict) -> None:
    """Append `row` (plain values: str, int, float, None) to table `table` of the rows file, and print it."""
    path = os.environ.get(ENV_ROWS)
    if not path:
        return
    record = {"table": table, "stage": os.environ.get(ENV_STAGE, ""), **row}
    with open(path, "a", encoding="utf-8") as f:  # closed (flushed) after every row
        f.write(json.dumps(record, default=str) + "\n")
    print(format_row(table, row), flush=True)
