"""The study's extension (issue #16): unconditional runs, Representation Guidance rows, the SiT-Tiny/2 groups,
class-coverage statistics, the cache restored from results.json, the wall-time estimate and the report across
groups."""
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from coredi_fast.study import StudyConfig, get_group, get_variants
from coredi_fast.study.cache import cached_runs, load_run, restore_from_results, run_path
from coredi_fast.study.spread import class_counts, class_spread, expected_uniform_kl
from coredi_fast.study.variants import Variant

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- class spread

def test_class_spread_matches_the_formulas_and_scipy():
    counts = [100, 50, 0, 30, 20, 40, 60, 40, 30, 30]
    n, k = sum(counts), len(counts)
    p = np.array(counts, dtype=np.float64) / n
    spread = class_spread(counts)
    assert spread["class_min"] == 0.0 and spread["class_max"] == pytest.approx(100 / n)
    # KL(p || uniform) = sum p log(K p) = log K - H(p); scipy's relative entropy is a second implementation.
    assert spread["class_kl"] == pytest.approx(stats.entropy(p, np.full(k, 1 / k)), rel=1e-12)
    assert spread["class_kl"] == pytest.approx(math.log(k) - stats.entropy(p), rel=1e-12)
    assert spread["class_entropy"] == pytest.approx(stats.entropy(p) / math.log(k), rel=1e-12)
    chi2, p_value = stats.chisquare(counts)
    assert spread["class_chi2"] == pytest.approx(chi2, rel=1e-12)
    assert spread["class_chi2_p"] == pytest.approx(p_value, rel=1e-9)

    even = class_spread([40] * 10)
    assert (even["class_kl"], even["class_chi2"], even["class_chi2_p"], even["class_entropy"]) == (0, 0, 1, 1)
    one_class = class_spread([400] + [0] * 9)
    assert one_class["class_kl"] == pytest.approx(math.log(10)) and one_class["class_entropy"] == pytest.approx(0)

    # The finite-sample floor: the mean KL of many uniform multinomial draws is close to (K - 1) / (2N).
    rng = np.random.default_rng(0)
    draws = [class_spread(rng.multinomial(400, [0.1] * 10))["class_kl"] for _ in range(2000)]
    assert np.mean(draws) == pytest.approx(expected_uniform_kl(400, 10), rel=0.1)

    predicted = torch.tensor([3, 3, 0, 9, 3])
    assert class_counts(predicted, 10) == np.bincount(predicted.numpy(), minlength=10).tolist()
    with pytest.raises(ValueError, match="predicted"):
        class_counts(torch.tensor([0, 10]), 10)
    with pytest.raises(ValueError, match="counts"):
        class_spread([0] * 10)


def test_judge_counts_classes_and_has_no_accuracy_for_unconditional_samples():
    from coredi_fast.study.runner import study_data

    judge = study_data().judge
    images = study_data().images[:200]
    scores = judge.evaluate(images)
    assert math.isnan(scores.accuracy)
    assert list(scores.class_counts) == np.bincount(judge.predict(images).numpy(), minlength=10).tolist()
    assert sum(scores.class_counts) == 200
    labelled = judge.evaluate(images, study_data().labels[:200])
    assert labelled.fd == scores.fd and labelled.class_counts == scores.class_counts and labelled.accuracy > 0.95


# ---------------------------------------------------------------------------------------------- settings, cache

