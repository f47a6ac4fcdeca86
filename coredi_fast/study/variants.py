"""The variants the study compares: one `ProjectorConfig` each, all trained through the same code path.

Every variant is a `JointDiffusionObjective` + `FeatureProjector` + a denoiser; only the projector's settings and,
for the pixel-space rows, the denoiser family differ. The first three are the paper's comparison (plain SiT, ReDi's
fixed PCA, CoReDi's learned projection); the ablations change one thing of CoReDi's default at a time; the "pixel"
group repeats baseline vs CoReDi with a JiT-style denoiser (patchified pixels, x-prediction with the velocity loss,
logit-normal time, features joining each token on the encoder's own grid); the "rg" group is CoReDi trained with
feature dropout, judged with and without Representation Guidance from the same checkpoints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

from ..method import FeatureStatistics, ProjectorConfig

FAMILIES = ("sit", "jit")
# Representation Guidance scales the "rg" variant is judged at (besides unguided): see its definition below.
RG_SCALES = (1.1, 1.5)

# CoReDi's default as the study runs it: learned W from the PCA basis, BatchNorm, stop-gradient, ortho (weight 1).
COREDI_DEFAULT = dict(mode="learned", init="pca", norm="batchnorm", stop_gradient=True, regularizer="ortho",
                      reg_weight=1.0)


@dataclass(frozen=True)
class Variant:
    """name: short id (file names, tables); label: what it is, for the table; group: "main" | "ablation";
    projector: `ProjectorConfig` fields; match_pca_scale: set feature_scale to the mean std of ReDi's PCA channels
    (computed from the feature statistics), to separate CoReDi's learned subspace from BatchNorm's unit variance;
    family: "sit" (the study config's `model`, velocity prediction, uniform t) or "jit" (its `jit_model`, JiT's
    recipe: x-prediction, logit-normal t); feature_weight: λ_z, the feature loss's weight; rg_scales: each
    checkpoint is also sampled with Representation Guidance at these scales (the model must train with feature
    dropout, `projector["feature_dropout"] > 0`, or RG has no feature-free prediction to contrast)."""
    name: str
    label: str
    group: str
    projector: Dict[str, object] = field(default_factory=dict)
    match_pca_scale: bool = False
    family: str = "sit"
    feature_weight: float = 1.0
    rg_scales: Tuple[float, ...] = ()

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"variant {self.name!r}: family must be one of {FAMILIES}, got {self.family!r}")
        if self.rg_scales:
            if not float(self.projector.get("feature_dropout", 0.0)) > 0:
                raise ValueError(f"variant {self.name!r}: rg_scales needs a model trained with feature dropout "
                                 f"(projector feature_dropout > 0)")
            if any(not (isinstance(w, (int, float)) and w > 0 and w != 1) for w in self.rg_scales):
                raise ValueError(f"variant {self.name!r}: rg_scales must be positive and not 1 (1 is no guidance), "
                                 f"got {self.rg_scales}")

    def spec(self) -> Dict[str, object]:
        """What decides this variant's numbers besides the study config (kept with each run for the cache)."""
        return {"projector": dict(self.projector), "match_pca_scale": self.match_pca_scale, "family": self.family,
                "feature_weight": self.feature_weight, "rg_scales": list(self.rg_scales)}

    def projector_config(self, feature_dim: int, dim: int,
                         statistics: Optional[FeatureStatistics] = None) -> ProjectorConfig:
        """The `ProjectorConfig` of this variant for encoder width `feature_dim` and `dim` feature channels."""
        fields = dict(self.projector, feature_dim=feature_dim, dim=dim)
        if self.match_pca_scale:
            if statistics is None:
                raise ValueError(f"variant {self.name!r} needs feature statistics to match ReDi's channel scale")
            fields["feature_scale"] = pca_channel_scale(statistics, dim)
        return ProjectorConfig(**fields)


