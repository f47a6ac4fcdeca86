"""Diffusion transformers: SiT/DiT (`sit.py`, with public SiT/DiT/REPA/ReDi state-dict names) and the model zoo.

    model = create_model("SiT-XL/2", input_size=32, in_channels=4 + 8)   # ReDi: VAE latents + 8 PCA channels
    v = model(x_t, t, y)                                                  # (B, C, H, W)
"""
from .attention import Attention, dot_product_attention
from .embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder, get_2d_sincos_pos_embed, timestep_embedding
from .sit import MODEL_CONFIGS, FinalLayer, SiT, SiTBlock, create_model, gated_residual, list_models, modulate

__all__ = [
    "Attention", "dot_product_attention",
    "LabelEmbedder", "PatchEmbed", "TimestepEmbedder", "get_2d_sincos_pos_embed", "timestep_embedding",
    "MODEL_CONFIGS", "FinalLayer", "SiT", "SiTBlock", "create_model", "gated_residual", "list_models", "modulate",
]
