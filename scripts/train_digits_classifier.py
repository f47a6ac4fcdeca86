"""Make the study's judge: a small CNN digit classifier trained on the digits' *held-out* split only.

    python scripts/train_digits_classifier.py          # writes coredi_fast/assets/digits_classifier.pt (~0.4 MB)

It shares nothing with the semantic encoder (a ViT trained on the train split) or with the diffusion models (which
train on the train split): different architecture, different images. Deterministic (fixed seed, one thread), about a
minute on one CPU core. Augmentation: random shifts of up to 2 pixels (zero fill), so 359 images suffice. The sanity
check printed at the end is its accuracy on the 1438 real train-split images it never saw.
"""
import argparse

import numpy as np
import torch
import torch.nn.functional as F

from coredi_fast.data import DigitsDataset
from coredi_fast.study.classifier import DEFAULT_WEIGHTS, DigitsCNN, DigitsCNNConfig, images_to_input, \
    save_digits_classifier

MAX_SHIFT = 2


def load_split(split: str):
    ds = DigitsDataset(image_size=16, channels=1, split=split)
    images = torch.from_numpy(np.stack([ds.read(i).image for i in range(len(ds))]))
    return images, torch.from_numpy(ds.labels()).long()


def random_shift(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to MAX_SHIFT pixels in x and y (zero fill = the digits' background)."""
    m = MAX_SHIFT
    padded = F.pad(images, (m, m, m, m))
    out = torch.empty_like(images)
    offsets = torch.randint(0, 2 * m + 1, (images.shape[0], 2), generator=gen)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy:dy + images.shape[2], dx:dx + images.shape[3]]
    return out


@torch.no_grad()
def accuracy(model, images, labels) -> float:
    model.eval()
    return (model(images_to_input(images)).argmax(1) == labels).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_WEIGHTS)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # bit-reproducible
    gen = torch.Generator().manual_seed(args.seed)
    fit_x, fit_y = load_split("test")       # the judge learns from the held-out split ...
    check_x, check_y = load_split("train")  # ... and is checked on the split everything else trains on
    model = DigitsCNN(DigitsCNNConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps_per_epoch = (len(fit_x) + args.batch_size - 1) // args.batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=args.epochs * steps_per_epoch)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(fit_x), generator=gen)
        for start in range(0, len(order), args.batch_size):
            idx = order[start:start + args.batch_size]
            logits = model(images_to_input(random_shift(fit_x[idx], gen)))
            loss = F.cross_entropy(logits, fit_y[idx], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        if (epoch + 1) % 25 == 0 or epoch == args.epochs - 1:
            print(f"epoch {epoch + 1:3d}  loss {loss.item():.3f}  accuracy on the (unseen) train split "
                  f"{accuracy(model, check_x, check_y):.4f}", flush=True)
    save_digits_classifier(model, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
