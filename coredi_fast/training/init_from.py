"""`model.init_from`: a fresh run starts from another run's weights (fine-tuning), ReDi's, SiT's, REPA's or ours.

Accepted files, all read with `torch.load(weights_only=True)` (`checkpoint.read_weights_file`): tensors, containers
and numbers, plus argparse.Namespace, the one class allowed, for the "args" the public scripts store; anything else
pickled is refused without being built, so nothing in the file runs.

    ReDi's train_redi.py, SiT's train.py     {"model", "ema", "opt", "args"}
    REPA's train.py                          {"model", "ema", "opt", "args", "steps"}
    coredi_fast checkpoints (checkpoint.py)  {"format", "model", "ema", "projector", "config", ...}
    a bare state dict                        {name: tensor} (e.g. the released DiT/SiT .pt files, which are EMAs)

`model.init_weights` picks "ema" (the default) or "model" where the file holds both; a file with one takes that one
(the log says which). EMA by default because the EMA is the model that ReDi, SiT and REPA sample from and report
FID for (their `find_model` and sample scripts load "ema"), and the published weights are EMAs; "model" is the raw
last iterate, the one their own resume continues to optimize.

What is taken: the denoiser's weights, every key and shape against the configured model (DDP's `module.` and
torch.compile's `_orig_mod.` prefixes stripped). REPA's alignment heads (`projectors.*`, ReDi+REPA's `projector.*`)
serve only REPA's loss, which this trainer does not train: they are dropped, as sample.py drops them, unless the
model is built with `projector_dims` (model.overrides), which keeps them (ReDi's renamed as `SiT.load_state_dict`
does). From our own checkpoints also the feature projector (W, its BatchNorm and the feature statistics), which the
denoiser's feature channels were trained against. Not taken: the optimizer state (AdamW starts fresh), the step (0),
the data position, the RNG state. The EMA starts equal to the loaded weights.

ReDi's checkpoints hold no feature projector: ReDi's basis is the separate file pcs/dino_pca_model.pth. To fine-tune
a ReDi model on the features it was trained with, set `encoder.pca_file` to that file (method.projector.mode=pca,
dim 8, as configs/imagenet256_redi_xl.yaml); without it the feature channels come from statistics computed here, a
slightly different basis the loaded denoiser has not seen.

Only a fresh run is initialized: when `run.resume` continues the run's own checkpoint, init_from is ignored (the log
says so). A mismatch is found by preflight (train.py exits with status 2 before the run folder is written).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..models.sit import REPA_HEAD_PREFIXES, convert_redi_state_dict
from .checkpoint import FORMAT, read_weights_file, resume_candidates, strip_wrapper_prefixes
from .config import TrainConfig

# Projector settings that change its state dict's layout or meaning; they must match our checkpoint's to load its W.
PROJECTOR_LAYOUT = ("mode", "feature_dim", "dim", "norm", "norm_affine")


@dataclass
class InitWeights:
    """What `read_init_weights` found in the file (tensors as stored, possibly memory-mapped)."""
    path: Path
    denoiser: dict                    # {name: tensor}, wrapper prefixes stripped, REPA heads still in
    key: str                          # "ema" | "model" | "state dict": where in the file `denoiser` came from
    kind: str                         # what the file is, for the log
    projector: Optional[dict] = None  # our checkpoints only: the feature projector's state dict
    projector_config: Optional[dict] = None   # our checkpoints only: the method.projector it was trained with


def starts_fresh(cfg: TrainConfig) -> bool:
    """True when this run starts at step 0: run.resume=none, or auto in a folder with no checkpoint of its own.
    (A folder whose checkpoints all turn out damaged also starts at 0: `Trainer.resume` refuses that case when
    init_from is set, so a second start applies it.)"""
    r = cfg.run.resume
    if r == "none":
        return True
    return r == "auto" and not resume_candidates(cfg.run.out_dir)


def read_init_weights(path: str | Path, which: str = "ema") -> InitWeights:
    """Read `path` (model.init_from) and pick its denoiser weights (`which`: "ema" | "model", where both exist).
    Raises ValueError starting with "model.init_from:" for a missing, unreadable, refused or weight-less file."""
    path = Path(path)
    try:
        blob = read_weights_file(path, mmap=True)  # mapped: preflight reads only the shapes, the trainer one entry
    except (FileNotFoundError, ValueError) as error:
        raise ValueError(f"model.init_from: {error}") from None
    if not isinstance(blob, dict):
        raise ValueError(f"model.init_from: {path} holds a {type(blob).__name__}, not model weights (expected a "
                         f"training checkpoint with 'ema' / 'model' entries, or a state dict)")
    ours = blob.get("format") == FORMAT
    present = [k for k in ("ema", "model") if isinstance(blob.get(k), dict)]
    if present:
        key = which if which in present else present[0]
        kind = (f"coredi_fast checkpoint at step {blob.get('step')}" if ours
                else f"training checkpoint with entries {sorted(str(k) for k in blob)}{_trained_as(blob.get('args'))}")
    elif blob and all(isinstance(v, torch.Tensor) for v in blob.values()):
        key, kind = "state dict", "state dict"
    else:
        shown = sorted(str(k) for k in blob)[:8]
        raise ValueError(f"model.init_from: {path} holds no model weights: no 'ema' or 'model' entry, and not a state "
                         f"dict of tensors (its keys: {shown})")
    weights = blob[key] if key != "state dict" else blob
    bad = [name for name, value in weights.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise ValueError(f"model.init_from: {path}: the '{key}' entry is not a state dict ({bad[0]!r} holds a "
                         f"{type(weights[bad[0]]).__name__})")
    projector = blob.get("projector") if ours else None
    stored = (blob.get("config") or {}).get("method", {}).get("projector") if ours else None
    return InitWeights(path, strip_wrapper_prefixes(weights), key, kind, projector, stored)


def fit_denoiser_weights(weights: InitWeights, model: nn.Module, model_name: str) -> tuple[dict, list]:
    """(the state dict to load into `model` strictly, the REPA head keys dropped). A model on the meta device works
    (only shapes are compared). Raises ValueError naming model.init_from and the first mismatching keys."""
    state = weights.denoiser
    heads = [k for k in state if k.startswith(REPA_HEAD_PREFIXES)]
    if hasattr(model, "projectors"):  # built with projector_dims: keep the heads, ReDi's under REPA's name
        state, dropped = convert_redi_state_dict(state), []
    else:
        state, dropped = {k: v for k, v in state.items() if k not in heads}, heads
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    problems = [f"{k} is {list(state[k].shape)} in the file, {list(expected[k])} here" for k in wrong[:3]]
    if missing:
        problems.append(f"missing {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected {_first(unexpected)}")
    if problems:
        raise ValueError(f"model.init_from: {_which(weights)} of {weights.path} do not fit {model_name} as "
                         f"configured: {'; '.join(problems)} (shapes follow model.name, model.learn_sigma, "
                         f"model.class_dropout_prob, data.image_size and method.projector.dim: set them as the file "
                         f"was trained)")
    return state, dropped


def check_projector_fits(weights: InitWeights, cfg: TrainConfig) -> None:
    """Our checkpoint's feature projector replaces this run's: its layout must match, and no other statistics may be
    asked for. Raises ValueError naming the fields. A file without a projector passes."""
    if weights.projector is None:
        return
    stored = weights.projector_config or {}
    configured = vars(cfg.method.projector)
    differ = [f"method.projector.{k}={stored[k]!r} there, {configured[k]!r} here" for k in PROJECTOR_LAYOUT
              if k in stored and stored[k] != configured[k]]
    if ("regularizer" in stored) and (stored["regularizer"] == "vf") != (configured["regularizer"] == "vf"):
        differ.append(f"method.projector.regularizer={stored['regularizer']!r} there, {configured['regularizer']!r} "
                      f"here (vf has its own weights)")
    if differ:
        raise ValueError(f"model.init_from: {weights.path} is a coredi_fast checkpoint whose feature projector (W and "
                         f"statistics) comes along, but it does not fit: {'; '.join(differ)}")
    for name in ("pca_file", "statistics"):
        if getattr(cfg.encoder, name):
            raise ValueError(f"model.init_from: {weights.path} is a coredi_fast checkpoint and brings the feature "
                             f"statistics its denoiser was trained with; encoder.{name} would be replaced by them: "
                             f"leave encoder.{name} unset")


def init_from_checkpoint(cfg: TrainConfig, denoiser: nn.Module, projector: nn.Module) -> str:
    """Load model.init_from into the freshly built `denoiser` (and, from our checkpoints, `projector`); call before
    the optimizer and the EMA are built, so the EMA starts as these weights and the optimizer sees them. Returns the
    line to log. Raises ValueError as preflight does (the file may have changed since)."""
    weights = read_init_weights(cfg.model.init_from, cfg.model.init_weights)
    state, dropped = fit_denoiser_weights(weights, denoiser, cfg.model.name)
    check_projector_fits(weights, cfg)
    denoiser.load_state_dict(state)
    took = _which(weights)
    if weights.key != "state dict" and weights.key != cfg.model.init_weights:
        took += f" (model.init_weights={cfg.model.init_weights}, but the file has no '{cfg.model.init_weights}')"
    line = f"model.init_from: {took} of {weights.path} ({weights.kind}): {len(state)} tensors into {cfg.model.name}"
    if dropped:
        line += f" ({len(dropped)} REPA head tensors ({dropped[0].split('.')[0]}.*) dropped)"
    if weights.projector is not None:
        projector.load_state_dict(weights.projector)
        line += f", and its feature projector ({len(weights.projector)} tensors: W, normalization, statistics)"
    line += "; the EMA starts equal to these weights, the optimizer starts fresh, at step 0"
    if weights.projector is None and cfg.method.projector.mode != "none" and not cfg.encoder.pca_file:
        line += ("; the file has no feature projector: the feature channels use this run's statistics (for ReDi's "
                 "own basis, set encoder.pca_file)")
    return line


def _which(weights: InitWeights) -> str:
    return "the weights" if weights.key == "state dict" else f"the '{weights.key}' weights"


def _trained_as(args) -> str:
    """', trained as SiT-XL/2' from the public scripts' argparse.Namespace (their --model), or ''."""
    model = getattr(args, "model", None) if isinstance(args, argparse.Namespace) else None
    return f", trained as {model}" if isinstance(model, str) else ""


def _first(keys: list, n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")
