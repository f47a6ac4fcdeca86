"""Sampling library and the sample.py CLI.

The library tests use a denoiser whose velocity field is known in closed form: every element of the (image +
feature) channels is Gaussian data x1 ~ N(mu_c(y), sigma_c^2) with a class-dependent mean, noise x0 ~ N(0, 1),
x_t = t x1 + (1 - t) x0 (tests/test_samplers.py derives the formulas):

    v(x, t) = mu + (t sigma^2 - (1 - t)) / s_t^2 * (x - t mu),   s_t^2 = t^2 sigma^2 + (1 - t)^2,

and the exact ODE flow maps the noise x0 to mu + sigma x0. The null class (y = num_classes) has mean 0.
The CLI tests build tiny real SiT checkpoints (ours and public-style) and compare the written files with samples
computed by hand from the same weights and noise.
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from coredi_fast.models import create_model
from coredi_fast.sampling import decode_to_uint8, generate, main, sample_seeds, to_rgb_nhwc
from coredi_fast.training.checkpoint import save_checkpoint
from coredi_fast.training.config import TrainConfig
from coredi_fast.transport import sample_ode, sample_sde

REPO = Path(__file__).resolve().parents[1]
IMAGE_CHANNELS, FEATURE_CHANNELS, SIZE, NUM_CLASSES = 2, 3, 4, 3
SIGMA = torch.tensor([0.5, 2.0, 1.0, 0.7, 1.5], dtype=torch.float64).view(1, -1, 1, 1)
BASE_MU = torch.tensor([1.0, -2.0, 0.5, 0.0, -1.0], dtype=torch.float64).view(1, -1, 1, 1)


def class_mean(y: torch.Tensor) -> torch.Tensor:
    """mu (B, C, 1, 1): BASE_MU * (1 + label); the null class NUM_CLASSES has mean 0."""
    scale = (1.0 + y.to(torch.float64)).view(-1, 1, 1, 1)
    return torch.where(y.view(-1, 1, 1, 1) == NUM_CLASSES, torch.zeros(1, dtype=torch.float64), BASE_MU * scale)


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x64, t64 = x.to(torch.float64), t.to(torch.float64).view(-1, 1, 1, 1)
    mu = class_mean(y)
    var = t64**2 * SIGMA**2 + (1 - t64) ** 2
    return (mu + (t64 * SIGMA**2 - (1 - t64)) / var * (x64 - t64 * mu)).to(x.dtype)


class GaussianDenoiser(nn.Module):
    """model(x, t, y) with the exact velocity of the Gaussian data; records the channels and modes it saw."""

    def __init__(self):
        super().__init__()
        self.config = {"num_classes": NUM_CLASSES, "in_channels": IMAGE_CHANNELS + FEATURE_CHANNELS, "input_size": SIZE}
        self.seen_training = []

    def forward(self, x, t, y):
        assert x.shape[1:] == (IMAGE_CHANNELS + FEATURE_CHANNELS, SIZE, SIZE)
        self.seen_training.append(self.training)
        return gaussian_velocity(x, t, y)


def noise_by_hand(seeds):
    """Sample i's initial noise: the first (C, H, W) standard normal of Generator().manual_seed(seeds[i])."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    noise = torch.stack([torch.randn(IMAGE_CHANNELS + FEATURE_CHANNELS, SIZE, SIZE, generator=g) for g in gens])
    return noise, gens


KW = dict(image_channels=IMAGE_CHANNELS, feature_channels=FEATURE_CHANNELS, image_size=SIZE)


# ============================================================================================= library

