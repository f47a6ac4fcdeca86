"""Estimate the peak GPU memory of one CoReDi training step before it runs, without a GPU.

Why: a GPU comes rarely and for minutes. The GPU check times the SiT training step of several providers (eager,
per-block compile, our fused ops, both) one after the other; a variant that runs out of memory loses the whole
stage. This module says beforehand, in under a minute on a laptop-class CPU, how much each variant needs, so the
check can print it and skip what cannot fit.

    python -m coredi_fast.memory_estimate --model SiT-XL/2 --batch 128 --card-gib 80
    est = estimate_train_step_memory("SiT-XL/2", 128, "ours"); est.total, est.fits(card_bytes)
    skip_reason("SiT-XL/2", 128, "ours", torch.cuda.get_device_properties(0).total_memory)   # None: run it

The step is `benchmarks/bench_train_step.py`'s `TrainStep` (= the trainer's step): the shipped CoReDi recipe
(configs/imagenet256_coredi_xl.yaml) with the given model, bf16 autocast over fp32 weights, AdamW, an fp32 EMA, the
frozen DINOv2 encoder run under no_grad (replayed as a CUDA graph by `ours`). Components, in GiB:

    weights      fp32 parameters and buffers of the denoiser and the learned projector (counted on the meta device)
    grads        fp32 gradients of the trainable parameters
    optimizer    AdamW's exp_avg + exp_avg_sq, fp32
    ema          the fp32 EMA: every float tensor of the denoiser's state dict (EMA class); trainable ones (ours:
                 AdamWEMA)
    encoder      the frozen encoder's weights (fp32: DINOv2Encoder runs bf16 *autocast* over fp32 weights), the
                 step's inputs (uint8 images, latent moments, noise) and the encoder's fp32 output features; for
                 `ours` also the CUDA graph's private pool, which stays reserved: the measured peak of live tensors
                 during one encoder forward
    activations  what autograd saves for the backward, across the whole denoiser and objective (measured, below)
    workspace    an allowance for the transients of the backward: one block's saved activations at this batch
                 (48·d bytes per token eager, 40·d ours). A block's backward holds its incoming gradient and
                 gradients shaped like some of what it saved (MLP hidden grads, dq/dk/dv, the fp32 residual grad):
                 tracked on the CPU, the input-gradient buffers peak at ~14·d bytes per token, so the allowance is
                 ~3x that and also covers the weight-gradient temporaries and cuBLAS/cuDNN workspaces
    total        weights + optimizer + ema + encoder + workspace + max(activations, grads)

Why max(activations, grads) and not their sum: the engine zeroes gradients with set_to_none, so a step starts
without them; the backward frees each block's saved tensors as it creates that block's gradients (a block of
SiT-XL/2 at batch 128 saves ~1.7 GiB and owns 0.09 GiB of gradients), so their sum only shrinks from its start
(all activations, no gradients) to its end (all gradients, no activations). With persistent gradients (DDP
buckets, ZeRO partitions, zero_grad(set_to_none=False)) pass `persistent_grads=True` to add them instead.

How the activations are measured. Autograd's saved tensors depend on shapes only, so they are measured on the CPU
at small shapes and scaled:
  * the real recipe and the real width (d, heads, mlp ratio, patch) are built with `build_objective` and
    `build_denoiser` exactly as `TrainStep` builds them (`ours`: `patch_dit` + the fused joint embedding), at
    depth 1 and depth 2, on latents of 4, 16 and 36 tokens with 4 or 16 encoder tokens, batch 1-2;
  * a forward of the TrainModule runs under `torch.autocast("cpu", bfloat16)`. CPU autocast follows CUDA's policy
    for every op this model uses (linear/conv/SDPA in bf16 with the weight cast cached and saved; layer_norm on
    the fp32 residual stream in fp32; GELU and elementwise ops in their input dtype), so the saved dtypes are the
    GPU's;
  * the bytes saved are summed over distinct storages found by walking the autograd graph from the loss
    (`grad_fn._saved_*` attributes and custom functions' `saved_tensors`); views share their storage and count
    once, and parameters, buffers and the step's inputs are not activations and are left out. We walk the graph
    instead of running under `saved_tensors_hooks` because `patch_dit` turns its cross-block residual hand-over
    off whenever saved-tensor hooks are active (they mean activation checkpointing to it): under hooks the
    `ours` step would be a different, larger one;
  * the bytes are exactly affine in (B·T tokens, B·L encoder tokens, B samples, 1): the constant is the bf16
    weight copies autocast caches and the backward keeps. Seven points with three token counts are fitted by
    least squares and the misfit is checked (it is ~1e-7 B: the scaling is verified, not assumed; a misfit warns
    instead of extrapolating silently); depth 2 minus depth 1 is one block, depth 1 minus one block is the rest
    (embeddings, final layer, projector, joint embedding, loss);
  * attention: on the CPU we force torch's flash kernel (`sdpa_flash`), which saves q, k, v (views of the qkv
    output), the output (bf16, laid out (B, T, H, Dh) so the proj input is a view of it) and an fp32 logsumexp per
    head and token: the same set as the GPU's cuDNN and flash kernels. The math kernel would save the T x T
    scores; the three token counts make such a term show up as misfit (`measurement_shapes`).
The fused ops run their PyTorch path on the CPU; their autograd formula (`setup_context` in
kernels/norm_modulate/op.py and kernels/joint_embedding/op.py) saves the same tensors whichever backend runs the
forward, and the Triton kernels return the same dtypes as the reference.

Limits (stated, not hidden):
  * `compile` and `ours+compile` get the eager and ours measurements: an upper bound. Inductor's min-cut
    partitioner recomputes cheap elementwise ops in the backward and saves less (per-block compile measured
    47.7 GB against eager's 59.5 GB for SiT-XL/2 at batch 128 on an H100, research/perf_anchors.md section 1c);
  * the CUDA context (~0.5 GiB), allocator fragmentation and library workspaces are left to `margin`
    (DEFAULT_MARGIN of the card);
  * activation checkpointing (model.grad_checkpointing) is not modelled: the estimate is then an upper bound.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import warnings
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

GIB = float(2 ** 30)
PROVIDERS = ("eager", "compile", "ours", "ours+compile")
PRECISIONS = ("bf16", "fp32")
DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "imagenet256_coredi_xl.yaml"
DEFAULT_MARGIN = 0.05      # of the card: CUDA context, cuBLAS/cuDNN workspaces, allocator fragmentation
VAE_DOWNSAMPLE = 8         # SD-VAE: 256 px images -> 32 x 32 latents
ENCODER_TOKEN_SIDES = (2, 4)   # encoder grids measured: 4 and 16 tokens (their sides divide the latent sides)
MISFIT_TOLERANCE = 256.0       # bytes: the affine model holds exactly (misfit ~1e-7 B); more means it does not


# ----------------------------------------------------------------------------------------------- the result


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one training step of `provider`, per component, in GiB (2^30 bytes); see the module doc."""
    model: str
    batch: int
    provider: str
    precision: str
    weights: float
    grads: float
    optimizer: float
    ema: float
    encoder: float
    activations: float
    workspace: float
    total: float
    note: str = ""

    def usable_gib(self, card_bytes: int, margin: float = DEFAULT_MARGIN) -> float:
        """GiB of a card with `card_bytes` bytes (e.g. `total_memory`) left after the margin."""
        return card_bytes * (1.0 - margin) / GIB

    def fits(self, card_bytes: int, margin: float = DEFAULT_MARGIN) -> bool:
        """Whether the estimated peak fits a card of `card_bytes` bytes, keeping `margin` (a fraction) free."""
        return self.total <= self.usable_gib(card_bytes, margin)

    def breakdown(self) -> str:
        """"weights 2.5, grads 2.5, ..." in GiB."""
        return ", ".join(f"{name} {getattr(self, name):.1f}" for name in _COMPONENTS)


