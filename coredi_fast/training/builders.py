"""Build a run's parts from its `TrainConfig`: the data set, the frozen encoder, the feature statistics, the
projector + objective and the denoiser. Every mismatch between parts (channels, grids, dimensions) is caught here,
before training starts, with a message naming the config field to change."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..method import FeatureProjector, FeatureStatistics, JointDiffusionObjective, check_feature_grid
from ..models import create_model
from .config import TrainConfig

logger = logging.getLogger(__name__)


def build_dataset(cfg: TrainConfig):
    d = cfg.data
    if d.source == "digits":
        from ..data import DigitsDataset

        return DigitsDataset(image_size=d.image_size, channels=d.channels, split="train")
    path = Path(d.path)
    if not path.exists():
        raise FileNotFoundError(f"data.path does not exist: {path}")
    if d.source == "shards":
        from ..data import ShardedImageDataset

        return ShardedImageDataset(path)
    from ..data import RepaFolderDataset

    return RepaFolderDataset(path)


def pixel_patch(cfg: TrainConfig) -> int:
    """JiT models diffuse patchified pixels (p x p patches folded into channels); 1 for every other model."""
    if not cfg.is_jit:
        return 1
    from ..models.jit import jit_patch_size

    return jit_patch_size(cfg.model.name, cfg.model.overrides)


def image_stream_shape(dataset, cfg: TrainConfig) -> tuple[int, int]:
    """(channels, side) of what the denoiser diffuses: VAE latents when the data set stores moments, else pixels;
    for JiT, pixels patchified into (C·p², S/p) so its token grid meets the encoder's grid without resizing."""
    p = pixel_patch(cfg)
    if p > 1 or cfg.is_jit:
        if dataset.has_moments:
            raise ValueError(f"model.name={cfg.model.name!r} is a pixel-space model, but data.path holds VAE latents")
        if dataset.image_size % p:
            raise ValueError(f"data.image_size={dataset.image_size} is not divisible by the JiT patch size {p}")
        return dataset.channels * p * p, dataset.image_size // p
    if dataset.has_moments:
        c2, h, w = dataset.moments_shape
        if h != w:
            raise ValueError(f"latents must be square, the data set's moments are {h}x{w}")
        return c2 // 2, h
    return dataset.channels, dataset.image_size


def build_encoder(cfg: TrainConfig, device: torch.device) -> Optional[nn.Module]:
    """The frozen semantic encoder, or None in no-feature mode (plain SiT)."""
    if cfg.method.projector.mode == "none":
        return None
    e = cfg.encoder
    if e.name == "digits":
        from ..encoders.digits_vit import DEFAULT_WEIGHTS, DigitsEncoder

        encoder = DigitsEncoder(e.weights or DEFAULT_WEIGHTS)
    else:
        from ..encoders import DINOv2Encoder

        dtype, allow_tf32 = encoder_precision(e.dtype, device)
        encoder = DINOv2Encoder(e.name, weights=e.weights or "hub", img_size=e.resolution, dtype=dtype,
                                allow_tf32=allow_tf32)
    check_encoder(cfg, encoder)
    return encoder.to(device)


def encoder_precision(name: str, device: torch.device) -> tuple[Optional[torch.dtype], bool]:
    """encoder.dtype -> (DINOv2Encoder's autocast dtype, allow_tf32). On a GPU: bf16 = bf16 autocast; tf32 = fp32
    with TF32 matmuls (ReDi's train_redi.py sets allow_tf32 for the process); fp32 = IEEE fp32. On the CPU all three
    run in fp32 (bf16 autocast is slower there, and TF32 does not exist)."""
    if device.type != "cuda":
        return None, False
    return {"bf16": (torch.bfloat16, False), "tf32": (None, True), "fp32": (None, False)}[name]