def pca_channel_scale(statistics: FeatureStatistics, dim: int) -> float:
    """Root-mean-square std of ReDi's top-`dim` PCA channels (sqrt of the mean of the top eigenvalues)."""
    eigenvalues = statistics.pca().eigenvalues[:dim]
    return float(math.sqrt(float(eigenvalues.mean())))


def _coredi(**changes) -> Dict[str, object]:
    return dict(COREDI_DEFAULT, **changes)


VARIANTS: Tuple[Variant, ...] = (
    Variant("sit", "SiT (no features)", "main", dict(mode="none")),
    Variant("redi", "ReDi (fixed PCA, no norm)", "main", dict(mode="pca")),
    Variant("coredi", "CoReDi (learned W, PCA init, BN, sg, ortho)", "main", _coredi()),
    Variant("redi-bn", "ReDi + BatchNorm (fixed PCA, unit variance)", "ablation", dict(mode="pca", norm="batchnorm")),
    Variant("coredi-no-sg", "CoReDi without stop-gradient", "ablation", _coredi(stop_gradient=False)),
    Variant("coredi-no-norm", "CoReDi without BatchNorm", "ablation", _coredi(norm="none")),
    Variant("coredi-cov", "CoReDi, cov regularizer", "ablation", _coredi(regularizer="cov")),
    Variant("coredi-vf", "CoReDi, vf regularizer", "ablation", _coredi(regularizer="vf")),
    Variant("coredi-no-reg", "CoReDi, no regularizer", "ablation", _coredi(regularizer="none")),
    Variant("coredi-orth-init", "CoReDi, random orthogonal init", "ablation", _coredi(init="orthogonal")),
    Variant("coredi-lr0.1", "CoReDi, W learns 10x slower (lr_scale 0.1)", "ablation", _coredi(lr_scale=0.1)),
    Variant("coredi-scaled", "CoReDi, feature_scale = ReDi's channel std", "ablation", _coredi(),
            match_pca_scale=True),
    Variant("coredi-lz0.1", "CoReDi, feature loss weight 0.1", "ablation", _coredi(), feature_weight=0.1),
    Variant("naive", "learned W, no sg, no norm, no reg", "ablation",
            _coredi(stop_gradient=False, norm="none", regularizer="none")),
    Variant("jit", "JiT pixel baseline (no features)", "pixel", dict(mode="none"), family="jit"),
    Variant("jit-coredi", "JiT + CoReDi features on the token grid", "pixel", _coredi(), family="jit"),
    Variant("jit-coredi-lz0.1", "JiT + CoReDi, feature loss weight 0.1", "pixel", _coredi(), family="jit",
            feature_weight=0.1),
    # ReDi's recipe for RG: feature dropout 0.2 in training; w_r = 1.1 is ReDi's best on ImageNet, 1.5 is inside the
    # range its slides show. Both are judged from the same checkpoints as the unguided samples.
    Variant("coredi-fd0.2", "CoReDi trained with feature dropout 0.2", "rg", _coredi(feature_dropout=0.2),
            rg_scales=RG_SCALES),
)
VARIANT_NAMES: Tuple[str, ...] = tuple(v.name for v in VARIANTS)
# The variants of the original (class-conditional SiT-Micro) study, in its order: its timing cache is keyed on it.
MAIN_VARIANT_NAMES: Tuple[str, ...] = tuple(v.name for v in VARIANTS if v.group in ("main", "ablation", "pixel"))


def guided_name(name: str, scale: float) -> str:
    """The report's name for variant `name` sampled with Representation Guidance at `scale`."""
    return f"{name}+rg{scale:g}"


def get_variants(names: Optional[Sequence[str]] = None) -> Tuple[Variant, ...]:
    """The variants called `names` (in the given order), or all of them. Unknown names raise ValueError."""
    if names is None:
        return VARIANTS
    by_name = {v.name: v for v in VARIANTS}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; valid: {', '.join(VARIANT_NAMES)}")
    return tuple(by_name[n] for n in names)
