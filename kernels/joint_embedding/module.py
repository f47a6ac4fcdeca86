"""Drop-in module: CoReDi's feature projection (W, BatchNorm, standardization) fused with a host model's patch
embedding."""
import math
from typing import Optional

import torch
from torch import Tensor, nn

from .op import JointEmbeddingOutput, joint_embedding


def patch_conv(patch_embed: nn.Module) -> nn.Conv2d:
    """The strided Conv2d of a patch embedding: the module itself or its `.proj` (timm / DiT / SiT PatchEmbed)."""
    conv = patch_embed if isinstance(patch_embed, nn.Conv2d) else getattr(patch_embed, "proj", None)
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"patch_embed must be an nn.Conv2d or have one as `.proj`, got {type(patch_embed).__name__}")
    p = conv.kernel_size[0]
    if (
        conv.kernel_size != (p, p) or conv.stride != (p, p) or conv.padding not in ((0, 0), "valid")
        or conv.dilation != (1, 1) or conv.groups != 1
    ):  # fmt: skip
        raise ValueError(
            f"patch_embed must be a square patchify Conv2d (kernel = stride, no padding, dilation 1, groups 1), "
            f"got kernel {conv.kernel_size}, stride {conv.stride}, padding {conv.padding}"
        )
    return conv


class JointEmbedding(nn.Module):
    """z_hat = s·BatchNorm(((f − mean)/std)·W) fused with the host's patch embedding of cat(x_t, z_t).

    Owns the projection state under the names coredi_fast's `FeatureProjector` uses, so
    `load_state_dict(projector.state_dict(), strict=False)` takes it over: `weight` (D, d) (a Parameter, or a buffer
    with learnable=False: ReDi's fixed PCA), `norm` (nn.BatchNorm1d, or None with normalize=False), `feature_mean`,
    `feature_std` (D,) buffers (dataset standardization; ReDi's PCA centring must be folded in by hand as
    feature_mean + feature_std·pca_mean). The patch embedding stays the host model's.

    forward(features (B, L, D), x (B, C, H, W), noise_x (B, C, H, W), noise_z (B, d, H, W), t (B,), patch_embed,
    pos_embed=None, feature_keep=None, out_dtype=None) -> `JointEmbeddingOutput` (tokens (B, T, hidden), target,
    z_hat, statistics). patch_embed: an nn.Conv2d with kernel = stride = p, or a PatchEmbed holding one as `.proj`;
    pos_embed: (1, T, hidden). The BatchNorm follows this module's train/eval mode; `sync_stats` (None: automatic)
    spans the statistics over the default process group.
    """

    def __init__(
        self,
        feature_dim: int,
        dim: int,
        *,
        normalize: bool = True,
        affine: bool = False,
        momentum: Optional[float] = 0.1,
        eps: float = 1e-5,
        feature_scale: float = 1.0,
        learnable: bool = True,
    ):
        super().__init__()
        for name, value in (("feature_dim", feature_dim), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"JointEmbedding: {name} must be a positive int, got {value!r}")
        if dim > feature_dim:
            raise ValueError(f"JointEmbedding: dim={dim} must be <= feature_dim={feature_dim}")
        if not (isinstance(feature_scale, (int, float)) and math.isfinite(feature_scale) and feature_scale > 0):
            raise ValueError(f"JointEmbedding: feature_scale must be a finite number > 0, got {feature_scale!r}")
        self.feature_dim, self.dim = feature_dim, dim
        self.feature_scale = float(feature_scale)
        self.sync_stats: Optional[bool] = None
        if learnable:
            self.weight = nn.Parameter(torch.empty(feature_dim, dim))
        else:
            self.register_buffer("weight", torch.empty(feature_dim, dim))
        self.norm = nn.BatchNorm1d(dim, eps=eps, momentum=momentum, affine=affine) if normalize else None
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """W with orthonormal columns; the norm reset."""
        nn.init.orthogonal_(self.weight)
        if self.norm is not None:
            self.norm.reset_parameters()

    def forward(
        self, features: Tensor, x: Tensor, noise_x: Tensor, noise_z: Tensor, t: Tensor, patch_embed: nn.Module,
        pos_embed: Optional[Tensor] = None, feature_keep: Optional[Tensor] = None,
        out_dtype: Optional[torch.dtype] = None,
    ) -> JointEmbeddingOutput:
        conv = patch_conv(patch_embed)
        norm = self.norm
        norm_args = {}
        if norm is not None:
            norm_args = dict(
                norm_weight=norm.weight, norm_bias=norm.bias, running_mean=norm.running_mean,
                running_var=norm.running_var, num_batches_tracked=norm.num_batches_tracked, momentum=norm.momentum,
                eps=norm.eps, training=norm.training,
            )  # fmt: skip
        return joint_embedding(
            features, self.weight, x, noise_x, noise_z, t, conv.weight, conv.bias, pos_embed,
            feature_keep=feature_keep, feature_mean=self.feature_mean, feature_std=self.feature_std,
            normalize=norm is not None, feature_scale=self.feature_scale, sync_stats=self.sync_stats,
            out_dtype=out_dtype, **norm_args,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (f"feature_dim={self.feature_dim}, dim={self.dim}, normalize={self.norm is not None}, "
                f"feature_scale={self.feature_scale}, learnable={isinstance(self.weight, nn.Parameter)}")
