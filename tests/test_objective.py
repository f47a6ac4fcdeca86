"""The joint objective: loss values against a hand-written computation, where the stop-gradient sits, feature
dropout, the no-feature baseline, and a tiny training run in which the naive variant collapses and CoReDi does not."""
import pytest
import torch
import torch.nn.functional as F

from coredi_fast.method import FeatureProjector, FeatureStatistics, ProjectorConfig, effective_rank
from coredi_fast.method.objective import JointDiffusionObjective, ObjectiveConfig
from coredi_fast.models import create_model

B, L, D, C, H = 3, 4, 6, 2, 4  # batch, tokens (2x2 grid), encoder dim, image channels, image side


class LinearDenoiser(torch.nn.Module):
    """A 1x1 convolution: simple enough that the expected loss can be written by hand."""

    def __init__(self, channels):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 1)

    def forward(self, x, t, y):
        return self.conv(x) * (1 + t.view(-1, 1, 1, 1))


class RecordingDenoiser(LinearDenoiser):
    """LinearDenoiser that keeps its last input in `seen["x"]`."""

    def __init__(self, channels):
        super().__init__(channels)
        self.seen = {}

    def forward(self, x, t, y):
        self.seen["x"] = x.detach().clone()
        return super().forward(x, t, y)


def _projector(**overrides):
    config = ProjectorConfig(feature_dim=D, dim=2, init="orthogonal", **overrides)
    return FeatureProjector(config)


def _reference_loss(model, projector_weight, x, f, noise, lam, eps=1e-5, stop_gradient=True):
    """ReDi/CoReDi loss written out in float64 with explicit formulas (BatchNorm over all tokens, bilinear resize)."""
    z = f.double() @ projector_weight.double()                             # (B, L, d)
    mean = z.reshape(-1, z.shape[-1]).mean(0)
    var = z.reshape(-1, z.shape[-1]).var(0, unbiased=False)
    z = (z - mean) / torch.sqrt(var + eps)
    side = int(L ** 0.5)
    grid = z.transpose(1, 2).reshape(B, -1, side, side)
    grid = F.interpolate(grid, size=H, mode="bilinear", align_corners=False)
    target_grid = grid.detach() if stop_gradient else grid
    t = noise.t.double().view(-1, 1, 1, 1)
    x_t = t * x.double() + (1 - t) * noise.noise_x.double()
    z_t = t * grid + (1 - t) * noise.noise_z.double()
    model64 = LinearDenoiser(C + 2).double()
    model64.load_state_dict(model.state_dict())
    v = model64(torch.cat([x_t, z_t], 1), noise.t.double(), None)
    image_term = ((v[:, :C] - (x.double() - noise.noise_x.double())) ** 2).mean(dim=(1, 2, 3))
    feature_term = ((v[:, C:] - (target_grid - noise.noise_z.double())) ** 2).mean(dim=(1, 2, 3))
    return (image_term + lam * feature_term).mean()


