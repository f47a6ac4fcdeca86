"""Regularizer values and gradients against float64 references written independently here (loops / numpy,
closed-form gradients and central finite differences)."""
import itertools
import math

import numpy as np
import pytest
import torch

from coredi_fast.method.regularizers import covariance_loss, orthogonality_loss, vf_loss


def _finite_difference_grad(fn, x: np.ndarray, step: float = 1e-6) -> np.ndarray:
    """Central differences of a scalar numpy function, entry by entry."""
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[index] += step
        minus[index] -= step
        grad[index] = (fn(plus) - fn(minus)) / (2 * step)
    return grad


# ---------------------------------------------------------------- orthogonality

def _ortho_loops(w: np.ndarray) -> float:
    big_d, d = w.shape
    total = 0.0
    for i in range(d):
        for j in range(d):
            gram = sum(w[k, i] * w[k, j] for k in range(big_d))
            total += (gram - (1.0 if i == j else 0.0)) ** 2
    return total


def test_orthogonality_loss_value_and_gradient():
    w = np.random.default_rng(1).normal(size=(7, 3))
    weight = torch.tensor(w, requires_grad=True)
    loss = orthogonality_loss(weight)
    (grad,) = torch.autograd.grad(loss, weight)
    assert loss.item() == pytest.approx(_ortho_loops(w), rel=1e-12)
    # d/dW ||W^T W - I||^2 = 4 W (W^T W - I)
    expected_grad = 4 * w @ (w.T @ w - np.eye(3))
    np.testing.assert_allclose(grad.numpy(), expected_grad, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grad.numpy(), _finite_difference_grad(_ortho_loops, w), rtol=1e-6, atol=1e-7)


def test_orthogonality_loss_zero_on_orthonormal_columns_and_float32():
    q, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(10, 4)))
    assert orthogonality_loss(torch.tensor(q)).item() == pytest.approx(0.0, abs=1e-24)
    # A scaled orthonormal basis: W^T W = s^2 I -> loss = d (s^2 - 1)^2.
    scaled = torch.tensor(2.0 * q, dtype=torch.float32)
    assert orthogonality_loss(scaled).item() == pytest.approx(4 * (4.0 - 1.0) ** 2, rel=1e-5)


# ---------------------------------------------------------------- covariance (VICReg)

def _cov_loss_loops(tokens: np.ndarray) -> float:
    n, d = tokens.shape
    means = [sum(tokens[k, c] for k in range(n)) / n for c in range(d)]
    total = 0.0
    for i in range(d):
        for j in range(d):
            if i == j:
                continue
            c_ij = sum((tokens[k, i] - means[i]) * (tokens[k, j] - means[j]) for k in range(n)) / (n - 1)
            total += c_ij ** 2
    return total / d


def test_covariance_loss_value_and_gradient_over_all_tokens():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(2, 5, 3)) @ np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.2, 0.0, 1.0]])
    tokens = z.reshape(-1, 3)  # N = B * L = 10 tokens
    z_t = torch.tensor(z, requires_grad=True)
    loss = covariance_loss(z_t)
    (grad,) = torch.autograd.grad(loss, z_t)
    assert loss.item() == pytest.approx(_cov_loss_loops(tokens), rel=1e-12)
    # Closed form: dL/dz = 4 / (d (N - 1)) * Zc C_off  (Zc centered tokens, C_off covariance with zero diagonal).
    n = tokens.shape[0]
    centered = tokens - tokens.mean(axis=0)
    cov_off = np.cov(tokens, rowvar=False)
    np.fill_diagonal(cov_off, 0.0)
    expected = 4.0 / (3 * (n - 1)) * centered @ cov_off
    np.testing.assert_allclose(grad.numpy().reshape(-1, 3), expected, rtol=1e-10, atol=1e-13)
    fd = _finite_difference_grad(_cov_loss_loops, tokens)
    np.testing.assert_allclose(grad.numpy().reshape(-1, 3), fd, rtol=1e-6, atol=1e-8)


