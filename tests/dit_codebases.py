"""Small models in the style of five public DiT codebases, for the drop-in tests of `patch_dit` / `patch_jit`.

Written for these tests (not copied): each keeps its codebase's attribute layout and calling convention, which is
all the patch sees.

    DiT           facebookresearch/DiT   timm Attention/Mlp, block(x, c), learn_sigma, forward_with_cfg
    REPA          sihyun-yu/REPA         DiT blocks (qk-norm on or off), projectors after block `encoder_depth`,
                                         forward returns (x, zs)
    fast-DiT      chuanyangjin/fast-DiT  every block run through torch.utils.checkpoint (reentrant or not)
    LightningDiT  hustvl/LightningDiT    block(x, c, feat_rope); attn(x, rope=...); RMSNorm or LayerNorm, SwiGLU,
                                         qk-norm, EVA-02 rotary module, wo_shift (4-way adaLN), reentrant
                                         checkpointing, forward_with_cfg
    JiT           LTH14/JiT              RMSNorm with `variance_epsilon`, SwiGLU, qk-norm, rotary modules whose
                                         tables are plain attributes with identity rows for the in-context class
                                         tokens, class tokens inserted before block `in_context_start`, attention
                                         and projection dropout in the middle half of the blocks

One deliberate difference: where the public code computes a norm or the attention in float32 (`x.float()`), these
compute in at least float32, so a float64 model stays float64 and the patched model can be compared in float64.

`GridRotaryEmbedding` is the rotary module both LightningDiT and JiT use (EVA-02's `VisionRotaryEmbeddingFast`
layout): for head dim Dh, built with dim = Dh/2 on a G x G grid, it holds freqs_cos / freqs_sin (T, Dh) with
grid token (r, c) = row r·G + c rotating channel pair (2j, 2j + 1) by r·θ_j for j < Dh/4 and by c·θ_(j − Dh/4)
after, θ_i = theta^(−i / (Dh/4)); both channels of a pair hold the same angle, and forward(q) = q·cos +
rotate_pairs(q)·sin with rotate_pairs: (a, b) -> (−b, a) per pair.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from test_sit_compat import Mlp, PatchEmbed, RefLabels, RefSiT, RefTimestep, ref_pos_embed, ref_timestep_features


def at_least_fp32(x):
    return x.to(torch.promote_types(x.dtype, torch.float32))


class TimestepEmbedder(RefTimestep):
    """DiT's timestep MLP on GLIDE features, in the dtype of its weights (float64 models stay float64)."""

    def forward(self, t):
        return self.mlp(ref_timestep_features(t).to(self.mlp[0].weight.dtype))


def dtype_following(model):
    """A RefSiT whose timestep embedder follows the model's dtype (same parameter names)."""
    model.t_embedder = TimestepEmbedder(model.t_embedder.mlp[0].out_features)
    return model


