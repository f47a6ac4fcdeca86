"""One interface over the three training back-ends: a single process, DDP, and DeepSpeed ZeRO.

    engine = build_engine(module, param_groups, cfg, dist_info, ds_config)
    out = engine(x, features, y, noise)      # forward through the wrapper (DDP / DeepSpeed hooks fire)
    engine.backward(out.loss)
    grad_norm = engine.step()                # clipping, optimizer step, zero_grad

What DDP / DeepSpeed wrap is a `TrainModule`: the denoiser plus the objective (which owns the feature projector),
so W, the BatchNorm and the denoiser are trained by one optimizer with one set of hooks.

Precision: "bf16" means bf16 autocast over fp32 weights (the fp32 weights *are* the master weights); DeepSpeed does
the same with its `torch_autocast` section (see ds_zero2.json). On CPU, bf16 autocast is not used (it is slower
there than fp32 and the tests compare against fp32 runs).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn

from .distributed import DistInfo


class TrainModule(nn.Module):
    """The trained modules: `denoiser` (SiT/DiT) and `objective` (with `objective.projector`)."""

    def __init__(self, denoiser: nn.Module, objective: nn.Module):
        super().__init__()
        self.denoiser = denoiser
        self.objective = objective

    def forward(self, x, features, y, noise):
        return self.objective(self.denoiser, x, features, y, noise=noise)


class Engine:
    """Base: one process, plain optimizer. Subclasses change how the module is wrapped and stepped."""

    kind = "single"

    def __init__(self, module: TrainModule, optimizer: torch.optim.Optimizer, dist_info: DistInfo, precision: str,
                 grad_clip: float):
        self.module = module
        self.optimizer = optimizer
        self.dist = dist_info
        self.grad_clip = grad_clip
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" and dist_info.device.type == "cuda" else None

    # the wrapped callable (DDP module / DeepSpeed engine); the plain module here
    @property
    def wrapped(self):
        return self.module

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.dist.device.type, dtype=self.autocast_dtype)

    def __call__(self, *args):
        with self.autocast():
            return self.wrapped(*args)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> Optional[torch.Tensor]:
        """Clip (if asked), step, zero the gradients. Returns the pre-clip gradient norm (a tensor) or None."""
        norm = None
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def skip_step(self) -> None:
        """Drop this step's gradients (non-finite loss): no parameter or optimizer-state change."""
        self.optimizer.zero_grad(set_to_none=True)

    def set_lr_factor(self, factor: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor

    def optimizer_state(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


class DDPEngine(Engine):
    kind = "ddp"

    def __init__(self, module, optimizer, dist_info, precision, grad_clip):
        super().__init__(module, optimizer, dist_info, precision, grad_clip)
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
        # No per-step buffer broadcast: the projector's BatchNorm keeps its running statistics identical on every
        # rank itself (global-batch statistics). Newer torch renames the switch (the old name warns).
        import inspect

        sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                else "broadcast_buffers")
        self.ddp = DistributedDataParallel(module, device_ids=device_ids, **{sync: False})

    @property
    def wrapped(self):
        return self.ddp


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO (stage 1/2) with a client optimizer (torch AdamW with our parameter groups).

    The DeepSpeed engine clips with the json's "gradient_clipping", which start-up makes equal to optim.grad_clip
    (ds_config.py); bf16 comes from its "torch_autocast".
    The optimizer state is partitioned: each rank saves and loads its own part.
    """

    kind = "deepspeed"

    # Fields of DeepSpeed's ZeRO optimizer state that are Python objects, rebuilt from the live optimizer on load
    # (everything else is tensors and numbers, so checkpoints stay loadable with weights_only=True).
    _OBJECT_FIELDS = ("loss_scaler", "zero_stage", "param_slice_mappings", "ds_version")

    def __init__(self, module, optimizer, dist_info, precision, grad_clip, ds_config: dict):
        super().__init__(module, optimizer, dist_info, precision, grad_clip)
        import deepspeed

        from ..optim import AdamWEMA

        if isinstance(optimizer, AdamWEMA):  # ZeRO accepts only optimizer types it lists, unless told otherwise
            ds_config = dict(ds_config, zero_allow_untested_optimizer=True)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer,
                                                                 config=ds_config)
        self.autocast_dtype = None  # DeepSpeed's own torch_autocast section decides

    @property
    def wrapped(self):
        return self.engine

    def backward(self, loss):
        self.engine.backward(loss)

    def step(self):
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else torch.as_tensor(norm)

    def skip_step(self):
        self.engine.zero_grad()

    def set_lr_factor(self, factor):
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor

    def optimizer_state(self):
        state = self.optimizer.state_dict()
        return {k: v for k, v in state.items() if k not in self._OBJECT_FIELDS}

    def load_optimizer_state(self, state):
        full = self.optimizer.state_dict()
        full.update(state)
        # DeepSpeed indexes the list by data-parallel rank; a same-size ("rigid") restore reads only this rank's.
        self.optimizer.load_state_dict([full] * self.dist.world_size, load_optimizer_states=True,
                                       load_from_fp32_weights=True)


def build_optimizer(param_groups: list, lr: float, betas, weight_decay: float, eps: float,
                    device: torch.device, fused_ema: bool = False, ema_decay: float = 0.9999) -> torch.optim.Optimizer:
    """AdamW as in ReDi/SiT (fused on CUDA). With `fused_ema`: `coredi_fast.optim.AdamWEMA`, the same AdamW that
    also updates an fp32 EMA (decay `ema_decay`) in the same pass; its EMA is saved by the trainer, not in the
    optimizer state. Each group remembers its base lr for warm-up scaling."""
    for group in param_groups:
        group.setdefault("lr", lr)
        group["base_lr"] = group["lr"]
    if fused_ema:
        from ..optim import AdamWEMA

        return AdamWEMA(param_groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps,
                        ema_decay=ema_decay, ema_in_state_dict=False)
    kwargs = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps, **kwargs)


def build_engine(module: TrainModule, optimizer: torch.optim.Optimizer, dist_info: DistInfo, precision: str,
                 grad_clip: float, ds_config: Optional[dict] = None) -> Engine:
    if dist_info.launcher == "deepspeed":
        return DeepSpeedEngine(module, optimizer, dist_info, precision, grad_clip, ds_config)
    if dist_info.launcher == "ddp":
        return DDPEngine(module, optimizer, dist_info, precision, grad_clip)
    return Engine(module, optimizer, dist_info, precision, grad_clip)