@pytest.mark.parametrize("lam", [1.0, 0.3])
def test_loss_matches_hand_written_formula(lam):
    projector = _projector(regularizer="none")
    objective = JointDiffusionObjective(projector, ObjectiveConfig(image_channels=C, image_size=H, feature_weight=lam),
                                        feature_grid_tokens=L)
    model = LinearDenoiser(C + 2)
    x, f = torch.randn(B, C, H, H), torch.randn(B, L, D)
    noise = objective.draw_noise(B, generator=torch.Generator().manual_seed(1))
    out = objective(model, x, f, torch.zeros(B, dtype=torch.long), noise=noise)
    expected = _reference_loss(model, projector.weight.detach(), x, f, noise, lam)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_stop_gradient_target_carries_no_gradient_but_w_learns_through_the_input():
    projector = _projector(regularizer="none")
    objective = JointDiffusionObjective(projector, ObjectiveConfig(image_channels=C, image_size=H))
    model = LinearDenoiser(C + 2)
    x, f = torch.randn(B, C, H, H), torch.randn(B, L, D)
    noise = objective.draw_noise(B, generator=torch.Generator().manual_seed(2))
    out = objective(model, x, f, torch.zeros(B, dtype=torch.long), noise=noise)
    (grad,) = torch.autograd.grad(out.loss, projector.weight)

    # Independent reference: the same loss in float64 with the target explicitly detached.
    w = projector.weight.detach().double().requires_grad_(True)
    expected_loss = _reference_loss(model, w, x, f, noise, 1.0, stop_gradient=True)
    (expected,) = torch.autograd.grad(expected_loss, w)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-7)
    assert grad.abs().max() > 1e-4  # W does learn, through the network input

    # The gradient through the target alone is what sg removes: with sg off it is included and differs.
    w_nosg = projector.weight.detach().double().requires_grad_(True)
    loss_nosg = _reference_loss(model, w_nosg, x, f, noise, 1.0, stop_gradient=False)
    (grad_nosg,) = torch.autograd.grad(loss_nosg, w_nosg)
    assert (grad_nosg - expected).abs().max() > 1e-4

    projector_nosg = _projector(regularizer="none", stop_gradient=False)
    projector_nosg.load_state_dict(projector.state_dict())
    objective_nosg = JointDiffusionObjective(projector_nosg, ObjectiveConfig(image_channels=C, image_size=H))
    out = objective_nosg(model, x, f, torch.zeros(B, dtype=torch.long), noise=noise)
    (grad,) = torch.autograd.grad(out.loss, projector_nosg.weight)
    torch.testing.assert_close(grad.double(), grad_nosg, rtol=1e-4, atol=1e-7)


def test_feature_dropout_zeroes_the_feature_input_and_loss_of_dropped_samples():
    projector = _projector(regularizer="none", feature_dropout=0.5)
    objective = JointDiffusionObjective(projector, ObjectiveConfig(image_channels=C, image_size=H))
    model = RecordingDenoiser(C + 2)
    seen = model.seen
    x, f = torch.randn(B, C, H, H), torch.randn(B, L, D)
    noise = objective.draw_noise(B, generator=torch.Generator().manual_seed(3))
    keep = torch.tensor([True, False, True])
    noise = noise._replace(feature_keep=keep)
    out = objective(model, x, f, torch.zeros(B, dtype=torch.long), noise=noise)
    assert torch.all(seen["x"][1, C:] == 0) and seen["x"][0, C:].abs().sum() > 0
    # Loss of the dropped sample is image-only: recompute per sample by hand.
    pred = model(seen["x"], noise.t, None)
    t = noise.t.view(-1, 1, 1, 1)
    target_x = x - noise.noise_x
    z_input = seen["x"][:, C:]
    z_clean = (z_input - (1 - t) * noise.noise_z) / t  # recover the clean feature grid of kept samples
    image_term = ((pred[:, :C] - target_x) ** 2).mean(dim=(1, 2, 3))
    feature_term = ((pred[:, C:] - (z_clean - noise.noise_z)) ** 2).mean(dim=(1, 2, 3))
    expected = (image_term + keep.float() * feature_term).mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-4, atol=1e-6)


def test_no_feature_mode_is_plain_sit():
    projector = FeatureProjector(ProjectorConfig(mode="none", feature_dim=D))
    objective = JointDiffusionObjective(projector, ObjectiveConfig(image_channels=C, image_size=H))
    assert objective.model_channels == C
    model = LinearDenoiser(C)
    x = torch.randn(B, C, H, H)
    noise = objective.draw_noise(B, generator=torch.Generator().manual_seed(4))
    assert noise.noise_z is None
    out = objective(model, x, None, torch.zeros(B, dtype=torch.long), noise=noise)
    t = noise.t.view(-1, 1, 1, 1)
    v = model(t * x + (1 - t) * noise.noise_x, noise.t, None)
    torch.testing.assert_close(out.loss, ((v - (x - noise.noise_x)) ** 2).mean())