def dit_guidance(forward, x, t, y, cfg_scale):
    """DiT's (and LightningDiT's) `forward_with_cfg`: the first half of the batch twice (the labels of the second
    half are the null class), guidance on the first 3 channels."""
    half = x[: len(x) // 2]
    out = forward(torch.cat([half, half], dim=0), t, y)
    eps, rest = out[:, :3], out[:, 3:]
    cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


# ---------------------------------------------------------------------------------------------------------------
# DiT, REPA, fast-DiT: the public SiT/DiT structure on timm modules (test_sit_compat.RefSiT)
# ---------------------------------------------------------------------------------------------------------------


class DiTStyle(RefSiT):
    """facebookresearch/DiT: forward(x, t, y) -> (B, out_channels, H, W) and forward_with_cfg."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        dtype_following(self)

    def forward(self, x, t, y, force_drop_ids=None):
        return super().forward(x, t, y, force_drop_ids)[0]

    def forward_with_cfg(self, x, t, y, cfg_scale):
        return dit_guidance(self.forward, x, t, y, cfg_scale)


def repa_style(qk_norm: bool, depth=3, encoder_depth=2, z_dims=(24,)):
    """sihyun-yu/REPA's SiT: qk-norm (timm's LayerNorm) on or off, projectors reading the tokens after block
    `encoder_depth`; forward returns (x, zs)."""
    return dtype_following(RefSiT(8, 2, 4, 64, depth, 4, 10, learn_sigma=False, qk_norm=qk_norm, z_dims=z_dims,
                                  projector_dim=32, encoder_depth=encoder_depth))


class FastDiTStyle(DiTStyle):
    """chuanyangjin/fast-DiT: every block runs through torch.utils.checkpoint, wrapped as fast-DiT wraps it."""

    use_reentrant = False

    @staticmethod
    def ckpt_wrapper(module):
        def ckpt_forward(*inputs):
            return module(*inputs)
        return ckpt_forward

    def forward(self, x, t, y, force_drop_ids=None):
        if force_drop_ids is not None:
            y = torch.where(force_drop_ids.bool(), torch.full_like(y, self.num_classes), y)
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            h = checkpoint(self.ckpt_wrapper(block), h, c, use_reentrant=self.use_reentrant)
        out = self.final_layer(h, c)
        B, p, g = x.shape[0], self.patch, x.shape[-1] // self.patch
        out = out.view(B, g, g, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(B, self.out_channels, g * p, g * p)


# ---------------------------------------------------------------------------------------------------------------
# Shared by LightningDiT and JiT
# ---------------------------------------------------------------------------------------------------------------


def rotate_pairs(x):
    """(..., Dh) -> each channel pair (a, b) = (x_2j, x_2j+1) replaced by (−b, a)."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-b, a), dim=-1).flatten(-2)


class GridRotaryEmbedding(nn.Module):
    """EVA-02's 2D rotary module (see the module docstring). dim = Dh/2; `num_cls_token` identity rows first (JiT);
    as_buffers: register the tables as buffers (LightningDiT) or keep them as plain attributes (JiT)."""

    def __init__(self, dim, pt_seq_len, num_cls_token=0, theta=10000.0, as_buffers=True):
        super().__init__()
        freqs = theta ** (-torch.arange(0, dim, 2)[: dim // 2].float() / dim)        # (Dh/4,)
        axis = torch.outer(torch.arange(pt_seq_len).float(), freqs)                  # (G, Dh/4)
        axis = axis.repeat_interleave(2, dim=-1)                                     # (G, Dh/2): pairs
        G = pt_seq_len
        rows, cols = axis[:, None, :].expand(G, G, -1), axis[None, :, :].expand(G, G, -1)
        angles = torch.cat([rows, cols], dim=-1).reshape(G * G, 2 * dim)              # (T, Dh)
        cos, sin = angles.cos(), angles.sin()
        if num_cls_token:
            cos = torch.cat([torch.ones(num_cls_token, 2 * dim), cos])
            sin = torch.cat([torch.zeros(num_cls_token, 2 * dim), sin])
        if as_buffers:
            self.register_buffer("freqs_cos", cos)
            self.register_buffer("freqs_sin", sin)
        else:
            self.freqs_cos, self.freqs_sin = cos, sin

    def forward(self, t):
        return t * self.freqs_cos + rotate_pairs(t) * self.freqs_sin


class SwiGLUFFN(nn.Module):
    """LightningDiT's / JiT's SwiGLU: w3(silu(a)·b) with (a, b) = w12(x).chunk(2) (JiT: dropout before w3)."""

    def __init__(self, dim, hidden, drop=0.0):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)
        self.ffn_dropout = nn.Dropout(drop)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(self.ffn_dropout(F.silu(a) * b))


def unpatchify(x, p, channels):
    """(N, T, p·p·C) -> (N, C, h·p, w·p), as DiT's `unpatchify`."""
    h = w = int(x.shape[1] ** 0.5)
    x = x.reshape(x.shape[0], h, w, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], channels, h * p, w * p)


# ---------------------------------------------------------------------------------------------------------------
# LightningDiT
# ---------------------------------------------------------------------------------------------------------------


