"""Spatial alignment of encoder tokens with the latent grid (method.md §1.4).

DINOv2-B/14 at 224 px gives L = 256 patch tokens in row-major order on a 16x16 grid; the SD-VAE latent at 256 px is
32x32. ReDi reshapes the projected tokens to (B, d, 16, 16) and resizes them bilinearly (align_corners=False) onto
the latent grid, then concatenates them with the latent on channels, so the model input has image_channels + d
channels. In pixel space (JiT/16 at 256 px) the grids already match and no resize happens.
"""
import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

Size = Union[int, Sequence[int]]


def _pair(size: Size, name: str) -> Tuple[int, int]:
    if isinstance(size, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {size!r}")
    if isinstance(size, int):
        size = (size, size)
    size = tuple(size)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {size!r}")
    return size


def check_feature_grid(num_tokens: int, latent_size: Size) -> int:
    """Validate that L tokens form a square grid whose side divides the latent grid; returns the side sqrt(L).

    Args:
        num_tokens: L, the encoder's patch-token count (256 for DINOv2 at 224 px).
        latent_size: H or (H, W) of the latent grid the features are resized onto (32 for SD-VAE at 256 px).

    Raises ValueError naming `num_tokens` when L is not a perfect square, and `latent_size` when H or W is not an
    integer multiple of (or equal to) the feature grid side (downsampling would silently drop features).
    """
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"num_tokens={num_tokens} is not a perfect square: encoder patch tokens must form a "
                         f"square grid (e.g. 256 = 16x16 for DINOv2-B/14 at 224 px)")
    height, width = _pair(latent_size, "latent_size")
    if height % side or width % side:
        raise ValueError(f"latent_size={latent_size} must be an integer multiple of the feature grid side {side} "
                         f"(num_tokens={num_tokens}), e.g. 16x16 DINOv2 tokens onto a 32x32 SD-VAE latent")
    return side


def tokens_to_grid(z: torch.Tensor, out_size: Size) -> torch.Tensor:
    """(B, L, d) row-major tokens -> (B, d, H, W) on the latent grid (bilinear, align_corners=False, like ReDi).

    Gradients flow through (the learned projection W receives its gradient through this network input).
    """
    if z.ndim != 3:
        raise ValueError(f"z must have shape (B, L, d), got {tuple(z.shape)}")
    batch, num_tokens, channels = z.shape
    side = check_feature_grid(num_tokens, out_size)
    height, width = _pair(out_size, "out_size")
    grid = z.transpose(1, 2).reshape(batch, channels, side, side)
    if (height, width) == (side, side):
        return grid.contiguous()
    return F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)


def grid_to_tokens(grid: torch.Tensor, num_tokens: Optional[int] = None) -> torch.Tensor:
    """(B, d, H, W) -> (B, L, d) row-major tokens.

    With `num_tokens` (a square L whose side divides H and W) the grid is first area-averaged down to sqrt(L) x
    sqrt(L), e.g. to view generated 32x32 feature channels on DINOv2's 16x16 grid. That is not an exact inverse of
    the bilinear upsampling in `tokens_to_grid`; without `num_tokens` the map is the exact inverse of the reshape.
    """
    if grid.ndim != 4:
        raise ValueError(f"grid must have shape (B, d, H, W), got {tuple(grid.shape)}")
    batch, channels, height, width = grid.shape
    if num_tokens is not None:
        side = check_feature_grid(num_tokens, (height, width))
        if (height, width) != (side, side):
            grid = F.avg_pool2d(grid, kernel_size=(height // side, width // side))
    return grid.flatten(2).transpose(1, 2)


def validate_channels(model_in_channels: int, image_channels: int, feature_channels: int,
                      model_out_channels: Optional[int] = None) -> None:
    """Check that a model built for the joint input fits: in_channels == image_channels + d.

    Args:
        model_in_channels: the model's `in_channels`.
        image_channels: latent (4 for SD-VAE) or pixel (3) channels.
        feature_channels: d, the projector's `dim` (0 in the no-feature mode).
        model_out_channels: optional; the model's predicted channels (without learn_sigma's variance half), which
            must match too since the loss splits the output the same way.
    """
    for name, value in (("model_in_channels", model_in_channels), ("image_channels", image_channels),
                        ("feature_channels", feature_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    expected = image_channels + feature_channels
    if model_in_channels != expected:
        raise ValueError(f"model in_channels={model_in_channels} does not match image_channels={image_channels} + "
                         f"feature channels d={feature_channels} = {expected}")
    if model_out_channels is not None and model_out_channels != expected:
        raise ValueError(f"model out_channels={model_out_channels} does not match image_channels={image_channels} "
                         f"+ feature channels d={feature_channels} = {expected}")
