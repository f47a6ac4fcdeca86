"""The whole study's report: every group's tables (`groups.py`), the comparisons across groups, the plots.

    sections = {name: build_section(group, config, runs, timing, variants) for ...}
    write_report(out, sections, meta, config_dict, real_counts)   # results.json, results.md, the pictures

Across groups, runs are paired by seed as within a group: a seed fixes the data order, the step noise, the sample
noise and (same model size) the initial weights, so a seed's conditional and unconditional runs differ only in
the labels.

* Conditional vs unconditional, per variant: the gap uncond - cond in final FD_cls, and that gap minus SiT's gap
  (a difference in differences: negative means the variant loses less than plain SiT when the labels are gone,
  which is what features that carry the class would do).
* Micro vs Tiny: each variant's FD_cls ratio to SiT at both sizes, and the paired change of its log (negative:
  the variant closes in on SiT at the larger size); the ranks of the four variants at each size.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np

from .groups import SCALE_GROUP_PAIRS, SCALE_VARIANTS, SETTING_PAIRS, Group
from .report import (_jsonable, _num, _paired_cell, _pm, _signed, main_markdown, markdown_header, paired,
                     plot_convergence, plot_samples, run_markdown, summarize)
from .spread import class_spread, expected_uniform_kl
from .variants import Variant


class Section(NamedTuple):
    """One group in the report: its definition, settings, runs (its own and its reference rows), step timing and
    summary (`report.summarize`)."""
    group: Group
    config: object
    results: List[dict]
    timing: Dict[str, dict]
    summary: dict


def build_section(group: Group, config, results: List[dict], timing: Dict[str, dict],
                  variants: Sequence[Variant]) -> Section:
    """Summarize one group with its own paired comparisons (the original study keeps its CoReDi-default table)."""
    summary = summarize(results, timing, variants, config, pairs=group.pairs,
                        default_choices=None if group.name == "main" else {})
    return Section(group, config, results, timing, summary)


# ================================================================================================ across groups

def _gaps(a: dict, b: dict) -> Dict[int, float]:
    """{seed: a[seed] - b[seed]} over the seeds both have."""
    return {s: a[s] - b[s] for s in set(a) & set(b) if np.isfinite(a[s]) and np.isfinite(b[s])}


def setting_gaps(cond: dict, uncond: dict) -> dict:
    """Per variant in both summaries: the paired gap uncond - cond in final FD_cls and that gap minus SiT's."""
    rows = {}
    sit = _gaps(uncond["rows"]["sit"]["final_by_seed"]["fd"], cond["rows"]["sit"]["final_by_seed"]["fd"]) \
        if "sit" in cond["rows"] and "sit" in uncond["rows"] else {}
    for name in uncond["variants"]:
        if name not in cond["rows"]:
            continue
        u, c = uncond["rows"][name]["final_by_seed"]["fd"], cond["rows"][name]["final_by_seed"]["fd"]
        gap = _gaps(u, c)
        rows[name] = {"cond_fd": cond["rows"][name]["final"]["fd"], "uncond_fd": uncond["rows"][name]["final"]["fd"],
                      "gap": paired(u, c),
                      "gap_minus_sit": paired(gap, sit) if sit and name != "sit" else None}
    return rows


def scale_ranking(micro: dict, tiny: dict) -> dict:
    """Each of the four main variants at both sizes: mean final FD_cls, its rank, its ratio to SiT's, and the paired
    change of log(FD / FD_sit) from Micro to Tiny."""
    names = [n for n in SCALE_VARIANTS if n in micro["rows"] and n in tiny["rows"]]

    def ranks(summary):
        means = {n: summary["rows"][n]["final"]["fd"][0] for n in names}
        order = sorted(names, key=lambda n: (not np.isfinite(means[n]), means[n]))
        return means, {n: order.index(n) + 1 for n in names}

    (micro_fd, micro_rank), (tiny_fd, tiny_rank) = ranks(micro), ranks(tiny)
    rows = {}
    for name in names:
        row = {"micro_fd": micro["rows"][name]["final"]["fd"], "tiny_fd": tiny["rows"][name]["final"]["fd"],
               "micro_rank": micro_rank[name], "tiny_rank": tiny_rank[name]}
        if "sit" in names and name != "sit":
            row["micro_ratio"] = micro_fd[name] / micro_fd["sit"]
            row["tiny_ratio"] = tiny_fd[name] / tiny_fd["sit"]
            row["log_ratio_change"] = paired(_log_ratio(tiny, name), _log_ratio(micro, name))
        rows[name] = row
    return {"variants": names, "rows": rows, "same_ranking": micro_rank == tiny_rank}