def test_the_original_study_keeps_its_fingerprint_and_new_settings_get_their_own():
    stored = json.loads((REPO / "docs" / "study" / "results.json").read_text())
    uncond = replace(StudyConfig(), conditional=False)
    # The committed runs: the original (main) runs have no group and keep the original fingerprint; every other
    # group's runs carry their own group's settings fingerprint.
    main_runs = [run for run in stored["runs"] if "group" not in run]
    assert len(main_runs) == 67 and {run["fingerprint"] for run in main_runs} == {StudyConfig().fingerprint()}
    for run in stored["runs"]:
        if "group" in run:
            assert run["fingerprint"] == get_group(run["group"]).config(StudyConfig()).fingerprint(), run["group"]
    tiny = get_group("tiny-cond").config(StudyConfig())
    fingerprints = {StudyConfig().fingerprint(), uncond.fingerprint(), tiny.fingerprint(),
                    get_group("tiny-uncond").config(StudyConfig()).fingerprint()}
    assert len(fingerprints) == 4
    assert get_group("rg").config(StudyConfig()).fingerprint() == StudyConfig().fingerprint()  # same setting
    assert get_group("uncond").config(StudyConfig()) == uncond and tiny.model == "SiT-Tiny/2"
    with pytest.raises(ValueError, match="class_dropout"):
        StudyConfig(conditional=False, class_dropout=0.0)
    with pytest.raises(ValueError, match="conditional"):
        StudyConfig(conditional="no")
    with pytest.raises(ValueError, match="unknown group"):
        get_group("bogus")


def test_rg_variant_needs_feature_dropout():
    coredi_fd = get_variants(["coredi-fd0.2"])[0]
    assert coredi_fd.projector["feature_dropout"] == 0.2 and coredi_fd.rg_scales == (1.1, 1.5)
    with pytest.raises(ValueError, match="feature dropout"):
        Variant("x", "x", "rg", {"mode": "learned"}, rg_scales=(1.5,))
    with pytest.raises(ValueError, match="not 1"):
        Variant("x", "x", "rg", {"mode": "learned", "feature_dropout": 0.2}, rg_scales=(1.0,))


def test_run_ids_of_new_groups_do_not_collide_and_the_cache_is_restored_from_results_json(tmp_path):
    assert run_path(tmp_path, "coredi", 3) == tmp_path / "runs" / "coredi__seed3.json"  # the original ids
    assert run_path(tmp_path, "coredi", 3, "uncond") == tmp_path / "runs" / "uncond" / "coredi__seed3.json"
    config = StudyConfig()
    old = {"variant": "coredi", "seed": 3, "fingerprint": config.fingerprint(), "curve": [{"step": 1000, "fd": 5.0}],
           "diverged": None, "step_seconds": 0.05, "wall_seconds": 60.0}  # as results.json stores it (no group)
    uncond_config = replace(config, conditional=False)
    new = dict(old, group="uncond", fingerprint=uncond_config.fingerprint(), curve=[{"step": 1000, "fd": 7.0}])
    (tmp_path / "results.json").write_text(json.dumps({"runs": [old, new]}))
    kept = run_path(tmp_path, "sit", 0)
    kept.parent.mkdir(parents=True)
    kept.write_text("{}")
    assert restore_from_results(tmp_path) == 2
    assert restore_from_results(tmp_path) == 0  # nothing is written twice, nothing overwritten
    assert kept.read_text() == "{}"
    assert load_run(tmp_path, "coredi", 3, config)["curve"] == old["curve"]
    assert load_run(tmp_path, "coredi", 3, uncond_config, "uncond")["curve"] == new["curve"]
    assert load_run(tmp_path, "coredi", 3, uncond_config) is None  # the main group's settings differ
    assert [r["curve"] for r in cached_runs(tmp_path, "uncond", uncond_config)] == [new["curve"]]
    spec = get_variants(["coredi"])[0].spec()
    path = run_path(tmp_path, "coredi", 3, "uncond")
    path.write_text(json.dumps(dict(new, variant_spec=dict(spec, feature_weight=0.5))))
    assert load_run(tmp_path, "coredi", 3, uncond_config, "uncond", spec) is None  # a changed variant: retrain


# ---------------------------------------------------------------------------------------------- training, sampling

def _label_spy(model):
    """Records the label-table rows the model looks up (after label dropout)."""
    seen = []
    model.y_embedder.embedding_table.register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))
    return seen


