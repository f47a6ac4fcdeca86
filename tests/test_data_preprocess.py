"""Preprocessing into shards: ADM crop, stored pixels and moments, skipped files, resume, errors, start-up checks.

References: hand-computed crops; PIL decoding of the stored bytes against `center_crop_arr` of the source; the
moments function re-applied (in numpy, float64) to the decoded stored pixels; byte comparison of interrupted and
uninterrupted runs.
"""
import filecmp
import io
import json
import re
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from coredi_fast.data import ShardedImageDataset, center_crop_arr, write_digits_image_folder
from coredi_fast.data.preprocess import main, preprocess_folder
from coredi_fast.data.shards import read_manifest, shard_path

IMAGE_SIZE = 16
SHARD_SIZE = 64


# ---------------------------------------------------------------------------------------------------------------
# center_crop_arr against hand-computed cases
# ---------------------------------------------------------------------------------------------------------------

def test_center_crop_box_halving_then_crop_hand_computed():
    # 4x6 image, size 2: the short side 4 >= 2*2, so one BOX halving to 2x3 (each output pixel = mean of a 2x2
    # block), then the scale is 2/2 = 1 (no resize), then the crop keeps columns (3-2)//2 = 0 .. 1.
    block_means = np.array([[10, 50, 200], [90, 130, 250]], dtype=np.int64)
    jitter = np.array([[1, -1], [2, -2]])  # sums to 0 in each block: the mean stays exact
    image = np.zeros((4, 6, 3), dtype=np.uint8)
    for by in range(2):
        for bx in range(3):
            for c in range(3):
                image[2 * by:2 * by + 2, 2 * bx:2 * bx + 2, c] = block_means[by, bx] + c + jitter
    out = center_crop_arr(image, 2)
    expected = np.stack([block_means[:, :2] + c for c in range(3)], axis=-1)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("height, width, rows, cols", [(3, 5, slice(0, 3), slice(1, 4)),   # wide: centre columns
                                                       (5, 3, slice(1, 4), slice(0, 3)),   # tall: centre rows
                                                       (3, 6, slice(0, 3), slice(1, 4))])  # (6-3)//2 = 1
def test_center_crop_offsets_when_no_resize_is_needed(height, width, rows, cols):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    # short side 3 < 2*3 (no halving) and the scale is 3/3 = 1: the output is a pure crop
    np.testing.assert_array_equal(center_crop_arr(image, 3), image[rows, cols])


def test_center_crop_upscales_small_images():
    # 2x3 constant image to size 5: scale 2.5 -> (h, w) = (5, round(7.5) = 8) -> centre 5x5; bicubic keeps constants
    image = np.full((2, 3, 3), 77, dtype=np.uint8)
    out = center_crop_arr(image, 5)
    np.testing.assert_array_equal(out, np.full((5, 5, 3), 77, dtype=np.uint8))
    with pytest.raises(ValueError, match="image_size"):
        center_crop_arr(image, 0)


# ---------------------------------------------------------------------------------------------------------------
# A small input folder: digits (32 px PNG) + larger synthetic images + bad files
# ---------------------------------------------------------------------------------------------------------------

BAD_FILES = {"2/corrupt.png": "unreadable", "5/truncated.jpg": "unreadable", "7/tiny.png": "too small"}


