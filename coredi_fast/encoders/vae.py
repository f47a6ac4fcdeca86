"""Frozen SD-VAE (diffusers `AutoencoderKL`): images ↔ posterior moments ↔ scaled latents.

The REPA/ReDi data pipeline stores, for every 256-px image, the posterior of the SD-VAE *encoder* as "moments" and
draws a fresh latent from them at every training step. REPA's preprocessing loads `stabilityai/sd-vae-ft-mse`; our
default hub repo is `stabilityai/sd-vae-ft-ema`, whose encoder is the same (both fine-tunes of the original kl-f8
VAE changed only the decoder, per their model cards), so the moments do not depend on the choice. The decoder does:
ft-EMA is what SiT/REPA/ReDi's FID sampling scripts decode with (`--vae ema`, their default).

    moments = cat([posterior.mean, posterior.std], dim=1)           # REPA preprocessing/encoders.py, (B, 8, 32, 32)
    x = 0.18215 * (mean + std * randn)                              # ReDi/REPA train.py `sample_posterior`

Note the second half is the standard deviation, not diffusers' `latent_dist.parameters` (mean, logvar). Both layouts
are supported (`moments_layout`); "mean_std" is the default so that REPA-preprocessed data sets load unchanged.
Latents are scaled as diffusers does: latent = (z − shift)·scale, decode(latent) = D(latent/scale + shift).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn

from .weights import HUB, HubWeights, WeightsArg, find_weights_file, load_state_dict_file, load_state_dict_strict, \
    resolve_weights

SD_VAE_REPO = "stabilityai/sd-vae-ft-ema"   # encoder = sd-vae-ft-mse's (REPA's preprocessing); ft-EMA decoder
# stabilityai/sd-vae-ft-ema's config.json (and sd-vae-ft-mse's: same architecture).
SD_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=256,
)
SD_VAE_SCALE = 0.18215
MOMENTS_LAYOUTS = ("mean_std", "mean_logvar")
# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range before exponentiating.
LOGVAR_RANGE = (-30.0, 20.0)
_DIFFUSERS_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def vae_hub_weights(repo_id: str) -> HubWeights:
    return HubWeights(repo_id=repo_id, filenames=_DIFFUSERS_WEIGHT_FILES, extra_files=("config.json",),
                      description=f"VAE '{repo_id}'",
                      manual_hint=f"e.g. a folder with config.json and diffusion_pytorch_model.safetensors from "
                                  f"https://huggingface.co/{repo_id}")


@torch.no_grad()
def sample_posterior(moments: torch.Tensor, *, layout: str = "mean_std", scale: float = SD_VAE_SCALE,
                     shift: float = 0.0, generator: Optional[torch.Generator] = None,
                     noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Draws a scaled latent from stored moments: (mean + std·ε − shift)·scale, ε ~ N(0, I). No VAE needed.

    moments: (B, 2C, h, w) in `layout` ("mean_std" or "mean_logvar"; a log-variance is clamped to [−30, 20] as
    diffusers does). generator: optional; ε is drawn on the generator's device, then moved to the moments' device,
    so a CPU generator gives the same latents on any device. noise: ε itself (B, C, h, w), e.g. drawn for the global
    batch and sliced per rank (then `generator` is unused).
    Returns float32 (B, C, h, w).
    """
    if layout not in MOMENTS_LAYOUTS:
        raise ValueError(f"layout must be one of {MOMENTS_LAYOUTS}, got {layout!r}")
    if not isinstance(moments, torch.Tensor) or moments.dim() != 4 or moments.shape[1] % 2:
        shape = tuple(moments.shape) if isinstance(moments, torch.Tensor) else type(moments).__name__
        raise ValueError(f"moments must be a (B, 2C, h, w) tensor, got {shape}")
    mean, second = moments.float().chunk(2, dim=1)
    std = second if layout == "mean_std" else torch.exp(0.5 * second.clamp(*LOGVAR_RANGE))
    if noise is None:
        noise_device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=noise_device, dtype=mean.dtype).to(mean.device)
    elif noise.shape != mean.shape:
        raise ValueError(f"noise must have shape {tuple(mean.shape)} like the posterior mean, got {tuple(noise.shape)}")
    return (mean + std * noise - shift) * scale


