"""Turn the study's runs into numbers a reader can trust: tables, paired tests, the equal-compute view, a plot.

    summary = summarize(results, timing, variants, config)   # one group's numbers (results.json's "summary")
    results_markdown(summary, meta); plot_convergence(summary, path); plot_samples(results, names, path)

Statistics. Each variant has several seeds; tables give mean ± sample std (ddof 1). Comparisons between two
variants are *paired* by seed: the same seed gives both runs the same data order, step noise, evaluation noise and
(for variants with the same channel count, e.g. ReDi vs CoReDi) the same initial weights, so the per-seed difference
removes most of the shared noise. We report the mean difference with a 95% t interval and the paired t-test's
two-sided p-value, plus how many seeds each side wins. With 3-5 seeds only large effects reach significance; a
difference whose interval contains 0 is reported as within noise.

Equal compute. A step costs `step_seconds` (model, projector, regularizer, optimizer, EMA) plus, for variants with
features, `encoder_seconds` to compute the tokens online. The budget is the cheapest variant's full run; every other
variant's FD at that budget is interpolated linearly in step between its checkpoints (NaN before the first one).

Representation Guidance. A run judged with RG at scale w (its curve points carry "rg") becomes one more row,
`<variant>+rg<w>`, with the same seeds, monitors and training cost: only the sampling differs.

This module writes the original (class-conditional SiT-Micro) study's tables and plots; `report_groups.py` writes the
other groups' and the comparisons across groups.
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from .groups import MAIN_PAIRS as PAIRS
from .spread import SPREAD_KEYS
from .variants import Variant, guided_name

METRICS = ("fd", "accuracy", "precision", "recall") + SPREAD_KEYS
MONITORS = ("effective_rank", "z_std_mean", "prenorm_std_mean", "pca_angle_mean_deg")
COMPARED = ("fd", "accuracy", "precision", "recall", "class_kl")  # final-checkpoint metrics of the paired tests
DEFAULT_CHOICES = {  # the ablations that decide each CoReDi default, compared with CoReDi's default run
    "regularizer": ("coredi", "coredi-cov", "coredi-vf", "coredi-no-reg"),
    "init": ("coredi", "coredi-orth-init"),
    "lr_scale": ("coredi", "coredi-lr0.1"),
    "norm": ("coredi", "coredi-no-norm"),
    "stop_gradient": ("coredi", "coredi-no-sg"),
    "feature_scale": ("coredi", "coredi-scaled"),
    "feature_weight": ("coredi", "coredi-lz0.1"),
}


# ================================================================================================ aggregation

def expand_guided(results: Sequence[dict], variants: Sequence[Variant]) -> tuple:
    """(results, variants) with one more run per run judged with Representation Guidance at a scale w: variant
    `<name>+rg<w>`, its curve the RG scores at the same checkpoints (monitors and losses unchanged: the same
    weights), its samples the RG samples. Each guided variant follows its base variant."""
    expanded, scales_of = [], {}
    for run in results:
        expanded.append(run)
        for scale in run["curve"][0].get("rg", {}) if run["curve"] else {}:
            known = scales_of.setdefault(run["variant"], [])
            if scale not in known:
                known.append(scale)
            curve = [{**{k: v for k, v in point.items() if k != "rg"}, **point["rg"][scale]} for point in run["curve"]]
            expanded.append({**run, "variant": guided_name(run["variant"], float(scale)), "curve": curve,
                             "samples": run.get("samples_rg", {}).get(scale, []), "guided_from": run["variant"]})
    out_variants = []
    for variant in variants:
        out_variants.append(variant)
        for scale in scales_of.get(variant.name, []):
            out_variants.append(replace(variant, name=guided_name(variant.name, float(scale)), rg_scales=(),
                                        label=f"{variant.label}, sampled with RG w = {scale}"))
    return expanded, out_variants


def collect(results: Sequence[dict], steps: Sequence[int]) -> Dict[str, dict]:
    """{variant: {"seeds": [...], metric: array (seeds, len(steps)), "class_counts": array (seeds, K) of the final
    checkpoint}} for every metric and monitor; NaN where a run has no point (diverged, a monitor the variant lacks,
    or a run made before the statistic existed)."""
    by_variant: Dict[str, dict] = {}
    index = {s: i for i, s in enumerate(steps)}
    for run in results:
        entry = by_variant.setdefault(run["variant"], {"seeds": [], "rows": [], "counts": []})
        row = {key: np.full(len(steps), np.nan) for key in METRICS + MONITORS}
        counts = None
        for point in run["curve"]:
            if point["step"] in index:
                for key in row:
                    if key in point and point[key] is not None:
                        row[key][index[point["step"]]] = point[key]
                if point["step"] == steps[-1] and point.get("class_counts"):
                    counts = np.asarray(point["class_counts"], dtype=np.float64)
        entry["seeds"].append(run["seed"])
        entry["rows"].append(row)
        entry["counts"].append(counts)
    collected = {}
    for name, entry in by_variant.items():
        order = np.argsort(entry["seeds"])
        collected[name] = {"seeds": [entry["seeds"][i] for i in order]}
        for key in METRICS + MONITORS:
            collected[name][key] = np.stack([entry["rows"][i][key] for i in order])
        width = max((len(c) for c in entry["counts"] if c is not None), default=0)
        collected[name]["class_counts"] = np.stack(
            [entry["counts"][i] if entry["counts"][i] is not None else np.full(width, np.nan) for i in order])
    return collected


def mean_std(values) -> tuple:
    """(mean, sample std) over the finite entries; std is NaN with fewer than 2, both NaN with none."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else math.nan