def test_covariance_loss_is_zero_for_decorrelated_channels():
    # Columns of a centered orthogonal matrix are uncorrelated: C is diagonal.
    h = np.eye(8) - np.ones((8, 8)) / 8  # centering matrix
    q, _ = np.linalg.qr(h @ np.random.default_rng(5).normal(size=(8, 3)))
    z = torch.tensor(q * np.array([1.0, 2.0, 3.0]))
    assert covariance_loss(z).item() == pytest.approx(0.0, abs=1e-28)


def test_covariance_loss_rejects_single_token():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        covariance_loss(torch.randn(1, 4))


# ---------------------------------------------------------------- VF (VA-VAE)

def _cos(a, b) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _vf_terms_loops(z_up: np.ndarray, f: np.ndarray, m1: float, m2: float):
    """Explicit loops: token cosines, and all ordered same-image pairs (i, j), diagonal included as in VA-VAE."""
    batch, length, _ = z_up.shape
    cos_total = 0.0
    for b in range(batch):
        for i in range(length):
            cos_total += max(0.0, 1.0 - m1 - _cos(z_up[b, i], f[b, i]))
    dist_total = 0.0
    for b in range(batch):
        for i, j in itertools.product(range(length), repeat=2):
            gap = abs(_cos(z_up[b, i], z_up[b, j]) - _cos(f[b, i], f[b, j]))
            dist_total += max(0.0, gap - m2)
    return cos_total / (batch * length), dist_total / (batch * length * length)


def _relu_arguments(z_up, f, m1, m2):
    args = []
    for b in range(z_up.shape[0]):
        for i in range(z_up.shape[1]):
            args.append(1.0 - m1 - _cos(z_up[b, i], f[b, i]))
            for j in range(z_up.shape[1]):
                if i != j:
                    args.append(abs(_cos(z_up[b, i], z_up[b, j]) - _cos(f[b, i], f[b, j])) - m2)
    return np.array(args)


@pytest.mark.parametrize("m1, m2", [(0.5, 0.25), (0.0, 0.0)])
def test_vf_loss_value_and_gradient(m1, m2):
    rng = np.random.default_rng(6)
    z_up = rng.normal(size=(2, 3, 4))
    f = rng.normal(size=(2, 3, 4))
    # Finite differences need every ReLU away from its kink.
    assert np.abs(_relu_arguments(z_up, f, m1, m2)).min() > 1e-3
    z_t = torch.tensor(z_up, requires_grad=True)
    cos_term, dist_term = vf_loss(z_t, torch.tensor(f), margin_cos=m1, margin_dist=m2)
    expected_cos, expected_dist = _vf_terms_loops(z_up, f, m1, m2)
    assert cos_term.item() == pytest.approx(expected_cos, rel=1e-12, abs=1e-15)
    assert dist_term.item() == pytest.approx(expected_dist, rel=1e-12, abs=1e-15)
    (grad,) = torch.autograd.grad(cos_term + dist_term, z_t)
    fd = _finite_difference_grad(lambda x: sum(_vf_terms_loops(x, f, m1, m2)), z_up)
    np.testing.assert_allclose(grad.numpy(), fd, rtol=1e-5, atol=1e-8)


def test_vf_loss_closed_forms():
    f = torch.randn(2, 5, 6, dtype=torch.float64)
    # Aligned: every cosine is 1 and the similarity matrices agree -> both terms vanish.
    cos_term, dist_term = vf_loss(3.0 * f, f)
    assert cos_term.item() == pytest.approx(0.0, abs=1e-12)
    assert dist_term.item() == pytest.approx(0.0, abs=1e-12)
    # Flipped: cos = -1 per token -> 1 - 0.5 + 1 = 1.5; pairwise similarities are sign invariant -> 0.
    cos_term, dist_term = vf_loss(-f, f, margin_cos=0.5, margin_dist=0.25)
    assert cos_term.item() == pytest.approx(1.5, rel=1e-12)
    assert dist_term.item() == pytest.approx(0.0, abs=1e-12)


def test_vf_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="z_up and features"):
        vf_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 5))
