"""The DeepSpeed json, reconciled with the run's config: the config is the one source of truth.

`optim.grad_clip` decides gradient clipping for every launcher. Plain and torchrun runs clip in the engine; under
DeepSpeed its engine clips with the json's "gradient_clipping", and DeepSpeed quietly uses 1.0 when the key is
missing, so the same recipe would train differently under the two launchers. Here the json's value must equal the
config's: a missing (or "auto") value is filled in from the config, a different one is a start-up error naming the
file, the key and both values. `preflight` runs the check before anything is written; `load_ds_config` applies it
(and fills the batch sizes, which need the number of processes) when the run starts.
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import TrainConfig


def read_ds_config(path: str) -> dict:
    """The json file as a dict; ValueError naming the file when it is missing, not JSON or not an object."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--ds_config: file not found: {p}")
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(ds, dict):
        raise ValueError(f"{p}: a DeepSpeed config must be a JSON object, got {type(ds).__name__}")
    return ds


def reconcile_gradient_clipping(ds: dict, path: str, cfg: TrainConfig) -> dict:
    """Fill ds["gradient_clipping"] from optim.grad_clip when it is missing or "auto"; raise ValueError when it is
    set to another value. Returns `ds` (changed in place)."""
    clip = cfg.optim.grad_clip
    given = ds.get("gradient_clipping", "auto")
    if given == "auto" or given is None:
        ds["gradient_clipping"] = clip
        return ds
    if isinstance(given, bool) or not isinstance(given, (int, float)):
        raise ValueError(f"{path}: \"gradient_clipping\" must be a number, got {given!r}")
    if float(given) != clip:
        raise ValueError(f"{path}: \"gradient_clipping\": {given} disagrees with optim.grad_clip={clip} (the config "
                         f"decides clipping for every launcher): set the json's gradient_clipping to {clip} or remove "
                         f"it, or set optim.grad_clip={float(given)}")
    ds["gradient_clipping"] = clip
    return ds


def load_ds_config(path: str, cfg: TrainConfig, world_size: int) -> dict:
    """Read the DeepSpeed json and reconcile it with the run's config: batch sizes and gradient clipping filled in
    from the config, conflicts fail naming the file and the field."""
    ds = read_ds_config(path)
    global_batch = cfg.data.global_batch_size
    expected = {"train_batch_size": global_batch, "train_micro_batch_size_per_gpu": global_batch // world_size,
                "gradient_accumulation_steps": 1}
    for key, value in expected.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif int(ds[key]) != value:
            raise ValueError(f"{path}: {key}={ds[key]} conflicts with data.global_batch_size={global_batch} on "
                             f"{world_size} processes (expected {value}; set it to \"auto\")")
    reconcile_gradient_clipping(ds, path, cfg)
    if cfg.run.precision == "fp32":
        ds.setdefault("torch_autocast", {})["enabled"] = False
    ds.setdefault("steps_per_print", 10**9)
    return ds