def test_ode_matches_sample_ode_by_hand_and_the_exact_flow():
    labels = torch.tensor([0, 2, 1, 1])
    seeds = sample_seeds(7, range(4))
    model = GaussianDenoiser().train()
    images, features = generate(model, labels, sampler="ode", method="heun", steps=40, batch_size=3, seeds=seeds,
                                return_features=True, **KW)
    assert model.training and not any(model.seen_training)  # evaluated in eval mode, mode restored afterwards

    noise, _ = noise_by_hand(seeds)
    by_hand = sample_ode(lambda x, t: gaussian_velocity(x, t, labels), noise, 40, "heun")
    torch.testing.assert_close(images, by_hand[:, :IMAGE_CHANNELS], rtol=0, atol=1e-6)
    torch.testing.assert_close(features, by_hand[:, IMAGE_CHANNELS:], rtol=0, atol=1e-6)
    # The exact flow sends x0 to mu + sigma x0 on every channel, the noised feature channels included.
    exact = (class_mean(labels) + SIGMA * noise.double()).float()
    torch.testing.assert_close(torch.cat([images, features], 1), exact, rtol=0, atol=2e-3)
    only_images = generate(model, labels, sampler="ode", method="heun", steps=40, seeds=seeds, **KW)
    assert only_images.shape == (4, IMAGE_CHANNELS, SIZE, SIZE) and torch.equal(only_images, images)


