"""JiT pixel transformer: RoPE, RMSNorm/qk-norm, SwiGLU and attention against formulas written out here,
adaLN-Zero init, in-context class tokens and label dropout, the pixel packing, JiT's conv patch embedding and
checkpoint layout, parameter counts (the paper's 131M / 459M / 953M), config errors, activation checkpointing,
batch independence, and a short training run that lowers the x-prediction v-loss."""
import math

import pytest
import torch
import torch.nn.functional as F

import coredi_fast.models.attention as attention_module
from coredi_fast.models import (
    JIT_MODEL_CONFIGS,
    JiT,
    convert_jit_state_dict,
    create_model,
    get_2d_sincos_pos_embed,
    list_models,
    pack_inputs,
    patchify_images,
    unpack_outputs,
    unpatchify_images,
)
from coredi_fast.models.jit import JiTAttention, RMSNorm, SwiGLU, swiglu_hidden_size
from coredi_fast.models.rope import apply_rope, rope_2d_tables
from coredi_fast.transport import (
    interpolate,
    joint_velocity_loss,
    sample_time,
    velocity_from_x_prediction,
    velocity_target,
)


def randomize_(model, std=0.1):
    """Random weights everywhere but the fixed position table (adaLN-Zero would make every output zero)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != "pos_embed":
                param.copy_(torch.randn(param.shape, generator=g) * std + (1.0 if "norm" in name else 0.0))
    return model


def micro(**kwargs):
    """JiT-Micro/2 on 8x8 RGB images with 2 feature channels: a 4x4 grid (16 tokens) + 4 class tokens."""
    kwargs = {"input_size": 8, "in_channels": 3, "feature_channels": 2, "num_classes": 10, **kwargs}
    return create_model(kwargs.pop("name", "JiT-Micro/2"), **kwargs)


def batch(model, n=4, num_classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *model.input_shape, generator=g), torch.rand(n, generator=g),
            torch.randint(0, num_classes, (n,), generator=g))


# ----------------------------------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------------------------------

def rope_formula(x, grid, prefix=0, theta=10000.0):
    """float64 2D RoPE written out: token t >= prefix sits at (r, c) = divmod(t - prefix, grid); pair j of a head
    is rotated by r·θ_j (j < Dh/4) or c·θ_(j - Dh/4), θ_i = theta^(-i / (Dh/4))."""
    T, Dh = x.shape[1], x.shape[-1]
    out = x.double().clone()
    quarter = Dh // 4
    for t in range(prefix, T):
        r, c = divmod(t - prefix, grid)
        for j in range(Dh // 2):
            pos, i = (r, j) if j < quarter else (c, j - quarter)
            angle = pos * theta ** (-i / quarter)
            a, b = x[:, t, :, 2 * j].double(), x[:, t, :, 2 * j + 1].double()
            out[:, t, :, 2 * j] = a * math.cos(angle) - b * math.sin(angle)
            out[:, t, :, 2 * j + 1] = b * math.cos(angle) + a * math.sin(angle)
    return out


@pytest.mark.parametrize("head_dim, grid, prefix", [(8, 3, 0), (16, 4, 2), (32, 5, 3)])
def test_rope_matches_the_rotation_formula(head_dim, grid, prefix):
    x = torch.randn(2, prefix + grid * grid, 3, head_dim)
    cos, sin = rope_2d_tables(head_dim, grid, prefix)
    got = apply_rope(x, cos, sin)
    torch.testing.assert_close(got.double(), rope_formula(x, grid, prefix), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got[:, :prefix], x[:, :prefix], atol=0, rtol=0)  # class tokens are not rotated


def test_rope_scores_depend_only_on_the_relative_position():
    """⟨R_m q, R_n k⟩ is a function of the grid offset (Δrow, Δcol) only."""
    head_dim, grid = 16, 6
    cos, sin = rope_2d_tables(head_dim, grid, dtype=torch.float64)
    q, k = torch.randn(head_dim, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)

    def score(m, n):  # tokens m and n given as (row, col)
        x = torch.zeros(1, grid * grid, 2, head_dim, dtype=torch.float64)
        x[0, m[0] * grid + m[1], 0], x[0, n[0] * grid + n[1], 1] = q, k
        rotated = apply_rope(x, cos, sin)
        return rotated[0, m[0] * grid + m[1], 0] @ rotated[0, n[0] * grid + n[1], 1]

    for offset in [(0, 0), (1, 2), (-2, 3), (4, -1)]:
        pairs = [((r, c), (r - offset[0], c - offset[1])) for r in range(grid) for c in range(grid)
                 if 0 <= r - offset[0] < grid and 0 <= c - offset[1] < grid]
        scores = torch.stack([score(m, n) for m, n in pairs[:6]])
        torch.testing.assert_close(scores, scores[:1].expand_as(scores), atol=1e-10, rtol=0)
    assert abs(score((0, 0), (1, 2)) - score((0, 0), (2, 1))) > 1e-3  # rows and columns are told apart


# ----------------------------------------------------------------------------------------------------------------
# RMSNorm, qk-norm, SwiGLU, attention
# ----------------------------------------------------------------------------------------------------------------

def test_rmsnorm_matches_formula_and_keeps_the_input_dtype():
    norm = RMSNorm(6)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.5, 1.0, 2.0, -1.0, 0.0, 3.0]))
    x = torch.randn(3, 4, 6)
    expected = torch.empty(3, 4, 6, dtype=torch.float64)
    for idx in [(a, b) for a in range(3) for b in range(4)]:
        row = x[idx].double()
        expected[idx] = row / math.sqrt(sum(v * v for v in row.tolist()) / 6 + 1e-6) * norm.weight.double()
    torch.testing.assert_close(norm(x).double(), expected, atol=1e-6, rtol=1e-6)
    assert norm(x.half()).dtype == torch.float16


def test_swiglu_matches_formula_and_jit_widths():
    assert [swiglu_hidden_size(d, 4.0) for d in (768, 1024, 1280)] == [2048, 2730, 3413]
    mlp = randomize_(SwiGLU(8, 5))
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    w12, b12 = mlp.w12.weight.double(), mlp.w12.bias.double()
    a, b = x @ w12[:5].T + b12[:5], x @ w12[5:].T + b12[5:]
    expected = (a / (1 + torch.exp(-a)) * b) @ mlp.w3.weight.double().T + mlp.w3.bias.double()
    torch.testing.assert_close(mlp(x.float()).double(), expected, atol=1e-5, rtol=1e-5)


def test_attention_with_qk_norm_and_rope_matches_formula():
    dim, heads, grid, prefix = 16, 2, 3, 2
    attn = randomize_(JiTAttention(dim, heads)).eval()
    T = prefix + grid * grid
    x = torch.randn(2, T, dim)
    rope = rope_2d_tables(dim // heads, grid, prefix)

    xd = x.double()
    qkv = (xd @ attn.qkv.weight.double().T + attn.qkv.bias.double()).reshape(2, T, 3, heads, dim // heads)

    def rms(v, w):
        return v / torch.sqrt(v.square().mean(-1, keepdim=True) + 1e-6) * w.double()

    q = rope_formula(rms(qkv[:, :, 0], attn.q_norm.weight), grid, prefix)          # (B, T, H, Dh)
    k = rope_formula(rms(qkv[:, :, 1], attn.k_norm.weight), grid, prefix)
    v = qkv[:, :, 2]
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(dim // heads)
    out = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(2, T, dim)
    expected = out @ attn.proj.weight.double().T + attn.proj.bias.double()
    torch.testing.assert_close(attn(x, rope).double(), expected, atol=1e-5, rtol=1e-5)


def test_all_attention_goes_through_one_function(monkeypatch):
    model = randomize_(micro(depth=3, in_context_start=1)).eval()
    x, t, y = batch(model, 2)
    with torch.no_grad():
        expected = model(x, t, y)
    calls = []

    def manual_attention(q, k, v):                                  # (B, H, T, Dh), float64 softmax attention
        calls.append(tuple(q.shape))
        scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        return (scores.softmax(dim=-1) @ v.double()).to(q.dtype)

    monkeypatch.setattr(attention_module, "dot_product_attention", manual_attention)
    with torch.no_grad():
        got = model(x, t, y)
    assert calls == [(2, 2, 16, 32)] + [(2, 2, 4 + 16, 32)] * 2     # class tokens join from block 1 on
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Init, class tokens, label dropout
# ----------------------------------------------------------------------------------------------------------------

def test_adaln_zero_init_output_is_exactly_zero_and_blocks_are_identities():
    model = micro()
    x, t, y = batch(model)
    assert torch.equal(model(x, t, y), torch.zeros_like(x))
    tokens = torch.randn(4, 20, 64)
    rope = (model.rope_cos_in_context, model.rope_sin_in_context)
    for block in model.blocks:
        assert torch.equal(block(tokens, torch.randn(4, 64), rope), tokens)
    for block in model.blocks:
        assert torch.equal(block.norm1.weight, torch.ones(64)) and torch.equal(block.attn.q_norm.weight,
                                                                               torch.ones(32))


def test_in_context_class_tokens_are_label_embeddings_plus_positions():
    model = randomize_(micro(depth=3, in_context_start=2)).eval()
    seen = {}
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0].detach().clone()))
    x, t, y = batch(model, 3)
    drop = torch.tensor([0, 1, 0])
    with torch.no_grad():
        model(x, t, y, force_drop_ids=drop)
        labels = torch.where(drop == 1, 10, y)                     # dropped -> the null class (num_classes)
        expected = model.y_embedder.embedding_table.weight[labels][:, None] + model.in_context_posemb
    assert [seen[i].shape[1] for i in range(3)] == [16, 16, 4 + 16]
    torch.testing.assert_close(seen[2][:, :4], expected, atol=0, rtol=0)


def test_force_drop_equals_explicit_null_labels_and_training_drops_labels():
    model = randomize_(micro()).eval()
    x, t, y = batch(model)
    with torch.no_grad():
        dropped = model(x, t, y, force_drop_ids=torch.ones_like(y))
        null = model(x, t, torch.full_like(y, 10))
        kept = model(x, t, y)
    torch.testing.assert_close(dropped, null, atol=0, rtol=0)
    assert (kept - null).abs().max() > 1e-3
    assert model.y_embedder.embedding_table.num_embeddings == 11
    assert create_model("JiT-Micro/2", input_size=8, num_classes=10,
                        class_dropout_prob=0.0).y_embedder.embedding_table.num_embeddings == 10
    model.train()
    torch.manual_seed(0)
    y = torch.zeros(4000, dtype=torch.long)
    drop_rate = (model.y_embedder.token_drop(y) == 10).float().mean().item()
    assert abs(drop_rate - 0.1) < 0.02


def test_proj_dropout_sits_in_the_middle_half_of_the_blocks():
    model = micro(depth=8, proj_dropout=0.2)
    rates = [(b.attn.proj_drop.p, b.mlp.ffn_dropout.p) for b in model.blocks]
    assert rates == [(0.0, 0.0)] * 2 + [(0.2, 0.2)] * 4 + [(0.0, 0.0)] * 2


# ----------------------------------------------------------------------------------------------------------------
# Pixel packing, patch embedding, output layout, JiT's checkpoint layout
# ----------------------------------------------------------------------------------------------------------------

def loop_patchify(images, p):
    B, C, H, W = images.shape
    out = torch.empty(B, C * p * p, H // p, W // p)
    for c in range(C):
        for i in range(p):
            for j in range(p):
                out[:, c * p * p + i * p + j] = images[:, c, i::p, j::p]
    return out


def test_patchify_matches_a_loop_and_unpatchify_inverts_it():
    images = torch.randn(2, 3, 12, 8)
    x = patchify_images(images, 4)
    torch.testing.assert_close(x, loop_patchify(images, 4), atol=0, rtol=0)
    torch.testing.assert_close(unpatchify_images(x, 4, 3), images, atol=0, rtol=0)
    features = torch.randn(2, 5, 3, 2)
    packed = pack_inputs(images, features, 4)
    assert packed.shape == (2, 3 * 16 + 5, 3, 2)
    got_images, got_features = unpack_outputs(packed, 4, 3)
    torch.testing.assert_close(got_images, images, atol=0, rtol=0)
    torch.testing.assert_close(got_features, features, atol=0, rtol=0)
    with pytest.raises(ValueError, match="features must be"):
        pack_inputs(images, torch.randn(2, 5, 4, 4), 4)
    with pytest.raises(ValueError, match="patch_size=5"):
        patchify_images(images, 5)


def test_unpatchify_puts_each_token_output_at_its_pixels():
    """Final-layer token (r, c), output index (i·p + j)·C + ch (JiT's layout) -> pixel (r·p + i, c·p + j) of image
    channel ch; output index p·p·C + f -> feature channel f at (r, c)."""
    model = micro()
    p, C, G, d = 2, 3, 4, 2
    out = torch.randn(2, G * G, p * p * C + d)
    packed = model.unpatchify(out)
    images, features = unpack_outputs(packed, p, C)
    for r in range(G):
        for c in range(G):
            for i in range(p):
                for j in range(p):
                    for ch in range(C):
                        assert torch.equal(images[:, ch, r * p + i, c * p + j], out[:, r * G + c, (i * p + j) * C + ch])
            torch.testing.assert_close(features[:, :, r, c], out[:, r * G + c, p * p * C:], atol=0, rtol=0)


def test_patch_embedding_equals_jits_convolutions_on_raw_images():
    """JiT embeds images with Conv(C -> bottleneck, p, stride p, no bias) then a 1x1 Conv; ours are Linears on the
    packed channels. With the weights moved by `convert_jit_state_dict`'s reshape, both give the same tokens, plus
    the feature projection for the feature channels."""
    model = randomize_(micro())
    emb = model.x_embedder
    images, features = torch.randn(2, 3, 8, 8), torch.randn(2, 2, 4, 4)
    conv1 = emb.proj1.weight.reshape(16, 3, 2, 2)
    conv2 = emb.proj2.weight.reshape(64, 16, 1, 1)
    jit_tokens = F.conv2d(F.conv2d(images, conv1, stride=2), conv2, emb.proj2.bias).flatten(2).transpose(1, 2)
    feature_tokens = torch.einsum("bdhw,kd->bhwk", features, emb.feature_proj.weight).reshape(2, 16, 64)
    got = emb(pack_inputs(images, features, 2))
    torch.testing.assert_close(got, jit_tokens + feature_tokens, atol=1e-5, rtol=1e-5)

    # A checkpoint in JiT's layout (convolution weights, the Denoiser's `net.` prefix) loads strictly.
    public = {f"net.{k}": v for k, v in model.state_dict().items()}
    public["net.x_embedder.proj1.weight"], public["net.x_embedder.proj2.weight"] = conv1, conv2
    fresh = micro().eval()
    fresh.load_state_dict(convert_jit_state_dict(public), strict=True)
    x, t, y = batch(model)
    torch.testing.assert_close(fresh(x, t, y), model.eval()(x, t, y), atol=0, rtol=0)


def test_position_embedding_is_the_fixed_sincos_table():
    model = micro()
    assert not model.pos_embed.requires_grad
    torch.testing.assert_close(model.pos_embed[0], get_2d_sincos_pos_embed(64, 4).float(), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Sizes and configs
# ----------------------------------------------------------------------------------------------------------------

def jit_trainable_parameters(D, depth, heads, bottleneck, L, C=3, p=16, d=0, num_classes=1000):
    """Trainable parameters of a JiT counted by hand (the frozen pos_embed excluded, as JiT reports them)."""
    h, Dh = int(int(4 * D) * 2 / 3), D // heads
    block = (D + (3 * D * D + 3 * D) + 2 * Dh + (D * D + D) + D + (D * 2 * h + 2 * h) + (h * D + D)
             + (D * 6 * D + 6 * D))
    embed = (256 * D + D + D * D + D) + (num_classes + 1) * D + C * p * p * bottleneck + bottleneck * D + D + L * D \
        + d * D
    final = D + D * (C * p * p + d) + (C * p * p + d) + D * 2 * D + 2 * D
    return embed + depth * block + final


@pytest.mark.parametrize("name, dims, paper_millions", [
    ("JiT-B/16", (768, 12, 12, 128, 32), 131),
    ("JiT-L/16", (1024, 24, 16, 128, 32), 459),
    ("JiT-H/16", (1280, 32, 16, 256, 32), 953),
])
def test_parameter_counts_match_formula_and_paper(name, dims, paper_millions):
    with torch.device("meta"):
        model = create_model(name, input_size=256, in_channels=3, num_classes=1000)
        with_features = create_model(name, input_size=256, in_channels=3, feature_channels=8, num_classes=1000)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == jit_trainable_parameters(*dims)
    assert round(trainable / 1e6) == paper_millions
    assert sum(p.numel() for p in with_features.parameters() if p.requires_grad) == \
        jit_trainable_parameters(*dims, d=8)


def test_zoo_names_sizes_and_attributes():
    assert set(JIT_MODEL_CONFIGS) == {"JiT-B/16", "JiT-B/32", "JiT-L/16", "JiT-L/32", "JiT-H/16", "JiT-H/32",
                                      "JiT-Tiny/2", "JiT-Tiny/4", "JiT-Micro/2"}
    assert set(JIT_MODEL_CONFIGS) <= set(list_models(include_jit=True))
    assert not set(JIT_MODEL_CONFIGS) & set(list_models())
    with torch.device("meta"):
        model = create_model("JiT-H/16", input_size=256, in_channels=3, feature_channels=8)
    assert (len(model.blocks), model.hidden_size, model.num_heads) == (32, 1280, 16)
    assert (model.in_context_len, model.in_context_start, model.x_embedder.proj1.out_features) == (32, 10, 256)
    assert (model.pixel_patch, model.image_channels, model.feature_channels) == (16, 3, 8)
    assert model.packed_image_channels == 768 and model.input_shape == (776, 16, 16)


def test_config_rebuilds_the_model():
    model = randomize_(micro(depth=3, proj_dropout=0.1, in_context_len=3))
    for rebuilt in (create_model(**model.config), JiT(**model.config)):
        assert rebuilt.config == model.config
        rebuilt.load_state_dict(model.state_dict(), strict=True)
        x, t, y = batch(model)
        torch.testing.assert_close(rebuilt.eval()(x, t, y), model.eval()(x, t, y), atol=0, rtol=0)


@pytest.mark.parametrize("kwargs, error, arg", [
    (dict(input_size=9), ValueError, "input_size"),
    (dict(in_channels=0), ValueError, "in_channels"),
    (dict(feature_channels=-1), ValueError, "feature_channels"),
    (dict(feature_channels=1.5), TypeError, "feature_channels"),
    (dict(num_heads=3), ValueError, "hidden_size"),
    (dict(hidden_size=72, num_heads=12), ValueError, "RoPE"),
    (dict(in_context_start=2), ValueError, "in_context_start"),
    (dict(bottleneck_dim=0), ValueError, "bottleneck_dim"),
    (dict(mlp_ratio=0.0), ValueError, "mlp_ratio"),
    (dict(class_dropout_prob=1.5), ValueError, "class_dropout_prob"),
    (dict(proj_dropout=1.0), ValueError, "proj_dropout"),
    (dict(rope_theta=0), ValueError, "rope_theta"),
    (dict(grad_checkpointing=1.5), TypeError, "grad_checkpointing"),
    (dict(grad_checkpointing=3), ValueError, "grad_checkpointing"),
    (dict(learn_sigma=True), ValueError, "learn_sigma"),
    (dict(qk_norm=True), TypeError, "qk_norm"),
    (dict(name="JiT-XL/16"), ValueError, "JiT-XL/16"),
])
def test_bad_configs_raise_naming_the_argument(kwargs, error, arg):
    with pytest.raises(error, match=arg):
        micro(**kwargs)


def test_bad_inputs_raise_naming_the_argument():
    model = micro()
    x, t, y = batch(model)
    with pytest.raises(ValueError, match=r"x must be \(B, 14, 4, 4\).*pixel_unshuffle"):
        model(torch.randn(4, 3, 8, 8), t, y)
    with pytest.raises(ValueError, match="t must be"):
        model(x, t[:2], y)
    with pytest.raises(ValueError, match="y must be"):
        model(x, t, y[:3])
    with pytest.raises(TypeError, match="integer class labels"):
        model(x, t, y.float())
    torch.testing.assert_close(model(x, torch.tensor(0.3), y), model(x, torch.full((4,), 0.3), y), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Forward behaviour
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("setting, recomputed", [(True, 3), (1, 1)])
def test_grad_checkpointing_gives_identical_gradients(setting, recomputed):
    """True recomputes every block, an int k the first k only; gradients are bit-identical either way."""
    plain = randomize_(micro(depth=3))
    ckpt = micro(depth=3, grad_checkpointing=setting)
    ckpt.load_state_dict(plain.state_dict())
    calls = [0, 0, 0]
    for i, block in enumerate(ckpt.blocks):
        block.register_forward_pre_hook(lambda *args, i=i: calls.__setitem__(i, calls[i] + 1))
    x, t, y = batch(plain)
    drop = torch.tensor([0, 1, 0, 0])
    losses = []
    for model in (plain, ckpt):
        loss = model(x, t, y, force_drop_ids=drop).square().mean()
        loss.backward()
        losses.append(loss.detach())
    assert calls == [2] * recomputed + [1] * (3 - recomputed)      # forward (+ recomputation in the backward)
    torch.testing.assert_close(losses[0], losses[1], atol=0, rtol=0)
    grads = dict(ckpt.named_parameters())
    for name, param in plain.named_parameters():
        if param.requires_grad:
            assert param.grad.abs().sum() > 0, name
            torch.testing.assert_close(grads[name].grad, param.grad, atol=0, rtol=0, msg=name)


def test_batch_consistency_in_eval_mode():
    model = randomize_(micro()).eval()
    x, t, y = batch(model, 5)
    with torch.no_grad():
        full = model(x, t, y)
        for i in range(5):
            torch.testing.assert_close(model(x[i:i + 1], t[i:i + 1], y[i:i + 1]), full[i:i + 1], atol=1e-5, rtol=0)
        x2, t2, y2 = x.clone(), t.clone(), y.clone()
        x2[1:], t2[1:], y2[1:] = torch.randn_like(x2[1:]), torch.rand(4), (y2[1:] + 1) % 10
        changed = model(x2, t2, y2)
    torch.testing.assert_close(changed[0], full[0], atol=1e-5, rtol=0)
    assert (changed[1:] - full[1:]).abs().max() > 1e-3


def test_bf16_weights_run_without_autocast():
    model = randomize_(micro()).eval()
    x, t, y = batch(model, 2)
    with torch.no_grad():
        expected = model(x, t, y)
        got = model.to(torch.bfloat16)(x.bfloat16(), t, y)
    assert got.dtype == torch.bfloat16
    assert (got.float() - expected).abs().max() < 0.05 * expected.abs().max()


def test_feature_channels_reach_the_tokens_and_the_output():
    model = randomize_(micro()).eval()
    x, t, y = batch(model, 2)
    x2 = x.clone()
    x2[:, -2:] += 1.0                                               # change the features only
    with torch.no_grad():
        out, out2 = model(x, t, y), model(x2, t, y)
    assert (out2[:, :12] - out[:, :12]).abs().max() > 1e-3         # pixels see the features ...
    assert (out2[:, 12:] - out[:, 12:]).abs().max() > 1e-3         # ... and the feature outputs too


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture
def one_thread():
    """Tiny ops on a shared 2-core machine: a second intra-op thread only adds barrier waits (20x slower when the
    cores are busy), so the training test runs single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_few_hundred_steps_lower_the_x_prediction_v_loss(one_thread):
    """JiT-Micro/2 on 32 fixed 16x16 grayscale images of 4 classes (+ 2 feature channels derived from them): 300
    AdamW steps of JiT's objective (x-prediction turned into a velocity, logit-normal t) lower the loss on a fixed
    evaluation batch well below its value at init."""
    torch.manual_seed(0)
    model = create_model("JiT-Micro/2", input_size=16, in_channels=1, feature_channels=2, num_classes=4)
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(32) % 4
    rows, cols = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    images = torch.stack([torch.sin(rows * (1 + k % 4) / 3 + cols * (k // 4) / 8) for k in range(32)])[:, None]
    images = (images + 0.1 * torch.randn(images.shape, generator=g)).clamp(-1, 1)
    features = F.avg_pool2d(images, 2).repeat(1, 2, 1, 1) * torch.tensor([1.0, -1.0])[None, :, None, None]
    data = pack_inputs(images, features, model.pixel_patch)                     # (32, 4 + 2, 8, 8)

    eval_noise = torch.randn(data.shape, generator=g)
    eval_t = sample_time(32, kind="logit_normal", mean=-0.8, std=0.8, generator=g)

    def loss_of(x1, x0, t, y):
        x_t = interpolate(x1, x0, t)
        v = velocity_from_x_prediction(model(x_t, t, y), x_t, t)
        return joint_velocity_loss(v, velocity_target(x1, x0), image_channels=model.packed_image_channels)["loss"]

    model.eval()
    with torch.no_grad():
        before = loss_of(data, eval_noise, eval_t, labels).item()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.0)
    for _ in range(300):
        idx = torch.randint(0, 32, (16,), generator=g)
        t = sample_time(16, kind="logit_normal", mean=-0.8, std=0.8, generator=g)
        loss = loss_of(data[idx], torch.randn(16, *data.shape[1:], generator=g), t, labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = loss_of(data, eval_noise, eval_t, labels).item()
    assert math.isfinite(after) and after < 0.6 * before, (before, after)
