"""Diffusion transformers: SiT/DiT (`sit.py`, with public SiT/DiT/REPA/ReDi state-dict names), JiT (`jit.py`) and
the model zoo (`zoo.py`, above both; what both share is in `common.py`).

    model = create_model("SiT-XL/2", input_size=32, in_channels=4 + 8)   # ReDi: VAE latents + 8 PCA channels
    v = model(x_t, t, y)                                                  # (B, C, H, W)

    jit = create_model("JiT-B/16", input_size=256, in_channels=3, feature_channels=8)  # pixel space (`jit.py`)
    x = pack_inputs(images, features, jit.pixel_patch)                    # (B, 3*16*16 + 8, 16, 16)
    x_pred = jit(x_t, t, y)                                               # x-prediction, x's shape
"""
from .attention import Attention, dot_product_attention
from .common import gated_residual, modulate
from .embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder, get_2d_sincos_pos_embed, timestep_embedding
from .jit import (JIT_MODEL_CONFIGS, JiT, JiTBlock, convert_jit_state_dict, create_jit_model, pack_inputs,
                  patchify_images, unpack_outputs, unpatchify_images)
from .sit import MODEL_CONFIGS, FinalLayer, SiT, SiTBlock, convert_redi_state_dict
from .zoo import create_model, list_models, model_family

__all__ = [
    "Attention", "dot_product_attention",
    "LabelEmbedder", "PatchEmbed", "TimestepEmbedder", "get_2d_sincos_pos_embed", "timestep_embedding",
    "JIT_MODEL_CONFIGS", "JiT", "JiTBlock", "convert_jit_state_dict", "create_jit_model", "pack_inputs",
    "patchify_images", "unpack_outputs", "unpatchify_images",
    "MODEL_CONFIGS", "FinalLayer", "SiT", "SiTBlock", "create_model", "gated_residual", "list_models", "modulate",
    "model_family", "convert_redi_state_dict",
]
