"""Which dataset indices each rank reads at each step: seeded per-epoch permutations, split by rank.

Every epoch draws one permutation of the dataset from (seed, epoch). Step s of the epoch takes the global batch
`perm[s·G : (s+1)·G]` (G = global batch size), and rank r gets the contiguous slice `[r·b, (r+1)·b)` of it
(b = G / world_size). So the global batches do not depend on the number of processes: a 1-process run and a
2-process run train on the same images in the same order, and a run can resume on a different world size.

The data position (epoch, step in epoch) is explicit state. Loaders call `advance()` when they *hand* a batch to
the training loop (not when they prefetch it), so `state_dict()` is exactly where a resumed run must continue.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np


class ShardedSampler:
    """Batch sampler: yields this rank's index slice of each global batch, from the current data position.

    Args:
        num_samples:       dataset length N.
        global_batch_size: G, images per optimizer step over all ranks; must be divisible by world_size.
        rank, world_size:  this process and the number of processes.
        seed:              permutation seed; epoch e uses the permutation drawn from (seed, e).
        drop_last:         True: an epoch has N // G steps and the remainder is not seen that epoch. False: ceil(N / G)
                           steps, the last global batch padded with the first indices of the same permutation
                           (repeated if needed, as torch's DistributedSampler pads), so every rank always gets b
                           indices.

    Iterating yields int64 arrays of shape (b,) for the steps left in the current epoch; it does not move the
    position: call `advance()` per consumed batch (the loaders do).
    """

    def __init__(self, num_samples: int, global_batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 drop_last: bool = True):
        for name, value in (("num_samples", num_samples), ("global_batch_size", global_batch_size),
                            ("rank", rank), ("world_size", world_size), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if global_batch_size < 1 or global_batch_size % world_size:
            raise ValueError(f"global_batch_size must be a positive multiple of world_size={world_size}, "
                             f"got {global_batch_size}")
        if drop_last and global_batch_size > num_samples:
            raise ValueError(f"global_batch_size={global_batch_size} is larger than the dataset (num_samples="
                             f"{num_samples}): with drop_last=True an epoch would have no step")
        self.num_samples = int(num_samples)
        self.global_batch_size = int(global_batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.local_batch_size = self.global_batch_size // self.world_size
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        if self.drop_last:
            self.steps_per_epoch = self.num_samples // self.global_batch_size
        else:
            self.steps_per_epoch = -(-self.num_samples // self.global_batch_size)
        self.epoch = 0
        self.step = 0
        self._cache = (None, None)  # (epoch, its permutation): recomputing 1.3M-long permutations per step is slow

    # ---- pure functions of (epoch, step): safe to call from prefetching workers ----

    def permutation(self, epoch: int) -> np.ndarray:
        """int64 (N,): the epoch's order. Drawn from SeedSequence([seed, epoch]) (PCG64): same on every platform."""
        cached_epoch, perm = self._cache  # one read of one tuple: safe when loader threads share the sampler
        if cached_epoch != epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, int(epoch)])))
            perm = rng.permutation(self.num_samples).astype(np.int64)
            self._cache = (epoch, perm)
        return perm

    def global_batch(self, epoch: int, step: int) -> np.ndarray:
        """int64 (G,): the dataset indices of global batch `step` of `epoch` (all ranks)."""
        if not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"step must be in [0, {self.steps_per_epoch}), got {step}")
        perm = self.permutation(epoch)
        start = step * self.global_batch_size
        batch = perm[start:start + self.global_batch_size]
        if len(batch) < self.global_batch_size:  # drop_last=False: pad from the start of the same permutation
            # (cyclically: np.resize repeats perm when the data set is smaller than one global batch)
            batch = np.concatenate([batch, np.resize(perm, self.global_batch_size - len(batch))])
        return batch

    def local_batch(self, epoch: int, step: int) -> np.ndarray:
        """int64 (b,): this rank's contiguous slice [rank·b, (rank+1)·b) of the global batch."""
        b = self.local_batch_size
        return self.global_batch(epoch, step)[self.rank * b:(self.rank + 1) * b]

    def local_batch_at(self, global_step: int) -> np.ndarray:
        """int64 (b,): `local_batch` at a step counted over all epochs (global_step = epoch·steps_per_epoch + step)."""
        epoch, step = divmod(int(global_step), self.steps_per_epoch)
        return self.local_batch(epoch, step)

    # ---- the data position ----

    @property
    def global_step(self) -> int:
        """The current position counted over all epochs."""
        return self.epoch * self.steps_per_epoch + self.step

    def __iter__(self) -> Iterator[np.ndarray]:
        epoch, start = self.epoch, self.step
        for step in range(start, self.steps_per_epoch):
            yield self.local_batch(epoch, step)

    def __len__(self) -> int:
        """Steps left in the current epoch."""
        return self.steps_per_epoch - self.step

    def advance(self, num_steps: int = 1) -> None:
        """Moves the position past `num_steps` consumed batches (rolling into the next epoch at its end)."""
        if num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {num_steps}")
        self.epoch, self.step = divmod(self.global_step + num_steps, self.steps_per_epoch)

    def set_epoch(self, epoch: int) -> None:
        """Jumps to the start of `epoch`."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch, self.step = int(epoch), 0

    def state_dict(self) -> dict:
        """The data position plus what defines the order; world_size and rank are not part of it (see module doc)."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "num_samples": self.num_samples,
                "global_batch_size": self.global_batch_size, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Restores the position. The order-defining fields must match, or the resumed run would see other data."""
        for key in ("seed", "num_samples", "global_batch_size", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has "
                                 f"{key}={getattr(self, key)!r}: resuming would change the data order")
        epoch, step = int(state["epoch"]), int(state["step"])
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"sampler state position (epoch={epoch}, step={step}) is out of range "
                             f"(steps_per_epoch={self.steps_per_epoch})")
        self.epoch, self.step = epoch, step

    def __repr__(self) -> str:
        return (f"ShardedSampler(num_samples={self.num_samples}, global_batch_size={self.global_batch_size}, "
                f"rank={self.rank}, world_size={self.world_size}, seed={self.seed}, drop_last={self.drop_last}, "
                f"epoch={self.epoch}, step={self.step})")
