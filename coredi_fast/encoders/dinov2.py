"""Frozen DINOv2 patch features, preprocessed exactly as ReDi does.

ReDi (`train_redi.py`) computes the semantic features online at every step:

    x = images_uint8 / 255
    x = Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)(x)      # normalize first ...
    x = F.interpolate(x, 224, mode="bicubic")                          # ... then resize (no antialias)
    f = dinov2.forward_features(x)["x_norm_patchtokens"]               # (B, 256, 768) after the final norm

with the hub model `dinov2_vitb14_reg` (ViT-B/14, 4 registers). Here the network is timm's
`vit_base_patch14_reg4_dinov2`, the same architecture; `forward_features` returns all tokens after the final norm and
the patch tokens are those after the CLS and register tokens (`num_prefix_tokens` = 5).

Weights (see `weights.py`): a local file in timm's layout (the hub's `model.safetensors`) or in the official
facebookresearch layout (`dinov2_vitb14_reg4_pretrain.pth`), converted by timm's checkpoint filter; the filter also
resizes the 37×37 position embedding of the 518-px checkpoints to this model's grid, with the same antialiased
bicubic interpolation DINOv2 itself applies to 224-px inputs.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from .weights import HubWeights, WeightsArg, find_weights_file, load_state_dict_file, load_state_dict_strict, \
    resolve_weights

DEFAULT_DINOV2 = "vit_base_patch14_reg4_dinov2"
# timm.data.IMAGENET_DEFAULT_MEAN / _STD, the values DINOv2 was trained with and ReDi normalizes with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dinov2_hub_weights(model_name: str) -> HubWeights:
    """Where `weights="hub"` finds `model_name`'s weights: timm's hub copy, plus the official URL for the message."""
    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None or not cfg.hf_hub_id:
        return HubWeights(repo_id=f"timm/{model_name}", filenames=("model.safetensors",), description=model_name)
    filenames = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else ("model.safetensors", "pytorch_model.bin")
    hint = f"the official checkpoint {cfg.url} works too" if cfg.url else ""
    return HubWeights(repo_id=cfg.hf_hub_id, filenames=filenames, description=f"DINOv2 '{model_name}'",
                      manual_hint=hint)


class DINOv2Encoder(nn.Module):
    """Frozen DINOv2 ViT: images → patch tokens after the final norm, (B, L, D).

    Args:
        model_name: a timm DINOv2 model, optionally with a pretrained tag ("vit_base_patch14_reg4_dinov2.lvd142m").
        weights:    local weights file/folder, "hub", or None (random init, for tests; warns).
        img_size:   side the images are resized to before the ViT (ReDi: 224 for 256-px images, giving a 16×16 grid).
                    Must be a multiple of the patch size.
        dtype:      None runs in float32 (as ReDi does); torch.bfloat16/float16 runs the ViT under autocast.
        allow_tf32: with dtype None on a GPU: True lets matmuls and convolutions use TF32 tensor cores (ReDi's
                    setting: its train_redi.py enables TF32 for the whole process), False keeps IEEE fp32 (TF32 off
                    inside the forward, whatever the process-wide flags say). No effect on the CPU.
        **timm_kwargs: forwarded to `timm.create_model`, e.g. embed_dim/depth/num_heads for tiny random-init models.

    Attributes: embed_dim (D), patch_size, grid_size (tokens per side), num_tokens (L = grid_size²),
    num_prefix_tokens (CLS + registers, dropped).

    The module is frozen: no parameter requires grad and it stays in eval mode even when a parent calls `.train()`.
    """

    def __init__(self, model_name: str = DEFAULT_DINOV2, weights: WeightsArg = "hub", *, img_size: int = 224,
                 dtype: Optional[torch.dtype] = None, allow_tf32: bool = False, **timm_kwargs):
        super().__init__()
        if not isinstance(model_name, str) or "dinov2" not in model_name or not timm.is_model(model_name):
            raise ValueError(f"model_name must be a timm DINOv2 model (one of {timm.list_models('*dinov2*')}), "
                             f"got {model_name!r}")
        if not isinstance(img_size, int) or img_size <= 0:
            raise ValueError(f"img_size must be a positive int, got {img_size!r}")
        if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be None, torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")
        for reserved in ("pretrained", "num_classes"):
            if reserved in timm_kwargs:
                raise TypeError(f"{reserved} is set by DINOv2Encoder; pass weights=... instead")

        # Resolve first: a missing file or unreachable hub fails before the (slow) model build.
        weights_path = resolve_weights(weights, dinov2_hub_weights(model_name))
        self.model = timm.create_model(model_name, pretrained=False, img_size=img_size, num_classes=0, **timm_kwargs)
        patch = self.model.patch_embed.patch_size
        patch_size = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of the patch size {patch_size} of {model_name}")

        self.model_name = model_name
        self.img_size = img_size
        self.autocast_dtype = None if dtype == torch.float32 else dtype
        self.allow_tf32 = bool(allow_tf32)
        self.patch_size = patch_size
        self.embed_dim = self.model.embed_dim
        self.grid_size = img_size // patch_size
        self.num_tokens = self.grid_size ** 2
        self.num_prefix_tokens = self.model.num_prefix_tokens
        # Non-persistent: they are constants, not weights, and must not show up as unexpected checkpoint keys.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

        if weights_path is not None:
            self._load_weights(weights_path)
        self.requires_grad_(False)
        self.eval()

    def _load_weights(self, path: Path) -> None:
        if path.is_dir():
            path = find_weights_file(path, preferred=("model.safetensors", "pytorch_model.bin"))
        state_dict = load_state_dict_file(path)
        # timm's filter maps the official facebookresearch layout (mask_token, register_tokens, pos_embed with a CLS
        # slot) to timm's, and resizes the position embedding to this model's grid; timm-layout weights pass through.
        from timm.models.vision_transformer import checkpoint_filter_fn

        state_dict = checkpoint_filter_fn(state_dict, self.model)
        load_state_dict_strict(self.model, state_dict, source=f"'{path}'")

    def train(self, mode: bool = True) -> "DINOv2Encoder":
        """Always eval: a frozen encoder's features must not depend on the parent's mode (dropout, drop-path)."""
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """ReDi's preprocessing: [0, 1] scale → ImageNet normalization → bicubic resize to img_size.

        images: uint8 (B, 3, H, W) in [0, 255], or float (B, 3, H, W) in [0, 1].
        Returns float32 (B, 3, img_size, img_size).
        """
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a (B, 3, H, W) tensor, got {shape}")
        if images.dtype == torch.uint8:
            x = images.float() / 255.0
        elif images.is_floating_point():
            x = images.float()
        else:
            raise TypeError(f"images must be uint8 in [0, 255] or float in [0, 1], got dtype {images.dtype}")
        x = (x - self.mean) / self.std
        if x.shape[-2:] != (self.img_size, self.img_size):
            # ReDi's order: normalize, then resize; bicubic without antialias, as F.interpolate defaults.
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bicubic", align_corners=False)
        return x

    @torch.no_grad()  # not inference_mode: the features feed a learned projection that autograd must save them for
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: uint8 (B, 3, H, W) in [0, 255] or float (B, 3, H, W) in [0, 1] → float32 (B, L, D) patch tokens."""
        # Weights cast with `.to(dtype)` (a parent's `.half()`) get inputs of their dtype; autocast handles its own.
        x = self.preprocess(images).to(self.model.patch_embed.proj.weight.dtype)
        # No autocast weight-cast cache: each weight is cast once per forward anyway, and a cache that outlives a
        # CUDA-graph capture would hand the graph tensors from outside its memory pool (see GraphedEncoder).
        with torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None, cache_enabled=False), \
                _tf32(self.allow_tf32, x.device):
            tokens = self.model.forward_features(x)
        return tokens[:, self.num_prefix_tokens:].float()

    def extra_repr(self) -> str:
        return (f"model_name={self.model_name!r}, img_size={self.img_size}, grid_size={self.grid_size}, "
                f"embed_dim={self.embed_dim}, autocast_dtype={self.autocast_dtype}, allow_tf32={self.allow_tf32}")


@contextlib.contextmanager
def _tf32(allowed: bool, device: torch.device):
    """On CUDA: TF32 for matmuls and convolutions on (allowed) or off inside the block, the process's flags restored
    after. Elsewhere nothing (TF32 is a CUDA tensor-core format)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
