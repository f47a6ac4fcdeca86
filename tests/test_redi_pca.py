"""ReDi's published PCA file imports safely and the projection our code applies is ReDi's.

(a) Files written exactly as ReDi's calc_pca.py writes them (a real scikit-learn PCA, torch.save of the same dict):
    our projection equals `pca.transform((x - mean) / std)`.
(b) ReDi's real file, when /work/shared/redi (../shared/redi from the project root) is present.
(c) Pickles that would run code are refused, and the code does not run.
"""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from coredi_fast.method import (FeatureProjector, FixedFeatureStatistics, ProjectorConfig, load_redi_pca,
                                read_redi_pca)
from coredi_fast.training.config import load_config
from coredi_fast.training.preflight import preflight

sklearn_decomposition = pytest.importorskip("sklearn.decomposition")

REPO = Path(__file__).resolve().parents[1]
REAL_FILE = REPO / ".." / "shared" / "redi" / "dino_pca_model.pth"


def write_calc_pca_file(path, n_tokens=600, dim=12, n_components=None, whiten=False, seed=0):
    """What ReDi's calc_pca.py does, on random tokens: per-channel np.mean / np.std, standardize, fit sklearn's PCA,
    torch.save({'pca_model': pca, 'mean': mean, 'std': std}). Returns (pca, mean, std)."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim))
    f = (rng.normal(size=(n_tokens, dim)) @ mixing * rng.uniform(0.5, 3.0, dim) + rng.normal(size=dim) * 4)
    f = f.astype(np.float32)                               # calc_pca collects float32 DINOv2 tokens
    mean = np.mean(f, axis=0)
    std = np.std(f, axis=0)
    pca = sklearn_decomposition.PCA(n_components=n_components or dim, whiten=whiten)
    pca.fit((f - mean) / std)
    torch.save({"pca_model": pca, "mean": mean, "std": std}, path)
    return pca, mean, std


def project(stats, tokens, dim, mode="pca"):
    """Our projector (ReDi's fixed PCA, or CoReDi's learned W initialized from the PCA, norm off) on (N, D) tokens."""
    kwargs = dict(norm="none", init="pca", regularizer="none") if mode == "learned" else {}
    projector = FeatureProjector(ProjectorConfig(mode=mode, feature_dim=tokens.shape[1], dim=dim, **kwargs), stats)
    with torch.no_grad():
        return projector(torch.from_numpy(tokens).float()[None]).z[0].double().numpy()


# ---------------------------------------------------------------------------------------------- (a) calc_pca layout

@pytest.mark.parametrize("n_components, dim", [(None, 5), (7, 7)])
def test_calc_pca_file_projects_like_sklearn_transform(tmp_path, n_components, dim):
    path = tmp_path / "dino_pca_model.pth"
    pca, mean, std = write_calc_pca_file(path, n_components=n_components)
    stats = load_redi_pca(path)
    assert isinstance(stats, FixedFeatureStatistics) and stats.feature_dim == 12 and not stats.whiten
    tokens = np.random.default_rng(1).normal(size=(50, 12)).astype(np.float32) * 3 + 1
    expected = pca.transform((tokens - mean) / std)[:, :dim]          # sklearn's own transform
    np.testing.assert_allclose(project(stats, tokens, dim), expected, rtol=1e-4, atol=1e-4)
    # CoReDi starting from ReDi's basis: W = components[:d].T (the learned mode does not subtract pca_mean)
    np.testing.assert_allclose(project(stats, tokens, dim, mode="learned"),
                               expected + pca.mean_[None] @ pca.components_[:dim].T, rtol=1e-4, atol=1e-4)
    # The stored float32 values arrive unchanged.
    assert np.array_equal(stats.mean.numpy(), mean.astype(np.float64))
    assert np.array_equal(stats.standardized_mean.numpy(), pca.mean_.astype(np.float64))
    assert np.array_equal(stats.pca().components.numpy(), pca.components_.astype(np.float64))


def test_whitened_file_projects_like_redi_training_not_like_transform(tmp_path):
    """train_redi.py uses components_ as they are even when calc_pca ran with --whiten: so do we."""
    path = tmp_path / "whitened.pth"
    pca, mean, std = write_calc_pca_file(path, whiten=True)
    stats = load_redi_pca(path)
    assert stats.whiten
    tokens = np.random.default_rng(2).normal(size=(40, 12)).astype(np.float32)
    redi = ((tokens - mean) / std - pca.mean_) @ pca.components_[:4].T   # train_redi.py's formula
    ours = project(stats, tokens, 4)
    np.testing.assert_allclose(ours, redi, rtol=1e-4, atol=1e-4)
    assert np.abs(ours - pca.transform((tokens - mean) / std)[:, :4]).max() > 0.1


def test_fewer_components_than_the_projector_needs_is_a_clear_error(tmp_path):
    path = tmp_path / "small.pth"
    write_calc_pca_file(path, n_components=3)
    with pytest.raises(ValueError, match="3 principal components.*dim=4"):
        FeatureProjector(ProjectorConfig(mode="pca", feature_dim=12, dim=4), load_redi_pca(path))
    with pytest.raises(TypeError, match="fixed"):
        load_redi_pca(path).update(torch.zeros(2, 12))


# ---------------------------------------------------------------------------------------------- (b) ReDi's real file

@pytest.mark.skipif(not REAL_FILE.is_file(), reason=f"ReDi's dino_pca_model.pth is not at {REAL_FILE}")
def test_redis_published_file():
    stored = read_redi_pca(REAL_FILE)
    assert stored.mean.shape == stored.std.shape == stored.pca_mean.shape == (768,)
    assert stored.components.shape == (768, 768) and not stored.whiten
    assert (stored.std > 0).all()
    np.testing.assert_allclose(stored.components @ stored.components.T, np.eye(768), atol=1e-4)
    # Read the same file independently (it is ReDi's own artefact: trusted here, so a plain unpickling is fine).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn warns that the file was pickled by its version 1.6.0
        reference = torch.load(REAL_FILE, weights_only=False)
    pca = reference["pca_model"]
    assert np.array_equal(stored.components, pca.components_.astype(np.float64))
    tokens = (np.random.default_rng(3).normal(size=(256, 768)) * 1.5).astype(np.float32)
    standardized = (tokens - reference["mean"]) / reference["std"]
    formula = (standardized - pca.mean_) @ pca.components_[:8].T       # pca.transform, written with numpy
    ours = project(load_redi_pca(REAL_FILE), tokens, 8)
    np.testing.assert_allclose(ours, formula, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours, pca.transform(standardized)[:, :8], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- (c) safety

class RunsCode:
    """Unpickling this runs os.system (the classic malicious pickle)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_pickle_that_runs_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"pca_model": RunsCode(f"touch {marker}"), "mean": np.zeros(3, np.float32),
                "std": np.ones(3, np.float32)}, path)
    with pytest.raises(ValueError, match=r"evil\.pth: refused to load: it asks for (posix|nt|os)\.system"):
        load_redi_pca(path)
    assert not marker.exists()


