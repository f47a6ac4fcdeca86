"""JiT ("Just image Transformer", Li & He, arXiv 2511.13720): a plain ViT denoiser on raw pixel patches, with
CoReDi's feature channels merged into its tokens.

Input packing (what the trainer and the sampler must know). The model works on *patchified pixels*:

    x = cat([pixel_unshuffle(image, p), z], dim=1)      (B, C·p² + d, H/p, W/p)

C·p² image channels per token in torch's `pixel_unshuffle` order (channel = c·p² + i·p + j for pixel
(row·p + i, col·p + j)), followed by the d feature channels that live on the token grid itself (at 256 px with
p = 16 the 16×16 grid is DINOv2's grid: no resizing). `model(x, t, y)` returns JiT's x-prediction (the clean
pixels and clean features) with x's shape. pixel_unshuffle is a permutation, so noise, the joint velocity loss
(image channels = the first C·p²) and the samplers work on this tensor unchanged; `unpatchify_images` recovers
the images. Use `model.input_shape`, `model.packed_image_channels`, `model.pixel_patch`, `model.image_channels`
and `model.feature_channels` rather than recomputing them.

Architecture (JiT's `model_jit.py`; parameter names follow it, so its checkpoints load after
`convert_jit_state_dict`):

    x_embedder.proj1 / proj2       bottleneck patch embedding Linear(C·p² -> bottleneck, no bias) -> Linear(-> D)
    x_embedder.feature_proj        Linear(d -> D, no bias), added to the token (only when d > 0)
    pos_embed                      (1, T, D) frozen 2D sin-cos, added to the patch tokens
    t_embedder, y_embedder         as SiT; c = t_emb + y_emb conditions every block (adaLN-Zero)
    in_context_posemb              (1, L, D) learned; before block `in_context_start`, L tokens y_emb + posemb are
                                   prepended to the sequence (JiT's in-context class tokens), dropped at the end
    blocks.N                       RMSNorm (weight) -> modulate -> attention (qkv, RMSNorm qk-norm, 2D RoPE on
                                   the grid tokens, none on the class tokens) -> gate; RMSNorm -> modulate ->
                                   SwiGLU (w12, w3; hidden = int(int(D·mlp_ratio)·2/3)) -> gate
    final_layer                    RMSNorm -> modulate -> Linear(D -> p·p·C + d), image part laid out (p, p, C)

Feature channels: a separate Linear(d -> D) per token rather than one bottleneck over the concatenation, because
(i) a patch embedding of a concatenation *is* a sum of per-modality linear maps (ReDi's merged tokens), so only
the rank differs; (ii) JiT's bottleneck (128 or 256 wide) is there to compress 768 highly redundant pixel
values, and the d (8) decorrelated feature channels would otherwise compete for its few directions in a projection
initialized and trained at pixel scale; (iii) with d = 0 the model is exactly JiT and loads its checkpoints.

Label dropout happens in the model (as in SiT, with `force_drop_ids`), not in a separate denoiser as in JiT:
the in-context tokens use the embedding of the label after dropout, as JiT's do.
"""
import inspect
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import attention as attention_module
from .checkpointing import checkpointed_block_count
from .embeddings import LabelEmbedder, TimestepEmbedder, get_2d_sincos_pos_embed
from .rope import apply_rope, rope_2d_tables
from .common import check_positive_int, gated_residual, modulate

#################################################################################
#                        Pixel packing (trainer / sampler)                      #
#################################################################################


def patchify_images(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C·p², H/p, W/p), torch's `pixel_unshuffle` channel order (c, i, j)."""
    if images.ndim != 4 or images.shape[-1] % patch_size or images.shape[-2] % patch_size:
        raise ValueError(f"images must be (B, C, H, W) with H and W divisible by patch_size={patch_size}, "
                         f"got {tuple(images.shape)}")
    return F.pixel_unshuffle(images, patch_size)


