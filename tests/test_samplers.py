"""ODE / SDE samplers on a Gaussian data distribution whose exact velocity field and flow are known.

Data x1 ~ N(mu, diag sigma^2), noise x0 ~ N(0, I), x_t = t x1 + (1 - t) x0, per dimension:

    x_t ~ N(t mu, s_t^2),  s_t^2 = t^2 sigma^2 + (1 - t)^2.

The velocity field is v(x, t) = E[x1 - x0 | x_t = x]. (x1 - x0, x_t) is jointly Gaussian with
E[x1 - x0] = mu and Cov(x1 - x0, x_t) = t sigma^2 - (1 - t), so by Gaussian conditioning

    v(x, t) = mu + (t sigma^2 - (1 - t)) / s_t^2 * (x - t mu).

Check: the flow x_t = t mu + s_t z (z = x0, the noise it started from) has d/dt x_t = mu + (d s_t/dt) z with
d s_t/dt = (t sigma^2 - (1 - t)) / s_t, and (x_t - t mu) / s_t = z, so it solves dx/dt = v(x, t). Hence the exact
ODE maps the noise x0 to mu + sigma x0 at t = 1. The score is -(x - t mu) / s_t^2.
"""
import math

import numpy as np
import pytest
import torch

from coredi_fast.transport import sample_ode, sample_sde

MU = torch.tensor([1.0, -2.0], dtype=torch.float64)
SIGMA = torch.tensor([0.5, 2.0], dtype=torch.float64)


def gaussian_variance(t):
    """s_t^2 per dimension; t is (B,) -> (B, 2)."""
    t = t.view(-1, 1)
    return t**2 * SIGMA**2 + (1 - t) ** 2


def gaussian_velocity(x, t):
    """Exact velocity of the Gaussian data: x (B, 2), t (B,) -> (B, 2)."""
    tb = t.view(-1, 1).to(x.dtype)
    return MU + (tb * SIGMA**2 - (1 - tb)) / gaussian_variance(tb) * (x - tb * MU)


def gaussian_score(x, t):
    tb = t.view(-1, 1).to(x.dtype)
    return -(x - tb * MU) / gaussian_variance(tb)


class CountingModel:
    """Wraps a velocity function and records the times it is evaluated at."""

    def __init__(self, fn=gaussian_velocity):
        self.fn, self.times = fn, []

    def __call__(self, x, t):
        assert t.shape == (x.shape[0],)
        self.times.append(t[0].item())
        return self.fn(x, t)


#################################################################################
#                                    ODE                                        #
#################################################################################

def _observed_order(method, heun_last_step_euler=False):
    noise = torch.randn(64, 2, dtype=torch.float64)
    exact = MU + SIGMA * noise
    steps = [8, 16, 32, 64]
    errors = [(sample_ode(gaussian_velocity, noise, n, method, heun_last_step_euler=heun_last_step_euler)
               - exact).abs().max().item() for n in steps]
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    return -slope, errors


def test_euler_is_first_order():
    order, errors = _observed_order("euler")
    assert 0.85 < order < 1.15, errors
    assert errors[-1] < 0.2


@pytest.mark.parametrize("last_euler", [False, True])
def test_heun_is_second_order(last_euler):
    order, errors = _observed_order("heun", last_euler)
    assert 1.8 < order < 2.25, errors
    assert errors[-1] < 1e-3


def test_ode_trajectory_follows_exact_flow_from_a_midpoint():
    """Start at the exact state at t = 0.3 and integrate to 1; every grid state lies on x_t = t mu + s_t z."""
    z = torch.randn(32, 2, dtype=torch.float64)
    t_start, steps = 0.3, 80
    x_start = t_start * MU + gaussian_variance(torch.tensor([t_start])).sqrt() * z
    final, trajectory = sample_ode(gaussian_velocity, x_start, steps, "heun", t_start=t_start, return_trajectory=True)
    assert len(trajectory) == steps + 1 and trajectory[0] is x_start
    grid = torch.linspace(t_start, 1.0, steps + 1, dtype=torch.float64)
    for t, x in zip(grid, trajectory):
        torch.testing.assert_close(x, t * MU + gaussian_variance(t.view(1)).sqrt() * z, rtol=0, atol=1e-3)
    torch.testing.assert_close(final, MU + SIGMA * z, rtol=0, atol=1e-3)


