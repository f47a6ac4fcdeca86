"""The study's groups: each is one setting (class-conditional or not, SiT-Micro/2 or SiT-Tiny/2), its variants and
seeds, its cache folder, and the paired comparisons its table reports. `--groups` picks which groups train; the
report always shows every group that has cached runs.

    main         class-conditional SiT-Micro/2 (and JiT-Micro/2): the original study, all variants and ablations
    uncond       unconditional SiT-Micro/2: the four main variants and the best CoReDi ablation, 5 seeds
    rg           class-conditional CoReDi trained with feature dropout 0.2, judged with and without Representation
                 Guidance (same checkpoints), 5 seeds; sit and coredi rows come from `main`
    rg-uncond    the same, unconditional; sit and coredi rows come from `uncond`
    tiny-cond    class-conditional SiT-Tiny/2 (1.3 M parameters): the four main variants, 3 seeds
    tiny-uncond  unconditional SiT-Tiny/2: the same
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

from .variants import MAIN_VARIANT_NAMES, RG_SCALES, guided_name

TINY_MODEL = "SiT-Tiny/2"
SCALE_VARIANTS = ("sit", "redi", "redi-bn", "coredi")
# coredi-lr0.1 has the best final FD_cls of CoReDi's ablations in the class-conditional table (44.7 vs the default's
# 57.8, 3/3 seeds), so it is the ablation that joins the unconditional rows.
BEST_ABLATION = "coredi-lr0.1"
UNCOND_VARIANTS = SCALE_VARIANTS + (BEST_ABLATION,)
MAIN_KEY_VARIANTS = ("sit", "redi", "redi-bn", "coredi", "coredi-lz0.1", "jit", "jit-coredi", "jit-coredi-lz0.1")
RG_VARIANT = "coredi-fd0.2"

MAIN_PAIRS = (("coredi", "redi"), ("coredi", "redi-bn"), ("redi-bn", "redi"), ("coredi", "sit"), ("redi", "sit"),
              ("coredi-lz0.1", "sit"),
              ("jit-coredi", "jit"), ("jit-coredi-lz0.1", "jit"), ("jit", "sit"))
SCALE_PAIRS = (("redi", "sit"), ("redi-bn", "sit"), ("coredi", "sit"), ("coredi", "redi-bn"), ("coredi", "redi"),
               ("redi-bn", "redi"))
UNCOND_PAIRS = SCALE_PAIRS + ((BEST_ABLATION, "sit"), (BEST_ABLATION, "coredi"), (BEST_ABLATION, "redi-bn"))
# RG against the same checkpoints unguided; what feature dropout itself costs; the guided rows against CoReDi and SiT.
RG_PAIRS = (tuple((guided_name(RG_VARIANT, w), RG_VARIANT) for w in RG_SCALES) + ((RG_VARIANT, "coredi"),)
            + tuple((guided_name(RG_VARIANT, w), other) for other in ("coredi", "sit") for w in RG_SCALES))


@dataclass(frozen=True)
class Group:
    """name: id (cache folder runs/<name>/, except "main" whose runs sit in runs/ as the original study's);
    title: the report's heading; variants: what it trains; conditional / model: its setting (model None: the
    study's SiT model); seeds for every variant and key_seeds for `key_variants` (the rows paired tests lean on);
    reference / reference_variants: rows of another group with the same setting shown in this group's table and
    tests (trained there, not here); pairs: (a, b) paired comparisons its table reports."""
    name: str
    title: str
    variants: Tuple[str, ...]
    conditional: bool = True
    model: Optional[str] = None
    seeds: Tuple[int, ...] = (0, 1, 2)
    key_variants: Tuple[str, ...] = ()
    key_seeds: Tuple[int, ...] = (3, 4)
    reference: Optional[str] = None
    reference_variants: Tuple[str, ...] = ()
    pairs: Tuple[Tuple[str, str], ...] = ()

    def config(self, base):
        """The study config of this group's runs: `base` (a `StudyConfig`) with this group's model and setting."""
        return replace(base, model=self.model or base.model, conditional=self.conditional)


GROUPS: Tuple[Group, ...] = (
    Group("main", "Class-conditional, SiT-Micro/2 (and JiT-Micro/2)", MAIN_VARIANT_NAMES,
          key_variants=MAIN_KEY_VARIANTS, pairs=MAIN_PAIRS),
    Group("uncond", "Unconditional, SiT-Micro/2", UNCOND_VARIANTS, conditional=False, key_variants=UNCOND_VARIANTS,
          pairs=UNCOND_PAIRS),
    Group("rg", "Representation Guidance, class-conditional SiT-Micro/2", (RG_VARIANT,), key_variants=(RG_VARIANT,),
          reference="main", reference_variants=("sit", "coredi"), pairs=RG_PAIRS),
    Group("rg-uncond", "Representation Guidance, unconditional SiT-Micro/2", (RG_VARIANT,), conditional=False,
          key_variants=(RG_VARIANT,), reference="uncond", reference_variants=("sit", "coredi"), pairs=RG_PAIRS),
    Group("tiny-cond", f"Class-conditional, {TINY_MODEL}", SCALE_VARIANTS, model=TINY_MODEL, pairs=SCALE_PAIRS),
    Group("tiny-uncond", f"Unconditional, {TINY_MODEL}", SCALE_VARIANTS, conditional=False, model=TINY_MODEL,
          pairs=SCALE_PAIRS),
)
GROUP_NAMES: Tuple[str, ...] = tuple(g.name for g in GROUPS)
# Conditional vs unconditional pairs of groups, and Micro vs Tiny pairs of groups with the same setting.
SETTING_PAIRS = (("main", "uncond"), ("tiny-cond", "tiny-uncond"), ("rg", "rg-uncond"))
SCALE_GROUP_PAIRS = (("main", "tiny-cond"), ("uncond", "tiny-uncond"))


def get_group(name: str) -> Group:
    """The group called `name`; ValueError naming the valid ones otherwise."""
    for group in GROUPS:
        if group.name == name:
            return group
    raise ValueError(f"unknown group {name!r}; valid: {', '.join(GROUP_NAMES)}")
