"""SiT/DiT model family: embeddings against closed-form formulas, adaLN-Zero init, label dropout, unpatchify,
parameter counts, config errors, activation checkpointing and batch independence."""
import math

import pytest
import torch

import coredi_fast.models.attention as attention_module
from coredi_fast.models import SiT, create_model, list_models, timestep_embedding


def randomize_(model, std=0.05):
    """Non-zero weights everywhere but the fixed position table (adaLN-Zero would make every output zero)."""
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != "pos_embed":
                param.copy_(torch.randn(param.shape, generator=g) * std)
    return model


def micro(**kwargs):
    kwargs = {"input_size": 8, "num_classes": 10, **kwargs}
    return create_model(kwargs.pop("name", "SiT-Micro/2"), **kwargs)


def batch(n=4, channels=4, size=8, num_classes=10):
    return torch.randn(n, channels, size, size), torch.rand(n), torch.randint(0, num_classes, (n,))


# ----------------------------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------------------------

def test_pos_embed_matches_float64_formula():
    grid, dim = 6, 64
    model = create_model("SiT-Micro/1", input_size=grid)
    quarter = dim // 4
    expected = torch.empty(grid * grid, dim, dtype=torch.float64)
    for row in range(grid):
        for col in range(grid):
            token = row * grid + col                                # row-major token order of the patch grid
            for k in range(quarter):
                w = 10000.0 ** (-k / quarter)
                expected[token, k] = math.sin(col * w)              # first half: column coordinate
                expected[token, quarter + k] = math.cos(col * w)
                expected[token, 2 * quarter + k] = math.sin(row * w)  # second half: row coordinate
                expected[token, 3 * quarter + k] = math.cos(row * w)
    assert model.pos_embed.shape == (1, grid * grid, dim) and not model.pos_embed.requires_grad
    assert "pos_embed" in model.state_dict()                        # public checkpoints carry it
    torch.testing.assert_close(model.pos_embed[0].double(), expected, atol=1e-7, rtol=0)


@pytest.mark.parametrize("dim", [256, 7])
def test_timestep_embedding_matches_formula(dim):
    t = torch.tensor([0.0, 0.3, 1.0, 17.0, 999.0])
    half = dim // 2
    expected = torch.zeros(len(t), dim, dtype=torch.float64)
    for i, ti in enumerate(t.tolist()):
        for k in range(half):
            angle = ti * math.exp(-math.log(10000.0) * k / half)
            expected[i, k], expected[i, half + k] = math.cos(angle), math.sin(angle)   # cos first, then sin
    got = timestep_embedding(t, dim)
    assert got.dtype == torch.float32 and got.shape == (5, dim)
    # float32 angles up to ~1000 rad carry ~1e-4 absolute rounding (as in the public code).
    torch.testing.assert_close(got.double(), expected, atol=2e-4, rtol=0)
    torch.testing.assert_close(got[:3].double(), expected[:3], atol=1e-6, rtol=0)


def test_timestep_embedder_is_mlp_of_features():
    model = randomize_(micro())
    t = torch.tensor([0.1, 0.9])
    mlp = model.t_embedder.mlp
    feats = timestep_embedding(t, 256)
    hidden = torch.nn.functional.silu(feats @ mlp[0].weight.T + mlp[0].bias)
    torch.testing.assert_close(model.t_embedder(t), hidden @ mlp[2].weight.T + mlp[2].bias)


# ----------------------------------------------------------------------------------------------------------------
# adaLN-Zero initialization
# ----------------------------------------------------------------------------------------------------------------

def test_adaln_zero_init_output_is_exactly_zero():
    model = micro(learn_sigma=True)
    x, t, y = batch()
    out, sigma = model(x, t, y, return_sigma=True)
    assert torch.equal(out, torch.zeros_like(x)) and torch.equal(sigma, torch.zeros_like(x))


def test_adaln_zero_blocks_start_as_identity():
    model = micro()
    # Give the final layer weights: the output is then the final layer applied to the embedded input only.
    for p in model.final_layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, t, y = batch()
    model.eval()
    tokens = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder.embedding_table(y)
    for block in model.blocks:
        assert torch.equal(block(tokens, c), tokens)
    expected = model.unpatchify(model.final_layer(tokens, c))
    assert expected.abs().max() > 0.1
    assert torch.equal(model(x, t, y), expected)


