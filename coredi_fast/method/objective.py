"""The joint training objective of ReDi / CoReDi: one function from a batch to the loss.

    z_hat = projector(f)                                   (B, L, d): learned (CoReDi) | PCA (ReDi) | none (SiT)
    z     = resize(z_hat onto the image grid)              (B, d, H, W), keeps the gradient to W
    x_t   = t x + (1 - t) eps_x,   z_t = t z + (1 - t) eps_z          independent noise, t = 1 is data
    v     = model(cat(x_t, z_t), t, y)
    L     = mean(|v_x - (x - eps_x)|^2) + lambda_z mean(|v_z - (sg[z] - eps_z)|^2) + reg

sg (stop-gradient) is applied to the *target* only, so W learns through the network input: from how useful z_t is
for predicting the image velocity and the feature velocity. The projector decides whether the target is detached
(`ProjectorConfig.stop_gradient`, switchable to show the collapse without it).

Randomness (t, both noises, feature dropout) is drawn by `draw_noise`, which the caller may do for the *global*
batch and slice per rank: that is how a 2-process run reproduces a 1-process run exactly.

Feature dropout (for Representation Guidance), `ProjectorConfig.feature_dropout_mode`:
* "sample" (default): per sample, a dropped sample sees an all-zero feature input z_t (exactly what Representation
  Guidance feeds the model at sampling time) and contributes no feature loss. The standard classifier-free-guidance
  recipe; it matches inference.
* "redi": ReDi's `transport.training_losses`: one coin per step drops the whole batch (here the global batch, drawn
  on the device from the step's generator, so every rank agrees and nothing syncs with the host); the clean
  features are zeroed *before* noising, so the model sees z_t = (1 - t) eps_z, and the feature loss weight is 0 for
  that step (ReDi's `lam = 0`).

x-prediction (JiT): the network outputs clean data x_hat and both sides of the loss are velocities built with JiT's
clamp, v_hat = (x_hat - x_t) / max(1 - t, c) and target (x - x_t) / max(1 - t, c) (JiT's `denoiser.py`, c = t_eps =
0.05). The target equals x - eps for t <= 1 - c and shrinks to (1 - t) / c (x - eps) above.
"""
from dataclasses import dataclass
from typing import Dict, NamedTuple, Optional

import torch
import torch.nn as nn

from ..transport.losses import joint_velocity_loss
from ..transport.path import interpolate, velocity_from_x_prediction, velocity_target
from ..transport.timesteps import TIME_DISTRIBUTIONS, sample_time
from .feature_grid import check_feature_grid, tokens_to_grid
from .projector import FeatureProjector
from .regularizers import orthogonality_loss

PREDICTIONS = ("velocity", "x")


