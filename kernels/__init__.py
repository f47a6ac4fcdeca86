"""coredi_kernels: fused Triton ops for DiT/SiT training, usable on their own (needs only torch and triton).

    from coredi_kernels import patch_dit, patch_jit, patch_report
    patch_dit(model)        # DiT/SiT/REPA/fast-DiT/ReDi: fused LayerNorm+modulate(+gated residual), attention dispatch
    patch_jit(model)        # JiT/LightningDiT: the same with RMSNorm, fused qk-norm + RoPE (rotary modules read)
    print(patch_report(model))   # what was fused, counted (docs/drop_in.md)

Ops: `layernorm_modulate`, `gated_residual_layernorm_modulate`, `rmsnorm_modulate`,
`gated_residual_rmsnorm_modulate`, `qk_norm_rope` (JiT's per-head q/k RMSNorm + 2D RoPE on the packed qkv),
`qk_layernorm_rope` (the same with LayerNorm q/k norms), `joint_embedding` (CoReDi's projection + norm +
statistics + resize + noise + patch embedding), `attention` (FlashAttention / cuDNN / flash / efficient SDPA /
xformers / math, with `explain_attention` saying why each was or was not chosen).

Every op runs its Triton kernels on CUDA tensors and the same math in PyTorch elsewhere; `force_backend` or the
environment variable COREDI_KERNELS_BACKEND (triton | torch | auto) overrides the choice.
"""
from .attention import attention, explain_attention, force_attention_backend, select_attention_backend
from .backend import force_backend
from .joint_embedding import JointEmbedding, JointEmbeddingOutput, joint_embedding
from .layernorm_modulate import (
    GatedResidualLayerNormModulate,
    LayerNormModulate,
    gated_residual_layernorm_modulate,
    layernorm_modulate,
)
from .patch import PatchReport, is_dit_patched, patch_dit, patch_jit, patch_report, unpatch_dit
from .qk_norm_rope import QKNormRoPE, qk_layernorm_rope, qk_norm_rope
from .rmsnorm_modulate import (
    GatedResidualRMSNormModulate,
    RMSNormModulate,
    gated_residual_rmsnorm_modulate,
    rmsnorm_modulate,
)

__version__ = "0.1.0"

__all__ = [
    "attention",
    "explain_attention",
    "force_attention_backend",
    "select_attention_backend",
    "patch_dit",
    "patch_jit",
    "patch_report",
    "PatchReport",
    "rmsnorm_modulate",
    "gated_residual_rmsnorm_modulate",
    "RMSNormModulate",
    "GatedResidualRMSNormModulate",
    "unpatch_dit",
    "is_dit_patched",
    "GatedResidualLayerNormModulate",
    "JointEmbedding",
    "JointEmbeddingOutput",
    "joint_embedding",
    "LayerNormModulate",
    "force_backend",
    "gated_residual_layernorm_modulate",
    "layernorm_modulate",
    "qk_norm_rope",
    "qk_layernorm_rope",
    "QKNormRoPE",
]
