"""Class-conditional sampling from a trained denoiser, decoding to pixels, and the `sample.py` command line.

    images = generate(model, labels, image_channels=4, feature_channels=8, image_size=32,
                      sampler="sde", steps=250, cfg_scale=1.5, generator=torch.Generator().manual_seed(0))
    pixels = decode_to_uint8(images, vae)                      # uint8 (N, 3, 256, 256)

    python sample.py --ckpt runs/demo/checkpoints/step-0003000.pt --num-samples 64
    torchrun --nproc_per_node 8 sample.py --ckpt ReDi-XL.pt --model SiT-XL/2 --image-size 256 \
        --feature-channels 8 --num-samples 50000 --class-balanced --cfg-scale 1.5

The model denoises image channels and (ReDi/CoReDi) feature channels jointly: the initial noise covers all
image_channels + feature_channels, guidance comes from `transport.make_model_fn`, and only the image channels are
returned (and decoded); the generated features are a by-product (`return_features=True`).

Noise is per sample: sample i draws its initial noise, then (SDE) its Brownian increments, from its own CPU
generator seeded by seeds[i]. A sample therefore depends only on its seed, label and the settings, never on the
batch size, the device, or how many ranks share the work (`sample_seeds(seed, indices)` gives every rank the same
seed for a global index).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from .sampling_recipes import apply_recipe
from .transport import GUIDANCE_TARGETS, INTERVAL_RULES, ODE_METHODS, PREDICTIONS, make_model_fn, sample_ode

# `coredi_fast.training` (the loop) imports this module, so this module imports from it only inside functions.

SAMPLERS = ("sde", "ode")
SDE_LAST_STEP_SIZE = 0.04    # SiT's default "Mean" last step
SDE_DIFFUSION_NORM = 1.0     # SiT's default "sigma" diffusion, w(t) = 1 - t
LATENT_CHANNELS = 4          # SD-VAE
LATENT_DOWNSAMPLE = 8
SD_VAE_SCALE = 0.18215       # latent scale of the SD-VAE that public SiT/REPA/ReDi checkpoints were trained with

_MASK64 = (1 << 64) - 1


# ============================================================================================= seeds and noise

def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seeds(seed: int, indices: Sequence[int]) -> torch.Tensor:
    """Per-sample seeds (n,) int64 in [0, 2^63) for global sample indices: a hash of (seed, index), so any rank
    computes the same seed for the same index (splitmix64, whose outputs for consecutive inputs are decorrelated)."""
    base = _splitmix64(int(seed) & _MASK64)
    return torch.tensor([_splitmix64(base ^ int(i)) >> 1 for i in indices], dtype=torch.int64)


class _PerSampleNoise:
    """One CPU torch.Generator per sample; `draw(shape)` takes the next standard normal (shape) from each."""

    def __init__(self, seeds: torch.Tensor):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds.tolist()]

    def draw(self, shape: Tuple[int, ...], device: torch.device) -> torch.Tensor:
        """(B, *shape) float32 on `device`: drawn on the CPU, so the numbers do not depend on the device."""
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators]).to(device)


@torch.no_grad()
def sample_sde_per_sample(model_fn, noise: torch.Tensor, streams: _PerSampleNoise, steps: int = 250,
                          diffusion_norm: float = SDE_DIFFUSION_NORM,
                          last_step_size: float = SDE_LAST_STEP_SIZE) -> torch.Tensor:
    """`transport.sample_sde` with each sample's Brownian increments drawn from its own stream.

    The same Euler-Maruyama grid and drift as `sample_sde` (t_k = linspace(0, 1 - last_step_size, steps), drift
    v + diffusion_norm (t v - x), noise sqrt(2 diffusion_norm (1 - t) dt), then one noise-free "Mean" step), so
    sample i equals `sample_sde(model_fn_i, noise[i:i+1], generator=g_i)` run alone with that sample's generator
    (tests/test_sampling.py checks this). What it adds: the batch it runs in does not change a sample.
    noise: (B, C, H, W), the state at t = 0; returns the state at t = 1 (B, C, H, W).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an int >= 2 for the SDE sampler, got {steps!r}")
    t_last = 1.0 - last_step_size
    times = torch.linspace(0.0, t_last, steps, dtype=torch.float64).tolist()
    dt = t_last / (steps - 1)
    time_dtype = torch.promote_types(noise.dtype, torch.float32)

    def drift(x: torch.Tensor, t: float) -> torch.Tensor:
        v = model_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=time_dtype)).to(x.dtype)
        return v + diffusion_norm * (t * v - x)

    x = noise
    for t in times[:-1]:
        dw = streams.draw(tuple(x.shape[1:]), x.device).to(x.dtype)
        x = x + drift(x, t) * dt + (2.0 * diffusion_norm * (1.0 - t) * dt) ** 0.5 * dw
    if last_step_size > 0:
        x = x + drift(x, t_last) * last_step_size
    return x


