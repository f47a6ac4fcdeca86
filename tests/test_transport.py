"""Linear path identities, training-time distributions and the joint velocity loss, against closed forms."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from coredi_fast.transport import (expand_t_like_x, interpolate, joint_velocity_loss, sample_time, score_from_velocity,
                                   velocity_from_x_prediction, velocity_target, x0_from_velocity, x1_from_velocity)


#################################################################################
#                                   Path                                        #
#################################################################################

def test_interpolate_and_target_match_per_sample_formula():
    x1 = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    x0 = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    x_t = interpolate(x1, x0, t)
    for b in range(3):
        np.testing.assert_allclose(x_t[b].numpy(), t[b].item() * x1[b].numpy() + (1 - t[b].item()) * x0[b].numpy())
    np.testing.assert_allclose(velocity_target(x1, x0).numpy(), x1.numpy() - x0.numpy())
    # the target is the time derivative of the path: a finite difference in t reproduces it
    h = 1e-6
    t_mid = torch.full((3,), 0.4, dtype=torch.float64)
    fd = (interpolate(x1, x0, t_mid + h) - interpolate(x1, x0, t_mid - h)) / (2 * h)
    torch.testing.assert_close(fd, velocity_target(x1, x0), rtol=1e-6, atol=1e-6)


def test_x1_x0_recovered_from_exact_velocity():
    x1 = torch.randn(4, 3, 6, dtype=torch.float64)
    x0 = torch.randn(4, 3, 6, dtype=torch.float64)
    t = torch.tensor([0.0, 0.2, 0.7, 0.99], dtype=torch.float64)
    x_t = interpolate(x1, x0, t)
    v = x1 - x0
    torch.testing.assert_close(x1_from_velocity(v, x_t, t), x1)
    torch.testing.assert_close(x0_from_velocity(v, x_t, t), x0)


def test_score_from_velocity_matches_gaussian_score():
    """Data N(mu, sigma^2): x_t ~ N(t mu, s^2), s^2 = t^2 sigma^2 + (1-t)^2, so score = -(x - t mu) / s^2."""
    mu, sigma = 0.7, 1.8
    t = torch.tensor([0.0, 0.25, 0.5, 0.9], dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    tb = t.view(-1, 1, 1)
    var = tb**2 * sigma**2 + (1 - tb) ** 2
    v = mu + (tb * sigma**2 - (1 - tb)) / var * (x - tb * mu)
    torch.testing.assert_close(score_from_velocity(v, x, t), -(x - tb * mu) / var)


def test_velocity_from_x_prediction_with_clamp():
    x1 = torch.randn(3, 2, 4, dtype=torch.float64)
    x0 = torch.randn(3, 2, 4, dtype=torch.float64)
    t = torch.tensor([0.1, 0.9, 0.99], dtype=torch.float64)
    x_t = interpolate(x1, x0, t)
    v = velocity_from_x_prediction(x1, x_t, t, clamp=0.05)
    # 1 - t >= clamp: an exact x-prediction gives the exact velocity
    torch.testing.assert_close(v[:2], (x1 - x0)[:2])
    # 1 - t = 0.01 < clamp: the division uses 0.05, i.e. the velocity shrinks by 0.01 / 0.05
    torch.testing.assert_close(v[2], (x1[2] - x_t[2]) / 0.05)
    torch.testing.assert_close(v[2], (x1 - x0)[2] * 0.2)
    with pytest.raises(ValueError, match="clamp"):
        velocity_from_x_prediction(x1, x_t, t, clamp=0.0)


def test_expand_t_rejects_wrong_shape():
    x = torch.zeros(4, 3, 2)
    assert expand_t_like_x(torch.arange(4.0), x).shape == (4, 1, 1)
    assert expand_t_like_x(0.5, x) == 0.5
    with pytest.raises(ValueError, match="t must have shape"):
        expand_t_like_x(torch.zeros(3), x)
    with pytest.raises(ValueError, match="x1 and x0"):
        interpolate(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2))


#################################################################################
#                               Time sampling                                   #
#################################################################################

N_TIMES = 100_000


def test_uniform_time_moments_and_ks():
    t = sample_time(N_TIMES, kind="uniform", generator=torch.Generator().manual_seed(1)).double().numpy()
    assert t.min() >= 0.0 and t.max() < 1.0
    assert abs(t.mean() - 0.5) < 5 * math.sqrt(1 / 12 / N_TIMES)
    assert abs(t.var() - 1 / 12) < 5 * math.sqrt((1 / 80 - 1 / 144) / N_TIMES)  # Var of (U - 1/2)^2 = 1/80 - 1/144
    assert stats.kstest(t, "uniform").pvalue > 1e-3


def test_logit_normal_matches_jit_recipe():
    """JiT: P_mean = -0.8, P_std = 0.8 on the same convention (t = 1 data): logit(t) ~ N(-0.8, 0.8^2)."""
    mean, std = -0.8, 0.8
    t = sample_time(N_TIMES, kind="logit_normal", mean=mean, std=std,
                    generator=torch.Generator().manual_seed(2), dtype=torch.float64).numpy()
    logit = np.log(t) - np.log1p(-t)
    assert abs(logit.mean() - mean) < 5 * std / math.sqrt(N_TIMES)
    assert abs(logit.std() - std) < 5 * std / math.sqrt(2 * N_TIMES)
    assert stats.kstest(logit, "norm", args=(mean, std)).pvalue > 1e-3
    # more mass near noise: the median is sigmoid(-0.8) = 0.310
    assert abs(np.median(t) - 1 / (1 + math.exp(0.8))) < 0.005


def test_eps_squeezes_the_range_affinely():
    eps = 0.1
    t = sample_time(N_TIMES, kind="uniform", eps=eps, generator=torch.Generator().manual_seed(3),
                    dtype=torch.float64).numpy()
    assert t.min() >= eps and t.max() <= 1 - eps
    assert stats.kstest((t - eps) / (1 - 2 * eps), "uniform").pvalue > 1e-3


def test_time_sampling_reproducible_with_generator():
    a = sample_time(16, kind="logit_normal", generator=torch.Generator().manual_seed(7))
    b = sample_time(16, kind="logit_normal", generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, name", [
    (dict(batch_size=4, kind="beta"), "kind"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=4, eps=0.5), "eps"),
    (dict(batch_size=4, kind="logit_normal", std=0.0), "std"),
])
def test_time_sampling_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sample_time(**kwargs)


#################################################################################
#                                  Loss                                         #
#################################################################################

def _reference_loss(pred, target, image_channels, feature_weight, mask, weight):
    """float64 numpy: per-sample mean over each modality's own elements, then weighted mean over the batch."""
    p, g = pred.detach().double().numpy(), target.detach().double().numpy()
    per_sample, images, features = [], [], []
    for b in range(p.shape[0]):
        image = np.mean((p[b, :image_channels] - g[b, :image_channels]) ** 2)
        feature = np.mean((p[b, image_channels:] - g[b, image_channels:]) ** 2) if p.shape[1] > image_channels else 0
        per_sample.append(weight[b] * (image + feature_weight * mask[b] * feature))
        images.append(image)
        features.append(feature)
    kept = [f for f, m in zip(features, mask) if m]
    return np.mean(per_sample), np.mean(images), (np.mean(kept) if kept else 0.0), np.array(per_sample)