# ----------------------------------------------------------------------------------------------------------------
# Labels: dropout and the null class
# ----------------------------------------------------------------------------------------------------------------

def test_label_embedding_force_drop_and_null_class():
    model = micro(num_classes=10)
    emb = model.y_embedder
    table = emb.embedding_table.weight
    assert table.shape[0] == 11                                     # 10 classes + the null class
    y = torch.tensor([3, 7, 1])
    torch.testing.assert_close(emb(y, train=False), table[y], atol=0, rtol=0)
    forced = emb(y, train=False, force_drop_ids=torch.tensor([1, 0, 1]))
    torch.testing.assert_close(forced, table[torch.tensor([10, 7, 10])], atol=0, rtol=0)
    torch.testing.assert_close(emb(torch.tensor([10]), train=False), table[10:11], atol=0, rtol=0)


def test_label_dropout_rate_in_training_only():
    model = micro(num_classes=10, class_dropout_prob=0.1)
    labels = torch.randint(0, 10, (20000,))
    dropped = model.y_embedder.token_drop(labels)
    rate = (dropped == 10).double().mean().item()
    assert abs(rate - 0.1) < 0.015                                  # binomial std 0.002
    assert torch.equal(dropped[dropped != 10], labels[dropped != 10])
    # Eval mode never drops: the embedding is exactly the table row of each label.
    torch.testing.assert_close(model.y_embedder(labels[:100], train=False),
                               model.y_embedder.embedding_table.weight[labels[:100]], atol=0, rtol=0)


def test_no_null_class_without_dropout():
    model = micro(num_classes=10, class_dropout_prob=0.0)
    assert model.y_embedder.embedding_table.weight.shape[0] == 10
    y = torch.arange(10)
    torch.testing.assert_close(model.y_embedder(y, train=True), model.y_embedder.embedding_table.weight,
                               atol=0, rtol=0)