def test_noise_drawn_for_a_global_batch_slices_into_rank_parts():
    projector = _projector(feature_dropout=0.2)
    objective = JointDiffusionObjective(projector, ObjectiveConfig(image_channels=C, image_size=H))
    noise = objective.draw_noise(4, generator=torch.Generator().manual_seed(5))
    part = noise.slice(2, 4)
    assert torch.equal(part.noise_x, noise.noise_x[2:]) and torch.equal(part.t, noise.t[2:])


def test_bad_configuration_is_rejected_with_the_argument_named():
    with pytest.raises(ValueError, match="image_channels"):
        ObjectiveConfig(image_channels=0)
    with pytest.raises(ValueError, match="time_sampling"):
        ObjectiveConfig(time_sampling="cosine")
    with pytest.raises(ValueError, match="latent|grid|multiple|size"):
        JointDiffusionObjective(_projector(), ObjectiveConfig(image_channels=C, image_size=5), feature_grid_tokens=4)
    objective = JointDiffusionObjective(_projector(), ObjectiveConfig(image_channels=C, image_size=H))
    with pytest.raises(ValueError, match="x must have shape"):
        objective(LinearDenoiser(C + 2), torch.randn(B, C + 1, H, H), torch.randn(B, L, D), torch.zeros(B).long())


# ---------------------------------------------------------------------------------------------- collapse study

def _train_projection(stop_gradient, norm, regularizer, steps=150, seed=0):
    """Train a tiny SiT jointly with the projection on structured synthetic features; return collapse monitors."""
    torch.manual_seed(seed)
    feature_dim, tokens, dim, batch = 16, 16, 4, 16
    # Features with a clear low-rank structure (like DINOv2 tokens), tied to a 2-channel 8x8 image.
    basis = torch.randn(6, feature_dim)
    def batch_of_data(gen):
        codes = torch.randn(batch, tokens, 6, generator=gen)
        f = codes @ basis + 0.1 * torch.randn(batch, tokens, feature_dim, generator=gen)
        grid = codes[..., :2].transpose(1, 2).reshape(batch, 2, 4, 4)
        x = F.interpolate(grid, size=8, mode="bilinear", align_corners=False)
        return x, f

    stats = FeatureStatistics(feature_dim)
    gen = torch.Generator().manual_seed(100)
    for _ in range(8):
        stats.update(batch_of_data(gen)[1])
    config = ProjectorConfig(feature_dim=feature_dim, dim=dim, init="pca", norm=norm, regularizer=regularizer,
                             stop_gradient=stop_gradient, lr_scale=10.0)
    projector = FeatureProjector(config, stats)
    objective = JointDiffusionObjective(projector, ObjectiveConfig(image_channels=2, image_size=8),
                                        feature_grid_tokens=tokens)
    model = create_model("SiT-Micro/2", input_size=8, in_channels=2 + dim, num_classes=1, class_dropout_prob=0.0)
    lr = 1e-3
    optimizer = torch.optim.Adam([{"params": model.parameters(), "lr": lr}] + projector.param_groups(lr))
    for _ in range(steps):
        x, f = batch_of_data(gen)
        out = objective(model, x, f, torch.zeros(batch, dtype=torch.long), generator=gen)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    with torch.no_grad():
        x, f = batch_of_data(gen)
        projector.eval()
        z = projector(f).z
        initial = FeatureProjector(config, stats)(f).z
    return {"std": z.reshape(-1, dim).std(0).mean().item(),
            "initial_std": initial.reshape(-1, dim).std(0).mean().item(),
            "rank": effective_rank(z)}


@pytest.mark.slow
def test_naive_variant_collapses_and_coredi_default_does_not():
    naive = _train_projection(stop_gradient=False, norm="none", regularizer="none")
    default = _train_projection(stop_gradient=True, norm="batchnorm", regularizer="cov")
    # Naive: the cheapest way to cut the feature loss is to shrink the features: their variance goes to ~0.
    assert naive["std"] < 0.1 * naive["initial_std"], naive
    # CoReDi: unit-variance channels (BatchNorm) that stay spread over all d directions.
    assert default["std"] > 0.5, default
    assert default["rank"] > 3.0, default  # out of d = 4


