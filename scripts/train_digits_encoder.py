"""Make the demo's semantic encoder: a tiny ViT trained as a digit classifier on the digits' training split.

    python scripts/train_digits_encoder.py              # writes coredi_fast/assets/digits_vit.pt (~0.6 MB)

Deterministic (fixed seed, one thread) and about a minute on 2 CPU cores. Only the training split is used; the
held-out split (`DigitsDataset(split="test")`) is what the evaluation's independent classifier is judged on.
Augmentation: random 1-pixel shifts, so the patch tokens do not memorize exact positions.
"""
import argparse

import numpy as np
import torch
import torch.nn.functional as F

from coredi_fast.data import DigitsDataset
from coredi_fast.encoders.digits_vit import DEFAULT_WEIGHTS, DigitsViT, DigitsViTConfig, normalize_digits, \
    save_digits_encoder


def load_split(split: str):
    ds = DigitsDataset(image_size=16, channels=1, split=split)
    images = torch.from_numpy(np.stack([ds.read(i).image for i in range(len(ds))]))
    return images, torch.from_numpy(ds.labels()).long()


def random_shift(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to one pixel in x and y (zero fill)."""
    padded = F.pad(images, (1, 1, 1, 1))
    out = torch.empty_like(images)
    offsets = torch.randint(0, 3, (images.shape[0], 2), generator=gen)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy:dy + images.shape[2], dx:dx + images.shape[3]]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_WEIGHTS)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # bit-reproducible
    gen = torch.Generator().manual_seed(args.seed)
    train_x, train_y = load_split("train")
    test_x, test_y = load_split("test")
    model = DigitsViT(DigitsViTConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps_per_epoch = (len(train_x) + 127) // 128
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=args.epochs * steps_per_epoch)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=gen)
        for start in range(0, len(order), 128):
            idx = order[start:start + 128]
            logits = model(normalize_digits(random_shift(train_x[idx], gen)))
            loss = F.cross_entropy(logits, train_y[idx], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        if (epoch + 1) % 10 == 0 or epoch == args.epochs - 1:
            model.eval()
            with torch.no_grad():
                acc = (model(normalize_digits(test_x)).argmax(1) == test_y).float().mean().item()
            print(f"epoch {epoch + 1:3d}  loss {loss.item():.3f}  held-out accuracy {acc:.3f}", flush=True)
    save_digits_encoder(model, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