def test_other_foreign_content_is_refused(tmp_path):
    tensors = tmp_path / "tensors.pth"
    torch.save({"pca_model": None, "mean": torch.zeros(3), "std": torch.ones(3)}, tensors)
    with pytest.raises(ValueError, match="refused to load: it asks for torch._utils._rebuild_tensor"):
        read_redi_pca(tensors)
    text = tmp_path / "notes.pth"
    text.write_text("not a zip")
    with pytest.raises(ValueError, match="not a torch.save zip archive"):
        read_redi_pca(text)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        read_redi_pca(tmp_path / "missing.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"mean": np.zeros(3, np.float32)}, wrong)
    with pytest.raises(ValueError, match="keys"):
        read_redi_pca(wrong)


def test_loading_never_imports_sklearn(tmp_path):
    path = tmp_path / "dino_pca_model.pth"
    write_calc_pca_file(path)
    code = ("import sys; from coredi_fast.method import load_redi_pca; s = load_redi_pca(sys.argv[1]); "
            "assert 'sklearn' not in sys.modules, 'sklearn was imported'; print(type(s).__name__)")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "FixedFeatureStatistics"


# ---------------------------------------------------------------------------------------------- config key

def test_config_key_and_its_errors(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(ValueError, match=f"encoder.pca_file: file not found: {missing}"):
        load_config(overrides=[f"encoder.pca_file={missing}"])
    path = tmp_path / "dino_pca_model.pth"
    write_calc_pca_file(path)
    cfg = load_config(overrides=[f"encoder.pca_file={path}"])
    assert cfg.encoder.pca_file == str(path)
    with pytest.raises(ValueError, match="encoder.pca_file and encoder.statistics"):
        load_config(overrides=[f"encoder.pca_file={path}", f"encoder.statistics={path}"])
    with pytest.raises(ValueError, match="encoder.pca_file needs feature channels"):
        load_config(overrides=[f"encoder.pca_file={path}", "method.projector.mode=none"])


def test_preflight_reads_the_file_and_checks_its_widths(tmp_path):
    path = tmp_path / "dino_pca_model.pth"
    write_calc_pca_file(path)                                # 12-d; the demo's projector takes 64-d tokens
    with pytest.raises(ValueError, match="encoder.pca_file: .* holds 12-d statistics but method.projector."
                                         "feature_dim=64"):
        preflight(load_config(overrides=[f"encoder.pca_file={path}"]))
    evil = tmp_path / "evil.pth"
    torch.save({"pca_model": RunsCode(f"touch {tmp_path / 'ran'}")}, evil)
    with pytest.raises(ValueError, match="encoder.pca_file: .*refused to load"):
        preflight(load_config(overrides=[f"encoder.pca_file={evil}"]))
    assert not (tmp_path / "ran").exists()


def test_training_uses_the_file_instead_of_computing_statistics(tmp_path):
    """A 2-step demo run with ReDi's fixed PCA from a calc_pca-layout file of the digits encoder's width (64): the
    checkpoint's projector holds the file's values and no statistics were computed."""
    path = tmp_path / "dino_pca_model.pth"
    pca, mean, std = write_calc_pca_file(path, n_tokens=400, dim=64)
    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)
    args = [sys.executable, "train.py", f"run.out_dir={out}", "model.name=SiT-Micro/2", "data.global_batch_size=8",
            "run.precision=fp32", "run.steps=2", "sample.every=0", "run.feature_vis_every=0", "run.ckpt_every=0",
            "run.tensorboard=false", "method.projector.mode=pca", f"encoder.pca_file={path}"]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ReDi PCA file" in proc.stdout and not (out / "feature_stats.pt").exists()
    folder = out / "checkpoints"
    state = torch.load(folder / (folder / "latest.txt").read_text().strip(), weights_only=True)["projector"]
    assert torch.equal(state["feature_mean"], torch.from_numpy(mean))
    assert torch.equal(state["feature_std"], torch.from_numpy(std))
    assert torch.equal(state["pca_mean"], torch.from_numpy(pca.mean_))
    assert torch.equal(state["pca_components"], torch.from_numpy(pca.components_[:4]))
