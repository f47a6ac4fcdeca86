"""The trainer's EMA interface over the EMA that `AdamWEMA` keeps inside its optimizer state.

`coredi_fast.training.ema.EMA` keeps its own fp32 copy and is updated after each step; with `AdamWEMA` the
optimizer step has already updated the average, so the trainer only needs to *read* and *restore* it:

    ema = ema_view(model, optimizer)      # optimizer: AdamWEMA, or DeepSpeed's ZeRO-1/2 optimizer around one
    ema.set_decay(decay)                  # before optimizer.step(): the decay that step applies
    ema.update(model)                     # nothing to do (kept so the training loop reads the same)
    ema.state_dict()                      # {name: fp32 tensor} keyed like model.state_dict() (public SiT names)
    ema.load_state_dict(state)            # restore (resume)
    ema.copy_to(model)

Frozen tensors (parameters with requires_grad=False such as the fixed sin-cos pos_embed, and buffers) are copied
once at construction, as `EMA` does, so `state_dict()` loads into the model with strict=True.

DeepSpeed ZeRO-1/2 (`ShardedEMA`): the optimizer sees only this rank's slice of a flat fp32 buffer per parameter
group, so each rank holds the EMA of its slice (1/world of it, the same saving as the sharded Adam moments).
`state_dict()` rebuilds every full parameter from the slices with one all-reduce per parameter (each element is
held by exactly one rank, the others add zeros), so it is collective: every rank must call it.
`load_state_dict()` needs no communication: each rank copies its own slice out of the full tensors.
The slices are found through the `_hp_mapping` (lp/hp fragment addresses) DeepSpeed attaches to each parameter.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .adamw_ema import AdamWEMA


def ema_view(model: nn.Module, optimizer) -> "OptimizerEMA":
    """The view that fits `optimizer`: `OptimizerEMA` for an AdamWEMA, `ShardedEMA` for a DeepSpeed ZeRO-1/2
    optimizer wrapping one."""
    if isinstance(optimizer, AdamWEMA):
        return OptimizerEMA(model, optimizer)
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, AdamWEMA) and hasattr(optimizer, "single_partition_of_fp32_groups"):
        return ShardedEMA(model, optimizer)
    raise TypeError(f"ema_view needs an AdamWEMA (or DeepSpeed's ZeRO-1/2 optimizer around one), got "
                    f"{type(optimizer).__name__}")


class OptimizerEMA:
    """EMA of `model`'s trainable parameters as held by `optimizer` (an AdamWEMA over those same tensors)."""

    def __init__(self, model: nn.Module, optimizer: AdamWEMA):
        self.optimizer = optimizer
        flags = {id(p): g["ema"] for g in optimizer.param_groups for p in g["params"]}
        self._params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        missing = [name for name, p in self._params.items() if not flags.get(id(p), False)]
        if missing:
            raise ValueError(f"the optimizer keeps no EMA for {len(missing)} trainable parameter(s) of the model, "
                             f"e.g. {missing[:3]} (not in the optimizer, or in a group with ema=False)")
        self._order = list(model.state_dict().keys())
        self._constants = {name: t.detach().float().clone() if t.is_floating_point() else t.detach().clone()
                           for name, t in model.state_dict().items() if name not in self._params}

    def set_decay(self, decay: float) -> None:
        """The decay the next optimizer step uses (e.g. a warm-up ramp), for every group that keeps an EMA."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        for group in self.optimizer.param_groups:
            if group["ema"]:
                group["ema_decay"] = float(decay)

    def update(self, model: Optional[nn.Module] = None, decay: Optional[float] = None) -> None:
        """Nothing to do: the optimizer step updated the average (set its decay beforehand with `set_decay`)."""

    def _averages(self) -> Dict[str, torch.Tensor]:
        return {name: self.optimizer.ema_of(p) for name, p in self._params.items()}

    def state_dict(self) -> Dict[str, torch.Tensor]:
        averages = self._averages()
        return {name: averages[name] if name in averages else self._constants[name] for name in self._order}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        missing, unexpected = set(self._order) - set(state), set(state) - set(self._order)
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the model: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        with torch.no_grad():
            self._load_averages({name: state[name] for name in self._params})
            for name, t in self._constants.items():
                t.copy_(state[name])

    def _load_averages(self, averages: Dict[str, torch.Tensor]) -> None:
        for name, ema in self._averages().items():
            ema.copy_(averages[name])

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into `model` (cast to its dtypes)."""
        target = model.state_dict()
        model.load_state_dict({k: v.to(target[k].dtype) for k, v in self.state_dict().items()})


class ShardedEMA(OptimizerEMA):
    """The EMA under DeepSpeed ZeRO-1/2: each rank holds the EMA of its partition (see the module docstring)."""

    def __init__(self, model: nn.Module, zero_optimizer):
        self.zero = zero_optimizer
        inner: AdamWEMA = zero_optimizer.optimizer
        self._params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        for name, p in self._params.items():
            if not hasattr(p, "_dp_group"):
                raise ValueError(f"{name!r} is not managed by the DeepSpeed ZeRO optimizer (no fragment mapping)")
            mapping = p._hp_mapping
            if mapping is not None and not inner.param_groups[mapping.param_group_index]["ema"]:
                raise ValueError(f"{name!r} is in a parameter group with ema=False")
        self.optimizer = inner
        self._order = list(model.state_dict().keys())
        self._constants = {name: t.detach().float().clone() if t.is_floating_point() else t.detach().clone()
                           for name, t in model.state_dict().items() if name not in self._params}

    def _slices(self, p: torch.Tensor):
        """(this rank's EMA slice, the matching slice of the flattened full parameter's range) or None."""
        mapping = p._hp_mapping
        if mapping is None:  # no element of p lives in this rank's partition
            return None
        flat = self.zero.single_partition_of_fp32_groups[mapping.param_group_index]
        ema = self.optimizer.ema_of(flat)
        hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
        return ema.narrow(0, hp.start, hp.numel), (lp.start, lp.numel)

    @torch.no_grad()
    def _averages(self) -> Dict[str, torch.Tensor]:
        out = {}
        for name, p in self._params.items():
            full = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
            found = self._slices(p)
            if found is not None:
                ema, (start, numel) = found
                full.narrow(0, start, numel).copy_(ema)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(full, group=p._dp_group)
            out[name] = full.view(p.shape)
        return out

    def _load_averages(self, averages: Dict[str, torch.Tensor]) -> None:
        for name, p in self._params.items():
            found = self._slices(p)
            if found is not None:
                ema, (start, numel) = found
                ema.copy_(averages[name].reshape(-1).narrow(0, start, numel))
