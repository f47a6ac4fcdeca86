"""The semantic encoder's input, built from the training images exactly as ReDi does. One place for the constants.

ReDi (`train_redi.py`) feeds DINOv2 with

    x = images_uint8 / 255
    x = (x - IMAGENET_MEAN) / IMAGENET_STD                           # normalize first ...
    x = F.interpolate(x, R, mode="bicubic", align_corners=False)     # ... then resize, no antialias

with R = 224 for 256-px images (16×16 patch grid of ViT-B/14). PyTorch's bicubic is Keys' cubic convolution with
a = −0.75 (half-pixel centres, clamped borders). DALI's `INTERP_CUBIC` is the a = −0.5 (Catmull–Rom) kernel, so an
in-pipeline DALI resize is close to, but not the same as, ReDi's input (see `dali_loader.py`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# timm.data.IMAGENET_DEFAULT_MEAN / _STD: what DINOv2 was trained with and ReDi normalizes with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The a of PyTorch's bicubic kernel (aten/src/ATen/native/UpSample.h) and of DALI's cubic resize.
TORCH_BICUBIC_A = -0.75
DALI_CUBIC_A = -0.5


def encoder_input(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """ReDi's encoder preprocessing.

    images:     uint8 (B, C, H, W), C = 3, or C = 1 (grey images are repeated to 3 channels first).
    resolution: R, the square side the encoder takes (224 for DINOv2 on 256-px images). No resize when H = W = R.
    Returns float32 (B, 3, R, R) on the images' device.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 1 or 3, H, W) tensor, got {shape}")
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8, got {images.dtype}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    x = images.float().div_(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", align_corners=False)
    return x
