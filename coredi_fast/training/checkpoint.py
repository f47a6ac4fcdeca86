"""Training checkpoints: written atomically, loaded with `weights_only=True`.

A checkpoint is one file, `<out>/checkpoints/step-XXXXXXX.pt`, holding plain containers of tensors and numbers:

    format            "coredi_fast/1"
    step              optimizer steps done
    model             denoiser state dict (public SiT/DiT parameter names: loads into their code and ours)
    ema               fp32 EMA of the denoiser (same names)
    projector         the feature projector's state dict (W, BatchNorm running stats, statistics buffers)
    optimizer         optimizer state dict (per rank for DeepSpeed ZeRO, see `engine.py`)
    rng               torch / numpy / python RNG states (this rank)
    data              the sampler's position (epoch, step in epoch)
    counters          {"skipped_steps": ...}
    config            the full training config as a nested dict of plain values (rebuilds the run)
    model_config      `model.config` (rebuilds the denoiser with `create_model(**model_config)`)

The file is first written to `<name>.tmp` and renamed, so a crash mid-write never leaves a truncated checkpoint
under a checkpoint name, and `latest.txt` (also replaced atomically) names the newest complete one.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

FORMAT = "coredi_fast/1"
_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


def atomic_torch_save(obj, path: str | Path) -> None:
    """torch.save to `path` via a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step-{step:07d}.pt"


def checkpoint_files(out_dir: str | Path) -> list[tuple[int, Path]]:
    """[(step, path)] of a run folder's checkpoints, oldest first (partitions and set-aside files excluded)."""
    folder = Path(out_dir) / "checkpoints"
    return sorted((int(m.group(1)), p) for p in folder.glob("step-*.pt") if (m := _STEP_FILE.match(p.name)))


def checkpoint_steps(out_dir: str | Path) -> list[int]:
    return [step for step, _ in checkpoint_files(out_dir)]


def latest_checkpoint(out_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint of a run folder, or None."""
    folder = Path(out_dir) / "checkpoints"
    pointer = folder / "latest.txt"
    if pointer.is_file():
        candidate = folder / pointer.read_text().strip()
        if candidate.is_file():
            return candidate
    steps = checkpoint_files(out_dir)
    return steps[-1][1] if steps else None


def resume_candidates(out_dir: str | Path) -> list[Path]:
    """Checkpoints to try on `run.resume=auto`, newest first: the one latest.txt names, then every other by step."""
    newest = latest_checkpoint(out_dir)
    rest = [p for _, p in reversed(checkpoint_files(out_dir)) if p != newest]
    return ([newest] if newest is not None else []) + rest


def set_aside(path: Path, reason: str) -> Path:
    """Rename a checkpoint that does not load to `<name>.damaged` (kept for inspection, out of resume's and pruning's
    way) with a `.why` note beside it; returns the new path."""
    target = path.with_name(path.name + ".damaged")
    os.replace(path, target)
    target.with_name(target.name + ".why").write_text(reason + "\n")
    return target


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": _python_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal.tolist()), None if gauss is None else float(gauss)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _numpy_state():
    # Tensors and numbers only, so the checkpoint stays loadable with weights_only=True.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]


def _python_state():
    version, internal, gauss = random.getstate()
    return [version, torch.tensor(internal, dtype=torch.int64), gauss]


def save_checkpoint(out_dir: str | Path, step: int, payload: dict, keep_last: int = 0) -> Path:
    """Write `payload` (see module doc) as the step's checkpoint; update latest.txt; prune old ones if asked."""
    path = checkpoint_path(out_dir, step)
    atomic_torch_save({"format": FORMAT, "step": step, **payload}, path)
    pointer = path.parent / "latest.txt"
    tmp = pointer.with_name("latest.txt.tmp")
    tmp.write_text(path.name + "\n")
    os.replace(tmp, pointer)
    if keep_last > 0:  # only ever older checkpoints: nothing at or after this step is deleted
        older = [p for s, p in checkpoint_files(out_dir) if s < step]
        for old in older[:max(len(older) - (keep_last - 1), 0)]:
            old.unlink(missing_ok=True)
    return path


def strip_wrapper_prefixes(state_dict: dict) -> dict:
    """The state dict with DDP's `module.` and torch.compile's `_orig_mod.` key prefixes dropped."""
    out = {}
    for key, value in state_dict.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load one of our checkpoints (weights_only=True); clear errors for a missing, foreign or damaged file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated/corrupt files
        raise ValueError(f"cannot read checkpoint {path}: {_load_failure(e, path)}") from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a coredi_fast training checkpoint (no format={FORMAT!r}); "
                         "use `load_denoiser_weights` for SiT/REPA/ReDi checkpoints")
    return blob


