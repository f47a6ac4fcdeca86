"""Sampler, datasets and loaders: the torch and DALI loaders deliver the same batches, in the sampler's order.

References: PIL decoding of the stored bytes; `dataset.read`; the sampler's own global batches; float64 numpy
cubic-convolution resizers written here (Keys a = -0.75 for PyTorch's bicubic, a = -0.5 for DALI's cubic);
`sklearn.datasets.load_digits` with a hand-written bilinear upsampler.
"""
import functools
import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from coredi_fast.data import (DigitsDataset, RepaFolderDataset, ShardedImageDataset, ShardedSampler, TorchLoader,
                              build_loader, digits_images, encoder_input, write_digits_image_folder)
from coredi_fast.data.encoder_input import IMAGENET_MEAN, IMAGENET_STD
from coredi_fast.data.preprocess import preprocess_folder

IMAGE_SIZE = 16
ENCODER_RES = 14


# ---------------------------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_epochs_are_permutations_split_contiguously_by_rank(drop_last):
    n, global_batch = 103, 12
    single = ShardedSampler(n, global_batch, seed=3, drop_last=drop_last)
    ranks = [ShardedSampler(n, global_batch, rank=r, world_size=4, seed=3, drop_last=drop_last) for r in range(4)]
    steps = n // global_batch if drop_last else -(-n // global_batch)
    assert single.steps_per_epoch == steps == len(single)
    for epoch in range(3):
        batches = [single.global_batch(epoch, s) for s in range(steps)]
        for s, batch in enumerate(batches):
            assert batch.dtype == np.int64 and batch.shape == (global_batch,)
            # rank r holds items [3r, 3r+3) of the global batch: the 4-process run sees the 1-process batches
            np.testing.assert_array_equal(np.concatenate([rk.local_batch(epoch, s) for rk in ranks]), batch)
        seen = np.concatenate(batches)
        if drop_last:  # distinct indices, the 7 left over are not seen this epoch
            assert len(np.unique(seen)) == steps * global_batch and seen.min() >= 0 and seen.max() < n
        else:  # every index, the last batch padded with the epoch's first indices
            assert set(seen.tolist()) == set(range(n))
            np.testing.assert_array_equal(seen[n:], seen[:steps * global_batch - n])
    assert not np.array_equal(single.global_batch(0, 0), single.global_batch(1, 0))  # reshuffled per epoch
    if not drop_last:  # a data set smaller than one global batch: the permutation repeats
        tiny = ShardedSampler(3, 8, rank=1, world_size=2, seed=0, drop_last=False)
        perm = tiny.permutation(0)
        np.testing.assert_array_equal(tiny.local_batch(0, 0), np.concatenate([perm, perm, perm])[4:8])
    assert not np.array_equal(single.global_batch(0, 0), ShardedSampler(n, global_batch, seed=4).global_batch(0, 0))


def test_sampler_resume_from_state_dict_reproduces_the_rest():
    n, global_batch = 50, 8  # 6 steps per epoch
    sampler = ShardedSampler(n, global_batch, rank=1, world_size=2, seed=7)
    full = []
    for _ in range(3):
        for batch in sampler:
            full.append(batch)
            sampler.advance()
    assert (sampler.epoch, sampler.step) == (3, 0) and len(full) == 18

    fresh = ShardedSampler(n, global_batch, rank=1, world_size=2, seed=7)
    for _ in range(2):  # stop in the middle of epoch 1
        for step, _batch in enumerate(fresh):
            if (fresh.epoch, step) == (1, 4):
                break
            fresh.advance()
    state = fresh.state_dict()
    assert (state["epoch"], state["step"]) == (1, 4)
    # resume on another world size: global batches do not depend on it
    resumed = ShardedSampler(n, global_batch, rank=0, world_size=1, seed=7)
    resumed.load_state_dict(state)
    rest = []
    while resumed.epoch < 3:
        for batch in resumed:
            rest.append(batch[4:])  # the rank-1 half of each global batch
            resumed.advance()
    assert len(rest) == 8
    for a, b in zip(rest, full[10:], strict=True):
        np.testing.assert_array_equal(a, b)


