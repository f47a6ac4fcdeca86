"""A few SiT-XL/2 blocks, unpatched vs `patch_dit`, eager vs per-block torch.compile, fwd and fwd+bwd.

    pytest benchmarks/bench_dit_block.py --bench-profile=real    # SiT-XL/2 width, 4 blocks, batch 128, bf16 autocast
    pytest benchmarks/bench_dit_block.py                         # SiT-Micro/2 (2 blocks, width 64) on CPU

Providers (each its own model, same weights):
    eager          the unpatched model
    compile        the unpatched model with `block.compile()` on every block and the final layer (the strong
                   baseline of perf_anchors.md: ~530 img/s for the whole SiT-XL/2 on an H100)
    ours           patch_dit(model): fused LayerNorm+modulate, residual adds fused across blocks, attention dispatch
    ours+compile   patch_dit, then the same per-block compile (the hand-over between blocks crosses the compiled
                   regions; the coredi ops stay opaque custom ops inside each graph)
The model runs embed -> blocks -> final layer; training mode is bf16 autocast with fp32 weights, as in training.

Units: ms per step of the `depth`-block model; TFLOP/s from the model FLOPs of those blocks (per image and block:
forward 2·(12·d²·N + 2·N²·d), fwd+bwd 3x that; the embedding, adaLN and final layer are not counted); and in
extra_info `img/s@28`, the throughput of a 28-block SiT-XL/2 if every block cost what these did.
"""
import functools

import pytest
import torch

from coredi_fast.models import create_model
from coredi_kernels.patch import patch_dit

PROFILES = {
    "tiny": dict(name="SiT-Micro/2", input_size=8, depth=2, batch=4, autocast=None),
    "real": dict(name="SiT-XL/2", input_size=32, depth=4, batch=128, autocast=torch.bfloat16),
}
PROVIDERS = ("eager", "compile", "ours", "ours+compile")
MODES = ("fwd", "fwd+bwd")
FULL_DEPTH = 28


@functools.lru_cache(maxsize=None)
def build(profile: str, provider: str, device_type: str):
    cfg = PROFILES[profile]
    torch.manual_seed(0)  # same weights for every provider
    model = create_model(cfg["name"], input_size=cfg["input_size"], depth=cfg["depth"], num_classes=1000)
    model = model.to(device_type).train()
    if provider.startswith("ours"):
        patch_dit(model)
    if provider.endswith("compile"):
        for block in model.blocks:
            block.compile()
        model.final_layer.compile()
    return model


def block_flops(model, mode: str, batch: int) -> float:
    d, n = model.hidden_size, model.x_embedder.num_patches
    forward = 2 * (12 * d * d * n + 2 * n * n * d) * len(model.blocks) * batch
    return forward if mode == "fwd" else 3 * forward


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_dit_blocks(measure, benchmark, bench_profile, bench_device, provider, mode):
    cfg = PROFILES[bench_profile]
    model = build(bench_profile, provider, bench_device.type)
    g = torch.Generator(device="cpu").manual_seed(0)
    B, S = cfg["batch"], cfg["input_size"]
    x = torch.randn(B, 4, S, S, generator=g).to(bench_device)
    t = torch.rand(B, generator=g).to(bench_device)
    y = torch.randint(0, 1000, (B,), generator=g).to(bench_device)
    params = [p for p in model.parameters() if p.requires_grad]

    def forward():
        with torch.autocast(bench_device.type, dtype=cfg["autocast"], enabled=cfg["autocast"] is not None):
            return model(x, t, y)

    if mode == "fwd":

        def work():
            with torch.no_grad():
                return forward()

    else:

        def work():
            loss = forward().float().square().mean()
            return torch.autograd.grad(loss, params)

    calls = 5 if bench_profile == "real" else 1
    measure(
        work,
        flops=block_flops(model, mode, B),
        calls_per_round=calls,
        op=f"{cfg['name']} x{cfg['depth']} blocks",
        mode=mode,
        provider=provider,
        shape=f"B{B}xT{model.x_embedder.num_patches}",
        dtype=str(cfg["autocast"] or torch.float32).removeprefix("torch."),
    )
    if not benchmark.disabled:
        seconds = benchmark.stats.stats.median / calls
        benchmark.extra_info["img/s@28"] = B / (seconds * FULL_DEPTH / len(model.blocks))