_COMPONENTS = ("weights", "grads", "optimizer", "ema", "encoder", "activations", "workspace")


class Affine(NamedTuple):
    """Bytes = per_token·B·T + per_feature_token·B·L + per_sample·B + constant (B batch, T latent tokens, L encoder
    tokens). `residual`: the largest absolute misfit of the measurements, in bytes (~0 when the model holds)."""
    per_token: float
    per_feature_token: float
    per_sample: float
    constant: float
    residual: float = 0.0

    def at(self, batch: int, tokens: int, feature_tokens: int) -> float:
        return (self.per_token * batch * tokens + self.per_feature_token * batch * feature_tokens
                + self.per_sample * batch + self.constant)

    def __sub__(self, other: "Affine") -> "Affine":
        return Affine(*(a - b for a, b in zip(self[:4], other[:4])), max(self.residual, other.residual))


class ActivationProfile(NamedTuple):
    """Saved bytes of one transformer block and of everything else (embeddings, final layer, objective)."""
    block: Affine
    rest: Affine

    def total(self, depth: int, batch: int, tokens: int, feature_tokens: int) -> float:
        return depth * self.block.at(batch, tokens, feature_tokens) + self.rest.at(batch, tokens, feature_tokens)


class EncoderProfile(NamedTuple):
    """The frozen encoder: weight bytes, its peak of live tensors during a no-grad forward (bytes = per_image·B +
    constant: the graph pool of `ours`), its output tokens L and width."""
    weight_bytes: int
    peak_per_image: float
    peak_constant: float
    tokens: int
    dim: int


