"""The joint objective: loss values against a hand-written computation, where the stop-gradient sits, feature
dropout, the no-feature baseline, and a tiny training run in which the naive variant collapses and CoReDi does not."""
import pytest
import torch
import torch.nn.functional as F

from coredi_fast.method import FeatureProjector, FeatureStatistics, ProjectorConfig, effective_rank
from coredi_fast.method.objective import JointDiffusionObjective, JointNoise, ObjectiveConfig
from coredi_fast.models import create_model

B, L, D, C, H = 3, 4, 6, 2, 4  # batch, tokens (2x2 grid), encoder dim, image channels, image side


class LinearDenoiser(torch.nn.Module):
    """A 1x1 convolution: simple enough that the expected loss can be written by hand."""

    def __init__(self, channels):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 1)

    def forward(self, x, t, y):
        return self.conv(x) * (1 + t.view(-1, 1, 1, 1))


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
    seen = {}

    class Recorder(LinearDenoiser):
        def forward(self, x, t, y):
            seen["x"] = x.detach().clone()
            return super().forward(x, t, y)

    model = Recorder(C + 2)
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
    return {"std": z.reshape(-1, dim).std(0).mean().item(), "initial_std": initial.reshape(-1, dim).std(0).mean().item(),
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