def test_model_force_drop_equals_explicit_null_labels():
    model = randomize_(micro(num_classes=10)).eval()
    x, t, _ = batch(3)
    y = torch.tensor([2, 5, 9])
    with torch.no_grad():
        forced = model(x, t, y, force_drop_ids=torch.tensor([1, 0, 1]))
        explicit = model(x, t, torch.tensor([10, 5, 10]))
        plain = model(x, t, y)
    torch.testing.assert_close(forced, explicit, atol=0, rtol=0)
    assert (forced[0] - plain[0]).abs().max() > 1e-4                # the null class really changed sample 0
    torch.testing.assert_close(forced[1], plain[1], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Patches
# ----------------------------------------------------------------------------------------------------------------

def patchify(x, p):
    """(B, C, H, W) -> (B, T, p*p*C): row-major patches, each flattened as (row in patch, column in patch, channel)."""
    B, _, H, W = x.shape
    tokens = []
    for i in range(H // p):
        for j in range(W // p):
            patch = x[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p]   # (B, C, p, p)
            tokens.append(patch.permute(0, 2, 3, 1).reshape(B, -1))  # (B, p*p*C) in (p, q, c) order
    return torch.stack(tokens, dim=1)


@pytest.mark.parametrize("name, size", [("SiT-Micro/1", 4), ("SiT-Micro/2", 8), ("SiT-Tiny/4", 16)])
def test_unpatchify_inverts_patchify(name, size):
    model = create_model(name, input_size=size, learn_sigma=True)
    p = model.patch_size
    for channels in (4, 8):
        x = torch.randn(2, channels, size, size)
        assert torch.equal(model.unpatchify(patchify(x, p)), x)


def test_patch_embedding_is_linear_map_of_patches():
    model = create_model("SiT-Micro/2", input_size=8)
    torch.nn.init.normal_(model.x_embedder.proj.bias)
    x = torch.randn(2, 4, 8, 8)
    weight = model.x_embedder.proj.weight.permute(0, 2, 3, 1).reshape(64, -1)  # (D, p*p*C) in (p, q, c) order
    expected = patchify(x, 2) @ weight.T + model.x_embedder.proj.bias
    torch.testing.assert_close(model.x_embedder(x), expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Sizes and configs
# ----------------------------------------------------------------------------------------------------------------

def param_count(depth, hidden, patch, in_channels, learn_sigma, tokens, num_classes=1000, null_class=True,
                z_dims=(), projector_hidden=2048):
    """Closed form: per block adaLN 6D^2+6D, qkv 3D^2+3D, proj D^2+D, fc1 4D^2+4D, fc2 4D^2+D."""
    D, p = hidden, patch
    out = 2 * in_channels if learn_sigma else in_channels
    block = 18 * D * D + 15 * D
    embed = (in_channels * p * p * D + D) + (256 * D + D + D * D + D) + (num_classes + null_class) * D + tokens * D
    final = (2 * D * D + 2 * D) + (D * p * p * out + p * p * out)
    proj = sum(D * projector_hidden + projector_hidden + projector_hidden ** 2 + projector_hidden
               + projector_hidden * z + z for z in z_dims)
    return depth * block + embed + final + proj


def test_sit_xl2_parameter_count():
    expected = param_count(28, 1152, 2, 4, learn_sigma=True, tokens=256)
    assert expected == 675_129_632 and abs(expected / 1e6 - 675) < 0.5    # the published "675M"
    with torch.device("meta"):
        model = create_model("SiT-XL/2", input_size=32, in_channels=4, learn_sigma=True)
    assert sum(p.numel() for p in model.parameters()) == expected
    for size, (depth, hidden) in {"S": (12, 384), "B": (12, 768), "L": (24, 1024)}.items():
        with torch.device("meta"):
            model = create_model(f"DiT-{size}/4", in_channels=12)
        assert sum(p.numel() for p in model.parameters()) == param_count(depth, hidden, 4, 12, False, 64)


@pytest.mark.parametrize("kwargs", [dict(learn_sigma=True), dict(class_dropout_prob=0.0),
                                    dict(projector_dims=[24, 16], projector_hidden_size=32, encoder_depth=1)])
def test_small_parameter_counts_match_formula(kwargs):
    model = micro(**kwargs)
    expected = param_count(2, 64, 2, 4, kwargs.get("learn_sigma", False), 16, num_classes=10,
                           null_class=kwargs.get("class_dropout_prob", 0.1) > 0,
                           z_dims=kwargs.get("projector_dims", ()), projector_hidden=32)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_zoo_names_and_sizes():
    expected = {f"{fam}-{s}/{p}" for fam in ("SiT", "DiT") for s in ("S", "B", "L", "XL") for p in (2, 4, 8)}
    expected |= {"SiT-Tiny/1", "SiT-Tiny/2", "SiT-Tiny/4", "SiT-Micro/1", "SiT-Micro/2"}
    assert set(list_models()) == expected
    sizes = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16),
             "Tiny": (4, 128, 4), "Micro": (2, 64, 2)}
    for name in list_models():
        with torch.device("meta"):
            model = create_model(name, input_size=32)
        size, patch = name.split("-")[1].split("/")
        c = model.config
        assert (c["depth"], c["hidden_size"], c["num_heads"], c["patch_size"]) == (*sizes[size], int(patch))
        assert len(model.blocks) == c["depth"] and model.blocks[0].attn.num_heads == c["num_heads"]


def test_config_rebuilds_the_model():
    model = micro(learn_sigma=True, depth=3, mlp_ratio=2.0)
    assert model.config["depth"] == 3 and model.config["name"] == "SiT-Micro/2"
    for rebuilt in (create_model(**model.config), SiT(**model.config)):
        assert rebuilt.config == model.config
        rebuilt.load_state_dict(model.state_dict(), strict=True)
        assert rebuilt.blocks[0].mlp.fc1.out_features == 128


@pytest.mark.parametrize("kwargs, error, arg", [
    (dict(name="SiT-XL/3"), ValueError, "SiT-XL/2"),                 # lists the valid names
    (dict(input_size=30, name="SiT-Tiny/4"), ValueError, "input_size"),
    (dict(hidden_size=96, num_heads=5), ValueError, "hidden_size"),
    (dict(hidden_size=66, num_heads=2), ValueError, "hidden_size"),   # 2D sin-cos needs a multiple of 4
    (dict(in_channels=0), ValueError, "in_channels"),
    (dict(depth=0), ValueError, "depth"),
    (dict(num_heads=0), ValueError, "num_heads"),
    (dict(num_classes=0), ValueError, "num_classes"),
    (dict(patch_size=2.0), TypeError, "patch_size"),
    (dict(mlp_ratio=0.0), ValueError, "mlp_ratio"),
    (dict(class_dropout_prob=1.5), ValueError, "class_dropout_prob"),
    (dict(learn_sigma="yes"), TypeError, "learn_sigma"),
    (dict(grad_checkpointing="all"), TypeError, "grad_checkpointing"),
    (dict(grad_checkpointing=99), ValueError, "grad_checkpointing"),
    (dict(projector_dims=[24], encoder_depth=3), ValueError, "encoder_depth"),
    (dict(projector_dims=[0]), ValueError, "projector_dims"),
    (dict(foo=1), TypeError, "foo"),
])
def test_bad_configs_raise_naming_the_argument(kwargs, error, arg):
    with pytest.raises(error, match=arg):
        micro(**kwargs)


def test_bad_inputs_raise_naming_the_argument():
    model = micro()
    x, t, y = batch(2)
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(2, 3, 8, 8), t, y)
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(2, 4, 16, 16), t, y)
    with pytest.raises(ValueError, match="t must be"):
        model(x, torch.rand(3), y)
    with pytest.raises(TypeError, match="y must"):
        model(x, t, y.float())
    with pytest.raises(ValueError, match="return_sigma"):
        model(x, t, y, return_sigma=True)
    with pytest.raises(ValueError, match="projector_dims"):
        model.forward_with_projections(x, t, y)


