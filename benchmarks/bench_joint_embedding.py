"""CoReDi joint embedding: coredi_kernels vs the eager PyTorch path vs torch.compile of it.

    pytest benchmarks/bench_joint_embedding.py --bench-profile=real      # SiT-XL/2, batch 256, bf16, on CUDA
    pytest benchmarks/bench_joint_embedding.py --bench-profile=real --bench-sweep   # + the kernels' tile sweeps

Providers: `eager` (`reference.joint_embedding_ref`: what the unfused training code runs — projector in fp32,
BatchNorm, F.interpolate, noising, torch.cat, Conv2d patch embedding, + pos_embed), `compile` (the same under
torch.compile(dynamic=False)), `ours` (`coredi_kernels.joint_embedding`; Triton on CUDA, its PyTorch backend on CPU).
Modes: `fwd` (no grad) and `fwd+bwd` (forward, then torch.autograd.grad of W, the patch weight and bias from a
cotangent on the tokens). Real profile: f (256, 256, 768) bf16, W (768, 8) fp32, x and noises bf16 (256, 4|8, 32,
32), patch embedding (1152, 12, 2, 2) bf16, tokens (256, 256, 1152) bf16.

Byte model (every provider is credited with the same bytes, so GB/s is an *effective* bandwidth): the traffic a
fused implementation cannot avoid. s_f, s_x, s_o: bytes per value of f, the image stream, the tokens.
    fwd:  read f (B·L·D·s_f), x, noise_x, noise_z ((2C + d)·B·H·W·s_x); write tokens (B·T·hidden·s_o), the target
          ((C + d)·B·H·W·s_x) and p (B·L·d·4)
    bwd:  read dtokens (B·T·hidden·s_o) and f again (B·L·D·s_f): the weight gradient needs the features and the
          patch gradients need dtokens; everything else is small.
`x_eager` in extra_info is the speed-up over the eager provider of the same case (measured in the same session).
Target (DESIGN §6 / the issue): ours >= 3x eager at the real shape.
"""
import functools

import pytest
import torch

from coredi_kernels.joint_embedding import _kernels, joint_embedding, reference

# (B, side, D, d, C, H, p, hidden), feature dtype, image/model dtype
SHAPES = {
    "tiny": ((2, 4, 32, 8, 4, 8, 2, 64), torch.float32, torch.float32),
    "real": ((256, 16, 768, 8, 4, 32, 2, 1152), torch.bfloat16, torch.bfloat16),
}
PROVIDERS = ("eager", "compile", "ours")  # eager first: the others report their ratio to it
MODES = ("fwd", "fwd+bwd")
_SECONDS: dict = {}  # (profile, mode, provider) -> seconds per call