# ============================================================================================= generate

class GeneratedBatch(NamedTuple):
    """One batch of `generate_batches`: positions start:stop of the request, images (B, image_channels, H, W)
    and features (B, feature_channels, H, W), float32 on the CPU, in model space."""
    start: int
    stop: int
    images: torch.Tensor
    features: torch.Tensor


class ReversedTimeModel(nn.Module):
    """A network trained in REPA's convention, seen in SiT's: model(x, t, y) = -net(x, 1 - t, y).

    REPA (sihyun-yu/REPA loss.py) interpolates x_t = (1 - t) x + t noise, so t = 1 is noise and its velocity target
    is noise - x; SiT, ReDi and this package use t = 1 for data and x - noise. `config` and `y_embedder` are the
    wrapped network's (so the null class and the shape checks see through the wrapper)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @property
    def config(self) -> dict:
        return getattr(self.net, "config", {})

    @property
    def y_embedder(self):
        return getattr(self.net, "y_embedder", None)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -self.net(x, 1.0 - t, y)


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare network under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def model_null_class(model: nn.Module) -> Optional[int]:
    """The label of the unconditional class (= num_classes) when the model has one, else None.

    SiT/DiT have a null row in the label table only when built with class_dropout_prob > 0. Models without
    `config`/`y_embedder` (test doubles) answer from `config["num_classes"]` or a `num_classes` attribute."""
    bare = _unwrap(model)
    config = getattr(bare, "config", None) or {}
    num_classes = config.get("num_classes", getattr(bare, "num_classes", None))
    table = getattr(getattr(bare, "y_embedder", None), "embedding_table", None)
    if num_classes is None or (table is not None and table.num_embeddings <= num_classes):
        return None
    return int(num_classes)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_request(model, labels, image_channels, feature_channels, image_size, sampler, method, steps,
                   cfg_scale, guidance_on, rg_scale, prediction, batch_size, seeds, generator) -> None:
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.dtype.is_floating_point \
            or labels.dtype == torch.bool or labels.dtype.is_complex:
        raise TypeError(f"labels must be a 1-D integer tensor (N,), got "
                        f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    _check_int("image_channels", image_channels, 1)
    _check_int("feature_channels", feature_channels, 0)
    _check_int("image_size", image_size, 1)
    _check_int("batch_size", batch_size, 1)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if method not in ODE_METHODS:
        raise ValueError(f"method must be one of {ODE_METHODS}, got {method!r}")
    _check_int("steps", steps, 2 if sampler == "sde" else 1)
    if guidance_on not in GUIDANCE_TARGETS:
        raise ValueError(f"guidance_on must be one of {GUIDANCE_TARGETS}, got {guidance_on!r}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    if rg_scale is not None and rg_scale != 1.0 and feature_channels == 0:
        raise ValueError(f"rg_scale={rg_scale} needs feature channels (representation guidance compares the "
                         f"prediction with and without them), but feature_channels=0")
    if seeds is not None and (not isinstance(seeds, torch.Tensor) or seeds.shape != labels.shape):
        raise ValueError(f"seeds must be an int64 tensor shaped like labels {tuple(labels.shape)}, got "
                         f"{tuple(seeds.shape) if isinstance(seeds, torch.Tensor) else type(seeds).__name__}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator (noise is drawn on the CPU so results do not "
                         f"depend on the device), got one on {generator.device}")

    net = _unwrap(model)
    config = getattr(net, "config", None) or {}
    expected, size = config.get("in_channels"), config.get("input_size")
    if getattr(net, "input_shape", None) is not None:  # JiT: packed pixels (C·p² + d, H/p, W/p)
        expected, size = net.input_shape[0], net.input_shape[-1]
    if expected is not None and expected != image_channels + feature_channels:
        raise ValueError(f"feature_channels={feature_channels}: the model takes in_channels={expected}, which is not "
                         f"image_channels ({image_channels}) + feature_channels")
    if size is not None and size != image_size:
        raise ValueError(f"image_size={image_size} does not match the model's input side {size}")
    num_classes = config.get("num_classes")
    if num_classes is not None and labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}) for this model, got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    if cfg_scale != 1.0 and model_null_class(model) is None:
        raise ValueError(f"cfg_scale={cfg_scale} needs a null (unconditional) class, but this model has none: it was "
                         f"built with class_dropout_prob=0 (no null row in its label table). Use cfg_scale=1")


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode for the duration (SiT drops labels at random in training mode), then the previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _network(model: nn.Module, autocast_dtype: Optional[torch.dtype], device: torch.device):
    """model(x, t, y), under autocast when autocast_dtype is given (the sampler state stays float32)."""
    if autocast_dtype is None:
        return model

    def run(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=autocast_dtype):
            out = model(x, t, y)
        return out.float()

    return run


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(iter(model.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.no_grad()
def generate_batches(model: nn.Module, labels: torch.Tensor, *, image_channels: int, feature_channels: int = 0,
                     image_size: int, sampler: str = "sde", method: str = "heun", steps: int = 250,
                     cfg_scale: float = 1.0, guidance_on: str = "image",
                     guidance_interval: Optional[Tuple[float, float]] = None, rg_scale: Optional[float] = None,
                     prediction: str = "velocity", batch_size: int = 64,
                     generator: Optional[torch.Generator] = None, seeds: Optional[torch.Tensor] = None,
                     device=None, autocast_dtype: Optional[torch.dtype] = None,
                     progress: bool = False, guidance_interval_rule: str = "closed") -> Iterator[GeneratedBatch]:
    """`generate`, one batch at a time (for callers that decode or save as they go). Same arguments."""
    _check_request(model, labels, image_channels, feature_channels, image_size, sampler, method, steps, cfg_scale,
                   guidance_on, rg_scale, prediction, batch_size, seeds, generator)
    # The bare network: a DDP wrapper would try to sync buffers across ranks when only one rank samples, and a
    # torch.compile'd model would recompile for the sampling batch shapes.
    model = _unwrap(model)
    device = torch.device(device) if device is not None else _model_device(model)
    if seeds is None:
        seeds = torch.randint(0, 2**63 - 1, labels.shape, generator=generator, dtype=torch.int64)
    num = labels.shape[0]
    shape = (image_channels + feature_channels, image_size, image_size)
    network = _network(model, autocast_dtype, device)
    null_class = model_null_class(model)

    from tqdm.auto import tqdm

    with _eval_mode(model), tqdm(total=num, desc="sampling", unit="img", disable=not progress) as bar:
        for start in range(0, num, batch_size):
            stop = min(start + batch_size, num)
            y = labels[start:stop].to(device=device, dtype=torch.long)
            streams = _PerSampleNoise(seeds[start:stop])
            noise = streams.draw(shape, device)
            model_fn = make_model_fn(network, y, cfg_scale=cfg_scale, guidance_on=guidance_on,
                                     guidance_interval=guidance_interval, rg_scale=rg_scale,
                                     image_channels=image_channels, null_class=null_class, prediction=prediction,
                                     guidance_interval_rule=guidance_interval_rule)
            if sampler == "ode":
                # JiT takes the last Heun interval with Euler so an x-prediction net is never asked about t = 1.
                x = sample_ode(model_fn, noise, steps, method, heun_last_step_euler=prediction == "x")
            else:
                x = sample_sde_per_sample(model_fn, noise, streams, steps)
            x = x.float().cpu()
            bar.update(stop - start)
            yield GeneratedBatch(start, stop, x[:, :image_channels], x[:, image_channels:])


def generate(model: nn.Module, labels: torch.Tensor, *, image_channels: int, feature_channels: int = 0,
             image_size: int, sampler: str = "sde", method: str = "heun", steps: int = 250,
             cfg_scale: float = 1.0, guidance_on: str = "image",
             guidance_interval: Optional[Tuple[float, float]] = None, rg_scale: Optional[float] = None,
             prediction: str = "velocity", batch_size: int = 64, generator: Optional[torch.Generator] = None,
             seeds: Optional[torch.Tensor] = None, device=None, autocast_dtype: Optional[torch.dtype] = None,
             progress: bool = False, return_features: bool = False, guidance_interval_rule: str = "closed"):
    """Sample N images of the given classes, in model space (latents, or pixels in [-1, 1]).

    Args:
        model: the denoiser model(x (B, C, H, W), t (B,), y (B,)) -> (B, C, H, W), C = image + feature channels.
            It is put in eval mode while sampling (and restored after). DDP / torch.compile wrappers are fine.
        labels: (N,) integer class labels.
        image_channels: leading channels that are returned (4 for SD-VAE latents, 1 or 3 for pixels).
        feature_channels: trailing channels denoised jointly and discarded (ReDi/CoReDi: d; plain SiT: 0).
        image_size: H = W of the model input (the latent side for latent models).
        sampler: "sde" (SiT's Euler-Maruyama, `steps` evaluations) or "ode" with method "euler" | "heun".
        cfg_scale, guidance_on, guidance_interval: classifier-free guidance (image channels only, or "all");
            the null class is the model's num_classes (it must have one: class_dropout_prob > 0).
        guidance_interval_rule: "closed" (low <= t <= high) or "jit" (JiT's low < t < high); see `cfg_model_fn`.
        rg_scale: Representation Guidance scale (models trained with feature dropout); not with cfg_scale != 1.
        prediction: "velocity" (SiT) or "x" (JiT; each guidance branch is converted to velocity with its own
            input, then the branches are blended).
        batch_size: samples per model call (twice that with guidance).
        generator: CPU torch.Generator from which the per-sample seeds are drawn (None: the global RNG).
        seeds: (N,) int64 per-sample seeds instead (see `sample_seeds`); sample i's noise is drawn from
            torch.Generator().manual_seed(seeds[i]): first its initial noise (C, H, W), then one (C, H, W) Brownian
            increment per SDE step.
        device: where the model runs (default: the model's parameters' device).
        autocast_dtype: e.g. torch.bfloat16 to run the network under autocast (the sampler state stays float32).
        progress: show a tqdm bar.
        return_features: also return the generated feature channels.

    Returns float32 CPU images (N, image_channels, H, W), or (images, features (N, feature_channels, H, W)).
    """
    images, features = [], []
    for batch in generate_batches(model, labels, image_channels=image_channels, feature_channels=feature_channels,
                                  image_size=image_size, sampler=sampler, method=method, steps=steps,
                                  cfg_scale=cfg_scale, guidance_on=guidance_on, guidance_interval=guidance_interval,
                                  rg_scale=rg_scale, prediction=prediction, batch_size=batch_size,
                                  generator=generator, seeds=seeds, device=device, autocast_dtype=autocast_dtype,
                                  progress=progress, guidance_interval_rule=guidance_interval_rule):
        images.append(batch.images)
        features.append(batch.features)
    if not images:
        empty = torch.zeros(0, image_channels, image_size, image_size)
        return (empty, torch.zeros(0, feature_channels, image_size, image_size)) if return_features else empty
    images, features = torch.cat(images), torch.cat(features)
    return (images, features) if return_features else images


@torch.no_grad()
def decode_to_uint8(x: torch.Tensor, vae=None, pixel_patch: int = 1) -> torch.Tensor:
    """Model-space samples -> uint8 pixels (N, C, H, W) on the CPU.

    Pixel models (vae None): x in [-1, 1] -> round((x + 1) * 127.5) clamped to [0, 255]. JiT-style models work on
    patchified pixels (N, C·p², H/p, W/p): pass `pixel_patch=p` to un-patchify first.
    Latent models: `vae.decode(x)` (a `LatentVAE`: scaled latents -> images in about [-1, 1]) on the VAE's device,
    then the same mapping.
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor (N, C, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    from .training.visuals import float_to_uint8

    if pixel_patch > 1:
        x = torch.nn.functional.pixel_shuffle(x, pixel_patch)
    if vae is not None:
        vae_device = _model_device(vae)
        x = vae.decode(x.to(vae_device))
    return float_to_uint8(x).cpu()


def to_rgb_nhwc(images: torch.Tensor) -> np.ndarray:
    """uint8 (N, C, H, W), C in {1, 3} -> numpy uint8 (N, H, W, 3); grey is repeated to RGB (ADM/FID expect 3)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be uint8 (N, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.permute(0, 2, 3, 1).contiguous().numpy()


# ============================================================================================= command line

class SamplingArgumentError(ValueError):
    """A command-line argument (named in the message) is wrong or does not fit the checkpoint."""


class SamplingSpec(NamedTuple):
    """What the CLI needs to know besides the weights (from our checkpoint's config or the public-model flags)."""
    image_channels: int
    feature_channels: int
    image_size: int          # model-space side: latent side for latent models
    num_classes: int
    latent: bool             # decode with the VAE
    vae_weights: Optional[str]
    vae_scale: float
    prediction: str
    weights: str = "ema"     # which weights were loaded: "ema" | "model"
    pixel_patch: int = 1     # JiT: model space is patchified pixels (C·p² channels on the token grid)
    family: str = "sit"      # "sit" | "jit": whose sampling recipe gives the defaults (`sampling_recipes.py`)
    family_source: str = ""  # what the family was read from, e.g. "the checkpoint's model JiT-B/16" (printed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sample.py", description="Sample images from a coredi_fast checkpoint or a public SiT/REPA/ReDi one "
                                      "(writes samples.png and an ADM-style samples.npz). Under torchrun every rank "
                                      "samples its share.")
    p.add_argument("--ckpt", required=True, help="checkpoint file (ours, or public SiT/REPA/ReDi)")
    p.add_argument("--out", default=None,
                   help="output folder (default: samples/<ckpt>-<sampler><steps>-cfg<w>-seed<s>)")
    g = p.add_argument_group("what to sample")
    g.add_argument("--num-samples", type=int, default=64)
    g.add_argument("--batch-size", type=int, default=32, help="samples per model call on each rank")
    labels = g.add_mutually_exclusive_group()
    labels.add_argument("--labels", default=None, help="comma-separated class labels, repeated to --num-samples")
    labels.add_argument("--class-balanced", action="store_true", help="labels i %% num_classes (equal counts)")
    g.add_argument("--seed", type=int, default=0, help="sample i's noise depends only on (seed, i)")
    g.add_argument("--grid-images", type=int, default=64, help="how many samples samples.png shows")
    g = p.add_argument_group("sampler")
    g.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="SiT's SDE (Euler-Maruyama) or the ODE (default: the checkpoint's recipe: SiT/ReDi sde, "
                        "JiT ode)")
    g.add_argument("--method", choices=ODE_METHODS, default=None,
                   help="ODE integrator, ignored by the SDE (default: heun)")
    g.add_argument("--steps", type=int, default=None, help="default: the checkpoint's recipe (SiT/ReDi 250, JiT 50)")
    g.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    g.add_argument("--guidance-on", choices=GUIDANCE_TARGETS, default="image",
                   help="guide the image channels only (ReDi's recommendation) or all channels")
    g.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="apply CFG only for t in [LOW, HIGH], in SiT's time (t = 0 noise, 1 data); REPA's "
                        "--guidance-high 0.7 (its t = 1 is noise) is --guidance-interval 0.3 1 (default: the "
                        "checkpoint's recipe: SiT/ReDi none, JiT 0.1 1)")
    g.add_argument("--guidance-interval-rule", choices=INTERVAL_RULES, default=None,
                   help="closed: LOW <= t <= HIGH (REPA); jit: LOW < t < HIGH, no lower bound at LOW = 0 (JiT) "
                        "(default: the checkpoint's recipe)")
    g.add_argument("--rg-scale", type=float, default=None, help="Representation Guidance scale (ReDi)")
    g.add_argument("--prediction", choices=PREDICTIONS, default=None,
                   help="network output (default: the checkpoint's config, else velocity)")
    g = p.add_argument_group("model and decoding")
    g.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="EMA weights (default) or raw")
    g.add_argument("--vae", default=None, help="VAE weights for latent models: a local diffusers folder/file or "
                                               "'hub' (default: the checkpoint's vae.weights, else hub)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16 runs the network under autocast on the GPU")
    g = p.add_argument_group("public checkpoints (no config inside; checked against ours when given)")
    g.add_argument("--model", default=None, help="model-zoo name, e.g. SiT-XL/2")
    g.add_argument("--image-size", type=int, default=None, help="image size in pixels (latent side = size / 8)")
    g.add_argument("--feature-channels", type=int, default=None,
                   help="ReDi feature channels (8); default: read off the checkpoint's patch embedding")
    g.add_argument("--num-classes", type=int, default=None, help="default 1000")
    g.add_argument("--learn-sigma", action=argparse.BooleanOptionalAction, default=None,
                   help="SiT/DiT checkpoints: yes; ReDi: no (default: read off the checkpoint's final layer)")
    g.add_argument("--time-convention", choices=("sit", "repa"), default="sit",
                   help="sit: t = 1 is data (SiT, ReDi); repa: t = 1 is noise and v = noise - data (REPA's "
                        "checkpoints), flipped into SiT's convention")
    return p