class LightningRMSNorm(nn.Module):
    """LLaMA's RMSNorm as LightningDiT uses it: `eps` and `weight`, weight applied after the cast back."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = at_least_fp32(x)
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def lightning_modulate(x, shift, scale):
    if shift is None:
        return x * (1 + scale.unsqueeze(1))
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class LightningAttention(nn.Module):
    def __init__(self, dim, num_heads, qk_norm, use_rmsnorm):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        norm = LightningRMSNorm if use_rmsnorm else nn.LayerNorm
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, rope=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class LightningBlock(nn.Module):
    def __init__(self, dim, num_heads, qk_norm, use_swiglu, use_rmsnorm, wo_shift):
        super().__init__()
        if use_rmsnorm:
            self.norm1, self.norm2 = LightningRMSNorm(dim), LightningRMSNorm(dim)
        else:
            self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = LightningAttention(dim, num_heads, qk_norm, use_rmsnorm)
        if use_swiglu:
            self.mlp = SwiGLUFFN(dim, int(2 / 3 * 4 * dim))
        else:
            self.mlp = Mlp(in_features=dim, hidden_features=4 * dim, act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (4 if wo_shift else 6) * dim, bias=True))
        self.wo_shift = wo_shift

    def forward(self, x, c, feat_rope=None):
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(lightning_modulate(self.norm1(x), shift_msa, scale_msa),
                                                  rope=feat_rope)
        return x + gate_mlp.unsqueeze(1) * self.mlp(lightning_modulate(self.norm2(x), shift_mlp, scale_mlp))


class LightningFinalLayer(nn.Module):
    def __init__(self, dim, patch, out_channels, use_rmsnorm):
        super().__init__()
        self.norm_final = (LightningRMSNorm(dim) if use_rmsnorm
                           else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
        self.linear = nn.Linear(dim, patch * patch * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(lightning_modulate(self.norm_final(x), shift, scale))


class LightningDiTStyle(nn.Module):
    """hustvl/LightningDiT; its released configuration is use_rmsnorm, use_swiglu, use_rope, no qk-norm."""

    def __init__(self, input_size=8, patch=2, in_channels=4, dim=64, depth=2, heads=4, num_classes=10,
                 learn_sigma=False, use_qknorm=False, use_swiglu=True, use_rope=True, use_rmsnorm=True,
                 wo_shift=False, use_checkpoint=False):
        super().__init__()
        self.learn_sigma, self.in_channels, self.patch_size = learn_sigma, in_channels, patch
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.use_checkpoint = use_checkpoint
        self.x_embedder = PatchEmbed(input_size, patch, in_channels, dim, bias=True)
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = RefLabels(num_classes, dim)
        self.pos_embed = nn.Parameter(ref_pos_embed(dim, input_size // patch), requires_grad=False)
        self.feat_rope = GridRotaryEmbedding(dim // heads // 2, input_size // patch) if use_rope else None
        self.blocks = nn.ModuleList([LightningBlock(dim, heads, use_qknorm, use_swiglu, use_rmsnorm, wo_shift)
                                     for _ in range(depth)])
        self.final_layer = LightningFinalLayer(dim, patch, self.out_channels, use_rmsnorm)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            if self.use_checkpoint:
                x = checkpoint(block, x, c, self.feat_rope, use_reentrant=True)
            else:
                x = block(x, c, self.feat_rope)
        x = unpatchify(self.final_layer(x, c), self.patch_size, self.out_channels)
        return x.chunk(2, dim=1)[0] if self.learn_sigma else x

    def forward_with_cfg(self, x, t, y, cfg_scale):
        return dit_guidance(self.forward, x, t, y, cfg_scale)


# ---------------------------------------------------------------------------------------------------------------
# JiT
# ---------------------------------------------------------------------------------------------------------------


class JiTRMSNorm(nn.Module):
    """T5/LLaMA RMSNorm as JiT writes it: `weight` and `variance_epsilon`, weight applied in float32."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        hs = at_least_fp32(hidden_states)
        hs = hs * torch.rsqrt(hs.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight * hs).to(dtype)


def jit_attention_math(query, key, value, dropout_p=0.0):
    """JiT's attention written out, softmax(q·kᵀ/sqrt(Dh)) in at least float32, dropout on the weights."""
    scale = 1 / math.sqrt(query.size(-1))
    weights = at_least_fp32(query) @ at_least_fp32(key).transpose(-2, -1) * scale
    weights = torch.dropout(torch.softmax(weights, dim=-1), dropout_p, train=True)
    return weights.to(value.dtype) @ value