def test_sampler_rejects_bad_arguments_and_foreign_state():
    with pytest.raises(ValueError, match="global_batch_size"):
        ShardedSampler(100, 10, rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        ShardedSampler(100, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="global_batch_size=200 is larger"):
        ShardedSampler(100, 200)
    with pytest.raises(TypeError, match="seed"):
        ShardedSampler(100, 8, seed=1.5)
    state = ShardedSampler(100, 8, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed=1"):
        ShardedSampler(100, 8, seed=2).load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------------
# Data sets
# ---------------------------------------------------------------------------------------------------------------

def _bilinear_matrix(n_in, n_out):
    """(n_out, n_in) float64: half-pixel-centre bilinear upsampling with clamped borders."""
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(int(np.floor(src)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        m[o, lo] += 1 - (src - lo)
        m[o, hi] += src - lo
    return m


@pytest.mark.parametrize("image_size", [8, 16, 32])
def test_digits_match_load_digits_after_bilinear_upsampling(image_size):
    from sklearn.datasets import load_digits

    digits = load_digits()
    m = _bilinear_matrix(8, image_size)
    expected = np.round(np.einsum("oh,nhw,pw->nop", m, digits.images / 16.0, m) * 255).astype(np.uint8)
    images, labels = digits_images(image_size)
    np.testing.assert_array_equal(images, expected)
    np.testing.assert_array_equal(labels, digits.target)

    train, test = DigitsDataset(image_size, channels=3, split="train"), DigitsDataset(image_size, 1, split="test")
    assert len(train) + len(test) == 1797 and not set(train.source_indices) & set(test.source_indices)
    for ds, i in ((train, 5), (test, 17)):
        sample = ds.read(i)
        source = ds.source_indices[i]
        assert sample.image.shape == (ds.channels, image_size, image_size) and sample.moments is None
        for c in range(ds.channels):
            np.testing.assert_array_equal(sample.image[c], expected[source])
        assert sample.label == digits.target[source]
    assert not train.encoded and not train.has_moments and train.num_classes == 10


def test_digits_image_folder_round_trips(tmp_path):
    write_digits_image_folder(tmp_path, image_size=12, split="test")
    test = DigitsDataset(12, channels=3, split="test")
    files = sorted(tmp_path.rglob("*.png"))
    assert len(files) == len(test)
    for path in files[:20]:
        index = int(path.stem)
        i = int(np.searchsorted(test.source_indices, index))
        np.testing.assert_array_equal(np.asarray(Image.open(path)).transpose(2, 0, 1), test.read(i).image)
        assert int(path.parent.name) == test.read(i).label


def _write_fake_repa(root, n=7, size=8):
    """REPA's layout: images/00000/img%08d.png + vae-sd/00000/img-mean-std-%08d.npy, dataset.json in both."""
    rng = np.random.default_rng(0)
    images, moments, labels = [], [], []
    for idx in range(n):
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        moment = rng.normal(size=(8, size // 8 + 1, size // 8 + 1)).astype(np.float32)
        label = int(rng.integers(0, 5))
        name = f"{idx:08d}"
        (root / "images" / name[:5]).mkdir(parents=True, exist_ok=True)
        (root / "vae-sd" / name[:5]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "images" / name[:5] / f"img{name}.png", compress_level=0)
        np.save(root / "vae-sd" / name[:5] / f"img-mean-std-{name}.npy", moment)
        images.append(image)
        moments.append(moment)
        labels.append(label)
    for folder, pattern in (("images", "{0}/img{1}.png"), ("vae-sd", "{0}/img-mean-std-{1}.npy")):
        entries = [[pattern.format(f"{i:08d}"[:5], f"{i:08d}"), labels[i]] for i in range(n)]
        (root / folder / "dataset.json").write_text(json.dumps({"labels": entries}))
    return images, moments, labels


def test_repa_folder_dataset_reads_the_repa_layout(tmp_path):
    images, moments, labels = _write_fake_repa(tmp_path)
    ds = RepaFolderDataset(tmp_path)
    assert len(ds) == 7 and ds.image_size == 8 and ds.has_moments and ds.moments_layout == "mean_std"
    assert ds.num_classes == max(labels) + 1 and ds.moments_shape == (8, 2, 2)
    for i in range(len(ds)):
        sample = ds.read(i)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(sample.image.tobytes()))), images[i])
        np.testing.assert_array_equal(sample.moments, moments[i])
        assert sample.label == labels[i]
    batch = next(iter(TorchLoader(ds, ShardedSampler(7, 3, seed=0), num_workers=0, device="cpu")))
    for j, i in enumerate(batch["index"].tolist()):
        np.testing.assert_array_equal(batch["image"][j].permute(1, 2, 0).numpy(), images[i])
        np.testing.assert_array_equal(batch["moments"][j].numpy(), moments[i])
        assert batch["label"][j] == labels[i]

    (tmp_path / "vae-sd" / "00000" / "img-mean-std-00000006.npy").unlink()
    with pytest.raises(ValueError, match="7 images but .*vae-sd has 6"):
        RepaFolderDataset(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------------------------

def _moments_fn(images):
    p = torch.nn.functional.avg_pool2d(images.float(), 4)
    return torch.cat([p / 255.0, -p / 255.0, p[:, :2] / 100.0], dim=1)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    folder = write_digits_image_folder(tmp_path_factory.mktemp("digits"), image_size=24, split="test")
    out = tmp_path_factory.mktemp("shards") / "out"
    preprocess_folder(folder, out, image_size=IMAGE_SIZE, moments_fn=_moments_fn, vae_info={"weights": "t"},
                      shard_size=64, limit=150, progress=False)
    return ShardedImageDataset(out)


def _take(loader, num_steps):
    """num_steps batches, continuing across epochs as a training loop does."""
    batches = []
    while len(batches) < num_steps:
        for batch in loader:
            batches.append(batch)
            if len(batches) == num_steps:
                break
    return batches


def _cubic_matrix(n_in, n_out, a):
    """(n_out, n_in) float64 cubic-convolution resampling (parameter a), half-pixel centres, clamped borders."""
    def w(t):
        t = abs(t)
        return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1 if t <= 1 else (a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a
                                                                         if t < 2 else 0.0)
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = (o + 0.5) * n_in / n_out - 0.5
        base = int(np.floor(src))
        for k in range(-1, 3):
            m[o, min(max(base + k, 0), n_in - 1)] += w(src - (base + k))
    return m


def _encoder_input_reference(images_uint8, resolution, a):
    x = images_uint8.double().numpy() / 255.0
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    x = (x - np.array(IMAGENET_MEAN)[:, None, None]) / np.array(IMAGENET_STD)[:, None, None]
    m = _cubic_matrix(x.shape[-1], resolution, a)
    return np.einsum("oh,bchw,pw->bcop", m, x, m)


def _check_batch_against_dataset(batch, dataset, expected_indices):
    np.testing.assert_array_equal(batch["index"].numpy(), expected_indices)
    for j, i in enumerate(expected_indices):
        sample = dataset.read(int(i))
        if dataset.encoded:
            pixels = np.asarray(Image.open(io.BytesIO(sample.image.tobytes())).convert("RGB")).transpose(2, 0, 1)
        else:
            pixels = sample.image
        np.testing.assert_array_equal(batch["image"][j].numpy(), pixels)
        assert batch["label"][j].item() == sample.label
        if dataset.has_moments:
            np.testing.assert_array_equal(batch["moments"][j].numpy(), sample.moments)


def test_torch_loader_delivers_the_sampler_batches(sharded):
    sampler = ShardedSampler(len(sharded), 32, seed=5)  # 4 steps per epoch: 6 steps cross an epoch
    loader = TorchLoader(sharded, sampler, num_workers=0, device="cpu", encoder_resolution=ENCODER_RES)
    batches = _take(loader, 6)
    reference = ShardedSampler(len(sharded), 32, seed=5)
    for step, batch in enumerate(batches):
        assert set(batch) == {"image", "label", "index", "moments", "encoder_input"}
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (32, 3, IMAGE_SIZE, IMAGE_SIZE)
        assert batch["label"].dtype == torch.int64 and batch["moments"].dtype == torch.float32
        _check_batch_against_dataset(batch, sharded, reference.local_batch_at(step))
        expected = _encoder_input_reference(batch["image"], ENCODER_RES, a=-0.75)
        np.testing.assert_allclose(batch["encoder_input"].numpy(), expected, atol=1e-4)  # float32 vs float64
    assert (sampler.epoch, sampler.step) == (1, 2)


def test_torch_loader_workers_and_resume(sharded):
    uninterrupted = _take(TorchLoader(sharded, ShardedSampler(len(sharded), 16, seed=2), num_workers=0,
                                      device="cpu"), 12)
    loader = TorchLoader(sharded, ShardedSampler(len(sharded), 16, seed=2), num_workers=2, device="cpu")
    first = _take(loader, 5)
    state = loader.state_dict()
    resumed = TorchLoader(sharded, ShardedSampler(len(sharded), 16, seed=2), num_workers=2, device="cpu")
    resumed.load_state_dict(state)
    rest = _take(resumed, 7)
    for a, b in zip(uninterrupted, first + rest, strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_build_loader_picks_torch_on_cpu_and_says_why(sharded, caplog):
    with caplog.at_level(logging.INFO, logger="coredi_fast.data.torch_loader"):
        loader = build_loader(sharded, global_batch_size=8, num_workers=0, device="cpu")
    assert isinstance(loader, TorchLoader) and loader.backend == "torch"
    # The reason depends on the install (README's `.[dev]` has no DALI; CI's full install has it).
    from coredi_fast.data.dali_loader import dali_available

    expected = ("data loader: torch (the target device is cpu (DALI helps by decoding on the GPU))" if dali_available()
                else "data loader: torch (nvidia.dali is not installed)")
    assert expected in [r.message for r in caplog.records]
    with pytest.raises(ValueError, match="backend"):
        build_loader(sharded, global_batch_size=8, backend="tpu")
    with pytest.raises(ValueError, match="num_samples"):
        TorchLoader(sharded, ShardedSampler(10, 2), num_workers=0, device="cpu")


def test_encoder_input_rejects_bad_input():
    with pytest.raises(ValueError, match="images"):
        encoder_input(torch.zeros(2, 4, 8, 8, dtype=torch.uint8), 4)
    with pytest.raises(TypeError, match="uint8"):
        encoder_input(torch.zeros(2, 3, 8, 8), 4)


# ---------------------------------------------------------------------------------------------------------------
# DALI (CPU pipeline here; the "mixed" GPU decoder on GPU machines)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [1, 2])
def test_dali_cpu_and_torch_deliver_the_same_batches(sharded, world_size):
    pytest.importorskip("nvidia.dali")
    from coredi_fast.data.dali_loader import DaliLoader

    steps, global_batch = 6, 32
    single = _take(TorchLoader(sharded, ShardedSampler(len(sharded), global_batch, seed=9), num_workers=0,
                               device="cpu", encoder_resolution=ENCODER_RES), steps)
    per_rank = []
    for rank in range(world_size):
        make = functools.partial(ShardedSampler, len(sharded), global_batch, rank=rank, world_size=world_size, seed=9)
        torch_batches = _take(TorchLoader(sharded, make(), num_workers=0, device="cpu",
                                          encoder_resolution=ENCODER_RES), steps)
        dali = DaliLoader(sharded, make(), device="cpu", num_threads=2, encoder_resolution=ENCODER_RES)
        dali_batches = _take(dali, steps)
        dali.close()
        for t, d in zip(torch_batches, dali_batches, strict=True):
            assert set(t) == set(d)
            for key in t:  # PNG decoding is lossless: everything is exactly equal, encoder input included
                assert t[key].dtype == d[key].dtype and torch.equal(t[key], d[key]), key
        per_rank.append(dali_batches)
    for step in range(steps):  # the ranks' batches concatenate to the 1-process global batch
        for key in single[step]:
            assert torch.equal(torch.cat([per_rank[r][step][key] for r in range(world_size)]), single[step][key])


def test_dali_parallel_source_resume_and_in_pipeline_resize(sharded):
    pytest.importorskip("nvidia.dali")
    from coredi_fast.data.dali_loader import DaliLoader

    reference = _take(TorchLoader(sharded, ShardedSampler(len(sharded), 16, seed=4), num_workers=0, device="cpu"), 10)
    loader = DaliLoader(sharded, ShardedSampler(len(sharded), 16, seed=4), device="cpu", num_threads=2,
                        py_num_workers=2, encoder_resolution=ENCODER_RES, encoder_resize="dali")
    first = _take(loader, 4)
    state = loader.state_dict()
    loader.close()
    resumed = DaliLoader(sharded, ShardedSampler(len(sharded), 16, seed=4), device="cpu", num_threads=2,
                         encoder_resolution=ENCODER_RES, encoder_resize="dali")
    resumed.load_state_dict(state)
    rest = _take(resumed, 6)
    resumed.close()
    for t, d in zip(reference, first + rest, strict=True):
        for key in ("image", "label", "index", "moments"):
            assert torch.equal(t[key], d[key]), key
        # DALI's cubic is Catmull-Rom (a = -0.5), not PyTorch's a = -0.75: compare with its own float64 reference.
        # The 1e-2 budget covers DALI's tabulated filter (measured max error ~3e-3 on these [-2.1, 2.6] values).
        expected = _encoder_input_reference(d["image"], ENCODER_RES, a=-0.5)
        np.testing.assert_allclose(d["encoder_input"].numpy(), expected, atol=1e-2)
        assert np.abs(expected - _encoder_input_reference(d["image"], ENCODER_RES, a=-0.75)).max() > 1e-2


def test_dali_reads_raw_pixel_datasets(tmp_path):
    pytest.importorskip("nvidia.dali")
    from coredi_fast.data.dali_loader import DaliLoader

    digits = DigitsDataset(image_size=16, channels=1, split="test")
    make = functools.partial(ShardedSampler, len(digits), 20, seed=1)
    torch_batches = _take(TorchLoader(digits, make(), num_workers=0, device="cpu", encoder_resolution=12), 3)
    dali = DaliLoader(digits, make(), device="cpu", num_threads=2, encoder_resolution=12, encoder_resize="dali")
    dali_batches = _take(dali, 3)
    dali.close()
    for step, (t, d) in enumerate(zip(torch_batches, dali_batches, strict=True)):
        _check_batch_against_dataset(d, digits, make().local_batch_at(step))
        for key in ("image", "label", "index"):
            assert torch.equal(t[key], d[key]), key
        np.testing.assert_allclose(d["encoder_input"].numpy(), _encoder_input_reference(d["image"], 12, a=-0.5),
                                   atol=1e-2)


@pytest.mark.gpu
def test_dali_gpu_decoding_matches_torch(sharded):
    pytest.importorskip("nvidia.dali")
    from coredi_fast.data.dali_loader import DaliLoader

    make = functools.partial(ShardedSampler, len(sharded), 32, seed=3)
    torch_batches = _take(TorchLoader(sharded, make(), num_workers=2, device="cuda", encoder_resolution=ENCODER_RES), 5)
    loader = build_loader(sharded, global_batch_size=32, seed=3, num_workers=2, device="cuda",
                          encoder_resolution=ENCODER_RES)
    assert isinstance(loader, DaliLoader)
    dali_batches = _take(loader, 5)
    for t, d in zip(torch_batches, dali_batches, strict=True):
        for key in t:
            assert d[key].is_cuda and torch.equal(t[key], d[key]), key


def test_a_corrupt_sample_in_a_shard_is_skipped_named_and_counted(sharded, tmp_path, caplog):
    import shutil

    from coredi_fast.data.batches import BatchReader
    from coredi_fast.data.shards import shard_path

    copy = tmp_path / "shards"
    shutil.copytree(sharded.root, copy)
    data = ShardedImageDataset(copy)
    index = np.load(shard_path(copy, 0, "index.npy"))
    offset, length = index[5]
    with open(shard_path(copy, 0, "images.bin"), "r+b") as f:  # sample 5's PNG bytes become garbage
        f.seek(int(offset))
        f.write(b"\0" * int(length))
    batch_indices = np.arange(8)
    with caplog.at_level(logging.WARNING, logger="coredi_fast.data.batches"):
        batch = BatchReader(data)[batch_indices]
    clean = BatchReader(sharded)[batch_indices]
    assert int(batch["corrupt"]) == 1 and "corrupt" not in clean
    # The next decodable sample of the batch (6) stands in for 5, image and label together; the rest is untouched.
    assert torch.equal(batch["image"][5], clean["image"][6]) and batch["label"][5] == clean["label"][6]
    keep = [k for k in range(8) if k != 5]
    assert torch.equal(batch["image"][keep], clean["image"][keep])
    (message,) = [r.message for r in caplog.records if "corrupt sample skipped" in r.message]
    assert f"{shard_path(copy, 0, 'images.bin')} entry 5" in message


def test_training_on_shards_that_do_not_fit_the_config_is_refused_at_start_up(sharded):
    from coredi_fast.training.config import load_config
    from coredi_fast.training.preflight import preflight

    base = ["data.source=shards", f"data.path={sharded.root}"]
    with pytest.raises(ValueError, match=rf"data.image_size=32 but {sharded.root} holds {IMAGE_SIZE}-px images"):
        preflight(load_config(None, base + ["data.image_size=32"]))
    with pytest.raises(ValueError, match=r"have 3 channels but the digits encoder takes 1-channel images"):
        preflight(load_config(None, base + [f"data.image_size={IMAGE_SIZE}"]))


def test_dali_serves_the_step_with_a_corrupt_sample_from_the_torch_path_and_goes_on(sharded, tmp_path, caplog):
    pytest.importorskip("nvidia.dali")
    import shutil

    from coredi_fast.data.dali_loader import DaliLoader
    from coredi_fast.data.shards import shard_path

    copy = tmp_path / "shards"
    shutil.copytree(sharded.root, copy)
    make = functools.partial(ShardedSampler, len(sharded), 16, seed=3)
    victim = int(make().local_batch_at(2)[4])  # a sample of the third step
    shard = int(np.searchsorted(np.cumsum([64, 64, 64]), victim, side="right"))  # shards of 64 (the fixture)
    index = np.load(shard_path(copy, shard, "index.npy"))
    offset, length = index[victim - 64 * shard]
    with open(shard_path(copy, shard, "images.bin"), "r+b") as f:
        f.seek(int(offset))
        f.write(b"\0" * int(length))
    data = ShardedImageDataset(copy)
    with caplog.at_level(logging.WARNING, logger="coredi_fast.data.batches"):
        dali = DaliLoader(data, make(), device="cpu", num_threads=2, encoder_resolution=ENCODER_RES)
        dali_batches = _take(dali, 5)
        dali.close()
    torch_batches = _take(TorchLoader(data, make(), num_workers=0, device="cpu", encoder_resolution=ENCODER_RES), 5)
    for step, (t, d) in enumerate(zip(torch_batches, dali_batches, strict=True)):
        assert set(t) == set(d), step
        for key in t:  # the corrupt step too: both stood the same sample in
            assert torch.equal(t[key], d[key]), (step, key)
    assert "corrupt" in dali_batches[2] and int(dali_batches[2]["corrupt"]) == 1
    assert all("corrupt" not in b for k, b in enumerate(dali_batches) if k != 2)
    assert any(f"entry {victim - 64 * shard}" in r.message for r in caplog.records)
