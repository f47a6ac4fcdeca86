"""Train and evaluate one (variant, seed) run in-process, and a whole study over worker processes.

One run mirrors `training/loop.py`'s step on the digits demo (SiT on 16x16x1 pixels, AdamW with linear warm-up, fp32
EMA with the (1+k)/(10+k) warm-up, label dropout 0.1, noise drawn per (seed, step); the "jit" family as
`configs/demo_digits_jit.yaml`: JiT on 2x2-patchified pixels, x-prediction, logit-normal t), with three shortcuts
that do not change any number:

* the frozen encoder's tokens are computed once for the 1438 training images (no augmentation, so every step would
  compute exactly these); its cost per batch is timed in the run and reported next to the step time;
* batches come from a per-seed permutation of in-memory tensors (epochs of 22 full batches of 64);
* evaluation loads the EMA weights into a second model and samples class-balanced digits with the ODE sampler from
  per-sample seeds that are the same for every variant and checkpoint (common random numbers: the image-channel
  noise of sample i is identical across variants).

Unconditional runs (`StudyConfig.conditional = False`) give every training sample the null class (the label row that
label dropout trains) and sample with it, without guidance. They draw exactly the conditional runs' random numbers,
so a seed's two runs start from the same weights and see the same batches, times and noise: only the labels differ.

Variants with `rg_scales` are judged at each checkpoint unguided and with Representation Guidance at each scale, all
from the same EMA weights and the same sample noise.

Results are cached per run (`cache.py`) in the study folder, so an interrupted study resumes, and a cached run is
reused only when the settings it was made with equal the current ones.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import statistics as pystats
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from .cache import load_run, run_path, save_run, write_json
from .spread import class_spread
from .variants import MAIN_VARIANT_NAMES, Variant, get_variants

__all__ = ["StudyConfig", "StudyData", "StudyPlan", "study_data", "run_one", "time_variants", "run_study",
           "measure_timing", "load_run", "run_path", "NullLabelModel"]

IMAGE_SIZE = 16
NUM_CLASSES = 10


@dataclass(frozen=True)
class StudyConfig:
    """Everything that decides a run's numbers (its fingerprint keys the cache). See `docs/study/README.md`.

    model: SiT zoo name; steps / batch_size / lr / warmup_steps / ema_decay / class_dropout: the demo recipe;
    feature_channels: d; eval_steps: checkpoints where the EMA model is sampled and judged; num_samples: samples
    per checkpoint (class-balanced); sampler_method / sampler_steps: ODE integrator; cfg_scale: classifier-free
    guidance scale (1 = none); sample_seed: the per-sample seeds' base; monitor_images: training images the
    feature monitors (effective rank, std, PCA angle) are computed on; jit_model / jit_time_mean / jit_time_std:
    the pixel-space ("jit" family) variants' JiT zoo name and logit-normal time distribution; conditional: False
    trains and samples every image with the null class (an unconditional model; needs class_dropout > 0, which
    gives the model its null class row).
    """
    model: str = "SiT-Micro/2"
    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 100
    ema_decay: float = 0.999
    class_dropout: float = 0.1
    feature_channels: int = 4
    eval_steps: Tuple[int, ...] = (250, 500, 750, 1000)
    num_samples: int = 400
    sampler_method: str = "heun"
    sampler_steps: int = 8
    cfg_scale: float = 1.0
    sample_seed: int = 2026
    monitor_images: int = 256
    jit_model: str = "JiT-Micro/2"
    jit_time_mean: float = -0.8
    jit_time_std: float = 0.8
    conditional: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size", "feature_channels", "num_samples", "sampler_steps", "monitor_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        object.__setattr__(self, "eval_steps", tuple(int(s) for s in self.eval_steps))
        if not self.eval_steps or sorted(set(self.eval_steps)) != list(self.eval_steps) \
                or not 1 <= self.eval_steps[0] or self.eval_steps[-1] != self.steps:
            raise ValueError(f"eval_steps must be increasing, >= 1 and end at steps={self.steps}, got "
                             f"{self.eval_steps}")
        if self.num_samples < 2 * NUM_CLASSES:
            raise ValueError(f"num_samples must be >= {2 * NUM_CLASSES} (a covariance per checkpoint), got "
                             f"{self.num_samples}")
        if self.sampler_method not in ("euler", "heun"):
            raise ValueError(f"sampler_method must be 'euler' or 'heun', got {self.sampler_method!r}")
        if not isinstance(self.conditional, bool):
            raise ValueError(f"conditional must be a bool, got {self.conditional!r}")
        if not self.conditional and not self.class_dropout > 0:
            raise ValueError(f"conditional=False needs class_dropout > 0 (the null class row the unconditional model "
                             f"uses exists only with label dropout), got class_dropout={self.class_dropout}")

    @classmethod
    def quick(cls) -> "StudyConfig":
        """Seconds instead of half an hour: for the test and a smoke check (numbers are meaningless)."""
        return cls(steps=12, batch_size=16, warmup_steps=4, eval_steps=(6, 12), num_samples=40,
                   sampler_method="euler", sampler_steps=2, monitor_images=32)

    def fingerprint(self) -> str:
        """16 hex digits of the settings. Fields added after runs were cached count only when they differ from
        their default, so the runs cached before them (all made at that default) stay valid."""
        fields = asdict(self)
        for name, default in _LATE_FIELDS.items():
            if fields[name] == default:
                del fields[name]
        blob = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


_LATE_FIELDS = {"conditional": True}


# ================================================================================================ data

class StudyData:
    """What every run shares, built once per process: the training images (uint8 (N, 1, 16, 16)), labels (N,),
    pixels in [-1, 1], the frozen encoder's tokens (N, L, D) and their `FeatureStatistics`, and the judge."""

    def __init__(self):
        from ..data import DigitsDataset
        from ..encoders.digits_vit import DigitsEncoder
        from ..method import FeatureStatistics
        from .judge import ClassifierJudge

        dataset = DigitsDataset(image_size=IMAGE_SIZE, channels=1, split="train")
        self.images = torch.from_numpy(np.stack([dataset.read(i).image for i in range(len(dataset))]))
        self.labels = torch.from_numpy(dataset.labels()).long()
        self.pixels = self.images.float() / 127.5 - 1.0
        self.encoder = DigitsEncoder()
        with torch.no_grad():
            self.features = torch.cat([self.encoder(self.images[i:i + 256]) for i in range(0, len(self.images), 256)])
        self.num_tokens, self.feature_dim = self.features.shape[1:]
        self.statistics = FeatureStatistics(self.feature_dim).update(self.features)
        self.judge = ClassifierJudge(self.images)