class JiTAttention(nn.Module):
    def __init__(self, dim, num_heads, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.q_norm, self.k_norm = JiTRMSNorm(head_dim), JiTRMSNorm(head_dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, rope):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q, k = rope(self.q_norm(q)), rope(self.k_norm(k))
        x = jit_attention_math(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class JiTBlock(nn.Module):
    def __init__(self, dim, num_heads, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.norm1 = JiTRMSNorm(dim, eps=1e-6)
        self.attn = JiTAttention(dim, num_heads, attn_drop, proj_drop)
        self.norm2 = JiTRMSNorm(dim, eps=1e-6)
        self.mlp = SwiGLUFFN(dim, int(4 * dim * 2 / 3), drop=proj_drop)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))

    def forward(self, x, c, feat_rope=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale_msa.unsqueeze(1)) + shift_msa.unsqueeze(1)
        x = x + gate_msa.unsqueeze(1) * self.attn(h, rope=feat_rope)
        h = self.norm2(x) * (1 + scale_mlp.unsqueeze(1)) + shift_mlp.unsqueeze(1)
        return x + gate_mlp.unsqueeze(1) * self.mlp(h)


class JiTFinalLayer(nn.Module):
    def __init__(self, dim, patch, out_channels):
        super().__init__()
        self.norm_final = JiTRMSNorm(dim)
        self.linear = nn.Linear(dim, patch * patch * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(self.norm_final(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1))


class BottleneckPatchEmbed(nn.Module):
    def __init__(self, patch, in_chans, bottleneck, dim):
        super().__init__()
        self.proj1 = nn.Conv2d(in_chans, bottleneck, kernel_size=patch, stride=patch, bias=False)
        self.proj2 = nn.Conv2d(bottleneck, dim, kernel_size=1, stride=1, bias=True)

    def forward(self, x):
        return self.proj2(self.proj1(x)).flatten(2).transpose(1, 2)


class JiTStyle(nn.Module):
    """LTH14/JiT: class-conditional, `in_context_len` class tokens (label embedding + learned positions) prepended
    before block `in_context_start`, rope without / with their identity rows before / after, dropout in the middle
    half of the blocks; forward(x, t, y)."""

    def __init__(self, input_size=8, patch=2, in_channels=3, dim=32, depth=4, heads=2, num_classes=10,
                 bottleneck=8, in_context_len=2, in_context_start=1, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.out_channels, self.patch_size = in_channels, patch
        self.in_context_len, self.in_context_start = in_context_len, in_context_start
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = RefLabels(num_classes, dim)
        self.x_embedder = BottleneckPatchEmbed(patch, in_channels, bottleneck, dim)
        grid = input_size // patch
        self.pos_embed = nn.Parameter(ref_pos_embed(dim, grid), requires_grad=False)
        if in_context_len:
            self.in_context_posemb = nn.Parameter(torch.randn(1, in_context_len, dim) * 0.02)
        half_head_dim = dim // heads // 2
        self.feat_rope = GridRotaryEmbedding(half_head_dim, grid, as_buffers=False)
        self.feat_rope_incontext = GridRotaryEmbedding(half_head_dim, grid, in_context_len, as_buffers=False)
        middle = range(depth // 4, depth // 4 * 3)
        self.blocks = nn.ModuleList([
            JiTBlock(dim, heads, attn_drop if i in middle else 0.0, proj_drop if i in middle else 0.0)
            for i in range(depth)])
        self.final_layer = JiTFinalLayer(dim, patch, in_channels)

    def forward(self, x, t, y):
        y_emb = self.y_embedder.embedding_table(y)
        c = self.t_embedder(t) + y_emb
        x = self.x_embedder(x) + self.pos_embed
        for i, block in enumerate(self.blocks):
            if self.in_context_len > 0 and i == self.in_context_start:
                tokens = y_emb.unsqueeze(1).repeat(1, self.in_context_len, 1) + self.in_context_posemb
                x = torch.cat([tokens, x], dim=1)
            x = block(x, c, self.feat_rope if i < self.in_context_start else self.feat_rope_incontext)
        x = x[:, self.in_context_len:]
        return unpatchify(self.final_layer(x, c), self.patch_size, self.out_channels)