# ----------------------------------------------------------------------------------------------- the recipe


@functools.lru_cache(maxsize=None)
def _recipe(model_name: str, fused: bool, precision: str, recipe: str):
    """The TrainConfig `TrainStep` uses (profile "real"): the recipe file with this model, fused ops on/off."""
    from .training.config import load_config

    overrides = [f"model.name={model_name}", "model.compile=none", f"model.fused_ops={'on' if fused else 'off'}",
                 f"run.precision={precision}"]
    cfg = load_config(recipe, overrides)
    if cfg.is_jit:
        raise ValueError(f"model {model_name!r}: the estimate covers SiT/DiT models, not pixel-space JiT")
    if cfg.method.projector.mode == "learned":
        cfg.method.projector.init = "orthogonal"  # the PCA init needs feature statistics; memory does not care
    return cfg


@functools.lru_cache(maxsize=None)
def _pca_statistics(feature_dim: int):
    """Stand-in statistics for ReDi's fixed-PCA mode (its projector needs a basis; its values do not matter)."""
    from .method import FeatureStatistics

    return FeatureStatistics(feature_dim).update(torch.randn(4 * feature_dim, feature_dim,
                                                             generator=torch.Generator().manual_seed(0)))


def _build_module(cfg, latent: int, overrides: dict, fused: bool):
    """The TrainModule (denoiser + objective) of `cfg` on `latent` x `latent` latents, on the current device."""
    from .training.builders import build_denoiser, build_objective
    from .training.engine import TrainModule

    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, grad_checkpointing=False,
                                                             overrides={**cfg.model.overrides, **overrides}))
    statistics = _pca_statistics(cfg.method.projector.feature_dim) if cfg.method.projector.mode == "pca" else None
    objective = build_objective(cfg, 4, latent, None, statistics, fused=fused)
    denoiser = build_denoiser(cfg, objective.model_channels, latent, 1000, fused=fused)
    return TrainModule(denoiser, objective)


def _model_shape(model_name: str, overrides: dict) -> tuple[int, int]:
    """(patch size, depth) of a zoo model with create_model overrides."""
    from .models.sit import MODEL_CONFIGS

    if model_name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {model_name!r}; one of {', '.join(MODEL_CONFIGS)}")
    config = {**MODEL_CONFIGS[model_name], **overrides}
    return config["patch_size"], config["depth"]


# ----------------------------------------------------------------------------------------------- static memory


