"""FeatureProjector (CoReDi learned / ReDi PCA / none) and the token-grid alignment, against numpy float64
references written here."""
import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from coredi_fast.method import (FeatureProjector, FeatureStatistics, ProjectorConfig, check_feature_grid,
                                grid_to_tokens, tokens_to_grid, validate_channels)

D, d = 12, 3


def _raw_features(seed, shape=(4, 9)):
    """Raw encoder-like tokens: correlated, offset, channels of different scales."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(D, D)) * np.linspace(2.0, 0.2, D)
    x = rng.normal(size=shape + (D,)) @ mixing.T
    return x * np.linspace(0.5, 3.0, D) + np.linspace(-4.0, 4.0, D)


@pytest.fixture(scope="module")
def statistics():
    return FeatureStatistics(D).update(torch.tensor(_raw_features(100, (20, 16))))


def _standardize(x, stats):
    return (x - stats.mean.numpy()) / stats.std.numpy()


# ---------------------------------------------------------------- config validation

@pytest.mark.parametrize("kwargs, field", [
    (dict(dim=13), "dim"), (dict(dim=0), "dim"), (dict(feature_dim=0), "feature_dim"),
    (dict(mode="fixed"), "mode"), (dict(regularizer="l2"), "regularizer"), (dict(init="xavier"), "init"),
    (dict(norm="layernorm"), "norm"), (dict(reg_weight=-1.0), "reg_weight"), (dict(norm_momentum=0.0), "norm_momentum"),
    (dict(norm_eps=0.0), "norm_eps"), (dict(feature_scale=0.0), "feature_scale"), (dict(lr_scale=-0.1), "lr_scale"),
    (dict(feature_dropout=1.0), "feature_dropout"), (dict(stop_gradient=1), "stop_gradient"),
    (dict(vf_margin_cos=float("nan")), "vf_margin_cos"), (dict(mode="pca", regularizer="ortho"), "regularizer"),
    (dict(mode="pca", init="random"), "init"), (dict(mode="none", norm="batchnorm"), "norm"),
    (dict(mode="none", feature_dropout=0.2), "feature_dropout"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ProjectorConfig(**{"feature_dim": D, "dim": d, **kwargs})


def test_config_mode_defaults():
    learned = ProjectorConfig()
    assert (learned.norm, learned.regularizer, learned.dim, learned.feature_dim) == ("batchnorm", "cov", 8, 768)
    pca = ProjectorConfig(mode="pca")
    assert (pca.norm, pca.regularizer, pca.channels) == ("none", "none", 8)
    assert ProjectorConfig(mode="none").channels == 0


def test_projector_construction_errors(statistics):
    with pytest.raises(ValueError, match="init='pca' needs `statistics`"):
        FeatureProjector(ProjectorConfig(feature_dim=D, dim=d, init="pca"))
    with pytest.raises(ValueError, match="mode='pca'.*statistics"):
        FeatureProjector(ProjectorConfig(feature_dim=D, dim=d, mode="pca"))
    with pytest.raises(ValueError, match="feature_dim"):
        FeatureProjector(ProjectorConfig(feature_dim=D + 1, dim=d), statistics)
    projector = FeatureProjector(ProjectorConfig(feature_dim=D, dim=d))
    with pytest.raises(ValueError, match=r"features must have shape \(B, L, 12\)"):
        projector(torch.randn(2, 9, D + 1))


# ---------------------------------------------------------------- learned mode: standardization + BatchNorm

def test_batchnorm_over_all_tokens_running_stats_and_eval(statistics):
    momentum, eps, scale = 0.3, 1e-5, 2.5
    config = ProjectorConfig(feature_dim=D, dim=d, init="random", norm_momentum=momentum, norm_eps=eps,
                             feature_scale=scale, regularizer="none")
    projector = FeatureProjector(config, statistics)
    w = projector.weight.detach().double().numpy()
    running_mean, running_var = np.zeros(d), np.ones(d)
    for seed in (1, 2):
        x = _raw_features(seed)
        y = _standardize(x, statistics) @ w                   # (B, L, d)
        tokens = y.reshape(-1, d)                              # statistics over all B*L tokens
        mean, var = tokens.mean(axis=0), tokens.var(axis=0)    # normalization uses the biased variance
        expected = scale * (y - mean) / np.sqrt(var + eps)
        out = projector(torch.tensor(x, dtype=torch.float32))
        np.testing.assert_allclose(out.z.detach().numpy(), expected, rtol=1e-4, atol=1e-4)
        # Running statistics: torch's momentum update with the *unbiased* variance.
        running_mean = (1 - momentum) * running_mean + momentum * mean
        running_var = (1 - momentum) * running_var + momentum * tokens.var(axis=0, ddof=1)
        np.testing.assert_allclose(projector.norm.running_mean.numpy(), running_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(projector.norm.running_var.numpy(), running_var, rtol=1e-5, atol=1e-6)
        prenorm_std = tokens.std(axis=0, ddof=1)
        assert out.stats["prenorm_std_mean"].item() == pytest.approx(prenorm_std.mean(), rel=1e-5)
        assert out.stats["prenorm_std_min"].item() == pytest.approx(prenorm_std.min(), rel=1e-5)
    projector.eval()
    x = _raw_features(3)
    y = _standardize(x, statistics) @ w
    out = projector(torch.tensor(x, dtype=torch.float32))
    np.testing.assert_allclose(out.z.detach().numpy(), scale * (y - running_mean) / np.sqrt(running_var + eps),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(projector.norm.running_mean.numpy(), running_mean, rtol=1e-5, atol=1e-6)  # frozen


def test_no_norm_and_no_statistics_is_plain_projection():
    projector = FeatureProjector(ProjectorConfig(feature_dim=D, dim=d, norm="none", regularizer="none"))
    assert projector.init_method == "orthogonal" and not bool(projector.has_statistics)
    x = _raw_features(4)
    out = projector(torch.tensor(x, dtype=torch.float32))
    np.testing.assert_allclose(out.z.detach().numpy(), x @ projector.weight.detach().double().numpy(),
                               rtol=1e-4, atol=1e-4)
    assert out.reg_loss.item() == 0.0


def test_runs_in_float32_under_autocast_and_bf16_input(statistics):
    projector = FeatureProjector(ProjectorConfig(feature_dim=D, dim=d, norm="none", regularizer="none"), statistics)
    x = torch.tensor(_raw_features(5), dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = projector(x)
    assert out.z.dtype == torch.float32
    expected = _standardize(x.double().numpy(), statistics) @ projector.weight.detach().double().numpy()
    np.testing.assert_allclose(out.z.detach().numpy(), expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- stop-gradient

def test_stop_gradient_target_has_no_grad_path_but_input_trains_w(statistics):
    projector = FeatureProjector(ProjectorConfig(feature_dim=D, dim=d, regularizer="none"), statistics)
    out = projector(torch.tensor(_raw_features(6), dtype=torch.float32))
    assert not out.target.requires_grad and out.target.grad_fn is None
    assert torch.equal(out.target, out.z.detach())
    # A loss on z (the network input path) reaches W.
    (grad,) = torch.autograd.grad((out.z * torch.randn_like(out.z)).sum(), projector.weight)
    assert grad.abs().max() > 1e-3


def test_without_stop_gradient_target_carries_gradient(statistics):
    projector = FeatureProjector(ProjectorConfig(feature_dim=D, dim=d, regularizer="none", stop_gradient=False),
                                 statistics)
    out = projector(torch.tensor(_raw_features(7), dtype=torch.float32))
    assert out.target.requires_grad
    (grad,) = torch.autograd.grad((out.target * torch.randn_like(out.target)).sum(), projector.weight)
    assert grad.abs().max() > 1e-3


# ---------------------------------------------------------------- pca mode (ReDi)

def test_pca_mode_reproduces_redi_formula(statistics):
    scale = 1.7
    projector = FeatureProjector(ProjectorConfig(feature_dim=D, dim=d, mode="pca", feature_scale=scale), statistics)
    x = _raw_features(8)
    # ReDi: ((z - mean) / std - pca.mean_) @ components_[:r].T, with components from an independent numpy SVD.
    data = _raw_features(100, (20, 16)).reshape(-1, D)
    mean, std = data.mean(axis=0), data.std(axis=0, ddof=1)
    standardized = (data - mean) / std
    pca_mean = standardized.mean(axis=0)
    _, _, vt = np.linalg.svd(standardized - pca_mean, full_matrices=False)
    expected = ((x - mean) / std - pca_mean) @ vt[:d].T
    out = projector(torch.tensor(x, dtype=torch.float32))
    got = out.z.numpy() / scale
    signs = np.sign(np.sum(got.reshape(-1, d) * expected.reshape(-1, d), axis=0))  # PCA sign is a convention
    np.testing.assert_allclose(got, expected * signs, rtol=1e-4, atol=1e-4)
    assert not out.z.requires_grad and out.reg_loss.item() == 0.0
    assert list(projector.parameters()) == [] and projector.param_groups(1e-4) == []


def test_pca_mode_with_batchnorm_ablation(statistics):
    projector = FeatureProjector(ProjectorConfig(feature_dim=D, dim=d, mode="pca", norm="batchnorm"), statistics)
    x = _raw_features(9)
    y = (_standardize(x, statistics) - statistics.standardized_mean.numpy()) @ statistics.pca().components[:d].T.numpy()
    tokens = y.reshape(-1, d)
    expected = (y - tokens.mean(axis=0)) / np.sqrt(tokens.var(axis=0) + 1e-5)
    out = projector(torch.tensor(x, dtype=torch.float32))
    np.testing.assert_allclose(out.z.numpy(), expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- none mode

def test_none_mode_has_no_channels_or_parameters():
    projector = FeatureProjector(ProjectorConfig(mode="none"))
    assert projector.dim == 0 and not projector.enabled
    assert projector(torch.randn(2, 4, 768)) is None
    assert list(projector.parameters()) == [] and projector.state_dict() == {}
    assert projector.param_groups(1e-4) == [] and projector.diagnostics() == {}


# ---------------------------------------------------------------- init options

def test_pca_init_is_top_d_components(statistics):
    projector = FeatureProjector(ProjectorConfig(feature_dim=D, dim=d), statistics)
    assert projector.init_method == "pca"
    w = projector.weight.detach().double().numpy()
    np.testing.assert_allclose(w, statistics.pca().components[:d].T.numpy(), atol=1e-7)
    # Independent: scipy's principal angles between span(W) and numpy's top-d right singular vectors.
    data = _standardize(_raw_features(100, (20, 16)).reshape(-1, D), statistics)
    _, _, vt = np.linalg.svd(data - data.mean(axis=0), full_matrices=False)
    assert np.degrees(scipy.linalg.subspace_angles(w, vt[:d].T)).max() < 1e-3
    assert projector.diagnostics()["pca_angle_max_deg"] < 1e-3


def test_orthogonal_and_random_init():
    torch.manual_seed(1)
    orthogonal = FeatureProjector(ProjectorConfig(feature_dim=D, dim=d, init="orthogonal"))
    w = orthogonal.weight.detach().double()
    torch.testing.assert_close(w.T @ w, torch.eye(d, dtype=torch.float64), atol=1e-6, rtol=0)
    big = FeatureProjector(ProjectorConfig(feature_dim=768, dim=8, init="random"))
    # N(0, 1/D): 6144 samples, the sample std is within ~1% of 1/sqrt(768) (5 sigma ~ 4.5%).
    assert big.weight.std().item() == pytest.approx(1 / math.sqrt(768), rel=0.05)
    assert abs(big.weight.mean().item()) < 5 / math.sqrt(768 * 6144)


# ---------------------------------------------------------------- regularizer wiring

def test_reg_loss_is_weighted_regularizer(statistics):
    x = torch.tensor(_raw_features(10), dtype=torch.float32)
    ortho = FeatureProjector(ProjectorConfig(feature_dim=D, dim=d, init="random", regularizer="ortho",
                                             reg_weight=0.3), statistics)
    w = ortho.weight.detach().double().numpy()
    out = ortho(x)
    expected = np.sum((w.T @ w - np.eye(d)) ** 2)
    assert out.reg_loss.item() == pytest.approx(0.3 * expected, rel=1e-5)
    assert out.stats["reg_ortho"].item() == pytest.approx(expected, rel=1e-5)

    cov = FeatureProjector(ProjectorConfig(feature_dim=D, dim=d, init="random", regularizer="cov", reg_weight=2.0,
                                           feature_scale=4.0), statistics)
    out = cov(x)
    normalized = out.z.detach().double().numpy().reshape(-1, d) / 4.0  # before the feature_scale gain
    c = np.cov(normalized, rowvar=False)
    expected = (np.sum(c ** 2) - np.sum(np.diag(c) ** 2)) / d
    assert out.reg_loss.item() == pytest.approx(2.0 * expected, rel=1e-4)
    (grad,) = torch.autograd.grad(out.reg_loss, cov.weight)
    assert grad.abs().max() > 0

    vf = FeatureProjector(ProjectorConfig(feature_dim=D, dim=d, init="random", regularizer="vf", reg_weight=0.5),
                          statistics)
    out = vf(x)
    z_up = out.z.detach().double().numpy() @ vf.up_projection.weight.detach().double().numpy().T
    f = _standardize(x.double().numpy(), statistics)
    cos = np.sum(z_up * f, -1) / np.linalg.norm(z_up, axis=-1) / np.linalg.norm(f, axis=-1)
    z_unit = z_up / np.linalg.norm(z_up, axis=-1, keepdims=True)
    f_unit = f / np.linalg.norm(f, axis=-1, keepdims=True)
    gap = np.abs(z_unit @ z_unit.transpose(0, 2, 1) - f_unit @ f_unit.transpose(0, 2, 1))
    expected_cos = np.maximum(0.0, 0.5 - cos).mean()
    expected_dist = np.maximum(0.0, gap - 0.25).mean()
    assert out.stats["reg_vf_cos"].item() == pytest.approx(expected_cos, rel=1e-4)
    assert out.stats["reg_vf_dist"].item() == pytest.approx(expected_dist, rel=1e-4, abs=1e-7)
    assert out.reg_loss.item() == pytest.approx(0.5 * (expected_cos + expected_dist), rel=1e-4)
    grads = torch.autograd.grad(out.reg_loss, [vf.weight, vf.up_projection.weight])
    assert all(g.abs().max() > 0 for g in grads)


def test_param_groups_cover_parameters_once_with_lr_scale(statistics):
    projector = FeatureProjector(ProjectorConfig(feature_dim=D, dim=d, regularizer="vf", norm_affine=True,
                                                 lr_scale=0.1), statistics)
    groups = projector.param_groups(base_lr=1e-4, weight_decay=0.01)
    by_name = {g["name"]: g for g in groups}
    assert by_name["projector.weight"]["lr"] == pytest.approx(1e-5)
    assert by_name["projector.weight"]["params"] == [projector.weight]
    assert by_name["projector.up_projection"]["lr"] == 1e-4
    assert by_name["projector.norm"]["weight_decay"] == 0.0
    listed = [id(p) for g in groups for p in g["params"]]
    assert sorted(listed) == sorted(id(p) for p in projector.parameters())
    torch.optim.AdamW(groups, lr=1e-4)  # accepted by a real optimizer


def test_state_dict_round_trip_restores_statistics(statistics):
    source = FeatureProjector(ProjectorConfig(feature_dim=D, dim=d, init="random"), statistics)
    target = FeatureProjector(ProjectorConfig(feature_dim=D, dim=d, init="random"))
    assert not bool(target.has_statistics)
    target.load_state_dict(source.state_dict())
    assert bool(target.has_statistics)
    x = torch.tensor(_raw_features(11), dtype=torch.float32)
    torch.testing.assert_close(target(x).z, source(x).z)


def test_diagnostics_report_effective_rank_and_angles(statistics):
    projector = FeatureProjector(ProjectorConfig(feature_dim=D, dim=d, init="random"), statistics)
    out = projector(torch.tensor(_raw_features(12), dtype=torch.float32))
    report = projector.diagnostics(out.z)
    w = projector.weight.detach().double().numpy()
    expected_angles = np.degrees(scipy.linalg.subspace_angles(w, statistics.pca().components[:d].T.numpy()))
    assert report["pca_angle_max_deg"] == pytest.approx(expected_angles.max(), abs=1e-4)
    eigenvalues = np.linalg.eigvalsh(np.cov(out.z.detach().double().numpy().reshape(-1, d), rowvar=False))
    p = eigenvalues / eigenvalues.sum()
    assert report["effective_rank"] == pytest.approx(math.exp(-np.sum(p * np.log(p))), rel=1e-6)
    assert report["ortho_error"] == pytest.approx(np.sum((w.T @ w - np.eye(d)) ** 2), rel=1e-6)


def test_diagnostics_of_a_diverged_projection_are_nan_not_an_error(statistics):
    # A run whose W went non-finite must reach its non-finite-loss handling, not die in an SVD at a log step.
    projector = FeatureProjector(ProjectorConfig(feature_dim=D, dim=d, init="random"), statistics)
    out = projector(torch.tensor(_raw_features(12), dtype=torch.float32))
    with torch.no_grad():
        projector.weight[0, 0] = float("nan")
    report = projector.diagnostics(out.z)
    assert set(report) == {"weight_sv_max", "weight_sv_min", "ortho_error", "pca_angle_max_deg",
                           "pca_angle_mean_deg", "effective_rank", "z_std_min", "z_std_max"}
    assert all(math.isnan(v) for v in report.values())


# ---------------------------------------------------------------- token grid

def _bilinear_reference(grid: np.ndarray, out: int) -> np.ndarray:
    """Half-pixel bilinear resize (align_corners=False), written out: source coord = (i + 0.5) * in/out - 0.5,
    clamped at 0, neighbours clamped at the last index."""
    channels, size, _ = grid.shape
    result = np.zeros((channels, out, out))

    def taps(i):
        src = max((i + 0.5) * size / out - 0.5, 0.0)
        low = min(int(math.floor(src)), size - 1)
        high = min(low + 1, size - 1)
        return low, high, src - low

    for i in range(out):
        y0, y1, wy = taps(i)
        for j in range(out):
            x0, x1, wx = taps(j)
            result[:, i, j] = ((1 - wy) * (1 - wx) * grid[:, y0, x0] + (1 - wy) * wx * grid[:, y0, x1]
                               + wy * (1 - wx) * grid[:, y1, x0] + wy * wx * grid[:, y1, x1])
    return result


def test_tokens_to_grid_matches_redi_reshape_interpolate_and_hand_bilinear():
    z = torch.randn(2, 16, 3, dtype=torch.float64)  # 4x4 token grid
    grid = tokens_to_grid(z, 8)
    # ReDi: reshape row-major to (B, 4, 4, d), permute to channels-first, bilinear to 8x8.
    redi = F.interpolate(z.reshape(2, 4, 4, 3).permute(0, 3, 1, 2), size=(8, 8), mode="bilinear",
                         align_corners=False)
    torch.testing.assert_close(grid, redi, rtol=0, atol=0)
    np.testing.assert_allclose(grid[1].numpy(), _bilinear_reference(z[1].T.reshape(3, 4, 4).numpy(), 8), atol=1e-12)
    # Tiny 2x2 -> 4x4 by hand: rows/cols map to source coords -0.25(->0), 0.25, 0.75, 1.25(->1).
    tiny = torch.tensor([[[1.0], [2.0], [3.0], [4.0]]], dtype=torch.float64)  # [[1, 2], [3, 4]]
    out = tokens_to_grid(tiny, 4)[0, 0]
    assert out[0, 0].item() == 1.0 and out[3, 3].item() == 4.0
    assert out[1, 1].item() == pytest.approx(0.75 * 0.75 * 1 + 0.75 * 0.25 * 2 + 0.25 * 0.75 * 3 + 0.25 * 0.25 * 4)
    assert out[0, 2].item() == pytest.approx(0.25 * 1 + 0.75 * 2)


def test_grid_round_trip_and_gradient():
    z = torch.randn(2, 16, 3, requires_grad=True)
    same = tokens_to_grid(z, 4)
    assert torch.equal(same[0, 2], z[0, :, 2].reshape(4, 4))  # row-major token order
    assert torch.equal(grid_to_tokens(same), z)
    up = tokens_to_grid(z, (8, 12))
    assert up.shape == (2, 3, 8, 12)
    # Area-downsampling a nearest-upsampled grid recovers the tokens exactly.
    nearest = F.interpolate(same.detach(), scale_factor=2, mode="nearest")
    torch.testing.assert_close(grid_to_tokens(nearest, num_tokens=16), z.detach())
    (grad,) = torch.autograd.grad(up.sum(), z)
    # Bilinear resize 4 -> 8 (rows) and 4 -> 12 (cols) preserves the total mass per axis: each token gets 2 * 3.
    torch.testing.assert_close(grad, torch.full_like(grad, 6.0))


def test_grid_validation_errors():
    assert check_feature_grid(256, 32) == 16 and check_feature_grid(256, 16) == 16
    with pytest.raises(ValueError, match="num_tokens=200"):
        check_feature_grid(200, 32)
    with pytest.raises(ValueError, match="latent_size=24"):
        check_feature_grid(256, 24)
    with pytest.raises(ValueError, match="latent_size=8"):
        check_feature_grid(256, 8)
    with pytest.raises(ValueError, match="num_tokens"):
        tokens_to_grid(torch.randn(1, 15, 2), 8)
    validate_channels(12, 4, 8)
    validate_channels(4, 4, 0, model_out_channels=4)
    with pytest.raises(ValueError, match=r"in_channels=11.*image_channels=4.*d=8 = 12"):
        validate_channels(11, 4, 8)
    with pytest.raises(ValueError, match=r"out_channels=24.*= 12"):
        validate_channels(12, 4, 8, model_out_channels=24)
