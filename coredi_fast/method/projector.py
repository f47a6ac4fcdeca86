"""The feature projector: raw encoder tokens (B, L, D) -> the d feature channels the diffusion model denoises.

One module, three modes (DESIGN §2.2, method.md §1.3 and §2.2), with f~ = (f - mean) / std the encoder tokens
standardized per channel with dataset statistics (`FeatureStatistics`) and s = `feature_scale`:

* ``learned`` (CoReDi): z_hat = s * Norm(f~ W), W: (D, d) bias-free, learned jointly with the diffusion model.
  Norm is a BatchNorm over all B*L tokens (affine off by default, running statistics kept), which closes the
  scale-collapse path (W -> 0); a regularizer (ortho | cov | vf) guards against dimensional collapse.
* ``pca`` (ReDi): z_hat = s * (f~ - pca_mean) P, P = the top-d PCA components, fixed (a buffer, no gradient); no
  whitening and, by default, no norm (norm="batchnorm" here is the "ReDi with unit-variance channels" ablation).
* ``none`` (plain SiT): no feature channels; `projector.dim == 0` and `forward` returns None.

How the objective uses it::

    out = projector(features)                      # features: raw DINOv2 patch tokens (B, L, D), no grad
    z = tokens_to_grid(out.z, latent_size)          # (B, d, H, W), carries the gradient to W (learned mode)
    target = tokens_to_grid(out.target, latent_size)
    z_t = t * z + (1 - t) * eps_z                   # network input: W learns through it
    v_target_z = target - eps_z                     # detached when config.stop_gradient (sg[z_hat] - eps_z)
    loss = L_diff + out.reg_loss                    # reg_loss already includes reg_weight
    optimizer = AdamW(model_groups + projector.param_groups(lr, weight_decay))

In ``none`` mode the objective builds the model with in_channels = image channels, skips the encoder, the feature
noise and the feature loss term, and adds no projector parameters to the optimizer.

The projector runs in float32 even under autocast: it costs < 0.1% of a training step, and the BatchNorm statistics
and regularizers are sensitive to bf16 rounding. W is not needed at inference (only image channels are decoded).
"""
import contextlib
import math
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional

import torch
import torch.nn as nn

from .cross_rank import TokenBatchNorm
from .monitors import channel_std, effective_rank, subspace_angles
from .regularizers import covariance_loss, orthogonality_loss, vf_loss
from .statistics import FeatureStatistics