def _spec_from_config(config: dict, model_config: dict, args) -> SamplingSpec:
    """Our checkpoint: everything from the stored training config; CLI model flags, if given, must agree."""
    from .training.config import TrainConfig

    try:
        cfg = TrainConfig.from_dict(config)
    except ValueError as e:
        raise SamplingArgumentError(f"--ckpt: the checkpoint's config does not fit this version: {e}") from None
    latent = cfg.data.source != "digits"
    image_channels = LATENT_CHANNELS if latent else cfg.data.channels
    image_size = cfg.data.image_size // LATENT_DOWNSAMPLE if latent else cfg.data.image_size
    projector = cfg.method.projector
    feature_channels = 0 if projector.mode == "none" else projector.dim
    if str(model_config.get("name", "")).startswith("JiT-"):  # packed pixels: C·p² channels on the token grid
        p = int(model_config["patch_size"])
        if model_config.get("in_channels") != image_channels or model_config.get("input_size") != image_size:
            raise SamplingArgumentError(f"--ckpt: the JiT model_config {model_config} does not fit the config's "
                                        f"{image_channels}-channel {image_size}px images")
        return SamplingSpec(image_channels * p * p, feature_channels, image_size // p,
                            int(model_config["num_classes"]), latent, cfg.vae.weights, cfg.vae.scale,
                            args.prediction or cfg.method.prediction, pixel_patch=p, family="jit",
                            family_source=f"the checkpoint's model {model_config['name']}")
    if model_config.get("in_channels") != image_channels + feature_channels:
        raise SamplingArgumentError(
            f"--ckpt: model_config has in_channels={model_config.get('in_channels')} but the config implies "
            f"{image_channels} image + {feature_channels} feature channels")
    if model_config.get("input_size") != image_size:
        raise SamplingArgumentError(f"--ckpt: model_config has input_size={model_config.get('input_size')} but the "
                                    f"config implies {image_size} (data.image_size={cfg.data.image_size})")
    given = {"--feature-channels": (args.feature_channels, feature_channels),
             "--image-size": (args.image_size, cfg.data.image_size),
             "--num-classes": (args.num_classes, model_config.get("num_classes")),
             "--model": (args.model, model_config.get("name")),
             "--learn-sigma": (args.learn_sigma, model_config.get("learn_sigma"))}
    for flag, (value, stored) in given.items():
        if value is not None and value != stored:
            raise SamplingArgumentError(f"{flag}={value} contradicts the checkpoint, whose config says {stored}")
    return SamplingSpec(image_channels, feature_channels, image_size, int(model_config["num_classes"]), latent,
                        cfg.vae.weights, cfg.vae.scale, args.prediction or cfg.method.prediction,
                        family_source=f"the checkpoint's model {model_config.get('name')}")