def read_weights_file(path: str | Path, mmap: bool = False):
    """torch.load(weights_only=True) of any weights file: tensors, containers, numbers and strings, plus
    argparse.Namespace (the "args" public training scripts store); any other pickled object is refused unbuilt, so
    no code in the file runs. mmap: map the tensors instead of reading them (zip files, torch >= 1.6's format:
    cheap when only a part, or only the shapes, is needed); an older file is then read whole.
    Raises FileNotFoundError, or ValueError naming the file and what torch refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as e:
                if not (mmap and "mmap" in str(e)):  # not a zip file: no mapping, read it as it is
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for truncated, corrupt or refused files
            raise ValueError(f"cannot read checkpoint {path}: {_load_failure(e, path)}") from e


def _load_failure(error: Exception, path: Optional[Path] = None) -> str:
    """One line for why torch.load failed. torch's weights_only refusal is a page that ends in advice to load with
    weights_only=False (which runs whatever the file holds): keep only what it refused."""
    text = str(error)
    refused = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
    if refused:
        return (f"it holds a pickled {refused.group(1)}, which is not weights; refused without building it "
                f"(nothing in the file was run)")
    if "Weights only load failed" in text:
        body = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else text
        detail = " ".join(body.split("Check the documentation")[0].split())
        return f"not a weights-only file ({detail[-300:]}); refused without running it"
    text = f"{type(error).__name__}: {' '.join(text.split())[:300]}"
    if path is not None and not zipfile.is_zipfile(path):  # torch.save writes zip archives (since torch 1.6)
        return f"not a whole file written by torch.save ({text})"
    return text


def load_denoiser_weights(path: str | Path, prefer_ema: bool = True) -> tuple[dict, dict]:
    """The denoiser state dict from our checkpoint or a public SiT/DiT/REPA/ReDi one.

    Public training scripts save {"model", "ema", "opt", "args"} with `args` an argparse.Namespace; that class is
    allow-listed so those files load with weights_only=True too. Returns (state_dict, info) where info has
    "source" ("coredi_fast" | "public"), "which" ("ema" | "model") and, for ours, "model_config" and "config".
    """
    path = Path(path)
    blob = read_weights_file(path)
    info: dict = {"source": "coredi_fast" if isinstance(blob, dict) and blob.get("format") == FORMAT else "public"}
    if isinstance(blob, dict) and info["source"] == "coredi_fast":
        info["model_config"] = blob.get("model_config")
        info["config"] = blob.get("config")
        info["step"] = blob.get("step")
    if isinstance(blob, dict) and prefer_ema and isinstance(blob.get("ema"), dict):
        info["which"] = "ema"
        return blob["ema"], info
    if isinstance(blob, dict) and isinstance(blob.get("model"), dict):
        info["which"] = "model"
        return blob["model"], info
    if isinstance(blob, dict) and blob and all(isinstance(v, torch.Tensor) for v in blob.values()):
        info["which"] = "model"  # a bare state dict (e.g. the released DiT/SiT .pt files)
        return blob, info
    raise ValueError(f"{path} holds no model weights (expected keys 'ema' or 'model', or a bare state dict)")
