"""What a cached file was computed from, kept beside it (`<file>.source.json`), so a cache is reused only for the
same inputs.

The feature statistics are computed once per run folder and cached; a later run in that folder with other data or
another encoder used to reuse them silently. Now the cache carries its inputs, and a cache whose inputs differ, or
that has no record of them, is recomputed with a message that names the difference.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def _record_path(cached: Path) -> Path:
    return cached.with_name(cached.name + ".source.json")


def write_cache_source(cached: Path, source: dict) -> None:
    _record_path(Path(cached)).write_text(json.dumps(source, indent=1, sort_keys=True) + "\n")


def stale_cache_reason(cached: Path, source: dict) -> Optional[str]:
    """None when `cached` was computed from `source`, else why it cannot be reused (one line)."""
    record = _record_path(Path(cached))
    try:
        recorded = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        return f"no readable record of what it was computed from ({record.name})"
    differences = [f"{key} {recorded.get(key)!r} -> {value!r}" for key, value in source.items()
                   if recorded.get(key) != value]
    return None if not differences else "computed from other inputs: " + ", ".join(differences)
