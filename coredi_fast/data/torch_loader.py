"""The PyTorch loader (runs everywhere), and `build_loader`, which picks DALI or this one.

Every loader of `coredi_fast.data` yields, per training step, this rank's batch as a dict:

    image          uint8   (b, C, H, W)   decoded pixels
    label          int64   (b,)
    index          int64   (b,)           dataset indices (tests, feature-map pictures)
    moments        float32 (b, 2C', h, w) VAE posterior moments in `loader.moments_layout` (absent in pixel space)
    encoder_input  float32 (b, 3, R, R)   only with encoder_resolution=R: `encoder_input.encoder_input(image, R)`
    corrupt        int64   ()             only in a batch where samples did not decode (torch loader): how many;
                                          each was named in a warning and a decodable sample of the batch stood in

on `loader.device`. Iterating a loader runs the rest of the current epoch (a fresh epoch after the previous one
ended); `loader.state_dict()` is the position after the last batch *handed out*, for exact resume.
"""
from __future__ import annotations

import logging
import signal
from typing import Optional, Union

import torch
from torch.utils.data import DataLoader

from .batches import BatchReader, resolve_device
from .encoder_input import encoder_input
from .sampler import ShardedSampler

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "dali")


def _leave_stop_signals_to_trainer(worker_id: int) -> None:
    """Workers ignore SIGTERM/SIGINT: a launcher signals the whole process group, and the trainer finishes its step
    and checkpoints on them (training/stop_signals.py); the loader ends its workers itself."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


class TorchLoader:
    """A `torch.utils.data.DataLoader` driven by a ShardedSampler, delivering the batch dict (module docstring).

    Args:
        dataset:            ShardedImageDataset, RepaFolderDataset or DigitsDataset (anything with `read(i)`).
        sampler:            the ShardedSampler giving this rank's indices per step.
        num_workers:        decoding processes (0: in this process). Workers persist across epochs.
        device:             where batches are delivered (default: the current CUDA device, else CPU). On CUDA
                            host memory is pinned and copies are asynchronous.
        encoder_resolution: R to also deliver `encoder_input` (computed on `device`), or None.
        prefetch_factor:    batches each worker prepares ahead.
    """

    backend = "torch"

    def __init__(self, dataset, sampler: ShardedSampler, *, num_workers: int = 4,
                 device: Union[str, torch.device, None] = None, encoder_resolution: Optional[int] = None,
                 prefetch_factor: int = 2):
        if not isinstance(sampler, ShardedSampler):
            raise TypeError(f"sampler must be a ShardedSampler, got {type(sampler).__name__}")
        if sampler.num_samples != len(dataset):
            raise ValueError(f"sampler.num_samples={sampler.num_samples} but the data set has {len(dataset)} samples")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        if encoder_resolution is not None and (not isinstance(encoder_resolution, int) or encoder_resolution < 1):
            raise ValueError(f"encoder_resolution must be a positive int or None, got {encoder_resolution!r}")
        self.dataset = dataset
        self.sampler = sampler
        self.device = resolve_device(device)
        self.encoder_resolution = encoder_resolution
        self.moments_layout = dataset.moments_layout
        extra = {"prefetch_factor": prefetch_factor, "persistent_workers": True} if num_workers > 0 else {}
        self._loader = DataLoader(BatchReader(dataset), sampler=sampler, batch_size=None, num_workers=num_workers,
                                  pin_memory=self.device.type == "cuda", worker_init_fn=_leave_stop_signals_to_trainer,
                                  **extra)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def __len__(self) -> int:
        """Batches left in the current epoch."""
        return len(self.sampler)

    def __iter__(self):
        if self._loader is None:
            raise RuntimeError("this TorchLoader was closed")
        for batch in self._loader:
            if self.device.type != "cpu":
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            if self.encoder_resolution is not None:
                batch["encoder_input"] = encoder_input(batch["image"], self.encoder_resolution)
            self.sampler.advance()
            yield batch

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def close(self) -> None:
        """Stops the worker processes."""
        self._loader = None


def build_loader(dataset, *, global_batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 drop_last: bool = True, num_workers: int = 4, device: Union[str, torch.device, None] = None,
                 encoder_resolution: Optional[int] = None, backend: str = "auto", **backend_kwargs):
    """A loader over `dataset` for this rank, DALI when it can help, else PyTorch.

    backend: "auto" picks DALI when it is installed, a GPU is the target and the data set holds encoded images
             (DALI's gain is GPU decoding); "torch" / "dali" force one (DALI runs on CPU too, with device="cpu").
             The choice and the reason are logged.
    num_workers: torch: decoding processes; DALI: its CPU threads (`num_threads`).
    backend_kwargs: extra arguments of TorchLoader or DaliLoader (e.g. prefetch_queue_depth, py_num_workers).
    Returns a TorchLoader or DaliLoader (same iteration contract; see the module docstring).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    sampler = ShardedSampler(len(dataset), global_batch_size, rank=rank, world_size=world_size, seed=seed,
                             drop_last=drop_last)
    target = resolve_device(device)
    if backend == "auto":
        from .dali_loader import dali_available

        if not dali_available():
            backend, reason = "torch", "nvidia.dali is not installed"
        elif target.type != "cuda":
            backend, reason = "torch", f"the target device is {target} (DALI helps by decoding on the GPU)"
        elif not dataset.encoded:
            backend, reason = "torch", "the data set holds raw pixels (nothing to decode)"
        else:
            backend, reason = "dali", f"DALI is installed and decodes on {target}"
    else:
        reason = "asked for"
    logger.info("data loader: %s (%s)", backend, reason)
    if backend == "dali":
        from .dali_loader import DaliLoader

        return DaliLoader(dataset, sampler, device=target, num_threads=max(1, num_workers),
                          encoder_resolution=encoder_resolution, **backend_kwargs)
    return TorchLoader(dataset, sampler, num_workers=num_workers, device=target,
                       encoder_resolution=encoder_resolution, **backend_kwargs)
