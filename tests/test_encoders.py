"""Frozen encoders: DINOv2 features and the SD-VAE, checked against timm/diffusers run by hand.

All models are random-init (no weights can be downloaded here); tiny configs keep the file fast.
"""
import re
import socket
import time
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import coredi_fast.encoders.weights as weights_module
from coredi_fast.encoders import DINOv2Encoder, LatentVAE, WeightsUnavailableError, build_encoder, sample_posterior

# ImageNet statistics written out here rather than imported, so the reference does not share the code under test.
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
TINY_VIT = dict(embed_dim=64, depth=2, num_heads=4)
TINY_VAE = dict(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=8, sample_size=16)


def quiet(factory, *args, **kwargs):
    """Builds a random-init encoder without the (expected) random-weights warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return factory(*args, **kwargs)


def tiny_dino(img_size=28, **kwargs):
    encoder = quiet(DINOv2Encoder, weights=None, img_size=img_size, **TINY_VIT, **kwargs)
    with torch.no_grad():  # move every weight off its init (layer-scale starts at 1e-5) so all of them matter
        for p in encoder.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return encoder


def tiny_vae(**kwargs):
    return quiet(LatentVAE, weights=None, config=TINY_VAE, **kwargs)


def preprocess_by_hand(images_uint8, size):
    """ReDi's `preprocess_raw_image`: /255, ImageNet normalization, then bicubic resize."""
    x = images_uint8.float() / 255.0
    x = (x - MEAN) / STD
    return F.interpolate(x, size=(size, size), mode="bicubic")


def dino_by_hand(vit, images_uint8, size, num_prefix_tokens):
    return vit.forward_features(preprocess_by_hand(images_uint8, size))[:, num_prefix_tokens:]


def random_images(b=2, size=32):
    return torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------------------- DINOv2

def test_dinov2_matches_timm_by_hand():
    import timm

    encoder = tiny_dino()
    reference = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, img_size=28, num_classes=0,
                                  **TINY_VIT).eval()
    reference.load_state_dict(encoder.model.state_dict())
    images = random_images(size=32)  # 32 → 28: the bicubic resize is not a no-op

    got = encoder(images)
    with torch.no_grad():
        want = dino_by_hand(reference, images, size=28, num_prefix_tokens=1 + 4)
    assert got.shape == (2, 4, 64) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (encoder.embed_dim, encoder.grid_size, encoder.num_tokens, encoder.num_prefix_tokens) == (64, 2, 4, 5)


def test_dinov2_uint8_and_float_inputs_agree():
    encoder = tiny_dino(img_size=56)
    images = random_images(size=64)
    torch.testing.assert_close(encoder(images), encoder(images.float() / 255.0), rtol=0, atol=1e-6)


def test_dinov2_is_frozen_and_stays_in_eval():
    # drop_path would make two calls differ if training mode leaked through.
    encoder = tiny_dino(drop_path_rate=0.5)
    parent = nn.ModuleDict(dict(encoder=encoder, head=nn.Linear(4, 4)))
    images = random_images()
    eval_out = encoder(images)

    parent.train()
    assert parent["head"].training and not encoder.training
    assert not any(m.training for m in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())
    torch.testing.assert_close(encoder(images), eval_out, rtol=0, atol=0)

    # Features are no_grad outputs (not inference tensors): a learned projection on top still trains.
    w = torch.randn(64, 3, requires_grad=True)
    (eval_out @ w).sum().backward()
    torch.testing.assert_close(w.grad, eval_out.sum(dim=(0, 1))[:, None].expand(64, 3))
    assert not eval_out.requires_grad