@functools.lru_cache(maxsize=None)
def _state_bytes(model_name: str, recipe: str, latent: int, overrides: tuple) -> dict:
    """Bytes of weights, trainable parameters and EMA tensors, counted on a meta-device build of the real model."""
    cfg = _recipe(model_name, False, "bf16", recipe)
    with torch.device("meta"):  # no memory, no init cost: only the shapes and dtypes are read
        module = _build_module(cfg, latent, dict(overrides), fused=False)
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    trainable = [p for p in module.parameters() if p.requires_grad]
    denoiser_state = [t for t in module.denoiser.state_dict().values() if t.is_floating_point()]
    return {
        "weights": nbytes(list(module.parameters()) + list(module.buffers())),
        "trainable_fp32": 4 * sum(p.numel() for p in trainable),
        "ema_all_floats": 4 * sum(t.numel() for t in denoiser_state),                     # EMA class
        "ema_trainable": 4 * sum(p.numel() for p in module.denoiser.parameters() if p.requires_grad),  # AdamWEMA
    }


# ----------------------------------------------------------------------------------------------- saved tensors


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _saved_tensors_of(node) -> list:
    """Every tensor a backward node keeps: C++ nodes expose them as `_saved_*`, custom functions as saved_tensors."""
    found = list(getattr(node, "saved_tensors", None) or ())
    for name in dir(node):
        if name.startswith("_saved_"):
            value = getattr(node, name)
            found += value if isinstance(value, (list, tuple)) else [value]
    return [t for t in found if isinstance(t, torch.Tensor)]


def saved_bytes(loss: torch.Tensor, exclude: set) -> int:
    """Bytes of the distinct storages autograd saved for `loss`'s backward, without the storages in `exclude`
    (data pointers of parameters, buffers and inputs, which are not activations)."""
    storages: dict[int, int] = {}
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for t in _saved_tensors_of(node):
            key = _storage_key(t)
            if key and key not in exclude:
                storages[key] = t.untyped_storage().nbytes()
        stack += [next_node for next_node, _ in node.next_functions]
    return sum(storages.values())


