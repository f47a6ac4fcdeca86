"""Transport: the linear interpolant, training-time sampling, the joint loss, samplers and guidance.

SiT conventions throughout: t in [0, 1], t = 1 is data, t = 0 is noise, x_t = t x1 + (1 - t) x0, the model
predicts the velocity u = x1 - x0 (x-prediction models are converted with `velocity_from_x_prediction`).

    path.py        interpolate, velocity_target, score / x1 / x0 / x-prediction conversions
    timesteps.py   sample_time: uniform or logit-normal t
    losses.py      joint_velocity_loss: per-modality means, lambda_z, feature dropout mask
    samplers.py    sample_ode (Euler, Heun), sample_sde (SiT's Euler-Maruyama + "Mean" last step)
    guidance.py    classifier-free guidance (image-only or all channels, interval), Representation Guidance
"""
from .guidance import (GUIDANCE_TARGETS, INTERVAL_RULES, PREDICTIONS, cfg_model_fn, make_model_fn,
                       representation_guidance_model_fn)
from .losses import joint_velocity_loss
from .path import (expand_t_like_x, interpolate, score_from_velocity, velocity_from_x_prediction, velocity_target,
                   x0_from_velocity, x1_from_velocity)
from .samplers import ODE_METHODS, sample_ode, sample_sde
from .timesteps import TIME_DISTRIBUTIONS, sample_time

__all__ = [
    "GUIDANCE_TARGETS", "INTERVAL_RULES", "PREDICTIONS", "cfg_model_fn", "make_model_fn",
    "representation_guidance_model_fn",
    "joint_velocity_loss",
    "expand_t_like_x", "interpolate", "score_from_velocity", "velocity_from_x_prediction", "velocity_target",
    "x0_from_velocity", "x1_from_velocity",
    "ODE_METHODS", "sample_ode", "sample_sde",
    "TIME_DISTRIBUTIONS", "sample_time",
]