@pytest.mark.parametrize("mode, regularizer, keep", [("learned", "cov", True), ("learned", "ortho", False),
                                                      ("pca", "none", False)])
def test_fused_joint_embedding_objective_equals_the_pytorch_path(mode, regularizer, keep):
    """Same loss, logs and gradients (denoiser and W) whether the fused op or plain PyTorch builds the tokens."""
    stats = FeatureStatistics(D)
    stats.update(torch.randn(64, D) * torch.linspace(0.5, 2.0, D) + 1.0)
    kwargs = dict(regularizer=regularizer) if mode == "learned" else {}
    config = ProjectorConfig(mode=mode, feature_dim=D, dim=2, feature_dropout=0.3 if keep else 0.0, **kwargs)
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        projector = FeatureProjector(config, stats)
        objective = JointDiffusionObjective(projector, ObjectiveConfig(image_channels=C, image_size=H,
                                                                       fused_embedding=fused), feature_grid_tokens=L)
        model = create_model("SiT-Micro/2", input_size=H, in_channels=C + 2, num_classes=3)
        for param in model.parameters():
            torch.nn.init.normal_(param, std=0.05)
        x, f = torch.randn(B, C, H, H), torch.randn(B, L, D)
        noise = objective.draw_noise(B, generator=torch.Generator().manual_seed(6), label_dropout=0.3)
        out = objective(model, x, f, torch.tensor([0, 1, 2]), noise=noise)
        params = [q for q in list(model.parameters()) + list(projector.parameters()) if q.requires_grad]
        grads = torch.autograd.grad(out.loss, params)
        results.append((out, grads, projector.state_dict()))
    (ref, ref_grads, ref_state), (got, got_grads, got_state) = results
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for key in ref.logs:
        torch.testing.assert_close(got.logs[key], ref.logs[key], rtol=1e-4, atol=1e-6, msg=key)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for key in ref_state:  # BatchNorm running statistics updated the same way
        torch.testing.assert_close(got_state[key], ref_state[key])


def test_fused_embedding_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="stop_gradient"):
        JointDiffusionObjective(_projector(stop_gradient=False), ObjectiveConfig(image_channels=C, image_size=H,
                                                                                 fused_embedding=True))
    with pytest.raises(ValueError, match="vf"):
        JointDiffusionObjective(_projector(regularizer="vf"), ObjectiveConfig(image_channels=C, image_size=H,
                                                                              fused_embedding=True))
    with pytest.raises(ValueError, match="velocity"):
        ObjectiveConfig(prediction="x", fused_embedding=True)
    with pytest.raises(ValueError, match="feature_dropout_mode"):
        JointDiffusionObjective(_projector(feature_dropout=0.2, feature_dropout_mode="redi"),
                                ObjectiveConfig(image_channels=C, image_size=H, fused_embedding=True))


# ---------------------------------------------------------------------------------------------- x-prediction (JiT)

def _double_model(model, channels):
    model64 = LinearDenoiser(channels).double()
    model64.load_state_dict(model.state_dict())
    return model64


def _jit_loss(model64, x, e, t, clamp=0.05):
    """JiT's `Denoiser.forward` (LTH14/JiT denoiser.py) written out in float64, t = 1 being data as in JiT:
    z = t x + (1 - t) e, v = (x - z) / (1 - t).clamp_min(t_eps), v_pred = (net(z) - z) / (1 - t).clamp_min(t_eps),
    per-sample mean of (v - v_pred)^2."""
    t4 = t.double().view(-1, 1, 1, 1)
    z = t4 * x + (1 - t4) * e
    v = (x - z) / (1 - t4).clamp_min(clamp)
    v_pred = (model64(z, t.double(), None) - z) / (1 - t4).clamp_min(clamp)
    return ((v - v_pred) ** 2).mean(dim=(1, 2, 3))


