"""Reference sets for FID/sFID/precision/recall: ADM reference batches (`.npz`), image folders, and a feature cache.

An ADM reference batch (e.g. `VIRTUAL_imagenet256_labeled.npz`) holds, as ADM's `evaluations/evaluator.py` reads it:
  arr_0            uint8 (N, H, W, 3) reference images;
  mu, sigma        pool_3 statistics (2048,), (2048, 2048);
  mu_s, sigma_s    sFID statistics of mixed_6/conv[..., :7] (2023,), (2023, 2023).
ADM uses the stored statistics for FID/sFID when `mu` is present, and always computes the reference pool features
from `arr_0` for precision/recall. We do the same by default. The stored statistics were made by ADM with the
TensorFlow Inception graph; ours come from a PyTorch port, and FID between statistics of two different networks is
not the FID of either, so `recompute=True` (`--recompute-reference`) computes the reference statistics with our
network from `arr_0` instead (from the N images in the file, which may be fewer than the stored statistics saw).

Computed reference features and statistics are cached as an npz keyed by the reference file(s) (path, size, mtime)
and the network file's sha1, so a second evaluation against the same reference skips the reference pass.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import torch.distributed as dist

from .features import IMAGES_KEY, ImageSourceError, extract_features, open_images
from .inception import FeatureNetwork, default_cache_dir
from .metrics import feature_statistics

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
CACHE_VERSION = 1  # bump when the preprocessing or the cached layout changes


class ReferenceFileError(ValueError):
    """A reference file or folder that cannot be used; the message names it."""


@dataclass
class GaussianStats:
    """Mean (D,) and covariance (D, D), float64."""

    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray) -> "GaussianStats":
        return cls(*feature_statistics(features))

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])


@dataclass
class Reference:
    """What the metrics compare samples against.

    pool / spatial:   statistics for FID / sFID (None when unavailable);
    pool_features:    (N, D) reference pool features for precision/recall (None without reference images);
    num_images:       images those features came from;
    stats_source:     "file" (stored statistics, ADM's TF network) or "network" (computed here);
    spatial_source:   the same for the sFID statistics, or None;
    notes:            sentences for the report (where the numbers came from, what is missing and why).
    """

    path: str
    pool: Optional[GaussianStats]
    spatial: Optional[GaussianStats]
    pool_features: Optional[np.ndarray]
    num_images: Optional[int]
    stats_source: str
    spatial_source: Optional[str]
    cache_path: Optional[str] = None
    notes: List[str] = field(default_factory=list)


def _npz_keys(path: Path) -> List[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            return sorted(name[:-4] for name in archive.namelist() if name.endswith(".npy"))
    except (zipfile.BadZipFile, OSError) as e:
        raise ReferenceFileError(f"reference {path} is not a readable .npz file ({e})") from None


def read_stored_statistics(path: Union[str, os.PathLike]) -> Tuple[Optional[GaussianStats], Optional[GaussianStats]]:
    """(pool, spatial) statistics stored in an ADM reference npz, each None when absent. Shapes are checked: mu (D,)
    with sigma (D, D), and mu_s (Ds,) with sigma_s (Ds, Ds); a half-present pair is an error naming the file."""
    path = Path(path)
    keys = _npz_keys(path)
    found = []
    with np.load(path) as data:
        for mean_key, cov_key in (("mu", "sigma"), ("mu_s", "sigma_s")):
            if mean_key not in keys and cov_key not in keys:
                found.append(None)
                continue
            if mean_key not in keys or cov_key not in keys:
                raise ReferenceFileError(f"reference {path} has '{mean_key if mean_key in keys else cov_key}' but "
                                         f"not '{cov_key if mean_key in keys else mean_key}'")
            mu, sigma = np.asarray(data[mean_key], np.float64), np.asarray(data[cov_key], np.float64)
            if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
                raise ReferenceFileError(f"reference {path}: '{mean_key}' {mu.shape} and '{cov_key}' {sigma.shape} "
                                         "are not a mean (D,) and a covariance (D, D)")
            found.append(GaussianStats(mu, sigma))
    return found[0], found[1]


# ---------------------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------------------

def _fingerprint(path: Path) -> List:
    """Cheap identity of a file or folder of images: paths, sizes and modification times."""
    if path.is_dir():
        src = open_images(path)
        return [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in src.files]
    stat = path.stat()
    return [[str(path.resolve()), stat.st_size, stat.st_mtime_ns]]


def reference_cache_path(path: Path, network: FeatureNetwork, cache_dir: Path) -> Optional[Path]:
    """Cache file for this reference and network, or None when the network has no file identity (sha1)."""
    if network.sha1 is None:
        return None
    key = json.dumps({"ref": str(path.resolve()), "files": _fingerprint(path), "net": network.sha1,
                      "input": network.input_size, "version": CACHE_VERSION}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return cache_dir / f"{path.stem}-{digest}.npz"


def default_reference_cache_dir() -> Path:
    return default_cache_dir() / "reference"


def _save_cache(cache_path: Path, pool_features: np.ndarray, pool: GaussianStats,
                spatial: Optional[GaussianStats]) -> None:
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"pool_features": pool_features, "mu": pool.mu, "sigma": pool.sigma}
    if spatial is not None:
        arrays.update(mu_s=spatial.mu, sigma_s=spatial.sigma)
    tmp = cache_path.with_name(cache_path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, cache_path)  # atomic: a reader never sees half a file


def _load_cache(cache_path: Path) -> Tuple[np.ndarray, GaussianStats, Optional[GaussianStats]]:
    with np.load(cache_path) as data:
        spatial = GaussianStats(data["mu_s"], data["sigma_s"]) if "mu_s" in data else None
        return data["pool_features"], GaussianStats(data["mu"], data["sigma"]), spatial


def _is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def reference_features(path: Union[str, os.PathLike], network: FeatureNetwork, *, batch_size: int = 250,
                       cache_dir: Optional[Path] = None, progress: bool = True
                       ) -> Tuple[np.ndarray, GaussianStats, Optional[GaussianStats], Optional[Path], bool]:
    """Pool features (N, D) and our network's pool/spatial statistics of a reference's images (npz arr_0 or folder).

    With `cache_dir`, reads them from the cache when present and otherwise writes them there (rank 0 only).
    Returns (pool_features, pool_stats, spatial_stats or None, cache file or None, whether the cache was used).
    """
    path = Path(path)
    cache_path = reference_cache_path(path, network, cache_dir) if cache_dir is not None else None
    if cache_path is not None and cache_path.is_file():
        return (*_load_cache(cache_path), cache_path, True)
    feats = extract_features(path, network, batch_size=batch_size, progress=progress, desc="reference")
    pool = GaussianStats.of(feats.pool)
    spatial = GaussianStats.of(feats.spatial) if feats.spatial is not None else None
    if cache_path is not None and _is_rank0():
        _save_cache(cache_path, feats.pool, pool, spatial)
    return feats.pool, pool, spatial, cache_path, False


# ---------------------------------------------------------------------------------------------------------------
# Loading a reference
# ---------------------------------------------------------------------------------------------------------------

def _mixing_note(network: FeatureNetwork, images: Optional[int]) -> str:
    note = ("FID/sFID use the statistics stored in the reference file (ADM's reference batches were made with the "
            f"TensorFlow Inception graph), while the samples' features come from {network.name}. Mixing networks "
            "changes FID (little for a faithful port of the same graph, a lot otherwise), so these numbers are "
            "ADM-compatible in protocol, not bit-identical.")
    if images:
        note += f" --recompute-reference computes both sides with this network from the file's {images} images."
    return note


def load_reference(path: Union[str, os.PathLike], network: FeatureNetwork, *, recompute: bool = False,
                   batch_size: int = 250, cache_dir: Optional[Path] = None, progress: bool = True) -> Reference:
    """Reads an ADM reference npz (images and/or statistics) or an image folder, computing what it lacks.

    npz with statistics (mu, sigma[, mu_s, sigma_s]) and recompute=False: FID/sFID use them; pool features for
    precision/recall are computed from arr_0 when present. recompute=True or no stored statistics: everything is
    computed with `network` from arr_0 (an error if there are no images). A folder: everything is computed.
    Raises ReferenceFileError naming the file when it cannot be used.
    """
    path = Path(path)
    if not path.exists():
        raise ReferenceFileError(f"reference {path} does not exist")
    notes: List[str] = []
    if path.is_dir():
        stored: Tuple[Optional[GaussianStats], Optional[GaussianStats]] = (None, None)
        has_images = True
    else:
        keys = _npz_keys(path)
        has_images = IMAGES_KEY in keys
        stored = read_stored_statistics(path)
        if not has_images and stored[0] is None:
            raise ReferenceFileError(f"reference {path} holds neither images ('{IMAGES_KEY}') nor statistics "
                                     f"('mu', 'sigma'); it has {keys}")
        if recompute and not has_images:
            raise ReferenceFileError(f"--recompute-reference needs the reference images, but {path} has no "
                                     f"'{IMAGES_KEY}' (it has {keys})")
    if has_images:
        try:
            count = len(open_images(path))  # checks shape and dtype now, before any work
        except ImageSourceError as e:
            raise ReferenceFileError(f"reference {e}") from None
        if count < 2:
            raise ReferenceFileError(f"reference {path} holds {count} image; statistics need at least 2")

    pool_features = cache_path = None
    computed_pool = computed_spatial = None
    if has_images:
        try:
            pool_features, computed_pool, computed_spatial, cache_path, cached = reference_features(
                path, network, batch_size=batch_size, cache_dir=cache_dir, progress=progress)
        except ImageSourceError as e:
            raise ReferenceFileError(f"reference {e}") from None
        if cached:
            notes.append(f"reference features were read from the cache {cache_path}")
    else:
        notes.append(f"precision/recall need reference images, and {path} has no '{IMAGES_KEY}'")
    num_images = None if pool_features is None else len(pool_features)

    use_stored = stored[0] is not None and not recompute
    pool = stored[0] if use_stored else computed_pool
    if use_stored and stored[1] is not None:
        spatial, spatial_source = stored[1], "file"
    elif computed_spatial is not None:
        spatial, spatial_source = computed_spatial, "network"
        if use_stored:
            notes.append("the reference file stores no sFID statistics (mu_s, sigma_s); they were computed from its "
                         "images with this network")
    else:
        spatial, spatial_source = None, None
    if use_stored:
        notes.append(_mixing_note(network, num_images))
    elif num_images is not None:
        notes.append(f"reference statistics were computed with this network from {num_images} images")
    return Reference(str(path), pool, spatial, pool_features, num_images, "file" if use_stored else "network",
                     spatial_source, None if cache_path is None else str(cache_path), notes)
