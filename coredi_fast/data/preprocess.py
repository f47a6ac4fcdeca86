"""Preprocessing: a folder of class-labelled images → ADM-center-cropped images (+ VAE moments) in shards.

    python preprocess.py --input /data/imagenet/train --output /data/in256 --image-size 256 \\
        [--vae stabilityai/sd-vae-ft-ema | --vae /path/to/vae | --no-vae] [--shard-size 10000] [--batch-size 64] \\
        [--device cuda] [--num-workers 8] [--image-format png|jpeg] [--moments-dtype float32|float16] [--limit N]

Input: ImageNet layout, `input/<class_name>/**/<image>` with any PIL-readable extension; the sorted class folder
names are the label ids. The file list is sorted by relative path, so the output is deterministic: shard k covers
files [k·S, (k+1)·S) of that list (fewer samples when some were skipped).

What is stored (REPA/ReDi's data): the ADM center crop (`center_crop.py`) as lossless PNG (default, as REPA stores
it) or JPEG (quality 95, 4:4:4 chroma); and, with a VAE, its posterior moments computed from the *stored* pixels
(for JPEG: the decoded JPEG, which is what training sees). No flips are stored: ReDi trains without augmentation.
The default VAE is stabilityai/sd-vae-ft-ema; REPA's preprocessing defaults to stabilityai/sd-vae-ft-mse. Only the
encoder makes the moments, and the two share it (both fine-tuned only the decoder), so either gives the same data.

Reliability:
* Resumable. The manifest is rewritten (atomically) after each shard and lists the finished ones; a restart with
  the same arguments skips them. A shard's files are written under temporary names and renamed into place.
* A corrupt, truncated or unreadable file never stops the run: it is skipped, counted, and listed with the reason
  in the manifest and the summary.
* A missing or empty input folder, or an output folder holding another data set, fails at once naming the path.

The manifest (`manifest.json`) records: format and version, image size/format/channels, shard size and per-shard
sample counts, class names, the source (folder, file count, SHA-256 of the file list, limit), the VAE (weights,
scale, shift) and the moments (dtype, shape, layout), every skipped file with its reason, and creation info.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import hashlib
import io
import logging
import multiprocessing
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import PIL
import torch
from PIL import Image

from .center_crop import center_crop_arr
from .shards import (FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, MOMENTS_LAYOUTS, atomic_save_npy, atomic_write_bytes,
                     read_manifest, shard_path, write_manifest)

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
IMAGE_FORMATS = ("png", "jpeg")
MOMENTS_DTYPES = ("float32", "float16")
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
LOAD_CHUNK = 16  # files per worker task
# Fields that must agree between an existing manifest and a new run for the run to resume into it.
_IDENTITY_FIELDS = ("image_size", "image_format", "jpeg_quality", "png_compress_level", "min_size", "shard_size",
                    "class_names", "source.num_files", "source.file_list_sha256", "vae.weights", "moments.dtype",
                    "moments.layout")

MomentsFn = Callable[[torch.Tensor], Union[torch.Tensor, np.ndarray]]


@dataclass
class PreprocessSummary:
    """What a preprocessing run did. `skipped` lists {"path", "reason"} over the whole data set (all runs)."""

    output: Path
    num_samples: int
    num_files: int
    shards_written: int
    shards_reused: int
    seconds: float
    skipped: list = field(default_factory=list)
    num_processed: int = 0  # files read by this run (not counting shards done by an earlier run)

    def __str__(self) -> str:
        rate = (self.num_processed / self.seconds) if self.seconds > 0 else 0.0
        lines = [f"{self.output}: {self.num_samples} samples from {self.num_files} files; "
                 f"{self.shards_written} shards written, {self.shards_reused} already done; "
                 f"{self.seconds:.1f} s ({rate:.1f} images/s); {len(self.skipped)} files skipped"]
        lines += [f"  skipped {s['path']}: {s['reason']}" for s in self.skipped[:20]]
        if len(self.skipped) > 20:
            lines.append(f"  ... and {len(self.skipped) - 20} more (listed in {self.output / MANIFEST_NAME})")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The input file list
# ---------------------------------------------------------------------------------------------------------------

def list_image_folder(root: Union[str, Path]) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted sub-folder names) and the sorted (relative path, label) list of every image under them.

    Files directly in `root`, hidden files and folders, and files with non-image extensions are ignored.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"input folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"input {root} is not a folder")
    class_names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    files = []
    for label, name in enumerate(class_names):
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for fname in filenames:
                if not fname.startswith(".") and os.path.splitext(fname)[1].lower() in IMAGE_EXTENSIONS:
                    files.append((Path(dirpath, fname).relative_to(root).as_posix(), label))
    if not files:
        raise ValueError(f"input folder {root} holds no images in class sub-folders "
                         f"(expected {root}/<class_name>/<image>.JPEG, extensions {', '.join(IMAGE_EXTENSIONS)})")
    files.sort()
    return class_names, files


def _file_list_sha256(files: Sequence[tuple[str, int]]) -> str:
    digest = hashlib.sha256()
    for rel, label in files:
        digest.update(f"{rel}\t{label}\n".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# One image: load, crop, encode (runs in worker processes)
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _EncodeSettings:
    image_size: int
    image_format: str
    jpeg_quality: int
    png_compress_level: int
    min_size: int
    want_pixels: bool  # the VAE needs the stored pixels back


def _load_one(path: str, settings: _EncodeSettings):
    """-> (encoded bytes, stored pixels uint8 (S, S, 3) or None, None) or (None, None, reason) for a bad file."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now: truncated and corrupt files fail here, not later
            if min(image.size) < settings.min_size:
                return None, None, f"too small: {image.size[0]}x{image.size[1]} < --min-size {settings.min_size}"
            pixels = center_crop_arr(image, settings.image_size)
    except Exception as e:  # noqa: BLE001 - any failure to read one file must only skip that file
        return None, None, f"unreadable: {type(e).__name__}: {e}"
    buffer = io.BytesIO()
    if settings.image_format == "png":
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=settings.png_compress_level)
    else:
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=settings.jpeg_quality, subsampling=0)
    data = buffer.getvalue()
    if settings.want_pixels and settings.image_format == "jpeg":
        with Image.open(io.BytesIO(data)) as stored:  # the VAE must see what training will decode
            pixels = np.asarray(stored.convert("RGB"))
    return data, (pixels if settings.want_pixels else None), None