def test_sde_matches_sample_sde_run_per_sample():
    labels = torch.tensor([1, 0, 2])
    seeds = sample_seeds(3, range(3))
    images, features = generate(GaussianDenoiser(), labels, sampler="sde", steps=12, batch_size=3, seeds=seeds,
                                return_features=True, **KW)
    noise, gens = noise_by_hand(seeds)
    for i in range(3):
        # Alone, sample i's generator continues from its initial noise into its Brownian increments.
        ref = sample_sde(lambda x, t: gaussian_velocity(x, t, labels[i:i + 1]), noise[i:i + 1], 12, generator=gens[i])
        torch.testing.assert_close(images[i:i + 1], ref[:, :IMAGE_CHANNELS], rtol=0, atol=1e-6)
        torch.testing.assert_close(features[i:i + 1], ref[:, IMAGE_CHANNELS:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("sampler", ["sde", "ode"])
def test_samples_do_not_depend_on_batch_size(sampler):
    labels = torch.tensor([0, 1, 2, 0, 1])
    runs = [generate(GaussianDenoiser(), labels, sampler=sampler, method="euler", steps=6, batch_size=b,
                     generator=torch.Generator().manual_seed(11), **KW) for b in (2, 5)]
    assert torch.equal(runs[0], runs[1])
    other_seed = generate(GaussianDenoiser(), labels, sampler=sampler, method="euler", steps=6, batch_size=5,
                          generator=torch.Generator().manual_seed(12), **KW)
    assert not torch.allclose(other_seed, runs[0])


@pytest.mark.parametrize("guidance_on", ["image", "all"])
def test_classifier_free_guidance_matches_the_formula(guidance_on):
    labels, w = torch.tensor([2, 0, 1]), 2.5
    seeds = sample_seeds(5, range(3))
    images, features = generate(GaussianDenoiser(), labels, sampler="ode", method="euler", steps=8, seeds=seeds,
                                cfg_scale=w, guidance_on=guidance_on, return_features=True, **KW)

    def guided(x, t):
        v_cond = gaussian_velocity(x, t, labels)
        v_null = gaussian_velocity(x, t, torch.full_like(labels, NUM_CLASSES))
        v = v_null + w * (v_cond - v_null)
        if guidance_on == "image":  # the feature channels keep the conditional velocity
            v[:, IMAGE_CHANNELS:] = v_cond[:, IMAGE_CHANNELS:]
        return v

    by_hand = sample_ode(guided, noise_by_hand(seeds)[0], 8, "euler")
    torch.testing.assert_close(images, by_hand[:, :IMAGE_CHANNELS], rtol=0, atol=1e-6)
    torch.testing.assert_close(features, by_hand[:, IMAGE_CHANNELS:], rtol=0, atol=1e-6)


def test_sample_seeds_are_per_index():
    assert torch.equal(sample_seeds(0, [4, 9]), sample_seeds(0, range(10))[[4, 9]])
    seeds = sample_seeds(0, range(1000))
    assert len(set(seeds.tolist())) == 1000 and bool((seeds >= 0).all())
    assert not torch.equal(sample_seeds(1, range(4)), sample_seeds(0, range(4)))


def test_generate_rejects_bad_requests():
    labels = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="feature_channels"):
        generate(GaussianDenoiser(), labels, image_channels=IMAGE_CHANNELS, feature_channels=1, image_size=SIZE)
    with pytest.raises(ValueError, match="labels"):
        generate(GaussianDenoiser(), torch.tensor([0, NUM_CLASSES]), steps=2, **KW)
    no_null = create_model("SiT-Micro/2", input_size=4, in_channels=4, num_classes=3, class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="cfg_scale"):
        generate(no_null, labels, image_channels=4, image_size=4, cfg_scale=2.0, steps=2)
    with pytest.raises(ValueError, match="rg_scale"):
        generate(no_null, labels, image_channels=4, image_size=4, rg_scale=2.0, steps=2)
    with pytest.raises(TypeError, match="labels"):
        generate(GaussianDenoiser(), labels.float(), **KW)


def test_decode_to_uint8_pixels_and_latents():
    x = torch.tensor([-1.0, -0.999, -0.3, 0.0, 0.5, 0.9999, 1.0, 1.7, -2.0]).view(1, 1, 3, 3)
    expected = np.clip(np.round((x.numpy().astype(np.float64) + 1) * 127.5), 0, 255).astype(np.uint8)
    out = decode_to_uint8(x)
    assert out.dtype == torch.uint8 and np.array_equal(out.numpy(), expected)

    class DoublingVAE(nn.Module):  # decode = 2x, upsampled 2x (nearest)
        def __init__(self):
            super().__init__()
            self.unused = nn.Parameter(torch.zeros(1))

        def decode(self, z):
            return (2 * z).repeat_interleave(2, -1).repeat_interleave(2, -2)

    z = torch.tensor([[[[-0.5, 0.1], [0.3, 0.6]]]])
    decoded = decode_to_uint8(z, vae=DoublingVAE())
    pixels = np.clip(np.round((2 * z.numpy().astype(np.float64) + 1) * 127.5), 0, 255).astype(np.uint8)
    assert np.array_equal(decoded.numpy(), pixels.repeat(2, -1).repeat(2, -2))
    rgb = to_rgb_nhwc(decoded)
    assert rgb.shape == (1, 4, 4, 3) and all(np.array_equal(rgb[..., c], decoded[:, 0].numpy()) for c in range(3))


# ============================================================================================= CLI

def _randomize(model: nn.Module, seed: int) -> dict:
    """Non-zero weights everywhere (SiT's zero-initialized output would make every sample its noise)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    """Our checkpoint of a pixel-space CoReDi model on 16x16 grey digits (the embedded default config)."""
    config = TrainConfig().to_dict()
    image_channels, feature_channels = config["data"]["channels"], config["method"]["projector"]["dim"]
    model = create_model("SiT-Micro/2", input_size=config["data"]["image_size"],
                         in_channels=image_channels + feature_channels, num_classes=10)
    raw, ema = _randomize(model, 1), _randomize(model, 2)
    path = save_checkpoint(tmp_path_factory.mktemp("run"), 5, {"model": raw, "ema": ema, "config": config,
                                                              "model_config": model.config})
    return path, model.config, raw, ema


def _samples_by_hand(model_config, state_dict, labels, seed, steps, batch_size, image_channels, vae=None,
                     repa_time=False):
    """The ODE-Euler samples of the checkpoint's weights, batched like the CLI, as uint8 NCHW.

    repa_time: the network was trained with REPA's t = 1 noise and target noise - data, so SiT's velocity at
    time t is minus its output at 1 - t."""
    net = create_model(**model_config).eval()
    net.load_state_dict(state_dict)
    model = (lambda x, t, y: -net(x, 1 - t, y)) if repa_time else net
    channels, size = model_config["in_channels"], model_config["input_size"]
    seeds = sample_seeds(seed, range(len(labels)))
    out = []
    for start in range(0, len(labels), batch_size):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[start:start + batch_size]]
        noise = torch.stack([torch.randn(channels, size, size, generator=g) for g in gens])
        y = labels[start:start + batch_size]
        x = sample_ode(lambda x, t: model(x, t, y), noise, steps, "euler")[:, :image_channels]
        x = vae.decode(x) if vae is not None else x
        out.append(((x.double() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def test_cli_on_our_checkpoint(digits_checkpoint, tmp_path):
    from PIL import Image

    path, model_config, raw, ema = digits_checkpoint
    common = ["--ckpt", str(path), "--num-samples", "6", "--batch-size", "4", "--sampler", "ode", "--method", "euler",
              "--steps", "3", "--labels", "1,2,3", "--seed", "4"]
    out = main(common + ["--out", str(tmp_path / "ema")])
    with np.load(out / "samples.npz") as f:
        arr, labels = f["arr_0"], f["labels"]
    assert arr.dtype == np.uint8 and arr.shape == (6, 16, 16, 3) and labels.tolist() == [1, 2, 3, 1, 2, 3]
    expected = _samples_by_hand(model_config, ema, torch.tensor(labels), 4, 3, 4, image_channels=1)
    assert np.array_equal(arr, expected.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy())  # grey -> RGB

    # 6 images, 3 per row, 16 px upscaled 4x to 64, 2-px padding: (2 * 66 + 2) x (3 * 66 + 2), grey.
    grid = np.asarray(Image.open(out / "samples.png"))
    assert grid.shape == (134, 200)
    assert np.array_equal(grid[68:132, 134:198], arr[5, :, :, 0].repeat(4, 0).repeat(4, 1))

    out_raw = main(common + ["--no-ema", "--out", str(tmp_path / "raw")])
    with np.load(out_raw / "samples.npz") as f:
        arr_raw = f["arr_0"]
    expected_raw = _samples_by_hand(model_config, raw, torch.tensor(labels), 4, 3, 4, image_channels=1)
    assert np.array_equal(arr_raw[..., 0], expected_raw[:, 0].numpy()) and not np.array_equal(arr_raw, arr)


def _tiny_vae_folder(folder: Path) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4,
                        latent_channels=4, sample_size=32)
    vae.save_pretrained(folder)
    return folder


def test_cli_on_a_public_redi_style_checkpoint(tmp_path):
    """{"model", "ema", "opt", "args"} as SiT/REPA/ReDi save it: 4 latent + 3 feature channels, learn_sigma."""
    from coredi_fast.encoders import LatentVAE

    model = create_model("SiT-Micro/2", input_size=4, in_channels=7, num_classes=5, learn_sigma=True)
    weights = _randomize(model, 3)
    ckpt = tmp_path / "0400000.pt"
    torch.save({"model": weights, "ema": weights, "opt": {}, "args": argparse.Namespace(model="SiT-Micro/2")}, ckpt)
    vae_dir = _tiny_vae_folder(tmp_path / "vae")
    out = main(["--ckpt", str(ckpt), "--model", "SiT-Micro/2", "--image-size", "32", "--feature-channels", "3",
                "--num-classes", "5", "--learn-sigma", "--vae", str(vae_dir), "--class-balanced",
                "--num-samples", "3", "--sampler", "ode", "--method", "euler", "--steps", "2",
                "--out", str(tmp_path / "out")])
    with np.load(out / "samples.npz") as f:
        arr, labels = f["arr_0"], f["labels"]
    assert labels.tolist() == [0, 1, 2]
    vae = LatentVAE(weights=vae_dir, scale=0.18215)
    expected = _samples_by_hand(model.config, weights, torch.tensor(labels), 0, 2, 32, image_channels=4, vae=vae)
    assert arr.shape == (3, 32, 32, 3)
    assert np.array_equal(arr, expected.permute(0, 2, 3, 1).numpy())

    # The same weights read as a REPA checkpoint (t = 1 is noise): the time is flipped, the velocity negated.
    out = main(["--ckpt", str(ckpt), "--model", "SiT-Micro/2", "--image-size", "32", "--num-classes", "5",
                "--time-convention", "repa", "--vae", str(vae_dir), "--class-balanced", "--num-samples", "3",
                "--sampler", "ode", "--method", "euler", "--steps", "2", "--out", str(tmp_path / "repa")])
    with np.load(out / "samples.npz") as f:
        arr_repa = f["arr_0"]
    expected = _samples_by_hand(model.config, weights, torch.tensor(labels), 0, 2, 32, image_channels=4, vae=vae,
                                repa_time=True)
    assert np.array_equal(arr_repa, expected.permute(0, 2, 3, 1).numpy()) and not np.array_equal(arr_repa, arr)


def _cli_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_cli_errors_name_the_argument(digits_checkpoint, tmp_path, capsys):
    path = str(digits_checkpoint[0])
    err = _cli_error(capsys, ["--ckpt", str(tmp_path / "missing.pt")])
    assert "--ckpt" in err and "not found" in err
    err = _cli_error(capsys, ["--ckpt", path, "--feature-channels", "8", "--out", str(tmp_path)])
    assert "--feature-channels" in err and "4" in err
    err = _cli_error(capsys, ["--ckpt", path, "--labels", "3,11", "--out", str(tmp_path)])
    assert "--labels" in err

    no_null = create_model("SiT-Micro/2", input_size=4, in_channels=4, num_classes=5, class_dropout_prob=0.0)
    ckpt = tmp_path / "sit.pt"
    torch.save({"model": no_null.state_dict(), "args": argparse.Namespace()}, ckpt)
    err = _cli_error(capsys, ["--ckpt", str(ckpt), "--model", "SiT-Micro/2", "--image-size", "32", "--num-classes",
                              "5", "--cfg-scale", "1.5", "--out", str(tmp_path)])
    assert "--cfg-scale" in err and "null class" in err
    err = _cli_error(capsys, ["--ckpt", str(ckpt), "--model", "SiT-Micro/2", "--image-size", "64", "--num-classes",
                              "5", "--out", str(tmp_path)])
    assert "--image-size" in err
    err = _cli_error(capsys, ["--ckpt", str(ckpt), "--image-size", "32"])
    assert "--model" in err
    # x_embedder.proj.weight takes 4 channels: 4 latent + 0 feature channels.
    err = _cli_error(capsys, ["--ckpt", str(ckpt), "--model", "SiT-Micro/2", "--image-size", "32", "--num-classes",
                              "5", "--feature-channels", "8", "--out", str(tmp_path)])
    assert "--feature-channels 8" in err and "x_embedder.proj.weight has 4 input channels" in err
    err = _cli_error(capsys, ["--ckpt", str(ckpt), "--model", "SiT-Micro/2", "--image-size", "32", "--num-classes",
                              "5", "--vae", str(tmp_path / "no-vae"), "--out", str(tmp_path)])
    assert "--vae" in err and "no-vae" in err


@pytest.mark.distributed
def test_two_ranks_write_the_same_samples_as_one(digits_checkpoint, tmp_path):
    path = str(digits_checkpoint[0])
    args = ["--ckpt", path, "--num-samples", "5", "--batch-size", "2", "--sampler", "sde", "--steps", "3",
            "--seed", "9", "--device", "cpu"]
    one = main(args + ["--out", str(tmp_path / "one")])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(REPO / "sample.py")] + args + ["--out", str(tmp_path / "two")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    with np.load(one / "samples.npz") as a, np.load(tmp_path / "two" / "samples.npz") as b:
        assert np.array_equal(a["labels"], b["labels"])
        # Sample i's noise depends only on (seed, i), so the rank-strided split changes nothing.
        assert np.array_equal(a["arr_0"], b["arr_0"])
    assert not (tmp_path / "two" / "parts").exists()


# ============================================================================================= recipes

def test_recipe_fills_what_the_flags_leave_and_says_where_each_came_from():
    from coredi_fast.sampling import build_parser
    from coredi_fast.sampling_recipes import apply_recipe

    args = build_parser().parse_args(["--ckpt", "x.pt"])
    lines = apply_recipe(args, "jit", "the checkpoint's model JiT-B/16")
    # LTH14/JiT main_jit.py: --sampling_method heun, --num_sampling_steps 50; README: --interval_min 0.1 --max 1.0
    assert (args.sampler, args.method, args.steps) == ("ode", "heun", 50)
    assert tuple(args.guidance_interval) == (0.1, 1.0) and args.guidance_interval_rule == "jit"
    assert "steps=50 (JiT recipe: the checkpoint's model JiT-B/16)" in lines
    args = build_parser().parse_args(["--ckpt", "x.pt", "--steps", "7", "--guidance-interval", "0.2", "0.9"])
    lines = apply_recipe(args, "sit", "--model SiT-XL/2")
    assert (args.sampler, args.steps, args.guidance_interval_rule) == ("sde", 7, "closed")   # SiT: SDE, 250
    assert "steps=7 (--steps)" in lines and "guidance_interval=0.2 0.9 (--guidance-interval)" in lines
    assert "sampler=sde (SiT recipe: --model SiT-XL/2)" in lines


def test_jits_interval_rule_leaves_its_grid_point_on_the_bound_unguided():
    """JiT's _forward_sample guides where t < high and (low == 0 or t > low): with its 50-step grid, t = 0.1 (k = 5)
    is not guided; the closed rule guides it."""
    from coredi_fast.transport import cfg_model_fn

    def network(x, t, y):
        return x + y.to(x.dtype).view(-1, 1, 1, 1)       # conditional 1 + x, unconditional NUM_CLASSES + x

    x = torch.zeros(4, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 0.1, 0.5, 1.0], dtype=torch.float64)
    y = torch.ones(4, dtype=torch.long)
    w = 3.0
    guided = 1 + (w - 1) * (1 - NUM_CLASSES)             # v_u + w (v_c - v_u) at x = 0
    jit = cfg_model_fn(network, y, w, NUM_CLASSES, 1, interval=(0.1, 1.0), interval_rule="jit")(x, t)
    closed = cfg_model_fn(network, y, w, NUM_CLASSES, 1, interval=(0.1, 1.0))(x, t)
    jit_mask = [(tk < 1.0) and (tk > 0.1) for tk in t.tolist()]          # JiT's rule, written out
    assert [float(v) for v in jit[:, 0, 0, 0]] == [guided if m else 1.0 for m in jit_mask] == [1.0, 1.0, guided, 1.0]
    assert [float(v) for v in closed[:, 0, 0, 0]] == [1.0, guided, guided, guided]
    from_zero = cfg_model_fn(network, y, w, NUM_CLASSES, 1, interval=(0.0, 1.0), interval_rule="jit")(x, t)
    assert [float(v) for v in from_zero[:, 0, 0, 0]] == [guided, guided, guided, 1.0]   # low = 0: no lower bound


def test_cli_samples_a_jit_checkpoint_with_jits_recipe(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)                          # the default output folder is samples/<name> in the cwd
    config = TrainConfig().to_dict()
    config["model"]["name"] = "JiT-Micro/2"
    config["method"]["prediction"] = "x"
    image_channels, feature_channels = config["data"]["channels"], config["method"]["projector"]["dim"]
    model = create_model("JiT-Micro/2", input_size=config["data"]["image_size"], in_channels=image_channels,
                         feature_channels=feature_channels, num_classes=10)
    weights = _randomize(model, 4)
    path = save_checkpoint(tmp_path / "run", 3, {"model": weights, "ema": weights, "config": config,
                                                 "model_config": model.config})
    out = main(["--ckpt", str(path), "--num-samples", "2", "--labels", "1,2", "--cfg-scale", "2.0"])
    printed = capsys.readouterr().out
    assert "sampler=ode (JiT recipe: the checkpoint's model JiT-Micro/2)" in printed
    assert "steps=50 (JiT recipe" in printed and "guidance_interval=0.1 1 (JiT recipe" in printed
    assert out.name.startswith(f"{path.stem}-ode-heun50-cfg2")
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (2, 16, 16, 3)
