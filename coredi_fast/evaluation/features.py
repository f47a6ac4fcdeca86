"""Batched feature extraction over images: an ADM-style `.npz` (uint8 NHWC under `arr_0`), an image folder, or an array.

`open_images(path_or_array)` gives an `ImageSource` (length, one image shape, `read(start, stop)`); npz files are
streamed from the zip member (a 50k×256×256×3 batch is 9.8 GB) instead of loaded whole. `extract_features(source,
network)` runs the network in batches on its device with a tqdm bar and returns float32 numpy features. Under torchrun
(an initialized process group with more than one rank) every rank takes a contiguous slice, and the slices are
all-gathered in order at the end, so every rank returns the features of all images.
"""
from __future__ import annotations

import contextlib
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .inception import FeatureNetwork
from .metrics import full_fp32

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGES_KEY = "arr_0"


class ImageSourceError(ValueError):
    """An image file or folder that cannot be used; the message names it."""


# ---------------------------------------------------------------------------------------------------------------
# Image sources
# ---------------------------------------------------------------------------------------------------------------

class ImageSource:
    """A sequence of uint8 RGB images of one size. `read(start, stop)` -> (stop−start, H, W, 3) uint8."""

    description: str
    image_shape: Tuple[int, int, int]

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Releases open files (a later read reopens them)."""


def _check_image_array(shape: Tuple[int, ...], dtype: np.dtype, where: str) -> None:
    if len(shape) != 4 or shape[-1] != 3:
        raise ImageSourceError(f"{where} must hold RGB images as uint8 (N, H, W, 3), got shape {tuple(shape)}")
    if dtype != np.uint8:
        raise ImageSourceError(f"{where} must hold uint8 images (N, H, W, 3), got dtype {dtype}")


class ArrayImages(ImageSource):
    """Images already in memory: uint8 (N, H, W, 3)."""

    def __init__(self, images: np.ndarray, description: str = "array"):
        _check_image_array(images.shape, images.dtype, description)
        self.images, self.description, self.image_shape = images, description, tuple(images.shape[1:])

    def __len__(self) -> int:
        return len(self.images)

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.ascontiguousarray(self.images[start:stop])


@contextlib.contextmanager
def _open_npz_member(path: Path, key: str) -> Iterator[Tuple[zipfile.ZipFile, IO[bytes]]]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ImageSourceError(f"{path} is not a readable .npz file ({e})") from None
    with archive:
        if f"{key}.npy" not in archive.namelist():
            keys = sorted(name[:-4] for name in archive.namelist() if name.endswith(".npy"))
            raise ImageSourceError(f"{path} has no array '{key}' (it holds {keys})")
        with archive.open(f"{key}.npy") as member:
            yield archive, member


def _read_npy_header(f: IO[bytes], path: Path, key: str) -> Tuple[Tuple[int, ...], np.dtype, bool]:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, OSError) as e:
        raise ImageSourceError(f"{path}: array '{key}' has an unreadable .npy header ({e})") from None
    return tuple(shape), dtype, fortran


class NpzImages(ImageSource):
    """Images under `key` (default arr_0) of an npz file, streamed from the zip member (stored or deflated)."""

    def __init__(self, path: Union[str, os.PathLike], key: str = IMAGES_KEY):
        self.path, self.key = Path(path), key
        self.description = f"{self.path} [{key}]"
        with _open_npz_member(self.path, key) as (_, f):
            shape, dtype, fortran = _read_npy_header(f, self.path, key)
            self._data_offset = f.tell()
        _check_image_array(shape, dtype, f"{self.path} (array '{key}')")
        if fortran:
            raise ImageSourceError(f"{self.path}: array '{key}' is Fortran-ordered; save it C-ordered (np.savez)")
        self._length, self.image_shape = shape[0], tuple(shape[1:])
        self._image_bytes = int(np.prod(self.image_shape))
        self._file = None  # opened on first read, per process

    def __len__(self) -> int:
        return self._length

    def read(self, start: int, stop: int) -> np.ndarray:
        start, stop = max(0, start), min(stop, self._length)
        if stop <= start:
            return np.zeros((0,) + self.image_shape, np.uint8)
        if self._file is None:
            self._archive = zipfile.ZipFile(self.path)
            self._file = self._archive.open(f"{self.key}.npy")
        position = self._data_offset + start * self._image_bytes
        if self._file.tell() != position:
            self._file.seek(position)  # cheap for stored members; a deflated one decompresses up to it
        wanted = (stop - start) * self._image_bytes
        data = self._file.read(wanted)
        if len(data) != wanted:
            raise ImageSourceError(f"{self.description}: file ended early (truncated npz?)")
        return np.frombuffer(data, np.uint8).reshape((stop - start,) + self.image_shape)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._archive.close()
            self._file = None


def _load_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


class FolderImages(ImageSource):
    """PNG/JPEG files under a folder (recursively, sorted by relative path), decoded to RGB. All must share one size:
    ADM's protocol compares images at the samples' resolution, so center-crop and resize a reference set first
    (e.g. `python preprocess.py`)."""

    def __init__(self, root: Union[str, os.PathLike], num_threads: int = 8):
        self.root = Path(root)
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise ImageSourceError(f"{self.root} holds no {'/'.join(IMAGE_SUFFIXES)} images")
        self.description = f"{self.root} ({len(self.files)} image files)"
        self.num_threads = num_threads
        first = _load_image(self.files[0])
        self.image_shape = tuple(first.shape)

    def __len__(self) -> int:
        return len(self.files)

    def read(self, start: int, stop: int) -> np.ndarray:
        files = self.files[start:stop]
        with ThreadPoolExecutor(self.num_threads) as pool:  # PIL decodes outside the GIL
            images = list(pool.map(_load_image, files))
        for path, image in zip(files, images):
            if image.shape != self.image_shape:
                raise ImageSourceError(f"{path} is {image.shape[1]}x{image.shape[0]} but {self.files[0]} is "
                                       f"{self.image_shape[1]}x{self.image_shape[0]}: all images of {self.root} must "
                                       "share one size (center-crop/resize them first)")
        return np.stack(images) if images else np.zeros((0,) + self.image_shape, np.uint8)


def open_images(source: Union[str, os.PathLike, np.ndarray, ImageSource], key: str = IMAGES_KEY) -> ImageSource:
    """An ImageSource from an npz path, an image folder, a uint8 (N, H, W, 3) array or an ImageSource."""
    if isinstance(source, ImageSource):
        return source
    if isinstance(source, np.ndarray):
        return ArrayImages(source)
    path = Path(source)
    if path.is_dir():
        return FolderImages(path)
    if not path.exists():
        raise ImageSourceError(f"{path} does not exist")
    return NpzImages(path, key)


# ---------------------------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Features:
    """Features of N images, float32: pool (N, D); logits (N, K) or None; spatial (N, Ds) or None."""

    pool: np.ndarray
    logits: Optional[np.ndarray] = None
    spatial: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.pool)


def rank_slice(num_items: int, rank: int, world_size: int) -> Tuple[int, int]:
    """Contiguous [start, stop) of `num_items` for `rank`: sizes differ by at most one, in rank order."""
    base, extra = divmod(num_items, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def extract_features(images, network: FeatureNetwork, *, batch_size: int = 250, num_images: Optional[int] = None,
                     progress: bool = True, desc: str = "features") -> Features:
    """Runs `network` over the first `num_images` (default all) images of `images` (anything `open_images` takes).

    Batches of `batch_size` go to the network's device as uint8 and are converted there; the next batch is read from
    disk while the current one runs. fp32 throughout, TF32 off. Under torchrun each rank does its contiguous slice
    and all ranks return the gathered features of every image, in order.
    """
    source = open_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total = len(source) if num_images is None else num_images
    if not 0 < total <= len(source):
        raise ValueError(f"num_images must be between 1 and {len(source)} (the images in {source.description}), "
                         f"got {num_images}")
    rank, world_size = _world()
    start, stop = rank_slice(total, rank, world_size)
    starts = list(range(start, stop, batch_size))
    parts: List[dict] = []
    bar = tqdm(total=stop - start, desc=desc, unit="img", disable=not progress or rank != 0, dynamic_ncols=True)
    with ThreadPoolExecutor(1) as reader, full_fp32():
        pending = reader.submit(source.read, starts[0], min(starts[0] + batch_size, stop)) if starts else None
        for i in range(len(starts)):
            batch = pending.result()
            if i + 1 < len(starts):
                nxt = starts[i + 1]
                pending = reader.submit(source.read, nxt, min(nxt + batch_size, stop))
            out = network(torch.from_numpy(batch.copy()))
            parts.append({name: None if t is None else t.cpu().numpy()
                          for name, t in (("pool", out.pool), ("logits", out.logits), ("spatial", out.spatial))})
            bar.update(len(batch))
    bar.close()
    if source is not images:  # opened here
        source.close()
    local = {name: _concat([p[name] for p in parts]) for name in ("pool", "logits", "spatial")}
    if world_size > 1:
        local = {name: None if name not in network.provides else _all_gather_rows(local[name], network.device)
                 for name in local}
    return Features(local["pool"], local["logits"], local["spatial"])


def _concat(arrays: List[Optional[np.ndarray]]) -> Optional[np.ndarray]:
    if not arrays or arrays[0] is None:
        return None
    return np.concatenate(arrays)


def _all_gather_rows(local: Optional[np.ndarray], device: torch.device) -> np.ndarray:
    """Concatenates every rank's (n_r, D) rows in rank order. Ranks may hold different n_r (and 0 rows)."""
    backend_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    counts = [torch.zeros(2, dtype=torch.long, device=backend_device) for _ in range(dist.get_world_size())]
    mine = torch.tensor(local.shape if local is not None else (0, 0), dtype=torch.long, device=backend_device)
    dist.all_gather(counts, mine)
    rows = [int(c[0]) for c in counts]
    width = max(int(c[1]) for c in counts)
    padded = torch.zeros(max(rows), width, dtype=torch.float32, device=backend_device)
    if local is not None and len(local):
        padded[:len(local)] = torch.from_numpy(local).to(backend_device)
    gathered = [torch.empty_like(padded) for _ in rows]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, rows)]).cpu().numpy()
