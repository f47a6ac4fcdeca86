"""SiT / DiT: a diffusion transformer with adaLN-Zero conditioning on the timestep and the class label.

The architecture, the parameter names and the forward computation are those of the public SiT / DiT / REPA / ReDi
code, so their `model` / `ema` state dicts load here with `strict=True` and give the same outputs:

    x_embedder.proj                Conv2d(C, D, p, stride p)            patch embedding
    t_embedder.mlp.{0,2}           Linear(256, D), Linear(D, D)         timestep embedding (t used as given)
    y_embedder.embedding_table     Embedding(num_classes [+1 null], D)  class embedding, null class = num_classes
    pos_embed                      (1, T, D), frozen 2D sin-cos         in the state dict, like the public code
    blocks.N.{norm1,attn,norm2,mlp,adaLN_modulation.1}                  transformer blocks
    final_layer.{norm_final,linear,adaLN_modulation.1}
    projectors.K.{0,2,4}           only with `projector_dims` (REPA's alignment-loss MLPs); ReDi's single REPA head
                                   `projector.{0,2,4}` (ReDi+REPA, `--repa-loss True`) is read as `projectors.0.*`

Timesteps are passed to the sinusoidal embedding as given: SiT/ReDi/REPA models use t in [0, 1] (t = 1 is data),
DiT checkpoints were trained with integer steps 0..999 (pass those for DiT weights).

References: DiT (Peebles & Xie), SiT (Ma et al.), REPA (Yu et al.), GLIDE, MAE.
"""
import numbers

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention
from .checkpointing import checkpointed_block_count
from .common import check_positive_int, gated_residual, modulate
from .embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder, get_2d_sincos_pos_embed


#################################################################################
#                                 Core SiT Model                                #
#################################################################################

class Mlp(nn.Module):
    """Token-wise MLP (B, T, D) -> (B, T, D): fc1 -> GELU (tanh approximation) -> fc2, as timm's `Mlp`."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning: tokens (B, T, D), condition (B, D) -> (B, T, D).

    The two steps the fused kernels replace stay separate calls: `modulate(norm(x), shift, scale)` before each
    branch, and `gated_residual(x, gate, branch)` after it.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = gated_residual(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))  # (B, T, D)
        x = gated_residual(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))   # (B, T, D)
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map to patch pixels: (B, T, D), (B, D) -> (B, T, p * p * C_out)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def build_projector(hidden_size: int, projector_hidden_size: int, z_dim: int) -> nn.Sequential:
    """REPA's alignment head (B, T, D) -> (B, T, z_dim): Linear -> SiLU -> Linear -> SiLU -> Linear."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_hidden_size), nn.SiLU(),
        nn.Linear(projector_hidden_size, projector_hidden_size), nn.SiLU(),
        nn.Linear(projector_hidden_size, z_dim),
    )


