"""The study's per-run cache: one JSON file per (group, variant, seed), reused only when made with the same settings.

    runs/<variant>__seed<k>.json            the "main" group (class-conditional SiT-Micro: the original study's ids)
    runs/<group>/<variant>__seed<k>.json    every other group (e.g. runs/uncond/coredi__seed3.json)

A cached run is valid when its fingerprint equals the current settings' (`StudyConfig.fingerprint`), it belongs to
the group asked for, and (when it recorded one) its variant's definition (`Variant.spec`) is the current one.

runs/ is not committed (the samples make it large); results.json keeps every run's curve. `restore_from_results`
writes the runs of results.json that runs/ lacks back into runs/ (without their samples), so a fresh checkout
resumes the study instead of retraining what results.json already holds, and rewriting results.json cannot lose
them.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import List, Optional

MAIN_GROUP = "main"
_NAME = re.compile(r"^(?P<variant>.+)__seed(?P<seed>-?\d+)\.json$")


def run_path(out: Path, variant: str, seed: int, group: str = MAIN_GROUP) -> Path:
    """Where the run (group, variant, seed) is cached in the study folder `out`."""
    folder = Path(out) / "runs"
    return (folder if group == MAIN_GROUP else folder / group) / f"{variant}__seed{seed}.json"


def write_json(path: Path, payload: dict) -> None:
    """Write atomically (a temporary file, then a rename): an interrupted write leaves the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def _read(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _valid(result: Optional[dict], group: str, fingerprint: str, variant_spec: Optional[dict]) -> bool:
    if not isinstance(result, dict) or result.get("fingerprint") != fingerprint:
        return False
    if result.get("group", MAIN_GROUP) != group:
        return False
    return variant_spec is None or "variant_spec" not in result or result["variant_spec"] == variant_spec


def load_run(out: Path, variant: str, seed: int, config, group: str = MAIN_GROUP,
             variant_spec: Optional[dict] = None) -> Optional[dict]:
    """The cached result of (group, variant, seed), or None when absent, unreadable or made with other settings."""
    result = _read(run_path(out, variant, seed, group))
    return result if _valid(result, group, config.fingerprint(), variant_spec) else None


def save_run(out: Path, result: dict) -> Path:
    """Cache one run's result (its "group", "variant" and "seed" name the file)."""
    path = run_path(out, result["variant"], result["seed"], result.get("group", MAIN_GROUP))
    write_json(path, result)
    return path


def cached_runs(out: Path, group: str, config, variants: Optional[List[str]] = None) -> List[dict]:
    """Every valid cached run of `group` in `out` (any seed), optionally only of `variants`; sorted by variant
    order (as given) then seed."""
    folder = run_path(out, "x", 0, group).parent
    found = []
    for path in sorted(folder.glob("*__seed*.json")) if folder.is_dir() else []:
        match = _NAME.match(path.name)
        if match is None or (variants is not None and match["variant"] not in variants):
            continue
        result = _read(path)
        if _valid(result, group, config.fingerprint(), None) and result.get("variant") == match["variant"]:
            found.append(result)
    order = {name: i for i, name in enumerate(variants or [])}
    return sorted(found, key=lambda r: (order.get(r["variant"], len(order)), r["variant"], r["seed"]))


def restore_from_results(out: Path) -> int:
    """Write each run of `out/results.json` that has no file in `out/runs/` back to its cache file (marked
    "restored_from": "results.json"; it has no samples). Returns how many were restored."""
    stored = _read(Path(out) / "results.json")
    restored = 0
    for run in (stored or {}).get("runs", []):
        if not isinstance(run, dict) or not {"variant", "seed", "fingerprint", "curve"} <= set(run):
            continue
        path = run_path(out, run["variant"], run["seed"], run.get("group", MAIN_GROUP))
        if not path.exists():
            write_json(path, {**run, "restored_from": "results.json"})
            restored += 1
    return restored
