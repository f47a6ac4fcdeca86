"""FeatureStatistics against numpy float64 references: moments, PCA (numpy SVD), streaming, merge, persistence."""
import numpy as np
import pytest
import torch

from coredi_fast.method.statistics import FeatureStatistics


def _correlated_data(rng, n=600, dim=10, offset=0.0):
    mixing = rng.normal(size=(dim, dim)) * np.linspace(3.0, 0.3, dim)  # distinct eigenvalues
    return rng.normal(size=(n, dim)) @ mixing.T + rng.normal(size=dim) * 5 + offset


def _numpy_pca(x):
    mean = x.mean(axis=0)
    std = x.std(axis=0, ddof=1)
    standardized = (x - mean) / std
    centered = standardized - standardized.mean(axis=0)
    _, singular, vt = np.linalg.svd(centered, full_matrices=False)
    return mean, std, singular ** 2 / (x.shape[0] - 1), vt


def test_moments_and_pca_match_numpy_svd():
    x = _correlated_data(np.random.default_rng(0))
    stats = FeatureStatistics(10).update(torch.tensor(x, dtype=torch.float64))
    mean, std, eigenvalues, vt = _numpy_pca(x)
    np.testing.assert_allclose(stats.mean.numpy(), mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.std.numpy(), std, rtol=1e-12)
    np.testing.assert_allclose(stats.covariance.numpy(), np.cov(x, rowvar=False), rtol=1e-11, atol=1e-11)
    pca = stats.pca()
    np.testing.assert_allclose(pca.eigenvalues.numpy(), eigenvalues, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(pca.explained_variance_ratio.numpy(), eigenvalues / eigenvalues.sum(), rtol=1e-10)
    components = pca.components.numpy()
    # Sign-invariant: each component equals numpy's up to sign (eigenvalues are distinct).
    overlaps = np.abs(np.sum(components * vt, axis=1))
    np.testing.assert_allclose(overlaps, 1.0, atol=1e-9)
    # Subspaces of the top-k components agree (projector matrices).
    for k in (1, 3, 8):
        np.testing.assert_allclose(components[:k].T @ components[:k], vt[:k].T @ vt[:k], atol=1e-9)
    # Deterministic sign: the entry of largest magnitude is positive.
    rows = np.arange(10)
    assert (components[rows, np.abs(components).argmax(axis=1)] > 0).all()
    # Standardized covariance has unit diagonal and trace = D.
    assert np.allclose(np.diag(stats.standardized_covariance.numpy()), 1.0, atol=1e-12)
    assert float(pca.eigenvalues.sum()) == pytest.approx(10.0, rel=1e-12)


def test_streaming_uneven_batches_equals_one_shot():
    rng = np.random.default_rng(1)
    x = _correlated_data(rng, n=333)
    one_shot = FeatureStatistics(10).update(torch.tensor(x))
    streamed = FeatureStatistics(10)
    start = 0
    for size in (1, 7, 50, 0, 100, 175):
        chunk = x[start:start + size]
        start += size
        if size == 50:  # a (B, L, D) batch
            streamed.update(torch.tensor(chunk).reshape(5, 10, 10))
        else:
            streamed.update(torch.tensor(chunk))
    assert start == 333 and streamed.count == 333
    np.testing.assert_allclose(streamed.mean.numpy(), one_shot.mean.numpy(), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(streamed.m2.numpy(), one_shot.m2.numpy(), rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(streamed.pca().eigenvalues.numpy(), one_shot.pca().eigenvalues.numpy(), rtol=1e-11)


def test_float32_batches_are_accumulated_in_float64_and_keep_precision_with_large_offset():
    # Features far from the origin relative to their spread: raw sums of squares would lose ~all digits.
    rng = np.random.default_rng(2)
    x = _correlated_data(rng, n=400, dim=4, offset=1e6)
    stats = FeatureStatistics(4)
    for chunk in np.array_split(x, 9):
        stats.update(torch.tensor(chunk))
    np.testing.assert_allclose(stats.covariance.numpy(), np.cov(x, rowvar=False), rtol=1e-8, atol=1e-8)
    assert stats.mean.dtype == torch.float64
    # float32 input: mean/cov equal numpy's float64 stats of the float32-rounded values.
    x32 = x.astype(np.float32) - np.float32(1e6)
    stats32 = FeatureStatistics(4).update(torch.tensor(x32))
    np.testing.assert_allclose(stats32.covariance.numpy(), np.cov(x32.astype(np.float64), rowvar=False),
                               rtol=1e-10, atol=1e-10)


def test_merge_of_two_halves_equals_whole():
    x = _correlated_data(np.random.default_rng(3), n=250)
    whole = FeatureStatistics(10).update(torch.tensor(x))
    first = FeatureStatistics(10).update(torch.tensor(x[:90]))
    second = FeatureStatistics(10).update(torch.tensor(x[90:]))
    merged = first.merge(second)
    assert merged.count == 250
    np.testing.assert_allclose(merged.mean.numpy(), whole.mean.numpy(), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(merged.covariance.numpy(), whole.covariance.numpy(), rtol=1e-12, atol=1e-12)
    # Merging an empty accumulator changes nothing.
    before = merged.m2.clone()
    merged.merge(FeatureStatistics(10))
    assert torch.equal(merged.m2, before)
    with pytest.raises(ValueError, match="feature_dim"):
        merged.merge(FeatureStatistics(3))


def test_constant_channel_gets_unit_std():
    x = np.random.default_rng(4).normal(size=(50, 3))
    x[:, 1] = 7.0
    stats = FeatureStatistics(3).update(torch.tensor(x))
    std = stats.std.numpy()
    assert std[1] == 1.0
    np.testing.assert_allclose(std[[0, 2]], x[:, [0, 2]].std(axis=0, ddof=1), rtol=1e-12)


def test_save_load_round_trip(tmp_path):
    x = _correlated_data(np.random.default_rng(5), n=120)
    stats = FeatureStatistics(10).update(torch.tensor(x))
    path = tmp_path / "sub" / "stats.pt"
    stats.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["stats.pt"]  # no temporary file left behind
    loaded = FeatureStatistics.load(path)
    assert loaded.count == 120 and loaded.feature_dim == 10
    assert torch.equal(loaded.mean, stats.mean) and torch.equal(loaded.m2, stats.m2)
    assert torch.equal(loaded.pca().components, stats.pca().components)
    # weights_only loading works on the raw file too.
    raw = torch.load(path, weights_only=True)
    assert raw["count"] == 120


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        FeatureStatistics.load(missing)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage, not a torch file")
    with pytest.raises(ValueError, match="corrupt.pt"):
        FeatureStatistics.load(corrupt)
    truncated = tmp_path / "truncated.pt"
    FeatureStatistics(3).update(torch.randn(10, 3)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:40])
    with pytest.raises(ValueError, match="truncated.pt"):
        FeatureStatistics.load(truncated)
    wrong_keys = tmp_path / "wrong.pt"
    torch.save({"mean": torch.zeros(3)}, wrong_keys)
    with pytest.raises(ValueError, match=r"wrong\.pt.*missing keys.*'m2'"):
        FeatureStatistics.load(wrong_keys)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="feature_dim"):
        FeatureStatistics(0)
    stats = FeatureStatistics(4)
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        stats.update(torch.randn(3, 5))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        stats.update(torch.randn(1, 4)).pca()
    with pytest.raises(ValueError, match="NaN"):
        FeatureStatistics(2).update(torch.tensor([[0.0, float("nan")]]))
