"""Training configuration: typed dataclasses, a YAML/JSON file, and `section.key=value` overrides.

    python train.py                                           # the embedded default: CoReDi on the digits, CPU
    python train.py --config configs/imagenet256_coredi_xl.yaml run.out_dir=runs/xl optim.lr=2e-4

Every field is validated at start-up (`TrainConfig.validate`), so a typo or an impossible combination fails before
any data is read or any file is written, with a message naming the field. The defaults below ARE the embedded demo
(`configs/demo_digits.yaml` spells them out).
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from ..method.objective import ObjectiveConfig
from ..method.projector import ProjectorConfig


@dataclass
class DataConfig:
    """source: "digits" (scikit-learn's bundled digits, pixel space, no download) | "shards" (made by
    `preprocess.py`) | "repa" (REPA's preprocessed folder layout). path: the data folder (shards/repa)."""
    source: str = "digits"
    path: Optional[str] = None
    image_size: int = 16              # pixels of the stored images (digits are upsampled from 8x8)
    channels: int = 1                 # digits only: 1 (grey) or 3
    global_batch_size: int = 64       # summed over all ranks
    num_workers: int = 0
    loader: str = "auto"              # auto | torch | dali
    hflip: bool = False               # random horizontal flip per sample (JiT: on; ReDi: off); pixel-space data only


@dataclass
class ModelConfig:
    name: str = "SiT-Tiny/2"
    learn_sigma: bool = False
    class_dropout_prob: float = 0.1
    grad_checkpointing: Union[bool, int] = False   # true: every block recomputes; k: the first k blocks only
    compile: str = "none"             # none | blocks (torch.compile each transformer block) | model
    compile_mode: str = "default"     # torch.compile mode; reduce-overhead adds CUDA graphs (static shapes only)
    fused_ops: str = "auto"           # auto (on CUDA) | on | off: coredi_kernels' patch_dit + fused joint embedding
    overrides: dict = field(default_factory=dict)   # extra create_model kwargs (depth=, hidden_size=, ...)
    init_from: Optional[str] = None   # a fresh run starts from these weights: a ReDi/SiT/REPA training checkpoint,
                                      # a state dict or one of ours (init_from.py); ignored when the run resumes
    init_weights: str = "ema"         # ema | model: which of the file's weights, where it holds both


@dataclass
class EncoderConfig:
    """The frozen semantic encoder. name: "digits" (the demo's tiny ViT, shipped weights) or a timm DINOv2 name
    (default for ImageNet: vit_base_patch14_reg4_dinov2). weights: a local file, "hub", or null for the default
    (digits: the shipped file; DINOv2: "hub")."""
    name: str = "digits"
    weights: Optional[str] = None
    resolution: int = 224             # DINOv2 input side (bicubic resize); ignored by the digits encoder
    dtype: str = "bf16"               # DINOv2's precision on GPU (fp32 on CPU): bf16 (autocast) | tf32 (fp32 with TF32
                                      # matmuls, as ReDi runs it) | fp32 (IEEE); see builders.encoder_precision
    statistics: Optional[str] = None  # FeatureStatistics file; computed at start-up when null
    pca_file: Optional[str] = None    # ReDi's dino_pca_model.pth: its mean/std/PCA, used as stored (not recomputed)
    statistics_batches: int = 32      # batches used when computed at start-up
    cuda_graph: bool = True           # on a GPU, replay the encoder's forward as a CUDA graph (static shapes)


@dataclass
class VAEConfig:
    """Latent-space datasets only (the stored VAE moments are sampled each step; the VAE decodes samples)."""
    weights: str = "hub"              # local diffusers folder/file, or "hub" (stabilityai/sd-vae-ft-ema)
    scale: float = 0.18215


# The demo's projector settings as *arguments*: ProjectorConfig resolves mode-dependent defaults (norm, regularizer)
# in __post_init__, so overrides such as mode=pca must start from these, not from a resolved instance.
DEFAULT_PROJECTOR = {"feature_dim": 64, "dim": 4}


@dataclass
class MethodConfig:
    projector: ProjectorConfig = field(default_factory=lambda: ProjectorConfig(**DEFAULT_PROJECTOR),
                                       metadata={"arguments": DEFAULT_PROJECTOR})
    feature_weight: float = 1.0       # lambda_z
    time_sampling: str = "uniform"    # uniform | logit_normal
    time_mean: float = 0.0
    time_std: float = 1.0
    prediction: str = "velocity"      # velocity | x


@dataclass
class OptimConfig:
    lr: float = 1e-3                  # the demo's tiny model; ReDi/SiT-XL use 1e-4 (see configs/imagenet256_*.yaml)
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 100
    grad_clip: float = 0.0            # 0 = off (ReDi); a DeepSpeed json's "gradient_clipping" must agree (ds_config.py)
    ema_decay: float = 0.999          # ReDi/SiT: 0.9999 (a 2000-step demo needs a shorter memory)
    ema_warmup: bool = True           # ramp the decay up as min(decay, (1+k)/(10+k)); ReDi/SiT use a constant decay
    fused_ema: str = "auto"           # AdamWEMA updates the EMA in the optimizer pass: auto (on when the native op is
                                      # built for the device) | on | off (torch AdamW + a separate EMA update)


@dataclass
class SampleConfig:
    """How the periodic sample grids are drawn (sample.py has the same knobs on its command line)."""
    every: int = 500
    num_images: int = 40
    sampler: str = "ode"              # ode | sde
    method: str = "heun"              # euler | heun (ode)
    steps: int = 25
    cfg_scale: float = 1.0
    guidance_on: str = "image"        # image | all


@dataclass
class RunConfig:
    out_dir: str = "runs/demo"
    steps: int = 2000
    seed: int = 0
    precision: str = "bf16"           # bf16 (autocast on GPU; fp32 on CPU) | fp32
    log_every: int = 50
    ckpt_every: int = 1000
    keep_checkpoints: int = 3
    feature_vis_every: int = 200
    feature_vis_images: int = 8
    resume: str = "auto"              # auto (latest in out_dir) | none | a checkpoint path
    overwrite: bool = False           # resume=none in a folder holding a run: move its files to replaced/<time>/
    max_skipped_steps: int = 20       # non-finite losses tolerated (skipped) before the run stops
    profile_steps: Optional[str] = None   # "A:B": cudaProfilerApi window for nsys --capture-range
    device: str = "auto"              # auto | cpu | cuda
    tensorboard: bool = True


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # --------------------------------------------------------------- derived

    def objective_config(self, image_channels: int, image_size: int, fused_embedding: bool = False) -> ObjectiveConfig:
        m = self.method
        return ObjectiveConfig(image_channels=image_channels, image_size=image_size, feature_weight=m.feature_weight,
                               time_sampling=m.time_sampling, time_mean=m.time_mean, time_std=m.time_std,
                               prediction=m.prediction, fused_embedding=fused_embedding)

    def fused_embedding_reason(self) -> str | None:
        """Why the fused joint embedding cannot be used with this config (None: it can)."""
        p, m = self.method.projector, self.method
        if p.mode == "none":
            return "no feature channels (projector mode none)"
        if not p.stop_gradient:
            return "stop_gradient is off"
        if p.regularizer == "vf":
            return "the vf regularizer needs the unfused path"
        if p.feature_dropout > 0 and p.feature_dropout_mode == "redi":
            return "feature_dropout_mode=redi zeroes the clean features before noising"
        if m.prediction != "velocity":
            return "x-prediction"
        if self.is_jit:
            return "JiT models embed their own patches"
        return None

    @property
    def is_jit(self) -> bool:
        """JiT-style pixel transformers work on patchified pixels (see `coredi_fast.models.jit`)."""
        return self.model.name.startswith("JiT-")

    # --------------------------------------------------------------- validation

    def validate(self) -> "TrainConfig":
        """Check every field; raise ValueError naming the field. Returns self."""
        _choice("data.source", self.data.source, ("digits", "shards", "repa"))
        if self.data.source != "digits" and not self.data.path:
            raise ValueError(f"data.path is required for data.source={self.data.source!r}")
        _positive("data.image_size", self.data.image_size)
        _choice("data.channels", self.data.channels, (1, 3))
        _positive("data.global_batch_size", self.data.global_batch_size)
        _nonnegative("data.num_workers", self.data.num_workers)
        _choice("data.loader", self.data.loader, ("auto", "torch", "dali"))
        from ..models import list_models

        if self.model.name not in list_models(include_jit=True):
            raise ValueError(f"model.name={self.model.name!r} is not a known model; choose from "
                             f"{list_models(include_jit=True)}")
        _choice("model.compile", self.model.compile, ("none", "blocks", "model"))
        if not isinstance(self.model.grad_checkpointing, bool) and self.model.grad_checkpointing < 0:
            raise ValueError(f"model.grad_checkpointing must be true/false or a block count >= 0, got "
                             f"{self.model.grad_checkpointing}")
        _choice("model.compile_mode", self.model.compile_mode,
                ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
        _choice("model.fused_ops", self.model.fused_ops, ("auto", "on", "off"))
        _choice("model.init_weights", self.model.init_weights, ("ema", "model"))
        if not 0.0 <= self.model.class_dropout_prob < 1.0:
            raise ValueError(f"model.class_dropout_prob must be in [0, 1), got {self.model.class_dropout_prob}")
        _choice("encoder.dtype", self.encoder.dtype, ("bf16", "tf32", "fp32"))
        _positive("encoder.resolution", self.encoder.resolution)
        _positive("encoder.statistics_batches", self.encoder.statistics_batches)
        if self.encoder.statistics and not Path(self.encoder.statistics).is_file():
            raise ValueError(f"encoder.statistics: file not found: {self.encoder.statistics}")
        if self.encoder.pca_file:
            if not Path(self.encoder.pca_file).is_file():
                raise ValueError(f"encoder.pca_file: file not found: {self.encoder.pca_file}")
            if self.encoder.statistics:
                raise ValueError("encoder.pca_file and encoder.statistics both give the feature statistics: set one")
            if self.method.projector.mode == "none":
                raise ValueError("encoder.pca_file needs feature channels, but method.projector.mode is none")
        if not isinstance(self.method.projector, ProjectorConfig):
            raise ValueError("method.projector must be a mapping of ProjectorConfig fields")
        self.objective_config(1, 1)  # validates the objective's fields (feature_weight, time_sampling, prediction)
        o = self.optim
        if not o.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {o.lr}")
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
        _nonnegative("optim.weight_decay", o.weight_decay)
        _nonnegative("optim.warmup_steps", o.warmup_steps)
        _nonnegative("optim.grad_clip", o.grad_clip)
        if not 0.0 <= o.ema_decay < 1.0:
            raise ValueError(f"optim.ema_decay must be in [0, 1), got {o.ema_decay}")
        _choice("optim.fused_ema", o.fused_ema, ("auto", "on", "off"))
        s = self.sample
        _nonnegative("sample.every", s.every)
        _positive("sample.num_images", s.num_images)
        _choice("sample.sampler", s.sampler, ("ode", "sde"))
        _choice("sample.method", s.method, ("euler", "heun"))
        _positive("sample.steps", s.steps)
        _choice("sample.guidance_on", s.guidance_on, ("image", "all"))
        _nonnegative("sample.cfg_scale", s.cfg_scale)  # 1: no guidance, 0: unconditional, below 0: meaningless
        r = self.run
        _positive("run.steps", r.steps)
        _choice("run.precision", r.precision, ("bf16", "fp32"))
        for name in ("log_every", "ckpt_every", "feature_vis_every", "keep_checkpoints", "max_skipped_steps"):
            _nonnegative(f"run.{name}", getattr(r, name))
        _positive("run.feature_vis_images", r.feature_vis_images)
        _choice("run.device", r.device, ("auto", "cpu", "cuda"))
        if r.profile_steps is not None:
            parse_step_window(r.profile_steps)
        return self

    # --------------------------------------------------------------- (de)serialization

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        return _build(cls, data, "")


def parse_step_window(text: str) -> tuple[int, int]:
    """"A:B" → (A, B) with 0 <= A < B (steps whose profiling window is [A, B))."""
    try:
        a, b = (int(v) for v in str(text).split(":"))
    except ValueError:
        raise ValueError(f"run.profile_steps must look like A:B (e.g. 100:110), got {text!r}") from None
    if not 0 <= a < b:
        raise ValueError(f"run.profile_steps needs 0 <= A < B, got {text!r}")
    return a, b


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> TrainConfig:
    """Defaults ← the file (YAML or JSON) ← `section.key=value` overrides; then validated."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        text = p.read_text()
        if p.suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        else:
            import yaml

            try:
                data = yaml.safe_load(text) or {}
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
                problem = getattr(e, "problem", None) or str(e).splitlines()[0]
                raise ValueError(f"{p}: invalid YAML{where}: {problem}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{p}: the top level must be a mapping of sections (data, model, ...)")
    for item in overrides or []:
        _apply_override(data, item)
    return TrainConfig.from_dict(data).validate()


# ------------------------------------------------------------------------------------------------- helpers

def _apply_override(data: dict, item: str) -> None:
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like section.key=value (e.g. optim.lr=2e-4)")
    key, raw = item.split("=", 1)
    value = _Raw(raw)  # parsed by `_coerce` against the field's type (YAML alone reads "1:3" as the number 63)
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = value


def _build(cls, data: Any, where: str, defaults: Optional[dict] = None):
    """Build dataclass `cls` from a mapping; missing keys keep `defaults` (the parent's default_factory values)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(f'{where}{k}' for k in unknown)}; "
                         f"{where.rstrip('.') or 'the top level'} accepts {sorted(fields)}")
    kwargs = dict(defaults or {})
    for name, value in data.items():
        hint, key = hints[name], f"{where}{name}"
        if dataclasses.is_dataclass(hint):
            f = fields[name]
            if "arguments" in f.metadata:
                base = dict(f.metadata["arguments"])
            else:
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else hint()
                base = {k.name: getattr(default, k.name) for k in dataclasses.fields(default)}
            kwargs[name] = _build(hint, value, key + ".", base)
        else:
            kwargs[name] = _coerce(key, value, hint)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # e.g. ProjectorConfig.__post_init__, which does not know its path
        raise ValueError(f"{where.rstrip('.') or 'config'}: {e}") from None


class _Raw(str):
    """A command-line override's text, typed later by the field it sets."""


def _coerce(key: str, value: Any, hint: Any):
    if isinstance(value, _Raw):
        if hint is str or (typing.get_origin(hint) is typing.Union and str in typing.get_args(hint)
                           and value.lower() not in ("null", "none", "~")):
            return str(value)
        import yaml

        value = yaml.safe_load(str(value)) if value != "" else None  # numbers, bools, null, lists, mappings
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union and type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union and set(args) == {bool, int}:  # a switch or a count (model.grad_checkpointing)
        if isinstance(value, int):
            return value
        raise ValueError(f"{key} must be true/false or an integer, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key} must be true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{key} must be a string, got {value!r}")
    if hint is tuple or origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(float(v) for v in value)
        raise ValueError(f"{key} must be a list, got {value!r}")
    if hint is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ValueError(f"{key} must be a mapping, got {value!r}")
    return value


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _nonnegative(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