def test_dinov2_bf16_autocast_matches_autocast_by_hand():
    encoder = tiny_dino(dtype=torch.bfloat16)
    images = random_images()
    x = preprocess_by_hand(images, size=28)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = encoder.model.forward_features(x)[:, 5:].float()
    got = encoder(images)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_dinov2_real_shape_vit_b14_reg4():
    encoder = quiet(DINOv2Encoder, weights=None)
    images = random_images(b=1, size=256)
    got = encoder(images)
    assert got.shape == (1, 256, 768)
    assert (encoder.embed_dim, encoder.grid_size, encoder.num_tokens, encoder.num_prefix_tokens) == (768, 16, 256, 5)
    d, blocks = 768, 12
    per_block = 2 * (2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)
    # patch embedding + 16×16 positions + CLS + 4 registers + blocks (norms, qkv, proj, layer scales, MLP) + final norm
    want_params = (3 * 14 * 14 * d + d) + 256 * d + d + 4 * d + blocks * per_block + 2 * d
    assert sum(p.numel() for p in encoder.parameters()) == want_params
    with torch.no_grad():
        want = dino_by_hand(encoder.model, images, size=224, num_prefix_tokens=5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_dinov2_bad_arguments():
    with pytest.raises(ValueError, match="model_name"):
        DINOv2Encoder("vit_base_patch16_224", weights=None)
    with pytest.raises(ValueError, match="img_size=30"):
        quiet(DINOv2Encoder, weights=None, img_size=30, **TINY_VIT)
    encoder = tiny_dino()
    with pytest.raises(ValueError, match="images"):
        encoder(torch.zeros(2, 1, 28, 28))
    with pytest.raises(TypeError, match="dtype"):
        encoder(torch.zeros(2, 3, 28, 28, dtype=torch.int32))


def test_random_init_warns():
    with pytest.warns(UserWarning, match="RANDOMLY INITIALIZED"):
        DINOv2Encoder(weights=None, img_size=28, **TINY_VIT)


# --------------------------------------------------------------------------------------------- weights from files

@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_dinov2_weights_file_roundtrip(tmp_path, suffix):
    source = tiny_dino()
    path = tmp_path / f"dino{suffix}"
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(state, str(path))
    else:
        torch.save({"model": state, "step": 3}, path)  # nested, as training scripts save it

    images = random_images()
    want = source(images)
    loaded = DINOv2Encoder(weights=path, img_size=28, **TINY_VIT)
    torch.testing.assert_close(loaded(images), want, rtol=0, atol=0)
    from_folder = DINOv2Encoder(weights=tmp_path, img_size=28, **TINY_VIT)  # a folder holding the one file
    torch.testing.assert_close(from_folder(images), want, rtol=0, atol=0)


def test_dinov2_official_facebookresearch_layout(tmp_path):
    """An official `dinov2_vit*14_reg4_pretrain.pth` (CLS slot in pos_embed, register_tokens, mask_token, a larger
    position grid) loads as DINOv2 itself would run it at this size: the CLS position folded into the CLS token and
    the patch positions resized with antialiased bicubic interpolation to the model's grid."""
    target = tiny_dino()
    dim, old_grid = 64, 4
    official = {k: v.clone() for k, v in target.model.state_dict().items()
                if k not in ("cls_token", "reg_token", "pos_embed")}
    official["cls_token"] = torch.randn(1, 1, dim)
    official["register_tokens"] = torch.randn(1, 4, dim)
    official["mask_token"] = torch.randn(1, dim)
    official["pos_embed"] = torch.randn(1, 1 + old_grid ** 2, dim)
    torch.save(official, tmp_path / "dinov2_vitb14_reg4_pretrain.pth")

    loaded = DINOv2Encoder(weights=tmp_path / "dinov2_vitb14_reg4_pretrain.pth", img_size=28, **TINY_VIT)
    state = loaded.model.state_dict()
    patch_pos = official["pos_embed"][:, 1:].reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(patch_pos, size=(2, 2), mode="bicubic", antialias=True).permute(0, 2, 3, 1)
    torch.testing.assert_close(state["pos_embed"], resized.reshape(1, 4, dim), rtol=0, atol=1e-6)
    torch.testing.assert_close(state["cls_token"], official["cls_token"] + official["pos_embed"][:, :1])
    torch.testing.assert_close(state["reg_token"], official["register_tokens"])
    torch.testing.assert_close(state["blocks.1.mlp.fc2.weight"], official["blocks.1.mlp.fc2.weight"])


def test_wrong_keys_are_listed(tmp_path):
    state = tiny_dino().model.state_dict()
    state["blocks.0.attn.qkv.wrongname"] = state.pop("blocks.0.attn.qkv.weight")
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as err:
        DINOv2Encoder(weights=tmp_path / "bad.pt", img_size=28, **TINY_VIT)
    message = str(err.value)
    assert "missing keys: blocks.0.attn.qkv.weight" in message
    assert "unexpected keys: blocks.0.attn.qkv.wrongname" in message and "bad.pt" in message


def test_torch_files_load_weights_only(tmp_path):
    torch.save({"model": {"w": torch.ones(1)}, "args": socket.AF_INET}, tmp_path / "pickled.pt")  # an enum object
    with pytest.raises(ValueError, match="weights_only"):
        weights_module.load_state_dict_file(tmp_path / "pickled.pt")


def test_missing_local_path_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "dino.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        DINOv2Encoder(weights=missing)
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        LatentVAE(weights=missing)
    with pytest.raises(TypeError, match="weights"):
        DINOv2Encoder(weights=3)


# ------------------------------------------------------------------------------------------------ offline behaviour

@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_hub_offline_error_is_fast_and_helpful(empty_hub_cache):
    empty_hub_cache.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as err:
        DINOv2Encoder(weights="hub")
    assert time.monotonic() - start < 5.0
    message = str(err.value)
    assert "vit_base_patch14_reg4_dinov2" in message and "HF_HUB_OFFLINE" in message
    assert "weights='/path/to/file'" in message and "dinov2_vitb14_reg4_pretrain.pth" in message

    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="stabilityai/sd-vae-ft-ema.*diffusers model folder"):
        LatentVAE(weights="hub")
    assert time.monotonic() - start < 5.0