def _measure_point(module, batch: int, latent: int, feature_tokens: int, feature_dim: int, autocast: bool) -> int:
    """Saved bytes of one forward of `module` (a TrainModule) on a batch of this shape."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g)
    features = torch.randn(batch, feature_tokens, feature_dim, generator=g) if feature_tokens else None
    y = torch.randint(0, 1000, (batch,), generator=g)
    noise = module.objective.draw_noise(batch, generator=g, label_dropout=0.1)
    inputs = [x, features, y, *noise]
    exclude = {_storage_key(t) for t in [*module.parameters(), *module.buffers(), *inputs] if t is not None}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = module(x, features, y, noise).loss
    return saved_bytes(loss, exclude)


def measurement_shapes(patch: int, with_features: bool = True) -> list:
    """The (batch, latent side, encoder grid side) points measured. Three latent sides (4, 16 and 36 tokens at
    patch 2): with only two token counts T1, T2 a B·T² term (attention scores) equals (T1 + T2)·B·T - T1·T2·B on
    the points and would hide in the per-token and per-sample terms; with three it shows up as misfit."""
    s0, s1 = ENCODER_TOKEN_SIDES if with_features else (0, 0)
    base = math.lcm(2 * patch, *ENCODER_TOKEN_SIDES)  # a multiple of the patch and of every encoder grid side
    return [(1, base, s0), (2, base, s0), (1, 2 * base, s0), (1, base, s1), (2, 2 * base, s1), (1, 3 * base, s0),
            (2, 3 * base, s1)]


def _fit(points: list, with_features: bool) -> Affine:
    """Least-squares fit of [(B, T, L, bytes), ...] to the affine model; `residual` says how well it holds."""
    rows = [[b * t, b * f, b, 1.0] if with_features else [b * t, b, 1.0] for b, t, f, _ in points]
    a = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor([[float(p[3])] for p in points], dtype=torch.float64)
    coef = torch.linalg.lstsq(a, y, driver="gelsd").solution[:, 0].tolist()
    residual = (a @ torch.tensor(coef, dtype=torch.float64)[:, None] - y).abs().max().item()
    if not with_features:
        coef.insert(1, 0.0)
    return Affine(*coef, residual)


@functools.lru_cache(maxsize=None)
def measure_activations(model_name: str, fused: bool, precision: str = "bf16", recipe: str = str(DEFAULT_RECIPE),
                        overrides: tuple = ()) -> ActivationProfile:
    """Saved bytes of one block and of the rest of the step for a zoo model at its real width (see module doc).

    overrides: create_model overrides as a tuple of (name, value) pairs (depth is ignored: depth 1 and 2 are
    measured). Cached: the providers of one run share it. Takes ~2-8 s on 2 CPU cores for SiT-XL/2.
    """
    from coredi_kernels.attention import force_attention_backend
    from coredi_kernels.backend import force_backend

    cfg = _recipe(model_name, fused, precision, recipe)
    overrides = {k: v for k, v in overrides if k != "depth"}
    patch, _ = _model_shape(model_name, overrides)
    with_features = cfg.method.projector.mode != "none"
    shapes = measurement_shapes(patch, with_features)
    fits = []
    # sdpa_flash: torch's CPU flash kernel saves what the GPU's flash/cuDNN kernels save (never the T x T scores).
    # fork_rng: building models draws from the global RNG, which the caller's own runs must not notice.
    with force_attention_backend("sdpa_flash"), force_backend("torch"), torch.random.fork_rng(devices=[]):
        for depth in (1, 2):
            points = []
            for latent in sorted({s[1] for s in shapes}):
                module = _build_module(cfg, latent, {**overrides, "depth": depth}, fused).train()
                for batch, _, side in (s for s in shapes if s[1] == latent):
                    measured = _measure_point(module, batch, latent, side * side, cfg.method.projector.feature_dim,
                                              autocast=precision == "bf16")
                    points.append((batch, (latent // patch) ** 2, side * side, measured))
                del module
            fits.append(_fit(points, with_features))
    block = fits[1] - fits[0]
    profile = ActivationProfile(block, fits[0] - block)
    if max(fits[0].residual, fits[1].residual) > MISFIT_TOLERANCE:
        warnings.warn(f"{model_name}: saved bytes are not affine in (B·T, B·L, B) (misfit "
                      f"{max(f.residual for f in fits):.0f} B): the extrapolation to the real batch may be off")
    return profile


# ----------------------------------------------------------------------------------------------- the encoder


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages created by the ops run inside it and still alive (what an allocator must hold)."""

    def __init__(self, exclude: set):
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref, self.exclude, self.live, self.peak = StorageWeakRef, exclude, {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = _storage_key(t)
                if key and key not in self.exclude and key not in self.live:
                    self.live[key] = (self._ref(t.untyped_storage()), t.untyped_storage().nbytes())
        self.peak = max(self.peak, sum(nbytes for _, nbytes in self.live.values()))
        return out


@functools.lru_cache(maxsize=None)
def measure_encoder(name: str, resolution: int, autocast: bool, image_size: int) -> EncoderProfile:
    """The frozen DINOv2: weights counted on the meta device; the peak of live tensors of a no-grad forward
    measured on a 1-block copy (blocks run one after the other, so the peak is one block's) at batch 1 and 2."""
    from .encoders.dinov2 import DINOv2Encoder

    dtype = torch.bfloat16 if autocast else None
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")  # "random init": no weights are needed to count bytes
        with torch.device("meta"):
            full = DINOv2Encoder(name, weights=None, img_size=resolution, dtype=dtype)
        one_block = DINOv2Encoder(name, weights=None, img_size=resolution, dtype=dtype, depth=1)
    weight_bytes = sum(t.numel() * t.element_size() for t in [*full.parameters(), *full.buffers()])
    peaks = []
    for batch in (1, 2):
        images = torch.zeros(batch, 3, image_size, image_size, dtype=torch.uint8)
        exclude = {_storage_key(t) for t in [*one_block.parameters(), *one_block.buffers(), images]}
        with _LiveBytes(exclude) as live:
            one_block(images)
        peaks.append(live.peak)
    return EncoderProfile(weight_bytes, peaks[1] - peaks[0], 2 * peaks[0] - peaks[1], full.num_tokens,
                          full.embed_dim)


def _encoder_bytes(cfg, batch: int, image_size: int, latent: int, graphed: bool) -> tuple[float, int]:
    """(bytes of the encoder term, encoder tokens L) for a batch; see the module doc for what is included."""
    # uint8 images; fp32 moments (8 ch), the sampled latent (4), its noise (4) and the feature noise (d); t, label
    latent_channels = 8 + 4 + 4 + cfg.method.projector.channels
    step_inputs = batch * (3 * image_size ** 2 + 4 * latent_channels * latent ** 2 + 16)
    if cfg.method.projector.mode == "none":
        return float(step_inputs), 0
    e = cfg.encoder
    profile = measure_encoder(e.name, e.resolution, e.dtype == "bf16", image_size)
    features = 4 * batch * profile.tokens * profile.dim       # fp32 output, alive for the whole step
    pool = profile.peak_per_image * batch + profile.peak_constant if graphed else 0.0
    return profile.weight_bytes + step_inputs + features + pool, profile.tokens


# ----------------------------------------------------------------------------------------------- the estimate


def estimate_train_step_memory(model_name: str, batch: int, provider: str, *, image_size: int = 256,
                               precision: str = "bf16", recipe: Optional[str] = None,
                               overrides: Optional[dict] = None, persistent_grads: bool = False) -> MemoryEstimate:
    """Peak GPU memory of one training step, in GiB per component (see the module doc).

    Args:
        model_name: a SiT/DiT zoo name, e.g. "SiT-XL/2".
        batch: images per step on this GPU.
        provider: one of PROVIDERS ("eager", "compile", "ours", "ours+compile").
        image_size: image side in pixels (latents are image_size / 8).
        precision: "bf16" (autocast over fp32 weights, the GPU default) or "fp32".
        recipe: a training config file (default: configs/imagenet256_coredi_xl.yaml, as the benchmark).
        overrides: create_model overrides, e.g. {"depth": 3}.
        persistent_grads: gradients stay allocated across steps (DDP, ZeRO): add them to the activations.
    """
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if image_size % VAE_DOWNSAMPLE:
        raise ValueError(f"image_size={image_size} must be a multiple of the VAE's {VAE_DOWNSAMPLE}")
    recipe = str(recipe or DEFAULT_RECIPE)
    overrides = dict(overrides or {})
    fused = provider.startswith("ours")
    latent = image_size // VAE_DOWNSAMPLE
    patch, depth = _model_shape(model_name, overrides)
    cfg = _recipe(model_name, fused, precision, recipe)

    state = _state_bytes(model_name, recipe, latent, tuple(sorted(overrides.items())))
    encoder, feature_tokens = _encoder_bytes(cfg, batch, image_size, latent, graphed=fused)
    width_overrides = tuple(sorted((k, v) for k, v in overrides.items() if k != "depth"))  # one cache entry
    profile = measure_activations(model_name, fused, precision, recipe, width_overrides)
    tokens = (latent // patch) ** 2
    activations = profile.total(depth, batch, tokens, feature_tokens)
    workspace = profile.block.at(batch, tokens, feature_tokens)
    parts = dict(weights=state["weights"], grads=state["trainable_fp32"], optimizer=2 * state["trainable_fp32"],
                 ema=state["ema_trainable" if fused else "ema_all_floats"], encoder=encoder,
                 activations=activations, workspace=workspace)
    held = parts["grads"] + activations if persistent_grads else max(parts["grads"], activations)
    total = sum(parts[k] for k in ("weights", "optimizer", "ema", "encoder", "workspace")) + held
    notes = []
    if provider.endswith("compile"):
        notes.append("activations: the uncompiled measurement, an upper bound (Inductor recomputes and saves less)")
    if cfg.model.grad_checkpointing:
        notes.append("grad_checkpointing is not modelled: an upper bound")
    return MemoryEstimate(model_name, batch, provider, precision, **{k: v / GIB for k, v in parts.items()},
                          total=total / GIB, note="; ".join(notes))


def cuda_card(device=None) -> Optional[tuple[str, int]]:
    """(name, total bytes) of a CUDA device, or None without one."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
    return props.name, int(props.total_memory)


def skip_reason(model_name: str, batch: int, provider: str, card_bytes: int, *, card_name: str = "the card",
                margin: float = DEFAULT_MARGIN, **estimate_kwargs) -> Optional[str]:
    """None when the step of `provider` should fit a card of `card_bytes` bytes, else why not, e.g.
    "ours: estimated 83.1 GiB > 75.2 GiB usable on NVIDIA H100 80GB HBM3 (weights 2.5, grads 2.5, ...)".
    Cheap after the first call for a model (the measurements are cached)."""
    est = estimate_train_step_memory(model_name, batch, provider, **estimate_kwargs)
    if est.fits(card_bytes, margin):
        return None
    return (f"{provider}: estimated {est.total:.1f} GiB > {est.usable_gib(card_bytes, margin):.1f} GiB usable on "
            f"{card_name} ({est.breakdown()})")


def format_table(estimates: Sequence[MemoryEstimate], card_bytes: Optional[int] = None,
                 margin: float = DEFAULT_MARGIN) -> str:
    """One row per estimate: provider, each component and the total in GiB, and whether it fits the card."""
    columns = ["provider", "weights", "grads", "optim", "ema", "encoder", "activations", "workspace", "total GiB",
               "fits?"]
    rows = [columns]
    for e in estimates:
        fits = "-" if card_bytes is None else ("yes" if e.fits(card_bytes, margin) else "NO")
        values = [e.weights, e.grads, e.optimizer, e.ema, e.encoder, e.activations, e.workspace, e.total]
        rows.append([e.provider] + [f"{v:.2f}" for v in values] + [fits])
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


def _profile_lines(model_name: str, providers: Sequence[str], precision: str, recipe: str, overrides: dict) -> list:
    """What was measured per block, per latent token: the number behind the activations column."""
    from .models.sit import MODEL_CONFIGS

    width = {**MODEL_CONFIGS[model_name], **overrides}["hidden_size"]
    lines = []
    for fused in sorted({p.startswith("ours") for p in providers}):
        p = measure_activations(model_name, fused, precision, recipe, tuple(sorted(overrides.items())))
        lines.append(f"  {'ours' if fused else 'eager'}: per block {p.block.per_token:.0f} B/token "
                     f"({p.block.per_token / width:.2f}·d) + {max(0.0, p.block.constant) / 2**20:.1f} MiB "
                     f"(autocast's weight copies) + {p.block.per_sample:.0f} B/sample; rest "
                     f"{p.rest.per_token:.0f} B/token + {p.rest.per_feature_token:.0f} B/encoder token; fit misfit "
                     f"{max(p.block.residual, p.rest.residual):.2g} B")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coredi_fast.memory_estimate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="SiT-XL/2")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--card-gib", type=float, default=80.0, help="card memory: torch's total_memory / 2**30")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN, help="fraction of the card kept free")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16")
    parser.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="training config (default: the CoReDi XL one)")
    parser.add_argument("--json", help="also write the estimates to this file")
    args = parser.parse_args(argv)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown or not providers:
        parser.error(f"--providers: {', '.join(unknown) or 'none given'}; choose from {', '.join(PROVIDERS)}")
    card_bytes = int(args.card_gib * GIB)
    estimates = [estimate_train_step_memory(args.model, args.batch, p, image_size=args.image_size,
                                            precision=args.precision, recipe=args.recipe) for p in providers]
    print(f"{args.model}, batch {args.batch}, {args.image_size} px, {args.precision}: estimated peak GiB per "
          f"training step (card {args.card_gib:g} GiB, {args.margin:.0%} kept free: "
          f"{card_bytes * (1 - args.margin) / GIB:.1f} GiB usable)")
    print(format_table(estimates, card_bytes, args.margin))
    print("measured saved activations:")
    print("\n".join(_profile_lines(args.model, providers, args.precision, args.recipe, {})))
    for e in estimates:
        if e.note:
            print(f"  {e.provider}: {e.note}")
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(e) for e in estimates], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