def paired(a: Dict[int, float], b: Dict[int, float]) -> dict:
    """Paired comparison of a - b over the seeds both have (lower FD is better, so a negative mean favours a).

    Returns n, mean, 95% t interval (ci_low, ci_high), two-sided paired t-test p-value, wins_a (seeds where a < b),
    and the per-seed differences."""
    from scipy import stats

    seeds = sorted(s for s in set(a) & set(b) if np.isfinite(a[s]) and np.isfinite(b[s]))
    diffs = np.array([a[s] - b[s] for s in seeds], dtype=np.float64)
    result = {"n": len(seeds), "seeds": seeds, "diffs": diffs.tolist(), "mean": math.nan, "ci_low": math.nan,
              "ci_high": math.nan, "p_value": math.nan, "wins_a": int((diffs < 0).sum())}
    if len(seeds) == 0:
        return result
    result["mean"] = float(diffs.mean())
    if len(seeds) >= 2:
        sem = diffs.std(ddof=1) / math.sqrt(len(seeds))
        half = float(stats.t.ppf(0.975, len(seeds) - 1) * sem)
        result["ci_low"], result["ci_high"] = result["mean"] - half, result["mean"] + half
        result["p_value"] = float(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue) \
            if sem > 0 else (0.0 if result["mean"] != 0 else 1.0)
    return result


def steps_to_reach(steps: Sequence[int], curve: Sequence[float], target: float) -> Optional[float]:
    """First step at which the piecewise-linear `curve` (values at `steps`) is <= target; None if never.
    Before the first checkpoint nothing is known, so a curve already below target there gives steps[0]."""
    curve = np.asarray(curve, dtype=np.float64)
    if not np.isfinite(target) or not np.isfinite(curve).any():
        return None
    if curve[0] <= target:
        return float(steps[0])
    for i in range(1, len(steps)):
        if curve[i] <= target:
            s0, s1, v0, v1 = steps[i - 1], steps[i], curve[i - 1], curve[i]
            return float(s0 + (s1 - s0) * (v0 - target) / (v0 - v1))
    return None


