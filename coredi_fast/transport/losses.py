"""The joint image + feature velocity loss of ReDi / CoReDi.

The model sees and predicts image channels first, then feature channels: (B, C_img + d, ...). Each modality is
averaged over its *own* elements per sample, then weighted and summed, exactly like ReDi's

    loss = mean_flat((v[:, :4] - u[:, :4])**2) + lambda_z * mean_flat((v[:, 4:] - u[:, 4:])**2)

so the feature term does not shrink or grow with the ratio of feature to image elements.

Stop-gradient. This function does not detach `target`: the CoReDi objective passes a target built from the
*detached* projected features (sg[z_hat] - eps_z), so the learned projection W receives gradient only through the
network input. Passing a non-detached target is how the "stop-gradient off" ablation (which collapses) is run.
"""
from typing import Dict, Optional

import torch


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every non-batch dimension: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def _check_per_sample(name: str, value: Optional[torch.Tensor], batch_size: int) -> None:
    if value is None:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape (B,), got {type(value).__name__}")
    if value.shape != (batch_size,):
        raise ValueError(f"{name} must have shape (B,) = ({batch_size},), got {tuple(value.shape)}")


def joint_velocity_loss(pred: torch.Tensor, target: torch.Tensor, image_channels: int, feature_weight: float = 1.0,
                        feature_mask: Optional[torch.Tensor] = None,
                        sample_weight: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Per-modality mean squared velocity error.

    Args:
        pred: (B, C, ...) model output; channels [:image_channels] are the image, the rest the features.
        target: (B, C, ...) velocity target x1 - x0 (feature part built from detached features, see module doc).
        image_channels: number of leading image channels. When C == image_channels (no-feature mode, plain SiT)
            the feature term is 0.
        feature_weight: lambda_z, the weight of the feature term (ReDi: 1).
        feature_mask: optional (B,) bool/float; 0 drops the feature term of that sample (feature dropout).
        sample_weight: optional (B,) weight of each sample's total loss.

    Returns a dict of scalars:
        loss: mean_b[ w_b * (image_b + lambda_z * m_b * feature_b) ], the value to backpropagate.
        loss_image: mean_b image_b (detached, for logging).
        loss_feature: mean of feature_b over the samples whose mask is on (detached; 0 when none is on).
        loss_per_sample: (B,) w_b * (image_b + lambda_z * m_b * feature_b), detached (e.g. for loss-vs-t logging).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    if pred.ndim < 2:
        raise ValueError(f"pred must have shape (B, C, ...), got {tuple(pred.shape)}")
    channels = pred.shape[1]
    if not isinstance(image_channels, int) or not 1 <= image_channels <= channels:
        raise ValueError(f"image_channels must be an int in [1, {channels}] (the channels of pred), "
                         f"got {image_channels!r}")
    batch_size = pred.shape[0]
    _check_per_sample("feature_mask", feature_mask, batch_size)
    _check_per_sample("sample_weight", sample_weight, batch_size)

    # bf16 outputs under autocast: accumulate the error in at least float32
    compute_dtype = torch.promote_types(pred.dtype, torch.float32)
    squared_error = (pred.to(compute_dtype) - target.to(compute_dtype)) ** 2
    image_per_sample = _mean_flat(squared_error[:, :image_channels])
    if channels > image_channels:
        feature_per_sample = _mean_flat(squared_error[:, image_channels:])
    else:
        feature_per_sample = torch.zeros_like(image_per_sample)

    if feature_mask is None:
        mask = torch.ones_like(image_per_sample)
    else:
        mask = feature_mask.to(device=image_per_sample.device, dtype=image_per_sample.dtype)
    per_sample = image_per_sample + feature_weight * mask * feature_per_sample
    if sample_weight is not None:
        per_sample = per_sample * sample_weight.to(device=per_sample.device, dtype=per_sample.dtype)

    with torch.no_grad():
        # torch.where instead of `if kept > 0` avoids a host sync every step
        kept = mask.sum()
        loss_feature = torch.where(kept > 0, (mask * feature_per_sample).sum() / kept, torch.zeros_like(kept))
    return {
        "loss": per_sample.mean(),
        "loss_image": image_per_sample.detach().mean(),
        "loss_feature": loss_feature,
        "loss_per_sample": per_sample.detach(),
    }