def test_hub_unreachable_without_offline_flag_fails_fast(empty_hub_cache):
    """No HF_HUB_OFFLINE, and an endpoint that accepts connections but never answers: the probe must give up after
    its timeout instead of hanging in the hub client's retries."""
    from huggingface_hub import constants
    empty_hub_cache.delenv("HF_HUB_OFFLINE", raising=False)
    empty_hub_cache.setattr(constants, "HF_HUB_OFFLINE", False)
    empty_hub_cache.setattr(weights_module, "HUB_CHECK_TIMEOUT_S", 0.5)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    try:
        empty_hub_cache.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        start = time.monotonic()
        with pytest.raises(WeightsUnavailableError, match="did not answer"):
            DINOv2Encoder(weights="hub")
        assert time.monotonic() - start < 5.0
    finally:
        silent.close()


# ------------------------------------------------------------------------------------------------------------ VAE

def test_vae_moments_match_diffusers_posterior():
    vae = tiny_vae()
    images = random_images(size=16)
    moments = vae.encode_moments(images)
    with torch.no_grad():
        posterior = vae.vae.encode(images.float() / 127.5 - 1.0).latent_dist
    assert moments.shape == (2, 8, 4, 4) and vae.downsample_factor == 4
    # REPA layout: [mean, std].
    torch.testing.assert_close(moments[:, :4], posterior.mean, rtol=0, atol=0)
    torch.testing.assert_close(moments[:, 4:], posterior.std, rtol=0, atol=0)
    # Float input in [-1, 1] is the same image.
    torch.testing.assert_close(vae.encode_moments(images.float() / 127.5 - 1.0), moments, rtol=0, atol=0)
    # diffusers layout: latent_dist.parameters = [mean, logvar].
    vae.moments_layout = "mean_logvar"
    torch.testing.assert_close(vae.encode_moments(images), posterior.parameters, rtol=0, atol=0)