def test_unconditional_training_gives_every_sample_the_null_class_and_keeps_the_conditional_draws():
    from coredi_fast.study.runner import NUM_CLASSES, _build, _optimizer, _train_step, study_data
    from coredi_fast.training.ema import EMA

    data = study_data()
    variant = get_variants(["coredi"])[0]
    inputs = {}
    for conditional in (True, False):
        config = replace(StudyConfig.quick(), conditional=conditional)
        torch.manual_seed(0)
        setup = _build(variant, config, data)
        seen = _label_spy(setup.model)
        captured = []
        setup.model.register_forward_pre_hook(lambda module, args: captured.append((args[0].clone(), args[1].clone())))
        idx = torch.arange(config.batch_size)
        _train_step(setup, _optimizer(setup.model, setup.objective, config), EMA(setup.model), config, data, idx, 0, 0)
        inputs[conditional] = captured[0]
        if conditional:
            kept = seen[0] != NUM_CLASSES
            assert kept.any() and torch.equal(seen[0][kept], data.labels[idx][kept])
        else:
            assert torch.equal(seen[0], torch.full((config.batch_size,), NUM_CLASSES))
    # Same weights, batch, times and noise: the model input (x_t, z_t) and t are identical, only labels differ.
    assert torch.equal(inputs[True][0], inputs[False][0]) and torch.equal(inputs[True][1], inputs[False][1])


def test_unconditional_sampling_uses_the_null_class_without_guidance_and_the_same_noise():
    from coredi_fast.study.runner import NUM_CLASSES, _build, _evaluate, study_data

    data = study_data()
    config = replace(StudyConfig.quick(), conditional=False, num_samples=20)
    setup = _build(get_variants(["coredi"])[0], config, data)
    model = setup.make_model().eval()
    seen = _label_spy(model)
    scores, images = _evaluate(model, setup, config, data)
    assert seen and all(torch.equal(s, torch.full_like(s, NUM_CLASSES)) for s in seen)
    assert all(s.shape[0] == 20 for s in seen)  # one pass of the batch per step: no guidance branch
    assert "accuracy" not in scores and sum(scores["class_counts"]) == 20
    assert scores["class_kl"] == pytest.approx(class_spread(scores["class_counts"])["class_kl"])
    conditional, _ = _evaluate(model, setup, replace(config, conditional=True), data)
    assert "accuracy" in conditional


def test_rg_evaluation_judges_the_same_checkpoint_and_leaves_the_unguided_numbers_alone(monkeypatch):
    from coredi_fast.study import runner

    config = replace(StudyConfig.quick(), steps=4, eval_steps=(2, 4), num_samples=20)
    variant = get_variants(["coredi-fd0.2"])[0]
    unguided_only = runner.run_one(replace(variant, rg_scales=()), 0, config)

    calls = []
    evaluate = runner._evaluate

    def spy(model_ema, setup, cfg, data, rg_scale=None):
        state = torch.cat([p.detach().flatten().clone() for p in model_ema.state_dict().values()
                           if p.dtype.is_floating_point])
        calls.append((rg_scale, id(model_ema), state))
        return evaluate(model_ema, setup, cfg, data, rg_scale=rg_scale)

    monkeypatch.setattr(runner, "_evaluate", spy)
    run = runner.run_one(variant, 0, config)
    assert [c[0] for c in calls] == [None, 1.1, 1.5] * 2
    for checkpoint in range(2):
        group = calls[3 * checkpoint: 3 * checkpoint + 3]
        assert len({c[1] for c in group}) == 1  # one model object
        assert all(torch.equal(group[0][2], c[2]) for c in group)  # with the same weights
    assert not torch.equal(calls[0][2], calls[3][2])  # the second checkpoint has trained further
    for guided, plain in zip(run["curve"], unguided_only["curve"]):
        assert set(guided["rg"]) == {"1.1", "1.5"}
        assert {k: v for k, v in guided.items() if k != "rg"} == plain  # RG sampling changes no unguided number
        assert guided["rg"]["1.5"]["fd"] != plain["fd"]
    assert set(run["samples_rg"]) == {"1.1", "1.5"} and len(run["samples_rg"]["1.5"]) == 20


# ---------------------------------------------------------------------------------------------- estimate

