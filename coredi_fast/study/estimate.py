"""How long the runs a session still has to do will take, printed before the first one starts.

A run costs steps x (seconds per training step) + checkpoints x (seconds to judge one checkpoint) x (1 + 2 x its
RG scales: a guided checkpoint samples a batch twice as large). Both numbers come, in this order of preference, from

1. the cached runs of the same model and variant in the study folder (their medians; a run recorded before
   `eval_seconds` existed counts its wall time minus its training steps as judging);
2. the cached runs of the same model and family (another variant);
3. cached runs of the variant (or its family) with another model, times the ratio of the two models' costs measured
   now: a few training steps and one judged checkpoint of 40 samples of each, alternating between the two so that
   whatever else runs on the machine slows both alike (e.g. SiT-Tiny/2 from the cached SiT-Micro/2 runs);
4. with nothing cached, the same probe of the model alone, scaled up; it is measured under whatever else runs on
   the machine now, so the 1-minute load average is printed next to it.

The runs are then dealt to the workers in the order they will run (each to the first free worker), which gives the
session's wall time. The cached runs were made with the study's workers busy on both cores, so their numbers are
"2 idle cores" numbers; a busier machine makes everything slower.
"""
from __future__ import annotations

import os
import statistics as pystats
import time
from dataclasses import replace
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from .variants import get_variants


class RunCost(NamedTuple):
    step_seconds: float   # one training step, features cached
    eval_seconds: float   # judging one checkpoint without guidance (sampling + judge)
    source: str           # where the numbers come from, for the printout


def _model_of(variant_name: str, config) -> str:
    variant = get_variants([variant_name])[0]
    return config.jit_model if variant.family == "jit" else config.model


def _cost_key(config) -> tuple:
    """The settings besides model and variant that set a step's and a checkpoint's cost (not the step count)."""
    return (config.batch_size, config.feature_channels, config.num_samples, config.sampler_method,
            config.sampler_steps, config.monitor_images)


def cost_of_run(run: dict, config) -> Optional[Tuple[float, float]]:
    """(step seconds, seconds per unguided checkpoint) of one finished run, or None when it lacks the timing."""
    step, wall = run.get("step_seconds"), run.get("wall_seconds")
    if not step or not wall or not run.get("curve"):
        return None
    checkpoints = len(run["curve"])
    judging = run.get("eval_seconds")
    if judging is None:  # recorded before eval_seconds existed: the wall time beyond the training steps
        judging = max(0.0, wall - step * config.steps)
    guided = len(run["curve"][0].get("rg", {}))
    return step, judging / checkpoints / (1 + 2 * guided)


def costs_from_runs(runs: Iterable[Tuple[object, dict]]) -> Dict[tuple, RunCost]:
    """{(model, variant, cost key) and (model, family, cost key): RunCost} from (config, run) pairs of cached runs
    (medians)."""
    samples: Dict[tuple, List[Tuple[float, float]]] = {}
    for config, run in runs:
        cost = cost_of_run(run, config)
        if cost is None:
            continue
        model = _model_of(run["variant"], config)
        family = get_variants([run["variant"]])[0].family
        samples.setdefault((model, run["variant"], _cost_key(config)), []).append(cost)
        samples.setdefault((model, ("family", family), _cost_key(config)), []).append(cost)
    return {key: RunCost(pystats.median(s for s, _ in values), pystats.median(e for _, e in values),
                         f"median of {len(values)} cached run{'s' if len(values) > 1 else ''}")
            for key, values in samples.items()}


def _measure(variant_name: str, config, steps: int, samples: int) -> Tuple[float, float]:
    """(seconds per training step, seconds per judged checkpoint of config.num_samples) measured now with one
    thread: `steps` steps after one warm-up round, and one checkpoint of `samples` samples scaled up."""
    from .runner import _build, _evaluate, _threads, study_data, time_variants

    data = study_data()
    variant = get_variants([variant_name])[0]
    step = time_variants([variant], config, data, steps=steps, rounds=2)[variant.name]["step_seconds"]
    small = replace(config, num_samples=max(20, min(samples, config.num_samples)))
    with _threads(1):
        setup = _build(variant, small, data)
        model = setup.make_model().eval()
        tick = time.perf_counter()
        _evaluate(model, setup, small, data)
        judging = (time.perf_counter() - tick) * config.num_samples / small.num_samples
    return step, judging


def probe_cost(variant_name: str, config, steps: int = 3, samples: int = 40) -> RunCost:
    """Measure now (see `_measure`): the absolute cost under the machine's current load."""
    step, judging = _measure(variant_name, config, steps, samples)
    return RunCost(step, judging, f"probe now ({steps} steps, {samples} samples; load {os.getloadavg()[0]:.2f})")