def _log_ratio(summary: dict, name: str) -> Dict[int, float]:
    a, b = summary["rows"][name]["final_by_seed"]["fd"], summary["rows"]["sit"]["final_by_seed"]["fd"]
    return {s: math.log(a[s] / b[s]) for s in set(a) & set(b) if a[s] > 0 and b[s] > 0}


def across_groups(sections: Dict[str, Section]) -> dict:
    """The comparisons across groups whose sections are present (see the module docstring)."""
    result = {"setting": {}, "scale": {}}
    for cond, uncond in SETTING_PAIRS:
        if cond in sections and uncond in sections:
            result["setting"][f"{uncond} vs {cond}"] = setting_gaps(sections[cond].summary, sections[uncond].summary)
    for micro, tiny in SCALE_GROUP_PAIRS:
        if micro in sections and tiny in sections:
            result["scale"][f"{tiny} vs {micro}"] = scale_ranking(sections[micro].summary, sections[tiny].summary)
    return result


# ================================================================================================ markdown

def _pct(pair) -> str:
    return _pm(pair, 1, 100)


def group_markdown(section: Section, real_counts: Optional[Sequence[int]] = None) -> str:
    """A group's tables: equal steps with coverage and equal time, the class distribution, paired comparisons."""
    group, s = section.group, section.summary
    steps, rows, conditional = s["steps"], s["rows"], s["conditional"]
    reference = set(group.reference_variants)
    lines = [f"## {group.title} (`{group.name}`)", "",
             f"Runs: `runs/{group.name}/<variant>__seed<k>.json`; {s['model']}, "
             + ("class-conditional, class-balanced samples" if conditional else
                "unconditional: every training and sampling label is the null class")
             + ", no classifier-free guidance. FD_cls against all training images."
             + (f" Rows marked † are runs of the `{group.reference}` group (same settings)." if reference else ""),
             "",
             "| variant | seeds | " + " | ".join(f"FD_cls @ {x}" for x in steps)
             + (" | accuracy %" if conditional else "")
             + " | precision | recall | rarest class % | commonest class % | KL to uniform | non-uniform seeds "
               "(χ² p < 0.05) | FD_cls at equal time |",
             "|---|---|" + "---|" * len(steps) + ("---|" if conditional else "") + "---|---|---|---|---|---|---|"]
    for name in s["variants"]:
        r, f = rows[name], rows[name]["final"]
        mark = "†" if name in reference else ""
        div = f" (diverged: seeds {r['diverged_seeds']})" if r["diverged_seeds"] else ""
        nonuniform = f"{r['nonuniform_seeds']}/{len(r['seeds'])}" if "nonuniform_seeds" in r else "–"
        lines.append(f"| `{name}`{mark} {r['label']}{div} | {len(r['seeds'])} | "
                     + " | ".join(_pm(v) for v in r["curve"]["fd"])
                     + (f" | {_pct(f['accuracy'])}" if conditional else "")
                     + f" | {_pm(f['precision'])} | {_pm(f['recall'])} | {_pct(f['class_min'])} | "
                       f"{_pct(f['class_max'])} | {_pm(f['class_kl'], 3)} | {nonuniform} | "
                       f"{_pm(r.get('fd_at_equal_time', (math.nan, math.nan)))} |")
    budget = s["equal_time"]
    if np.isfinite(budget["budget_seconds"] or math.nan):
        lines += ["", f"Equal time: the wall time of `{budget['cheapest']}`'s {steps[-1]} steps "
                      f"({budget['budget_seconds']:.0f} s with the encoder online, timing in "
                      f"`timing{'' if group.name == 'main' else '_' + group.name}.json`)."]
    lines += ["", "Class distribution of the final samples as the judge reads them (% per class, mean over seeds):", "",
              "| variant | " + " | ".join(str(k) for k in range(10)) + " |", "|---|" + "---|" * 10]
    for name in s["variants"]:
        fractions = rows[name].get("class_fractions")
        if fractions:
            lines.append(f"| `{name}` | " + " | ".join(_num(100 * m, 1) for m, _ in fractions) + " |")
    n = s.get("samples") or 0
    notes = []
    if n:
        notes.append(f"{n} draws from exactly uniform classes give KL ≈ {expected_uniform_kl(n, 10):.3f} on average")
    if real_counts:
        real = class_spread(real_counts)
        notes.append(f"the real training set (its labels) has rarest {100 * real['class_min']:.1f}%, commonest "
                     f"{100 * real['class_max']:.1f}%, KL {real['class_kl']:.4f}")
    if notes:
        lines += ["", "Reference: " + "; ".join(notes) + "."]
    last = "final accuracy (points)" if conditional else "final class KL"
    lines += ["", "Paired by seed (a − b; negative FD favours a; 95% t interval, paired t-test p, wins: seeds where a "
                  "has the lower FD):", "",
              f"| a vs b | seeds | final FD_cls | mean FD_cls over checkpoints | final recall | {last} |",
              "|---|---|---|---|---|---|"]
    for name, c in s["comparisons"].items():
        if conditional:
            acc = c["final_accuracy"]
            tail = (f"{_signed(100 * acc['mean'], 1)} [{_signed(100 * acc['ci_low'], 1)}, "
                    f"{_signed(100 * acc['ci_high'], 1)}]")
        else:
            kl = c["final_class_kl"]
            tail = f"{_signed(kl['mean'], 3)} [{_signed(kl['ci_low'], 3)}, {_signed(kl['ci_high'], 3)}]"
        rec = c["final_recall"]
        lines.append(f"| {name} | {c['final_fd']['n']} | {_paired_cell(c['final_fd'])} | "
                     f"{_paired_cell(c['mean_fd_over_checkpoints'])} | {_signed(rec['mean'], 3)} "
                     f"[{_signed(rec['ci_low'], 3)}, {_signed(rec['ci_high'], 3)}] | {tail} |")
    return "\n".join(lines + [""])


