"""REPA's preprocessed ImageNet (the folder ReDi trains on), read in place.

REPA's `preprocessing/dataset_tools.py` writes (edm2 style):

    root/images/dataset.json                 {"labels": [["00000/img00000000.png", 6], ...]}
    root/images/00000/img00000000.png        ADM center crops (uncompressed PNG), 1000 per sub-folder
    root/vae-sd/dataset.json                 {"labels": [["00000/img-mean-std-00000000.npy", 6], ...]}
    root/vae-sd/00000/img-mean-std-00000000.npy   float32 (8, 32, 32): posterior mean ‖ std of sd-vae-ft-*

and REPA's `dataset.py` pairs the *sorted* image files with the *sorted* .npy files by position, taking the labels
from `vae-sd/dataset.json`. This class does the same. The moments' second half is a standard deviation
(`moments_layout = "mean_std"`), unlike this package's shards (mean ‖ logvar). Without `vae-sd/` the folder is a
pixel-space data set and the labels come from `images/dataset.json`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image

from .shards import Sample

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def _walk_files(root: Path, extensions: tuple[str, ...]) -> list[str]:
    found = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for fname in filenames:
            if os.path.splitext(fname)[1].lower() in extensions:
                found.append(Path(dirpath, fname).relative_to(root).as_posix())
    return sorted(found)


def _read_labels(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"REPA label file {path} is missing")
    try:
        labels = json.loads(path.read_text())["labels"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a REPA dataset.json with a 'labels' list: {e}") from None
    if labels is None:
        raise ValueError(f"{path} has no labels (\"labels\": null): class-conditional training needs them")
    return {name.replace("\\", "/"): int(label) for name, label in labels}  # as REPA: Windows-written names too


class RepaFolderDataset:
    """A REPA-preprocessed folder (`images/` + optional `vae-sd/`), same interface as ShardedImageDataset.

    Args:
        root:        the folder holding `images/` and `vae-sd/`.
        num_classes: default max label + 1.

    Attributes: image_size, num_classes, has_moments, moments_shape (8, h, w), moments_layout ("mean_std"),
    encoded (True: `read` returns PNG bytes), channels (3).
    """

    encoded = True
    channels = 3

    def __init__(self, root: Union[str, Path], *, num_classes: Optional[int] = None):
        self.root = Path(root)
        self.images_dir = self.root / "images"
        self.features_dir = self.root / "vae-sd"
        if not self.images_dir.is_dir():
            raise FileNotFoundError(f"REPA data set folder {self.images_dir} does not exist")
        self.image_fnames = _walk_files(self.images_dir, IMAGE_EXTENSIONS)
        if not self.image_fnames:
            raise ValueError(f"REPA image folder {self.images_dir} holds no images")
        self.has_moments = self.features_dir.is_dir()
        if self.has_moments:
            self.feature_fnames = _walk_files(self.features_dir, (".npy",))
            if len(self.feature_fnames) != len(self.image_fnames):
                raise ValueError(f"REPA folders disagree: {self.images_dir} has {len(self.image_fnames)} images but "
                                 f"{self.features_dir} has {len(self.feature_fnames)} .npy files")
            by_name = _read_labels(self.features_dir / "dataset.json")
            names = self.feature_fnames
            label_file = self.features_dir / "dataset.json"
        else:
            self.feature_fnames = None
            by_name = _read_labels(self.images_dir / "dataset.json")
            names = self.image_fnames
            label_file = self.images_dir / "dataset.json"
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ValueError(f"{label_file} has no label for {len(missing)} files, e.g. {missing[0]}")
        self._labels = np.array([by_name[n] for n in names], dtype=np.int64)
        if self._labels.min() < 0:
            raise ValueError(f"{label_file} has negative labels")
        self.num_classes = int(num_classes) if num_classes is not None else int(self._labels.max()) + 1
        if self._labels.max() >= self.num_classes:
            raise ValueError(f"num_classes={self.num_classes} but {label_file} has label {self._labels.max()}")

        with Image.open(self.images_dir / self.image_fnames[0]) as first:
            if first.size[0] != first.size[1]:
                raise ValueError(f"REPA images must be square, {self.images_dir / self.image_fnames[0]} is "
                                 f"{first.size[0]}x{first.size[1]}")
            self.image_size = first.size[0]
        if self.has_moments:
            first = np.load(self.features_dir / self.feature_fnames[0], mmap_mode="r")
            self.moments_shape = tuple(first.shape)
            self.moments_layout = "mean_std"
        else:
            self.moments_shape = self.moments_layout = None

    def __len__(self) -> int:
        return len(self.image_fnames)

    def describe(self, i: int) -> str:
        """The image file of sample i, for messages."""
        return str(self.images_dir / self.image_fnames[int(i)])

    def read(self, i: int) -> Sample:
        """Sample i: PNG bytes uint8 (L,), moments float32 (8, h, w) (mean ‖ std) or None, label."""
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a data set of {len(self)} samples")
        image = np.fromfile(self.images_dir / self.image_fnames[i], dtype=np.uint8)
        moments = None
        if self.has_moments:
            path = self.features_dir / self.feature_fnames[i]
            moments = np.load(path).astype(np.float32, copy=False)
            if moments.shape != self.moments_shape:
                raise ValueError(f"{path} holds moments of shape {moments.shape}, expected {self.moments_shape}")
        return Sample(image=image, moments=moments, label=int(self._labels[i]))

    def labels(self) -> np.ndarray:
        """int64 (N,): every sample's label, in index order."""
        return self._labels.copy()

    def __repr__(self) -> str:
        return (f"RepaFolderDataset({str(self.root)!r}, samples={len(self)}, image_size={self.image_size}, "
                f"classes={self.num_classes}, moments={self.moments_shape})")
