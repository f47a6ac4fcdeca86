"""The demo's shipped semantic encoder: loads offline, is frozen, and really knows the digits."""
import numpy as np
import pytest
import torch

from coredi_fast.data import DigitsDataset
from coredi_fast.encoders.digits_vit import DEFAULT_WEIGHTS, DigitsEncoder, normalize_digits


def _split(split):
    ds = DigitsDataset(image_size=16, channels=1, split=split)
    return torch.from_numpy(np.stack([ds.read(i).image for i in range(len(ds))])), torch.from_numpy(ds.labels())


def test_shipped_weights_classify_held_out_digits():
    encoder = DigitsEncoder()
    images, labels = _split("test")
    with torch.no_grad():
        logits = encoder.vit(normalize_digits(images))
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    assert accuracy > 0.95, accuracy  # the features are semantic: a linear head on them reads the class


def test_tokens_are_the_final_norm_patch_grid_and_frozen():
    encoder = DigitsEncoder()
    images, _ = _split("test")
    tokens = encoder(images[:5])
    assert tokens.shape == (5, encoder.num_tokens, encoder.embed_dim) == (5, 64, 64)
    # Independent recomputation: patchify by hand (unfold), add positions, run the blocks, final LayerNorm.
    vit = encoder.vit
    x = normalize_digits(images[:5])
    patches = x.unfold(2, 2, 2).unfold(3, 2, 2)                     # (B, 1, 8, 8, 2, 2)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(5, 64, 4)   # row-major grid, (c, ph, pw) per patch
    h = patches @ vit.patch_embed.weight.reshape(64, 4).T + vit.patch_embed.bias + vit.pos_embed
    with torch.no_grad():
        for block in vit.blocks:
            h = block(h)
        expected = torch.nn.functional.layer_norm(h, (64,), vit.norm.weight, vit.norm.bias, vit.norm.eps)
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
    encoder.train()
    assert not encoder.vit.training and not any(p.requires_grad for p in encoder.parameters())


def test_missing_or_foreign_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        DigitsEncoder(str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="bad.pt"):
        DigitsEncoder(str(bad))
    assert DEFAULT_WEIGHTS.endswith("digits_vit.pt")