def test_vae_sample_latent_formula():
    vae = tiny_vae()
    mean, std = torch.randn(2, 4, 4, 4), torch.rand(2, 4, 4, 4) + 0.1
    eps = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(7))

    got = vae.sample_latent(torch.cat([mean, std], 1), generator=torch.Generator().manual_seed(7))
    want = 0.18215 * (mean.double() + std.double() * eps.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)

    # mean_logvar layout clamps the log-variance to [-30, 20] like diffusers; a shift is subtracted before scaling.
    logvar = torch.randn(2, 4, 4, 4)
    logvar[0, 0, 0, 0] = 25.0
    shifted = tiny_vae(moments_layout="mean_logvar", scale=0.5, shift=0.25)
    got = shifted.sample_latent(torch.cat([mean, logvar], 1), generator=torch.Generator().manual_seed(7))
    want = 0.5 * (mean.double() + torch.exp(0.5 * logvar.double().clamp(-30, 20)) * eps.double() - 0.25)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    # The same draw without a VAE instance (what a training step needs).
    alone = sample_posterior(torch.cat([mean, logvar], 1), layout="mean_logvar", scale=0.5, shift=0.25,
                             generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(alone, got, rtol=0, atol=0)
    with pytest.raises(ValueError, match="layout"):
        sample_posterior(torch.cat([mean, logvar], 1), layout="logvar")


def test_vae_decode_undoes_the_scale():
    vae = tiny_vae()
    latents = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        want = vae.vae.decode(latents / 0.18215).sample
    got = vae.decode(latents)
    assert got.shape == (2, 3, 16, 16)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_vae_default_is_sd_vae_shape():
    vae = quiet(LatentVAE, weights=None)
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # stabilityai/sd-vae-ft-ema's AutoencoderKL
    assert (vae.latent_channels, vae.downsample_factor, vae.scale, vae.shift) == (4, 8, 0.18215, 0.0)
    assert vae.moments_layout == "mean_std"


def test_vae_frozen_and_bad_inputs():
    vae = tiny_vae()
    nn.Sequential(vae).train()
    assert not any(m.training for m in vae.modules()) and not any(p.requires_grad for p in vae.parameters())
    with pytest.raises(ValueError, match="multiples of 4"):
        vae.encode_moments(random_images(size=18))
    with pytest.raises(ValueError, match="images"):
        vae.encode_moments(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="moments"):
        vae.sample_latent(torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.zeros(2, 8, 4, 4))
    with pytest.raises(ValueError, match="moments_layout"):
        LatentVAE(weights=None, moments_layout="mean_var")


def test_vae_weights_from_diffusers_folder_and_single_file(tmp_path):
    source = tiny_vae()
    source.vae.save_pretrained(tmp_path / "folder")  # config.json + diffusion_pytorch_model.safetensors
    images = random_images(size=16)
    want = source.encode_moments(images)

    from_folder = LatentVAE(weights=tmp_path / "folder")  # the tiny config comes from the folder's config.json
    torch.testing.assert_close(from_folder.encode_moments(images), want, rtol=0, atol=0)

    # Early diffusers attention names (query/key/value/proj_attn) are renamed on load.
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    old_style = {}
    for key, value in source.vae.state_dict().items():
        for new, old in renames.items():
            key = key.replace(new, old)
        old_style[key] = value
    torch.save(old_style, tmp_path / "old_names.bin")
    from_file = LatentVAE(weights=tmp_path / "old_names.bin", config=TINY_VAE)
    torch.testing.assert_close(from_file.encode_moments(images), want, rtol=0, atol=0)


def to_ldm_layout(state_dict, num_blocks):
    """The original CompVis/LDM key layout, written out independently of diffusers' converter."""
    out = {}
    for key, value in state_dict.items():
        k = key
        k = re.sub(r"down_blocks\.(\d+)\.resnets\.(\d+)\.", r"down.\1.block.\2.", k)
        k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", k)
        k = re.sub(r"up_blocks\.(\d+)\.resnets\.(\d+)\.",
                   lambda m: f"up.{num_blocks - 1 - int(m.group(1))}.block.{m.group(2)}.", k)
        k = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"up.{num_blocks - 1 - int(m.group(1))}.upsample.", k)
        k = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", k)
        k = k.replace("mid_block.attentions.0.", "mid.attn_1.").replace("conv_shortcut", "nin_shortcut")
        k = k.replace("conv_norm_out", "norm_out").replace("attn_1.group_norm", "attn_1.norm")
        for new, old in ((".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."), (".to_out.0.", ".proj_out.")):
            if new in k:
                k = k.replace(new, old)
                if value.dim() == 2:  # LDM's attention projections are 1×1 convolutions
                    value = value[:, :, None, None]
        out["first_stage_model." + k] = value
    return out