_DATA: Optional[StudyData] = None


def study_data() -> StudyData:
    """The process-wide `StudyData` (built on first use)."""
    global _DATA
    if _DATA is None:
        _DATA = StudyData()
    return _DATA


@contextlib.contextmanager
def _threads(count: Optional[int]):
    """Run with `count` intra-op threads (1: bit-reproducible and no oversubscription), then restore."""
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ================================================================================================ one run

class _Setup(NamedTuple):
    """A variant built for training: the denoiser, the objective, a maker of fresh denoisers (for the EMA copy),
    what the denoiser diffuses (`inputs`: the pixels, patchified for JiT), the pixel patch p to undo at decoding,
    and the prediction type the sampler must convert."""
    model: torch.nn.Module
    objective: object
    make_model: Callable[[], torch.nn.Module]
    inputs: torch.Tensor
    patch: int
    prediction: str


def _build(variant: Variant, config: StudyConfig, data: StudyData) -> _Setup:
    from ..method import FeatureProjector, JointDiffusionObjective, ObjectiveConfig
    from ..models import create_model

    pc = variant.projector_config(data.feature_dim, config.feature_channels, data.statistics)
    if variant.family == "jit":
        # As training/builders.py does for JiT: p x p pixel patches folded into channels, so the (S/p)^2 token grid
        # is the encoder's grid and the features join each token without resizing.
        from ..models.jit import jit_patch_size, patchify_images

        p = jit_patch_size(config.jit_model)
        make_model = lambda: create_model(config.jit_model, input_size=IMAGE_SIZE, in_channels=1,  # noqa: E731
                                          feature_channels=pc.channels, num_classes=NUM_CLASSES,
                                          class_dropout_prob=config.class_dropout)
        objective_config = ObjectiveConfig(image_channels=p * p, image_size=IMAGE_SIZE // p, prediction="x",
                                           time_sampling="logit_normal", time_mean=config.jit_time_mean,
                                           time_std=config.jit_time_std, feature_weight=variant.feature_weight)
        inputs, prediction = patchify_images(data.pixels, p), "x"
    else:
        p = 1
        make_model = lambda: create_model(config.model, input_size=IMAGE_SIZE,  # noqa: E731
                                          in_channels=1 + pc.channels, num_classes=NUM_CLASSES,
                                          class_dropout_prob=config.class_dropout)
        objective_config = ObjectiveConfig(image_channels=1, image_size=IMAGE_SIZE,
                                           feature_weight=variant.feature_weight)
        inputs, prediction = data.pixels, "velocity"
    # The denoiser first, so ReDi and CoReDi (same channel count) start from the same weights for a given seed.
    model = make_model()
    projector = FeatureProjector(pc, data.statistics if pc.mode != "none" else None)
    objective = JointDiffusionObjective(projector, objective_config, data.num_tokens)
    return _Setup(model, objective, make_model, inputs, p, prediction)


