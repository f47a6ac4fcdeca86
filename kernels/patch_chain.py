"""The hand-over between consecutive consumers of the residual stream (blocks and the final layer), for
`patch_dit` / `patch_jit` with fuse_residual: block i fuses its last residual add with the NEXT consumer's first
norm + modulate and hands (x, normed x, modulation) over; the next consumer uses it only when called with that very
x and c (see `coredi_kernels.patch` for when the hand-over is skipped: activation checkpointing, saved-tensor hooks).
"""
from typing import Optional

import torch
from torch import Tensor, nn

from .patch_structure import AdaLNLayout


def _saved_tensor_hooks_active() -> bool:
    """True inside torch.utils.checkpoint (or any saved-tensor hooks): recomputation must repeat the same ops."""
    if torch.compiler.is_compiling():
        return False
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


class Consumer:
    """One consumer of the residual stream (a block, or the final layer) as the hand-over sees it.

    The block before it holds this object (as `successor`) and the consumer holds it too (as `me`): the hand-over
    is addressed by object identity, never by a block index. Under per-block `torch.compile` an index would be a
    Python int that differs per block, and dynamo would guard on it and recompile every block's forward until it
    hits `recompile_limit`; an identity comparison between objects is guarded the same way for every block.
    """

    def __init__(self, module: nn.Module, layout: AdaLNLayout, is_final: bool):
        self.module = module
        self.layout = layout  # how its adaLN output splits (the same object for every consumer of one layout)
        self.is_final = is_final  # the final layer: `norm_final`, else `norm1`

    @property
    def norm(self) -> nn.Module:
        return self.module.norm_final if self.is_final else self.module.norm1


class ResidualChain:
    """Carries a block's fused (residual add + next norm) result to the consumer after it: one slot, so at most one
    hand-over is alive at a time."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._slot: Optional[tuple] = None  # (consumer, x, c, grad mode, modulation chunks, normed x)

    def active(self, x: Tensor) -> bool:
        """Whether a consumer called on x takes part in the hand-over. Not under the model's own checkpointing
        (`grad_checkpointing`), saved-tensor hooks (non-reentrant checkpointing), nor reentrant checkpointing, seen
        from x: its forward runs under no_grad on an x that requires grad, its recompute on a detached leaf copy
        (in a plain forward a block's input is computed, not a leaf). The next block gets a detached copy there, so
        a hand-over would be computed for nothing."""
        grad = torch.is_grad_enabled()
        if getattr(self.model, "grad_checkpointing", False) and grad:
            return False
        if x.requires_grad and (x.is_leaf or not grad):
            return False
        return not _saved_tensor_hooks_active()

    def put(self, consumer: Consumer, x: Tensor, c: Tensor, mods: tuple, normed: Tensor) -> None:
        self._slot = (consumer, x, c, torch.is_grad_enabled(), mods, normed)

    def take(self, consumer: Consumer, x: Tensor, c: Tensor) -> Optional[tuple]:
        """(modulation chunks, normed x) if `consumer` is being called on the x and c handed over to it, in the same
        grad mode (a reentrant checkpoint runs blocks under no_grad: their hand-over has no graph), else None."""
        slot, self._slot = self._slot, None
        if slot is None or not self.active(x):
            return None
        target, slot_x, slot_c, grad_mode, mods, normed = slot
        if target is consumer and slot_x is x and slot_c is c and grad_mode == torch.is_grad_enabled():
            return mods, normed
        return None

    def __getstate__(self):  # copies (deepcopy for EMA, pickling) never carry a pending hand-over
        return dict(self.__dict__, _slot=None)


def chain_consumers(blocks: list, layouts: list, final: nn.Module, final_layout: AdaLNLayout,
                    breaks: frozenset = frozenset()) -> tuple[list, list]:
    """(me, successor) per block and for the final layer: the Consumer each one is, and the one its output is
    handed to (None for the final layer and for a block whose successor is in `breaks`: consumer positions that do
    not get their predecessor's output as is, e.g. JiT's in-context class tokens)."""
    consumers = [Consumer(block, layout, False) for block, layout in zip(blocks, layouts)]
    consumers.append(Consumer(final, final_layout, True))
    successors = [None if i + 1 in breaks else consumers[i + 1] for i in range(len(blocks))] + [None]
    return consumers, successors