@pytest.mark.parametrize("feature_weight, mask, weight", [
    (1.0, None, None),
    (0.5, [1, 0, 1, 1, 0], None),
    (2.0, [0, 0, 0, 0, 0], [1.0, 2.0, 0.5, 0.0, 3.0]),
])
def test_joint_loss_matches_float64_reference(feature_weight, mask, weight):
    pred = torch.randn(5, 4 + 3, 4, 4)
    target = 3.0 * torch.randn(5, 4 + 3, 4, 4)  # a different scale per modality would show element-count mixing
    target[:, 4:] *= 5.0
    feature_mask = None if mask is None else torch.tensor(mask, dtype=torch.bool)
    sample_weight = None if weight is None else torch.tensor(weight)
    out = joint_velocity_loss(pred, target, 4, feature_weight, feature_mask, sample_weight)
    ref_loss, ref_image, ref_feature, ref_per_sample = _reference_loss(
        pred, target, 4, feature_weight, mask or [1] * 5, weight or [1.0] * 5)
    assert out["loss"].item() == pytest.approx(ref_loss, rel=1e-5)
    assert out["loss_image"].item() == pytest.approx(ref_image, rel=1e-5)
    assert out["loss_feature"].item() == pytest.approx(ref_feature, rel=1e-5, abs=1e-7)
    np.testing.assert_allclose(out["loss_per_sample"].numpy(), ref_per_sample, rtol=1e-5)
    # the joint loss is not the plain MSE over all channels (features are 3/7 of the elements, not half the loss)
    if mask is None:
        assert abs(out["loss"].item() - ((pred - target) ** 2).mean().item()) > 0.1 * ref_loss