def unpatchify_images(x: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """The image part of a packed tensor back to pixels: (B, channels·p² [+ d], h, w) -> (B, channels, h·p, w·p).

    Channels after the first channels·p² (the feature channels) are ignored.
    """
    image_channels = channels * patch_size * patch_size
    if x.ndim != 4 or x.shape[1] < image_channels:
        raise ValueError(f"x must be (B, >= {channels}*{patch_size}**2, h, w), got {tuple(x.shape)}")
    return F.pixel_shuffle(x[:, :image_channels], patch_size)


def pack_inputs(images: torch.Tensor, features: torch.Tensor | None, patch_size: int) -> torch.Tensor:
    """JiT input from images (B, C, H, W) and features on the token grid (B, d, H/p, W/p) (or None):
    (B, C·p² + d, H/p, W/p)."""
    x = patchify_images(images, patch_size)
    if features is None:
        return x
    if features.ndim != 4 or features.shape[0] != x.shape[0] or features.shape[2:] != x.shape[2:]:
        raise ValueError(f"features must be (B, d, {x.shape[2]}, {x.shape[3]}) on the token grid of the "
                         f"{tuple(images.shape)} images, got {tuple(features.shape)}")
    return torch.cat([x, features.to(x.dtype)], dim=1)


def unpack_outputs(x: torch.Tensor, patch_size: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C·p² + d, h, w) -> images (B, C, h·p, w·p) and features (B, d, h, w)."""
    return unpatchify_images(x, patch_size, channels), x[:, channels * patch_size * patch_size:]


#################################################################################
#                               JiT building blocks                             #
#################################################################################


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learned weight (ones at init), computed in float32 like JiT's / LLaMA's:
    (..., D) -> (..., D) in the input dtype. `weight` and `eps` are what `coredi_kernels.patch_jit` reads."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class BottleneckPatchEmbed(nn.Module):
    """Packed pixels (+ features) to tokens: (B, C·p² + d, h, w) -> (B, h·w, D).

    Image channels: proj2(proj1(patch)), a rank-`bottleneck_dim` linear map (JiT's bottleneck; proj1 has no bias).
    Feature channels: feature_proj(z), added (ReDi's merged tokens). Tokens are row-major over the grid.
    """

    def __init__(self, image_channels: int, feature_channels: int, bottleneck_dim: int, hidden_size: int):
        super().__init__()
        self.image_channels = image_channels
        self.feature_channels = feature_channels
        self.proj1 = nn.Linear(image_channels, bottleneck_dim, bias=False)
        self.proj2 = nn.Linear(bottleneck_dim, hidden_size, bias=True)
        self.feature_proj = nn.Linear(feature_channels, hidden_size, bias=False) if feature_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)                                     # (B, T, C·p² + d)
        out = self.proj2(self.proj1(tokens[..., :self.image_channels]))          # (B, T, D)
        if self.feature_proj is not None:
            out = out + self.feature_proj(tokens[..., self.image_channels:])
        return out


class SwiGLU(nn.Module):
    """SwiGLU MLP (B, T, D) -> (B, T, D): w3(dropout(silu(a) * b)) with (a, b) = w12(x).chunk(2)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim, bias=True)
        self.w3 = nn.Linear(hidden_dim, dim, bias=True)
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(self.ffn_dropout(F.silu(a) * b))


class JiTAttention(nn.Module):
    """Self-attention with RMSNorm qk-norm and 2D RoPE: x (B, T, D), rope = (cos, sin) (T, Dh/2) or None.

    The product goes through `coredi_fast.models.attention.dot_product_attention` (looked up at call time, so the
    single attention entry point can be swapped for tests or profiling).
    """

    def __init__(self, dim: int, num_heads: int, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).unbind(2)  # 3 x (B, T, H, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attention_module.dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).reshape(B, T, D)                                # (B, T, D)
        return self.proj_drop(self.proj(out))


class JiTBlock(nn.Module):
    """A JiT block with adaLN-Zero: tokens (B, T, D), condition (B, D), rope (cos, sin) -> (B, T, D).

    As in SiTBlock, `modulate(norm(x), shift, scale)` and `gated_residual(x, gate, branch)` stay separate calls:
    `coredi_kernels.patch_jit` replaces them with the fused RMSNorm ops.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, proj_drop: float = 0.0):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size, eps=1e-6)
        self.attn = JiTAttention(hidden_size, num_heads, proj_drop=proj_drop)
        self.norm2 = RMSNorm(hidden_size, eps=1e-6)
        self.mlp = SwiGLU(hidden_size, swiglu_hidden_size(hidden_size, mlp_ratio), dropout=proj_drop)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = gated_residual(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope))
        x = gated_residual(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x


class JiTFinalLayer(nn.Module):
    """RMSNorm -> modulate -> Linear: (B, T, D), (B, D) -> (B, T, out_features)."""

    def __init__(self, hidden_size: int, out_features: int):
        super().__init__()
        self.norm_final = RMSNorm(hidden_size, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_features, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def swiglu_hidden_size(hidden_size: int, mlp_ratio: float) -> int:
    """JiT's SwiGLU width: 2/3 of the plain MLP's, int(int(D·mlp_ratio)·2/3) (2048 for D = 768, 3413 for 1280)."""
    return int(int(hidden_size * mlp_ratio) * 2 / 3)


#################################################################################
#                                   JiT model                                   #
#################################################################################


class JiT(nn.Module):
    """JiT denoiser on packed pixels: x (B, C·p² + d, S/p, S/p), t (B,), y (B,) -> x-prediction of x's shape.

    input_size: image side S in *pixels* (256 for ImageNet 256); the token grid is S/p × S/p.
    patch_size: pixel patch p (16 for JiT-*/16).
    in_channels: image channels C (3 for RGB, 1 for digits) — NOT the channels of x (that is C·p² + d).
    feature_channels: d, the CoReDi/ReDi feature channels per token (0: plain JiT).
    bottleneck_dim: width of the bottleneck patch embedding (128 for B/L, 256 for H).
    in_context_len, in_context_start: L class tokens prepended before block `in_context_start` (32 and 4/8/10 for
        B/L/H); L = 0 disables them.
    class_dropout_prob: label dropout to the null class `num_classes` in training (> 0 adds the null row).
    proj_dropout: dropout on the attention output and inside the SwiGLU of the middle half of the blocks
        (depth/4 <= i < 3·depth/4), as JiT (0 for B, 0.2 for H/16 in JiT's recipes).
    rope_theta: RoPE base. grad_checkpointing: recompute blocks in the backward (non-reentrant): True for every
        block, an int k for the first k only (see `models/checkpointing.py`).
    name: the zoo name, recorded in `config` only; `create_model(**model.config)` rebuilds the model.
    """

    def __init__(
        self,
        input_size: int = 256,
        patch_size: int = 16,
        in_channels: int = 3,
        feature_channels: int = 0,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        bottleneck_dim: int = 128,
        in_context_len: int = 32,
        in_context_start: int = 4,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        proj_dropout: float = 0.0,
        rope_theta: float = 10000.0,
        grad_checkpointing: bool | int = False,
        name: str | None = None,
    ):
        config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        _check_config(**config)
        self.config = dict(config, mlp_ratio=float(mlp_ratio), class_dropout_prob=float(class_dropout_prob),
                           proj_dropout=float(proj_dropout), rope_theta=float(rope_theta))
        self.input_size = input_size
        self.patch_size = self.pixel_patch = patch_size
        self.in_channels = self.image_channels = in_channels
        self.feature_channels = feature_channels
        self.packed_image_channels = in_channels * patch_size * patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.input_shape = (self.packed_image_channels + feature_channels, self.grid_size, self.grid_size)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.in_context_len = in_context_len
        self.in_context_start = in_context_start
        self.grad_checkpointing = grad_checkpointing

        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.x_embedder = BottleneckPatchEmbed(self.packed_image_channels, feature_channels, bottleneck_dim,
                                               hidden_size)
        # Frozen sin-cos table; a Parameter (not a buffer) so the state dict matches JiT's checkpoints.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, hidden_size), requires_grad=False)
        if in_context_len:
            self.in_context_posemb = nn.Parameter(torch.zeros(1, in_context_len, hidden_size))
        head_dim = hidden_size // num_heads
        for suffix, prefix in (("", 0), ("_in_context", in_context_len)):
            cos, sin = rope_2d_tables(head_dim, self.grid_size, prefix, rope_theta)
            self.register_buffer("rope_cos" + suffix, cos, persistent=False)  # (prefix + T, Dh/2)
            self.register_buffer("rope_sin" + suffix, sin, persistent=False)

        self.blocks = nn.ModuleList([
            JiTBlock(hidden_size, num_heads, mlp_ratio, proj_drop=proj_dropout if depth // 4 <= i < depth // 4 * 3
                     else 0.0)
            for i in range(depth)
        ])
        self.final_layer = JiTFinalLayer(hidden_size, self.packed_image_channels + feature_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """JiT's init: xavier-uniform Linears, zero biases, N(0, 0.02) embeddings and class-token positions,
        RMSNorm weights 1, adaLN modulations and the output layer zeroed (every block starts as the identity and
        the prediction starts at zero)."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        self.pos_embed.data.copy_(get_2d_sincos_pos_embed(self.hidden_size, self.grid_size).float().unsqueeze(0))
        if self.in_context_len:
            nn.init.normal_(self.in_context_posemb, std=0.02)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, out: torch.Tensor) -> torch.Tensor:
        """Final-layer tokens to the packed layout: (B, T, p·p·C + d) -> (B, C·p² + d, h, w).

        The image part of a token is laid out (i, j, c) as in JiT's output layer; it is reordered to
        pixel_unshuffle's (c, i, j) in the same copy that moves channels in front of the grid.
        """
        B, p, C, G = out.shape[0], self.pixel_patch, self.image_channels, self.grid_size
        image = out[..., :self.packed_image_channels].reshape(B, G, G, p, p, C)
        image = image.permute(0, 5, 3, 4, 1, 2).reshape(B, self.packed_image_channels, G, G)
        if not self.feature_channels:
            return image
        features = out[..., self.packed_image_channels:].transpose(1, 2).reshape(B, self.feature_channels, G, G)
        return torch.cat([image, features], dim=1)

    def _check_inputs(self, x, t, y):
        shape = self.input_shape
        if x.ndim != 4 or tuple(x.shape[1:]) != shape:
            raise ValueError(
                f"x must be (B, {shape[0]}, {shape[1]}, {shape[2]}) for this JiT: pixel_unshuffle(images, "
                f"{self.pixel_patch}) ({self.packed_image_channels} channels = {self.image_channels}·"
                f"{self.pixel_patch}²) followed by {self.feature_channels} feature channels; got {tuple(x.shape)}")
        B = x.shape[0]
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"t must be a scalar or ({B},) like the batch of x, got {tuple(t.shape)}")
        if y.shape != (B,):
            raise ValueError(f"y must be ({B},) like the batch of x, got {tuple(y.shape)}")
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}")
        return t

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Packed input (B, C·p² + d, h, w) -> patch tokens (B, T, D) with their fixed position embedding."""
        return self.x_embedder(x) + self.pos_embed

    def forward(self, x, t, y, force_drop_ids=None):
        """x (B, C·p² + d, h, w), t (B,) or scalar in [0, 1] (1 = data), y (B,) long (num_classes: null class)
        -> the predicted clean x, (B, C·p² + d, h, w).

        force_drop_ids: (B,), 1 where the label is replaced by the null class, in any mode.
        """
        t = self._check_inputs(x, t, y)
        y_emb = self.y_embedder(y, self.training, force_drop_ids)               # (B, D)
        c = self.t_embedder(t) + y_emb                                           # (B, D)
        tokens = self.embed(x)                                                   # (B, T, D)
        rope = (self.rope_cos, self.rope_sin)
        recompute = checkpointed_block_count(self.grad_checkpointing, len(self.blocks))
        recompute = recompute if torch.is_grad_enabled() else 0                 # blocks that recompute
        for i, block in enumerate(self.blocks):
            if self.in_context_len and i == self.in_context_start:
                class_tokens = y_emb.unsqueeze(1) + self.in_context_posemb      # (B, L, D)
                tokens = torch.cat([class_tokens.to(tokens.dtype), tokens], dim=1)  # (B, L + T, D)
                rope = (self.rope_cos_in_context, self.rope_sin_in_context)
            if i < recompute:
                tokens = checkpoint(block, tokens, c, rope, use_reentrant=False)
            else:
                tokens = block(tokens, c, rope)
        if self.in_context_len:
            tokens = tokens[:, self.in_context_len:]                             # (B, T, D)
        return self.unpatchify(self.final_layer(tokens, c))                      # (B, C·p² + d, h, w)


def convert_jit_state_dict(state_dict: dict) -> dict:
    """A state dict of JiT's official code (its `Denoiser`'s `net.*` or the bare `JiT`) in this model's layout.

    The names are the same; only the bottleneck patch embedding changes shape, from JiT's convolutions on the
    image (proj1 (bottleneck, C, p, p), proj2 (D, bottleneck, 1, 1)) to Linears on the packed channels, whose
    (c, i, j) order is the convolution's own flattening order. JiT's RoPE tables are not in its state dict.
    """
    converted = {}
    for key, value in state_dict.items():
        key = key.removeprefix("net.")
        if key in ("x_embedder.proj1.weight", "x_embedder.proj2.weight") and value.ndim == 4:
            value = value.reshape(value.shape[0], -1)
        converted[key] = value
    return converted


#################################################################################
#                                  Config checks                                #
#################################################################################


def _check_config(
    input_size, patch_size, in_channels, feature_channels, hidden_size, depth, num_heads, mlp_ratio, bottleneck_dim,
    in_context_len, in_context_start, class_dropout_prob, num_classes, proj_dropout, rope_theta, grad_checkpointing,
    name,
) -> None:
    """Raises a ValueError / TypeError naming the first bad argument."""
    for arg, value in dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, bottleneck_dim=bottleneck_dim,
                           num_classes=num_classes).items():
        check_positive_int(arg, value)
    for arg, value in dict(feature_channels=feature_channels, in_context_len=in_context_len,
                           in_context_start=in_context_start).items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{arg} must be an int, got {value!r}")
        if value < 0:
            raise ValueError(f"{arg} must be >= 0, got {value}")
    checkpointed_block_count(grad_checkpointing, depth)
    if input_size % patch_size:
        raise ValueError(f"input_size ({input_size} pixels) must be divisible by patch_size ({patch_size})")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    if (hidden_size // num_heads) % 4:
        raise ValueError(f"hidden_size / num_heads ({hidden_size // num_heads}) must be divisible by 4 for 2D RoPE")
    if in_context_len and in_context_start >= depth:
        raise ValueError(f"in_context_start ({in_context_start}) must be < depth ({depth}) when in_context_len > 0")
    if not isinstance(mlp_ratio, numbers.Real) or isinstance(mlp_ratio, bool) or \
            swiglu_hidden_size(hidden_size, mlp_ratio) < 1:
        raise ValueError(f"mlp_ratio must be a positive number (SwiGLU width >= 1), got {mlp_ratio!r}")
    if not isinstance(class_dropout_prob, numbers.Real) or not 0.0 <= class_dropout_prob <= 1.0:
        raise ValueError(f"class_dropout_prob must be in [0, 1], got {class_dropout_prob!r}")
    if not isinstance(proj_dropout, numbers.Real) or not 0.0 <= proj_dropout < 1.0:
        raise ValueError(f"proj_dropout must be in [0, 1), got {proj_dropout!r}")
    if not isinstance(rope_theta, numbers.Real) or isinstance(rope_theta, bool) or not rope_theta > 0:
        raise ValueError(f"rope_theta must be a positive number, got {rope_theta!r}")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None, got {name!r}")


#################################################################################
#                                   JiT configs                                 #
#################################################################################

_JIT_SIZES = {  # JiT's model_jit.py: depth / width / heads / bottleneck / in-context start (32 class tokens)
    "B": dict(depth=12, hidden_size=768, num_heads=12, bottleneck_dim=128, in_context_len=32, in_context_start=4),
    "L": dict(depth=24, hidden_size=1024, num_heads=16, bottleneck_dim=128, in_context_len=32, in_context_start=8),
    "H": dict(depth=32, hidden_size=1280, num_heads=16, bottleneck_dim=256, in_context_len=32, in_context_start=10),
}
_JIT_SMALL_SIZES = {  # tests and CPU demos (16x16 digits: patch 2 or 4)
    "Tiny": (dict(depth=4, hidden_size=128, num_heads=4, bottleneck_dim=32, in_context_len=4, in_context_start=1),
             (2, 4)),
    "Micro": (dict(depth=2, hidden_size=64, num_heads=2, bottleneck_dim=16, in_context_len=4, in_context_start=1),
              (2,)),
}

JIT_MODEL_CONFIGS: dict[str, dict] = {
    f"JiT-{size}/{p}": dict(cfg, patch_size=p) for size, cfg in _JIT_SIZES.items() for p in (16, 32)
}
JIT_MODEL_CONFIGS.update({
    f"JiT-{size}/{p}": dict(cfg, patch_size=p) for size, (cfg, patches) in _JIT_SMALL_SIZES.items() for p in patches
})

_JIT_OVERRIDABLE = tuple(a for a in inspect.signature(JiT).parameters if a != "name")


def create_jit_model(name: str, input_size: int = 256, in_channels: int = 3, feature_channels: int = 0,
                     num_classes: int = 1000, class_dropout_prob: float = 0.1, **overrides) -> JiT:
    """Builds a zoo JiT, e.g. `create_jit_model("JiT-B/16", input_size=256, in_channels=3, feature_channels=8)`.

    input_size is in pixels and in_channels counts image channels (see `JiT`). overrides: any other `JiT`
    argument (depth=, hidden_size=, in_context_len=, proj_dropout=, grad_checkpointing=, ...).
    """
    if name not in JIT_MODEL_CONFIGS:
        raise ValueError(f"unknown JiT model name {name!r}; valid names: {', '.join(JIT_MODEL_CONFIGS)}")
    unknown = sorted(set(overrides) - set(_JIT_OVERRIDABLE))
    if unknown:
        raise TypeError(f"create_model({name!r}) got unknown argument(s) {unknown}; valid ones: "
                        f"{', '.join(_JIT_OVERRIDABLE)}")
    kwargs = {**JIT_MODEL_CONFIGS[name], **overrides}
    return JiT(input_size=input_size, in_channels=in_channels, feature_channels=feature_channels,
               num_classes=num_classes, class_dropout_prob=class_dropout_prob, name=name, **kwargs)


def jit_patch_size(name: str, overrides: dict | None = None) -> int:
    """The pixel patch size of zoo model `name` (an override `patch_size=` wins): what a trainer needs before it
    builds the model, to patchify the pixels."""
    if name not in JIT_MODEL_CONFIGS:
        raise ValueError(f"unknown JiT model name {name!r}; valid names: {', '.join(JIT_MODEL_CONFIGS)}")
    return int((overrides or {}).get("patch_size", JIT_MODEL_CONFIGS[name]["patch_size"]))
