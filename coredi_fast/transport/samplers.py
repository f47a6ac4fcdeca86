"""Fixed-step samplers for velocity models on the linear path (t = 0 noise -> t = 1 data).

`model_fn(x, t) -> v` takes x (B, C, ...) and t (B,) and returns the velocity (B, C, ...); build it from a
conditional network with `guidance.make_model_fn`. The initial noise is an input, so a run is reproducible; the
SDE draws its Brownian increments from an optional `torch.Generator`.

Model evaluations (NFE) per call:
    sample_ode euler           steps
    sample_ode heun            2 * steps, or 2 * steps - 1 with heun_last_step_euler=True (JiT: 50 steps -> 99)
    sample_sde                 steps  (steps - 1 Euler-Maruyama steps + SiT's final "Mean" step)

Samplers run under torch.no_grad(). Times are computed in float64 and handed to the model as (B,) tensors in the
state's dtype promoted to at least float32 (a bf16 t would round 0.96 to 0.9609).
"""
from typing import Callable, List, Optional, Tuple, Union

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SampleResult = Union[torch.Tensor, Tuple[torch.Tensor, List[torch.Tensor]]]

ODE_METHODS = ("euler", "heun")


def _check_steps(steps: int, minimum: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < minimum:
        raise ValueError(f"steps must be an int >= {minimum}, got {steps!r}")


def _check_noise(noise: torch.Tensor) -> None:
    if not isinstance(noise, torch.Tensor) or noise.ndim < 1 or not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point tensor of shape (B, ...), got {noise!r:.80}")


def _time_batch(t: float, x: torch.Tensor) -> torch.Tensor:
    """A (B,) tensor filled with t, on x's device, in x's dtype promoted to at least float32."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return torch.full((x.shape[0],), t, device=x.device, dtype=dtype)


def _velocity(model_fn: ModelFn, x: torch.Tensor, t: float) -> torch.Tensor:
    v = model_fn(x, _time_batch(t, x))
    if v.shape != x.shape:
        raise ValueError(f"model_fn must return a velocity shaped like x {tuple(x.shape)}, got {tuple(v.shape)}")
    return v.to(x.dtype)


@torch.no_grad()
def sample_ode(model_fn: ModelFn, noise: torch.Tensor, steps: int = 50, method: str = "euler",
               t_start: float = 0.0, t_end: float = 1.0, heun_last_step_euler: bool = False,
               return_trajectory: bool = False) -> SampleResult:
    """Integrate dx/dt = v(x, t) from t_start to t_end on a uniform grid of `steps` intervals.

    Args:
        model_fn: velocity function (B, C, ...), (B,) -> (B, C, ...).
        noise: (B, C, ...) the state at t_start (standard normal noise when t_start = 0).
        steps: number of grid intervals (>= 1).
        method: "euler" (1st order, `steps` NFE) or "heun" (2nd-order trapezoidal predictor-corrector,
            2 NFE per interval: x' = x + h v(x, t); x <- x + h/2 [v(x, t) + v(x', t + h)]).
        t_start, t_end: integration range, 0 <= t_start < t_end <= 1.
        heun_last_step_euler: take the last interval with Euler, as JiT does, so an x-prediction model is never
            evaluated at t = 1 (where its 1/(1 - t) conversion is only held finite by the clamp). Off by default:
            velocity models are well defined at t = 1. The order of accuracy stays 2 either way.
        return_trajectory: also return the list of states at every grid time (steps + 1 tensors, noise first).

    Returns the final state (B, C, ...), or (final, trajectory) when return_trajectory.
    """
    _check_noise(noise)
    _check_steps(steps, 1)
    if method not in ODE_METHODS:
        raise ValueError(f"method must be one of {ODE_METHODS}, got {method!r}")
    if not 0.0 <= t_start < t_end <= 1.0:
        raise ValueError(f"need 0 <= t_start < t_end <= 1, got t_start={t_start}, t_end={t_end}")

    times = torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64).tolist()
    x = noise
    trajectory = [x] if return_trajectory else None
    for i in range(steps):
        t, t_next = times[i], times[i + 1]
        h = t_next - t
        v = _velocity(model_fn, x, t)
        use_euler = method == "euler" or (heun_last_step_euler and i == steps - 1)
        if use_euler:
            x = x + h * v
        else:
            x_predict = x + h * v
            v_next = _velocity(model_fn, x_predict, t_next)
            x = x + (0.5 * h) * (v + v_next)
        if return_trajectory:
            trajectory.append(x)
    return (x, trajectory) if return_trajectory else x


@torch.no_grad()
def sample_sde(model_fn: ModelFn, noise: torch.Tensor, steps: int = 250, diffusion_norm: float = 1.0,
               last_step_size: float = 0.04, generator: Optional[torch.Generator] = None,
               return_trajectory: bool = False) -> SampleResult:
    """SiT's default SDE sampler: Euler-Maruyama, "sigma" diffusion, last step "Mean".

    The SDE  dx = [v(x, t) + w(t) s(x, t)] dt + sqrt(2 w(t)) dW,  w(t) = diffusion_norm * (1 - t),
    with s the score implied by v (`path.score_from_velocity`), has the same marginals p_t as the ODE
    dx = v dt. Since w(t) s = diffusion_norm * (t v - x) for the linear path, the drift is computed in that form
    (no division by 1 - t).

    Grid: t_k = linspace(0, 1 - last_step_size, steps), so steps - 1 Euler-Maruyama steps of size
    dt = (1 - last_step_size) / (steps - 1). Step k draws one standard normal tensor shaped like x from
    `generator` and sets  x <- x + drift(x, t_k) dt + sqrt(2 w(t_k) dt) n_k.  Then, at t = 1 - last_step_size, one
    noise-free step  x <- x + drift(x, t) * last_step_size  (SiT's "Mean" last step); it is skipped when
    last_step_size = 0. Total: `steps` model evaluations (SiT's `--num-sampling-steps 250`).

    Differences from SiT (willisma/SiT transport/transport.py, integrators.py), none of which change the result:
    SiT calls the model twice per step (once for the drift, once for the score), here once; SiT draws the noise
    with the global RNG, here with `generator`; SiT keeps times in float32, here in float64.

    Args:
        model_fn: velocity function (B, C, ...), (B,) -> (B, C, ...).
        noise: (B, C, ...) the state at t = 0.
        steps: grid points (>= 2), = model evaluations when last_step_size > 0.
        diffusion_norm: scale of w(t) (>= 0; 0 gives a plain Euler ODE solve on the same grid).
        last_step_size: length of the final noise-free step, in [0, 1).
        generator: source of the Brownian increments (on noise's device); None uses the global RNG.
        return_trajectory: also return the states: the noise, then the state after every step.

    Returns the final state (B, C, ...), or (final, trajectory) when return_trajectory.
    """
    _check_noise(noise)
    _check_steps(steps, 2)
    if not diffusion_norm >= 0:
        raise ValueError(f"diffusion_norm must be >= 0, got {diffusion_norm}")
    if not 0.0 <= last_step_size < 1.0:
        raise ValueError(f"last_step_size must be in [0, 1), got {last_step_size}")

    def drift(x: torch.Tensor, t: float) -> torch.Tensor:
        v = _velocity(model_fn, x, t)
        return v + diffusion_norm * (t * v - x)  # v + w(t) * score, with w(t) * score = norm * (t v - x)

    t_last = 1.0 - last_step_size
    times = torch.linspace(0.0, t_last, steps, dtype=torch.float64).tolist()
    dt = t_last / (steps - 1)
    x = noise
    trajectory = [x] if return_trajectory else None
    for t in times[:-1]:
        dw = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        noise_scale = (2.0 * diffusion_norm * (1.0 - t) * dt) ** 0.5
        x = x + drift(x, t) * dt + noise_scale * dw
        if return_trajectory:
            trajectory.append(x)
    if last_step_size > 0:
        x = x + drift(x, t_last) * last_step_size
        if return_trajectory:
            trajectory.append(x)
    return (x, trajectory) if return_trajectory else x