@dataclass
class ObjectiveConfig:
    """Settings of the joint loss (the projector has its own `ProjectorConfig`).

    image_channels: channels of the image stream (4 for SD-VAE latents, 3 or 1 for pixels).
    image_size: side of the image/latent grid the features are resized onto (32 for 256 px latents).
    feature_weight: lambda_z, weight of the feature loss (ReDi: 1; pixel-space models want less, see method.md).
    time_sampling: "uniform" (SiT) | "logit_normal" (JiT); time_mean / time_std parametrize the latter.
    prediction: "velocity" (SiT: the model outputs v) | "x" (JiT: the model outputs clean data, the loss is still
        on velocities, both built like JiT: v = (x_pred - x_t) / max(1 - t, x_pred_clamp) against the target
        (x - x_t) / max(1 - t, x_pred_clamp)).
    x_pred_clamp: JiT's t_eps (0.05).
    fused_embedding: compute projection + norm + statistics + resize + noise + patch embedding with the fused
        `coredi_kernels.joint_embedding` op (same numbers; Triton on GPU). Needs stop-gradient targets, velocity
        prediction, the ortho/cov/none regularizer and a model with `forward_tokens` (SiT/DiT).
    """
    image_channels: int = 4
    image_size: int = 32
    feature_weight: float = 1.0
    time_sampling: str = "uniform"
    time_mean: float = 0.0
    time_std: float = 1.0
    prediction: str = "velocity"
    x_pred_clamp: float = 0.05
    fused_embedding: bool = False

    def __post_init__(self):
        if not isinstance(self.image_channels, int) or self.image_channels < 1:
            raise ValueError(f"image_channels must be an int >= 1, got {self.image_channels!r}")
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"image_size must be an int >= 1, got {self.image_size!r}")
        if not self.feature_weight >= 0:
            raise ValueError(f"feature_weight must be >= 0, got {self.feature_weight!r}")
        if self.time_sampling not in TIME_DISTRIBUTIONS:
            raise ValueError(f"time_sampling must be one of {TIME_DISTRIBUTIONS}, got {self.time_sampling!r}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if not 0 < self.x_pred_clamp <= 1:
            raise ValueError(f"x_pred_clamp must be in (0, 1], got {self.x_pred_clamp!r}")
        if self.fused_embedding and self.prediction != "velocity":
            raise ValueError("fused_embedding needs prediction='velocity' (the fused op does not return x_t)")


class JointNoise(NamedTuple):
    """The random draws of one training step. t: (B,); noise_x: (B, C, H, W); noise_z: (B, d, H, W) or None;
    feature_keep: (B,) bool (False = feature dropout for that sample) or None; label_drop: (B,) long, 1 where the
    class label is replaced by the null class (classifier-free guidance training), or None (the model decides)."""
    t: torch.Tensor
    noise_x: torch.Tensor
    noise_z: Optional[torch.Tensor]
    feature_keep: Optional[torch.Tensor]
    label_drop: Optional[torch.Tensor] = None

    def slice(self, start: int, stop: int) -> "JointNoise":
        """Rows [start, stop): one rank's part of draws made for the global batch."""
        return JointNoise(*(None if v is None else v[start:stop] for v in self))


class ObjectiveOutput(NamedTuple):
    loss: torch.Tensor                  # scalar to backpropagate (diffusion + regularizer)
    logs: Dict[str, torch.Tensor]       # detached scalars: loss terms and projector statistics
    z: Optional[torch.Tensor]           # (B, L, d) projected features of this batch (for monitors/pictures)


class JointDiffusionObjective(nn.Module):
    """Owns the projector; `forward(model, x, features, y)` returns the training loss of one batch.

    Args:
        projector: a `FeatureProjector` (mode "none" gives the plain SiT baseline through the same code path).
        config: an `ObjectiveConfig`.
        feature_grid_tokens: L, the number of encoder tokens (checked against the image grid at construction).
    """

    def __init__(self, projector: FeatureProjector, config: ObjectiveConfig, feature_grid_tokens: Optional[int] = None):
        super().__init__()
        if not isinstance(projector, FeatureProjector):
            raise TypeError(f"projector must be a FeatureProjector, got {type(projector).__name__}")
        self.projector = projector
        self.config = config
        if projector.enabled and feature_grid_tokens is not None:
            check_feature_grid(feature_grid_tokens, config.image_size)
        if config.fused_embedding:
            pc = projector.config
            if not projector.enabled:
                raise ValueError("fused_embedding needs feature channels (projector mode 'learned' or 'pca')")
            if not pc.stop_gradient:
                raise ValueError("fused_embedding needs projector stop_gradient=True (its target is always detached)")
            if pc.feature_dropout > 0 and pc.feature_dropout_mode == "redi":
                raise ValueError("fused_embedding zeroes z_t of dropped samples (feature_dropout_mode='sample'); "
                                 "feature_dropout_mode='redi' zeroes the clean features before noising")
            if pc.regularizer == "vf":
                raise ValueError("fused_embedding supports the ortho, cov and none regularizers, not 'vf'")

    @property
    def feature_channels(self) -> int:
        return self.projector.dim

    @property
    def model_channels(self) -> int:
        """Input (= output) channels the denoiser must have: image + feature channels."""
        return self.config.image_channels + self.feature_channels

    def draw_noise(self, batch_size: int, device=None, generator: Optional[torch.Generator] = None,
                   dtype=torch.float32, label_dropout: float = 0.0) -> JointNoise:
        """Draw t, eps_x, eps_z, the feature-dropout mask and (with label_dropout > 0) the label-dropout mask for
        `batch_size` samples, all from `generator`. Drawing the label dropout here rather than inside the model
        makes a run reproducible across world sizes (the model's own dropout uses the global RNG).

        Feature dropout: one coin per sample ("sample"), or one coin for all `batch_size` samples ("redi"; drawn
        for the global batch, every rank's slice agrees). Either way the coin stays a device tensor (no host sync).
        """
        c = self.config
        t = sample_time(batch_size, c.time_sampling, mean=c.time_mean, std=c.time_std, device=device,
                        generator=generator)
        shape = (batch_size, c.image_channels, c.image_size, c.image_size)
        noise_x = torch.randn(shape, device=device, generator=generator, dtype=dtype)
        noise_z = keep = None
        if self.projector.enabled:
            shape = (batch_size, self.feature_channels, c.image_size, c.image_size)
            noise_z = torch.randn(shape, device=device, generator=generator, dtype=dtype)
            drop = self.projector.config.feature_dropout
            if drop > 0 and self.projector.config.feature_dropout_mode == "redi":
                keep = (torch.rand((), device=device, generator=generator) >= drop).repeat(batch_size)
            elif drop > 0:
                keep = torch.rand(batch_size, device=device, generator=generator) >= drop
        label_drop = None
        if label_dropout > 0:
            label_drop = (torch.rand(batch_size, device=device, generator=generator) < label_dropout).long()
        return JointNoise(t, noise_x, noise_z, keep, label_drop)

    def forward(self, model: nn.Module, x: torch.Tensor, features: Optional[torch.Tensor], y: torch.Tensor,
                noise: Optional[JointNoise] = None, generator: Optional[torch.Generator] = None) -> ObjectiveOutput:
        """One batch's loss.

        Args:
            model: the denoiser, `model(x (B, C_img + d, H, W), t (B,), y (B,))` -> same shape as its input.
            x: (B, C_img, H, W) clean image stream (scaled VAE latents, or pixels in [-1, 1]).
            features: (B, L, D) raw encoder tokens (ignored, may be None, in mode "none").
            y: (B,) class labels (label dropout for guidance happens inside the model).
            noise: the step's random draws (see `draw_noise`); drawn here from `generator` when None.
        """
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.image_channels or x.shape[-1] != c.image_size:
            raise ValueError(f"x must have shape (B, {c.image_channels}, {c.image_size}, {c.image_size}), "
                             f"got {tuple(x.shape)}")
        if noise is None:
            noise = self.draw_noise(x.shape[0], device=x.device, generator=generator)
        if self.config.fused_embedding:
            return self._forward_fused(model, x, features, y, noise)
        logs: Dict[str, torch.Tensor] = {}

        x_t = interpolate(x, noise.noise_x, noise.t)
        target = self._velocity_target(x, noise.noise_x, noise.t, x_t)
        reg_loss = None
        out = self.projector(features) if self.projector.enabled else None
        if out is not None:
            z = tokens_to_grid(out.z, c.image_size)                  # (B, d, H, W), gradient to W
            z_target = tokens_to_grid(out.target, c.image_size)      # detached unless stop_gradient is off
            keep = None if noise.feature_keep is None else noise.feature_keep.to(z.dtype).view(-1, 1, 1, 1)
            redi_dropout = self.projector.config.feature_dropout_mode == "redi"
            if keep is not None and redi_dropout:   # ReDi: zero the clean features, then noise: z_t = (1 - t) eps
                z, z_target = z * keep, z_target * keep
            z_t = interpolate(z, noise.noise_z, noise.t)
            if keep is not None and not redi_dropout:
                z_t = z_t * keep
            x_t = torch.cat([x_t, z_t.to(x_t.dtype)], dim=1)
            z_velocity = self._velocity_target(z_target, noise.noise_z, noise.t)
            target = torch.cat([target, z_velocity.to(target.dtype)], dim=1)
            reg_loss = out.reg_loss
            logs.update(out.stats)

        if noise.label_drop is not None:
            pred = model(x_t, noise.t, y, force_drop_ids=noise.label_drop)
        else:
            pred = model(x_t, noise.t, y)
        if c.prediction == "x":
            pred = velocity_from_x_prediction(pred, x_t, noise.t, clamp=c.x_pred_clamp)
        losses = joint_velocity_loss(pred, target, c.image_channels, feature_weight=c.feature_weight,
                                     feature_mask=noise.feature_keep)
        loss = losses["loss"]
        logs["loss_diffusion"] = loss.detach()
        logs["loss_image"] = losses["loss_image"]
        if out is not None:
            logs["loss_feature"] = losses["loss_feature"]
            logs["loss_reg"] = reg_loss.detach()
            loss = loss + reg_loss
        logs["loss"] = loss.detach()
        return ObjectiveOutput(loss, logs, None if out is None else out.z.detach())

    def _velocity_target(self, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                         noisy: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The regression target (B, C, H, W) for clean data and noise (B, C, H, W) at times t (B,): x - eps for a
        velocity model; JiT's (x - x_t) / max(1 - t, clamp) for an x-prediction model (x_t = `noisy` when given,
        else rebuilt from clean and noise, so a detached clean gives a detached target)."""
        if self.config.prediction != "x":
            return velocity_target(clean, noise)
        if noisy is None:
            noisy = interpolate(clean, noise, t)
        return velocity_from_x_prediction(clean, noisy, t, clamp=self.config.x_pred_clamp)

    def _forward_fused(self, model, x, features, y, noise: JointNoise) -> ObjectiveOutput:
        """The same loss with `coredi_kernels.joint_embedding` producing the transformer's input tokens."""
        from coredi_kernels import joint_embedding

        if not hasattr(model, "forward_tokens") or not hasattr(model, "x_embedder"):
            raise ValueError(f"fused_embedding needs a SiT/DiT-style model with `x_embedder` and `forward_tokens`; "
                             f"{type(model).__name__} has none")
        c, p = self.config, self.projector
        norm = p.norm
        # ReDi's PCA mode centres the standardized features again (pca_mean): fold it into the mean.
        mean = p.feature_mean + p.feature_std * p.pca_mean if p.config.mode == "pca" else p.feature_mean
        norm_args = {} if norm is None else dict(
            norm_weight=norm.weight, norm_bias=norm.bias, running_mean=norm.running_mean,
            running_var=norm.running_var, num_batches_tracked=norm.num_batches_tracked, momentum=norm.momentum,
            eps=norm.eps, training=norm.training)
        out = joint_embedding(features, p.weight, x, noise.noise_x, noise.noise_z, noise.t,
                              model.x_embedder.proj.weight, model.x_embedder.proj.bias, model.pos_embed,
                              feature_keep=noise.feature_keep, feature_mean=mean, feature_std=p.feature_std,
                              normalize=norm is not None, feature_scale=p.config.feature_scale, **norm_args)
        kwargs = {} if noise.label_drop is None else {"force_drop_ids": noise.label_drop}
        pred = model.forward_tokens(out.tokens, noise.t, y, **kwargs)
        losses = joint_velocity_loss(pred, out.target, c.image_channels, feature_weight=c.feature_weight,
                                     feature_mask=noise.feature_keep)
        logs: Dict[str, torch.Tensor] = {}
        reg_loss = out.tokens.new_zeros((), dtype=torch.float32)
        if p.training and p.config.regularizer == "ortho":
            term = orthogonality_loss(p.weight.float())
            logs["reg_ortho"] = term.detach()
            reg_loss = p.config.reg_weight * term
        elif p.training and p.config.regularizer == "cov":
            cov = out.covariance
            off_diagonal = cov - torch.diag_embed(torch.diagonal(cov))
            term = off_diagonal.pow(2).sum() / cov.shape[0]
            logs["reg_cov"] = term.detach()
            reg_loss = p.config.reg_weight * term
        n = out.count.to(out.batch_var.dtype)
        prenorm_std = torch.sqrt(out.batch_var * n / (n - 1).clamp(min=1))   # unbiased, like the PyTorch path
        logs["prenorm_std_mean"] = prenorm_std.mean()
        logs["prenorm_std_min"] = prenorm_std.min()
        loss = losses["loss"]
        logs["loss_diffusion"] = loss.detach()
        logs["loss_image"] = losses["loss_image"]
        logs["loss_feature"] = losses["loss_feature"]
        logs["loss_reg"] = reg_loss.detach()
        loss = loss + reg_loss
        logs["loss"] = loss.detach()
        return ObjectiveOutput(loss, logs, out.z_hat.detach())
