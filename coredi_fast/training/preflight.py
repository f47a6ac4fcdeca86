"""Checks of a training config against the files and packages it names, before anything is written or computed.

`TrainConfig.validate` checks each field alone; what depends on files (the data, the encoder's weights, a
checkpoint to resume or to start from, the DeepSpeed json) or on several parts together (the model's overrides, the
data's image size against the model's patches and the encoder's grid, the encoder's width against the projector) was
found only inside the trainer: after the run folder existed and the feature statistics were computed, as a
traceback. Here each becomes one ValueError naming the field or file, raised before the run folder is touched
(train.py prints it as one line and exits with status 2). The parts are built cheaply: the data set reads its
manifest, the encoder and the denoiser are built on the meta device (no weights are read or downloaded, no memory is
allocated); the checkpoint of model.init_from is memory-mapped and only its shapes are compared.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .config import TrainConfig


def preflight(cfg: TrainConfig, ds_config_path: Optional[str] = None) -> None:
    """Raise ValueError (naming the field or file) for the first problem found; return None when all is well."""
    if ds_config_path is not None:  # its gradient_clipping must agree with optim.grad_clip (ds_config.py)
        from .ds_config import read_ds_config, reconcile_gradient_clipping

        reconcile_gradient_clipping(read_ds_config(ds_config_path), ds_config_path, cfg)
    r = cfg.run.resume
    if r not in ("auto", "none") and not Path(r).is_file():
        raise ValueError(f"run.resume: checkpoint not found: {r} (use auto, none or a checkpoint file)")
    if cfg.data.loader == "dali":
        from ..data.dali_loader import dali_available

        if not dali_available():
            raise ValueError("data.loader=dali but nvidia.dali is not installed (pip install nvidia-dali-cuda130, "
                             "or data.loader=auto)")
    if cfg.encoder.pca_file:
        _check_pca_file(cfg)
    weights = cfg.encoder.weights
    if weights not in (None, "hub") and cfg.method.projector.mode != "none" and not Path(weights).exists():
        raise ValueError(f"encoder.weights: file not found: {weights}")

    from .builders import build_dataset, check_feature_grid_fits, image_stream_shape

    try:
        dataset = build_dataset(cfg)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    from ..data.flip import check_hflip

    check_hflip(cfg.data.hflip, dataset.has_moments, cfg.data.path)
    if cfg.data.source != "digits" and dataset.image_size != cfg.data.image_size:
        raise ValueError(f"data.image_size={cfg.data.image_size} but {cfg.data.path} holds "
                         f"{dataset.image_size}-px images: set data.image_size={dataset.image_size}")
    image_channels, image_size = image_stream_shape(dataset, cfg)
    encoder = _encoder_on_meta(cfg, dataset.channels)
    if encoder is not None:
        check_feature_grid_fits(encoder.num_tokens, image_size)
    denoiser = _denoiser_on_meta(cfg, image_channels, image_size, dataset.num_classes)
    from .init_from import starts_fresh

    if cfg.model.init_from and starts_fresh(cfg):  # a resumed run ignores it (its own checkpoint wins)
        _check_init_from(cfg, denoiser)


def _check_init_from(cfg: TrainConfig, denoiser: torch.nn.Module) -> None:
    """model.init_from: read safely (memory-mapped: only the shapes are looked at) and fit key for key, shape for
    shape to the configured denoiser (and, for our checkpoints, the projector's settings)."""
    from .init_from import check_projector_fits, fit_denoiser_weights, read_init_weights

    weights = read_init_weights(cfg.model.init_from, cfg.model.init_weights)
    fit_denoiser_weights(weights, denoiser, cfg.model.name)
    check_projector_fits(weights, cfg)


def _check_pca_file(cfg: TrainConfig) -> None:
    """encoder.pca_file: read safely (no pickled code runs) and fit to the projector's widths."""
    from ..method import read_redi_pca

    p, path = cfg.method.projector, cfg.encoder.pca_file
    try:
        stored = read_redi_pca(path)
    except (FileNotFoundError, ValueError) as error:
        raise ValueError(f"encoder.pca_file: {error}") from None
    channels, count = stored.components.shape[1], stored.components.shape[0]
    if channels != p.feature_dim:
        raise ValueError(f"encoder.pca_file: {path} holds {channels}-d statistics but method.projector.feature_dim="
                         f"{p.feature_dim}")
    if count < p.dim:
        raise ValueError(f"encoder.pca_file: {path} holds {count} principal components, fewer than "
                         f"method.projector.dim={p.dim}")


def _encoder_on_meta(cfg: TrainConfig, data_channels: int):
    """The encoder's shape facts (embed_dim, num_tokens), checked against the config like `build_encoder` does."""
    if cfg.method.projector.mode == "none":
        return None
    from .builders import check_encoder

    e = cfg.encoder
    if e.name == "digits":
        from ..encoders.digits_vit import DEFAULT_WEIGHTS, DigitsEncoder

        encoder = DigitsEncoder(e.weights or DEFAULT_WEIGHTS)  # a small file shipped in the package
    else:
        import warnings

        from ..encoders import DINOv2Encoder

        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "random init": the shape is all we need here
            try:
                encoder = DINOv2Encoder(e.name, weights=None, img_size=e.resolution)
            except ValueError as error:
                raise ValueError(f"encoder: {error}") from None
    check_encoder(cfg, encoder, data_channels)
    return encoder


def _denoiser_on_meta(cfg: TrainConfig, image_channels: int, image_size: int, num_classes: int) -> torch.nn.Module:
    from .builders import build_denoiser

    channels = image_channels + cfg.method.projector.channels  # what the objective feeds the denoiser
    try:
        with torch.device("meta"):
            return build_denoiser(cfg, channels, image_size, num_classes)
    except (TypeError, ValueError) as error:
        where = "model.overrides" if cfg.model.overrides else "model.name / data.image_size"
        raise ValueError(f"{where}: {error}") from None