def test_estimate_uses_cached_costs_calibrates_other_models_and_schedules_in_order():
    from coredi_fast.study.estimate import RunCost, costs_from_runs, estimate, run_seconds, schedule
    from coredi_fast.study.runner import Job

    config = StudyConfig()
    run = {"variant": "sit", "seed": 0, "step_seconds": 0.05, "wall_seconds": 1000 * 0.05 + 4 * 3.0,
           "curve": [{"step": s} for s in config.eval_steps]}  # recorded before eval_seconds existed
    known = costs_from_runs([(config, run), (config, dict(run, step_seconds=0.07, wall_seconds=70 + 8.0,
                                                          eval_seconds=8.0))])
    sit = [c for (model, variant, _), c in known.items() if variant == "sit"][0]
    assert sit.step_seconds == pytest.approx(0.06) and sit.eval_seconds == pytest.approx((3.0 + 2.0) / 2)
    assert run_seconds(RunCost(0.06, 2.5, ""), config) == pytest.approx(60 + 4 * 2.5)
    assert run_seconds(RunCost(0.06, 2.5, ""), config, (1.1, 1.5)) == pytest.approx(60 + 4 * 2.5 * 5)
    assert schedule([3, 3, 3], 2) == 6 and schedule([5, 1, 1, 1], 2) == 5 and schedule([], 2) == 0

    tiny = get_group("tiny-cond").config(config)
    probes = []
    jobs = [Job("uncond", "sit", s, replace(config, conditional=False)) for s in range(3)]
    jobs += [Job("tiny-cond", "coredi", 0, tiny)]
    est = estimate(jobs, known, workers=2, probe=lambda *a: probes.append(a),
                   probe_ratio_fn=lambda variant, cfg, reference: (5.0, 4.0))
    assert not probes  # everything came from the cache or the calibrated ratio
    micro = 1000 * 0.06 + 4 * 2.5
    assert est.groups["uncond"] == (3, pytest.approx(2 * micro))
    tiny_run = 1000 * 0.06 * 5.0 + 4 * 2.5 * 4.0  # coredi falls back to the sit family's cost, scaled
    assert est.groups["tiny-cond"] == (1, pytest.approx(tiny_run))
    assert est.total_seconds == pytest.approx(schedule([micro] * 3 + [tiny_run], 2))
    alone = estimate([Job("tiny-cond", "sit", 0, tiny)], {}, workers=2, probe=lambda v, c: RunCost(1.0, 1.0, "p"))
    assert alone.total_seconds == pytest.approx(1000 + 4)


# ---------------------------------------------------------------------------------------------- report

def _fake_run(group, variant, seed, fd, conditional=True, rg=None, steps=(6, 12)):
    counts = [4] * 10 if conditional else [10, 6, 4, 4, 4, 4, 2, 2, 2, 2]
    curve = []
    for step, value in zip(steps, fd):
        point = {"step": step, "fd": value, "precision": 0.5, "recall": 0.4 + 0.01 * seed,
                 "class_counts": counts, **class_spread(counts)}
        if conditional:
            point["accuracy"] = 0.8
        if rg:
            point["rg"] = {scale: {**{k: v for k, v in point.items() if k != "step"}, "fd": value + delta}
                           for scale, delta in rg.items()}
        curve.append(point)
    return {"group": group, "variant": variant, "seed": seed, "curve": curve, "diverged": None, "samples": [],
            "step_seconds": 0.05, "wall_seconds": 1.0}