def _public_model_config(state_dict: dict, args) -> Tuple[dict, SamplingSpec]:
    """A public SiT/REPA/ReDi checkpoint: the architecture from the flags, checked against the tensor shapes."""
    from .models import MODEL_CONFIGS

    if args.model is None:
        raise SamplingArgumentError("--model is required for a checkpoint without a stored config (public "
                                    "SiT/REPA/ReDi), e.g. --model SiT-XL/2 --image-size 256")
    if args.model not in MODEL_CONFIGS:
        raise SamplingArgumentError(f"--model {args.model!r} is not a model-zoo name; valid: "
                                    f"{', '.join(MODEL_CONFIGS)}")
    for key in ("x_embedder.proj.weight", "pos_embed", "final_layer.linear.weight",
                "y_embedder.embedding_table.weight"):
        if key not in state_dict:
            raise SamplingArgumentError(f"--ckpt: the weights have no {key!r}: not a SiT/DiT/REPA/ReDi state dict")
    zoo = MODEL_CONFIGS[args.model]
    patch = zoo["patch_size"]
    hidden, in_channels, kh, kw = state_dict["x_embedder.proj.weight"].shape
    if (hidden, kh, kw) != (zoo["hidden_size"], patch, patch):
        raise SamplingArgumentError(f"--model {args.model} has hidden size {zoo['hidden_size']} and patch {patch}, "
                                    f"but the checkpoint's x_embedder.proj.weight has hidden size {hidden} and patch "
                                    f"{kh}x{kw}")
    feature_channels = in_channels - LATENT_CHANNELS
    if args.feature_channels is not None and args.feature_channels != feature_channels:
        raise SamplingArgumentError(
            f"--feature-channels {args.feature_channels} does not match the checkpoint: x_embedder.proj.weight has "
            f"{in_channels} input channels = {LATENT_CHANNELS} latent + {feature_channels} feature channels")
    if feature_channels < 0:
        raise SamplingArgumentError(f"--ckpt: x_embedder.proj.weight has {in_channels} input channels, fewer than the "
                                    f"{LATENT_CHANNELS} latent channels")
    image_size = 256 if args.image_size is None else args.image_size
    if image_size % (LATENT_DOWNSAMPLE * patch):
        raise SamplingArgumentError(f"--image-size {image_size} must be a multiple of {LATENT_DOWNSAMPLE * patch} "
                                    f"(VAE factor {LATENT_DOWNSAMPLE} x patch {patch})")
    latent_size = image_size // LATENT_DOWNSAMPLE
    tokens = state_dict["pos_embed"].shape[1]
    if tokens != (latent_size // patch) ** 2:
        raise SamplingArgumentError(f"--image-size {image_size} gives {(latent_size // patch) ** 2} tokens, but the "
                                    f"checkpoint's pos_embed has {tokens} (image size "
                                    f"{int(math.isqrt(tokens)) * patch * LATENT_DOWNSAMPLE}?)")
    out_per_patch = state_dict["final_layer.linear.weight"].shape[0]
    learn_sigma = out_per_patch == 2 * in_channels * patch * patch
    if args.learn_sigma is not None and args.learn_sigma != learn_sigma:
        raise SamplingArgumentError(f"--{'' if args.learn_sigma else 'no-'}learn-sigma does not match the checkpoint: "
                                    f"final_layer.linear.weight has {out_per_patch} outputs per token for "
                                    f"{in_channels} channels and patch {patch}")
    num_classes = 1000 if args.num_classes is None else args.num_classes
    rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
    if rows not in (num_classes, num_classes + 1):
        raise SamplingArgumentError(f"--num-classes {num_classes} does not match the checkpoint's label table of "
                                    f"{rows} rows (num_classes, plus 1 for the null class)")
    qk_norm = any(".attn.q_norm." in key for key in state_dict)
    model_config = dict(name=args.model, input_size=latent_size, in_channels=in_channels, num_classes=num_classes,
                        learn_sigma=learn_sigma, class_dropout_prob=0.1 if rows == num_classes + 1 else 0.0,
                        qk_norm=qk_norm)
    spec = SamplingSpec(LATENT_CHANNELS, feature_channels, latent_size, num_classes, True, "hub", SD_VAE_SCALE,
                        args.prediction or "velocity", family_source=f"--model {args.model}")
    return model_config, spec


def load_sampling_model(args) -> Tuple[nn.Module, SamplingSpec]:
    """Build the denoiser from `args.ckpt` (ours or public) on the CPU and load its (EMA) weights."""
    from .models import create_model
    from .models.sit import REPA_HEAD_PREFIXES
    from .training.checkpoint import load_denoiser_weights, strip_wrapper_prefixes

    try:
        state_dict, info = load_denoiser_weights(args.ckpt, prefer_ema=args.ema)
    except (FileNotFoundError, ValueError) as e:
        raise SamplingArgumentError(f"--ckpt: {e}") from None
    state_dict = strip_wrapper_prefixes(state_dict)
    # REPA's alignment projectors (`projectors.*`; ReDi+REPA names its one `projector.*`) only serve a training loss.
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(REPA_HEAD_PREFIXES)}
    ours = bool(info.get("model_config") and info.get("config"))
    if ours and args.time_convention != "sit":
        raise SamplingArgumentError(f"--time-convention {args.time_convention}: this package's checkpoints use "
                                    f"SiT's convention (t = 1 is data); the option is for public REPA checkpoints")
    if ours:
        model_config = dict(info["model_config"], grad_checkpointing=False)
        if "projector_dims" in model_config:  # SiT: REPA's projectors are not needed to sample
            model_config["projector_dims"] = []
        spec = _spec_from_config(info["config"], model_config, args)
    else:
        model_config, spec = _public_model_config(state_dict, args)
    model = create_model(**model_config)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        flag = "--ckpt" if ours else f"--model {model_config['name']}"
        raise SamplingArgumentError(f"{flag}: the weights do not fit the model {model_config['name']}: {e}") from None
    model = model.eval().requires_grad_(False)
    if args.time_convention == "repa":
        model = ReversedTimeModel(model)
    return model, spec._replace(weights=info.get("which", "model"))


