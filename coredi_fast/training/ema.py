"""Exponential moving average of the denoiser's weights, kept in float32 whatever the training precision.

    ema = decay * ema + (1 - decay) * param        every optimizer step (ReDi/SiT: decay 0.9999)

The EMA holds only trainable parameters and is a plain dict of tensors keyed like `model.state_dict()` (frozen
tensors such as the sin-cos `pos_embed` are copied as they are), so `ema.state_dict()` loads into a SiT/DiT model
exactly like the public checkpoints' "ema" entry. The update is one fused `torch._foreach_lerp_` over all tensors.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self._names = [name for name, p in model.named_parameters() if p.requires_grad]
        state = model.state_dict()
        self.shadow: Dict[str, torch.Tensor] = {
            name: t.detach().to(torch.float32).clone() if t.is_floating_point() else t.detach().clone()
            for name, t in state.items()
        }

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        decay = self.decay if decay is None else decay
        params = dict(model.named_parameters())
        shadows = [self.shadow[n] for n in self._names]
        current = [params[n].detach().to(torch.float32) for n in self._names]
        torch._foreach_lerp_(shadows, current, 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into `model` (cast to its dtypes)."""
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        unexpected = set(state) - set(self.shadow)
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the model: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        for k, v in state.items():
            self.shadow[k].copy_(v)