def test_x_prediction_loss_is_jits_with_the_clamped_velocity_target():
    projector = FeatureProjector(ProjectorConfig(mode="none", feature_dim=D))
    objective = JointDiffusionObjective(projector, ObjectiveConfig(image_channels=C, image_size=H, prediction="x"))
    model = LinearDenoiser(C)
    x = torch.randn(B, C, H, H)
    noise = objective.draw_noise(B, generator=torch.Generator().manual_seed(7))
    noise = noise._replace(t=torch.tensor([0.3, 0.97, 0.999]))   # two samples past 1 - t_eps = 0.95
    out = objective(model, x, None, torch.zeros(B, dtype=torch.long), noise=noise)
    expected = _jit_loss(_double_model(model, C), x.double(), noise.noise_x.double(), noise.t).mean()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-7)
    # The unclamped target x - eps (what the objective used before) gives another loss for t > 0.95.
    t4 = noise.t.double().view(-1, 1, 1, 1)
    z = t4 * x.double() + (1 - t4) * noise.noise_x.double()
    v_pred = (_double_model(model, C)(z, noise.t.double(), None) - z) / (1 - t4).clamp_min(0.05)
    unclamped = ((x.double() - noise.noise_x.double() - v_pred) ** 2).mean()
    assert abs(unclamped - expected) > 1e-3 * expected


def test_x_prediction_feature_target_uses_the_same_clamp():
    projector = _projector(regularizer="none")
    objective = JointDiffusionObjective(projector, ObjectiveConfig(image_channels=C, image_size=H, prediction="x"),
                                        feature_grid_tokens=L)
    model = LinearDenoiser(C + 2)
    x, f = torch.randn(B, C, H, H), torch.randn(B, L, D)
    noise = objective.draw_noise(B, generator=torch.Generator().manual_seed(8))
    noise = noise._replace(t=torch.tensor([0.5, 0.96, 0.99]))
    out = objective(model, x, f, torch.zeros(B, dtype=torch.long), noise=noise)
    # The joint tensor (image ++ features) through JiT's formula; per-modality means as ReDi's loss.
    z = f.double() @ projector.weight.detach().double()
    flat = z.reshape(-1, 2)
    z = (z - flat.mean(0)) / torch.sqrt(flat.var(0, unbiased=False) + 1e-5)
    grid = F.interpolate(z.transpose(1, 2).reshape(B, 2, 2, 2), size=H, mode="bilinear", align_corners=False)
    clean = torch.cat([x.double(), grid], 1)
    e = torch.cat([noise.noise_x, noise.noise_z], 1).double()
    t4 = noise.t.double().view(-1, 1, 1, 1)
    noisy = t4 * clean + (1 - t4) * e
    v = (clean - noisy) / (1 - t4).clamp_min(0.05)
    v_pred = (_double_model(model, C + 2)(noisy, noise.t.double(), None) - noisy) / (1 - t4).clamp_min(0.05)
    err = (v - v_pred) ** 2
    expected = (err[:, :C].mean(dim=(1, 2, 3)) + err[:, C:].mean(dim=(1, 2, 3))).mean()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- ReDi's feature dropout

def _redi_training_loss(model64, x, grid, noise, dropped: bool, lam=1.0):
    """ReDi's `Transport.training_losses` (zelaki/ReDi transport/transport.py) written out in float64: x1 = the joint
    (latent ++ PCA grid); when the step's coin drops, lam = 0 and x1[:, 4:] = 0 BEFORE `path_sampler.plan`, which
    builds xt = t x1 + (1 - t) x0 and ut = x1 - x0 (ICPlan: alpha_t = t, sigma_t = 1 - t)."""
    x1 = torch.cat([x.double(), grid.double()], 1)
    if dropped:
        lam = 0.0
        x1[:, C:] = 0
    x0 = torch.cat([noise.noise_x, noise.noise_z], 1).double()
    t = noise.t.double().view(-1, 1, 1, 1)
    xt = t * x1 + (1 - t) * x0
    ut = x1 - x0
    out = model64(xt, noise.t.double(), None)
    loss_vae = ((out[:, :C] - ut[:, :C]) ** 2).mean(dim=(1, 2, 3))
    loss_dino = ((out[:, C:] - ut[:, C:]) ** 2).mean(dim=(1, 2, 3))
    return (loss_vae + lam * loss_dino).mean(), xt


