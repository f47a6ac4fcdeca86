"""The study's independent judge: a small CNN digit classifier that shares nothing with the semantic encoder.

The demo's semantic encoder (`encoders/digits_vit.py`, a ViT) was trained on the digits' *train* split, and the
diffusion models train on that split too. A judge built from either would grade its own homework, so this network
is a different architecture (convolutions, no attention) trained only on the held-out *test* split (359 images, with
random shifts). Its 64-d penultimate layer plays the role of InceptionV3's pool features in FID, and its logits grade
class-conditional samples ("did the model draw the digit it was asked for?"). The features are taken *before* that
layer's ReLU: after it, units that never fire on real digits would be constant zeros and make the covariance in the
Fréchet distance singular.

The shipped weights (`coredi_fast/assets/digits_classifier.pt`, ~0.4 MB) are made by
`scripts/train_digits_classifier.py` (deterministic: fixed seed, one thread).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from ..encoders.weights import load_config_checkpoint, save_config_checkpoint

DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "digits_classifier.pt")


@dataclass(frozen=True)
class DigitsCNNConfig:
    image_size: int = 16
    in_channels: int = 1
    width: int = 32
    feature_dim: int = 64
    num_classes: int = 10
    dropout: float = 0.3

    def __post_init__(self):
        if self.image_size % 4:
            raise ValueError(f"image_size={self.image_size} must be divisible by 4 (two 2x2 poolings)")
        for name in ("in_channels", "width", "feature_dim", "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


class DigitsCNN(nn.Module):
    """Conv-ReLU x2, pool, Conv-ReLU, pool, Linear (the features), ReLU, dropout, Linear (the logits).

    `features(x)`: x float (B, C, 16, 16) in [-1, 1] -> (B, feature_dim) penultimate pre-activations.
    `forward(x)`: -> logits (B, num_classes).
    """

    def __init__(self, config: DigitsCNNConfig = DigitsCNNConfig()):
        super().__init__()
        self.config = c = config
        self.trunk = nn.Sequential(
            nn.Conv2d(c.in_channels, c.width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c.width, c.width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                                   # (B, width, S/2, S/2)
            nn.Conv2d(c.width, 2 * c.width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                                   # (B, 2 width, S/4, S/4)
            nn.Flatten(),
            nn.Linear(2 * c.width * (c.image_size // 4) ** 2, c.feature_dim),
        )
        self.dropout = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.feature_dim, c.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(torch.relu(features)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.features(x))


def images_to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) in [0, 255] -> float in [-1, 1] (the diffusion models' pixel range)."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise TypeError(f"images must be a uint8 tensor (B, C, H, W) in [0, 255], got {got}")
    return images.float() / 127.5 - 1.0


def save_digits_classifier(model: DigitsCNN, path: str) -> None:
    """Write {'config', 'state_dict'} atomically (loadable with weights_only=True)."""
    save_config_checkpoint(asdict(model.config), model.state_dict(), path)


def load_digits_classifier(weights: str = DEFAULT_WEIGHTS) -> DigitsCNN:
    """The frozen classifier in eval mode. Raises FileNotFoundError / ValueError naming the file."""
    config, state = load_config_checkpoint(weights, "digits classifier", "scripts/train_digits_classifier.py")
    model = DigitsCNN(DigitsCNNConfig(**config))
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)