def test_report_has_every_group_and_the_comparisons_across_them(tmp_path):
    from coredi_fast.study.report_groups import build_section, write_report

    config = StudyConfig.quick()
    timing = {v: {"step_seconds": 0.05, "encoder_seconds": 0.0 if v == "sit" else 0.02}
              for v in ("sit", "redi", "redi-bn", "coredi", "coredi-lr0.1", "coredi-fd0.2")}
    base = {"sit": 20.0, "redi": 100.0, "redi-bn": 40.0, "coredi": 50.0, "coredi-lr0.1": 45.0}
    seeds = (0, 1, 2)

    def runs(group, conditional, shift, names=tuple(base)):
        return [_fake_run(group, v, s, (2 * (base[v] + shift(v) + s), base[v] + shift(v) + s), conditional)
                for v in names for s in seeds]

    def uncond_shift(v):  # without labels: SiT loses 30, the feature variants lose 10
        return 30.0 if v == "sit" else 10.0

    main = runs("main", True, lambda v: 0.0)
    uncond = runs("uncond", False, uncond_shift)
    rg = [_fake_run("rg", "coredi-fd0.2", s, (100.0, 52.0 + s), rg={"1.1": -3.0, "1.5": 1.0}) for s in seeds]
    tiny_fd = {"sit": 5.0, "redi": 28.0, "redi-bn": 11.0, "coredi": 12.0}
    tiny = [_fake_run("tiny-cond", v, s, (2 * tiny_fd[v], tiny_fd[v] + 0.1 * s)) for v in tiny_fd for s in seeds]

    sections = {}
    for name, results in (("main", main), ("uncond", uncond), ("tiny-cond", tiny)):
        group = get_group(name)
        names = [v for v in group.variants if any(r["variant"] == v for r in results)]
        sections[name] = build_section(group, group.config(config), results, timing, get_variants(names))
    rg_group = get_group("rg")
    sections["rg"] = build_section(rg_group, rg_group.config(config),
                                   [r for r in main if r["variant"] in ("sit", "coredi")] + rg, timing,
                                   get_variants(["sit", "coredi", "coredi-fd0.2"]))
    paths = write_report(tmp_path, sections, {"mode": "test"}, {}, [143] * 10)
    markdown = paths["markdown"].read_text()
    payload = json.loads(paths["json"].read_text())

    # Every group's table, with its rows; the unconditional table has coverage but no accuracy column.
    for title in ("Unconditional, SiT-Micro/2 (`uncond`)", "Representation Guidance, class-conditional",
                  "Class-conditional, SiT-Tiny/2 (`tiny-cond`)", "Conditional vs unconditional: uncond vs main",
                  "Model size: tiny-cond vs main"):
        assert title in markdown, title
    uncond_table = markdown.split("(`uncond`)")[1].split("Class distribution")[0]
    assert "accuracy" not in uncond_table and "| `coredi-lr0.1` " in uncond_table
    assert "| `coredi` | 25.0 | 15.0 | 10.0 | 10.0 | 10.0 | 10.0 | 5.0 | 5.0 | 5.0 | 5.0 |" in markdown
    assert "| `coredi-fd0.2+rg1.1` " in markdown and "| `sit`† " in markdown
    assert set(payload["groups"]) == {"uncond", "rg", "tiny-cond"} and payload["summary"]["variants"][0] == "sit"
    assert {r["group"] for r in payload["runs"]} == {"main", "uncond", "rg", "tiny-cond"}
    assert len(payload["runs"]) == len(main) + len(uncond) + len(rg) + len(tiny)  # reference rows not duplicated

    # RG rows: the guided FD at the final checkpoint is the base run's plus the fake delta, paired by seed.
    rg_summary = payload["groups"]["rg"]["summary"]
    assert rg_summary["rows"]["coredi-fd0.2+rg1.1"]["final"]["fd"][0] == pytest.approx(53.0 - 3.0)
    assert rg_summary["comparisons"]["coredi-fd0.2+rg1.1 vs coredi-fd0.2"]["final_fd"]["mean"] == pytest.approx(-3.0)
    assert rg_summary["comparisons"]["coredi-fd0.2 vs coredi"]["final_fd"]["mean"] == pytest.approx(2.0)

    # Conditional vs unconditional: the gap is 30 for SiT and 10 for CoReDi, so gap - SiT's gap is -20 on all seeds.
    gaps = payload["across_groups"]["setting"]["uncond vs main"]
    assert gaps["sit"]["gap"]["mean"] == pytest.approx(30.0) and gaps["coredi"]["gap"]["mean"] == pytest.approx(10.0)
    assert gaps["coredi"]["gap_minus_sit"]["mean"] == pytest.approx(-20.0)
    assert gaps["coredi"]["gap_minus_sit"]["wins_a"] == 3

    # Micro vs Tiny: ranks, ratio to SiT, and the paired change of log(FD / FD_sit) (written out here).
    scale = payload["across_groups"]["scale"]["tiny-cond vs main"]
    assert [scale["rows"][v]["micro_rank"] for v in ("sit", "redi-bn", "coredi", "redi")] == [1, 2, 3, 4]
    assert [scale["rows"][v]["tiny_rank"] for v in ("sit", "redi-bn", "coredi", "redi")] == [1, 2, 3, 4]
    assert scale["same_ranking"] is True
    by_hand = np.mean([math.log((12.0 + 0.1 * s) / (5.0 + 0.1 * s)) - math.log((50.0 + s) / (20.0 + s))
                       for s in seeds])
    assert scale["rows"]["coredi"]["log_ratio_change"]["mean"] == pytest.approx(by_hand)
    assert scale["rows"]["coredi"]["tiny_ratio"] == pytest.approx(12.1 / 5.1)

    for name in ("convergence.png", "convergence_uncond.png", "convergence_rg.png", "convergence_tiny-cond.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
    assert not (tmp_path / "samples_uncond.png").exists()  # no run has samples: no picture


def test_samples_picture_is_kept_when_restored_runs_have_no_samples(tmp_path):
    from coredi_fast.study.report import plot_samples

    pixels = bytes(range(256)).hex()
    runs = [dict(_fake_run("main", "sit", 0, (1.0, 1.0)), samples=[pixels] * 20),
            _fake_run("main", "coredi", 0, (1.0, 1.0))]  # restored from results.json: no samples
    path = tmp_path / "samples.png"
    assert plot_samples(runs, ["sit", "coredi"], path) == path  # no picture yet: draw what there is
    path.write_bytes(b"the committed picture")
    assert plot_samples(runs, ["sit", "coredi"], path) is None
    assert path.read_bytes() == b"the committed picture"
    assert plot_samples(runs, ["sit"], path) == path  # every row has samples: redrawn


# ---------------------------------------------------------------------------------------------- the command

@pytest.mark.slow
def test_quick_study_of_the_new_groups_reports_them_and_resumes(tmp_path, capsys):
    from coredi_fast.study.cli import main

    out = tmp_path / "study"
    args = ["--out", str(out), "--quick", "--groups", "main", "uncond", "rg", "tiny-cond",
            "--variants", "sit", "coredi", "coredi-fd0.2"]
    first = main(args)
    log = capsys.readouterr().out
    assert "7 to do" in log and "estimate: 7 runs" in log
    assert {"main", "uncond", "rg", "tiny-cond"} == set(first["summaries"])
    assert run_path(out, "coredi", 0, "uncond").is_file() and run_path(out, "coredi-fd0.2", 0, "rg").is_file()
    uncond_run = json.loads(run_path(out, "coredi", 0, "uncond").read_text())
    assert uncond_run["config"]["conditional"] is False and "accuracy" not in uncond_run["curve"][-1]
    tiny_run = json.loads(run_path(out, "sit", 0, "tiny-cond").read_text())
    assert tiny_run["config"]["model"] == "SiT-Tiny/2"
    payload = json.loads((out / "results.json").read_text())
    assert "coredi-fd0.2+rg1.1" in payload["groups"]["rg"]["summary"]["rows"]
    assert "uncond vs main" in payload["across_groups"]["setting"]
    for name in ("samples_uncond.png", "samples_rg.png", "convergence_uncond.png", "convergence_tiny-cond.png"):
        assert (out / name).stat().st_size > 5_000, name

    second = main(args)  # everything cached: nothing is trained again, the numbers are the same
    assert "7 cached" in capsys.readouterr().out
    assert second["summaries"]["uncond"]["rows"]["coredi"]["final"] == first["summaries"]["uncond"]["rows"][
        "coredi"]["final"]
