"""ADM's ImageNet center crop (guided-diffusion `center_crop_arr`), the crop REPA and ReDi train on.

1. While the short side is at least 2·size, halve both sides (integer division) with a BOX filter: cheap,
   alias-free downsampling of large photos before the final resize.
2. Resize so the short side is `size`, with BICUBIC; each side is round(side · size / short side) (Python's
   round: halves go to even, as in ADM).
3. Crop the centre size×size square; the offset is (side − size) // 2 on each axis.
"""
from __future__ import annotations

from typing import Union

import numpy as np
from PIL import Image


HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb8(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB. 16-bit greyscale ("I;16*", and "I", which PIL opens 16-bit PNGs as) is scaled from
    0..65535 to 0..255 first: PIL's convert("RGB") clips such values at 255, storing a 16-bit PNG almost white."""
    if image.mode in HIGH_BIT_DEPTH_MODES:
        values = np.asarray(image, dtype=np.float64)
        eight_bit = np.clip(np.round(values * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        image = Image.fromarray(eight_bit, mode="L")
    return image.convert("RGB")


def center_crop_arr(image: Union[Image.Image, np.ndarray], image_size: int) -> np.ndarray:
    """ADM center crop.

    image:      a PIL image (any mode; converted to RGB) or a uint8 array (H, W, 3).
    image_size: the output side S.
    Returns uint8 (S, S, 3).
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image array must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image or a numpy array, got {type(image).__name__}")
    if image.mode != "RGB":
        image = to_rgb8(image)

    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.Resampling.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.Resampling.BICUBIC)

    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return np.ascontiguousarray(arr[top:top + image_size, left:left + image_size])
