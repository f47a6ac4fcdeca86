"""What the torch and DALI loaders share: reading one batch of samples on the CPU, and where batches go.

`BatchReader(dataset)[indices]` is the batch dict of `torch_loader` on the CPU (decoded images, labels, indices,
moments; a sample that does not decode is stood in for, named and counted). The torch loader runs it in its worker
processes; the DALI loader falls back to it for a step whose sample DALI cannot decode. Both import this module, and
neither imports the other's internals, so the arrows between the data modules run one way
(torch_loader -> dali_loader -> batches).
"""
from __future__ import annotations

import logging
from typing import Union

import numpy as np
import torch

logger = logging.getLogger(__name__)


def decode_image_bytes(data: np.ndarray) -> torch.Tensor:
    """PNG/JPEG file bytes uint8 (L,) → RGB pixels uint8 (3, H, W) (torchvision's libpng/libjpeg-turbo decoders)."""
    from torchvision.io import ImageReadMode, decode_image

    return decode_image(torch.from_numpy(np.ascontiguousarray(data)), mode=ImageReadMode.RGB)


def describe_sample(dataset, i: int) -> str:
    """Where sample i lives, for messages: the data set's own description (shard file and entry, source file)."""
    describe = getattr(dataset, "describe", None)
    return describe(int(i)) if describe is not None else f"sample {int(i)}"


def decode_or_stand_in(dataset, indices, samples: list) -> tuple[list, int]:
    """Decode every sample's image; a sample that does not decode is skipped: the next decodable sample of the batch
    stands in for it (image, label and moments, in place in `samples`, so the batch keeps its static size and its
    pairs), it is named in a warning and counted. Returns (images uint8 (3, H, W) each, how many were corrupt)."""
    images, bad = [], []
    for k, sample in enumerate(samples):
        try:
            images.append(decode_image_bytes(sample.image))
        except RuntimeError as error:
            images.append(None)
            bad.append((k, str(error).splitlines()[0] if str(error) else type(error).__name__))
    if not bad:
        return images, 0
    good = [k for k, image in enumerate(images) if image is not None]
    if not good:
        k, why = bad[0]
        raise RuntimeError(f"no sample of a batch decodes, e.g. {describe_sample(dataset, indices[k])}: {why}")
    for k, why in bad:
        stand_in = next((g for g in good if g > k), good[0])  # the next decodable one, wrapping around
        images[k], samples[k] = images[stand_in], samples[stand_in]
        logger.warning("corrupt sample skipped: %s does not decode (%s); %s stands in for it this step",
                       describe_sample(dataset, indices[k]), why, describe_sample(dataset, indices[stand_in]))
    return images, len(bad)


class BatchReader(torch.utils.data.Dataset):
    """Map-style view of a data set whose items are whole batches: `reader[indices]` → the batch dict on the CPU.

    One call per batch keeps the inter-process traffic to one message per step.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: np.ndarray) -> dict:
        samples = [self.dataset.read(int(i)) for i in indices]
        corrupt = 0
        if self.dataset.encoded:
            decoded, corrupt = decode_or_stand_in(self.dataset, indices, samples)
            images = torch.stack(decoded)
        else:
            images = torch.from_numpy(np.stack([s.image for s in samples]))
        batch = {"image": images,
                 "label": torch.tensor([s.label for s in samples], dtype=torch.int64),
                 "index": torch.as_tensor(np.asarray(indices, dtype=np.int64))}
        if corrupt:  # only then: a clean batch is the same dict as DALI's
            batch["corrupt"] = torch.tensor(corrupt, dtype=torch.int64)
        if self.dataset.has_moments:
            batch["moments"] = torch.from_numpy(np.stack([s.moments for s in samples]).astype(np.float32, copy=False))
        return batch


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """None: the current CUDA device when there is one, else the CPU; a CUDA device without CUDA is a ValueError."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device} was asked for but CUDA is not available")
    return device
