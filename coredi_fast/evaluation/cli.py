"""`python evaluate.py SAMPLES REFERENCE [...]`: FID, sFID, IS, precision and recall, ADM's protocol, in PyTorch.

SAMPLES: an ADM-style npz (uint8 NHWC under arr_0, as `sample.py` writes) or an image folder.
REFERENCE: an ADM reference batch npz (arr_0 and/or mu, sigma, mu_s, sigma_s), e.g. VIRTUAL_imagenet256_labeled.npz,
or an image folder. Prints a table and writes JSON. Under `torchrun --nproc_per_node N` the feature extraction is
split over the ranks; rank 0 computes the metrics and writes the JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .features import ImageSourceError, extract_features, open_images
from .inception import (RESIZE_DESCRIPTION, FeatureNetwork, InceptionLoadError, InceptionNotFoundError,
                        load_feature_network)
from .metrics import clamp_distance, frechet_distance, frechet_distance_eigh, inception_score, precision_recall
from .reference import GaussianStats, Reference, ReferenceFileError, default_reference_cache_dir, load_reference

IS_SPLIT_SIZE = 5000  # ADM: Inception Score over consecutive chunks of 5000 samples
PR_K = 3              # ADM: ManifoldEstimator nhood_sizes=(3,)


class EvaluationArgumentError(ValueError):
    """A command-line argument that cannot be used; the message names it."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaluate.py", description="FID, sFID, Inception Score, precision and recall of generated samples "
        "against a reference set, following OpenAI's ADM evaluator with a PyTorch InceptionV3.")
    parser.add_argument("samples", help="samples: an npz with uint8 (N, H, W, 3) images under arr_0, or a folder of "
                        "PNG/JPEG images")
    parser.add_argument("reference", help="reference: an ADM reference batch npz (arr_0 images and/or mu, sigma, "
                        "mu_s, sigma_s statistics) or a folder of images")
    parser.add_argument("--inception", default=None, help="TorchScript Inception file (default: $COREDI_INCEPTION, "
                        "else ~/.cache/coredi_fast/inception/default_1.pt from scripts/fetch_inception.py)")
    parser.add_argument("--batch-size", type=int, default=250, help="images per network call on each rank")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                        help="where the network and the distance computations run")
    parser.add_argument("--out", default=None, help="metrics JSON (default: metrics.json next to SAMPLES)")
    parser.add_argument("--num-samples", type=int, default=None, help="use only the first N samples")
    parser.add_argument("--recompute-reference", action="store_true", help="ignore statistics stored in REFERENCE "
                        "and compute them with this network from its images (both sides then use one network)")
    parser.add_argument("--cache-dir", default=None, help="where reference features are cached (default: "
                        "~/.cache/coredi_fast/reference)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the reference cache")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


# ---------------------------------------------------------------------------------------------------------------
# Metrics from features
# ---------------------------------------------------------------------------------------------------------------

def _check_dims(what: str, samples_dim: int, reference: GaussianStats, source: str, path: str) -> None:
    if samples_dim != reference.dim:
        hint = " (use --recompute-reference to compute them with this network)" if source == "file" else ""
        raise ReferenceFileError(f"reference {path}: its {what} statistics are {reference.dim}-d but the network "
                                 f"gives {samples_dim}-d {what} features{hint}")


