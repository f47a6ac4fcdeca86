"""scikit-learn's bundled handwritten digits: a real, labelled, offline pixel-space data set for demos and tests.

`sklearn.datasets.load_digits()` ships 1797 8×8 images with values 0–16 in 10 classes. They are turned into
uint8 images of `image_size` pixels:

    x = F.interpolate(v / 16, size=image_size, mode="bilinear", align_corners=False)   # float64, no antialias
    image = round(255 · x)                                                             # half to even

(bilinear upsampling with half-pixel centres and clamped borders). The train/test split is a fixed permutation
(seed 0, test fraction 0.2) of the 1797 images; each split keeps the original order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .shards import Sample

SPLITS = ("train", "test", "all")
SPLIT_SEED = 0
TEST_FRACTION = 0.2


def digits_images(image_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits: (uint8 (1797, image_size, image_size), int64 labels (1797,))."""
    from sklearn.datasets import load_digits

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float64) / 16.0)[:, None]  # (1797, 1, 8, 8) in [0, 1]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = torch.round(x[:, 0] * 255.0).clamp_(0, 255).to(torch.uint8).numpy()
    return images, digits.target.astype(np.int64)


def digits_split_indices(split: str) -> np.ndarray:
    """int64: the `load_digits()` indices of a split, in increasing order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    n = 1797
    if split == "all":
        return np.arange(n, dtype=np.int64)
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_test = int(round(TEST_FRACTION * n))
    chosen = perm[:n_test] if split == "test" else perm[n_test:]
    return np.sort(chosen).astype(np.int64)


class DigitsDataset:
    """The digits as a pixel-space data set (no moments), same interface as ShardedImageDataset.

    Args:
        image_size: side of the upsampled images (default 16).
        channels:   1 (grey) or 3 (grey repeated to RGB).
        split:      "train" (1438 images), "test" (359) or "all" (1797).

    `read(i)` returns pixels uint8 (channels, image_size, image_size) (`encoded` is False).
    Attributes: image_size, num_classes (10), channels, has_moments (False), source_indices (load_digits indices).
    """

    encoded = False
    has_moments = False
    moments_shape = None
    moments_layout = None
    num_classes = 10

    def __init__(self, image_size: int = 16, channels: int = 3, split: str = "train"):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        self.image_size = image_size
        self.channels = channels
        self.split = split
        self.source_indices = digits_split_indices(split)
        images, labels = digits_images(image_size)
        self._images = images[self.source_indices]
        self._labels = labels[self.source_indices]

    def __len__(self) -> int:
        return len(self._labels)

    def read(self, i: int) -> Sample:
        image = self._images[int(i)][None]  # (1, S, S)
        if self.channels == 3:
            image = np.repeat(image, 3, axis=0)
        return Sample(image=np.ascontiguousarray(image), moments=None, label=int(self._labels[int(i)]))

    def labels(self) -> np.ndarray:
        return self._labels.copy()

    def __repr__(self) -> str:
        return f"DigitsDataset(image_size={self.image_size}, channels={self.channels}, split={self.split!r})"


def write_digits_image_folder(root: Union[str, Path], image_size: int = 32, split: str = "all") -> Path:
    """Writes the digits as an ImageFolder of RGB PNGs: `root/<digit>/<load_digits index:04d>.png`.

    The class folders are "0" … "9", so sorted folder names give the digit as label. Returns root.
    """
    root = Path(root)
    images, labels = digits_images(image_size)
    for i in digits_split_indices(split):
        folder = root / str(int(labels[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).convert("RGB").save(folder / f"{i:04d}.png")
    return root