MODES = ("learned", "pca", "none")
INITS = ("pca", "orthogonal", "random")
NORMS = ("batchnorm", "none")
REGULARIZERS = ("ortho", "cov", "vf", "none")
FEATURE_DROPOUT_MODES = ("sample", "redi")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_float(name: str, value, low: float, high: float = math.inf, low_open: bool = False,
                 high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")


@dataclass
class ProjectorConfig:
    """Settings of the feature projector. Validated at construction; errors name the field.

    Fields left at None take the mode's default in `__post_init__` (norm, regularizer) or in `FeatureProjector`
    (init, which depends on whether statistics are given). The defaults below are provisional: the CPU quality study
    (a later issue) picks them from evidence.

    mode: "learned" (CoReDi) | "pca" (ReDi, fixed PCA) | "none" (plain SiT, no feature channels).
    feature_dim: D, encoder channels (768 for DINOv2-B).
    dim: d, projected channels (8 as in ReDi); must be <= feature_dim.
    init: W's initialization in learned mode: "pca" (top-d principal directions: training starts as ReDi, needs
        statistics) | "orthogonal" (random orthonormal columns) | "random" (N(0, 1/D)). None: "pca" when statistics
        are given, else "orthogonal". In pca mode only None/"pca" are accepted; in none mode only None.
    norm: "batchnorm" (over all B*L tokens) | "none". None: batchnorm for learned, none for pca (ReDi).
    norm_affine, norm_momentum, norm_eps: the BatchNorm's settings (affine off so the scale cannot drift back
        toward collapse).
    feature_scale: constant gain after the norm. BatchNorm gives channels of std 1 where ReDi's PCA channels have
        std 3.6-5.8; a larger gain restores a higher feature SNR (semantics denoised earlier).
    stop_gradient: detach the regression target (CoReDi). False is the ablation that collapses.
    regularizer: "ortho" | "cov" | "vf" | "none" against dimensional collapse. None: cov for learned, none
        otherwise (a fixed projection has nothing to regularize). cov is the default from the CPU study
        (docs/study: best of the four regularizers on 3/3 seeds, full effective rank, least drift from PCA).
    reg_weight: weight of the regularizer in the total loss.
    vf_margin_cos, vf_margin_dist: VA-VAE's margins m1, m2 of the vf regularizer.
    lr_scale: W's learning rate is base_lr * lr_scale (see `FeatureProjector.param_groups`).
    feature_dropout: probability that the objective drops the feature channels for Representation Guidance
        (carried and validated here, applied by the objective).
    feature_dropout_mode: "sample" (default: each sample drops on its own; a dropped sample sees z_t = 0 and has no
        feature loss) | "redi" (ReDi's recipe: the whole batch drops once per step, its clean features are zeroed
        before noising, so z_t = (1 - t) eps, and the feature loss weight is 0 that step). See `objective.py`.
    """
    mode: str = "learned"
    feature_dim: int = 768
    dim: int = 8
    init: Optional[str] = None
    norm: Optional[str] = None
    norm_affine: bool = False
    norm_momentum: float = 0.1
    norm_eps: float = 1e-5
    feature_scale: float = 1.0
    stop_gradient: bool = True
    regularizer: Optional[str] = None
    reg_weight: float = 1.0
    vf_margin_cos: float = 0.5
    vf_margin_dist: float = 0.25
    lr_scale: float = 1.0
    feature_dropout: float = 0.0
    feature_dropout_mode: str = "sample"

    def __post_init__(self):
        _check_choice("mode", self.mode, MODES)
        _check_int("feature_dim", self.feature_dim, 1)
        _check_int("dim", self.dim, 1)
        if self.mode != "none" and self.dim > self.feature_dim:
            raise ValueError(f"dim={self.dim} must be <= feature_dim={self.feature_dim} (a projection cannot add "
                             f"channels)")
        if self.norm is None:
            self.norm = "batchnorm" if self.mode == "learned" else "none"
        if self.regularizer is None:
            self.regularizer = "cov" if self.mode == "learned" else "none"
        _check_choice("norm", self.norm, NORMS)
        _check_choice("regularizer", self.regularizer, REGULARIZERS)
        _check_choice("feature_dropout_mode", self.feature_dropout_mode, FEATURE_DROPOUT_MODES)
        if self.init is not None:
            _check_choice("init", self.init, INITS)
        for name in ("norm_affine", "stop_gradient"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        _check_float("norm_momentum", self.norm_momentum, 0.0, 1.0, low_open=True)
        _check_float("norm_eps", self.norm_eps, 0.0, low_open=True)
        _check_float("feature_scale", self.feature_scale, 0.0, low_open=True)
        _check_float("reg_weight", self.reg_weight, 0.0)
        _check_float("vf_margin_cos", self.vf_margin_cos, 0.0, 2.0)
        _check_float("vf_margin_dist", self.vf_margin_dist, 0.0, 2.0)
        _check_float("lr_scale", self.lr_scale, 0.0)
        _check_float("feature_dropout", self.feature_dropout, 0.0, 1.0, high_open=True)

        if self.mode != "learned" and self.regularizer != "none":
            raise ValueError(f"regularizer={self.regularizer!r} needs mode='learned': with mode={self.mode!r} there "
                             f"is no learned projection to regularize")
        if self.mode == "pca" and self.init not in (None, "pca"):
            raise ValueError(f"init={self.init!r} conflicts with mode='pca' (the projection is the fixed PCA basis)")
        if self.mode == "none":
            if self.init is not None:
                raise ValueError(f"init={self.init!r} has no effect with mode='none' (no feature channels)")
            if self.norm != "none":
                raise ValueError(f"norm={self.norm!r} has no effect with mode='none' (no feature channels)")
            if self.feature_dropout != 0.0:
                raise ValueError(f"feature_dropout={self.feature_dropout} needs feature channels, but mode='none'")

    @property
    def channels(self) -> int:
        """Feature channels added to the model input: d, or 0 in mode 'none'."""
        return 0 if self.mode == "none" else self.dim


class ProjectorOutput(NamedTuple):
    """What `FeatureProjector.forward` returns.

    z: (B, L, d) projected features for the network input (carries gradient to W in learned mode).
    target: (B, L, d) regression target: z.detach() with stop_gradient, else z itself.
    reg_loss: scalar, the regularizer already multiplied by reg_weight (0 without one).
    stats: detached scalar tensors for logging (no host sync here; call .item() when logging):
        "prenorm_std_mean"/"prenorm_std_min" (per-channel std of f~ W over tokens; -> 0 is scale collapse), and
        each unweighted regularizer term ("reg_ortho" | "reg_cov" | "reg_vf_cos" + "reg_vf_dist").
    """
    z: torch.Tensor
    target: torch.Tensor
    reg_loss: torch.Tensor
    stats: Dict[str, torch.Tensor]


class FeatureProjector(nn.Module):
    """CoReDi's learned projection (or ReDi's fixed PCA) of encoder tokens, with its normalization and regularizer.

    Args:
        config: a `ProjectorConfig`.
        statistics: dataset `FeatureStatistics` of the raw encoder tokens (mean/std for standardization, PCA for
            mode "pca" and init "pca"), computed, or ReDi's published file (`load_redi_pca`: then the projection is
            ReDi's own, including its nonzero pca_mean). Without them the standardization is the identity (mean 0,
            std 1) and `has_statistics` is False; they can be set later with `set_statistics` (or arrive with a state
            dict).

    Buffers: feature_mean, feature_std, pca_mean (D,); pca_components (d, D); has_statistics (bool). Parameters
    (learned mode): weight W (D, d), laid out so that tokens @ W projects (the transpose of nn.Linear's layout);
    `norm` (BatchNorm1d(d)) when norm="batchnorm"; `up_projection` U (Linear d -> D, bias-free like VA-VAE's
    reverse projection) when regularizer="vf". In pca mode `weight` is a buffer equal to pca_components.T.
    """

    def __init__(self, config: ProjectorConfig, statistics: Optional[FeatureStatistics] = None):
        super().__init__()
        if not isinstance(config, ProjectorConfig):
            raise TypeError(f"config must be a ProjectorConfig, got {type(config).__name__}")
        self.config = config
        self.init_method: Optional[str] = None
        self.norm: Optional[TokenBatchNorm] = None
        self.up_projection: Optional[nn.Linear] = None
        if config.mode == "none":
            return
        if statistics is not None:
            if not isinstance(statistics, FeatureStatistics):
                raise TypeError(f"statistics must be a FeatureStatistics, got {type(statistics).__name__}")
            if statistics.feature_dim != config.feature_dim:
                raise ValueError(f"statistics has feature_dim={statistics.feature_dim} but config.feature_dim="
                                 f"{config.feature_dim}")
        if config.mode == "pca":
            if statistics is None:
                raise ValueError("mode='pca' (ReDi) needs `statistics` to take the PCA basis from")
            self.init_method = "pca"
        else:
            init = config.init or ("pca" if statistics is not None else "orthogonal")
            if init == "pca" and statistics is None:
                raise ValueError("init='pca' needs `statistics` (FeatureStatistics of the encoder tokens); "
                                 "use init='orthogonal' or 'random' without them")
            self.init_method = init

        dim, feature_dim = config.dim, config.feature_dim
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))
        self.register_buffer("pca_mean", torch.zeros(feature_dim))
        self.register_buffer("pca_components", torch.zeros(dim, feature_dim))
        self.register_buffer("has_statistics", torch.tensor(False))
        if config.mode == "learned":
            self.weight = nn.Parameter(torch.empty(feature_dim, dim))
        else:
            self.register_buffer("weight", torch.zeros(feature_dim, dim))
        if config.norm == "batchnorm":
            # A BatchNorm1d whose batch statistics span all ranks (same numbers and state dict in one process).
            self.norm = TokenBatchNorm(dim, eps=config.norm_eps, momentum=config.norm_momentum,
                                       affine=config.norm_affine)
        if config.regularizer == "vf":
            self.up_projection = nn.Linear(dim, feature_dim, bias=False)
        if statistics is not None:
            self.set_statistics(statistics)
        self.reset_parameters()

    # ------------------------------------------------------------------ setup

    @property
    def dim(self) -> int:
        """Feature channels this projector produces (0 in mode 'none')."""
        return self.config.channels

    @property
    def enabled(self) -> bool:
        return self.config.mode != "none"

    @torch.no_grad()
    def set_statistics(self, statistics: FeatureStatistics) -> None:
        """Copy standardization and PCA from `statistics` into the buffers (W itself is left alone in learned mode;
        call `reset_parameters` to re-initialize it from the new PCA)."""
        if not self.enabled:
            raise ValueError("mode='none' has no feature channels: statistics are not used")
        if statistics.feature_dim != self.config.feature_dim:
            raise ValueError(f"statistics has feature_dim={statistics.feature_dim} but config.feature_dim="
                             f"{self.config.feature_dim}")
        components = statistics.pca().components
        if components.shape[0] < self.config.dim:
            raise ValueError(f"the statistics hold {components.shape[0]} principal components, fewer than the "
                             f"projector's dim={self.config.dim}")
        device = self.feature_mean.device
        self.feature_mean.copy_(statistics.mean.to(device))
        self.feature_std.copy_(statistics.std.to(device))
        self.pca_mean.copy_(statistics.standardized_mean.to(device))
        self.pca_components.copy_(components[: self.config.dim].to(device))
        self.has_statistics.fill_(True)
        if self.config.mode == "pca":
            self.weight.copy_(self.pca_components.T)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re-)initialize W per `init_method`, the BatchNorm and the VF up-projection."""
        if not self.enabled:
            return
        if self.config.mode == "pca":
            self.weight.copy_(self.pca_components.T)
        elif self.init_method == "pca":
            if not bool(self.has_statistics):
                raise ValueError("init='pca' needs statistics: call set_statistics first")
            self.weight.copy_(self.pca_components.T)
        elif self.init_method == "orthogonal":
            nn.init.orthogonal_(self.weight)  # (D, d), D >= d: orthonormal columns
        else:
            nn.init.normal_(self.weight, mean=0.0, std=1.0 / math.sqrt(self.config.feature_dim))
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.up_projection is not None:
            self.up_projection.reset_parameters()

    def param_groups(self, base_lr: float, weight_decay: float = 0.0) -> List[dict]:
        """Optimizer parameter groups covering every trainable parameter of the projector exactly once.

        W gets lr = base_lr * lr_scale; U's weight gets base_lr; BatchNorm affine parameters get base_lr without
        weight decay. Each group carries a "name" key for logging. Empty in modes without parameters.
        """
        _check_float("base_lr", base_lr, 0.0)
        _check_float("weight_decay", weight_decay, 0.0)
        groups = []
        if self.config.mode == "learned" and self.weight.requires_grad:
            groups.append({"params": [self.weight], "lr": base_lr * self.config.lr_scale,
                           "weight_decay": weight_decay, "name": "projector.weight"})
        if self.up_projection is not None:
            groups.append({"params": list(self.up_projection.parameters()), "lr": base_lr,
                           "weight_decay": weight_decay, "name": "projector.up_projection"})
        if self.norm is not None and self.config.norm_affine:
            groups.append({"params": list(self.norm.parameters()), "lr": base_lr, "weight_decay": 0.0,
                           "name": "projector.norm"})
        return groups

    # ------------------------------------------------------------------ forward

    def forward(self, features: torch.Tensor) -> Optional[ProjectorOutput]:
        """features: (B, L, D) raw encoder tokens (standardized inside). Returns a `ProjectorOutput`, or None in mode
        'none'. In training mode the BatchNorm uses the batch statistics over all B*L tokens and updates its running
        statistics; in eval mode it uses the running statistics."""
        if not self.enabled:
            return None
        config = self.config
        if not isinstance(features, torch.Tensor) or features.ndim != 3 or features.shape[-1] != config.feature_dim:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"features must have shape (B, L, {config.feature_dim}), got {shape}")
        with _autocast_off(features.device.type):
            standardized = (features.float() - self.feature_mean.float()) / self.feature_std.float()
            if config.mode == "pca":
                standardized = standardized - self.pca_mean.float()
            projected = standardized @ self.weight.float()                             # (B, L, d)
            normalized = self._normalize(projected)
            z = normalized * config.feature_scale if config.feature_scale != 1.0 else normalized
            if self.training:
                reg_loss, stats = self._regularize(normalized, standardized)
            else:  # the regularizer is a training loss; in eval (monitors, pictures) skip it and its collectives
                reg_loss, stats = normalized.new_zeros(()), {}
            prenorm_std = projected.detach().reshape(-1, config.dim).std(dim=0)
            stats["prenorm_std_mean"] = prenorm_std.mean()
            stats["prenorm_std_min"] = prenorm_std.min()
        target = z.detach() if config.stop_gradient else z
        return ProjectorOutput(z, target, reg_loss, stats)

    def _normalize(self, projected: torch.Tensor) -> torch.Tensor:
        if self.norm is None:
            return projected
        # BatchNorm1d on (N, d) normalizes each channel over all N = B*L tokens.
        return self.norm(projected.reshape(-1, self.config.dim)).reshape(projected.shape)

    def _regularize(self, normalized: torch.Tensor, standardized: torch.Tensor):
        """Regularizer on the normalized projection (before feature_scale, so reg_weight does not depend on it)."""
        config = self.config
        if config.regularizer == "ortho":
            terms = {"reg_ortho": orthogonality_loss(self.weight.float())}
        elif config.regularizer == "cov":
            terms = {"reg_cov": covariance_loss(normalized)}
        elif config.regularizer == "vf":
            # The target is the standardized tokens, not VA-VAE's raw ones: U z_hat has zero mean per channel
            # (BatchNorm, no bias), so it could never match the large common offset of raw DINOv2 tokens.
            cos, dist = vf_loss(self.up_projection(normalized), standardized, config.vf_margin_cos,
                                config.vf_margin_dist)
            terms = {"reg_vf_cos": cos, "reg_vf_dist": dist}
        else:
            return normalized.new_zeros(()), {}
        reg_loss = config.reg_weight * sum(terms.values())
        return reg_loss, {name: value.detach() for name, value in terms.items()}

    # ------------------------------------------------------------------ monitoring

    @torch.no_grad()
    def diagnostics(self, z: Optional[torch.Tensor] = None) -> Dict[str, float]:
        """Collapse monitors as Python floats (host sync: call at logging intervals, not every step).

        Always: W's singular values (min/max) and ||W^T W - I||_F^2. With statistics: principal angles (degrees)
        between span(W) and the top-d PCA basis (max/mean). With z (..., d), e.g. `out.z`: the effective rank of
        Cov(z) and its per-channel std (min/max).
        """
        if not self.enabled:
            return {}
        weight = self.weight.detach().to(torch.float64)
        if not bool(torch.isfinite(weight).all()):  # a diverged W: report it as such, the SVD would raise
            names = ["weight_sv_max", "weight_sv_min", "ortho_error"]
            names += ["pca_angle_max_deg", "pca_angle_mean_deg"] if bool(self.has_statistics) else []
            names += ["effective_rank", "z_std_min", "z_std_max"] if z is not None else []
            return dict.fromkeys(names, float("nan"))
        singular_values = torch.linalg.svdvals(weight)
        result = {"weight_sv_max": float(singular_values.max()), "weight_sv_min": float(singular_values.min()),
                  "ortho_error": float(orthogonality_loss(weight))}
        if bool(self.has_statistics):
            angles = subspace_angles(weight, self.pca_components.T)
            result["pca_angle_max_deg"] = float(angles.max())
            result["pca_angle_mean_deg"] = float(angles.mean())
        if z is not None:
            stds = channel_std(z)
            result["effective_rank"] = effective_rank(z)
            result["z_std_min"] = float(stds.min())
            result["z_std_max"] = float(stds.max())
        return result

    def extra_repr(self) -> str:
        c = self.config
        if not self.enabled:
            return "mode=none"
        return (f"mode={c.mode}, feature_dim={c.feature_dim}, dim={c.dim}, init={self.init_method}, norm={c.norm}, "
                f"feature_scale={c.feature_scale}, stop_gradient={c.stop_gradient}, regularizer={c.regularizer}, "
                f"reg_weight={c.reg_weight}")


def _autocast_off(device_type: str):
    """Disable autocast for the projector's float32 math (no-op context on devices without autocast)."""
    if device_type in ("cuda", "cpu"):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()
