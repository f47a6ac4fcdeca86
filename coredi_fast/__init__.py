"""coredi_fast: CoReDi / ReDi diffusion transformers trained jointly on image latents and semantic features.

Subpackages: `models` (SiT/DiT, JiT), `method` (the feature projector, regularizers, monitors, statistics),
`transport` (interpolant, losses, samplers, guidance), `encoders` (DINOv2, VAE), `data`, `training`,
`evaluation`. The fused ops live in the standalone package `coredi_kernels`.
"""
__version__ = "0.1.0"
