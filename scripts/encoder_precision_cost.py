"""What encoder.dtype costs: the frozen DINOv2 forward in fp32 / tf32 / bf16, timed side by side in one process.

    python scripts/encoder_precision_cost.py                        # CPU: a small random-init DINOv2 (fp32, bf16)
    python scripts/encoder_precision_cost.py --real                 # DINOv2-B/14-reg4 at 224 px, batch 128 (GPU)

The precisions are timed in alternating rounds (A B C A B C ...), so a machine that slows down or speeds up during
the run moves every precision alike; the table gives the median time per forward and each one's cost relative to
bf16. On the CPU tf32 is fp32 (TF32 is a CUDA tensor-core format) and is left out. Weights are random (no download):
the time of a forward does not depend on them.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from coredi_fast.encoders.dinov2 import DEFAULT_DINOV2, DINOv2Encoder
from coredi_fast.training.builders import encoder_precision

SMALL = dict(embed_dim=384, depth=6, num_heads=6)  # ViT-S/14 width, half its depth


def build(precision: str, device: torch.device, real: bool, img_size: int) -> DINOv2Encoder:
    if device.type == "cuda":
        dtype, allow_tf32 = encoder_precision(precision, device)
    else:  # the trainer keeps the CPU in fp32; bf16 autocast is timed here anyway, to show what it would cost
        dtype, allow_tf32 = (torch.bfloat16 if precision == "bf16" else None), False
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random init
        return DINOv2Encoder(DEFAULT_DINOV2, weights=None, img_size=img_size, dtype=dtype, allow_tf32=allow_tf32,
                             **({} if real else SMALL)).to(device)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", action="store_true", help="DINOv2-B/14-reg4, 256-px images, batch 128")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    batch = args.batch or (128 if args.real else 8)
    image, img_size = (256, 224) if args.real else (128, 112)
    precisions = ["fp32", "tf32", "bf16"] if device.type == "cuda" else ["fp32", "bf16"]
    encoders = {p: build(p, device, args.real, img_size) for p in precisions}
    images = torch.randint(0, 256, (batch, 3, image, image), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = {p: [] for p in precisions}
    for p in precisions:  # warm-up: allocations, cuBLAS/oneDNN kernel choice
        encoders[p](images)
    for _ in range(args.rounds):
        for p in precisions:
            sync()
            start = time.perf_counter()
            for _ in range(3):
                encoders[p](images)
            sync()
            times[p].append((time.perf_counter() - start) / 3)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    shape = "DINOv2-B/14-reg4" if args.real else "DINOv2-style ViT, width 384, depth 6"
    print(f"{shape}, {batch} images {image} px -> {img_size} px, on {name} ({torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, {args.rounds} alternating rounds")
    base = statistics.median(times["bf16"])
    for p in precisions:
        ms = statistics.median(times[p]) * 1e3
        print(f"  {p:5s} {ms:9.2f} ms/forward   {ms / 1e3 / base:5.2f} x bf16")


if __name__ == "__main__":
    main()
