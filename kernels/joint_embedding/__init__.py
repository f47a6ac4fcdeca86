"""The fused CoReDi joint embedding: feature projection + BatchNorm + regularizer statistics + bilinear resize +
noising of both streams + patch embedding: three Triton kernels forward, three and one GEMM backward.

Ladder: `_kernels` (Triton kernels and launchers) -> `op` (torch.library ops `coredi::joint_embedding_*`,
autograd, backend dispatch, functional API) -> `module` (a drop-in nn.Module). `reference` holds the pure-PyTorch
math (the oracle and the CPU backend).
"""
from .module import JointEmbedding
from .op import JointEmbeddingOutput, joint_embedding

__all__ = ["JointEmbedding", "JointEmbeddingOutput", "joint_embedding"]
