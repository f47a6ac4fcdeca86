"""Frozen encoders: DINOv2 patch features (the semantic stream) and the SD-VAE (the image latents).

    from coredi_fast.encoders import DINOv2Encoder, LatentVAE
    dino = DINOv2Encoder(weights="hub")            # or a local .pth/.safetensors; None = random init (tests)
    feats = dino(images_uint8)                      # (B, 256, 768) for 256-px images
    vae = LatentVAE(weights="/path/to/sd-vae-ft-ema")
    x = vae.sample_latent(stored_moments)           # (B, 4, 32, 32), already ×0.18215
    x = sample_posterior(stored_moments, layout="mean_logvar")   # the same without loading a VAE

Weights resolution (local path / "hub" / None, with a fast offline error) lives in `weights.py`.
"""
from .dinov2 import DEFAULT_DINOV2, IMAGENET_MEAN, IMAGENET_STD, DINOv2Encoder
from .vae import MOMENTS_LAYOUTS, SD_VAE_CONFIG, SD_VAE_REPO, SD_VAE_SCALE, LatentVAE, sample_posterior
from .weights import HUB, WeightsUnavailableError, load_state_dict_file, resolve_weights

__all__ = [
    "DINOv2Encoder", "LatentVAE", "WeightsUnavailableError", "build_encoder", "sample_posterior",
    "DEFAULT_DINOV2", "IMAGENET_MEAN", "IMAGENET_STD",
    "SD_VAE_CONFIG", "SD_VAE_REPO", "SD_VAE_SCALE", "MOMENTS_LAYOUTS",
    "HUB", "load_state_dict_file", "resolve_weights",
]


def build_encoder(name: str, **kwargs):
    """Builds a frozen encoder by name.

    name: a timm DINOv2 model ("vit_base_patch14_reg4_dinov2", "dinov2" for that default) → DINOv2Encoder, or a
    Stability VAE ("sd-vae-ft-ema", "sd-vae-ft-mse", or "stabilityai/...") → LatentVAE loading that hub repo.
    kwargs go to the constructor (weights=..., img_size=..., ...).
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name == "dinov2":
        return DINOv2Encoder(DEFAULT_DINOV2, **kwargs)
    if "dinov2" in name:
        return DINOv2Encoder(name, **kwargs)
    if name.split("/")[-1].startswith("sd-vae-"):
        repo = name if "/" in name else f"stabilityai/{name}"
        return LatentVAE(hub_repo_id=repo, **kwargs)
    raise ValueError(f"name must be 'dinov2', a timm DINOv2 model or 'sd-vae-ft-ema'/'sd-vae-ft-mse', got {name!r}")
