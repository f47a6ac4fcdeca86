"""The stored training set: a manifest plus shards of plain files, read by memmap.

Layout of a preprocessed folder (written by `preprocess.py`):

    manifest.json                  what the folder holds (see `preprocess.py` for every field)
    shard-00000.images.bin         encoded PNG or JPEG images, concatenated
    shard-00000.index.npy          int64 (N, 2): byte offset and length of each image in images.bin
    shard-00000.labels.npy         int64 (N,): class ids
    shard-00000.moments.npy        float32/float16 (N, 2C, h, w): VAE posterior moments (absent without a VAE)
    shard-00000.names.txt          the source path of each image, relative to the input folder, one per line

Every file is written to a temporary name and renamed into place, and a shard only counts once the manifest (also
renamed into place) lists it. Random access costs one memmap slice per array: no per-sample files, no decoding
of containers, and the arrays are shared by all loader workers through the page cache.

This module also defines `Sample`, what every dataset of `coredi_fast.data` returns from `read(i)`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

FORMAT_NAME = "coredi_fast.shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_FILES = ("images.bin", "index.npy", "labels.npy", "moments.npy", "names.txt")
MOMENTS_LAYOUTS = ("mean_logvar", "mean_std")


@dataclass(frozen=True)
class Sample:
    """One training sample.

    image:   `encoded` datasets: uint8 (L,), the PNG/JPEG file bytes. Otherwise: uint8 (C, H, W) pixels.
    moments: float32 (2C', h, w) VAE posterior moments in the dataset's `moments_layout`, or None (pixel space).
    label:   class id.
    """

    image: np.ndarray
    moments: Optional[np.ndarray]
    label: int


def shard_path(root: Union[str, Path], shard: int, kind: str) -> Path:
    """`root/shard-00042.<kind>`, kind one of SHARD_FILES."""
    if kind not in SHARD_FILES:
        raise ValueError(f"kind must be one of {SHARD_FILES}, got {kind!r}")
    return Path(root) / f"shard-{shard:05d}.{kind}"


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    """Writes `data` to `path` through a temporary file and a rename, so readers never see a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save_npy(path: Union[str, Path], array: np.ndarray) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(root: Union[str, Path], manifest: dict) -> None:
    atomic_write_bytes(Path(root) / MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode())


def read_manifest(root: Union[str, Path]) -> dict:
    """Loads and checks `root/manifest.json`; errors name the file."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no manifest at {path}: not a preprocessed data set (run preprocess.py first)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a {FORMAT_NAME} manifest (format={manifest.get('format')!r})"
                         if isinstance(manifest, dict) else f"{path} is not a {FORMAT_NAME} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {manifest.get('version')!r}; this code reads version "
                         f"{FORMAT_VERSION}")
    return manifest


class ShardedImageDataset:
    """Random access to a preprocessed folder.

    Args:
        root:             the folder holding manifest.json and the shards.
        allow_incomplete: read the completed shards of a preprocessing run that has not finished (default: error).

    Start-up validates the manifest and every shard file (present, right array shapes and dtypes, sample counts as
    the manifest says, images.bin as long as its index); errors name the file. Memmaps are opened lazily in each
    process, so the dataset pickles cheaply into loader workers.

    Attributes: image_size, num_classes, class_names, has_moments, moments_shape (2C, h, w), moments_layout,
    encoded (True: `read` returns file bytes), image_format ("png" | "jpeg"), channels (3), manifest.
    """

    encoded = True
    channels = 3

    def __init__(self, root: Union[str, Path], *, allow_incomplete: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data set folder {self.root} does not exist")
        manifest = read_manifest(self.root)
        manifest_path = self.root / MANIFEST_NAME
        if not manifest.get("complete", False) and not allow_incomplete:
            raise ValueError(f"{manifest_path}: preprocessing has not finished ({len(manifest['shards'])} of "
                             f"{manifest['num_shards']} shards); rerun preprocess.py with the same arguments to "
                             f"resume, or pass allow_incomplete=True")
        self.manifest = manifest
        self.image_size = int(manifest["image_size"])
        self.image_format = manifest["image_format"]
        self.class_names = list(manifest["class_names"])
        self.num_classes = len(self.class_names)
        moments = manifest.get("moments")
        self.has_moments = moments is not None
        # shape is None only while no shard of an unfinished run has a sample yet
        self.moments_shape = tuple(moments["shape"] or ()) if self.has_moments else None
        self.moments_dtype = np.dtype(moments["dtype"]) if self.has_moments else None
        self.moments_layout = moments["layout"] if self.has_moments else None

        shards = sorted(manifest["shards"], key=lambda s: s["index"])
        self._shard_ids = [int(s["index"]) for s in shards]
        counts = np.array([int(s["num_samples"]) for s in shards], dtype=np.int64)
        for shard in shards:
            self._validate_shard(int(shard["index"]), int(shard["num_samples"]))
        # _starts[k] = global index of shard k's first sample; a global index i lives in shard searchsorted(...) - 1
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self._length = int(self._starts[-1])
        if manifest.get("complete", False) and self._length != int(manifest["num_samples"]):
            raise ValueError(f"{manifest_path}: num_samples={manifest['num_samples']} but its shards hold "
                             f"{self._length}")
        self._open = {}  # shard position -> (images, index, labels, moments) memmaps, per process
        self._names = {}  # shard position -> source names, read on first use

    def _validate_shard(self, shard: int, count: int) -> None:
        paths = {kind: shard_path(self.root, shard, kind) for kind in SHARD_FILES}
        needed = [k for k in SHARD_FILES if k != "moments.npy" or self.has_moments]
        for kind in needed:
            if not paths[kind].is_file():
                raise FileNotFoundError(f"shard file {paths[kind]} is missing (listed in {self.root / MANIFEST_NAME})")

        def load(kind):
            try:
                return np.load(paths[kind], mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as e:
                raise ValueError(f"shard file {paths[kind]} is not a readable .npy file: {e}") from None

        index = load("index.npy")
        if index.dtype != np.int64 or index.shape != (count, 2):
            raise ValueError(f"shard file {paths['index.npy']} holds {index.dtype} {index.shape}; the manifest "
                             f"expects int64 ({count}, 2)")
        labels = load("labels.npy")
        if labels.dtype != np.int64 or labels.shape != (count,):
            raise ValueError(f"shard file {paths['labels.npy']} holds {labels.dtype} {labels.shape}; the manifest "
                             f"expects int64 ({count},)")
        if count and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"shard file {paths['labels.npy']} has labels outside [0, {self.num_classes})")
        if self.has_moments:
            moments = load("moments.npy")
            if moments.dtype != self.moments_dtype or (count and moments.shape != (count, *self.moments_shape)):
                expected = (count, *self.moments_shape)
                raise ValueError(f"shard file {paths['moments.npy']} holds {moments.dtype} {moments.shape}; the "
                                 f"manifest expects {self.moments_dtype} {expected}")
        expected_bytes = int(index[-1, 0] + index[-1, 1]) if count else 0
        actual_bytes = paths["images.bin"].stat().st_size
        if actual_bytes != expected_bytes:
            raise ValueError(f"shard file {paths['images.bin']} has {actual_bytes} bytes; its index "
                             f"{paths['index.npy']} needs {expected_bytes}")
        with open(paths["names.txt"], encoding="utf-8") as f:
            num_names = sum(1 for _ in f)
        if num_names != count:
            raise ValueError(f"shard file {paths['names.txt']} has {num_names} lines; the manifest expects {count}")

    def __len__(self) -> int:
        return self._length

    def _shard_arrays(self, position: int):
        arrays = self._open.get(position)
        if arrays is None:
            shard = self._shard_ids[position]
            images = np.memmap(shard_path(self.root, shard, "images.bin"), dtype=np.uint8, mode="r") \
                if shard_path(self.root, shard, "images.bin").stat().st_size else np.zeros(0, np.uint8)
            index = np.load(shard_path(self.root, shard, "index.npy"), mmap_mode="r")
            labels = np.load(shard_path(self.root, shard, "labels.npy"), mmap_mode="r")
            moments = np.load(shard_path(self.root, shard, "moments.npy"), mmap_mode="r") if self.has_moments else None
            arrays = self._open[position] = (images, index, labels, moments)
        return arrays

    def _locate(self, i: int) -> tuple[int, int]:
        if not -self._length <= i < self._length:
            raise IndexError(f"index {i} out of range for a data set of {self._length} samples")
        i = i % self._length
        position = int(np.searchsorted(self._starts, i, side="right")) - 1
        return position, i - int(self._starts[position])

    def read(self, i: int) -> Sample:
        """Sample i: image = encoded bytes uint8 (L,), moments float32 (2C, h, w) or None, label."""
        position, j = self._locate(int(i))
        images, index, labels, moments = self._shard_arrays(position)
        offset, length = index[j]
        image = np.array(images[offset:offset + length])  # a copy: the caller may hand it to another process
        m = np.array(moments[j], dtype=np.float32) if moments is not None else None
        return Sample(image=image, moments=m, label=int(labels[j]))

    def labels(self) -> np.ndarray:
        """int64 (N,): every sample's label, in index order."""
        return np.concatenate([self._shard_arrays(p)[2] for p in range(len(self._shard_ids))]) \
            if self._shard_ids else np.zeros(0, np.int64)

    def describe(self, i: int) -> str:
        """'shard-00003 entry 17 (images/cat.jpg)': where sample i is stored, for messages."""
        position, j = self._locate(int(i))
        try:
            source = f" ({self.source_name(i)})"
        except (OSError, IndexError):
            source = ""
        return f"{shard_path(self.root, self._shard_ids[position], 'images.bin')} entry {j}{source}"

    def source_name(self, i: int) -> str:
        """The source path (relative to the preprocessing input folder) of sample i."""
        position, j = self._locate(int(i))
        if position not in self._names:
            path = shard_path(self.root, self._shard_ids[position], "names.txt")
            self._names[position] = path.read_text(encoding="utf-8").splitlines()
        return self._names[position][j]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_open"], state["_names"] = {}, {}  # memmaps are reopened in the receiving process
        return state

    def __repr__(self) -> str:
        return (f"ShardedImageDataset({str(self.root)!r}, samples={len(self)}, image_size={self.image_size}, "
                f"classes={self.num_classes}, moments={self.moments_shape})")