def make_inputs(profile: str, device, requires_grad: bool) -> dict:
    (B, side, D, d, C, H, p, hidden), feature_dtype, dtype = SHAPES[profile]
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, dtype=dtype, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    T = (H // p) ** 2
    inputs = dict(
        features=rnd(B, side * side, D, dtype=feature_dtype, std=2.0),
        weight=rnd(D, d, dtype=torch.float32, std=D**-0.5),
        x=rnd(B, C, H, H),
        noise_x=rnd(B, C, H, H),
        noise_z=rnd(B, d, H, H),
        t=torch.rand(B, generator=g).to(device),
        patch_weight=rnd(hidden, C + d, p, p, std=0.1),
        patch_bias=rnd(hidden, std=0.1),
        pos_embed=rnd(1, T, hidden),
    )
    for name in ("weight", "patch_weight", "patch_bias"):
        inputs[name].requires_grad_(requires_grad)
    state = dict(running_mean=torch.zeros(d, device=device), running_var=torch.ones(d, device=device))
    return inputs, state


def ours(inputs, state):
    return joint_embedding(**inputs, **state).tokens


def eager(inputs, state):
    return reference.joint_embedding_ref(**inputs, **state).tokens


@functools.lru_cache(maxsize=None)
def compiled():
    return torch.compile(eager, dynamic=False)


def provider_fn(provider: str):
    return {"ours": ours, "eager": eager, "compile": compiled() if provider == "compile" else None}[provider]


def bytes_moved(profile: str, mode: str) -> int:
    (B, side, D, d, C, H, p, hidden), feature_dtype, dtype = SHAPES[profile]
    s_f, s_x = torch.finfo(feature_dtype).bits // 8, torch.finfo(dtype).bits // 8
    s_o = s_x
    L, T, HW = side * side, (H // p) ** 2, H * H
    fwd = B * L * D * s_f + (2 * C + d) * B * HW * s_x + B * T * hidden * s_o + (C + d) * B * HW * s_x + B * L * d * 4
    bwd = B * T * hidden * s_o + B * L * D * s_f
    return fwd if mode == "fwd" else fwd + bwd


def _labels(profile, mode, provider):
    (B, side, D, d, C, H, p, hidden), _, dtype = SHAPES[profile]
    return dict(op="joint_embedding", mode=mode, provider=provider,
                shape=f"B{B}-L{side * side}-D{D}-d{d}-C{C}-H{H}-p{p}-h{hidden}",
                dtype=str(dtype).removeprefix("torch."))  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_joint_embedding(measure, benchmark, bench_profile, bench_device, provider, mode):
    fn = provider_fn(provider)
    inputs, state = make_inputs(bench_profile, bench_device, requires_grad=mode != "fwd")
    if mode == "fwd":

        def work():
            with torch.no_grad():
                return fn(inputs, state)

    else:
        params = [inputs[k] for k in ("weight", "patch_weight", "patch_bias")]
        cotangent = torch.randn_like(fn(inputs, state))

        def work():
            return torch.autograd.grad(fn(inputs, state), params, cotangent)

    measure(work, bytes_moved=bytes_moved(bench_profile, mode), **_labels(bench_profile, mode, provider))
    if not benchmark.disabled:
        seconds = benchmark.stats.stats.median / benchmark.extra_info["calls_per_round"]
        _SECONDS[(bench_profile, mode, provider)] = seconds
        eager_seconds = _SECONDS.get((bench_profile, mode, "eager"))
        if eager_seconds is not None:
            benchmark.extra_info["x_eager"] = eager_seconds / seconds


# ---------------------------------------------------------------------------------------------------------------
# Tile sweeps (--bench-sweep, real profile): the launchers with explicit tiles, to tune the defaults in _kernels
# ---------------------------------------------------------------------------------------------------------------

PROJECT_SWEEP = [(m, k) for m in (32, 64, 128) for k in (32, 64, 128)]
EMBED_SWEEP = [(t, h) for t in (16, 32, 64, 128) for h in (32, 64, 128)]
GRAD_SWEEP = [(m, k) for m in (32, 64, 128) for k in (32, 64, 128)]


def _skip_unless_sweep(bench_sweep):
    if not bench_sweep:
        pytest.skip("tile sweeps run with --bench-sweep on the real profile")


def _stage_inputs(device):
    inputs, _ = make_inputs("real", device, requires_grad=False)
    f, w = inputs["features"], inputs["weight"]
    mean, std = torch.zeros(f.shape[-1], device=device), torch.ones(f.shape[-1], device=device)
    projected, *_ = _kernels.project(f, w, mean, std, precision="tf32x3")
    return inputs, mean, std, projected


@pytest.mark.parametrize("block_m, block_k", PROJECT_SWEEP, ids=[f"m{m}-k{k}" for m, k in PROJECT_SWEEP])
def test_sweep_projection(measure, bench_sweep, bench_device, block_m, block_k):
    _skip_unless_sweep(bench_sweep)
    inputs, mean, std, _ = _stage_inputs(bench_device)
    f = inputs["features"]
    measure(
        lambda: _kernels.project(f, inputs["weight"], mean, std, precision="tf32x3", block_m=block_m, block_k=block_k),
        bytes_moved=f.numel() * f.element_size(), **dict(_labels("real", "project-sweep", f"m{block_m}-k{block_k}")),
    )  # fmt: skip


@pytest.mark.parametrize("block_t, block_h", EMBED_SWEEP, ids=[f"t{t}-h{h}" for t, h in EMBED_SWEEP])
def test_sweep_embedding(measure, bench_sweep, bench_device, block_t, block_h):
    _skip_unless_sweep(bench_sweep)
    inputs, _, _, projected = _stage_inputs(bench_device)
    d = projected.shape[1]
    zeros, ones = torch.zeros(d, device=bench_device), torch.ones(d, device=bench_device)

    def work():
        return _kernels.embed(
            projected, zeros, ones, zeros, inputs["x"], inputs["noise_x"], inputs["noise_z"], inputs["t"], None,
            inputs["patch_weight"], inputs["patch_bias"], inputs["pos_embed"], torch.bfloat16, precision="tf32",
            block_t=block_t, block_h=block_h,
        )  # fmt: skip

    tokens = work()[0]
    measure(work, bytes_moved=tokens.numel() * tokens.element_size(),
            **_labels("real", "embed-sweep", f"t{block_t}-h{block_h}"))  # fmt: skip


@pytest.mark.parametrize("block_m, block_k", GRAD_SWEEP, ids=[f"m{m}-k{k}" for m, k in GRAD_SWEEP])
def test_sweep_weight_gradient(measure, bench_sweep, bench_device, block_m, block_k):
    _skip_unless_sweep(bench_sweep)
    inputs, mean, std, projected = _stage_inputs(bench_device)
    f = inputs["features"]
    d = projected.shape[1]
    dz_hat = torch.randn_like(projected)
    vec, mix = torch.ones(d, device=bench_device), torch.eye(d, device=bench_device)
    measure(
        lambda: _kernels.project_bwd(f, mean, std, dz_hat, projected, vec, vec, vec, mix, precision="tf32x3",
                                     block_m=block_m, block_k=block_k),
        bytes_moved=f.numel() * f.element_size(), **_labels("real", "grad-sweep", f"m{block_m}-k{block_k}"),
    )  # fmt: skip
