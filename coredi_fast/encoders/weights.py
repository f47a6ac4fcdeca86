"""Where the frozen encoders' pretrained weights come from.

Every encoder takes one `weights` argument, resolved here:

* a path: a weights file (`.safetensors`, `.pth`, `.pt`, `.bin`, `.ckpt`) or a folder holding one (a diffusers model
  folder, say). A path that does not exist raises FileNotFoundError naming it.
* `"hub"`: the Hugging Face Hub copy. A copy already in the local cache is used without touching the network;
  otherwise it is downloaded. Offline (`HF_HUB_OFFLINE=1`, or the hub does not answer within a few seconds) this
  raises `WeightsUnavailableError` at once, saying which weights were wanted, where they were looked for and how to
  pass a local file. The fast check matters: the hub client's own retries hang for ~50 s with no network.
* `None`: random initialization, with a warning. Meant for tests and smoke runs, never for training.

Torch files load with `weights_only=True`: a checkpoint cannot run code on load.
"""
from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
import torch.nn as nn

WeightsArg = Union[str, os.PathLike, None]

HUB = "hub"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
HUB_CHECK_TIMEOUT_S = 3.0
# Keys under which training scripts commonly nest the real state dict (Lightning/LDM "state_dict", DeiT "model").
_WRAPPER_KEYS = ("state_dict", "model", "module")


class WeightsUnavailableError(RuntimeError):
    """Hub weights were asked for but are neither cached nor downloadable (offline)."""


@dataclass(frozen=True)
class HubWeights:
    """Where `weights="hub"` finds a model's weights, and what to tell the user when it cannot.

    repo_id:      Hugging Face repo, e.g. "stabilityai/sd-vae-ft-ema".
    filenames:    candidate weight files in the repo, first available wins.
    extra_files:  files needed next to the weights (a diffusers `config.json`); fetched into the same snapshot.
    description:  human name of the weights for messages, e.g. "DINOv2 ViT-B/14 with 4 registers".
    manual_hint:  how to get the file by hand (an official URL), appended to the offline error.
    """

    repo_id: str
    filenames: tuple[str, ...]
    extra_files: tuple[str, ...] = ()
    description: str = ""
    manual_hint: str = ""


def resolve_weights(weights: WeightsArg, hub: HubWeights, *, arg_name: str = "weights") -> Optional[Path]:
    """Turns a `weights` argument into a local file or folder, or None for random init.

    Returns a Path that exists (a file, or a folder for the caller to look into), or None.
    Raises FileNotFoundError for a missing path, WeightsUnavailableError for unreachable hub weights, TypeError for
    anything that is not a path, "hub" or None.
    """
    if weights is None:
        warnings.warn(
            f"{hub.description or hub.repo_id}: {arg_name}=None, so the weights are RANDOMLY INITIALIZED. "
            "This is only meant for tests; pass a local weights path or 'hub' for real features.",
            stacklevel=3,
        )
        return None
    if isinstance(weights, str) and weights == HUB:
        return _resolve_from_hub(hub)
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"{arg_name} must be a path, 'hub' or None, got {type(weights).__name__}")
    path = Path(weights).expanduser()
    if not path.exists():
        wanted = hub.description or hub.repo_id
        raise FileNotFoundError(f"{arg_name}: no such file or folder: '{path}' (wanted: {wanted})")
    return path


def hub_is_offline() -> bool:
    """True when the user asked huggingface_hub to stay offline (env read now, not only at its import)."""
    flag = os.environ.get("HF_HUB_OFFLINE", "")
    if flag.strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return True
    return bool(constants.HF_HUB_OFFLINE)


def hub_endpoint() -> str:
    """The hub's base URL (`HF_ENDPOINT` if set, read now)."""
    endpoint = os.environ.get("HF_ENDPOINT")
    if endpoint:
        return endpoint.rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def hub_reachable(timeout_s: Optional[float] = None) -> bool:
    """Whether the hub answers an HTTP request within `timeout_s` (default HUB_CHECK_TIMEOUT_S; any status counts).

    The request runs in a daemon thread so that a hanging DNS lookup, which urllib's timeout does not cover, cannot
    stall the caller beyond `timeout_s`.
    """
    timeout_s = HUB_CHECK_TIMEOUT_S if timeout_s is None else timeout_s
    answered = threading.Event()

    def probe():
        try:
            urllib.request.urlopen(urllib.request.Request(hub_endpoint(), method="HEAD"), timeout=timeout_s)
            answered.set()
        except urllib.error.HTTPError:  # an error status is still an answer
            answered.set()
        except Exception:  # unreachable, refused, DNS failure, timeout
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return answered.is_set()