def _ema_decay(config: StudyConfig, step: int) -> float:
    # As training/loop.py with optim.ema_warmup: a short run's EMA forgets the zero-output init.
    return min(config.ema_decay, (1 + step) / (10 + step))


@torch.no_grad()
def _monitors(objective, data: StudyData, config: StudyConfig) -> Dict[str, float]:
    """Collapse monitors of the feature channels on fixed training images, with the BatchNorm's running statistics
    (what the projection gives now, not one batch's normalization)."""
    from ..method import channel_std, effective_rank

    projector = objective.projector
    if not projector.enabled:
        return {}
    was_training = projector.training
    projector.eval()
    out = projector(data.features[: config.monitor_images])
    projector.train(was_training)
    stds = channel_std(out.z)
    result = {"effective_rank": effective_rank(out.z), "z_std_mean": float(stds.mean()),
              "prenorm_std_mean": float(out.stats["prenorm_std_mean"]),
              "prenorm_std_min": float(out.stats["prenorm_std_min"])}
    diagnostics = projector.diagnostics()
    for key in ("pca_angle_mean_deg", "pca_angle_max_deg", "ortho_error"):
        if key in diagnostics:
            result[key] = diagnostics[key]
    return result


class NullLabelModel(torch.nn.Module):
    """`net(x, t, y)` with every label replaced by the null class `null_class`: the unconditional model.

    `config` and `input_shape` are the wrapped network's, so `sampling.generate` still checks channels and size."""

    def __init__(self, net: torch.nn.Module, null_class: int):
        super().__init__()
        self.net = net
        self.null_class = null_class

    @property
    def config(self) -> dict:
        return getattr(self.net, "config", {})

    @property
    def input_shape(self):
        return getattr(self.net, "input_shape", None)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, torch.full_like(y, self.null_class))


def _evaluate(model_ema, setup: _Setup, config: StudyConfig, data: StudyData,
              rg_scale: Optional[float] = None) -> Tuple[Dict[str, float], torch.Tensor]:
    """The judge's scores (fd, precision, recall, class counts and spread; accuracy for conditional runs) and the
    samples (uint8 (N, 1, 16, 16); conditional: sample i of class i % 10). Sample i's noise depends only on i."""
    from ..sampling import decode_to_uint8, generate, sample_seeds

    labels = torch.arange(config.num_samples) % NUM_CLASSES
    seeds = sample_seeds(config.sample_seed, range(config.num_samples))
    network = model_ema if config.conditional else NullLabelModel(model_ema, NUM_CLASSES)
    x = generate(network, labels, image_channels=setup.inputs.shape[1],
                 feature_channels=setup.objective.feature_channels, image_size=setup.inputs.shape[-1],
                 sampler="ode", method=config.sampler_method, steps=config.sampler_steps,
                 cfg_scale=config.cfg_scale, rg_scale=rg_scale, seeds=seeds, batch_size=config.num_samples,
                 prediction=setup.prediction)
    images = decode_to_uint8(x, pixel_patch=setup.patch)
    scores = data.judge.evaluate(images, labels if config.conditional else None)._asdict()
    counts = list(scores.pop("class_counts"))
    if not config.conditional:
        del scores["accuracy"]  # no class was asked for
    return {**scores, "class_counts": counts, **class_spread(counts)}, images


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return pystats.median(times)


def _optimizer(model, objective, config: StudyConfig) -> torch.optim.Optimizer:
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": config.lr, "name": "denoiser"}]
    groups += objective.projector.param_groups(config.lr)
    for group in groups:
        group["base_lr"] = group["lr"]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), weight_decay=0.0)