def _choose_labels(args, num_classes: int) -> torch.Tensor:
    """(N,) labels: --labels repeated, --class-balanced (i % num_classes), or uniform random from --seed."""
    n = args.num_samples
    if args.labels is not None:
        try:
            given = [int(v) for v in args.labels.split(",") if v.strip()]
        except ValueError:
            raise SamplingArgumentError(f"--labels must be comma-separated integers, got {args.labels!r}") from None
        if not given or not all(0 <= v < num_classes for v in given):
            raise SamplingArgumentError(f"--labels must be in [0, {num_classes}) for this model, got {args.labels!r}")
        return torch.tensor(given, dtype=torch.int64).repeat(math.ceil(n / len(given)))[:n]
    if args.class_balanced:
        return torch.arange(n, dtype=torch.int64) % num_classes
    return torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(args.seed))


def _check_args(args, model: nn.Module, spec: SamplingSpec) -> None:
    for flag, value, minimum in (("--num-samples", args.num_samples, 1), ("--batch-size", args.batch_size, 1),
                                 ("--grid-images", args.grid_images, 0),
                                 ("--steps", args.steps, 2 if args.sampler == "sde" else 1)):
        if value < minimum:
            raise SamplingArgumentError(f"{flag} must be >= {minimum}, got {value}")
    if args.cfg_scale != 1.0 and model_null_class(model) is None:
        raise SamplingArgumentError(f"--cfg-scale {args.cfg_scale} needs a model with a null class (trained with "
                                    f"class dropout); this checkpoint's label table has none")
    use_rg = args.rg_scale is not None and args.rg_scale != 1.0
    if use_rg and spec.feature_channels == 0:
        raise SamplingArgumentError(f"--rg-scale {args.rg_scale} needs a model with feature channels; this one has "
                                    f"none")
    if use_rg and args.cfg_scale != 1.0:
        raise SamplingArgumentError("--rg-scale and --cfg-scale are alternatives (as in ReDi): set one of them to 1")
    if args.guidance_interval is not None and not 0.0 <= args.guidance_interval[0] <= args.guidance_interval[1] <= 1:
        raise SamplingArgumentError(f"--guidance-interval needs 0 <= LOW <= HIGH <= 1, got {args.guidance_interval}")