def _resolve_from_hub(hub: HubWeights) -> Path:
    try:
        from huggingface_hub import constants, hf_hub_download
    except ImportError as err:
        raise WeightsUnavailableError(_offline_message(hub, "huggingface_hub is not installed")) from err

    cached = _cached_file(hub)
    if cached is not None:
        return cached
    if hub_is_offline():
        raise WeightsUnavailableError(_offline_message(hub, f"HF_HUB_OFFLINE is set, cache: {constants.HF_HUB_CACHE}"))
    if not hub_reachable():
        raise WeightsUnavailableError(
            _offline_message(hub, f"{hub_endpoint()} did not answer within {HUB_CHECK_TIMEOUT_S:g} s, "
                                  f"cache: {constants.HF_HUB_CACHE}"))

    last_error: Optional[Exception] = None
    for filename in hub.filenames:
        try:
            path = Path(hf_hub_download(hub.repo_id, filename))
            for extra in hub.extra_files:
                hf_hub_download(hub.repo_id, extra)
            return path
        except Exception as err:  # a missing candidate file: try the next one
            last_error = err
    raise WeightsUnavailableError(_offline_message(hub, f"download failed: {last_error}")) from last_error


def _cached_file(hub: HubWeights) -> Optional[Path]:
    """The first candidate weights file already in the local hub cache (with its extra files), else None."""
    from huggingface_hub import try_to_load_from_cache

    for filename in hub.filenames:
        found = try_to_load_from_cache(hub.repo_id, filename)
        if not isinstance(found, str):  # None (not cached) or a "known missing on the hub" sentinel
            continue
        if all(isinstance(try_to_load_from_cache(hub.repo_id, extra), str) for extra in hub.extra_files):
            return Path(found)
    return None


def _offline_message(hub: HubWeights, reason: str) -> str:
    wanted = f"{hub.description} " if hub.description else ""
    files = " or ".join(hub.filenames)
    message = (
        f"Cannot get the pretrained weights {wanted}from the Hugging Face Hub repo '{hub.repo_id}' "
        f"(file {files}{', with ' + ', '.join(hub.extra_files) if hub.extra_files else ''}): {reason}. "
        "Pass a local copy instead, e.g. weights='/path/to/file' (a .safetensors/.pth/.pt/.bin file"
        f"{' or a diffusers model folder' if hub.extra_files else ''})"
    )
    if hub.manual_hint:
        message += f"; {hub.manual_hint}"
    return message + "."


def find_weights_file(folder: Path, preferred: tuple[str, ...] = ()) -> Path:
    """The weights file inside `folder`: one of `preferred` names if present, else the only weights file there."""
    for name in preferred:
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if len(candidates) != 1:
        found = ", ".join(p.name for p in candidates) or "none"
        raise FileNotFoundError(
            f"weights folder '{folder}' must hold exactly one weights file ({', '.join(WEIGHT_SUFFIXES)}) or one of "
            f"{list(preferred)}; found: {found}")
    return candidates[0]


def load_state_dict_file(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """Reads a state dict (name → tensor) from a `.safetensors` or torch file, on the CPU.

    Torch files load with `weights_only=True`. A state dict nested under "state_dict"/"model"/"module" (as training
    scripts save it) is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such weights file: '{path}'")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"weights file '{path}' has an unknown suffix; expected one of {', '.join(WEIGHT_SUFFIXES)}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"could not read weights file '{path}' with torch.load(weights_only=True): {err}") from err
    while isinstance(loaded, Mapping) and not _is_state_dict(loaded):
        inner = next((loaded[k] for k in _WRAPPER_KEYS if isinstance(loaded.get(k), Mapping)), None)
        if inner is None:
            break
        loaded = inner
    if not isinstance(loaded, Mapping) or not _is_state_dict(loaded):
        raise ValueError(f"weights file '{path}' holds no state dict of tensors (top-level type "
                         f"{type(loaded).__name__})")
    return dict(loaded)


def _is_state_dict(mapping: Mapping) -> bool:
    return len(mapping) > 0 and all(isinstance(v, torch.Tensor) for v in mapping.values())


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str,
                           max_listed: int = 5) -> None:
    """`module.load_state_dict(state_dict)` with all keys required, and an error that names the offending keys.

    Raises ValueError listing up to `max_listed` missing and unexpected keys, or the mismatching shapes.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or mismatched:
        def listed(keys):
            more = f" ... (+{len(keys) - max_listed} more)" if len(keys) > max_listed else ""
            return ", ".join(keys[:max_listed]) + more

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {listed(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {listed(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches: {listed(mismatched)}")
        raise ValueError(f"weights from {source} do not fit {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True)


# ------------------------------------------------------------------ the small shipped models (digits ViT, judge)

def save_config_checkpoint(config: dict, state_dict: Mapping[str, torch.Tensor], path: str) -> None:
    """Write {'config', 'state_dict'} atomically (temporary file, then rename); loadable with weights_only=True."""
    tmp = f"{path}.tmp"
    torch.save({"config": dict(config), "state_dict": dict(state_dict)}, tmp)
    os.replace(tmp, path)


def load_config_checkpoint(path: str, kind: str, script: str) -> tuple[dict, dict]:
    """(config, state_dict) of a file written by `save_config_checkpoint`. A missing file raises FileNotFoundError
    naming it and the `script` that makes it; another kind of file raises ValueError naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{kind} weights not found: {path} (make them with `python {script}`)")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "config" not in blob or "state_dict" not in blob:
        raise ValueError(f"{path} is not a {kind} checkpoint (expects keys 'config', 'state_dict')")
    return blob["config"], blob["state_dict"]
