"""Random horizontal flips (`data.hflip`), per sample, drawn on the device from the step's seeded generator.

JiT trains with `transforms.RandomHorizontalFlip()` (a coin per image, p = 1/2); ReDi trains without flips (its
latents are stored once, unflipped). Here the coins are drawn for the whole *global* batch from the trainer's
(seed, step) generator and each rank takes its slice, so the flipped images are the same on 1 or N processes and
after a resume, like every other random draw of a step. The trainer flips the uint8 images before anything else
reads them: the pixels the denoiser diffuses and the images the online encoder sees are the same flipped images,
so the features belong to the flipped image. No host sync: the mask stays a device tensor.

Pre-encoded VAE latents cannot be flipped consistently (a mirrored latent is not the VAE's latent of the mirrored
image, and the VAE moments were stored from the unflipped images), so `data.hflip` is refused for data that stores
latents (`check_hflip`).
"""
from __future__ import annotations

import torch


def draw_hflip_mask(global_batch: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """bool (global_batch,): True for the samples of the global batch that are mirrored, each with probability 1/2.
    Draws exactly `global_batch` uniforms from `generator` (on `device`); slice it to this rank's samples."""
    return torch.rand(global_batch, generator=generator, device=device) < 0.5


def hflip_where(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """images (B, C, H, W) of any dtype, mask bool (B,) on the same device → images with the samples where mask is
    True mirrored left-right (the last axis); the others unchanged."""
    if images.dim() != 4 or mask.shape != images.shape[:1]:
        raise ValueError(f"images must be (B, C, H, W) and mask (B,), got {tuple(images.shape)} and "
                         f"{tuple(mask.shape)}")
    return torch.where(mask.view(-1, 1, 1, 1), images.flip(-1), images)


def check_hflip(hflip: bool, has_moments: bool, data_path) -> None:
    """ValueError when data.hflip is asked for data that stores VAE latents (see the module docstring)."""
    if hflip and has_moments:
        raise ValueError(f"data.hflip=true, but {data_path} stores VAE latents of the unflipped images, and a "
                         "mirrored latent is not the VAE's latent of the mirrored image: set data.hflip=false (ReDi "
                         "trains its latents without flips) or train in pixel space (preprocess.py --no-vae)")