def _train_step(setup: _Setup, optimizer, ema, config: StudyConfig, data: StudyData, idx: torch.Tensor,
                seed: int, step: int):
    """One step of training/loop.py's recipe on the rows `idx`; returns the objective's output (loss not finite:
    no update is made)."""
    model, objective = setup.model, setup.objective
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)   # one stream per (seed, step), as the loop
    noise = objective.draw_noise(len(idx), generator=gen, label_dropout=config.class_dropout)
    labels = data.labels[idx]
    if not config.conditional:
        # Every sample gets the null class; the draws above are a conditional run's, so only the labels differ.
        labels = torch.full_like(labels, NUM_CLASSES)
        noise = noise._replace(label_drop=torch.ones_like(labels))
    factor = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    features = data.features[idx] if objective.projector.enabled else None
    out = objective(model, setup.inputs[idx], features, labels, noise=noise)
    if torch.isfinite(out.loss):
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        ema.update(model, _ema_decay(config, step))
    return out


def _hex_samples(images: Optional[torch.Tensor]) -> List[str]:
    """The first 2 samples per class (conditional: classes 0-9 twice), one hex string of 16x16 uint8 each."""
    return [] if images is None else [bytes(im.flatten().tolist()).hex() for im in images[: 2 * NUM_CLASSES, 0]]