def test_vae_weights_from_original_ldm_checkpoint(tmp_path):
    from safetensors.torch import save_file

    source = tiny_vae()
    save_file({k: v.contiguous() for k, v in to_ldm_layout(source.vae.state_dict(), 3).items()},
              str(tmp_path / "vae-ldm.safetensors"))
    loaded = LatentVAE(weights=tmp_path / "vae-ldm.safetensors", config=TINY_VAE)
    images = random_images(size=16)
    torch.testing.assert_close(loaded.encode_moments(images), source.encode_moments(images), rtol=0, atol=0)
    latents = torch.randn(1, 4, 4, 4)
    torch.testing.assert_close(loaded.decode(latents), source.decode(latents), rtol=0, atol=0)


def test_build_encoder_by_name():
    assert isinstance(quiet(build_encoder, "dinov2", weights=None, img_size=28, **TINY_VIT), DINOv2Encoder)
    vae = quiet(build_encoder, "sd-vae-ft-mse", weights=None, config=TINY_VAE)
    assert isinstance(vae, LatentVAE)
    with pytest.raises(ValueError, match="name"):
        build_encoder("resnet50")


def fake_hub_snapshot(cache_dir, repo_id, files):
    """Lays out files the way huggingface_hub caches a download (refs/main → snapshots/<commit>/<file>)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for name, write in files.items():
        write(snapshot / name)
    return snapshot


def test_hub_weights_already_cached_load_offline(empty_hub_cache, tmp_path):
    """weights="hub" with HF_HUB_OFFLINE=1 uses a cached copy: timm's repo for DINOv2, the diffusers repo (weights and
    config.json) for the VAE."""
    from huggingface_hub import constants
    from safetensors.torch import save_file

    empty_hub_cache.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub-cache"
    dino = tiny_dino()
    state = {k: v.contiguous() for k, v in dino.model.state_dict().items()}
    fake_hub_snapshot(cache, "timm/vit_base_patch14_reg4_dinov2.lvd142m",
                      {"model.safetensors": lambda path: save_file(state, str(path))})
    assert constants.HF_HUB_CACHE == str(cache)
    images = random_images()
    torch.testing.assert_close(DINOv2Encoder(weights="hub", img_size=28, **TINY_VIT)(images), dino(images),
                               rtol=0, atol=0)

    vae = tiny_vae()
    folder = tmp_path / "saved-vae"
    vae.vae.save_pretrained(folder)
    fake_hub_snapshot(cache, "stabilityai/sd-vae-ft-ema", {
        name: (lambda path, name=name: path.write_bytes((folder / name).read_bytes()))
        for name in ("config.json", "diffusion_pytorch_model.safetensors")})
    images = random_images(size=16)
    torch.testing.assert_close(LatentVAE(weights="hub").encode_moments(images), vae.encode_moments(images),
                               rtol=0, atol=0)


def test_dinov2_weights_cast_to_bf16_still_run():
    encoder = tiny_dino()
    images = random_images()
    want = encoder(images)
    got = encoder.to(torch.bfloat16)(images)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0.1, atol=0.1)


@pytest.mark.gpu
def test_encoders_on_cuda_match_cpu():
    """On a GPU: the bf16-autocast DINOv2 stays near the fp32 CPU features; a CPU generator drives CUDA sampling."""
    encoder = tiny_dino(img_size=56)
    images = random_images(size=64)
    want = encoder(images)
    fast = encoder.cuda()
    fast.autocast_dtype = torch.bfloat16
    got = fast(images.cuda())
    assert got.device.type == "cuda" and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), want, rtol=0.05, atol=0.1)

    vae = tiny_vae()
    moments = torch.cat([torch.randn(2, 4, 4, 4), torch.rand(2, 4, 4, 4)], 1)
    want = vae.sample_latent(moments, generator=torch.Generator().manual_seed(3))
    got = vae.cuda().sample_latent(moments.cuda(), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-6)
    decoded = vae.decode(got).cpu()
    with torch.no_grad():
        want = vae.vae.cpu().decode(got.cpu() / 0.18215).sample
    torch.testing.assert_close(decoded, want, rtol=1e-3, atol=1e-3)