def across_markdown(across: dict) -> str:
    lines = []
    for name, rows in across["setting"].items():
        lines += [f"## Conditional vs unconditional: {name}", "",
                  "Final FD_cls; gap = unconditional − conditional, paired by seed; gap − SiT's gap < 0: the variant "
                  "loses less than plain SiT without labels (wins: seeds where it does).", "",
                  "| variant | conditional FD_cls | unconditional FD_cls | gap [95% CI], p | gap − SiT's gap |",
                  "|---|---|---|---|---|"]
        for variant, r in rows.items():
            g = r["gap"]
            lines.append(f"| `{variant}` | {_pm(r['cond_fd'])} | {_pm(r['uncond_fd'])} | {_signed(g['mean'])} "
                         f"[{_signed(g['ci_low'])}, {_signed(g['ci_high'])}], p = {_num(g['p_value'], 3)} (n = "
                         f"{g['n']}) | {_paired_cell(r['gap_minus_sit']) if r['gap_minus_sit'] else '–'} |")
        lines.append("")
    for name, scale in across["scale"].items():
        lines += [f"## Model size: {name}", "",
                  "Final FD_cls (mean ± std), rank among the four (1 = best), ratio to SiT's mean; change of "
                  "log(FD / FD_sit) from Micro to Tiny paired by seed (negative: closer to SiT at Tiny; ×: the "
                  "factor exp(mean)).", "",
                  "| variant | Micro FD_cls | rank | ×SiT | Tiny FD_cls | rank | ×SiT | Δ log ratio (Tiny − Micro) |",
                  "|---|---|---|---|---|---|---|---|"]
        for variant, r in scale["rows"].items():
            change = r.get("log_ratio_change")
            cell = "–"
            if change:
                factor = math.exp(change["mean"]) if np.isfinite(change["mean"]) else math.nan
                cell = f"{_paired_cell(change)} (× {_num(factor)})"
            lines.append(f"| `{variant}` | {_pm(r['micro_fd'])} | {r['micro_rank']} | {_num(r.get('micro_ratio'))} | "
                         f"{_pm(r['tiny_fd'])} | {r['tiny_rank']} | {_num(r.get('tiny_ratio'))} | {cell} |")
        lines += ["", f"Same ranking at both sizes: {'yes' if scale['same_ranking'] else 'no'}.", ""]
    return "\n".join(lines)


# ================================================================================================ plots

