"""AdamW that also keeps the fp32 EMA of every parameter, updated in the same pass over memory.

    opt = AdamWEMA(model.parameters(), lr=1e-4, weight_decay=0.0, ema_decay=0.9999)
    loss.backward(); opt.step(); opt.zero_grad()
    ema_weights = opt.ema_state_dict(model)          # keyed like model.state_dict(): load it into a copy of the model

After each step, for every parameter w (fp32 math; AdamW with decoupled weight decay and bias correction):

    w    <- w (1 - lr wd) - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    ema  <- ema + (1 - ema_decay) (w - ema)           ema starts at w's value before the first step

Backends (`backend=`, the one used is `opt.backend`):
    native   `torch.ops.coredi_native.adamw_ema_step_` (`csrc/`, CPU and CUDA kernels): each weight is read once
             for both updates (36 bytes per fp32 parameter instead of 40), one launch per ~30 tensors.
    torch    torch's fused AdamW kernel (`torch._fused_adamw_`, the kernel of `AdamW(fused=True)`; a foreach
             version where it has no kernel) followed by one `torch._foreach_lerp_` for the EMA.
    auto     native when the library is loaded with a kernel for the parameters' device, else torch.
Both give the same numbers up to float rounding (the tests hold them to torch.optim.AdamW and a float64 EMA).

Parameter groups take AdamW's keys plus `ema_decay` and `ema` (False: no EMA for that group, e.g. a projector
whose average is not wanted). bf16/fp16 parameters: the moments are kept in the parameter's dtype (as torch's
AdamW does) unless `master_weights=True`, which keeps an fp32 master copy and fp32 moments; the EMA then follows
the master copy, otherwise the parameter as stored.

State per parameter: `step` (float32 CPU scalar, as torch.optim.AdamW), `exp_avg`, `exp_avg_sq`, `ema` (fp32),
`master` (fp32, master_weights only). The state dict loads torch.optim.AdamW state dicts and vice versa (the
moments and steps mean the same); with `ema_in_state_dict=False` the EMA is left out of `state_dict()` (a trainer
that saves it separately) and `load_state_dict` keeps the EMA the optimizer already holds.

DeepSpeed ZeRO-1/2 accept it as a client optimizer: they swap each group's parameters for this rank's flat fp32
partition, so the EMA is kept per partition (sharded); `coredi_fast.optim.ema_views` gathers it.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Dict, Mapping, Optional, Union

import torch
import torch.nn as nn

from . import native

BACKENDS = ("auto", "native", "torch")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class AdamWEMA(torch.optim.Optimizer):
    """AdamW + fp32 EMA in one optimizer step (see the module docstring).

    Args:
        params: tensors or parameter-group dicts, as for `torch.optim.AdamW`.
        lr, betas, eps, weight_decay: AdamW's hyperparameters (per group as well).
        ema_decay: EMA decay in [0, 1] (per group as well; SiT/ReDi: 0.9999).
        master_weights: keep fp32 master weights and moments for bf16/fp16 parameters.
        backend: "auto" | "native" | "torch".
        ema_in_state_dict: include the EMA in `state_dict()` (default True).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 ema_decay: float = 0.9999, master_weights: bool = False, backend: str = "auto",
                 ema_in_state_dict: bool = True):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not isinstance(master_weights, bool):
            raise TypeError(f"master_weights must be a bool, got {master_weights!r}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, ema_decay=ema_decay, ema=True)
        _check_hyperparameters(defaults, "AdamWEMA")
        self.master_weights = master_weights
        self.ema_in_state_dict = ema_in_state_dict
        super().__init__(params, defaults)
        self.backend = self._resolve_backend(backend)

    # ------------------------------------------------------------------------------------------ set-up

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyperparameters(group, f"param group {len(self.param_groups) - 1}")
        for p in group["params"]:
            if p.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"AdamWEMA: parameters must be float32, bfloat16 or float16, got {p.dtype} "
                                f"(param group {len(self.param_groups) - 1})")

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # groups loaded from a torch.optim.AdamW state dict lack our keys
            group.setdefault("ema_decay", self.defaults["ema_decay"])
            group.setdefault("ema", True)

    def _resolve_backend(self, requested: str) -> str:
        devices = {p.device.type for g in self.param_groups for p in g["params"]}
        missing = [d for d in sorted(devices) if not native.is_available(d)]
        if requested == "torch" or (requested == "auto" and missing):
            return "torch"
        if missing:
            raise RuntimeError(f"AdamWEMA(backend='native'): no native kernel for {', '.join(missing)} tensors. "
                               + native.load().describe())
        return "native"

    # ------------------------------------------------------------------------------------------ state

    def _state_dtype(self, p: torch.Tensor) -> torch.dtype:
        """dtype of the moments: fp32 with master weights, else the parameter's (as torch's AdamW)."""
        return torch.float32 if self._has_master(p) else p.dtype

    def _has_master(self, p: torch.Tensor) -> bool:
        return self.master_weights and p.dtype != torch.float32

    def _weights(self, p: torch.Tensor) -> torch.Tensor:
        """The fp32 weights the EMA follows: the master copy, else the parameter (as stored)."""
        state = self.state[p]
        if self._has_master(p):
            if "master" not in state:
                state["master"] = p.detach().float().clone()
            return state["master"]
        return p.detach()

    def ema_of(self, p: torch.Tensor) -> torch.Tensor:
        """The fp32 EMA tensor of parameter p (created from p's current weights if it has none yet)."""
        state = self.state[p]
        if "ema" not in state:
            state["ema"] = self._weights(p).to(torch.float32, copy=True)
        return state["ema"]

    def _init_moments(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if "step" not in state:
            self._weights(p)  # the master copy exists before the first update
            dtype = self._state_dtype(p)
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
        return state

    def ema_parameters(self) -> list:
        """The EMA tensors of every parameter with an EMA, in parameter-group order (fp32, same shapes)."""
        return [self.ema_of(p) for g in self.param_groups if g["ema"] for p in g["params"]]

    def ema_state_dict(self, named: Union[nn.Module, Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """The EMA weights keyed by name, e.g. `model.state_dict()`'s names: pass the model (or a name -> tensor
        mapping such as `dict(model.named_parameters())`).

        Parameters this optimizer averages give their fp32 EMA; tensors it does not optimize (frozen parameters,
        buffers such as a fixed pos_embed) give an fp32 copy of their current value. A parameter optimized in a
        group with ema=False is an error (its average does not exist)."""
        items = named.state_dict(keep_vars=True).items() if isinstance(named, nn.Module) else named.items()
        flags = {id(p): g["ema"] for g in self.param_groups for p in g["params"]}
        out = {}
        for name, t in items:
            if id(t) in flags:
                if not flags[id(t)]:
                    raise ValueError(f"ema_state_dict: {name!r} is optimized in a group with ema=False (no EMA)")
                out[name] = self.ema_of(t)
            else:
                out[name] = t.detach().float().clone() if t.is_floating_point() else t.detach().clone()
        return out

    def state_dict(self) -> dict:
        sd = super().state_dict()
        if not self.ema_in_state_dict:
            sd["state"] = {k: {n: v for n, v in s.items() if n != "ema"} for k, s in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of AdamWEMA or torch.optim.AdamW. fp32 tensors stay fp32 (torch would cast them to
        the parameter's dtype); an EMA missing from `state_dict` keeps the value this optimizer holds."""
        params = [p for g in self.param_groups for p in g["params"]]
        held_emas = {p: self.state[p]["ema"] for p in params if "ema" in self.state.get(p, {})}
        ema_flags = [g["ema"] for g in self.param_groups]  # structure, set by the code that built the groups
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        for group, flag in zip(self.param_groups, ema_flags):
            group["ema"] = flag
        for index, p in enumerate(params):
            state, source = self.state[p], saved.get(index, saved.get(str(index), {}))
            for key in ("exp_avg", "exp_avg_sq"):
                if key in source:
                    state[key] = source[key].to(device=p.device, dtype=self._state_dtype(p), copy=True)
            for key in ("ema", "master"):
                if key in source:
                    state[key] = source[key].to(device=p.device, dtype=torch.float32, copy=True)
            if "step" in state:
                state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)
            if "ema" not in state and p in held_emas:
                state["ema"] = held_emas[p]

    # ------------------------------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict) -> None:
        with_grad, ema_only = [], []
        for p in group["params"]:
            if p.grad is None:
                if group["ema"]:
                    ema_only.append(p)
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdamWEMA does not support sparse gradients")
            with_grad.append(p)
        if group["ema"]:
            for p in with_grad:
                self.ema_of(p)  # created from the weights before this update
        for p in with_grad:
            self._init_moments(p)
        steps = [self.state[p]["step"] for p in with_grad]
        if steps:
            torch._foreach_add_(steps, 1.0)
        step_numbers = [int(s) for s in torch.stack(steps).tolist()] if steps else []

        # One call per (device, param dtype, contiguity): what a multi-tensor kernel needs.
        buckets = defaultdict(list)
        for p, s in zip(with_grad, step_numbers):
            buckets[(p.device, p.dtype, p.is_contiguous() and p.grad.is_contiguous())].append((p, s))
        for (device, _, contiguous), items in buckets.items():
            params = [p for p, _ in items]
            numbers = [s for _, s in items]
            if self.backend == "native" and contiguous:
                self._native_update(group, params, numbers, device)
            else:
                self._torch_update(group, params, numbers, device)

        if ema_only:  # no gradient this step: no AdamW update, but the average still moves towards the weights
            emas = [self.ema_of(p) for p in ema_only]
            torch._foreach_lerp_(emas, [self._weights(p).float() for p in ema_only], 1.0 - group["ema_decay"])

    def _native_update(self, group: dict, params: list, steps: list, device: torch.device) -> None:
        if not native.is_available(device.type):
            raise RuntimeError(f"AdamWEMA: the native backend has no kernel for {device.type} tensors; "
                               + native.load().describe())
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        torch.ops.coredi_native.adamw_ema_step_(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["ema"] for s in states] if group["ema"] else [],
            [s["master"] for s in states] if self._has_master(params[0]) else [],
            steps, float(group["lr"]), float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]),
            float(group["ema_decay"]))

    def _torch_update(self, group: dict, params: list, steps: list, device: torch.device) -> None:
        states = [self.state[p] for p in params]
        master = self._has_master(params[0])
        weights = [s["master"] for s in states] if master else params
        grads = [p.grad.float() for p in params] if master else [p.grad for p in params]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        beta1, beta2 = group["betas"]
        lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
        if _has_fused_adamw(device):
            # The fused kernel reads each tensor's step from a tensor on its device: one per distinct step.
            on_device = {s: torch.full((), float(s), dtype=torch.float32, device=device) for s in set(steps)}
            torch._fused_adamw_(weights, grads, exp_avgs, exp_avg_sqs, [], [on_device[s] for s in steps], lr=lr,
                                beta1=beta1, beta2=beta2, weight_decay=wd, eps=eps, amsgrad=False, maximize=False)
        else:
            _foreach_adamw(weights, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, wd)
        if master:
            torch._foreach_copy_(params, weights)
        if group["ema"]:
            targets = weights if weights[0].dtype == torch.float32 else [w.float() for w in weights]
            torch._foreach_lerp_([s["ema"] for s in states], targets, 1.0 - group["ema_decay"])


def _has_fused_adamw(device: torch.device) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("aten::_fused_adamw_", key)


def _foreach_adamw(weights, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay) -> None:
    """AdamW with torch._foreach ops (devices without torch's fused kernel); the same math as the kernels."""
    torch._foreach_mul_(weights, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    step_sizes = [-lr / (1.0 - beta1 ** s) for s in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [math.sqrt(1.0 - beta2 ** s) for s in steps])
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(weights, exp_avgs, denom, step_sizes)


def _check_hyperparameters(group: dict, where: str) -> None:
    """ValueError/TypeError naming the field for anything AdamW + EMA cannot use."""
    for key in ("lr", "eps", "weight_decay", "ema_decay"):
        value = group[key]
        if isinstance(value, torch.Tensor):
            raise TypeError(f"{where}: {key} must be a Python number, not a tensor")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where}: {key} must be a finite number, got {value!r}")
    if group["lr"] < 0:
        raise ValueError(f"{where}: lr must be >= 0, got {group['lr']}")
    if group["eps"] < 0:
        raise ValueError(f"{where}: eps must be >= 0, got {group['eps']}")
    if group["weight_decay"] < 0:
        raise ValueError(f"{where}: weight_decay must be >= 0, got {group['weight_decay']}")
    if not 0.0 <= group["ema_decay"] <= 1.0:
        raise ValueError(f"{where}: ema_decay must be in [0, 1], got {group['ema_decay']}")
    betas = group["betas"]
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"{where}: betas must be two numbers in [0, 1), got {betas!r}")
    if not isinstance(group["ema"], bool):
        raise TypeError(f"{where}: ema must be True or False, got {group['ema']!r}")


def resolve_fused_ema(mode: str, device: torch.device) -> bool:
    """optim.fused_ema: "on" | "off" | "auto" (on when the native op is loaded with a kernel for `device`)."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"optim.fused_ema must be one of ['auto', 'on', 'off'], got {mode!r}")
    return mode == "on" or (mode == "auto" and native.is_available(torch.device(device).type))