@pytest.mark.parametrize("dropped", [False, True])
def test_redi_feature_dropout_is_redis_formula(dropped):
    stats = FeatureStatistics(D)
    stats.update(torch.randn(64, D) * torch.linspace(0.5, 2.0, D) + 1.0)
    config = ProjectorConfig(mode="pca", feature_dim=D, dim=2, feature_dropout=0.2, feature_dropout_mode="redi")
    projector = FeatureProjector(config, stats)
    objective = JointDiffusionObjective(projector, ObjectiveConfig(image_channels=C, image_size=H),
                                        feature_grid_tokens=L)
    model = RecordingDenoiser(C + 2)
    seen = model.seen
    x, f = torch.randn(B, C, H, H), torch.randn(B, L, D)
    noise = objective.draw_noise(B, generator=torch.Generator().manual_seed(9))
    noise = noise._replace(feature_keep=torch.full((B,), not dropped))
    out = objective(model, x, f, torch.zeros(B, dtype=torch.long), noise=noise)
    # ReDi's PCA channels: ((f - mean)/std - pca_mean) @ components[:d].T on the 2x2 grid, resized bilinearly.
    z = ((f.double() - stats.mean) / stats.std) @ stats.pca().components[:2].T
    grid = F.interpolate(z.transpose(1, 2).reshape(B, 2, 2, 2), size=H, mode="bilinear", align_corners=False)
    expected, xt = _redi_training_loss(_double_model(model, C + 2), x, grid, noise, dropped)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(seen["x"].double(), xt, rtol=1e-5, atol=1e-6)
    if dropped:  # the model saw (1 - t) eps_z on the feature channels, not zeros (that is the "sample" mode)
        t = noise.t.view(-1, 1, 1, 1)
        torch.testing.assert_close(seen["x"][:, C:], (1 - t) * noise.noise_z)


def test_redi_dropout_draws_one_coin_for_the_batch_on_the_device():
    def objective(mode):
        config = ProjectorConfig(feature_dim=D, dim=2, init="orthogonal", feature_dropout=0.3,
                                 feature_dropout_mode=mode)
        return JointDiffusionObjective(FeatureProjector(config), ObjectiveConfig(image_channels=C, image_size=H))

    redi, sample = objective("redi"), objective("sample")
    gen = torch.Generator().manual_seed(10)
    draws = torch.stack([redi.draw_noise(8, generator=gen).feature_keep for _ in range(400)])   # (400, 8)
    assert bool((draws == draws[:, :1]).all())                    # every sample of a step shares the coin
    assert abs(draws[:, 0].float().mean().item() - 0.7) < 0.07    # kept with probability 1 - p
    per_sample = torch.stack([sample.draw_noise(8, generator=gen).feature_keep for _ in range(50)])
    assert not bool((per_sample == per_sample[:, :1]).all())
    # No host value is needed to draw it: it works on the meta device, where any .item() would fail.
    keep = redi.draw_noise(8, device="meta").feature_keep
    assert keep.device.type == "meta" and keep.shape == (8,) and keep.dtype == torch.bool
    # A rank's slice of the global draw carries the same coin.
    noise = redi.draw_noise(8, generator=torch.Generator().manual_seed(11))
    assert torch.equal(noise.slice(4, 8).feature_keep, noise.feature_keep[:4])
    with pytest.raises(ValueError, match="feature_dropout_mode"):
        ProjectorConfig(feature_dim=D, dim=2, feature_dropout_mode="batch")
