"""State-dict and output compatibility of `coredi_fast.models` with the public SiT / DiT / REPA / ReDi models.

The reference below re-creates the public SiT structure from timm's own `PatchEmbed`, `Attention` and `Mlp`, composed
the way the public `models.py` composes them (written for this test), with its own timestep, label and position
embeddings. Its weights are randomized everywhere (adaLN-Zero would otherwise make every output zero), then loaded
strictly into our model, and the outputs must agree in fp32.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from coredi_fast.models import create_model

timm_vit = pytest.importorskip("timm.models.vision_transformer")
PatchEmbed, Attention, Mlp = timm_vit.PatchEmbed, timm_vit.Attention, timm_vit.Mlp

ATOL = 1e-5


# ----------------------------------------------------------------------------------------------------------------
# Reference: public SiT's structure on timm modules
# ----------------------------------------------------------------------------------------------------------------

def ref_timestep_features(t, dim=256):
    """GLIDE features in float64: [cos(t f_k)] ++ [sin(t f_k)], f_k = 10000^(-k/half)."""
    half = dim // 2
    freqs = torch.tensor([10000.0 ** (-k / half) for k in range(half)], dtype=torch.float64)
    angles = t.double()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


def ref_pos_embed(dim, grid):
    """MAE's table, spelled with numpy as MAE does: meshgrid(w, h) puts the column coordinate first."""
    coords = np.stack(np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64)), axis=0)

    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([one_axis(dim // 2, coords[0]), one_axis(dim // 2, coords[1])], axis=1)
    return torch.from_numpy(table).float()[None]


class RefBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, qk_norm):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads=heads, qkv_bias=True, qk_norm=qk_norm,
                              norm_layer=nn.LayerNorm if qk_norm else None)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio),
                       act_layer=lambda: nn.GELU(approximate="tanh"), drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))

    def forward(self, x, c):
        mod = self.adaLN_modulation(c)[:, None, :]                  # (B, 1, 6D)
        shift1, scale1, gate1, shift2, scale2, gate2 = torch.split(mod, x.shape[-1], dim=-1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class RefFinal(nn.Module):
    def __init__(self, dim, patch, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=True))

    def forward(self, x, c):
        shift, scale = torch.split(self.adaLN_modulation(c)[:, None, :], x.shape[-1], dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class RefTimestep(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(ref_timestep_features(t))


class RefLabels(nn.Module):
    def __init__(self, num_classes, dim):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)


class RefSiT(nn.Module):
    """Public SiT (and REPA's SiT when `z_dims` is given), built on timm's modules."""

    def __init__(self, input_size, patch, in_channels, dim, depth, heads, num_classes, learn_sigma,
                 qk_norm=False, z_dims=(), projector_dim=32, encoder_depth=1):
        super().__init__()
        self.patch, self.num_classes, self.encoder_depth = patch, num_classes, encoder_depth
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.x_embedder = PatchEmbed(input_size, patch, in_channels, dim, bias=True)
        self.t_embedder = RefTimestep(dim)
        self.y_embedder = RefLabels(num_classes, dim)
        self.pos_embed = nn.Parameter(ref_pos_embed(dim, input_size // patch), requires_grad=False)
        self.blocks = nn.ModuleList([RefBlock(dim, heads, 4.0, qk_norm) for _ in range(depth)])
        if z_dims:
            self.projectors = nn.ModuleList([
                nn.Sequential(nn.Linear(dim, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim),
                              nn.SiLU(), nn.Linear(projector_dim, z)) for z in z_dims
            ])
        self.final_layer = RefFinal(dim, patch, self.out_channels)

    def forward(self, x, t, y, force_drop_ids=None):
        """Returns the full output (B, out_channels, H, W) and the REPA projections."""
        if force_drop_ids is not None:
            y = torch.where(force_drop_ids.bool(), torch.full_like(y, self.num_classes), y)
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder.embedding_table(y)
        zs = []
        for i, block in enumerate(self.blocks):
            h = block(h, c)
            if i + 1 == self.encoder_depth and hasattr(self, "projectors"):
                zs = [proj(h) for proj in self.projectors]
        out = self.final_layer(h, c)                                    # (B, T, p*p*C) with (p, q, c) per token
        B, p, g = x.shape[0], self.patch, x.shape[-1] // self.patch
        out = out.view(B, g, g, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)  # (B, C, g, p, g, p)
        return out.reshape(B, self.out_channels, g * p, g * p), zs


def randomize_(module, std=0.05):
    """Non-zero weights everywhere but the fixed position table (adaLN-Zero would hide any mismatch)."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name != "pos_embed":
                param.copy_(torch.randn(param.shape, generator=g) * std + (1.0 if name.endswith("norm.weight") else 0))
    return module


def inputs(batch=3, channels=4, size=8, num_classes=10, integer_t=False):
    x = torch.randn(batch, channels, size, size)
    t = torch.randint(0, 1000, (batch,)).float() if integer_t else torch.rand(batch)
    y = torch.randint(0, num_classes, (batch,))
    return x, t, y


# ----------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, input_size, heads",
                         [("SiT-Micro/2", 8, 4), ("SiT-Tiny/1", 4, 4), ("SiT-Micro/2", 8, 1)])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_public_state_dict_loads_strictly_and_matches(name, input_size, heads, learn_sigma):
    ours = create_model(name, input_size=input_size, num_classes=10, learn_sigma=learn_sigma, num_heads=heads).eval()
    cfg = ours.config
    ref = RefSiT(input_size, cfg["patch_size"], 4, cfg["hidden_size"], cfg["depth"], heads, 10, learn_sigma)
    randomize_(ref).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)

    x, t, y = inputs(size=input_size)
    with torch.no_grad():
        expected, _ = ref(x, t, y)
        got = ours(x, t, y)
        torch.testing.assert_close(got, expected[:, :4], atol=ATOL, rtol=0)
        assert got.abs().mean() > 1e-2                              # a real, non-trivial output was compared
        if learn_sigma:
            mean, sigma = ours(x, t, y, return_sigma=True)
            torch.testing.assert_close(torch.cat([mean, sigma], dim=1), expected, atol=ATOL, rtol=0)


def test_pos_embed_of_fresh_model_equals_public_table():
    ours = create_model("SiT-Tiny/2", input_size=16)
    torch.testing.assert_close(ours.pos_embed, ref_pos_embed(128, 8), atol=1e-6, rtol=0)


def test_dit_integer_timesteps_and_forced_label_drop_match():
    ours = create_model("DiT-S/8", input_size=16, num_classes=10, learn_sigma=True, depth=2).eval()
    ref = randomize_(RefSiT(16, 8, 4, 384, 2, 6, 10, learn_sigma=True)).eval()
    ours.load_state_dict(ref.state_dict())
    x, t, y = inputs(batch=4, size=16, integer_t=True)
    drop = torch.tensor([1, 0, 0, 1])
    with torch.no_grad():
        expected, _ = ref(x, t, y, force_drop_ids=drop)
        got = ours(x, t, y, force_drop_ids=drop)
    # Angles up to 1000 rad: float32 frequencies (ours, as the public code) vs float64 (reference) differ by ~1e-4.
    torch.testing.assert_close(got, expected[:, :4], atol=2e-4, rtol=0)


def test_gradients_match_reference():
    ours = create_model("SiT-Micro/2", input_size=8, num_classes=10, num_heads=4)
    ref = randomize_(RefSiT(8, 2, 4, 64, 2, 4, 10, learn_sigma=False))
    ours.load_state_dict(ref.state_dict())
    x, t, y = inputs()
    drop = torch.zeros(3, dtype=torch.long)                          # deterministic labels in train mode
    ref(x, t, y, force_drop_ids=drop)[0].square().sum().backward()
    ours(x, t, y, force_drop_ids=drop).square().sum().backward()
    ref_grads = dict(ref.named_parameters())
    for name, param in ours.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, ref_grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_our_state_dict_loads_strictly_into_reference():
    ours = randomize_(create_model("SiT-Micro/2", input_size=8, num_classes=10, learn_sigma=True)).eval()
    ref = RefSiT(8, 2, 4, 64, 2, 2, 10, learn_sigma=True).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, y), ref(x, t, y)[0][:, :4], atol=ATOL, rtol=0)


def test_qk_norm_matches_timm():
    ours = create_model("SiT-Micro/2", input_size=8, num_classes=10, num_heads=4, qk_norm=True).eval()
    ref = randomize_(RefSiT(8, 2, 4, 64, 2, 4, 10, learn_sigma=False, qk_norm=True)).eval()
    with torch.no_grad():                                           # small q, k: the LayerNorm eps (1e-5) matters
        for block in ref.blocks:
            block.attn.qkv.weight[:128].mul_(0.05)                 # the q and k rows
            block.attn.qkv.bias[:128].mul_(0.05)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, y), ref(x, t, y)[0], atol=ATOL, rtol=0)


def test_repa_state_dict_strict_load_explains_extra_keys():
    ref = randomize_(RefSiT(8, 2, 4, 64, 2, 2, 10, learn_sigma=False, z_dims=(24, 16), projector_dim=32)).eval()
    ours = create_model("SiT-Micro/2", input_size=8, num_classes=10).eval()
    with pytest.raises(ValueError) as info:
        ours.load_state_dict(ref.state_dict(), strict=True)
    message = str(info.value)
    assert "projectors.0.0.weight" in message and "strict=False" in message
    assert "projector_dims=[24, 16], projector_hidden_size=32" in message   # sizes read off the checkpoint
    assert "12 REPA projector weights" in message                          # 2 projectors x 3 Linear x (w, b)

    # strict=False drops exactly the projector keys and the diffusion output is unchanged.
    result = ours.load_state_dict(ref.state_dict(), strict=False)
    assert result.missing_keys == [] and all(k.startswith("projectors.") for k in result.unexpected_keys)
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, y), ref(x, t, y)[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("encoder_depth", [1, 2])
def test_repa_state_dict_loads_strictly_with_projectors(encoder_depth):
    ref = RefSiT(8, 2, 4, 64, 2, 2, 10, learn_sigma=False, z_dims=(24,), projector_dim=32,
                 encoder_depth=encoder_depth)
    randomize_(ref).eval()
    ours = create_model("SiT-Micro/2", input_size=8, num_classes=10, projector_dims=[24], projector_hidden_size=32,
                        encoder_depth=encoder_depth).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t, y = inputs()
    with torch.no_grad():
        expected, expected_zs = ref(x, t, y)
        got, zs = ours.forward_with_projections(x, t, y)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        assert len(zs) == 1 and zs[0].shape == (3, 16, 24)
        torch.testing.assert_close(zs[0], expected_zs[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(ours(x, t, y), expected, atol=ATOL, rtol=0)
    ref.load_state_dict(ours.state_dict(), strict=True)             # and back


def test_reference_uses_the_timestep_convention_we_document():
    """Guards the reference itself: cos first, then sin, frequencies 10000^(-k/128)."""
    t = torch.tensor([0.5])
    feats = ref_timestep_features(t)
    assert math.isclose(feats[0, 0].item(), math.cos(0.5), abs_tol=1e-7)
    assert math.isclose(feats[0, 128].item(), math.sin(0.5), abs_tol=1e-7)
    assert math.isclose(feats[0, 129].item(), math.sin(0.5 * 10000 ** (-1 / 128)), abs_tol=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# ReDi + REPA: ReDi's SiT names its one REPA head `projector` (zelaki/ReDi models.py)
# ----------------------------------------------------------------------------------------------------------------

class RefReDiSiT(RefSiT):
    """ReDi's SiT with `repa_loss=True`: the attribute layout of zelaki/ReDi's models.py, where the REPA head is one
    `self.projector = build_mlp(hidden, projector_dim, z_dim)` (Linear, SiLU, Linear, SiLU, Linear) applied to the
    tokens after block `repa_layer`, flattened to (N*T, D) and back. Written for this test on RefSiT's pieces."""

    def __init__(self, *args, z_dim=24, projector_dim=32, repa_layer=1, **kwargs):
        super().__init__(*args, **kwargs)
        dim = self.pos_embed.shape[-1]
        self.repa_layer = repa_layer
        self.projector = nn.Sequential(nn.Linear(dim, projector_dim), nn.SiLU(),
                                       nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                                       nn.Linear(projector_dim, z_dim))

    def forward(self, x, t, y, force_drop_ids=None):
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder.embedding_table(y)
        n, tokens, dim = h.shape
        zs = None
        for i, block in enumerate(self.blocks):
            h = block(h, c)
            if i + 1 == self.repa_layer:
                zs = self.projector(h.reshape(-1, dim)).reshape(n, tokens, -1)
        out = self.final_layer(h, c)
        B, p, g = x.shape[0], self.patch, x.shape[-1] // self.patch
        out = out.view(B, g, g, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(B, self.out_channels, g * p, g * p), zs


def _redi_repa_reference(repa_layer=2):
    """ReDi+REPA on 4 latent + 2 feature channels (learn_sigma=False, as train_redi.py builds it)."""
    ref = RefReDiSiT(8, 2, 6, 64, 2, 2, 10, learn_sigma=False, z_dim=24, projector_dim=32, repa_layer=repa_layer)
    return randomize_(ref).eval()


def _redi_inputs():
    x, t, y = inputs()
    return torch.randn(x.shape[0], 6, 8, 8, generator=torch.Generator().manual_seed(5)), t, y


@pytest.mark.parametrize("repa_layer", [1, 2])
def test_redi_repa_state_dict_loads_with_its_projector(repa_layer):
    ref = _redi_repa_reference(repa_layer)
    assert any(k.startswith("projector.") for k in ref.state_dict())
    ours = create_model("SiT-Micro/2", input_size=8, in_channels=6, num_classes=10, projector_dims=[24],
                        projector_hidden_size=32, encoder_depth=repa_layer).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t, y = _redi_inputs()
    with torch.no_grad():
        expected, expected_z = ref(x, t, y)
        got, zs = ours.forward_with_projections(x, t, y)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(zs[0], expected_z, atol=ATOL, rtol=0)


def test_redi_repa_state_dict_without_projectors_explains_or_drops_them():
    ref = _redi_repa_reference()
    ours = create_model("SiT-Micro/2", input_size=8, in_channels=6, num_classes=10).eval()
    with pytest.raises(ValueError) as info:
        ours.load_state_dict(ref.state_dict(), strict=True)
    assert "projector_dims=[24], projector_hidden_size=32" in str(info.value) and "--repa-layer" in str(info.value)
    result = ours.load_state_dict(ref.state_dict(), strict=False)
    assert result.missing_keys == [] and sorted(result.unexpected_keys) == sorted(
        "projectors.0." + k[len("projector."):] for k in ref.state_dict() if k.startswith("projector."))
    x, t, y = _redi_inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, y), ref(x, t, y)[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("head", ["projector", "projectors"])
def test_sample_cli_loads_redi_and_repa_checkpoints_with_their_heads(tmp_path, head):
    """Both namings load through sample.py's loader (the head is dropped: it only serves a training loss)."""
    import argparse

    from coredi_fast.sampling import build_parser, load_sampling_model

    if head == "projector":
        ref = _redi_repa_reference()
    else:
        ref = randomize_(RefSiT(8, 2, 6, 64, 2, 2, 10, learn_sigma=False, z_dims=(24,), projector_dim=32)).eval()
    path = tmp_path / "0400000.pt"
    weights = ref.state_dict()
    torch.save({"model": weights, "ema": weights, "opt": {}, "args": argparse.Namespace(repa_loss=True)}, path)
    args = build_parser().parse_args(["--ckpt", str(path), "--model", "SiT-Micro/2", "--image-size", "64",
                                      "--num-classes", "10"])
    model, spec = load_sampling_model(args)
    assert spec.feature_channels == 2 and spec.image_size == 8
    x, t, y = _redi_inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), ref(x, t, y)[0], atol=ATOL, rtol=0)
