"""Collapse monitors against closed forms and scipy."""
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from coredi_fast.method.monitors import channel_std, effective_rank, spectral_effective_rank, subspace_angles


def _samples_with_exact_covariance(rng, eigenvalues, n=200):
    """Tokens whose sample covariance (1/(n-1)) is exactly Q diag(eigenvalues) Q^T for a random rotation Q."""
    d = len(eigenvalues)
    x = rng.normal(size=(n, d))
    x -= x.mean(axis=0)
    whitening = np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False)))
    white = x @ whitening.T  # sample covariance exactly I
    rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return white @ np.diag(np.sqrt(eigenvalues)) @ rotation.T + rng.normal(size=d)


@pytest.mark.parametrize("eigenvalues", [[1.0, 1.0, 1.0, 1.0], [5.0, 2.0, 1.0, 0.5, 0.1], [3.0, 1e-30, 1e-30]])
def test_effective_rank_closed_form(eigenvalues):
    rng = np.random.default_rng(0)
    tokens = _samples_with_exact_covariance(rng, np.array(eigenvalues))
    p = np.array(eigenvalues) / sum(eigenvalues)
    expected = math.exp(-sum(q * math.log(q) for q in p if q > 0))
    z = torch.tensor(tokens.reshape(4, 50, -1), dtype=torch.float64)  # (B, L, d): tokens over B and L
    assert effective_rank(z) == pytest.approx(expected, rel=1e-9)


def test_spectral_effective_rank_limits():
    assert spectral_effective_rank(torch.tensor([2.0, 2.0, 2.0])) == pytest.approx(3.0, rel=1e-12)
    assert spectral_effective_rank(torch.tensor([4.0, 0.0, 0.0])) == pytest.approx(1.0, rel=1e-12)
    assert spectral_effective_rank(torch.zeros(3)) == 0.0


def test_subspace_angles_of_known_rotation():
    # span(e1, e2) vs span(e1, cos t e2 + sin t e3): principal angles 0 and t.
    theta = math.radians(37.0)
    w = np.zeros((6, 2))
    w[0, 0] = w[1, 1] = 1.0
    p = np.zeros((6, 2))
    p[0, 0] = 1.0
    p[1, 1], p[2, 1] = math.cos(theta), math.sin(theta)
    # Non-orthonormal spanning sets of the same spaces give the same angles.
    mix = np.array([[2.0, 1.0], [0.5, 3.0]])
    angles = subspace_angles(torch.tensor(w @ mix), torch.tensor(p @ mix.T))
    np.testing.assert_allclose(angles.numpy(), [0.0, 37.0], atol=1e-6)


def test_subspace_angles_match_scipy_and_identity_is_zero():
    rng = np.random.default_rng(1)
    w, p = rng.normal(size=(20, 4)), rng.normal(size=(20, 3))
    angles = subspace_angles(torch.tensor(w, dtype=torch.float32), torch.tensor(p))
    expected = np.sort(np.degrees(scipy.linalg.subspace_angles(w.astype(np.float32).astype(np.float64), p)))
    np.testing.assert_allclose(angles.numpy(), expected, atol=1e-6)
    same = subspace_angles(torch.tensor(w), torch.tensor(w @ rng.normal(size=(4, 4))))
    np.testing.assert_allclose(same.numpy(), 0.0, atol=1e-5)
    # A collapsed W has no angles.
    assert torch.isnan(subspace_angles(torch.zeros(20, 2), torch.tensor(p))).all()
    with pytest.raises(ValueError, match="same D"):
        subspace_angles(torch.zeros(5, 2), torch.zeros(6, 2))


def test_channel_std_matches_numpy():
    x = np.random.default_rng(2).normal(size=(3, 7, 4)) * np.array([1.0, 2.0, 0.5, 3.0])
    std = channel_std(torch.tensor(x, dtype=torch.float32))
    assert std.dtype == torch.float64
    np.testing.assert_allclose(std.numpy(), x.astype(np.float32).reshape(-1, 4).std(axis=0, ddof=1), rtol=1e-6)