def test_scalar_t_broadcasts():
    model = randomize_(micro()).eval()
    x, _, y = batch(3)
    torch.testing.assert_close(model(x, torch.tensor(0.4), y), model(x, torch.full((3,), 0.4), y), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Forward behaviour
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("setting, recomputed", [(True, 3), (2, 2)])
def test_grad_checkpointing_gives_identical_gradients(setting, recomputed):
    """True recomputes every block, an int k the first k only; gradients are bit-identical either way."""
    plain = randomize_(micro(depth=3))
    ckpt = micro(depth=3, grad_checkpointing=setting)
    ckpt.load_state_dict(plain.state_dict())
    calls = [0, 0, 0]
    for i, block in enumerate(ckpt.blocks):
        block.register_forward_pre_hook(lambda *args, i=i: calls.__setitem__(i, calls[i] + 1))
    x, t, y = batch()
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
    model = randomize_(micro(learn_sigma=True)).eval()
    x, t, y = batch(5)
    with torch.no_grad():
        full = model(x, t, y)
        for i in range(5):
            torch.testing.assert_close(model(x[i:i + 1], t[i:i + 1], y[i:i + 1]), full[i:i + 1], atol=1e-5, rtol=0)
        x2, t2, y2 = x.clone(), t.clone(), y.clone()
        x2[1:], t2[1:], y2[1:] = torch.randn_like(x2[1:]), torch.rand(4), (y2[1:] + 1) % 10
        changed = model(x2, t2, y2)
    torch.testing.assert_close(changed[0], full[0], atol=1e-6, rtol=0)
    assert (changed[1:] - full[1:]).abs().max() > 1e-3


def test_all_attention_goes_through_one_function(monkeypatch):
    model = randomize_(micro(depth=3)).eval()
    x, t, y = batch(2)
    with torch.no_grad():
        expected = model(x, t, y)
    calls = []

    def manual_attention(q, k, v):                                  # (B, H, T, Dh), float64 softmax attention
        calls.append(q.shape)
        scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        return (scores.softmax(dim=-1) @ v.double()).to(q.dtype)

    monkeypatch.setattr(attention_module, "dot_product_attention", manual_attention)
    with torch.no_grad():
        got = model(x, t, y)
    assert calls == [(2, 2, 16, 32)] * 3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_bf16_weights_run_without_autocast():
    model = randomize_(micro()).eval()
    x, t, y = batch(2)
    with torch.no_grad():
        expected = model(x, t, y)
        got = model.to(torch.bfloat16)(x.bfloat16(), t, y)
    assert got.dtype == torch.bfloat16
    assert (got.float() - expected).abs().max() < 0.05 * expected.abs().max()


def test_forward_tokens_equals_forward_on_embedded_input():
    from coredi_fast.models import create_model

    model = create_model("SiT-Micro/2", input_size=8, in_channels=3, num_classes=5, learn_sigma=True).eval()
    for p in model.parameters():  # adaLN-Zero would hide a wrong path: randomize everything
        torch.nn.init.normal_(p, std=0.05)
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 4])
    tokens = model.x_embedder(x) + model.pos_embed
    torch.testing.assert_close(model.forward_tokens(tokens, t, y), model(x, t, y))
    with pytest.raises(ValueError, match="tokens must be"):
        model.forward_tokens(tokens[:, :-1], t, y)