def check_encoder(cfg: TrainConfig, encoder: nn.Module, image_channels: Optional[int] = None) -> None:
    """The encoder's input channels (digits) and token width against the config (ValueError naming the field).
    image_channels: the data set's (shards and REPA folders hold RGB); default data.channels (the digits)."""
    vit_config = getattr(getattr(encoder, "vit", None), "config", None)
    channels = cfg.data.channels if image_channels is None else image_channels
    if vit_config is not None and vit_config.in_channels != channels:
        where = "data.channels" if cfg.data.source == "digits" else f"the images in data.path ({cfg.data.path})"
        raise ValueError(f"{where} have {channels} channels but the digits encoder takes "
                         f"{vit_config.in_channels}-channel images (encoder.name)")
    if encoder.embed_dim != cfg.method.projector.feature_dim:
        raise ValueError(f"method.projector.feature_dim={cfg.method.projector.feature_dim} but encoder "
                         f"{cfg.encoder.name!r} gives {encoder.embed_dim}-d tokens")


def check_feature_grid_fits(encoder_tokens: int, image_size: int) -> None:
    """The encoder's token grid must resize onto the denoiser's input grid (ValueError naming what to change)."""
    try:
        check_feature_grid(encoder_tokens, image_size)
    except ValueError as e:
        raise ValueError(f"encoder grid vs image grid: {e} (change encoder.resolution or the data's image size)")


def use_fused_ops(cfg: TrainConfig, device: torch.device) -> bool:
    """model.fused_ops: auto → on CUDA (the ops' PyTorch fallback gains nothing on CPU); on/off as asked."""
    return cfg.model.fused_ops == "on" or (cfg.model.fused_ops == "auto" and device.type == "cuda")


def build_objective(cfg: TrainConfig, image_channels: int, image_size: int, encoder: Optional[nn.Module],
                    statistics: Optional[FeatureStatistics], fused: bool = False) -> JointDiffusionObjective:
    projector = FeatureProjector(cfg.method.projector, statistics)
    tokens = encoder.num_tokens if encoder is not None else None
    if tokens is not None:
        check_feature_grid_fits(tokens, image_size)
    reason = cfg.fused_embedding_reason()
    if fused and reason is not None:
        if cfg.model.fused_ops == "on":
            logger.warning("fused joint embedding off: %s (the rest of the fused ops stay on)", reason)
        fused = False
    return JointDiffusionObjective(projector, cfg.objective_config(image_channels, image_size, fused), tokens)


def build_denoiser(cfg: TrainConfig, in_channels: int, image_size: int, num_classes: int,
                   fused: bool = False) -> nn.Module:
    """The SiT/DiT; with `fused`, coredi_kernels' fused LayerNorm+modulate(+residual) and attention dispatch are
    swapped in (`patch_dit`: same parameters and state dict, same numbers)."""
    m = cfg.model
    if cfg.is_jit:  # sizes in pixels / image channels; the trainer's (in_channels, image_size) are the packed ones
        p = pixel_patch(cfg)
        feature_channels = cfg.method.projector.channels
        model = create_model(m.name, input_size=image_size * p, in_channels=(in_channels - feature_channels) // (p * p),
                             feature_channels=feature_channels, num_classes=num_classes,
                             class_dropout_prob=m.class_dropout_prob, grad_checkpointing=m.grad_checkpointing,
                             **m.overrides)
        if fused:
            from coredi_kernels import patch_jit

            patch_jit(model)
        return model
    model = create_model(m.name, input_size=image_size, in_channels=in_channels, num_classes=num_classes,
                         learn_sigma=m.learn_sigma, class_dropout_prob=m.class_dropout_prob,
                         grad_checkpointing=m.grad_checkpointing, **m.overrides)
    if fused:
        from coredi_kernels import patch_dit

        patch_dit(model)
    return model


@torch.no_grad()
def compute_feature_statistics(encoder: nn.Module, batches, feature_dim: int, num_batches: int) -> FeatureStatistics:
    """Streaming mean/std/PCA of the encoder's tokens over `num_batches` batches (this rank's); merge across ranks
    with `merge_statistics`."""
    stats = FeatureStatistics(feature_dim)
    for i, batch in enumerate(batches):
        if i >= num_batches:
            break
        stats.update(encoder(batch["image"]).float())
    return stats


def merge_statistics(stats: FeatureStatistics) -> FeatureStatistics:
    """Combine every rank's statistics (exact, float64) so all ranks hold the same ones."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {k: v.cpu() if torch.is_tensor(v) else v for k, v in stats.state_dict().items()})
    merged = FeatureStatistics.from_state_dict(gathered[0])
    for state in gathered[1:]:
        merged.merge(FeatureStatistics.from_state_dict(state))
    return merged
