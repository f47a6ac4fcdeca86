"""The fused joint embedding (coredi_kernels) against the real coredi_fast training path it replaces:
`FeatureProjector` + `JointDiffusionObjective` + SiT's `embed`, loss, every gradient and the BatchNorm state, on
both backends; and `JointEmbedding` loading a `FeatureProjector` state dict.

Kept apart from test_kernel_joint_embedding.py (the op against float64 math), which imports nothing from
coredi_fast so that it also runs where only coredi-kernels is installed.
"""
import copy

import pytest
import torch

from coredi_kernels.joint_embedding import JointEmbedding, joint_embedding
from test_kernel_joint_embedding import assert_close, backend  # noqa: F401 (backend: the fixture, both backends)


def _coredi_setup(mode):
    from coredi_fast.method import FeatureProjector, FeatureStatistics, ProjectorConfig
    from coredi_fast.method.objective import JointDiffusionObjective, ObjectiveConfig
    from coredi_fast.models.sit import SiT

    torch.manual_seed(0)
    B, L, D, d, C, H = 4, 4, 20, 3, 4, 4
    features = torch.randn(B, L, D) * 2 + 1
    stats = FeatureStatistics(D).update(torch.randn(64, D) * 2 + 1)
    if mode == "learned":
        config = ProjectorConfig(feature_dim=D, dim=d, init="orthogonal", regularizer="cov", reg_weight=0.7,
                                 norm_affine=True, feature_scale=1.5, feature_dropout=0.5)  # fmt: skip
    else:
        config = ProjectorConfig(mode="pca", feature_dim=D, dim=d, feature_scale=0.8, feature_dropout=0.5)
    projector = FeatureProjector(config, stats)
    if projector.norm is not None:
        with torch.no_grad():
            projector.norm.weight.uniform_(0.5, 1.5)
            projector.norm.bias.uniform_(-0.5, 0.5)
    objective = JointDiffusionObjective(projector, ObjectiveConfig(image_channels=C, image_size=H, feature_weight=0.6),
                                        feature_grid_tokens=L)  # fmt: skip
    model = SiT(input_size=H, patch_size=2, in_channels=C + d, hidden_size=24, depth=1, num_heads=2, num_classes=10,
                class_dropout_prob=0.0)  # fmt: skip
    with torch.no_grad():  # non-zero output layers, so every parameter gets a gradient
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 0.2)
    x, y = torch.randn(B, C, H, H), torch.randint(0, 10, (B,))
    noise = objective.draw_noise(B, generator=torch.Generator().manual_seed(3))
    assert noise.feature_keep is not None and not noise.feature_keep.all() and noise.feature_keep.any()
    return objective, model, x, features, y, noise


def _fused_loss(objective, model, x, features, y, noise):
    """What JointDiffusionObjective would compute with the fused op (the integration this issue proposes)."""
    from coredi_fast.transport.losses import joint_velocity_loss

    projector, c = objective.projector, objective.config
    norm = projector.norm
    feature_mean = projector.feature_mean
    if projector.config.mode == "pca":  # ((f − μ)/σ − pca_mean) = (f − (μ + σ·pca_mean))/σ
        feature_mean = projector.feature_mean + projector.feature_std * projector.pca_mean
    norm_args = {}
    if norm is not None:
        norm_args = dict(norm_weight=norm.weight, norm_bias=norm.bias, running_mean=norm.running_mean,
                         running_var=norm.running_var, num_batches_tracked=norm.num_batches_tracked,
                         momentum=norm.momentum, eps=norm.eps, training=norm.training)  # fmt: skip
    out = joint_embedding(
        features, projector.weight, x, noise.noise_x, noise.noise_z, noise.t, model.x_embedder.proj.weight,
        model.x_embedder.proj.bias, model.pos_embed, feature_keep=noise.feature_keep, feature_mean=feature_mean,
        feature_std=projector.feature_std, normalize=norm is not None, feature_scale=projector.config.feature_scale,
        **norm_args,
    )  # fmt: skip
    pred = model.forward_tokens(out.tokens, noise.t, y)
    loss = joint_velocity_loss(pred, out.target, c.image_channels, feature_weight=c.feature_weight,
                               feature_mask=noise.feature_keep)["loss"]  # fmt: skip
    if projector.config.regularizer == "cov":
        off_diagonal = out.covariance - torch.diag(torch.diagonal(out.covariance))
        loss = loss + projector.config.reg_weight * off_diagonal.pow(2).sum() / out.covariance.shape[0]
    return loss, out


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("mode", ["learned", "pca"])
def test_matches_the_coredi_fast_objective(mode):
    """Loss, every parameter gradient (SiT + projector) and the BatchNorm state after one step: the fused op fed
    into `model.forward_tokens` equals `JointDiffusionObjective` with `FeatureProjector` and `model.embed`."""
    objective, model, x, features, y, noise = _coredi_setup(mode)
    fused_objective, fused_model = copy.deepcopy(objective), copy.deepcopy(model)

    reference_out = objective(model, x, features, y, noise=noise)
    expected = reference_out.loss
    loss, out = _fused_loss(fused_objective, fused_model, x, features, y, noise)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert_close(out.z_hat, reference_out.z, 2e-5, "z_hat")

    params = dict(objective.named_parameters(), **{f"model.{k}": v for k, v in model.named_parameters()})
    fused_params = dict(fused_objective.named_parameters(),
                        **{f"model.{k}": v for k, v in fused_model.named_parameters()})  # fmt: skip
    trainable = [k for k, v in params.items() if v.requires_grad]
    want = torch.autograd.grad(expected, [params[k] for k in trainable])
    got = torch.autograd.grad(loss, [fused_params[k] for k in trainable])
    assert ("projector.weight" in trainable) == (mode == "learned")
    for name, g, w in zip(trainable, got, want, strict=True):
        assert_close(g, w, 2e-5, f"d{name}")
    for (name, buf), (_, fused_buf) in zip(objective.named_buffers(), fused_objective.named_buffers(), strict=True):
        torch.testing.assert_close(fused_buf, buf, rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def test_module_takes_over_a_feature_projector_state_dict():
    from coredi_fast.method import FeatureProjector, ProjectorConfig

    projector = FeatureProjector(ProjectorConfig(feature_dim=20, dim=3, init="orthogonal", norm_affine=True))
    with torch.no_grad():
        projector.norm.running_mean.normal_()
        projector.feature_std.uniform_(0.5, 2.0)
    module = JointEmbedding(20, 3, affine=True)
    missing, _ = module.load_state_dict(projector.state_dict(), strict=False)
    assert missing == []
    for name, value in module.state_dict().items():
        assert torch.equal(value, projector.state_dict()[name]), name


