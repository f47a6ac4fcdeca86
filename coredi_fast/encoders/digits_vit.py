"""A tiny ViT pretrained on scikit-learn's digits: the embedded demo's stand-in for DINOv2.

The demo must run anywhere with no downloads, so it cannot use DINOv2. This encoder plays the same role at a size a
laptop trains in a minute: a frozen ViT whose patch tokens (after the final norm) are the semantic features that
CoReDi projects. On 16×16 digit images with 2×2 patches it gives an 8×8 token grid, which the training code resizes
onto the 16×16 pixel grid — the same 1:2 relation as DINOv2's 16×16 grid and SD-VAE's 32×32 latents.

The shipped weights (`coredi_fast/assets/digits_vit.pt`, about 0.6 MB) were made by
`scripts/train_digits_encoder.py`, which trains it as a classifier on the digits' training split only; the held-out
split stays unseen by every network the demo ships.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .weights import load_config_checkpoint, save_config_checkpoint

DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "digits_vit.pt")


@dataclass(frozen=True)
class DigitsViTConfig:
    image_size: int = 16
    in_channels: int = 1
    patch_size: int = 2
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 2.0
    num_classes: int = 10

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")


class _Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class DigitsViT(nn.Module):
    """Tiny ViT. `forward_features(x)`: x float (B, C, H, W) normalized → patch tokens (B, L, D) after the final norm."""

    def __init__(self, config: DigitsViTConfig = DigitsViTConfig()):
        super().__init__()
        self.config = config
        c = config
        self.grid_size = c.image_size // c.patch_size
        self.patch_embed = nn.Conv2d(c.in_channels, c.embed_dim, c.patch_size, c.patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, self.grid_size**2, c.embed_dim) * 0.02)
        self.blocks = nn.ModuleList(_Block(c.embed_dim, c.num_heads, c.mlp_ratio) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.embed_dim)
        # Used only for pretraining (classification from mean-pooled patch tokens); not part of the features.
        self.head = nn.Linear(c.embed_dim, c.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, L, D), row-major grid
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes), for pretraining."""
        return self.head(self.forward_features(x).mean(dim=1))


def normalize_digits(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) in [0, 255] → float centred on the digits' pixel range ([-1, 1])."""
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 in [0, 255], got dtype {images.dtype}")
    return images.float() / 127.5 - 1.0


class DigitsEncoder(nn.Module):
    """Frozen semantic encoder for the demo; the same contract as `DINOv2Encoder`.

    forward(images uint8 (B, C, H, W)) → patch tokens (B, L, D), L = grid_size², under no_grad.
    """

    def __init__(self, weights: str | None = DEFAULT_WEIGHTS, config: DigitsViTConfig | None = None):
        super().__init__()
        state = None
        if weights is not None:
            saved, state = load_config_checkpoint(weights, "digits encoder", "scripts/train_digits_encoder.py")
            config = DigitsViTConfig(**saved)
        self.vit = DigitsViT(config or DigitsViTConfig())
        if state is not None:
            self.vit.load_state_dict(state, strict=True)
        self.vit.requires_grad_(False)
        self.vit.eval()
        self.embed_dim = self.vit.config.embed_dim
        self.grid_size = self.vit.grid_size
        self.num_tokens = self.grid_size**2
        self.image_size = self.vit.config.image_size

    def train(self, mode: bool = True):
        # Frozen: stays in eval mode whatever the parent module does.
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images.float(), size=self.image_size, mode="bilinear", align_corners=False)
            images = images.round().clamp(0, 255).to(torch.uint8)
        return self.vit.forward_features(normalize_digits(images))


def save_digits_encoder(model: DigitsViT, path: str) -> None:
    """Write {'config', 'state_dict'} atomically (loadable with weights_only=True)."""
    save_config_checkpoint(asdict(model.config), model.state_dict(), path)