def value_at_step(steps: Sequence[int], curve: Sequence[float], step: float) -> float:
    """The piecewise-linear curve at `step`; NaN outside [steps[0], steps[-1]]."""
    if not steps[0] <= step <= steps[-1]:
        return math.nan
    return float(np.interp(step, steps, np.asarray(curve, dtype=np.float64)))


# ================================================================================================ summary

def summarize(results: Sequence[dict], timing: Dict[str, dict], variants: Sequence[Variant], config,
              pairs: Sequence[tuple] = PAIRS, default_choices: Optional[dict] = None) -> dict:
    """All the numbers of one group's report, JSON-ready (see the module docstring for the statistics). `pairs`:
    the (a, b) paired comparisons; `default_choices`: the ablations compared with CoReDi's default (None: the
    original study's `DEFAULT_CHOICES`)."""
    default_choices = DEFAULT_CHOICES if default_choices is None else default_choices
    results, variants = expand_guided(results, variants)
    timing = dict(timing)
    for run in results:  # a guided row trains exactly as its base variant
        if "guided_from" in run and run["guided_from"] in timing:
            timing[run["variant"]] = timing[run["guided_from"]]
    steps = list(config.eval_steps)
    data = collect(results, steps)
    names = [v.name for v in variants if v.name in data]
    labels = {v.name: v.label for v in variants}

    cost = {n: timing[n]["step_seconds"] + timing[n]["encoder_seconds"] for n in names if n in timing}
    budget = min((cost[n] * steps[-1] for n in cost), default=math.nan)
    cheapest = min(cost, key=cost.get) if cost else None

    rows = {}
    for name in names:
        d = data[name]
        row = {"label": labels[name], "seeds": d["seeds"],
               "curve": {key: [mean_std(d[key][:, i]) for i in range(len(steps))] for key in METRICS + MONITORS}}
        row["final"] = {key: row["curve"][key][-1] for key in METRICS + MONITORS}
        row["fd_mean_over_checkpoints"] = mean_std(np.nanmean(d["fd"], axis=1) if d["fd"].size else [])
        row["diverged_seeds"] = [r["seed"] for r in results if r["variant"] == name and r.get("diverged") is not None]
        row["final_by_seed"] = {key: _by_seed(d, key, -1) for key in COMPARED}
        counts = d["class_counts"]
        if counts.size and np.isfinite(counts).all(axis=1).any():
            shares = counts / counts.sum(axis=1, keepdims=True)
            row["class_fractions"] = [mean_std(shares[:, k]) for k in range(shares.shape[1])]
            row["nonuniform_seeds"] = int(np.nansum(d["class_chi2_p"][:, -1] < 0.05))
        if name in timing:
            t = timing[name]
            row["step_ms"] = 1000 * t["step_seconds"]
            row["encoder_ms"] = 1000 * t["encoder_seconds"]
            row["cost_vs_cheapest"] = cost[name] / cost[cheapest]
            row["cost_vs_cheapest_cached_features"] = t["step_seconds"] / timing[cheapest]["step_seconds"]
            at_budget = [value_at_step(steps, d["fd"][i], budget / cost[name]) for i in range(len(d["seeds"]))]
            row["fd_at_equal_time"] = mean_std(at_budget)
            row["equal_time_step"] = budget / cost[name]
        rows[name] = row

    comparisons = {}
    for a, b in pairs:
        if a in data and b in data:
            comparisons[f"{a} vs {b}"] = {
                **{f"final_{metric}": paired(_by_seed(data[a], metric, -1), _by_seed(data[b], metric, -1))
                   for metric in COMPARED},
                "mean_fd_over_checkpoints": paired(_by_seed_mean(data[a]), _by_seed_mean(data[b]))}
    defaults = {}
    for choice, candidates in default_choices.items():
        present = [c for c in candidates if c in data]
        if len(present) > 1:
            defaults[choice] = {c: paired(_by_seed(data[c], "fd", -1), _by_seed(data["coredi"], "fd", -1))
                                for c in present if c != "coredi"}

    reach = {}
    for reference in ("redi", "sit"):
        if reference in rows:
            target = rows[reference]["final"]["fd"][0]
            reach[reference] = {n: steps_to_reach(steps, [m for m, _ in rows[n]["curve"]["fd"]], target)
                                for n in names}
    groups = {v.name: v.group for v in variants if v.name in data}
    return {"model": config.model, "jit_model": getattr(config, "jit_model", None),
            "conditional": getattr(config, "conditional", True), "samples": getattr(config, "num_samples", None),
            "steps": steps, "variants": names, "groups": groups, "rows": rows,
            "comparisons": comparisons,
            "default_choices": defaults, "steps_to_reach_final_fd_of": reach,
            "equal_time": {"budget_seconds": budget, "cheapest": cheapest}}