@pytest.mark.parametrize("method, last_euler, nfe, steps", [
    ("euler", False, 10, 10), ("heun", False, 20, 10), ("heun", True, 19, 10)])
def test_ode_evaluation_count_and_times(method, last_euler, nfe, steps):
    model = CountingModel()
    sample_ode(model, torch.randn(4, 2, dtype=torch.float64), steps, method, heun_last_step_euler=last_euler)
    assert len(model.times) == nfe
    grid = np.linspace(0, 1, steps + 1)
    expected = grid[:-1] if method == "euler" else \
        [t for i in range(steps) for t in ((grid[i],) if last_euler and i == steps - 1 else (grid[i], grid[i + 1]))]
    np.testing.assert_allclose(model.times, expected, atol=1e-12)


#################################################################################
#                                    SDE                                        #
#################################################################################

def _hand_written_em(x, t, dt, norm, n):
    """One Euler-Maruyama step of dx = [v + w s] dt + sqrt(2 w) dW, w = norm (1 - t), with the closed-form score."""
    tt = torch.full((x.shape[0],), t, dtype=x.dtype)
    w = norm * (1 - t)
    return x + (gaussian_velocity(x, tt) + w * gaussian_score(x, tt)) * dt + math.sqrt(2 * w * dt) * n


@pytest.mark.parametrize("norm", [1.0, 0.6])
def test_sde_matches_hand_written_steps(norm):
    """steps=3: EM steps at t = 0 and 0.48 (dt = 0.48), then the noise-free 'Mean' step at 0.96 of size 0.04."""
    noise = torch.randn(6, 2, dtype=torch.float64)
    out = sample_sde(gaussian_velocity, noise, steps=3, diffusion_norm=norm, last_step_size=0.04,
                     generator=torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    x = _hand_written_em(noise, 0.0, 0.48, norm, torch.randn(noise.shape, generator=g, dtype=noise.dtype))
    x = _hand_written_em(x, 0.48, 0.48, norm, torch.randn(noise.shape, generator=g, dtype=noise.dtype))
    t_last = torch.full((6,), 0.96, dtype=torch.float64)
    x = x + (gaussian_velocity(x, t_last) + norm * 0.04 * gaussian_score(x, t_last)) * 0.04
    torch.testing.assert_close(out, x)


def test_sde_without_last_step_is_pure_em():
    noise = torch.randn(5, 2, dtype=torch.float64)
    out, trajectory = sample_sde(gaussian_velocity, noise, steps=2, last_step_size=0.0,
                                 generator=torch.Generator().manual_seed(3), return_trajectory=True)
    n = torch.randn(noise.shape, generator=torch.Generator().manual_seed(3), dtype=noise.dtype)
    torch.testing.assert_close(out, _hand_written_em(noise, 0.0, 1.0, 1.0, n))
    assert len(trajectory) == 2 and trajectory[-1] is out


def test_sde_evaluation_count_and_times():
    model = CountingModel()
    sample_sde(model, torch.randn(4, 2, dtype=torch.float64), steps=250)
    assert len(model.times) == 250  # SiT's --num-sampling-steps 250
    np.testing.assert_allclose(model.times, np.linspace(0, 0.96, 250), atol=1e-12)


def _discrete_chain_moments(steps, norm, last_step_size):
    """Exact mean/variance of the discretized sampler's output (a linear-Gaussian recursion), float64 numpy.

    drift(x, t) = v + norm (1 - t) s = A_t x + c_t, so x' = (1 + A dt) x + c dt + sqrt(2 w dt) n.
    """
    mu, sig = MU.numpy(), SIGMA.numpy()
    t_last = 1 - last_step_size
    mean, var = np.zeros(2), np.ones(2)

    def affine(t):
        s2 = t**2 * sig**2 + (1 - t) ** 2
        g = (t * sig**2 - (1 - t)) / s2  # v = mu + g (x - t mu); (1 - t) s = -(1 - t)(x - t mu) / s2
        a = g - norm * (1 - t) / s2
        return a, mu - a * t * mu

    dt = t_last / (steps - 1)
    for t in np.linspace(0, t_last, steps)[:-1]:
        a, c = affine(t)
        mean, var = (1 + a * dt) * mean + c * dt, (1 + a * dt) ** 2 * var + 2 * norm * (1 - t) * dt
    a, c = affine(t_last)
    return (1 + a * last_step_size) * mean + c * last_step_size, (1 + a * last_step_size) ** 2 * var


def test_sde_reaches_the_data_distribution():
    """20k x 2 samples, SiT's defaults (250 steps, norm 1, Mean last step 0.04).

    The sample mean / variance must match the exact moments of the discretized chain within 5 standard errors,
    and those moments are within 3% of the data's (the discretization bias of 250 steps).
    """
    n, steps = 20_000, 250
    noise = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out = sample_sde(gaussian_velocity, noise, steps=steps, generator=torch.Generator().manual_seed(6)).numpy()
    chain_mean, chain_var = _discrete_chain_moments(steps, 1.0, 0.04)
    np.testing.assert_allclose(chain_mean, MU.numpy(), rtol=1e-9)  # the mean recursion is exact
    np.testing.assert_allclose(chain_var, SIGMA.numpy() ** 2, rtol=0.03)

    mean_se = np.sqrt(chain_var / n)
    var_se = chain_var * np.sqrt(2 / (n - 1))  # Gaussian: Var(sample variance) = 2 sigma^4 / (n - 1)
    assert np.all(np.abs(out.mean(0) - chain_mean) < 5 * mean_se), (out.mean(0), chain_mean)
    assert np.all(np.abs(out.var(0, ddof=1) - chain_var) < 5 * var_se), (out.var(0, ddof=1), chain_var)
    # and directly against the data distribution, allowing the discretization bias
    assert np.all(np.abs(out.var(0, ddof=1) / SIGMA.numpy() ** 2 - 1) < 5 * np.sqrt(2 / n) + 0.03)
    # the two dimensions stay uncorrelated
    assert abs(np.corrcoef(out.T)[0, 1]) < 5 / np.sqrt(n)


def test_sde_is_reproducible_and_generator_driven():
    noise = torch.randn(3, 2, dtype=torch.float64)
    a = sample_sde(gaussian_velocity, noise, steps=20, generator=torch.Generator().manual_seed(1))
    b = sample_sde(gaussian_velocity, noise, steps=20, generator=torch.Generator().manual_seed(1))
    c = sample_sde(gaussian_velocity, noise, steps=20, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3


def test_zero_diffusion_sde_equals_euler_on_its_grid():
    noise = torch.randn(8, 2, dtype=torch.float64)
    sde = sample_sde(gaussian_velocity, noise, steps=11, diffusion_norm=0.0, last_step_size=0.0)
    torch.testing.assert_close(sde, sample_ode(gaussian_velocity, noise, steps=10, method="euler"))


def test_low_precision_state_keeps_float32_times():
    seen = []

    def model_fn(x, t):
        seen.append(t.dtype)
        return torch.zeros_like(x)

    out = sample_ode(model_fn, torch.randn(2, 3, dtype=torch.bfloat16), steps=2)
    assert out.dtype == torch.bfloat16 and seen == [torch.float32, torch.float32]


#################################################################################
#                                Bad arguments                                  #
#################################################################################

@pytest.mark.parametrize("call, name", [
    (lambda x: sample_ode(gaussian_velocity, x, steps=0), "steps"),
    (lambda x: sample_ode(gaussian_velocity, x, steps=4, method="rk4"), "method"),
    (lambda x: sample_ode(gaussian_velocity, x, t_start=0.5, t_end=0.5), "t_start"),
    (lambda x: sample_sde(gaussian_velocity, x, steps=1), "steps"),
    (lambda x: sample_sde(gaussian_velocity, x, last_step_size=1.0), "last_step_size"),
    (lambda x: sample_sde(gaussian_velocity, x, diffusion_norm=-1.0), "diffusion_norm"),
    (lambda x: sample_ode(lambda y, t: y[:, :1], x, steps=2), "model_fn"),
])
def test_bad_arguments(call, name):
    with pytest.raises(ValueError, match=name):
        call(torch.zeros(2, 2, dtype=torch.float64))