def _ordered_map(fn, items: Iterable, executor: Optional[cf.Executor], max_in_flight: int) -> Iterator:
    """map() that keeps at most `max_in_flight` tasks queued, so results cannot pile up in memory."""
    if executor is None:
        yield from map(fn, items)
        return
    queue = collections.deque()
    for item in items:
        queue.append(executor.submit(fn, item))
        if len(queue) >= max_in_flight:
            yield queue.popleft().result()
    while queue:
        yield queue.popleft().result()


class _ChunkLoader:
    """Picklable worker task: loads a chunk of files (one task per chunk keeps the pool's IPC cost small)."""

    def __init__(self, root: Path, settings: _EncodeSettings):
        self.root, self.settings = root, settings

    def __call__(self, rels: Sequence[str]) -> list:
        return [_load_one(str(self.root / rel), self.settings) for rel in rels]


def _load_results(load: _ChunkLoader, rels: Sequence[str], executor: Optional[cf.Executor], batch_size: int,
                  num_workers: int) -> Iterator:
    """The load results of `rels`, in order, computed by the pool when there is one."""
    chunk = LOAD_CHUNK if executor is not None else 1  # in-process: one file at a time, nothing held back
    chunks = (rels[i:i + chunk] for i in range(0, len(rels), chunk))
    max_in_flight = max(2 * batch_size // chunk, 4 * num_workers, 2)
    for results in _ordered_map(load, chunks, executor, max_in_flight):
        yield from results


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------

def _get(manifest: dict, dotted: str):
    value = manifest
    for key in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _check_resumable(existing: dict, new: dict, manifest_path: Path) -> None:
    """The existing manifest must describe the same data set, else resuming would mix two data sets."""
    def shown(value):
        return f"{len(value)} names" if isinstance(value, list) and len(value) > 4 else repr(value)

    differences = []
    for key in _IDENTITY_FIELDS:
        old, cur = _get(existing, key), _get(new, key)
        if key.startswith("moments.") and existing.get("moments") is None and new.get("moments") is None:
            continue
        if old != cur:
            differences.append(f"{key}: existing {shown(old)}, requested {shown(cur)}")
    if differences:
        raise ValueError(f"output folder {manifest_path.parent} already holds a different data set "
                         f"({manifest_path}): " + "; ".join(differences)
                         + ". Use another --output, or delete that folder to start over.")


def _to_numpy_moments(moments, batch: int, dtype: np.dtype) -> np.ndarray:
    if isinstance(moments, torch.Tensor):
        moments = moments.detach().float().cpu().numpy()
    moments = np.asarray(moments, dtype=np.float32)
    if moments.ndim != 4 or moments.shape[0] != batch:
        raise ValueError(f"moments_fn must return (B={batch}, 2C, h, w) moments, got shape {moments.shape}")
    if not np.isfinite(moments).all():
        raise ValueError("moments_fn returned non-finite values: the VAE or its weights are broken")
    stored = moments.astype(dtype)
    if not np.isfinite(stored).all():
        raise ValueError(f"moments overflow {dtype}: use --moments-dtype float32")
    return stored


def _write_shard(out: Path, shard: int, files: Sequence[tuple[str, int]], results: Iterator, *,
                 moments_fn: Optional[MomentsFn], moments_dtype: np.dtype, batch_size: int, progress,
                 skipped_before: int) -> dict:
    """Consumes one shard's load results, writes its files, and returns its manifest record."""
    final_images = shard_path(out, shard, "images.bin")
    tmp_images = final_images.with_name(f".{final_images.name}.tmp-{os.getpid()}")
    index, labels, names, skipped, moments_parts, pending = [], [], [], [], [], []

    def flush_pending():
        if pending:
            batch = torch.from_numpy(np.stack(pending)).permute(0, 3, 1, 2).contiguous()  # (B, 3, S, S) uint8
            moments_parts.append(_to_numpy_moments(moments_fn(batch), len(pending), moments_dtype))
            pending.clear()

    offset = 0
    with open(tmp_images, "wb") as f:
        for (rel, label), (data, pixels, reason) in zip(files, results, strict=True):
            progress.update(1)
            if reason is not None:
                skipped.append({"path": rel, "reason": reason})
                progress.set_postfix(skipped=skipped_before + len(skipped))
                continue
            f.write(data)
            index.append((offset, len(data)))
            offset += len(data)
            labels.append(label)
            names.append(rel)
            if moments_fn is not None:
                pending.append(pixels)
                if len(pending) == batch_size:
                    flush_pending()
        flush_pending()
        f.flush()
        os.fsync(f.fileno())

    count = len(labels)
    record = {"index": shard, "num_samples": count, "num_files": len(files), "image_bytes": offset,
              "skipped": skipped}
    atomic_save_npy(shard_path(out, shard, "index.npy"), np.array(index, dtype=np.int64).reshape(count, 2))
    atomic_save_npy(shard_path(out, shard, "labels.npy"), np.array(labels, dtype=np.int64))
    if moments_fn is not None:
        if moments_parts:
            moments = np.concatenate(moments_parts)
            record["moments_shape"] = list(moments.shape[1:])
        else:  # every file of the shard was skipped: an empty array of the right rank
            moments = np.zeros((0, 0, 0, 0), dtype=moments_dtype)
        atomic_save_npy(shard_path(out, shard, "moments.npy"), moments)
    atomic_write_bytes(shard_path(out, shard, "names.txt"), "".join(n + "\n" for n in names).encode("utf-8"))
    os.replace(tmp_images, final_images)
    return record


def _finalize_moments_shape(manifest: dict, out: Path) -> None:
    """Shards where every file was skipped were written before the moments shape was known: give them that shape."""
    shape = manifest["moments"]["shape"]
    for record in manifest["shards"]:
        if record["num_samples"] == 0:
            path = shard_path(out, record["index"], "moments.npy")
            if np.load(path, mmap_mode="r").shape != (0, *shape):
                atomic_save_npy(path, np.zeros((0, *shape), dtype=manifest["moments"]["dtype"]))


def preprocess_folder(input_dir: Union[str, Path], output_dir: Union[str, Path], *, image_size: int = 256,
                      moments_fn: Optional[MomentsFn] = None, vae_info: Optional[dict] = None,
                      moments_layout: str = "mean_logvar", moments_dtype: str = "float32",
                      image_format: str = "png", jpeg_quality: int = 95, png_compress_level: int = 1,
                      shard_size: int = 10000, batch_size: int = 64, num_workers: int = 0,
                      limit: Optional[int] = None, min_size: int = 0, progress: bool = True,
                      argv: Optional[Sequence[str]] = None) -> PreprocessSummary:
    """Preprocesses (or resumes preprocessing) `input_dir` into `output_dir`. See the module docstring.

    moments_fn:   images uint8 (B, 3, S, S) → moments (B, 2C, h, w) (torch or numpy); None = no moments.
    vae_info:     the VAE identity to record (weights, scale, ...); required with moments_fn ("weights" is compared
                  on resume).
    num_workers:  processes that load/crop/encode images (0: in this process).
    limit:        only the first `limit` files of the sorted list (quick runs). Part of the data set's identity.
    min_size:     skip images whose short side is below this (0: keep all).
    Returns a PreprocessSummary (`str()` of it is the human summary).
    """
    start_time = time.time()
    input_dir, out = Path(input_dir), Path(output_dir)
    for name, value, low in (("image_size", image_size, 1), ("shard_size", shard_size, 1),
                             ("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                             ("min_size", min_size, 0), ("png_compress_level", png_compress_level, 0),
                             ("jpeg_quality", jpeg_quality, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if png_compress_level > 9 or jpeg_quality > 100:
        raise ValueError(f"png_compress_level must be <= 9 and jpeg_quality <= 100, got {png_compress_level}, "
                         f"{jpeg_quality}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if moments_dtype not in MOMENTS_DTYPES:
        raise ValueError(f"moments_dtype must be one of {MOMENTS_DTYPES}, got {moments_dtype!r}")
    if moments_layout not in MOMENTS_LAYOUTS:
        raise ValueError(f"moments_layout must be one of {MOMENTS_LAYOUTS}, got {moments_layout!r}")
    if moments_fn is not None and not (isinstance(vae_info, dict) and "weights" in vae_info):
        raise ValueError("vae_info must be a dict with at least 'weights' when moments_fn is given")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")

    class_names, files = list_image_folder(input_dir)
    if limit is not None:
        files = files[:limit]
    num_shards = -(-len(files) // shard_size)

    new_manifest = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "image_size": image_size, "image_format": image_format, "channels": 3,
        "jpeg_quality": jpeg_quality if image_format == "jpeg" else None,
        "png_compress_level": png_compress_level if image_format == "png" else None,
        "min_size": min_size, "shard_size": shard_size, "num_shards": num_shards,
        "num_samples": 0, "complete": False, "class_names": class_names,
        "source": {"root": str(input_dir.resolve()), "num_files": len(files),
                   "file_list_sha256": _file_list_sha256(files), "limit": limit},
        "vae": dict(vae_info) if moments_fn is not None else None,
        "moments": {"dtype": moments_dtype, "shape": None, "layout": moments_layout} if moments_fn is not None
        else None,
        "shards": [], "skipped": [],
        "created": {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "tool": "coredi_fast.data.preprocess",
                    "argv": list(argv) if argv is not None else None, "host": platform.node(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "pillow": PIL.__version__},
    }

    manifest_path = out / MANIFEST_NAME
    if manifest_path.exists():
        manifest = read_manifest(out)
        _check_resumable(manifest, new_manifest, manifest_path)
        manifest["num_shards"] = num_shards
    else:
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"output {out} exists and is not a folder")
        if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
            raise ValueError(f"output folder {out} is not empty and has no {MANIFEST_NAME}: choose an empty or new "
                             f"folder")
        out.mkdir(parents=True, exist_ok=True)
        manifest = new_manifest
        write_manifest(out, manifest)
    for pattern in (".shard-*.tmp-*", f".{MANIFEST_NAME}.tmp-*"):  # leftovers of an interrupted run
        for stale in out.glob(pattern):
            stale.unlink()

    done = {int(record["index"]) for record in manifest["shards"]}
    todo = [k for k in range(num_shards) if k not in done]
    files_done = sum(min(shard_size, len(files) - k * shard_size) for k in done)
    settings = _EncodeSettings(image_size, image_format, jpeg_quality, png_compress_level, min_size,
                               want_pixels=moments_fn is not None)
    load = _ChunkLoader(input_dir, settings)
    np_moments_dtype = np.dtype(moments_dtype)

    from tqdm import tqdm

    executor = None
    if num_workers > 0 and todo:
        # fork is cheap, but a process that has initialized CUDA (the VAE) must not fork.
        method = "spawn" if torch.cuda.is_initialized() else "fork"
        executor = cf.ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context(method))
    bar = tqdm(total=len(files), initial=files_done, unit="img", dynamic_ncols=True, disable=not progress,
               desc=f"preprocess {out.name}")
    try:
        for shard in todo:
            shard_files = files[shard * shard_size:(shard + 1) * shard_size]
            results = _load_results(load, [rel for rel, _ in shard_files], executor, batch_size, num_workers)
            record = _write_shard(out, shard, shard_files, results, moments_fn=moments_fn,
                                  moments_dtype=np_moments_dtype, batch_size=batch_size, progress=bar,
                                  skipped_before=len(manifest["skipped"]))
            if moments_fn is not None and "moments_shape" in record:
                shape = record.pop("moments_shape")
                if manifest["moments"]["shape"] is None:
                    manifest["moments"]["shape"] = shape
                elif manifest["moments"]["shape"] != shape:
                    raise ValueError(f"moments_fn returned moments of shape {shape} for shard {shard}; the data set "
                                     f"({manifest_path}) has {manifest['moments']['shape']}")
            manifest["shards"] = sorted(manifest["shards"] + [record], key=lambda r: r["index"])
            manifest["skipped"] = [s for r in manifest["shards"] for s in r["skipped"]]
            manifest["num_samples"] = sum(r["num_samples"] for r in manifest["shards"])
            manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            write_manifest(out, manifest)
    finally:
        bar.close()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    if moments_fn is not None and manifest["moments"]["shape"] is None and manifest["num_samples"] == 0:
        raise ValueError(f"every file of {input_dir} was skipped: nothing to preprocess")
    if moments_fn is not None:
        _finalize_moments_shape(manifest, out)
    manifest["complete"] = True
    write_manifest(out, manifest)

    summary = PreprocessSummary(output=out, num_samples=manifest["num_samples"], num_files=len(files),
                                shards_written=len(todo), shards_reused=len(done),
                                seconds=time.time() - start_time, skipped=list(manifest["skipped"]),
                                num_processed=len(files) - files_done)
    logger.debug("%s", summary)  # main() prints it; library callers get it back
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def build_vae_moments_fn(vae: str, device: str) -> tuple[MomentsFn, dict]:
    """Loads `coredi_fast.encoders.LatentVAE` (a local path, or a hub repo id like stabilityai/sd-vae-ft-ema) and
    returns (moments_fn giving mean‖logvar, the VAE identity for the manifest)."""
    from coredi_fast.encoders.vae import LatentVAE  # heavy (diffusers): only when a VAE is used

    if Path(vae).exists():
        model = LatentVAE(weights=vae, moments_layout="mean_logvar")
    elif vae.count("/") == 1 and not vae.startswith((".", "/")):
        model = LatentVAE(weights="hub", hub_repo_id=vae, moments_layout="mean_logvar")
    else:
        raise FileNotFoundError(f"--vae {vae!r} is neither an existing path nor a hub repo id like {DEFAULT_VAE}")
    model = model.to(device)

    def moments_fn(images: torch.Tensor) -> torch.Tensor:
        return model.encode_moments(images.to(device, non_blocking=True))

    info = {"weights": vae, "scale": model.scale, "shift": model.shift, "latent_channels": model.latent_channels,
            "downsample_factor": model.downsample_factor}
    return moments_fn, info


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Center-crop a class-labelled image folder (ImageNet layout) into shards "
                                            "of encoded images and VAE moments (resumable).")
    g = p.add_argument_group("input and output")
    g.add_argument("--input", required=True, help="folder with one sub-folder of images per class")
    g.add_argument("--output", required=True, help="output folder (created; rerun with the same arguments to resume)")
    g.add_argument("--limit", type=int, default=None, help="only the first N files of the sorted list (quick runs)")
    g = p.add_argument_group("images")
    g.add_argument("--image-size", type=int, default=256, help="side of the ADM center crop (default 256)")
    g.add_argument("--image-format", choices=IMAGE_FORMATS, default="png",
                   help="png: lossless, as REPA stores (default); jpeg: smaller, GPU-decodable by DALI")
    g.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality (default 95)")
    g.add_argument("--png-compress-level", type=int, default=1,
                   help="zlib level 0-9 (default 1: fast to write; decoding speed hardly depends on it)")
    g.add_argument("--min-size", type=int, default=0, help="skip images whose short side is below this (default 0)")
    g = p.add_argument_group("VAE moments")
    vae = g.add_mutually_exclusive_group()
    vae.add_argument("--vae", default=DEFAULT_VAE,
                     help=f"hub repo id or local path of the VAE (default {DEFAULT_VAE})")
    vae.add_argument("--no-vae", action="store_true", help="store images only (pixel-space training)")
    g.add_argument("--moments-dtype", choices=MOMENTS_DTYPES, default="float32",
                   help="float32 (default, as REPA) or float16 (half the disk; logvar is stored, so no std underflow)")
    g.add_argument("--batch-size", type=int, default=64, help="images per VAE call (default 64)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device of the VAE (default cuda if available)")
    g = p.add_argument_group("performance")
    g.add_argument("--shard-size", type=int, default=10000, help="images per shard (default 10000)")
    g.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes that decode/crop/encode images (default min(8, CPUs))")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> PreprocessSummary:
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    moments_fn, vae_info = None, None
    if not Path(args.input).is_dir():  # before the (slow) VAE load
        raise FileNotFoundError(f"input folder {args.input} does not exist or is not a folder")
    if not args.no_vae:
        moments_fn, vae_info = build_vae_moments_fn(args.vae, args.device)
    summary = preprocess_folder(
        args.input, args.output, image_size=args.image_size, moments_fn=moments_fn, vae_info=vae_info,
        moments_dtype=args.moments_dtype, image_format=args.image_format, jpeg_quality=args.jpeg_quality,
        png_compress_level=args.png_compress_level, shard_size=args.shard_size, batch_size=args.batch_size,
        num_workers=args.num_workers, limit=args.limit, min_size=args.min_size, progress=not args.no_progress,
        argv=sys.argv if argv is None else ["preprocess.py", *argv])
    print(summary)
    return summary


if __name__ == "__main__":
    main()
