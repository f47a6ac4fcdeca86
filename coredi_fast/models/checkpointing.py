"""Selective activation checkpointing: which transformer blocks recompute their activations in the backward.

`grad_checkpointing` on SiT and JiT is either a bool (every block, or none) or an int k: the first k blocks
recompute (non-reentrant `torch.utils.checkpoint`), the rest keep their activations. Every block of a DiT stores
about the same activation memory, so k trades memory for recompute linearly: raise it only until the batch fits,
since each checkpointed block costs one more forward in the backward (about a third more compute for that block).
"""
from __future__ import annotations

import numbers


def checkpointed_block_count(setting, depth: int, name: str = "grad_checkpointing") -> int:
    """How many leading blocks of a `depth`-block model recompute: True -> depth, False -> 0, int k -> k.

    Raises TypeError for anything but a bool or an int, ValueError for k outside [0, depth]; both name `name`.
    """
    if isinstance(setting, bool):
        return depth if setting else 0
    if not isinstance(setting, numbers.Integral):
        raise TypeError(f"{name} must be a bool or an int (the number of blocks to recompute), got {setting!r}")
    if not 0 <= setting <= depth:
        raise ValueError(f"{name}={setting} must be between 0 and the model's depth {depth}")
    return int(setting)