def _smooth_image(rng, height, width):
    y, x = np.mgrid[0:height, 0:width]
    channels = [127 + 120 * np.sin(x / (5 + 3 * c) + y / (7 + c) + rng.uniform(0, 6)) for c in range(3)]
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("input")
    write_digits_image_folder(root, image_size=32, split="test")  # 359 digits in class folders "0".."9"
    rng = np.random.default_rng(1)
    Image.fromarray(_smooth_image(rng, 97, 130)).save(root / "3" / "zz_wide.jpg", quality=90)
    Image.fromarray(_smooth_image(rng, 300, 200)).convert("RGBA").save(root / "4" / "zz_tall_rgba.png")
    Image.fromarray(_smooth_image(rng, 40, 41)[..., 0]).save(root / "6" / "zz_grey.png")  # mode "L"
    (root / "2" / "corrupt.png").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    buffer = io.BytesIO()
    Image.fromarray(_smooth_image(rng, 120, 90)).save(buffer, format="JPEG", quality=90)
    (root / "5" / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    Image.fromarray(_smooth_image(rng, 4, 4)).save(root / "7" / "tiny.png")
    (root / "8" / "notes.txt").write_text("not an image: ignored")
    return root


def _moments_fn(images):
    """A deterministic stand-in for the VAE: uint8 (B, 3, 16, 16) -> float32 (B, 8, 4, 4)."""
    p = F.avg_pool2d(images.float(), 4)
    return torch.cat([p / 255.0, (p / 255.0) ** 2, p[:, :2] - p[:, 1:]], dim=1)


def _moments_reference(pixels_hwc):
    """The same function in float64 numpy, written independently: (16, 16, 3) uint8 -> (8, 4, 4)."""
    p = pixels_hwc.astype(np.float64).reshape(4, 4, 4, 4, 3).mean(axis=(1, 3)).transpose(2, 0, 1)
    return np.concatenate([p / 255.0, (p / 255.0) ** 2, p[:2] - p[1:]])


VAE_INFO = {"weights": "test-moments-fn", "scale": 1.0}


def _run(folder, out, **kwargs):
    kwargs = {"image_size": IMAGE_SIZE, "moments_fn": _moments_fn, "vae_info": VAE_INFO, "shard_size": SHARD_SIZE,
              "batch_size": 16, "min_size": 6, "progress": False, **kwargs}
    return preprocess_folder(folder, out, **kwargs)


@pytest.fixture(scope="module")
def reference_run(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    summary = _run(image_folder, out)
    return out, summary


def _source_files(folder):
    exts = {".png", ".jpg"}
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.suffix in exts)


def test_preprocess_stores_adm_crops_labels_and_moments(image_folder, reference_run):
    out, summary = reference_run
    sources = _source_files(image_folder)
    good = [s for s in sources if s not in BAD_FILES]
    manifest = read_manifest(out)
    assert manifest["complete"] and manifest["num_samples"] == len(good) == summary.num_samples
    assert manifest["class_names"] == [str(d) for d in range(10)]
    assert manifest["num_shards"] == -(-len(sources) // SHARD_SIZE)
    assert manifest["moments"] == {"dtype": "float32", "shape": [8, 4, 4], "layout": "mean_logvar"}
    assert manifest["vae"] == VAE_INFO

    dataset = ShardedImageDataset(out)
    assert len(dataset) == len(good) and dataset.image_size == IMAGE_SIZE and dataset.num_classes == 10
    for i, rel in enumerate(good):  # order: the sorted file list minus the skipped files
        assert dataset.source_name(i) == rel
        sample = dataset.read(i)
        with Image.open(image_folder / rel) as source:
            expected = center_crop_arr(source, IMAGE_SIZE)
        stored = np.asarray(Image.open(io.BytesIO(sample.image.tobytes())))
        np.testing.assert_array_equal(stored, expected, err_msg=rel)
        assert sample.label == int(rel.split("/")[0])
        np.testing.assert_allclose(sample.moments, _moments_reference(stored), rtol=1e-6, atol=1e-5, err_msg=rel)
    np.testing.assert_array_equal(dataset.labels(), [int(r.split("/")[0]) for r in good])


def test_preprocess_skips_and_reports_bad_files(reference_run):
    out, summary = reference_run
    manifest = read_manifest(out)
    skipped = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == set(BAD_FILES)
    for path, kind in BAD_FILES.items():
        assert skipped[path].startswith(kind), (path, skipped[path])
    assert {s["path"] for s in summary.skipped} == set(BAD_FILES)
    text = str(summary)
    assert "3 files skipped" in text and all(path in text for path in BAD_FILES)
    # each shard records its own skipped files and counts: files - skipped = samples
    for record in manifest["shards"]:
        assert record["num_files"] - len(record["skipped"]) == record["num_samples"]


def test_resume_after_interruption_gives_identical_shards(image_folder, reference_run, tmp_path):
    reference_out, _ = reference_run
    out = tmp_path / "out"

    def crashing_moments_fn(images):
        if out.joinpath("manifest.json").exists() and len(read_manifest(out)["shards"]) >= 2:
            raise RuntimeError("simulated crash in shard 2")
        return _moments_fn(images)

    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(image_folder, out, moments_fn=crashing_moments_fn)
    manifest = read_manifest(out)
    assert [r["index"] for r in manifest["shards"]] == [0, 1] and not manifest["complete"]
    with pytest.raises(ValueError, match="has not finished"):
        ShardedImageDataset(out)

    summary = _run(image_folder, out, num_workers=2)  # resumed, this time with a worker pool
    assert summary.shards_reused == 2 and summary.shards_written == read_manifest(out)["num_shards"] - 2
    names = sorted(p.name for p in reference_out.iterdir() if p.name != "manifest.json")
    assert names == sorted(p.name for p in out.iterdir() if p.name != "manifest.json")  # no temp files left
    match, mismatch, errors = filecmp.cmpfiles(reference_out, out, names, shallow=False)
    assert not mismatch and not errors and len(match) == len(names)
    # resuming a finished run does nothing
    again = _run(image_folder, out)
    assert again.shards_written == 0 and again.num_samples == summary.num_samples


def test_jpeg_format_moments_follow_the_decoded_jpeg(image_folder, tmp_path):
    out = tmp_path / "jpeg"
    _run(image_folder, out, image_format="jpeg", jpeg_quality=95, limit=40)
    dataset = ShardedImageDataset(out)
    assert dataset.image_format == "jpeg" and len(dataset) == 40
    for i in range(len(dataset)):
        sample = dataset.read(i)
        assert sample.image[:2].tolist() == [0xFF, 0xD8]  # JPEG magic
        decoded = np.asarray(Image.open(io.BytesIO(sample.image.tobytes())).convert("RGB"))
        with Image.open(image_folder / dataset.source_name(i)) as source:
            crop = center_crop_arr(source, IMAGE_SIZE)
        assert np.abs(decoded.astype(int) - crop).mean() < 3.0  # quality 95, 4:4:4: close to the crop
        np.testing.assert_allclose(sample.moments, _moments_reference(decoded), rtol=1e-6, atol=1e-5)


def test_cli_with_a_local_tiny_vae_folder(image_folder, tmp_path, capsys):
    from diffusers import AutoencoderKL

    from coredi_fast.encoders.vae import LatentVAE

    config = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  layers_per_block=1, norm_num_groups=4, sample_size=IMAGE_SIZE, scaling_factor=0.5)
    vae_dir = tmp_path / "tiny-vae"
    AutoencoderKL(**config).save_pretrained(vae_dir)  # random weights, in the diffusers folder layout
    out = tmp_path / "vae"
    main(["--input", str(image_folder), "--output", str(out), "--image-size", str(IMAGE_SIZE), "--vae", str(vae_dir),
          "--device", "cpu", "--moments-dtype", "float16", "--limit", "12", "--batch-size", "5", "--num-workers", "0",
          "--no-progress"])
    assert "12 samples from 12 files" in capsys.readouterr().out
    manifest = read_manifest(out)
    assert manifest["vae"]["weights"] == str(vae_dir) and manifest["vae"]["scale"] == 0.5
    dataset = ShardedImageDataset(out)
    assert dataset.moments_shape == (8, 8, 8) and dataset.moments_dtype == np.float16
    assert dataset.moments_layout == "mean_logvar"

    vae = LatentVAE(weights=vae_dir, moments_layout="mean_logvar")  # the same weights, loaded independently
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(dataset.read(i).image.tobytes()))))
                          for i in range(len(dataset))]).permute(0, 3, 1, 2)
    expected = vae.encode_moments(pixels).numpy()  # one batch of 12
    stored = np.stack([dataset.read(i).moments for i in range(len(dataset))])
    # float16 storage: relative error <= 2^-11; batches of 5 vs 12 may change conv sums in the last float32 bits
    np.testing.assert_allclose(stored, expected, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Errors name the path
# ---------------------------------------------------------------------------------------------------------------

def test_missing_and_empty_input_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        _run(missing, tmp_path / "o1")
    empty = tmp_path / "empty"
    (empty / "class_a").mkdir(parents=True)
    (empty / "class_a" / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match=f"{re.escape(str(empty))}.*holds no images"):
        _run(empty, tmp_path / "o2")


def test_output_holding_another_dataset_is_refused(image_folder, reference_run, tmp_path):
    reference_out, _ = reference_run
    out = tmp_path / "copy"
    shutil.copytree(reference_out, out)
    manifest = re.escape(str(out / "manifest.json"))
    with pytest.raises(ValueError, match=f"{manifest}.*image_size: existing 16, requested 8"):
        _run(image_folder, out, image_size=8)
    with pytest.raises(ValueError, match="source.file_list_sha256"):
        _run(image_folder, out, limit=10)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "thesis.pdf").write_text("precious")
    with pytest.raises(ValueError, match=f"{re.escape(str(stranger))} is not empty"):
        _run(image_folder, stranger)