def run_one(variant: Variant, seed: int, config: StudyConfig, data: Optional[StudyData] = None,
            threads: Optional[int] = 1, log: Optional[Callable[[str], None]] = None, group: str = "main") -> dict:
    """Train `variant` with `seed` for config.steps and judge its EMA model at config.eval_steps.

    Returns a JSON-ready dict: group, variant, seed, fingerprint, config, variant_spec, the curve (one entry per
    eval step: step, fd, precision, recall, accuracy (conditional runs), class_counts and the class spread
    statistics (`spread.py`), the feature monitors, the mean loss terms since the previous entry and, for a
    variant with rg_scales, "rg": {scale: the same scores sampled with Representation Guidance}), the median
    seconds of a training step in this run (features given), `wall_seconds`, `eval_seconds` (judging, all
    guidance settings), `diverged` (the step at which the loss became non-finite, else None; the curve then stops
    there), `samples`: the last checkpoint's first 20 samples (conditional: classes 0-9 twice), each the hex string
    of its 16x16 uint8 pixels (row-major), and `samples_rg`: {scale: the same with RG}.
    """
    from ..training.ema import EMA

    data = data if data is not None else study_data()
    with _threads(threads):
        torch.manual_seed(seed)
        setup = _build(variant, config, data)
        model, objective = setup.model, setup.objective
        optimizer = _optimizer(model, objective, config)
        ema = EMA(model, config.ema_decay)
        model_ema = setup.make_model().eval().requires_grad_(False)

        order_gen = torch.Generator().manual_seed(seed)
        per_epoch = len(data.images) // config.batch_size
        order: List[torch.Tensor] = []
        step_times: List[float] = []
        window: Dict[str, List[float]] = {}
        curve: List[dict] = []
        diverged = None
        images = None
        guided_images: Dict[str, torch.Tensor] = {}
        eval_seconds = 0.0
        started = time.perf_counter()
        for step in range(config.steps):
            if not order:  # a new epoch: a permutation of the training set, drawn from the seed's stream
                perm = torch.randperm(len(data.images), generator=order_gen)
                order = list(perm[: per_epoch * config.batch_size].view(per_epoch, config.batch_size))
            tick = time.perf_counter()
            out = _train_step(setup, optimizer, ema, config, data, order.pop(0), seed, step)
            if not torch.isfinite(out.loss):
                diverged = step
                break
            step_times.append(time.perf_counter() - tick)
            for key in ("loss_image", "loss_feature", "loss_reg"):
                if key in out.logs:
                    window.setdefault(key, []).append(float(out.logs[key]))

            if step + 1 in config.eval_steps:
                tick = time.perf_counter()
                ema.copy_to(model_ema)
                scores, images = _evaluate(model_ema, setup, config, data)
                guided = {}
                for scale in variant.rg_scales:  # the same EMA weights, the same sample noise
                    guided[f"{scale:g}"], guided_images[f"{scale:g}"] = _evaluate(model_ema, setup, config, data,
                                                                                   rg_scale=scale)
                eval_seconds += time.perf_counter() - tick
                point = {"step": step + 1, **scores, **_monitors(objective, data, config),
                         **{k: float(np.mean(v)) for k, v in window.items()}}
                if guided:
                    point["rg"] = guided
                window = {}
                curve.append(point)
                if log is not None:
                    judged = (f"accuracy {point['accuracy']:.3f}" if config.conditional
                              else f"class KL {point['class_kl']:.3f}")
                    log(f"{variant.name} seed {seed} step {step + 1}: FD_cls {point['fd']:.2f}, {judged}"
                        + (f", eff. rank {point['effective_rank']:.2f}" if "effective_rank" in point else ""))
        warm = step_times[min(10, len(step_times) // 2):]  # the first steps pay for allocations
        return {
            "group": group, "variant": variant.name, "seed": seed, "fingerprint": config.fingerprint(),
            "config": asdict(config), "variant_spec": variant.spec(), "curve": curve, "diverged": diverged,
            "samples": _hex_samples(images),
            "samples_rg": {scale: _hex_samples(im) for scale, im in guided_images.items()},
            "step_seconds": pystats.median(warm) if warm else math.nan,
            "wall_seconds": time.perf_counter() - started, "eval_seconds": eval_seconds,
        }


def time_variants(variants: Sequence[Variant], config: StudyConfig, data: Optional[StudyData] = None,
                  steps: int = 10, rounds: int = 3, threads: Optional[int] = 1) -> Dict[str, dict]:
    """Seconds per training step of each variant, measured interleaved in one process so that a shared CPU slows
    all of them alike: `rounds` times, each variant in turn does `steps` steps (the first round is warm-up when
    rounds > 1), and, for variants with features, encodes one batch (the cost computing the tokens online would add
    to every step). Returns {name: {"step_seconds", "encoder_seconds"}} (medians)."""
    from ..training.ema import EMA

    data = data if data is not None else study_data()
    with _threads(threads):
        setups = {}
        for variant in variants:
            torch.manual_seed(0)
            setup = _build(variant, config, data)
            setups[variant.name] = (setup, _optimizer(setup.model, setup.objective, config), EMA(setup.model))
        idx = torch.arange(config.batch_size)
        images = data.images[idx]
        step_times: Dict[str, List[float]] = {name: [] for name in setups}
        encoder_times: Dict[str, List[float]] = {name: [] for name in setups}
        for r in range(rounds):
            for name, (setup, optimizer, ema) in setups.items():
                for k in range(steps):
                    tick = time.perf_counter()
                    _train_step(setup, optimizer, ema, config, data, idx, 0, r * steps + k)
                    if r > 0 or rounds == 1:
                        step_times[name].append(time.perf_counter() - tick)
                if setup.objective.projector.enabled:
                    tick = time.perf_counter()
                    data.encoder(images)
                    if r > 0 or rounds == 1:
                        encoder_times[name].append(time.perf_counter() - tick)
    return {name: {"step_seconds": pystats.median(step_times[name]),
                   "encoder_seconds": pystats.median(encoder_times[name]) if encoder_times[name] else 0.0}
            for name in setups}


# ================================================================================================ the study

class Job(NamedTuple):
    """One run of the study: the group it belongs to (its cache folder), the variant, the seed, the settings."""
    group: str
    variant: str
    seed: int
    config: StudyConfig


@dataclass
class StudyPlan:
    """Which runs one group needs: `seeds` for every variant, plus `extra_seeds` for the variants in `key_variants`
    (more seeds where the paired comparison needs the power). `group` names the cache folder (`cache.run_path`)."""
    variants: Tuple[str, ...] = MAIN_VARIANT_NAMES
    seeds: Tuple[int, ...] = (0, 1, 2)
    key_variants: Tuple[str, ...] = ("sit", "redi", "redi-bn", "coredi", "coredi-lz0.1", "jit", "jit-coredi",
                                     "jit-coredi-lz0.1")
    extra_seeds: Tuple[int, ...] = ()
    group: str = "main"

    def jobs(self) -> List[Tuple[str, int]]:
        """(variant, seed) in the order they run: seed-major, so a partial study has every variant."""
        jobs = [(v, s) for s in self.seeds for v in self.variants]
        jobs += [(v, s) for s in self.extra_seeds for v in self.variants if v in self.key_variants]
        return jobs


def plan_jobs(plans: Sequence[Tuple[StudyPlan, StudyConfig]]) -> List[Job]:
    """Every run of the (plan, settings) pairs, in order. Unknown variant names raise ValueError before any work."""
    jobs = []
    for plan, config in plans:
        get_variants(plan.variants)
        jobs += [Job(plan.group, v, s, config) for v, s in plan.jobs()]
    return jobs


def load_job(out: Path, job: Job) -> Optional[dict]:
    """The cached result of `job`, or None (see `cache.load_run`)."""
    return load_run(out, job.variant, job.seed, job.config, job.group, get_variants([job.variant])[0].spec())


def _worker(job: Job) -> dict:
    return run_one(get_variants([job.variant])[0], job.seed, job.config, threads=1, group=job.group)


def _init_worker() -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_study(out: Path, plans: Sequence[Tuple[StudyPlan, StudyConfig]], workers: int = 2,
              log: Callable[[str], None] = print,
              announce: Optional[Callable[[List[Job]], None]] = None) -> List[dict]:
    """Run every job of `plans` that is not cached in `out/runs/`, with `workers` processes of one thread each
    (workers=1 runs in this process); `announce(todo)` is called before the first run starts. Returns all results
    (cached and new) in plan order."""
    out = Path(out)
    jobs = plan_jobs(plans)
    results: Dict[Tuple[str, str, int], dict] = {}
    todo: List[Job] = []
    for job in jobs:
        cached = load_job(out, job)
        if cached is not None:
            results[job[:3]] = cached
        else:
            todo.append(job)
    log(f"study: {len(jobs)} runs, {len(results)} cached in {out / 'runs'}, {len(todo)} to do "
        f"({workers} worker{'s' if workers > 1 else ''})")
    if announce is not None:
        announce(todo)
    started = time.perf_counter()
    pending = {job[:3] for job in todo}

    def finished(result: dict) -> None:
        key = (result["group"], result["variant"], result["seed"])
        results[key] = result
        save_run(out, result)
        last = result["curve"][-1] if result["curve"] else {}
        done = sum(1 for k in results if k in pending)
        elapsed = time.perf_counter() - started
        judged = (f"accuracy {last.get('accuracy', math.nan):.3f}" if "accuracy" in last
                  else f"class KL {last.get('class_kl', math.nan):.3f}")
        log(f"[{done}/{len(todo)} {elapsed / 60:5.1f} min] {result['group']:>11s} {result['variant']:>16s} seed "
            f"{result['seed']}: FD_cls {last.get('fd', math.nan):7.2f}  {judged}  "
            f"{1000 * result['step_seconds']:.0f} ms/step  ({result['wall_seconds']:.0f} s)")

    if todo:
        if workers <= 1:
            data = study_data()
            for job in todo:
                finished(run_one(get_variants([job.variant])[0], job.seed, job.config, data, threads=1,
                                 group=job.group))
        else:
            import multiprocessing as mp

            pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker)
            try:
                for result in pool.imap_unordered(_worker, todo):
                    finished(result)
                pool.close()
            except BaseException:
                pool.terminate()
                raise
            finally:
                pool.join()
    return [results[job[:3]] for job in jobs]


def timing_path(out: Path, group: str = "main") -> Path:
    """The step-time cache of `group`: timing.json for the main group (its original name), else timing_<group>.json."""
    return Path(out) / ("timing.json" if group == "main" else f"timing_{group}.json")


def measure_timing(out: Path, config: StudyConfig, variants: Sequence[str], steps: int = 10, rounds: int = 3,
                   log: Callable[[str], None] = print, group: str = "main") -> Dict[str, dict]:
    """`time_variants` for `variants`, cached in `timing_path(out, group)` (reused when the settings and variants
    match)."""
    path = timing_path(out, group)
    key = {"fingerprint": config.fingerprint(), "variants": list(variants), "steps": steps, "rounds": rounds}
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached.get("key") == key:
                return cached["timing"]
        except json.JSONDecodeError:
            pass
    log(f"timing ({group}): {rounds} interleaved rounds of {steps} steps per variant")
    timing = time_variants(get_variants(variants), config, steps=steps, rounds=rounds)
    write_json(path, {"key": key, "timing": timing})
    return timing
