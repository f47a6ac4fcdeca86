"""The DALI loader: the same batches as `TorchLoader`, decoded by DALI (on the GPU with device="mixed").

The pipeline is fed by `fn.external_source` with a stateless batch source: pipeline iteration k reads this rank's
batch at global step start + k of the ShardedSampler (`local_batch_at`), i.e. encoded bytes, moments, labels and
indices straight from the dataset's memmaps. The stream never ends; the loader hands out the steps of one epoch
per `for` loop, so batches prefetched across an epoch boundary are simply the next epoch's first batches.
DALI runs `prefetch_queue_depth` iterations ahead, overlapping reading and decoding with training.

Encoder input (`encoder_resolution=R`):
* encoder_resize="torch" (default): `encoder_input.encoder_input` on the delivered images, on their device. This
  is ReDi's exact preprocessing (bicubic a = −0.75) and costs microseconds on a GPU.
* encoder_resize="dali": normalize + `fn.resize(interp_type=INTERP_CUBIC, antialias=False)` inside the pipeline
  (overlapped). DALI's cubic is the a = −0.5 (Catmull–Rom) kernel, so the values differ from ReDi's by up to
  ~0.1–0.4 in normalized units at sharp edges: use it only when the small gain matters more than faithfulness.

Runs on CPU machines with device="cpu" (`device_id=None`, `decoders.image(device="cpu")`); DALI cannot create a
pipeline with a device id when CUDA is absent. Importing this module does not import DALI.
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Optional, Union

import numpy as np
import torch

from .batches import BatchReader, resolve_device
from .encoder_input import IMAGENET_MEAN, IMAGENET_STD, encoder_input
from .sampler import ShardedSampler

logger = logging.getLogger(__name__)

ENCODER_RESIZE = ("torch", "dali")


def dali_available() -> bool:
    """True when nvidia.dali can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


class _BatchSource:
    """External-source callable: pipeline iteration → (image bytes or pixels, [moments], labels, indices) lists.

    Stateless (a pure function of the iteration number), so DALI may call it ahead of time or from worker
    processes; picklable (the datasets drop their memmaps when pickled).
    """

    def __init__(self, dataset, sampler: ShardedSampler, start_step: int):
        self.dataset, self.sampler, self.start_step = dataset, sampler, int(start_step)

    def __call__(self, iteration):
        step = self.start_step + int(getattr(iteration, "iteration", iteration))
        indices = self.sampler.local_batch_at(step)
        samples = [self.dataset.read(int(i)) for i in indices]
        outputs = [[s.image for s in samples]]
        if self.dataset.has_moments:
            outputs.append([s.moments for s in samples])
        outputs.append([np.array(s.label, dtype=np.int64) for s in samples])
        outputs.append([np.array(i, dtype=np.int64) for i in indices])
        return tuple(outputs)