@pytest.mark.parametrize("damage, error, kind", [
    ("delete", FileNotFoundError, "labels.npy"),
    ("truncate", ValueError, "images.bin"),
    ("short_labels", ValueError, "labels.npy"),
    ("wrong_moments", ValueError, "moments.npy"),
])
def test_dataset_startup_validation_names_the_file(reference_run, tmp_path, damage, error, kind):
    reference_out, _ = reference_run
    out = tmp_path / "damaged"
    shutil.copytree(reference_out, out)
    path = shard_path(out, 1, kind)
    if damage == "delete":
        path.unlink()
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-1])
    elif damage == "short_labels":
        np.save(path, np.load(path)[:-1])
    else:
        np.save(path, np.load(path)[:, :4])
    with pytest.raises(error, match=re.escape(str(path))):
        ShardedImageDataset(out)


def test_manifest_problems_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "manifest.json"))):
        ShardedImageDataset(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ShardedImageDataset(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a coredi_fast.shards manifest"):
        ShardedImageDataset(tmp_path)


def test_bad_arguments_name_the_argument(image_folder, tmp_path):
    for kwargs, name in [({"image_size": 0}, "image_size"), ({"image_format": "gif"}, "image_format"),
                         ({"moments_dtype": "int8"}, "moments_dtype"), ({"shard_size": -1}, "shard_size"),
                         ({"vae_info": None}, "vae_info"), ({"limit": 0}, "limit")]:
        with pytest.raises(ValueError, match=name):
            _run(image_folder, tmp_path / "x", **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# The command line (pixel space: --no-vae)
# ---------------------------------------------------------------------------------------------------------------

def test_cli_no_vae_and_top_level_script(image_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cli"
    summary = main(["--input", str(image_folder), "--output", str(out), "--image-size", "8", "--no-vae",
                    "--shard-size", "7", "--num-workers", "0", "--limit", "20", "--no-progress"])
    assert summary.num_samples == 20 and f"{out}: 20 samples" in capsys.readouterr().out
    manifest = read_manifest(out)
    assert manifest["moments"] is None and manifest["vae"] is None and manifest["created"]["argv"][1] == "--input"
    assert [r["num_samples"] for r in manifest["shards"]] == [7, 7, 6]
    assert not any(shard_path(out, k, "moments.npy").exists() for k in range(3))
    dataset = ShardedImageDataset(out)
    assert not dataset.has_moments and dataset.read(19).moments is None

    # the top-level thin CLI resumes the same output (nothing left to do)
    script = Path(__file__).resolve().parents[1] / "preprocess.py"
    monkeypatch.setattr(sys, "argv", ["preprocess.py", "--input", str(image_folder), "--output", str(out),
                                      "--image-size", "8", "--no-vae", "--shard-size", "7", "--num-workers", "0",
                                      "--limit", "20", "--no-progress"])
    runpy.run_path(str(script), run_name="__main__")
    assert "0 shards written, 3 already done" in capsys.readouterr().out


def test_16_bit_greyscale_is_scaled_to_8_bit_not_clipped_white():
    from coredi_fast.data.center_crop import center_crop_arr

    values = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472, a 16-bit gradient
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.load()
        assert image.mode.startswith("I")  # how PIL opens a 16-bit PNG
        stored = center_crop_arr(image, 32)
    expected = np.round(values / 65535.0 * 255.0).astype(np.uint8)  # the bit depth scaled, written out
    for channel in range(3):
        np.testing.assert_array_equal(stored[..., channel], expected)