class SiT(nn.Module):
    """Diffusion transformer: x (B, C, H, W), t (B,), y (B,) -> prediction (B, C, H, W).

    learn_sigma: the final layer outputs 2C channels (mean and sigma, as DiT and public SiT checkpoints have them);
        `forward` returns the first C unless `return_sigma=True`.
    class_dropout_prob: probability of replacing a label by the null class `num_classes` in training mode; > 0
        adds the null row to the embedding table (needed for classifier-free guidance).
    qk_norm: LayerNorm on per-head queries and keys (REPA's `--qk-norm`); off in SiT/DiT/ReDi.
    grad_checkpointing: recompute blocks in the backward pass (non-reentrant) to save activation memory: True for
        every block, an int k for the first k only (see `models/checkpointing.py`).
    projector_dims, projector_hidden_size, encoder_depth: REPA's alignment MLPs on the tokens after block
        `encoder_depth`, one per target feature width (e.g. [768]); empty (default) builds none.
    name: the model-zoo name, recorded in `config` only.
    `config` holds every constructor argument, so `SiT(**model.config)` (or `create_model(**model.config)` for a
    zoo model) rebuilds the same architecture.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = False,
        qk_norm: bool = False,
        grad_checkpointing: bool | int = False,
        projector_dims: tuple[int, ...] | list[int] = (),
        projector_hidden_size: int = 2048,
        encoder_depth: int = 8,
        name: str | None = None,
    ):
        config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}  # the arguments above
        super().__init__()
        projector_dims = _check_config(**config)
        # Plain Python values, so the config can go into a checkpoint or JSON and rebuild the model.
        self.config = dict(config, mlp_ratio=float(mlp_ratio), class_dropout_prob=float(class_dropout_prob),
                           projector_dims=list(projector_dims))
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.num_classes = num_classes
        self.input_size = input_size
        self.encoder_depth = encoder_depth
        self.grad_checkpointing = grad_checkpointing

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos table; a frozen Parameter (not a buffer) so the state dict matches the public checkpoints.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)

        self.blocks = nn.ModuleList([
            SiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, qk_norm=qk_norm) for _ in range(depth)
        ])
        if projector_dims:
            self.projectors = nn.ModuleList([
                build_projector(hidden_size, projector_hidden_size, z_dim) for z_dim in projector_dims
            ])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's init: xavier-uniform Linears, zero biases, N(0, 0.02) embeddings, adaLN and output zeroed."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        # Fixed 2D sin-cos position embedding:
        grid = self.x_embedder.grid_size[0]
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)  # (T, D) float64
        self.pos_embed.data.copy_(pos_embed.float().unsqueeze(0))

        # Patch embedding initialized like a Linear on the flattened patch (instead of Conv2d's default):
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every block starts as the identity, and the output starts at zero.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens back to an image: (B, T, p * p * C) -> (B, C, H, W); each token is laid out (p, p, C)."""
        p = self.patch_size
        h, w = self.x_embedder.grid_size
        if x.ndim != 3 or x.shape[1] != h * w or x.shape[2] % (p * p):
            raise ValueError(f"unpatchify: x must be (B, {h * w}, {p}*{p}*C), got {tuple(x.shape)}")
        c = x.shape[2] // (p * p)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)                 # (B, C, h, p, w, p)
        return x.reshape(x.shape[0], c, h * p, w * p)          # (B, C, H, W)

    def _check_inputs(self, x, t, y):
        B, C, S = x.shape[0], self.in_channels, self.input_size
        if x.ndim != 4 or x.shape[1:] != (C, S, S):
            raise ValueError(f"x must be (B, {C}, {S}, {S}) for this model, got {tuple(x.shape)}")
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
        """Patch embedding plus position: x (B, C, H, W) -> tokens (B, T, D). A fused op (the CoReDi joint
        embedding of `coredi_kernels`) may produce these tokens directly and call `forward_tokens`."""
        return self.x_embedder(x) + self.pos_embed

    def _run(self, tokens, t, y, force_drop_ids, with_projections: bool):
        x = tokens                                                              # (B, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)  # (B, D)
        zs = []
        recompute = checkpointed_block_count(self.grad_checkpointing, len(self.blocks))
        recompute = recompute if torch.is_grad_enabled() else 0                 # blocks that recompute
        for i, block in enumerate(self.blocks):
            if i < recompute:
                x = checkpoint(block, x, c, use_reentrant=False)               # (B, T, D)
            else:
                x = block(x, c)                                                 # (B, T, D)
            if with_projections and i + 1 == self.encoder_depth:
                zs = [projector(x) for projector in self.projectors]            # [(B, T, z_dim)]
        x = self.final_layer(x, c)                                              # (B, T, p * p * C_out)
        return self.unpatchify(x), zs                                           # (B, C_out, H, W)

    def _split_sigma(self, out, return_sigma: bool):
        if return_sigma and not self.learn_sigma:
            raise ValueError("return_sigma=True needs a model built with learn_sigma=True")
        if not self.learn_sigma:
            return out
        prediction, sigma = out.chunk(2, dim=1)
        return (prediction, sigma) if return_sigma else prediction

    def forward(self, x, t, y, force_drop_ids=None, return_sigma: bool = False):
        """x (B, C, H, W), t (B,) or scalar, y (B,) long (y == num_classes: the null class) -> (B, C, H, W).

        force_drop_ids: (B,), 1 where the label is replaced by the null class, in any mode (public DiT's hook).
        return_sigma: with learn_sigma, return the pair (prediction, sigma channels), each (B, C, H, W).
        """
        t = self._check_inputs(x, t, y)
        out, _ = self._run(self.embed(x), t, y, force_drop_ids, with_projections=False)
        return self._split_sigma(out, return_sigma)

    def forward_tokens(self, tokens, t, y, force_drop_ids=None, return_sigma: bool = False):
        """Like `forward`, from already embedded tokens (B, T, D) = `self.embed(x)`."""
        B, T, D = tokens.shape
        if T != self.x_embedder.num_patches or D != self.hidden_size:
            raise ValueError(f"tokens must be (B, {self.x_embedder.num_patches}, {self.hidden_size}), "
                             f"got {tuple(tokens.shape)}")
        if t.ndim == 0:
            t = t.expand(B)
        out, _ = self._run(tokens, t, y, force_drop_ids, with_projections=False)
        return self._split_sigma(out, return_sigma)

    def forward_with_projections(self, x, t, y, force_drop_ids=None):
        """REPA's forward: (prediction (B, C, H, W), [projector output (B, T, z_dim) for each projector])."""
        if not hasattr(self, "projectors"):
            raise ValueError("this model has no REPA projectors: build it with projector_dims=[...]")
        t = self._check_inputs(x, t, y)
        out, zs = self._run(self.embed(x), t, y, force_drop_ids, with_projections=True)
        prediction = out[:, : self.in_channels] if self.learn_sigma else out
        return prediction, zs

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """`nn.Module.load_state_dict`, plus: ReDi's `projector.*` keys are read as REPA's `projectors.0.*`
        (`convert_redi_state_dict`), and a clear error when REPA/ReDi projector weights meet a model built without
        them (strict): build with `projector_dims` to keep them, or pass strict=False."""
        state_dict = convert_redi_state_dict(state_dict)
        if strict and not hasattr(self, "projectors"):
            extra = sorted(k for k in state_dict if k.startswith("projectors."))
            if extra:
                raise ValueError(_projector_advice(state_dict, extra))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