def probe_ratio(variant_name: str, config, reference_config, rounds: int = 2, steps: int = 3,
                samples: int = 40) -> Tuple[float, float]:
    """(step ratio, checkpoint ratio) of `config` over `reference_config` for one variant, from medians of
    `rounds` alternating measurements of each."""
    ours, theirs = [], []
    for _ in range(rounds):
        theirs.append(_measure(variant_name, reference_config, steps, samples))
        ours.append(_measure(variant_name, config, steps, samples))
    return (pystats.median(s for s, _ in ours) / pystats.median(s for s, _ in theirs),
            pystats.median(e for _, e in ours) / pystats.median(e for _, e in theirs))


def run_seconds(cost: RunCost, config, rg_scales: Sequence[float] = ()) -> float:
    """Seconds of one run of `config` with the given cost."""
    return config.steps * cost.step_seconds + len(config.eval_steps) * cost.eval_seconds * (1 + 2 * len(rg_scales))


def schedule(seconds: Sequence[float], workers: int) -> float:
    """Wall time of running jobs of these durations in order, each on the first worker that is free."""
    free = [0.0] * max(1, workers)
    for s in seconds:
        i = free.index(min(free))
        free[i] += s
    return max(free) if seconds else 0.0


class Estimate(NamedTuple):
    total_seconds: float                    # the whole session, all groups in the order they run
    groups: Dict[str, Tuple[int, float]]    # group -> (runs, wall seconds if the group ran alone)
    sources: Dict[tuple, RunCost]           # (model, variant, cost key) -> the cost used


def _lookup(known: Dict[tuple, RunCost], model: str, variant: str, config) -> Optional[RunCost]:
    family = ("family", get_variants([variant])[0].family)
    return known.get((model, variant, _cost_key(config))) or known.get((model, family, _cost_key(config)))


def _calibrated(known, variant_name: str, config, ratios: dict, probe_ratio_fn) -> Optional[RunCost]:
    """Way 3 of the module docstring for SiT-family variants: another SiT model's cached cost times the ratio of
    the two models' costs measured now (once per pair of models)."""
    if get_variants([variant_name])[0].family != "sit":
        return None
    others = sorted({k[0] for k in known if k[0] != config.model and k[2] == _cost_key(config)})
    for other in others:
        base = _lookup(known, other, variant_name, config)
        if base is None:
            continue
        if (config.model, other) not in ratios:
            ratios[(config.model, other)] = probe_ratio_fn(variant_name, config, replace(config, model=other))
        step_ratio, eval_ratio = ratios[(config.model, other)]
        return RunCost(base.step_seconds * step_ratio, base.eval_seconds * eval_ratio,
                       f"{other}'s {base.source} x the {config.model}/{other} ratio measured now (step x"
                       f"{step_ratio:.2f}, checkpoint x{eval_ratio:.2f})")
    return None


def estimate(todo: Sequence, known: Dict[tuple, RunCost], workers: int,
             probe: Callable[[str, object], RunCost] = probe_cost,
             probe_ratio_fn: Callable[[str, object, object], Tuple[float, float]] = probe_ratio) -> Estimate:
    """The wall time of running `todo` (runner `Job`s) with `workers` processes."""
    costs, per_job, ratios = {}, [], {}
    for job in todo:
        variant = get_variants([job.variant])[0]
        model = _model_of(job.variant, job.config)
        key = (model, job.variant, _cost_key(job.config))
        if key not in costs:
            costs[key] = (_lookup(known, model, job.variant, job.config)
                          or _calibrated(known, job.variant, job.config, ratios, probe_ratio_fn)
                          or probe(job.variant, job.config))
        per_job.append((job.group, run_seconds(costs[key], job.config, variant.rg_scales)))
    groups: Dict[str, List[float]] = {}
    for group, seconds in per_job:
        groups.setdefault(group, []).append(seconds)
    return Estimate(schedule([s for _, s in per_job], workers),
                    {g: (len(s), schedule(s, workers)) for g, s in groups.items()}, costs)


def describe(est: Estimate, workers: int) -> List[str]:
    """Lines for the progress output."""
    lines = [f"estimate: {sum(n for n, _ in est.groups.values())} runs, about {est.total_seconds / 60:.1f} min with "
             f"{workers} worker{'s' if workers > 1 else ''} on idle cores"]
    lines += [f"  {group:>11s}: {n:3d} runs, about {seconds / 60:5.1f} min alone" for group, (n, seconds)
              in est.groups.items()]
    lines += [f"  cost {model} {variant}: {1000 * c.step_seconds:.0f} ms/step, {c.eval_seconds:.1f} s per judged "
              f"checkpoint ({c.source})" for (model, variant, _), c in est.sources.items()]
    return lines
