"""The CPU study: its independent judge, FD_cls, the statistics of the report, and the quick study end to end."""
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import linalg, stats

from coredi_fast.data import DigitsDataset
from coredi_fast.evaluation.metrics import frechet_distance
from coredi_fast.study import MAIN_VARIANT_NAMES, ClassifierJudge, StudyConfig, get_variants, load_digits_classifier
from coredi_fast.study.classifier import DEFAULT_WEIGHTS
from coredi_fast.study.report import mean_std, paired, steps_to_reach, value_at_step
from coredi_fast.study.runner import load_run, run_one, run_path, study_data
from coredi_fast.study.variants import pca_channel_scale


def _split(split):
    ds = DigitsDataset(image_size=16, channels=1, split=split)
    return torch.from_numpy(np.stack([ds.read(i).image for i in range(len(ds))])), torch.from_numpy(ds.labels())


# ---------------------------------------------------------------------------------------------- the judge

def test_shipped_classifier_reads_the_train_split_it_never_saw():
    classifier = load_digits_classifier()
    images, labels = _split("train")  # the judge was fit on the held-out split only
    with torch.no_grad():
        predicted = classifier(images.float() / 127.5 - 1.0).argmax(1)
    accuracy = (predicted == labels).float().mean().item()
    assert accuracy > 0.97, accuracy
    assert not classifier.training and not any(p.requires_grad for p in classifier.parameters())
    assert DEFAULT_WEIGHTS.endswith("digits_classifier.pt")


def test_missing_or_foreign_classifier_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_digits_classifier(str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="bad.pt"):
        load_digits_classifier(str(bad))


