"""Input embeddings of SiT/DiT: patches, timesteps, class labels and the fixed 2D sin-cos position table.

Parameter names follow the public DiT/SiT/REPA/ReDi code (timm's `PatchEmbed.proj`, `t_embedder.mlp.{0,2}`,
`y_embedder.embedding_table`), so their checkpoints load into our models unchanged.
References: GLIDE (timestep embedding), MAE (2D sin-cos position embedding), DiT (label dropout for guidance).
"""
import math

import torch
import torch.nn as nn

#################################################################################
#                                Patch Embedding                                #
#################################################################################

class PatchEmbed(nn.Module):
    """Image to patch tokens with one strided convolution: (B, C, H, W) -> (B, T, D), T = (H / p) * (W / p).

    Same parameters (`proj.weight` (D, C, p, p), `proj.bias` (D,)) and token order (row-major over the patch grid)
    as timm's `PatchEmbed`, which public SiT uses.
    """

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = (patch_size, patch_size)  # a tuple like timm's, read by public code as patch_size[0]
        self.grid_size = (input_size // patch_size, input_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)                     # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, T, D)


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, cos first then sin (GLIDE / DiT convention).

    t: (B,), used as given: SiT feeds t in [0, 1], DiT feeds integer steps in [0, 1000).
    Returns (B, dim) float32: [cos(t * f_0), ..., cos(t * f_{h-1}), sin(t * f_0), ..., sin(t * f_{h-1})] with
    h = dim // 2 and f_k = max_period ** (-k / h); an odd `dim` gets one zero column at the end.
    """
    half = dim // 2
    # Frequencies in float32 exactly as the public code computes them, so checkpoints see the same inputs.
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]                      # (B, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps into vectors: sinusoidal features (B, 256) -> Linear -> SiLU -> Linear -> (B, D)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size)  # (B, 256) float32
        # Cast to the weights' dtype so a model converted to bf16 runs without autocast (no-op in fp32).
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))         # (B, D)


class LabelEmbedder(nn.Module):
    """Embeds class labels (B,) -> (B, D); drops labels to the null class for classifier-free guidance.

    With `dropout_prob > 0` the table has `num_classes + 1` rows and row `num_classes` is the null ("unconditional")
    class: labels are replaced by it with probability `dropout_prob` in training, wherever `force_drop_ids == 1`,
    and a label equal to `num_classes` selects it explicitly (guidance at sampling time).
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replaces dropped labels by the null class: at random, or exactly where `force_drop_ids == 1`."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (B, D)


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################

def sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """1D sin-cos embedding of positions (M,) -> (M, embed_dim) float64: [sin(pos * w_k)..., cos(pos * w_k)...],
    w_k = 10000 ** (-k / (embed_dim / 2)), k = 0 .. embed_dim / 2 - 1."""
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega                         # (D/2,)
    out = pos.reshape(-1).double()[:, None] * omega[None]  # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, D)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """MAE's fixed 2D sin-cos table for a square grid: (grid_size ** 2, embed_dim) float64, tokens row-major.

    The first half of the channels encodes a token's *column* index and the second half its *row* index. (MAE and
    SiT name the halves `emb_h` / `emb_w`, but build the grid with `meshgrid(grid_w, grid_h)`, so the first half
    sees the column. We reproduce that exactly, since checkpoints were trained with it.)
    """
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")  # (G, G) each
    emb_col = sincos_1d(embed_dim // 2, cols)            # (G*G, D/2)
    emb_row = sincos_1d(embed_dim // 2, rows)            # (G*G, D/2)
    return torch.cat([emb_col, emb_row], dim=1)          # (G*G, D)