def _default_out(args) -> Path:
    cfg = f"{args.cfg_scale:g}" if args.rg_scale is None else f"{args.cfg_scale:g}-rg{args.rg_scale:g}"
    sampler = args.sampler if args.sampler == "sde" else f"ode-{args.method}"
    return Path("samples") / f"{Path(args.ckpt).stem}-{sampler}{args.steps}-cfg{cfg}-seed{args.seed}"


class _Distributed(NamedTuple):
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool


def _setup_distributed(device_arg: str) -> _Distributed:
    """Rank, world size and device from torchrun's environment; a process group (gloo/nccl) when WORLD_SIZE > 1."""
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise SamplingArgumentError("--device cuda: no CUDA device is available")
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # as SiT's sample_ddp.py
        torch.backends.cudnn.allow_tf32 = True
    owns_group = False
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
        owns_group = True
    return _Distributed(rank, world_size, device, owns_group)


def _barrier(dist_info: _Distributed) -> None:
    if dist_info.world_size > 1:
        import torch.distributed as dist

        if dist_info.device.type == "cuda":
            dist.barrier(device_ids=[dist_info.device.index])
        else:
            dist.barrier()


def _save_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _run(args) -> Path:
    dist_info = _setup_distributed(args.device)
    try:
        return _sample_and_save(args, dist_info)
    finally:
        if dist_info.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _sample_and_save(args, dist_info: _Distributed) -> Path:
    rank, world_size, device = dist_info.rank, dist_info.world_size, dist_info.device
    model, spec = load_sampling_model(args)
    settings = apply_recipe(args, spec.family, spec.family_source)
    if rank == 0:
        print("sampler settings: " + "; ".join(settings), flush=True)
    _check_args(args, model, spec)
    vae = None
    if spec.latent:  # loaded before sampling, so a missing VAE fails before hours of work
        from .encoders import LatentVAE, WeightsUnavailableError

        weights = args.vae or spec.vae_weights or "hub"
        try:
            vae = LatentVAE(weights=weights, scale=spec.vae_scale).to(device)
        except (FileNotFoundError, WeightsUnavailableError) as e:
            raise SamplingArgumentError(f"--vae {weights}: this latent-space model needs the VAE to decode: {e}") \
                from None
    model.to(device)

    out = Path(args.out) if args.out else _default_out(args)
    out.mkdir(parents=True, exist_ok=True)
    labels = _choose_labels(args, spec.num_classes)
    mine = torch.arange(rank, args.num_samples, world_size)      # rank-strided share of the global indices
    seeds = sample_seeds(args.seed, mine.tolist())
    autocast = torch.bfloat16 if args.precision == "bf16" and device.type == "cuda" else None
    started = time.time()
    pixels = []
    for batch in generate_batches(model, labels[mine], image_channels=spec.image_channels,
                                  feature_channels=spec.feature_channels, image_size=spec.image_size,
                                  sampler=args.sampler, method=args.method, steps=args.steps,
                                  cfg_scale=args.cfg_scale, guidance_on=args.guidance_on,
                                  guidance_interval=tuple(args.guidance_interval) if args.guidance_interval else None,
                                  guidance_interval_rule=args.guidance_interval_rule,
                                  rg_scale=args.rg_scale, prediction=spec.prediction, batch_size=args.batch_size,
                                  seeds=seeds, device=device, autocast_dtype=autocast, progress=rank == 0):
        pixels.append(to_rgb_nhwc(decode_to_uint8(batch.images, vae, spec.pixel_patch)))
    side = spec.image_size * (vae.downsample_factor if vae is not None else spec.pixel_patch)
    pixels = np.concatenate(pixels) if pixels else np.zeros((0, side, side, 3), np.uint8)  # more ranks than samples

    if world_size > 1:
        parts = out / "parts"
        parts.mkdir(exist_ok=True)
        _save_npz(parts / f"rank-{rank:05d}-of-{world_size:05d}.npz", indices=mine.numpy(), arr_0=pixels)
        _barrier(dist_info)
        if rank == 0:
            everything = np.zeros((args.num_samples, side, side, 3), dtype=np.uint8)
            for r in range(world_size):
                part_path = parts / f"rank-{r:05d}-of-{world_size:05d}.npz"
                with np.load(part_path) as part:
                    everything[part["indices"]] = part["arr_0"]
                part_path.unlink()
            parts.rmdir()
            pixels = everything
        _barrier(dist_info)  # nobody leaves (and tears the group down) before rank 0 has read every part
    if rank == 0:
        from .training.visuals import save_image_grid

        _save_npz(out / "samples.npz", arr_0=pixels, labels=labels.numpy())
        shown = torch.from_numpy(pixels[: args.grid_images]).permute(0, 3, 1, 2)
        if spec.image_channels == 1:
            shown = shown[:, :1]
        if len(shown):
            save_image_grid(shown, out / "samples.png", upscale=max(1, 64 // side))  # tiny digits: 4x
        print(f"wrote {args.num_samples} samples from the {spec.weights} weights ({side}x{side}) in "
              f"{time.time() - started:.1f} s to {out / 'samples.npz'} (uint8 NHWC under arr_0, labels under labels) "
              f"and a grid of {len(shown)} to {out / 'samples.png'}", flush=True)
    return out


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """`python sample.py ...`: returns the output folder. Argument errors exit with status 2 and one line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except SamplingArgumentError as e:
        parser.error(str(e))