def test_no_feature_mode_is_plain_mse():
    pred, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    out = joint_velocity_loss(pred, target, image_channels=4, feature_mask=torch.tensor([1.0, 0.0, 1.0]))
    assert out["loss"].item() == pytest.approx(((pred.double() - target.double()) ** 2).mean().item(), rel=1e-6)
    assert out["loss_feature"].item() == 0.0


def test_joint_loss_gradient_reaches_pred_only():
    """d loss / d pred = 2 (p - g) / (B * N_modality) * (1 or lambda_z * m_b); logged terms carry no graph."""
    B, ic, fc, hw = 3, 4, 2, 3
    lam, mask = 0.7, torch.tensor([1.0, 0.0, 1.0])
    pred = torch.randn(B, ic + fc, hw, hw, dtype=torch.float64, requires_grad=True)
    target = torch.randn(B, ic + fc, hw, hw, dtype=torch.float64)
    out = joint_velocity_loss(pred, target, ic, lam, mask)
    out["loss"].backward()
    diff = (pred - target).detach()
    expected = torch.empty_like(diff)
    expected[:, :ic] = 2 * diff[:, :ic] / (B * ic * hw * hw)
    expected[:, ic:] = 2 * diff[:, ic:] / (B * fc * hw * hw) * lam * mask.view(-1, 1, 1, 1)
    torch.testing.assert_close(pred.grad, expected)
    for key in ("loss_image", "loss_feature", "loss_per_sample"):
        assert out[key].grad_fn is None and not out[key].requires_grad


def test_joint_loss_does_not_detach_the_target():
    """Stop-gradient is the caller's job: a target that requires grad gets -d loss / d pred (the sg-off ablation)."""
    pred = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    joint_velocity_loss(pred, target, 3)["loss"].backward()
    torch.testing.assert_close(target.grad, -pred.grad)
    assert pred.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs, name", [
    (dict(image_channels=0), "image_channels"),
    (dict(image_channels=7), "image_channels"),
    (dict(image_channels=4, feature_mask=torch.ones(3)), "feature_mask"),
    (dict(image_channels=4, sample_weight=torch.ones(2, 1)), "sample_weight"),
])
def test_joint_loss_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        joint_velocity_loss(torch.zeros(2, 6, 3), torch.zeros(2, 6, 3), **kwargs)
    with pytest.raises(ValueError, match="pred and target"):
        joint_velocity_loss(torch.zeros(2, 6, 3), torch.zeros(2, 6, 4), 4)


def test_joint_loss_accumulates_bf16_outputs_in_float32():
    pred, target = torch.randn(4, 6, 8, 8), torch.randn(4, 6, 8, 8)
    out = joint_velocity_loss(pred.bfloat16(), target, 4)
    ref, _, _, _ = _reference_loss(pred.bfloat16().float(), target, 4, 1.0, [1] * 4, [1.0] * 4)
    assert out["loss"].dtype == torch.float32
    assert out["loss"].item() == pytest.approx(ref, rel=1e-5)
