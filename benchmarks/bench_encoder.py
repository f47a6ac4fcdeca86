"""The frozen DINOv2 encoder's forward, eager vs replayed as a CUDA graph (`encoders.cuda_graph.GraphedEncoder`),
at each `encoder.dtype` (bf16 autocast; tf32 = fp32 with TF32 matmuls, ReDi's setting; fp32 = IEEE fp32).

    pytest benchmarks/bench_encoder.py --bench-profile=real    # DINOv2-B/14-reg4 (random init), batch 128, CUDA
    pytest benchmarks/bench_encoder.py                         # a 1-block width-32 DINOv2 on CPU (eager only)

What the trainer runs every step before the denoiser: uint8 256-px images -> resize to 224 -> the ViT at the
configured precision, no grad -> (B, 256, 768) patch tokens. On the CPU only fp32 and bf16 run (no TF32 there;
`scripts/encoder_precision_cost.py` times a larger ViT on the CPU). Providers:
    eager        DINOv2Encoder as is
    cuda_graph   the same module captured once and replayed (what `encoder.cuda_graph=true` does on GPU); CUDA only
TFLOP/s counts the ViT's matmul FLOPs (2 per multiply-add): per image and block 24·N·d² + 4·N²·d for N tokens
(patches + CLS + registers) at width d, plus the patch embedding.
"""
import warnings

import pytest
import torch

PROFILES = {
    "real": dict(batch=128, image=256, encoder_size=224, kwargs={}),
    "tiny": dict(batch=4, image=32, encoder_size=28, kwargs=dict(embed_dim=32, depth=1, num_heads=2)),
}
PROVIDERS = ("eager", "cuda_graph")
PRECISIONS = ("bf16", "tf32", "fp32")


def build_encoder(profile: str, device: torch.device, precision: str = "bf16"):
    from coredi_fast.encoders.dinov2 import DEFAULT_DINOV2, DINOv2Encoder
    from coredi_fast.training.builders import encoder_precision

    p = PROFILES[profile]
    if device.type == "cuda":
        dtype, allow_tf32 = encoder_precision(precision, device)
    else:  # the CPU: bf16 autocast is timed too (the trainer keeps the CPU in fp32)
        dtype, allow_tf32 = (torch.bfloat16 if precision == "bf16" else None), False
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "random init": no weights can be downloaded here
        return DINOv2Encoder(DEFAULT_DINOV2, weights=None, img_size=p["encoder_size"], dtype=dtype,
                             allow_tf32=allow_tf32, **p["kwargs"]).to(device)


def vit_flops(encoder, batch: int) -> float:
    """Matmul FLOPs of one forward of the ViT over `batch` images (see the module docstring)."""
    d, depth = encoder.embed_dim, len(encoder.model.blocks)
    tokens = encoder.num_tokens + encoder.num_prefix_tokens
    patch_embed = encoder.num_tokens * 3 * encoder.patch_size ** 2 * d
    return 2.0 * batch * (depth * (12 * tokens * d * d + 2 * tokens * tokens * d) + patch_embed)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_encoder_forward(measure, bench_profile, bench_device, provider, precision):
    if provider == "cuda_graph" and bench_device.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    if precision == "tf32" and bench_device.type != "cuda":
        pytest.skip("TF32 is a CUDA tensor-core format (on the CPU it is fp32)")
    p = PROFILES[bench_profile]
    encoder = build_encoder(bench_profile, bench_device, precision)
    if provider == "cuda_graph":
        from coredi_fast.encoders.cuda_graph import GraphedEncoder

        encoder = GraphedEncoder(encoder)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (p["batch"], 3, p["image"], p["image"]), generator=g, dtype=torch.uint8)
    images = images.to(bench_device)
    inner = encoder.encoder if provider == "cuda_graph" else encoder

    @torch.no_grad()
    def forward():
        encoder(images)

    measure(forward, flops=vit_flops(inner, p["batch"]), op="encoder", model="DINOv2-B/14-reg4",
            batch=p["batch"], precision=precision, provider=provider)