# Key prefixes of REPA's alignment heads: ReDi+REPA's one `projector`, REPA's list `projectors`. They serve only
# REPA's training loss; loaders that do not train it drop them.
REPA_HEAD_PREFIXES = ("projector.", "projectors.")


def convert_redi_state_dict(state_dict: dict) -> dict:
    """ReDi's SiT (zelaki/ReDi models.py, `repa_loss=True`) names its one REPA head `projector` (an
    nn.Sequential Linear-SiLU-Linear-SiLU-Linear, `build_mlp(hidden, 2048, 768)`, applied after block
    `repa_layer`); REPA and this package keep a list, `projectors`. Returns the state dict with `projector.*` renamed
    to `projectors.0.*` (the same tensors); a state dict without `projector.*` keys is returned as it is."""
    if not any(key.startswith("projector.") for key in state_dict):
        return state_dict
    if any(key.startswith("projectors.") for key in state_dict):
        raise ValueError("state_dict has both ReDi's `projector.*` and REPA's `projectors.*` keys; expected one")
    return {"projectors.0." + key[len("projector."):] if key.startswith("projector.") else key: value
            for key, value in state_dict.items()}


def _projector_advice(state_dict, extra_keys) -> str:
    """Error text for REPA projector weights, with the projector sizes read off the state dict."""
    dims, width = [], None
    k = 0
    while f"projectors.{k}.4.weight" in state_dict:
        dims.append(int(state_dict[f"projectors.{k}.4.weight"].shape[0]))
        width = int(state_dict[f"projectors.{k}.0.weight"].shape[0])
        k += 1
    shown = ", ".join(extra_keys[:6]) + (", ..." if len(extra_keys) > 6 else "")
    build = f"projector_dims={dims}, projector_hidden_size={width}, " if dims else "projector_dims=[...], "
    return (
        f"state_dict has {len(extra_keys)} REPA projector weights that this model lacks ({shown}; ReDi's "
        f"`projector.*` are read as `projectors.0.*`). They serve only REPA's alignment loss. To keep them, build "
        f"the model with {build}encoder_depth=<REPA's --encoder-depth or ReDi's --repa-layer, 8 by default>; to "
        f"ignore them, call load_state_dict(state_dict, strict=False)."
    )