class DaliLoader:
    """DALI pipeline delivering the batch dict of `torch_loader` (same samples, same order).

    Args:
        dataset, sampler:     as for TorchLoader.
        device:               "cuda[:i]" (decode with device="mixed", batches arrive on that GPU) or "cpu"
                              (decode on CPU, `device_id=None`). Default: CUDA if available.
        num_threads:          DALI CPU threads.
        py_num_workers:       >0: the batch source runs in that many Python worker processes (DALI's parallel
                              external source; fork, or spawn once CUDA is initialized). 0: in the main thread.
        prefetch_queue_depth: iterations DALI prepares ahead.
        encoder_resolution:   R to also deliver `encoder_input`, or None.
        encoder_resize:       "torch" (ReDi-exact, default) or "dali" (in-pipeline Catmull–Rom; module docstring).
    """

    backend = "dali"

    def __init__(self, dataset, sampler: ShardedSampler, *, device: Union[str, torch.device, None] = None,
                 num_threads: int = 4, py_num_workers: int = 0, prefetch_queue_depth: int = 2,
                 encoder_resolution: Optional[int] = None, encoder_resize: str = "torch"):
        if not dali_available():
            raise ImportError("DaliLoader needs NVIDIA DALI: pip install nvidia-dali-cuda130 (or use backend='torch')")
        if not isinstance(sampler, ShardedSampler):
            raise TypeError(f"sampler must be a ShardedSampler, got {type(sampler).__name__}")
        if sampler.num_samples != len(dataset):
            raise ValueError(f"sampler.num_samples={sampler.num_samples} but the data set has {len(dataset)} samples")
        if encoder_resize not in ENCODER_RESIZE:
            raise ValueError(f"encoder_resize must be one of {ENCODER_RESIZE}, got {encoder_resize!r}")
        if encoder_resolution is not None and (not isinstance(encoder_resolution, int) or encoder_resolution < 1):
            raise ValueError(f"encoder_resolution must be a positive int or None, got {encoder_resolution!r}")
        for name, value, low in (("num_threads", num_threads, 1), ("py_num_workers", py_num_workers, 0),
                                 ("prefetch_queue_depth", prefetch_queue_depth, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if dataset.channels not in (1, 3):
            raise ValueError(f"dataset.channels must be 1 or 3, got {dataset.channels}")
        self.dataset = dataset
        self.sampler = sampler
        self.device = resolve_device(device)
        self.num_threads = num_threads
        self.py_num_workers = py_num_workers
        self.prefetch_queue_depth = prefetch_queue_depth
        self.encoder_resolution = encoder_resolution
        self.encoder_resize = encoder_resize
        self.moments_layout = dataset.moments_layout
        self._pipe = None
        self._iterator = None
        self._stream_step = None  # the global step of the next batch the pipeline will deliver

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def __len__(self) -> int:
        return len(self.sampler)

    # ---- the pipeline ----

    def _output_names(self) -> list[str]:
        names = ["image"]
        if self.dataset.has_moments:
            names.append("moments")
        names += ["label", "index"]
        if self.encoder_resolution is not None and self.encoder_resize == "dali":
            names.append("encoder_input")
        return names

    def _build_pipeline(self, start_step: int):
        from nvidia.dali import fn, pipeline_def, types

        on_gpu = self.device.type == "cuda"
        dataset, has_moments = self.dataset, self.dataset.has_moments
        parallel = self.py_num_workers > 0
        source = _BatchSource(dataset, self.sampler, start_step)
        num_outputs = 4 if has_moments else 3
        image_dtype_ndim = (types.UINT8, 1) if dataset.encoded else (types.UINT8, 3)
        dtypes = [image_dtype_ndim[0]] + ([types.FLOAT] if has_moments else []) + [types.INT64, types.INT64]
        ndims = [image_dtype_ndim[1]] + ([3] if has_moments else []) + [0, 0]
        resolution, dali_resize = self.encoder_resolution, self.encoder_resize == "dali"

        @pipeline_def
        def pipeline():
            outputs = list(fn.external_source(source=source, num_outputs=num_outputs, batch=True, parallel=parallel,
                                              dtype=dtypes, ndim=ndims))
            raw, label, index = outputs[0], outputs[-2], outputs[-1]
            moments = outputs[1] if has_moments else None
            if dataset.encoded:
                hwc = fn.decoders.image(raw, device="mixed" if on_gpu else "cpu", output_type=types.RGB)
            else:
                hwc = fn.transpose(raw.gpu() if on_gpu else raw, perm=[1, 2, 0], output_layout="HWC")
            image = fn.transpose(hwc, perm=[2, 0, 1], output_layout="CHW")
            results = [image]
            if has_moments:
                results.append(moments.gpu() if on_gpu else moments)
            results += [label.gpu() if on_gpu else label, index.gpu() if on_gpu else index]
            if resolution is not None and dali_resize:
                rgb = fn.cat(hwc, hwc, hwc, axis=2) if dataset.channels == 1 else hwc
                normalized = fn.crop_mirror_normalize(rgb, dtype=types.FLOAT, output_layout="HWC",
                                                      mean=[255.0 * m for m in IMAGENET_MEAN],
                                                      std=[255.0 * s for s in IMAGENET_STD])
                resized = fn.resize(normalized, size=[resolution, resolution], interp_type=types.INTERP_CUBIC,
                                    antialias=False)
                results.append(fn.transpose(resized, perm=[2, 0, 1], output_layout="CHW"))
            return tuple(results)

        start_method = "spawn" if torch.cuda.is_initialized() else "fork"
        pipe = pipeline(batch_size=self.sampler.local_batch_size, num_threads=self.num_threads,
                        device_id=(self.device.index if self.device.index is not None else torch.cuda.current_device())
                        if on_gpu else None,
                        seed=self.sampler.seed, prefetch_queue_depth=self.prefetch_queue_depth,
                        py_num_workers=max(1, self.py_num_workers), py_start_method=start_method)
        if parallel:
            pipe.start_py_workers()
        pipe.build()
        return pipe

    def _ensure_stream(self) -> None:
        """(Re)starts the pipeline when it does not continue exactly at the sampler's position."""
        if self._pipe is not None and self._stream_step == self.sampler.global_step:
            return
        self.close()
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        start = self.sampler.global_step
        self._pipe = self._build_pipeline(start)
        self._iterator = DALIGenericIterator([self._pipe], self._output_names(), size=-1, auto_reset=False,
                                             prepare_first_batch=False)
        self._stream_step = start
        logger.info("DALI pipeline started at global step %d on %s", start, self.device)

    def __iter__(self):
        for _ in range(len(self.sampler)):
            self._ensure_stream()
            try:
                batch = dict(next(self._iterator)[0])
                self._stream_step += 1
            except RuntimeError as error:
                if "decoders.image" not in str(error):
                    raise
                # A sample DALI cannot decode. Its pipeline stops at the first error (they arrive in step order):
                # this step's batch comes from the torch path, which skips, names and counts the sample, and the
                # next step starts a new pipeline.
                self.close()
                batch = self._batch_on_cpu(self.sampler.global_step)
            if self.encoder_resolution is not None and "encoder_input" not in batch:
                batch["encoder_input"] = encoder_input(batch["image"], self.encoder_resolution)
            self.sampler.advance()
            yield batch

    def _batch_on_cpu(self, step: int) -> dict:
        """The batch of global `step` decoded by the torch loader's reader (corrupt samples stood in for)."""
        batch = BatchReader(self.dataset)[self.sampler.local_batch_at(step)]
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)  # the next iteration restarts the stream there

    def close(self) -> None:
        """Releases the pipeline (and its Python workers)."""
        self._iterator = None
        self._pipe = None
        self._stream_step = None