def _features_by_hand(classifier, images):
    """The CNN's penultimate (pre-ReLU) features recomputed with functional ops from its weights."""
    conv1, conv2, conv3, linear = [m for m in classifier.trunk if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    x = images.double() / 127.5 - 1.0
    x = F.relu(F.conv2d(x, conv1.weight.double(), conv1.bias.double(), padding=1))
    x = F.relu(F.conv2d(x, conv2.weight.double(), conv2.bias.double(), padding=1))
    x = F.max_pool2d(x, 2)
    x = F.max_pool2d(F.relu(F.conv2d(x, conv3.weight.double(), conv3.bias.double(), padding=1)), 2)
    return (x.flatten(1) @ linear.weight.double().T + linear.bias.double()).numpy()


def test_fd_cls_is_small_for_real_vs_real_large_for_noise_and_matches_a_hand_computation():
    images, labels = _split("train")
    judge = ClassifierJudge(images[0::2])
    other_half = images[1::2]
    real = judge.fd(other_half)
    noise = judge.fd(torch.randint(0, 256, other_half.shape, generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8))
    assert real < 4.0, real
    assert noise > 50 * real, (noise, real)

    # Same number from features computed by hand, float64 statistics and scipy's sqrtm written out here.
    a, b = _features_by_hand(judge.classifier, images[0::2]), _features_by_hand(judge.classifier, other_half)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = (a - mu_a).T @ (a - mu_a) / (len(a) - 1)
    cov_b = (b - mu_b).T @ (b - mu_b) / (len(b) - 1)
    root = linalg.sqrtm(cov_b @ cov_a)
    by_hand = float(((mu_b - mu_a) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root.real))
    assert real == pytest.approx(by_hand, rel=1e-4, abs=1e-4)
    assert real == pytest.approx(frechet_distance(mu_b, cov_b, mu_a, cov_a), rel=1e-4, abs=1e-4)

    scores = judge.evaluate(other_half, labels[1::2])
    assert scores.fd == pytest.approx(real, rel=1e-9)
    predicted = judge.classifier(other_half.float() / 127.5 - 1.0).argmax(1)
    assert scores.accuracy == pytest.approx((predicted == labels[1::2]).double().mean().item())
    assert scores.precision > 0.85 and scores.recall > 0.85  # two halves of one data set share their manifold
    with pytest.raises(ValueError, match="labels"):
        judge.evaluate(other_half, labels[:3])


# ---------------------------------------------------------------------------------------------- variants, statistics

def test_variants_build_their_projector_configs_and_unknown_names_are_named():
    data = study_data()
    for variant in get_variants():
        config = variant.projector_config(data.feature_dim, 4, data.statistics)
        assert config.channels == (0 if variant.name in ("sit", "jit") else 4)
    by_name = {v.name: v.projector_config(data.feature_dim, 4, data.statistics) for v in get_variants()}
    assert by_name["redi"].mode == "pca" and by_name["redi"].norm == "none"
    assert (by_name["coredi"].mode, by_name["coredi"].init, by_name["coredi"].norm, by_name["coredi"].stop_gradient,
            by_name["coredi"].regularizer) == ("learned", "pca", "batchnorm", True, "ortho")
    assert not by_name["coredi-no-sg"].stop_gradient and by_name["coredi-no-sg"].norm == "batchnorm"
    with pytest.raises(ValueError, match="bogus"):
        get_variants(["coredi", "bogus"])

    # ReDi's channel scale: sqrt of the mean of the top-4 eigenvalues of the tokens' correlation matrix (numpy).
    tokens = data.features.reshape(-1, data.feature_dim).double().numpy()
    correlation = np.corrcoef(tokens, rowvar=False)
    top = np.sort(np.linalg.eigvalsh(correlation))[::-1][:4]
    assert pca_channel_scale(data.statistics, 4) == pytest.approx(math.sqrt(top.mean()), rel=1e-6)
    assert by_name["coredi-scaled"].feature_scale == pytest.approx(math.sqrt(top.mean()), rel=1e-6)


def test_paired_comparison_matches_a_t_test_written_out():
    a = {0: 10.0, 1: 12.5, 2: 9.0, 3: 11.0}
    b = {0: 11.0, 1: 12.0, 2: 10.5, 3: 13.0, 9: 1.0}  # seed 9 has no partner: ignored
    result = paired(a, b)
    diffs = np.array([-1.0, 0.5, -1.5, -2.0])
    sem = diffs.std(ddof=1) / 2.0
    t_stat = diffs.mean() / sem
    assert result["n"] == 4 and result["wins_a"] == 3
    assert result["mean"] == pytest.approx(-1.0)
    assert result["p_value"] == pytest.approx(2 * stats.t.sf(abs(t_stat), 3))
    half = stats.t.ppf(0.975, 3) * sem
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((-1.0 - half, -1.0 + half))
    assert mean_std([1.0, 2.0, 3.0, float("nan")]) == pytest.approx((2.0, 1.0))


def test_curve_interpolation_helpers():
    steps, curve = [100, 200, 300], [50.0, 30.0, 20.0]
    assert steps_to_reach(steps, curve, 40.0) == pytest.approx(150.0)
    assert steps_to_reach(steps, curve, 60.0) == 100.0
    assert steps_to_reach(steps, curve, 10.0) is None
    assert value_at_step(steps, curve, 250) == pytest.approx(25.0)
    assert math.isnan(value_at_step(steps, curve, 50))


def test_study_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="eval_steps"):
        StudyConfig(steps=100, eval_steps=(50, 90))
    with pytest.raises(ValueError, match="num_samples"):
        StudyConfig(num_samples=10)
    with pytest.raises(ValueError, match="sampler_method"):
        StudyConfig(sampler_method="rk4")


# ---------------------------------------------------------------------------------------------- runs

def test_runs_are_deterministic_and_the_cache_checks_the_settings(tmp_path):
    config = replace(StudyConfig.quick(), steps=4, eval_steps=(4,))
    coredi = get_variants(["coredi"])[0]
    first, second = run_one(coredi, 3, config), run_one(coredi, 3, config)
    assert first["curve"] == second["curve"]
    other_seed = run_one(coredi, 4, config)
    assert other_seed["curve"][0]["fd"] != first["curve"][0]["fd"]

    path = run_path(tmp_path, "coredi", 3)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(first))
    assert load_run(tmp_path, "coredi", 3, config)["curve"] == first["curve"]
    assert load_run(tmp_path, "coredi", 3, replace(config, lr=1e-4)) is None  # other settings: rerun