def _check_config(
    input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio, class_dropout_prob, num_classes,
    learn_sigma, qk_norm, grad_checkpointing, projector_dims, projector_hidden_size, encoder_depth, name,
) -> tuple[int, ...]:
    """Raises a ValueError / TypeError naming the first bad argument; returns projector_dims as a tuple."""
    for arg, value in dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, num_classes=num_classes,
                           projector_hidden_size=projector_hidden_size, encoder_depth=encoder_depth).items():
        check_positive_int(arg, value)
    for arg, value in dict(learn_sigma=learn_sigma, qk_norm=qk_norm).items():
        if not isinstance(value, bool):
            raise TypeError(f"{arg} must be a bool, got {value!r}")
    checkpointed_block_count(grad_checkpointing, depth)
    if input_size % patch_size:
        raise ValueError(f"input_size ({input_size}) must be divisible by patch_size ({patch_size})")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    if hidden_size % 4:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by 4 for the 2D sin-cos position embedding")
    if not isinstance(mlp_ratio, numbers.Real) or isinstance(mlp_ratio, bool) or int(hidden_size * mlp_ratio) < 1:
        raise ValueError(f"mlp_ratio must be a positive number (hidden_size * mlp_ratio >= 1), got {mlp_ratio!r}")
    if not isinstance(class_dropout_prob, numbers.Real) or not 0.0 <= class_dropout_prob <= 1.0:
        raise ValueError(f"class_dropout_prob must be in [0, 1], got {class_dropout_prob!r}")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None, got {name!r}")
    if isinstance(projector_dims, (str, bytes)) or not isinstance(projector_dims, (tuple, list)):
        raise TypeError(f"projector_dims must be a list of ints, got {projector_dims!r}")
    for z_dim in projector_dims:
        check_positive_int("projector_dims", z_dim)
    if projector_dims and encoder_depth > depth:
        raise ValueError(f"encoder_depth ({encoder_depth}) must be <= depth ({depth}) to attach REPA projectors")
    return tuple(int(z) for z in projector_dims)


#################################################################################
#                               SiT / DiT Configs                               #
#################################################################################

_SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
_SMALL_SIZES = {  # for tests and CPU demos; patch 1 suits pixel-space 16x16 images
    "Tiny": (dict(depth=4, hidden_size=128, num_heads=4), (1, 2, 4)),
    "Micro": (dict(depth=2, hidden_size=64, num_heads=2), (1, 2)),
}

# DiT-* and SiT-* share the architecture (DiT checkpoints expect integer timesteps and usually learn_sigma=True).
MODEL_CONFIGS: dict[str, dict] = {
    f"{family}-{size}/{p}": dict(cfg, patch_size=p)
    for family in ("SiT", "DiT") for size, cfg in _SIZES.items() for p in (2, 4, 8)
}
MODEL_CONFIGS.update({
    f"SiT-{size}/{p}": dict(cfg, patch_size=p) for size, (cfg, patches) in _SMALL_SIZES.items() for p in patches
})
