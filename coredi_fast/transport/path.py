"""The linear interpolant (SiT's "Linear" path) and the conversions between what a model can predict.

Convention (SiT): t in [0, 1], t = 1 is data and t = 0 is noise.

    x_t = t * x1 + (1 - t) * x0,   x1 = data, x0 ~ N(0, I)
    u   = dx_t/dt = x1 - x0        (the velocity target)

Everything here is elementwise; `t` is a (B,) tensor (or a Python number) that broadcasts over every non-batch
dimension of the (B, C, ...) tensors it is combined with.
"""
from numbers import Real
from typing import Union

import torch

TimeLike = Union[torch.Tensor, float]


def expand_t_like_x(t: TimeLike, x: torch.Tensor) -> TimeLike:
    """Reshape a (B,) time tensor to (B, 1, ..., 1) so it broadcasts over x (B, ...); numbers pass through."""
    if isinstance(t, Real) or (isinstance(t, torch.Tensor) and t.ndim == 0):
        return t
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a tensor of shape (B,) or a number, got {type(t).__name__}")
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must have shape (B,) = ({x.shape[0]},) to match x of shape {tuple(x.shape)}, "
                         f"got {tuple(t.shape)}")
    return t.view(t.shape[0], *([1] * (x.ndim - 1)))


def interpolate(x1: torch.Tensor, x0: torch.Tensor, t: TimeLike) -> torch.Tensor:
    """x_t = t * x1 + (1 - t) * x0.  x1 (data), x0 (noise): (B, C, ...); t: (B,). Returns (B, C, ...)."""
    if x1.shape != x0.shape:
        raise ValueError(f"x1 and x0 must have the same shape, got {tuple(x1.shape)} and {tuple(x0.shape)}")
    t = expand_t_like_x(t, x1)
    return t * x1 + (1 - t) * x0


def velocity_target(x1: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """u = x1 - x0, the time derivative of the linear path.  (B, C, ...) -> (B, C, ...)."""
    if x1.shape != x0.shape:
        raise ValueError(f"x1 and x0 must have the same shape, got {tuple(x1.shape)} and {tuple(x0.shape)}")
    return x1 - x0


def x1_from_velocity(v: torch.Tensor, x_t: torch.Tensor, t: TimeLike) -> torch.Tensor:
    """Predicted data x1 = x_t + (1 - t) * v (from x_t = x1 - (1 - t) * v).  (B, C, ...) -> (B, C, ...)."""
    return x_t + (1 - expand_t_like_x(t, x_t)) * v


def x0_from_velocity(v: torch.Tensor, x_t: torch.Tensor, t: TimeLike) -> torch.Tensor:
    """Predicted noise x0 = x_t - t * v (from x_t = x0 + t * v).  (B, C, ...) -> (B, C, ...)."""
    return x_t - expand_t_like_x(t, x_t) * v


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
    """Score grad_x log p_t(x) = (t * v - x) / (1 - t) for the linear path.  (B, C, ...) -> (B, C, ...).

    From SiT's general formula with alpha = t, sigma = 1 - t: E[x0 | x_t] = x_t - t * v and
    score = -E[x0 | x_t] / sigma_t. Singular at t = 1 (pure data); the SDE sampler never evaluates it there and
    uses (1 - t) * score = t * v - x directly.
    """
    t = expand_t_like_x(t, x)
    return (t * v - x) / (1 - t)


def velocity_from_x_prediction(x_pred: torch.Tensor, x_t: torch.Tensor, t: TimeLike,
                               clamp: float = 0.05) -> torch.Tensor:
    """Velocity of an x-prediction model (JiT): v = (x_pred - x_t) / max(1 - t, clamp).  (B, C, ...) -> (B, C, ...).

    `clamp` (JiT's t_eps = 0.05) bounds the division near t = 1, where 1 - t -> 0. JiT builds its training target
    with the same formula from the clean data, (x - x_t) / max(1 - t, clamp): x - eps for t <= 1 - clamp, and
    (1 - t) / clamp * (x - eps) above (`JointDiffusionObjective` does the same for prediction="x").
    """
    if not clamp > 0:
        raise ValueError(f"clamp must be > 0, got {clamp}")
    t = expand_t_like_x(t, x_t)
    one_minus_t = 1 - t
    if isinstance(one_minus_t, torch.Tensor):
        one_minus_t = one_minus_t.clamp_min(clamp)
    else:
        one_minus_t = max(one_minus_t, clamp)
    return (x_pred - x_t) / one_minus_t