def plot_group(summary: dict, path: Path, title: str) -> Path:
    """2x2: FD_cls vs step, FD_cls vs training wall time (encoder online), accuracy (conditional) or class KL to
    uniform (unconditional) vs step, recall vs step; mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, rows = np.array(summary["steps"]), summary["rows"]
    palette = ["black", "tab:blue", "tab:purple", "tab:red", "tab:orange", "tab:green", "tab:brown", "tab:pink"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    third = ("accuracy", 100, "class accuracy %") if summary["conditional"] else ("class_kl", 1, "KL to uniform")

    def band(ax, x, name, color, key="fd", scale=1.0):
        mean = np.array([m for m, _ in rows[name]["curve"][key]]) * scale
        std = np.nan_to_num(np.array([s for _, s in rows[name]["curve"][key]])) * scale
        ax.plot(x, mean, marker="o", color=color, ls="--" if "+rg" in name else "-",
                label=f"{name} (n={len(rows[name]['seeds'])})")
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15)

    for i, name in enumerate(summary["variants"]):
        color = palette[i % len(palette)]
        band(axes[0, 0], steps, name, color)
        if "step_ms" in rows[name]:
            band(axes[0, 1], steps * (rows[name]["step_ms"] + rows[name]["encoder_ms"]) / 1000, name, color)
        band(axes[1, 0], steps, name, color, third[0], third[1])
        band(axes[1, 1], steps, name, color, "recall")
    panels = [("FD_cls vs training step", "step", "FD_cls (lower is better)", True),
              ("FD_cls vs training wall time (encoder online)", "seconds (1 thread)", "FD_cls", True),
              (f"{third[2]} vs step", "step", third[2], False), ("recall vs step", "step", "recall", False)]
    for ax, (name, xlabel, ylabel, log) in zip(axes.flat, panels):
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if log:
            ax.set_yscale("log")
    fig.suptitle(f"Digits 16×16, {title}: mean ± std over seeds (EMA weights, ODE sampler)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ================================================================================================ writing

def write_report(out: Path, sections: Dict[str, Section], meta: dict, config_dict: dict,
                 real_counts: Optional[Sequence[int]] = None) -> Dict[str, Path]:
    """Write results.json (meta, the main group's config / summary / timing as before, every other group's under
    "groups", the comparisons across groups, every run's curve; the samples stay in runs/), results.md and the
    pictures: convergence.png and samples.png for the main group, convergence_<group>.png and
    samples_<group>.png for the others. A samples picture is kept, not redrawn, when some of its runs have no
    samples (restored from results.json)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    across = across_groups(sections)
    main = sections.get("main")
    own_runs = [r for section in sections.values() for r in section.results
                if r.get("group", "main") == section.group.name]
    runs = [{k: v for k, v in r.items() if k not in ("samples", "samples_rg", "config", "restored_from")}
            for r in own_runs]
    payload = _jsonable({
        "meta": meta, "config": config_dict,
        "summary": main.summary if main else None, "timing": main.timing if main else None,
        "groups": {name: {"title": sec.group.title, "config": asdict(sec.config), "summary": sec.summary,
                          "timing": sec.timing}
                   for name, sec in sections.items() if name != "main"},
        "across_groups": across, "runs": runs})
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    tmp = paths["json"].with_name(".results.json.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, paths["json"])

    parts = [markdown_header(meta)]
    if main:
        parts.append(main_markdown(main.summary))
    parts += [group_markdown(sec, real_counts) for name, sec in sections.items() if name != "main"]
    parts += [across_markdown(across), run_markdown(meta)]
    paths["markdown"].write_text("\n".join(part for part in parts if part))

    for name, sec in sections.items():
        if name == "main":
            paths["plot"] = plot_convergence(sec.summary, out / "convergence.png")
            drawn = plot_samples(sec.results, sec.summary["variants"], out / "samples.png")
        else:
            paths[f"plot_{name}"] = plot_group(sec.summary, out / f"convergence_{name}.png", sec.group.title)
            what = "classes 0-9 twice" if sec.summary["conditional"] else "unconditional, first 20 samples"
            drawn = plot_samples(sec.results, sec.summary["variants"], out / f"samples_{name}.png",
                                 f"{sec.group.title}: final-checkpoint samples, {what} (same noise for every row)")
        if drawn is not None:
            paths[f"samples_{name}"] = drawn
    return paths