def _by_seed(d: dict, metric: str, column: int) -> Dict[int, float]:
    return {s: float(d[metric][i, column]) for i, s in enumerate(d["seeds"])}


def _by_seed_mean(d: dict) -> Dict[int, float]:
    return {s: float(np.mean(d["fd"][i])) for i, s in enumerate(d["seeds"])}


# ================================================================================================ writing

def _pm(pair, digits: int = 2, scale: float = 1.0) -> str:
    mean, std = pair
    if not np.isfinite(mean):
        return "–"
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {std * scale:.{digits}f}" if np.isfinite(std) else "")


def _num(value, digits: int = 2) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _signed(value, digits: int = 2) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:+.{digits}f}"


def _paired_cell(p: dict) -> str:
    return (f"{_signed(p['mean'])} [{_signed(p['ci_low'])}, {_signed(p['ci_high'])}], p = {_num(p['p_value'], 3)}, "
            f"wins {p['wins_a']}/{p['n']}")


def _comparison_line(name: str, c: dict) -> str:
    acc = c["final_accuracy"]
    accuracy = "–"
    if np.isfinite(acc["mean"]):
        accuracy = (f"{_signed(100 * acc['mean'], 1)} [{_signed(100 * acc['ci_low'], 1)}, "
                    f"{_signed(100 * acc['ci_high'], 1)}]")
    return (f"| {name} | {c['final_fd']['n']} | {_paired_cell(c['final_fd'])} | "
            f"{_paired_cell(c['mean_fd_over_checkpoints'])} | {accuracy} |")


def results_markdown(summary: dict, meta: dict) -> str:
    """The original study's results.md: its header, tables and the sessions that trained the runs."""
    return "\n".join([markdown_header(meta), main_markdown(summary), run_markdown(meta)])


def markdown_header(meta: dict) -> str:
    return "\n".join([f"# CPU study: CoReDi vs ReDi vs SiT on 16×16 digits ({meta.get('mode', 'full')} run)", "",
                      "Generated by `python scripts/digits_study.py` (settings in `results.json` → `config`; the "
                      "sessions that trained the runs at the end). Mean ± std over seeds; FD_cls lower is better.", ""])