def compute_metrics(samples, reference: Reference, network: FeatureNetwork, *, pr_device=None) -> Dict[str, object]:
    """All metrics ADM reports, from sample Features and a Reference. Unavailable ones are None, with the reason in
    result["unavailable"]. Never substitutes one number for another, except that a negative FID/sFID (rounding, on
    tiny sets) is reported as 0 with a note in result["notes"]; result["raw_metrics"] keeps the computed values."""
    net_name = Path(network.path).name if network.path else network.name
    values: Dict[str, Optional[float]] = dict.fromkeys(
        ["fid", "sfid", "inception_score", "inception_score_std", "precision", "recall"])
    unavailable: Dict[str, str] = {}
    checks: Dict[str, float] = {}
    raw: Dict[str, Optional[float]] = {"fid": None, "sfid": None}

    mine = GaussianStats.of(samples.pool)
    _check_dims("pool", mine.dim, reference.pool, reference.stats_source, reference.path)
    raw["fid"] = frechet_distance(mine.mu, mine.sigma, reference.pool.mu, reference.pool.sigma)
    checks["fid_eigh"] = frechet_distance_eigh(mine.mu, mine.sigma, reference.pool.mu, reference.pool.sigma,
                                               device=pr_device)

    if samples.spatial is None:
        unavailable["sfid"] = f"the network ({net_name}) gives no spatial (mixed_6/conv) features"
    elif reference.spatial is None:
        unavailable["sfid"] = f"the reference {reference.path} has no sFID statistics (mu_s, sigma_s) and no images"
    else:
        spatial = GaussianStats.of(samples.spatial)
        _check_dims("spatial", spatial.dim, reference.spatial, reference.spatial_source, reference.path)
        raw["sfid"] = frechet_distance(spatial.mu, spatial.sigma, reference.spatial.mu, reference.spatial.sigma)
    notes = []
    for key, label in (("fid", "FID"), ("sfid", "sFID")):
        if raw[key] is not None:
            values[key], note = clamp_distance(label, raw[key])
            notes += [note] if note else []

    if samples.logits is None:
        unavailable["inception_score"] = (f"the network ({net_name}) has no classifier layer, so there are no "
                                          "class probabilities; pass --inception with a file that keeps one (e.g. "
                                          "NVIDIA's inception-2015-12-05.pt)")
    else:
        values["inception_score"], values["inception_score_std"] = inception_score(
            samples.logits, split_size=IS_SPLIT_SIZE, from_logits=True)

    if reference.pool_features is None:
        unavailable["precision"] = unavailable["recall"] = f"the reference {reference.path} has no images (arr_0)"
    elif min(len(reference.pool_features), len(samples.pool)) <= PR_K:
        unavailable["precision"] = unavailable["recall"] = f"precision/recall need more than k={PR_K} images per set"
    else:
        values["precision"], values["recall"] = precision_recall(reference.pool_features, samples.pool, k=PR_K,
                                                                 device=pr_device)
    return {"metrics": values, "raw_metrics": raw, "unavailable": unavailable, "cross_checks": checks, "notes": notes}


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------

def format_table(result: Dict[str, object]) -> str:
    """The small human-readable table printed at the end."""
    m, missing = result["metrics"], result["unavailable"]

    def value(key: str, fmt: str) -> str:
        if m[key] is None:
            return f"unavailable: {missing.get(key, '')}"
        raw = result.get("raw_metrics", {}).get(key)
        clamped = f" (computed {raw:.6g}, clamped at 0: see the note)" if raw is not None and raw < 0 else ""
        return format(m[key], fmt) + clamped

    is_text = value("inception_score", ".2f")
    if m["inception_score"] is not None:
        is_text += f" ± {m['inception_score_std']:.2f}"
    net, ref = result["network"], result["reference"]
    rows = [("FID", value("fid", ".4f")), ("sFID", value("sfid", ".4f")), ("Inception Score", is_text),
            ("Precision", value("precision", ".4f")), ("Recall", value("recall", ".4f")),
            ("samples", f"{result['num_samples']} from {result['samples']['path']}"),
            ("reference", f"{ref['path']} (statistics: {ref['statistics']})"),
            ("network", f"{net['path']} (sha1 {net['sha1']})")]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {text}" for name, text in rows)


def _default_out(samples: Path) -> Path:
    return samples / "metrics.json" if samples.is_dir() else samples.parent / "metrics.json"


def _statistics_text(reference: Reference) -> str:
    if reference.stats_source == "file":
        return "stored in the file (ADM's were made with the TensorFlow Inception graph)"
    return f"computed with this network from {reference.num_images} images"


# ---------------------------------------------------------------------------------------------------------------
# Entry
# ---------------------------------------------------------------------------------------------------------------

def _setup(device_arg: str):
    """(device, owns_process_group) from torchrun's environment; a gloo/nccl group when WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise EvaluationArgumentError("--device cuda: no CUDA device is available")
    use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    owns = world_size > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return device, owns


def evaluate(args: argparse.Namespace) -> Optional[Dict[str, object]]:
    """Runs one evaluation from parsed arguments. Returns the result dict on rank 0, None on other ranks."""
    started = time.time()
    if args.batch_size < 1:
        raise EvaluationArgumentError(f"--batch-size must be >= 1, got {args.batch_size}")
    samples_path, reference_path = Path(args.samples), Path(args.reference)
    try:
        samples_source = open_images(samples_path)  # shape/dtype errors now, before the network loads
    except ImageSourceError as e:
        raise ImageSourceError(f"samples {e}") from None
    num_samples = len(samples_source) if args.num_samples is None else args.num_samples
    if not 0 < num_samples <= len(samples_source):
        raise EvaluationArgumentError(f"--num-samples {args.num_samples}: {samples_source.description} holds "
                                      f"{len(samples_source)} images")
    if num_samples < 2:
        raise EvaluationArgumentError(f"{samples_source.description}: FID needs at least 2 samples, got {num_samples}")
    if not reference_path.exists():
        raise ReferenceFileError(f"reference {reference_path} does not exist")

    device, owns_group = _setup(args.device)
    try:
        network = load_feature_network(args.inception, device=device)
        cache_dir = None if args.no_cache else Path(args.cache_dir or default_reference_cache_dir())
        reference = load_reference(reference_path, network, recompute=args.recompute_reference,
                                   batch_size=args.batch_size, cache_dir=cache_dir, progress=not args.no_progress)
        samples = extract_features(samples_source, network, batch_size=args.batch_size, num_images=num_samples,
                                   progress=not args.no_progress, desc="samples")
        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        result = compute_metrics(samples, reference, network, pr_device=device)
    finally:
        if owns_group:
            dist.destroy_process_group()

    result.update({
        "num_samples": num_samples,
        "num_reference_images": reference.num_images,
        "samples": {"path": str(samples_path), "image_shape": list(samples_source.image_shape)},
        "reference": {"path": str(reference_path), "statistics": _statistics_text(reference),
                      "statistics_source": reference.stats_source,
                      "spatial_statistics_source": reference.spatial_source, "cache": reference.cache_path},
        "network": network.identity(),
        "protocol": {"preprocessing": RESIZE_DESCRIPTION, "inception_score_split_size": IS_SPLIT_SIZE,
                     "precision_recall_k": PR_K, "sfid_features": "mixed_6/conv[..., :7] flattened HWC (2023-d)",
                     "fid": "scipy.linalg.sqrtm, float64, eps=1e-6 fallback (ADM/pytorch-fid)"},
        "notes": reference.notes + result["notes"],
        "seconds": round(time.time() - started, 1),
    })
    return result


def _write_json(path: Path, result: Dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def main(argv: Optional[Sequence[str]] = None) -> Optional[Dict[str, object]]:
    """`python evaluate.py ...`: prints the table, writes JSON, returns the result (None on ranks > 0). Bad inputs
    exit with status 2 and one line naming the file or argument."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = evaluate(args)
    except (ImageSourceError, ReferenceFileError, InceptionNotFoundError, InceptionLoadError,
            EvaluationArgumentError) as e:
        parser.error(str(e))
    if result is None:
        return None
    out = Path(args.out) if args.out else _default_out(Path(args.samples))
    result["json"] = str(out)
    _write_json(out, result)
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    fid, fid_eigh = result["raw_metrics"]["fid"], result["cross_checks"]["fid_eigh"]
    if not math.isclose(fid, fid_eigh, rel_tol=1e-3, abs_tol=1e-3):
        print(f"warning: FID by sqrtm ({fid:.6f}) and by eigh ({fid_eigh:.6f}) disagree; the covariances are badly "
              "conditioned (too few samples?)", file=sys.stderr)
    print(format_table(result))
    print(f"wrote {out}")
    return result
