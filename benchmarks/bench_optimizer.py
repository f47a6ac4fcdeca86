"""The optimizer step with the fp32 EMA over a SiT's parameters: torch's fused AdamW + a foreach EMA vs one pass.

    pytest benchmarks/bench_optimizer.py --bench-profile=real    # SiT-XL/2's 675 M fp32 parameters (its shapes), CUDA
    pytest benchmarks/bench_optimizer.py                         # SiT-S/2's 33 M parameters on CPU

Providers (same shapes, same random gradients, steady state: every call is one more optimizer step):
    torch          torch.optim.AdamW(fused=True) then `training.ema.EMA.update` (one torch._foreach_lerp_): what the
                   trainer runs with optim.fused_ema=off
    adamw_ema      AdamWEMA(backend="torch"): the same two torch kernels through AdamWEMA (its fallback)
    native         AdamWEMA(backend="native"): `coredi_native::adamw_ema_step_`, one pass (skipped when the library
                   is not built with a kernel for the device)

GB/s counts the bytes one pass has to move per fp32 parameter: read p, g, m, v, ema and write p, m, v, ema =
36 B, for every provider (the torch path really moves 40 B: the EMA reads p again), so GB/s ranks like 1/ms.
H100 floor: 675 M x 36 B = 24.3 GB at ~3 TB/s, about 8 ms; perf_anchors.md §1d measured ~10 ms for the torch path.
"""
import pytest
import torch
import torch.nn as nn

from coredi_fast.models import create_model
from coredi_fast.optim import AdamWEMA, native
from coredi_fast.training.ema import EMA

PROFILES = {"tiny": dict(model="SiT-S/2", calls=1, rounds=5), "real": dict(model="SiT-XL/2", calls=10, rounds=10)}
PROVIDERS = ("torch", "adamw_ema", "native")
BYTES_PER_PARAM = 9 * 4  # read p, g, m, v, ema; write p, m, v, ema (fp32)


class Params(nn.Module):
    """The trainable parameters of a SiT (built on the meta device for their shapes), as real tensors."""

    def __init__(self, name: str, device: torch.device):
        super().__init__()
        with torch.device("meta"):
            model = create_model(name, input_size=32, in_channels=12, num_classes=1000)
        g = torch.Generator(device=device).manual_seed(0)
        shapes = [p.shape for p in model.parameters() if p.requires_grad]
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.randn(s, device=device, generator=g) * 0.02) for s in shapes])
        for p in self.weights:
            p.grad = torch.randn(p.shape, device=device, generator=g) * 1e-3


def build(provider: str, profile: str, device: torch.device):
    """(step function, number of parameters) for one provider."""
    params = Params(PROFILES[profile]["model"], device)
    weights = list(params.weights)
    if provider == "torch":
        optimizer = torch.optim.AdamW(weights, lr=1e-4, weight_decay=0.0, fused=True)
        ema = EMA(params, decay=0.9999)

        def step():
            optimizer.step()
            ema.update(params)
    else:
        optimizer = AdamWEMA(weights, lr=1e-4, weight_decay=0.0, ema_decay=0.9999,
                             backend="torch" if provider == "adamw_ema" else "native")
        step = optimizer.step
    return step, sum(p.numel() for p in weights)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_adamw_ema_step(measure, bench_profile, bench_device, provider):
    if provider == "native" and not native.is_available(bench_device.type):
        pytest.skip(f"native library not built for {bench_device.type}: {native.load().describe()}")
    step, n = build(provider, bench_profile, bench_device)
    p = PROFILES[bench_profile]
    measure(step, bytes_moved=BYTES_PER_PARAM * n, calls_per_round=p["calls"], rounds=p["rounds"],
            op="AdamW+EMA step", model=p["model"], params=f"{n / 1e6:.0f}M", provider=provider)