def main_markdown(summary: dict) -> str:
    """The tables of the original (class-conditional SiT-Micro) study."""
    steps, rows = summary["steps"], summary["rows"]
    lines = ["## Equal steps", "",
             "| variant | seeds | " + " | ".join(f"FD_cls @ {s}" for s in steps)
             + " | accuracy % | precision | recall |",
             "|---|---|" + "---|" * len(steps) + "---|---|---|"]
    for name in summary["variants"]:
        r = rows[name]
        fd = " | ".join(_pm(v) for v in r["curve"]["fd"])
        div = f" (diverged: seeds {r['diverged_seeds']})" if r["diverged_seeds"] else ""
        lines.append(f"| `{name}` {r['label']}{div} | {len(r['seeds'])} | {fd} | "
                     f"{_pm(r['final']['accuracy'], 1, 100)} | {_pm(r['final']['precision'])} | "
                     f"{_pm(r['final']['recall'])} |")
    lines += ["", "## Feature space (final checkpoint) and cost", "",
              "Effective rank of Cov(z) on 256 training images with the BatchNorm's running statistics (d = "
              "channels); pre-norm std: per-channel std of the projection f̃W before the norm; angle: mean principal "
              "angle between span(W) and the PCA basis. Cost per step ×cheapest: with the encoder online "
              "(in brackets: features cached). FD at equal time: FD_cls interpolated at the wall time of the "
              "cheapest variant's full run (encoder online).", "",
              "| variant | eff. rank | z std | pre-norm std | angle to PCA ° | ms/step | encoder ms/batch | "
              "cost ×cheapest | steps in budget | FD_cls at equal time |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name in summary["variants"]:
        r, f = rows[name], rows[name]["final"]
        cost = (f"{r['cost_vs_cheapest']:.2f} ({r['cost_vs_cheapest_cached_features']:.2f})"
                if "cost_vs_cheapest" in r else "–")
        lines.append(f"| `{name}` | {_pm(f['effective_rank'])} | {_pm(f['z_std_mean'])} | "
                     f"{_pm(f['prenorm_std_mean'])} | {_pm(f['pca_angle_mean_deg'], 1)} | "
                     f"{_num(r.get('step_ms'), 1)} | {_num(r.get('encoder_ms'), 1)} | {cost} | "
                     f"{_num(r.get('equal_time_step'), 0)} | {_pm(r.get('fd_at_equal_time', (math.nan, math.nan)))} |")
    lines += ["", "## Paired comparisons (a − b, by seed)", "",
              "Negative FD differences favour a. 95% t interval in brackets; p: two-sided paired t-test; wins: seeds "
              "where a has the lower FD.", "",
              "| a vs b | seeds | final FD_cls | mean FD_cls over checkpoints | final accuracy (points) |",
              "|---|---|---|---|---|"]
    for name, c in summary["comparisons"].items():
        lines.append(_comparison_line(name, c))
    if summary["default_choices"]:
        lines += ["", "## CoReDi's defaults: each ablation − CoReDi's default (final FD_cls, by seed)", "",
                  "| choice | variant | seeds | Δ final FD_cls [95% CI] | p | wins over default |",
                  "|---|---|---|---|---|---|"]
        for choice, entries in summary["default_choices"].items():
            for variant, p in entries.items():
                lines.append(f"| {choice} | `{variant}` | {p['n']} | {_signed(p['mean'])} [{_signed(p['ci_low'])}, "
                             f"{_signed(p['ci_high'])}] | {_num(p['p_value'], 3)} | {p['wins_a']}/{p['n']} |")
    for reference, reach in summary["steps_to_reach_final_fd_of"].items():
        target = rows[reference]["final"]["fd"][0]
        lines += ["", f"## Steps to reach `{reference}`'s final FD_cls ({_num(target)}) on the mean curve", "",
                  " · ".join(f"`{n}` {_num(s, 0) if s is not None else 'not reached'}" for n, s in reach.items())]
    return "\n".join(lines + [""])


def run_markdown(meta: dict) -> str:
    """The "Run" section: the study's meta data and every session that trained runs."""
    lines = ["## Run", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k != "sessions"]
    for i, session in enumerate(meta.get("sessions", []), 1):
        lines.append(f"- session {i}: " + "; ".join(f"{k}: {v}" for k, v in session.items()))
    return "\n".join(lines + [""])


def plot_convergence(summary: dict, path: Path) -> Path:
    """2x2 figure: FD_cls vs step (main and pixel-space variants; ablations), accuracy vs step, FD_cls vs wall
    time. Pixel-space (JiT) variants are dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    steps, rows = np.array(summary["steps"]), summary["rows"]
    groups = summary.get("groups", {})
    # Left: the paper's comparison plus ReDi + BatchNorm (the study's decisive control) and the pixel-space pair.
    main = [n for n in ("sit", "redi", "redi-bn", "coredi") if n in rows]
    main += [n for n in summary["variants"] if groups.get(n) == "pixel"]
    ablations = ["coredi"] + [n for n in summary["variants"] if n not in main]
    fixed = {"sit": "black", "redi": "tab:blue", "redi-bn": "tab:purple", "coredi": "tab:red", "jit": "black",
             "jit-coredi": "tab:red", "jit-coredi-lz0.1": "tab:orange"}
    others = iter(["tab:orange", "tab:green", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan", "gold",
                   "navy", "lime"] * 3)
    colors = {n: fixed.get(n) or next(others) for n in summary["variants"]}
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))

    def band(ax, x, name, key="fd", scale=1.0):
        mean = np.array([m for m, _ in rows[name]["curve"][key]]) * scale
        std = np.nan_to_num(np.array([s for _, s in rows[name]["curve"][key]])) * scale
        ax.plot(x, mean, marker="o", color=colors[name], ls="--" if groups.get(name) == "pixel" else "-",
                label=f"{name} (n={len(rows[name]['seeds'])})")
        ax.fill_between(x, mean - std, mean + std, color=colors[name], alpha=0.15)

    for name in main:
        band(axes[0, 0], steps, name)
        band(axes[1, 0], steps, name, "accuracy", 100)
    for name in ablations:
        if name in rows:
            band(axes[0, 1], steps, name)
    for name in main:
        if "step_ms" in rows[name]:
            seconds = steps * (rows[name]["step_ms"] + rows[name]["encoder_ms"]) / 1000
            band(axes[1, 1], seconds, name)
    budget = summary["equal_time"]["budget_seconds"]
    if np.isfinite(budget):
        axes[1, 1].axvline(budget, color="grey", ls=":", label="equal-time budget")
    titles = [("FD_cls vs training step", "step", "FD_cls (lower is better)"),
              ("CoReDi ablations: FD_cls vs step", "step", "FD_cls"),
              ("class accuracy of samples vs step", "step", "accuracy %"),
              ("FD_cls vs training wall time (encoder online)", "seconds (1 thread)", "FD_cls")]
    for ax, (title, xlabel, ylabel) in zip(axes.flat, titles):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in (axes[0, 0], axes[0, 1], axes[1, 1]):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    pixel = f" (dashed: {summary['jit_model']})" if any(g == "pixel" for g in groups.values()) else ""
    fig.suptitle(f"Digits 16×16, {summary.get('model', 'SiT')}{pixel}: mean ± std over seeds (EMA weights, ODE "
                 f"sampler)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


SAMPLES_TITLE = "Final-checkpoint samples, classes 0-9 twice (same noise for every variant)"


def plot_samples(results: Sequence[dict], names: Sequence[str], path: Path,
                 title: str = SAMPLES_TITLE) -> Optional[Path]:
    """One row per variant: the final checkpoint's first 20 samples (conditional: digits 0-9 twice) of its lowest
    seed. Runs restored from results.json have no samples: when a variant of `names` has none and `path` exists,
    the existing picture is kept (None is returned) rather than replaced by one with rows missing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, _ = expand_guided(results, [])
    shown = {}
    for run in sorted(results, key=lambda r: r["seed"]):
        if run["variant"] not in shown and run.get("samples"):
            images = [np.frombuffer(bytes.fromhex(h), dtype=np.uint8) for h in run["samples"]]
            side = int(round(math.sqrt(images[0].size)))
            shown[run["variant"]] = (run["seed"], [im.reshape(side, side) for im in images])
    present = [n for n in names if n in shown]
    if not present or (len(present) < len(names) and Path(path).exists()):
        return None
    names = present
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 0.62 * len(names) + 0.4), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        seed, images = shown[name]
        ax.imshow(np.concatenate(images, axis=1), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(f"{name}\n(seed {seed})", rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj
