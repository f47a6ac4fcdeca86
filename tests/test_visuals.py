"""Training pictures: image grids (pixel-exact against a hand-assembled grid), feature colours (against a
hand-computed mapping), the feature-evolution figure's thinning and resume, and the loss-curve reader and plot."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from coredi_fast.training.visuals import (FeatureEvolution, exponential_moving_average, feature_map_colors,
                                          plot_loss_curves, read_metrics_jsonl, save_image_grid, thin_evenly)


def _hand_grid(cells, nrow, pad, pad_value):
    """Assemble (N, h, w, C) cells row by row with `pad` pixels of pad_value around each cell."""
    n, h, w, c = cells.shape
    rows = -(-n // nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), pad_value, np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = cells[i]
    return grid


def test_grey_grid_pixels_equal_a_hand_assembled_grid(tmp_path):
    images = torch.randint(0, 256, (3, 1, 2, 3), dtype=torch.uint8)
    path = save_image_grid(images, tmp_path / "grid.png", nrow=2, upscale=3)
    upscaled = np.kron(images[:, 0].numpy(), np.ones((3, 3), np.uint8))[..., None]   # nearest 3x
    expected = _hand_grid(upscaled, nrow=2, pad=2, pad_value=255)
    decoded = np.asarray(Image.open(path))
    assert decoded.shape == (2 * (6 + 2) + 2, 2 * (9 + 2) + 2)
    assert np.array_equal(decoded, expected[..., 0])
    assert not (tmp_path / "grid.png.tmp").exists()


def test_float_rgb_grid_maps_minus_one_one_to_uint8(tmp_path):
    images = torch.rand(5, 3, 2, 2) * 2.4 - 1.2     # some values outside [-1, 1] are clamped
    path = save_image_grid(images, tmp_path / "rgb.png", upscale=1, pad_value=0)
    pixels = np.clip(np.round((images.double().numpy() + 1) * 127.5), 0, 255).astype(np.uint8)
    expected = _hand_grid(pixels.transpose(0, 2, 3, 1), nrow=3, pad=2, pad_value=0)   # ceil(sqrt(5)) = 3 per row
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), expected)


def test_grid_rejects_bad_images(tmp_path):
    with pytest.raises(ValueError, match="images"):
        save_image_grid(torch.zeros(2, 2, 4, 4, dtype=torch.uint8), tmp_path / "x.png")
    with pytest.raises(ValueError, match="upscale"):
        save_image_grid(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), tmp_path / "x.png", upscale=0)


def test_feature_colors_with_given_bounds_and_padding():
    z = torch.tensor([[[-1.0, 0.0], [0.0, 2.0], [0.5, -3.0], [3.0, 1.0]]])      # N=1, L=4 (2x2), d=2
    colors = feature_map_colors(z, low=-1.0, high=[1.0, 3.0, 1.0])
    expected = np.zeros((1, 3, 2, 2), np.uint8)
    for token, (a, b) in enumerate(z[0].tolist()):
        row, col = divmod(token, 2)                                               # row-major token grid
        expected[0, 0, row, col] = round(255 * min(max((a + 1) / 2, 0), 1))
        expected[0, 1, row, col] = round(255 * min(max((b + 1) / 4, 0), 1))
        # channel 2 does not exist (d = 2): zero
    assert colors.dtype == torch.uint8 and np.array_equal(colors.numpy(), expected)
    # The same features as a (N, d, H, W) map, token (row, col) at [:, :, row, col].
    as_map = z.transpose(1, 2).reshape(1, 2, 2, 2)
    assert np.array_equal(feature_map_colors(as_map, low=-1.0, high=[1.0, 3.0, 1.0]).numpy(), expected)


def test_feature_colors_default_to_robust_percentiles():
    z = torch.randn(3, 16, 4, dtype=torch.float64)
    z[0, 0, 1] = 1e6                                                              # an outlier the bounds ignore
    colors = feature_map_colors(z, channels=(3, 1, 0))
    values = z.numpy().reshape(-1, 4)
    for out_channel, channel in enumerate((3, 1, 0)):
        low, high = np.percentile(values[:, channel], [1, 99])
        mapped = np.round(255 * np.clip((values[:, channel] - low) / (high - low), 0, 1)).reshape(3, 4, 4)
        assert np.array_equal(colors[:, out_channel].numpy(), mapped.astype(np.uint8))


def test_thinning_keeps_first_and_last_evenly():
    assert thin_evenly(list(range(0, 101, 10)), 4) == [0, 3, 7, 10]               # targets 0, 33.3, 66.7, 100
    assert thin_evenly([0, 1, 2], 8) == [0, 1, 2]


def test_feature_evolution_thins_renders_and_resumes(tmp_path):
    images = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)
    path = tmp_path / "features.png"
    evolution = FeatureEvolution(images, path, upscale=2, max_columns=4)
    snapshots = {step: torch.randn(2, 4, 3) for step in range(0, 1100, 100)}
    for step, z in snapshots.items():
        evolution.add(step, z)
    assert evolution.steps[0] == 0 and evolution.steps[-1] == 1000 and len(evolution.steps) == 4
    assert evolution.steps == sorted(evolution.steps)
    assert torch.equal(evolution.snapshots[-1], feature_map_colors(snapshots[1000]))
    # The figure: 1 image column + 4 snapshot columns of 1.3 in, 2 rows of 1.3 in (+0.3 in of titles), 100 dpi.
    assert Image.open(path).size == (round(1.3 * 5 * 100), round((1.3 * 2 + 0.3) * 100))

    state = torch.load(_saved(evolution.state_dict(), tmp_path / "state.pt"), weights_only=True)
    resumed = FeatureEvolution(images, path, upscale=2, max_columns=4)
    resumed.load_state_dict(state)
    assert resumed.steps == evolution.steps
    assert all(torch.equal(a, b) for a, b in zip(resumed.snapshots, evolution.snapshots))
    resumed.add(1100, torch.randn(2, 4, 3))
    assert resumed.steps[0] == 0 and resumed.steps[-1] == 1100 and len(resumed.steps) == 4
    with pytest.raises(ValueError, match="step"):
        resumed.add(1100, torch.randn(2, 4, 3))


def _saved(obj, path):
    torch.save(obj, path)
    return path


def test_loss_curves_read_partial_files_and_plot(tmp_path):
    lines = [{"step": 0, "loss": 1.0, "loss_image": 0.6, "loss_reg": 0.1},
             {"step": 10, "loss": 0.5, "loss_image": 0.3},                     # loss_reg missing here
             {"step": 20, "loss": 0.25, "loss_image": 0.2, "loss_reg": 0.05, "lr": 1e-4}]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 30, "loss": 0.1')  # truncated

    series = read_metrics_jsonl(metrics, ("loss", "loss_image", "loss_feature", "loss_reg"))
    assert list(series) == ["loss", "loss_image", "loss_reg"]                   # loss_feature never logged
    assert series["loss"][0].tolist() == [0, 10, 20] and series["loss"][1].tolist() == [1.0, 0.5, 0.25]
    assert series["loss_reg"][0].tolist() == [0, 20] and series["loss_reg"][1].tolist() == [0.1, 0.05]

    # Bias-corrected EMA = the beta-weighted mean of the values so far.
    values, beta = np.array([1.0, 0.5, 0.25, 2.0]), 0.8
    weighted = [sum(beta ** (k - j) * values[j] for j in range(k + 1)) / sum(beta ** (k - j) for j in range(k + 1))
                for k in range(4)]
    np.testing.assert_allclose(exponential_moving_average(values, beta), weighted, rtol=1e-12)

    out = plot_loss_curves(metrics, tmp_path / "plots" / "loss.png")
    # One 7 in wide subplot row of 2.2 in per key found (3), plus 0.4 in, at 100 dpi.
    assert out == tmp_path / "plots" / "loss.png" and Image.open(out).size == (700, round((2.2 * 3 + 0.4) * 100))