class LatentVAE(nn.Module):
    """Frozen KL autoencoder for latent diffusion.

    Args:
        weights:        a diffusers model folder (config.json + weights), a single weights file (diffusers or original
                        LDM key layout), "hub" (`hub_repo_id`), or None (random init, for tests; warns).
        config:         AutoencoderKL config. Default: the folder's config.json if there is one, else the
                        sd-vae-ft-ema shape (`SD_VAE_CONFIG`). Tiny configs make fast tests.
        hub_repo_id:    repo used by weights="hub" ("stabilityai/sd-vae-ft-ema"; "-ft-mse" is the same shape).
        scale, shift:   latent = (z − shift)·scale. None takes the config's scaling_factor (0.18215 for SD) and
                        shift_factor (none → 0).
        moments_layout: "mean_std" (REPA/ReDi data sets) or "mean_logvar" (diffusers' `latent_dist.parameters`).

    Attributes: latent_channels (C), downsample_factor (f: latents are H/f × W/f), scale, shift, moments_layout.
    `.to(torch.bfloat16)` runs the network in that dtype (inputs are cast to it); outputs are always float32.
    The module is frozen: no parameter requires grad, eval mode is kept, and every method runs without autograd.
    """

    def __init__(self, weights: WeightsArg = "hub", *, config: Optional[Mapping[str, Any]] = None,
                 hub_repo_id: str = SD_VAE_REPO, scale: Optional[float] = None, shift: Optional[float] = None,
                 moments_layout: str = "mean_std"):
        super().__init__()
        from diffusers import AutoencoderKL

        if moments_layout not in MOMENTS_LAYOUTS:
            raise ValueError(f"moments_layout must be one of {MOMENTS_LAYOUTS}, got {moments_layout!r}")
        if config is not None and not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping of AutoencoderKL arguments, got {type(config).__name__}")

        # Resolve first: a missing file or unreachable hub fails before the model build.
        path = resolve_weights(weights, vae_hub_weights(hub_repo_id))
        file, folder = path, None
        if path is not None and path.is_dir():
            file, folder = find_weights_file(path, _DIFFUSERS_WEIGHT_FILES), path
        elif path is not None and weights == HUB:
            folder = path.parent  # the hub snapshot folder holds config.json next to the weights
        if config is None:
            has_config = folder is not None and (folder / "config.json").is_file()
            config = AutoencoderKL.load_config(str(folder)) if has_config else SD_VAE_CONFIG
        self.vae = AutoencoderKL.from_config(dict(config))

        self.moments_layout = moments_layout
        self.scale = float(self.vae.config.scaling_factor if scale is None else scale)
        self.shift = float((getattr(self.vae.config, "shift_factor", None) or 0.0) if shift is None else shift)
        if self.scale <= 0:
            raise ValueError(f"scale must be positive, got {self.scale}")
        self.latent_channels = int(self.vae.config.latent_channels)
        self.downsample_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

        if file is not None:
            self._load_file(file)
        self.requires_grad_(False)
        self.eval()

    def _load_file(self, file: Path) -> None:
        state_dict = load_state_dict_file(file)
        if any(key.endswith("encoder.down.0.block.0.conv1.weight") for key in state_dict):
            # Original LDM/CompVis layout (e.g. vae-ft-ema-560000-ema-pruned.safetensors): diffusers' converter.
            from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

            state_dict = convert_ldm_vae_checkpoint(state_dict, self.vae.config)
        state_dict = _rename_deprecated_attention_keys(state_dict)
        load_state_dict_strict(self.vae, state_dict, source=f"'{file}'")

    def train(self, mode: bool = True) -> "LatentVAE":
        """Always eval: the VAE is frozen."""
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != self.vae.config.in_channels:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a (B, {self.vae.config.in_channels}, H, W) tensor, got {shape}")
        if images.shape[-2] % self.downsample_factor or images.shape[-1] % self.downsample_factor:
            raise ValueError(f"images height and width must be multiples of {self.downsample_factor}, "
                             f"got {tuple(images.shape[-2:])}")

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """Posterior moments of the images, as data sets store them.

        images: uint8 (B, 3, H, W) in [0, 255] (mapped by x/127.5 − 1, as REPA does), or float (B, 3, H, W) in
                [−1, 1].
        Returns float32 (B, 2C, H/f, W/f): [mean, std] ("mean_std") or [mean, logvar] ("mean_logvar"), C = 4, f = 8
        for SD-VAE.
        """
        self._check_images(images)
        if images.dtype == torch.uint8:
            x = images.float() / 127.5 - 1.0
        elif images.is_floating_point():
            x = images
        else:
            raise TypeError(f"images must be uint8 in [0, 255] or float in [-1, 1], got dtype {images.dtype}")
        posterior = self.vae.encode(x.to(self.dtype)).latent_dist
        second = posterior.std if self.moments_layout == "mean_std" else posterior.logvar
        return torch.cat([posterior.mean, second], dim=1).float()

    def sample_latent(self, moments: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """`sample_posterior` with this VAE's layout, scale and shift: moments (B, 2C, h, w) → float32 (B, C, h, w)."""
        if not isinstance(moments, torch.Tensor) or moments.dim() != 4 or moments.shape[1] != 2 * self.latent_channels:
            shape = tuple(moments.shape) if isinstance(moments, torch.Tensor) else type(moments).__name__
            raise ValueError(f"moments must be a (B, {2 * self.latent_channels}, h, w) tensor, got {shape}")
        return sample_posterior(moments, layout=self.moments_layout, scale=self.scale, shift=self.shift,
                                generator=generator)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """images (see `encode_moments`) → a sampled, scaled latent float32 (B, C, H/f, W/f)."""
        return self.sample_latent(self.encode_moments(images), generator=generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) → images float32 (B, 3, h·f, w·f), nominally in [−1, 1].

        The output is not clamped: clamp to [−1, 1] before turning it into pixels.
        """
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must be a (B, {self.latent_channels}, h, w) tensor, got {shape}")
        z = latents.float() / self.scale + self.shift
        return self.vae.decode(z.to(self.dtype)).sample.float()

    def extra_repr(self) -> str:
        return (f"latent_channels={self.latent_channels}, downsample_factor={self.downsample_factor}, "
                f"scale={self.scale}, shift={self.shift}, moments_layout={self.moments_layout!r}")


def _rename_deprecated_attention_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Early diffusers checkpoints call the mid-block attention query/key/value/proj_attn; now: to_q/k/v, to_out.0."""
    renames = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    out = {}
    for key, value in state_dict.items():
        if ".attentions." in key:
            for old, new in renames.items():
                key = key.replace(old, new)
        out[key] = value
    return out
