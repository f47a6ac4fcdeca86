"""The pictures a training run writes: sample grids, feature maps over training, loss curves.

    save_image_grid(images, "samples/step-0001000.png", upscale=4)       # uint8 (N, C, H, W) or float in [-1, 1]
    colors = feature_map_colors(z)                                        # (N, L, d) -> uint8 (N, 3, g, g)
    evolution = FeatureEvolution(fixed_images, "features.png")            # CoReDi-teaser-like figure
    evolution.add(step, z_of_fixed_images)                                # re-renders; state_dict() for resume
    plot_loss_curves("metrics.jsonl", "loss.png")

Everything is written atomically (a temporary file in the same folder, then a rename), so a crash or a reader never
sees half a PNG. Figures are drawn with matplotlib's Agg canvas without pyplot (no display, no global state);
image grids go through PIL so their pixels are exact.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

PathLike = Union[str, Path]
PADDING = 2


# --------------------------------------------------------------------------------------------- pixels

def float_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (any shape, any float dtype) -> uint8 in [0, 255]: round((x + 1) * 127.5), clamped."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}"
                        f"{'' if not isinstance(x, torch.Tensor) else ' of dtype ' + str(x.dtype)}")
    return ((x.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _as_uint8_images(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    """uint8 (N, C, H, W) with C in {1, 3} on the CPU, from uint8 or float-in-[-1, 1] input."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (N, C, H, W), got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] < 1:
        raise ValueError(f"{name} must have shape (N, C, H, W) with N >= 1 and C in (1, 3), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.detach().cpu()
    if images.is_floating_point():
        return float_to_uint8(images).cpu()
    raise TypeError(f"{name} must be uint8 in [0, 255] or float in [-1, 1], got dtype {images.dtype}")


def upscale_nearest(images: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H * factor, W * factor), every pixel repeated factor x factor times."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"upscale must be an int >= 1, got {factor!r}")
    if factor == 1:
        return images
    return images.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def make_image_grid(images: torch.Tensor, nrow: Optional[int] = None, upscale: int = 1, padding: int = PADDING,
                    pad_value: int = 255) -> np.ndarray:
    """Tile images into one uint8 array (H_grid, W_grid, C), `nrow` images per row.

    images: uint8 (N, C, H, W) (C = 1 or 3) or float in [-1, 1]. nrow: images per row (default ceil(sqrt(N))).
    Each image is upscaled (nearest) by `upscale`; `padding` pixels of `pad_value` surround every cell, borders
    included, so the grid is (rows * (H u + p) + p) x (nrow * (W u + p) + p).
    """
    images = upscale_nearest(_as_uint8_images(images), upscale)
    n, c, h, w = images.shape
    if nrow is None:
        nrow = math.ceil(math.sqrt(n))
    if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow must be an int >= 1, got {nrow!r}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    grid = np.full((rows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, dtype=np.uint8)
    pixels = images.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    for i in range(n):
        top = padding + (i // ncol) * (h + padding)
        left = padding + (i % ncol) * (w + padding)
        grid[top:top + h, left:left + w] = pixels[i]
    return grid


def save_image_grid(images: torch.Tensor, path: PathLike, nrow: Optional[int] = None, upscale: int = 1,
                    padding: int = PADDING, pad_value: int = 255) -> Path:
    """Write `make_image_grid(images, nrow, upscale, padding, pad_value)` as a PNG (grey or RGB); returns the path."""
    from PIL import Image

    grid = make_image_grid(images, nrow=nrow, upscale=upscale, padding=padding, pad_value=pad_value)
    picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    return _write_atomically(path, lambda f: picture.save(f, format="PNG"))


# --------------------------------------------------------------------------------------------- features

def _bounds(values: torch.Tensor, given, quantile: float, name: str) -> torch.Tensor:
    """Per-channel bound (3,): `given` (a number or 3 numbers) or the `quantile` of each column of values (M, 3)."""
    if given is None:
        return torch.quantile(values, quantile, dim=0)
    bound = torch.as_tensor(given, dtype=torch.float64).flatten()
    if bound.numel() == 1:
        bound = bound.expand(values.shape[1])
    if bound.numel() != values.shape[1]:
        raise ValueError(f"{name} must be a number or {values.shape[1]} numbers (one per channel), got {given!r}")
    return bound


def feature_map_colors(z: torch.Tensor, channels: Sequence[int] = (0, 1, 2), low=None, high=None,
                       quantiles: tuple[float, float] = (0.01, 0.99)) -> torch.Tensor:
    """Show 3 of the d feature channels as RGB on the token grid.

    z: (N, L, d) feature tokens, row-major on a sqrt(L) x sqrt(L) grid (as `method.tokens_to_grid` reads them),
        or a feature map (N, d, H, W) such as the feature channels `sampling.generate(..., return_features=True)`
        returns (read as L = H * W tokens; H must equal W).
    channels: the 3 channels shown as red, green, blue; channels >= d (when d < 3) are shown as colour 0.
    low, high: the values mapped to 0 and 255 (a number or one per shown channel). By default robust bounds: the
        1st and 99th percentile of each channel over the whole batch (all N * L tokens), so one outlier token
        does not wash out the picture. Values outside are clamped.
    Returns uint8 (N, 3, g, g), g = sqrt(L): round(255 * clamp((z - low) / (high - low), 0, 1)); a channel with
    high == low maps to 0.
    """
    if isinstance(z, torch.Tensor) and z.ndim == 4:
        z = z.flatten(2).transpose(1, 2)                                # (N, d, H, W) -> (N, H * W, d), row-major
    if not isinstance(z, torch.Tensor) or z.ndim != 3 or not z.is_floating_point():
        raise ValueError(f"z must be a float tensor (N, L, d) or (N, d, H, W), got "
                         f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
    n, num_tokens, d = z.shape
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"z has L={num_tokens} tokens, which is not a square grid")
    channels = tuple(channels)
    if len(channels) != 3 or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in channels):
        raise ValueError(f"channels must be 3 non-negative ints, got {channels!r}")
    z = z.detach().to(torch.float64).cpu()
    shown = torch.stack([z[..., c] if c < d else torch.zeros_like(z[..., 0]) for c in channels], dim=-1)  # (N, L, 3)
    flat = shown.reshape(-1, 3)
    lo = _bounds(flat, low, quantiles[0], "low")
    hi = _bounds(flat, high, quantiles[1], "high")
    span = hi - lo
    scaled = torch.where(span > 0, (shown - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                         torch.zeros_like(shown))
    colors = (scaled.clamp(0, 1) * 255).round().to(torch.uint8)        # (N, L, 3)
    colors[..., [i for i, c in enumerate(channels) if c >= d]] = 0      # absent channels stay black
    return colors.permute(0, 2, 1).reshape(n, 3, side, side).contiguous()


def thin_evenly(steps: Sequence[int], keep: int) -> list[int]:
    """Indices of at most `keep` entries of the sorted `steps`, spread evenly in step value.

    The first and the last entry are always kept; for each of the keep - 2 interior targets (evenly spaced between
    the first and last step) the nearest not-yet-kept entry is taken. Returns sorted indices.
    """
    if keep < 2:
        raise ValueError(f"keep must be >= 2 (the first and the latest snapshot), got {keep}")
    n = len(steps)
    if n <= keep:
        return list(range(n))
    chosen = {0, n - 1}
    first, last = steps[0], steps[-1]
    for j in range(1, keep - 1):
        target = first + (last - first) * j / (keep - 1)
        free = [i for i in range(1, n - 1) if i not in chosen]
        chosen.add(min(free, key=lambda i: (abs(steps[i] - target), i)))
    return sorted(chosen)


class FeatureEvolution:
    """A figure of how the denoised feature channels of K fixed images evolve over training (CoReDi's teaser).

    Rows are the K images; the first column shows the image, then one column per snapshot with its features as
    colours (`feature_map_colors`), upscaled (nearest) to the image's size; columns are titled "step N". At most
    `max_columns` snapshots are kept: when one more arrives the history is thinned evenly in step, always keeping
    the first and the latest.

    images: uint8 (K, C, H, W) (C = 1 or 3) or float in [-1, 1]. path: the PNG written by every `add`.
    upscale: nearest-neighbour factor for the image column (16-px digits need ~8 to be visible).
    `state_dict()` / `load_state_dict()` keep the snapshots (uint8 tensors) across a resumed run.
    """

    def __init__(self, images: torch.Tensor, path: PathLike, upscale: int = 8, max_columns: int = 8,
                 channels: Sequence[int] = (0, 1, 2)):
        self.images = _as_uint8_images(images)
        self.path = Path(path)
        upscale_nearest(self.images[:1], upscale)  # validates upscale
        if isinstance(max_columns, bool) or not isinstance(max_columns, int) or max_columns < 2:
            raise ValueError(f"max_columns must be an int >= 2, got {max_columns!r}")
        self.upscale = upscale
        self.max_columns = max_columns
        self.channels = tuple(channels)
        self.steps: list[int] = []
        self.snapshots: list[torch.Tensor] = []  # uint8 (K, 3, g, g) each

    def add(self, step: int, z: torch.Tensor) -> Path:
        """Record the features of the K images at `step` (z: (K, L, d) tokens or a (K, d, H, W) map, see
        `feature_map_colors`), thin the history, re-render; returns the path."""
        if z.ndim not in (3, 4) or z.shape[0] != self.images.shape[0]:
            raise ValueError(f"z must be (K={self.images.shape[0]}, L, d) or (K, d, H, W) for the K fixed images, "
                             f"got {tuple(z.shape)}")
        if self.steps and step <= self.steps[-1]:
            raise ValueError(f"step must increase: got {step} after {self.steps[-1]}")
        self.steps.append(int(step))
        self.snapshots.append(feature_map_colors(z, channels=self.channels))
        keep = thin_evenly(self.steps, self.max_columns)
        self.steps = [self.steps[i] for i in keep]
        self.snapshots = [self.snapshots[i] for i in keep]
        return self.render()

    def render(self) -> Path:
        """Draw the figure and write it to `self.path` (atomically)."""
        k, c, h, w = self.images.shape
        size = (h * self.upscale, w * self.upscale)
        columns = [upscale_nearest(self.images, self.upscale)]
        columns += [F.interpolate(s, size=size, mode="nearest") for s in self.snapshots]
        titles = ["image"] + [f"step {s}" for s in self.steps]
        cell = 1.3  # inches per cell
        fig = _figure(figsize=(cell * len(columns), cell * k + 0.3))
        axes = fig.subplots(k, len(columns), squeeze=False)
        for col, (pictures, title) in enumerate(zip(columns, titles)):
            for row in range(k):
                ax = axes[row][col]
                picture = pictures[row].permute(1, 2, 0).numpy()
                if picture.shape[-1] == 1:
                    ax.imshow(picture[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                else:
                    ax.imshow(picture, interpolation="nearest")
                ax.set_axis_off()
            axes[0][col].set_title(title, fontsize=9)
        fig.tight_layout(pad=0.3)
        return _write_atomically(self.path, lambda f: fig.savefig(f, format="png", dpi=100))

    def state_dict(self) -> dict:
        """{"steps": int64 (S,), "snapshots": uint8 (S, K, 3, g, g)} (loadable with weights_only=True)."""
        snapshots = torch.stack(self.snapshots) if self.snapshots else torch.zeros(0, dtype=torch.uint8)
        return {"steps": torch.tensor(self.steps, dtype=torch.int64), "snapshots": snapshots}

    def load_state_dict(self, state: dict) -> None:
        steps, snapshots = state["steps"], state["snapshots"]
        if len(steps) and (snapshots.ndim != 5 or snapshots.shape[:2] != (len(steps), self.images.shape[0])):
            raise ValueError(f"state holds snapshots {tuple(snapshots.shape)} for {len(steps)} steps, expected "
                             f"({len(steps)}, K={self.images.shape[0]}, 3, g, g)")
        self.steps = [int(s) for s in steps.tolist()]
        self.snapshots = [s.clone() for s in snapshots] if len(steps) else []


# --------------------------------------------------------------------------------------------- loss curves

def read_metrics_jsonl(path: PathLike, keys: Iterable[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{key: (steps (M,), values (M,))} for each key found in the JSON-lines file, in file order.

    Lines that are not complete JSON objects (a partial last line while the run is writing) are skipped, as are
    lines without "step", values that are not finite numbers, and keys absent from a line.
    """
    series: dict[str, tuple[list, list]] = {key: ([], []) for key in keys}
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict) or not isinstance(record.get("step"), (int, float)):
                continue
            for key, (steps, values) in series.items():
                value = record.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    steps.append(record["step"])
                    values.append(float(value))
    return {key: (np.asarray(s, dtype=np.float64), np.asarray(v, dtype=np.float64))
            for key, (s, v) in series.items() if v}


def exponential_moving_average(values: np.ndarray, beta: float = 0.9) -> np.ndarray:
    """Bias-corrected EMA: m_k = beta m_{k-1} + (1 - beta) v_k, m_0 = 0, returned as m_k / (1 - beta^k)."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    out = np.empty(len(values), dtype=np.float64)
    m = 0.0
    for k, v in enumerate(values, start=1):
        m = beta * m + (1.0 - beta) * v
        out[k - 1] = m / (1.0 - beta**k)
    return out


def plot_loss_curves(metrics_jsonl_path: PathLike, out_png: PathLike,
                     keys: Sequence[str] = ("loss", "loss_image", "loss_feature", "loss_reg"),
                     beta: float = 0.9) -> Path:
    """Plot each key vs step from the run's metrics file: one subplot per key found (shared step axis), the raw
    values faint and their bias-corrected EMA (`beta`) solid, log y-axis when all values are > 0. Keys found in no
    line are left out; a figure with no data says so. Written atomically; returns the PNG path."""
    series = read_metrics_jsonl(metrics_jsonl_path, keys)
    rows = max(1, len(series))
    fig = _figure(figsize=(7, 2.2 * rows + 0.4))
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)
    if not series:
        axes[0][0].text(0.5, 0.5, f"no values of {', '.join(keys)} yet", ha="center", va="center")
        axes[0][0].set_axis_off()
    for ax, (key, (steps, values)) in zip(axes[:, 0], series.items()):
        ax.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.8, label="raw")
        ax.plot(steps, exponential_moving_average(values, beta), color="tab:blue", linewidth=1.6,
                label=f"EMA {beta}")
        if np.all(values > 0):
            ax.set_yscale("log")
        ax.set_ylabel(key)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1][0].set_xlabel("step")
    fig.tight_layout()
    return _write_atomically(out_png, lambda f: fig.savefig(f, format="png", dpi=100))


# --------------------------------------------------------------------------------------------- helpers

def _figure(**kwargs):
    """A matplotlib Figure drawn by the Agg canvas, outside pyplot: no display, no global figure list to close,
    and it works whatever backend pyplot was set to elsewhere."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _write_atomically(path: PathLike, write) -> Path:
    """Call write(file object) on `<path>.tmp` in the same folder, then rename it to path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
