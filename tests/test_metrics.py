"""FID, Inception Score and precision/recall against closed forms, brute force and independent float64 computations."""
import math

import numpy as np
import pytest
import torch

from coredi_fast.evaluation import metrics
from coredi_fast.evaluation.metrics import (feature_statistics, frechet_distance, frechet_distance_eigh,
                                            inception_score, knn_radii, precision_recall)


def _random_covariance(rng, d, scale=1.0):
    a = rng.standard_normal((d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def _fid_by_general_eig(mu1, s1, mu2, s2):
    """Independent float64 reference: Tr((Σ1Σ2)^½) = Σ sqrt(λ) over the eigenvalues of the (non-symmetric) product,
    which are real and non-negative for PSD Σ1, Σ2 (numpy's general `eig`, no scipy, no symmetrization)."""
    lam = np.linalg.eigvals(s1 @ s2)
    assert np.abs(lam.imag).max() < 1e-8 * np.abs(lam).max()
    tr_sqrt = np.sqrt(np.clip(lam.real, 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


# ---------------------------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [1, 3, 17])
def test_frechet_matches_independent_eigenvalue_computation(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_covariance(rng, d), _random_covariance(rng, d, scale=3.0)
    expected = _fid_by_general_eig(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert frechet_distance_eigh(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    # A distance: symmetric in its arguments.
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_frechet_identical_distributions_is_zero():
    rng = np.random.default_rng(0)
    mu, s = rng.standard_normal(12), _random_covariance(rng, 12)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-9
    assert abs(frechet_distance_eigh(mu, s, mu, s)) < 1e-9


def test_frechet_isotropic_equal_variance_is_squared_mean_distance():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(9), rng.standard_normal(9)
    s = 2.5 * np.eye(9)
    expected = float(np.sum((mu1 - mu2) ** 2))
    assert frechet_distance(mu1, s, mu2, s) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance_eigh(mu1, s, mu2, s) == pytest.approx(expected, rel=1e-12)


def test_frechet_diagonal_covariances_closed_form():
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.1, 4.0, 7), rng.uniform(0.1, 4.0, 7)
    mu1, mu2 = rng.standard_normal(7), rng.standard_normal(7)
    expected = float(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2))
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance_eigh(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_finite_sample_fid_of_one_gaussian_shrinks_like_one_over_n():
    # Two samples of the same N(0, Σ): the FID of their estimates is pure estimation bias, which is O(d²/n).
    d = 6
    cov = _random_covariance(np.random.default_rng(3), d)
    chol = np.linalg.cholesky(cov)

    def mean_fid(n):
        values = []
        for seed in range(4):
            rng = np.random.default_rng(100 + seed)
            a, b = rng.standard_normal((n, d)) @ chol.T, rng.standard_normal((n, d)) @ chol.T
            values.append(frechet_distance(*feature_statistics(a), *feature_statistics(b)))
        return np.mean(values)

    fids = [mean_fid(n) for n in (100, 1000, 10000)]
    assert fids[0] > fids[1] > fids[2] > 0
    # 1/n scaling: 100x more samples, ~100x smaller; allow a factor 3 for the seeds' spread.
    assert fids[2] < fids[0] / 30


def test_frechet_agrees_on_rank_deficient_sample_covariances():
    # Fewer samples than dimensions: both covariances are singular, as in tiny evaluations.
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((10, 24)), rng.standard_normal((12, 24)) + 0.3
    m1, s1 = feature_statistics(a)
    m2, s2 = feature_statistics(b)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(frechet_distance_eigh(m1, s1, m2, s2), rel=1e-6)


def test_frechet_singular_fallback_adds_eps_to_both_covariances(monkeypatch):
    rng = np.random.default_rng(5)
    a, b = rng.uniform(0.5, 2.0, 4), rng.uniform(0.5, 2.0, 4)
    calls = []
    real_sqrtm = metrics._sqrtm

    def first_call_not_finite(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(metrics, "_sqrtm", first_call_not_finite)
    eps = 1e-2  # large enough to see in the value
    with pytest.warns(UserWarning, match="singular"):
        value = frechet_distance(np.zeros(4), np.diag(a), np.zeros(4), np.diag(b), eps=eps)
    assert len(calls) == 2
    expected = float(np.sum(a) + np.sum(b) - 2 * np.sum(np.sqrt((a + eps) * (b + eps))))
    assert value == pytest.approx(expected, rel=1e-12)


def test_frechet_imaginary_square_root(monkeypatch):
    s = np.eye(3)
    monkeypatch.setattr(metrics, "_sqrtm", lambda m: m + 1j * np.eye(3) * 1e-2)
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(3), s, np.zeros(3), s)
    monkeypatch.setattr(metrics, "_sqrtm", lambda m: m + 1j * np.eye(3) * 1e-6)  # rounding noise: dropped
    assert frechet_distance(np.zeros(3), s, np.zeros(3), s) == pytest.approx(0.0, abs=1e-12)


def test_feature_statistics_match_numpy_cov():
    x = np.random.default_rng(6).standard_normal((50, 5)).astype(np.float32)
    mu, sigma = feature_statistics(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).sum(0) / 50, rtol=1e-12)
    centred = x.astype(np.float64) - mu
    np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-12)


def test_frechet_and_statistics_errors_name_the_argument():
    with pytest.raises(ValueError, match="mu1 and mu2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="sigma1 has non-finite"):
        frechet_distance(np.zeros(2), np.full((2, 2), np.nan), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="features"):
        feature_statistics(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="features"):
        feature_statistics(np.zeros(5))


# ---------------------------------------------------------------------------------------------------------------
# Inception Score
# ---------------------------------------------------------------------------------------------------------------

def test_is_of_confident_uniform_predictions_is_the_number_of_classes():
    k, splits = 7, 5
    labels = np.tile(np.arange(k), 4 * splits)  # every contiguous split holds every class 4 times
    probs = np.eye(k)[labels]
    mean, std = inception_score(probs, splits=splits)
    assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    # As logits: softmax(60·one-hot) is one-hot up to e^-60.
    mean, _ = inception_score(60.0 * probs, splits=splits)
    assert mean == pytest.approx(k, rel=1e-12)


def test_is_of_identical_predictions_is_one():
    p = np.random.default_rng(0).dirichlet(np.ones(10))
    mean, std = inception_score(np.tile(p, (40, 1)), splits=4)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_is_of_smoothed_predictions_closed_form():
    # p(y|x) = (1-e)·onehot + e/K with classes uniform: p(y) uniform and
    # KL = c·log(K·c) + (K-1)·(e/K)·log(e), c = 1 - e + e/K.
    k, e = 5, 0.3
    probs = (1 - e) * np.eye(k)[np.tile(np.arange(k), 6)] + e / k
    c = 1 - e + e / k
    expected = math.exp(c * math.log(k * c) + (k - 1) * (e / k) * math.log(e))
    assert inception_score(probs, splits=3)[0] == pytest.approx(expected, rel=1e-12)


def test_is_with_unbalanced_marginal_is_exp_entropy():
    # Confident predictions, class 0 for a quarter of the samples: E KL = H(1/4, 3/4), IS = exp(H).
    probs = np.eye(2)[np.array([0, 1, 1, 1] * 5)]
    q = 0.25
    expected = math.exp(-q * math.log(q) - (1 - q) * math.log(1 - q))
    assert inception_score(probs, splits=5)[0] == pytest.approx(expected, rel=1e-12)


def test_is_splits_match_a_direct_loop():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((23, 6)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)

    def direct(chunks):
        scores = []
        for part in chunks:
            marginal = part.mean(0)
            kl = np.mean([np.sum(row * (np.log(row) - np.log(marginal))) for row in part])
            scores.append(math.exp(kl))
        return np.mean(scores), np.std(scores)

    # ADM chunks of split_size rows (last one shorter) and equal splits.
    np.testing.assert_allclose(inception_score(logits, split_size=10),
                               direct([probs[:10], probs[10:20], probs[20:]]), rtol=1e-12)
    np.testing.assert_allclose(inception_score(probs, splits=4), direct(np.array_split(probs, 4)), rtol=1e-12)


def test_is_errors():
    with pytest.raises(ValueError, match="logits_or_probs"):
        inception_score(np.zeros(5))
    with pytest.raises(ValueError, match="splits"):
        inception_score(np.eye(3), splits=4)
    with pytest.raises(ValueError, match="split_size"):
        inception_score(np.eye(3), split_size=0)
    with pytest.raises(ValueError, match="non-negative"):
        inception_score(-np.eye(3), from_logits=False)


# ---------------------------------------------------------------------------------------------------------------
# Precision and recall
# ---------------------------------------------------------------------------------------------------------------

def _brute_force_radii(x, k):
    radii = []
    for i in range(len(x)):
        distances = sorted(np.linalg.norm(x[j] - x[i]) for j in range(len(x)) if j != i)
        radii.append(distances[k - 1])
    return np.array(radii)


def _brute_force_pr(real, fake, k):
    real_r, fake_r = _brute_force_radii(real, k), _brute_force_radii(fake, k)
    precision = np.mean([any(np.linalg.norm(f - real[j]) <= real_r[j] for j in range(len(real))) for f in fake])
    recall = np.mean([any(np.linalg.norm(r - fake[j]) <= fake_r[j] for j in range(len(fake))) for r in real])
    return precision, recall


@pytest.mark.parametrize("k", [1, 3])
def test_knn_radii_match_brute_force(k):
    x = np.random.default_rng(k).standard_normal((41, 5)) + 10.0  # off-centre: the Gram formula must not suffer
    for batch_size in (7, 10000):  # blocks that split rows and columns unevenly, and one block
        np.testing.assert_allclose(knn_radii(x, k, batch_size=batch_size, dtype=torch.float64),
                                   _brute_force_radii(x, k), rtol=1e-10)
        np.testing.assert_allclose(knn_radii(x, k, batch_size=batch_size), _brute_force_radii(x, k), rtol=1e-4)


def test_precision_recall_match_brute_force():
    rng = np.random.default_rng(7)
    real = rng.standard_normal((60, 4))
    fake = 0.8 * rng.standard_normal((45, 4)) + 1.2
    expected = _brute_force_pr(real, fake, 3)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # a case that can tell the two directions apart
    assert precision_recall(real, fake, k=3, batch_size=16) == pytest.approx(expected, abs=1e-12)
    assert precision_recall(real, fake, k=3, dtype=torch.float64) == pytest.approx(expected, abs=1e-12)


def test_identical_sets_have_full_precision_and_recall():
    x = np.random.default_rng(8).standard_normal((50, 8))
    assert precision_recall(x, x.copy()) == (1.0, 1.0)


def test_far_away_fake_set_has_zero_precision_and_recall():
    rng = np.random.default_rng(9)
    real = rng.standard_normal((50, 8))
    assert precision_recall(real, rng.standard_normal((40, 8)) + 100.0) == (0.0, 0.0)


def test_fake_set_covering_half_of_a_segment():
    """Real points uniform on a segment, fake points uniform on its first half (the segment embedded along a random
    direction of R^8, so only distances along it matter).

    Tolerance, derived for points of a Poisson process on a line, with k = 3: the k-NN ball of the point left of a gap
    g reaches across it unless its 3 nearest neighbours all lie to its left within g; then its radius is the sum
    G_l of 3 spacings, and likewise G_r on the right. The uncovered part of a gap is (g - G_l - G_r)^+, and with unit
    spacings E[(E_0 - G_l - G_r)^+] = E[exp(-(G_l + G_r))] = 2^-6 (E_0 ~ Exp(1), G ~ Gamma(3, 1)). So a point in a
    covered stretch misses with probability 1/64: precision ≈ 63/64, and recall ≈ (63/64)/2 plus the few real
    points within one fake radius past the half-way mark (checked with 20000 points: 0.9844 and 0.4920). With
    600-1200 points the spread is below 0.01; 0.025 is a safe margin that still rejects a radius one neighbour short
    (k = 2 gives 1 - 2^-4 = 0.9375).
    """
    rng = np.random.default_rng(10)
    direction = rng.standard_normal(8)
    direction /= np.linalg.norm(direction)
    offset = rng.standard_normal(8)
    real = offset + np.sort(rng.uniform(0, 1, 1200))[:, None] * direction
    fake = offset + rng.uniform(0, 0.5, 600)[:, None] * direction
    precision, recall = precision_recall(real, fake, k=3)
    assert precision == pytest.approx(63 / 64, abs=0.025)
    assert recall == pytest.approx(0.5 * 63 / 64, abs=0.025)


def test_precision_recall_errors_name_the_argument():
    with pytest.raises(ValueError, match="real_features"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)
    with pytest.raises(ValueError, match="different widths"):
        precision_recall(np.zeros((10, 2)), np.zeros((10, 3)))
    with pytest.raises(ValueError, match="fake_features"):
        precision_recall(np.zeros((10, 2)), np.zeros(10))
    with pytest.raises(ValueError, match="dtype"):
        knn_radii(np.zeros((10, 2)), dtype=torch.float16)