def test_pixel_variants_diffuse_patchified_pixels_with_features_on_the_encoder_grid():
    """The JiT rows: 2x2 patches folded into channels (checked against an explicit reshape), an 8x8 token grid that
    is the encoder's own grid (features join without resizing), x-prediction; samples decode to 16x16 digits."""
    from coredi_fast.study.runner import _build

    data = study_data()
    config = replace(StudyConfig.quick(), steps=2, eval_steps=(2,), num_samples=20)
    setup = _build(get_variants(["jit-coredi"])[0], config, data)
    n = len(data.pixels)
    by_hand = data.pixels.reshape(n, 1, 8, 2, 8, 2).permute(0, 1, 3, 5, 2, 4).reshape(n, 4, 8, 8)
    assert torch.equal(setup.inputs, by_hand)
    assert setup.prediction == "x" and setup.patch == 2 and data.num_tokens == 8 * 8
    assert setup.objective.config.prediction == "x" and setup.objective.config.time_sampling == "logit_normal"
    # Features on the token grid: the resize is the identity, so the target is the projection itself.
    projected = setup.objective.projector(data.features[:3]).z                     # (3, 64, d)
    from coredi_fast.method.feature_grid import tokens_to_grid

    grid = tokens_to_grid(projected, setup.objective.config.image_size)
    assert torch.equal(grid, projected.transpose(1, 2).reshape(3, -1, 8, 8))
    run = run_one(get_variants(["jit-coredi"])[0], 0, config)
    images = [np.frombuffer(bytes.fromhex(h), dtype=np.uint8) for h in run["samples"]]
    assert len(images) == 20 and all(im.size == 16 * 16 for im in images)
    assert run["curve"][-1]["effective_rank"] > 1.0


def test_without_stop_gradient_or_guards_the_features_shrink_and_coredi_keeps_them():
    """The naive learned projection (no stop-gradient, no norm, no regularizer) cuts its feature loss by shrinking
    the features; CoReDi's default keeps the PCA init's spread (BatchNorm + stop-gradient + ortho)."""
    config = replace(StudyConfig.quick(), steps=80, eval_steps=(80,))
    naive, coredi = (run_one(v, 0, config)["curve"][-1] for v in get_variants(["naive", "coredi"]))
    initial = pca_channel_scale(study_data().statistics, 4)
    assert naive["prenorm_std_mean"] < 0.6 * coredi["prenorm_std_mean"], (naive, coredi)
    assert coredi["prenorm_std_mean"] == pytest.approx(initial, rel=0.1)
    assert coredi["effective_rank"] > 3.5  # of d = 4


def test_quick_study_writes_every_variant_and_resumes(tmp_path, capsys):
    from coredi_fast.study.cli import main

    out = tmp_path / "study"
    first = main(["--out", str(out), "--quick", "--groups", "main"])
    log = capsys.readouterr().out
    assert f"{len(MAIN_VARIANT_NAMES)} to do" in log

    payload = json.loads((out / "results.json").read_text())
    summary = payload["summary"]
    assert summary["variants"] == list(MAIN_VARIANT_NAMES)
    assert payload["groups"] == {}  # only the main group has runs
    markdown = (out / "results.md").read_text()
    for name in MAIN_VARIANT_NAMES:
        run = json.loads(run_path(out, name, 0).read_text())
        row = summary["rows"][name]
        assert row["final"]["fd"][0] == pytest.approx(run["curve"][-1]["fd"])  # one seed: the mean is the run
        assert f"| `{name}` " in markdown
    assert (out / "convergence.png").stat().st_size > 10_000 and (out / "samples.png").stat().st_size > 10_000
    assert set(summary["comparisons"]) >= {"coredi vs redi", "coredi vs sit"}
    coredi, redi = (json.loads(run_path(out, n, 0).read_text())["curve"][-1]["fd"] for n in ("coredi", "redi"))
    assert summary["comparisons"]["coredi vs redi"]["final_fd"]["mean"] == pytest.approx(coredi - redi)

    second = main(["--out", str(out), "--quick", "--groups", "main"])  # everything cached: nothing is trained again
    assert f"{len(MAIN_VARIANT_NAMES)} cached" in capsys.readouterr().out
    assert second["summary"]["rows"]["coredi"]["final"]["fd"][0] == first["summary"]["rows"]["coredi"]["final"]["fd"][0]
