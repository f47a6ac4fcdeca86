"""A CPU study of the paper's claim (a learned, coevolving projection converges faster than ReDi's fixed PCA) on
the digits demo, judged by an independent classifier.

    classifier.py     the judge's network: a small CNN trained on the held-out split
                      (`scripts/train_digits_classifier.py`)
    judge.py          FD_cls (FID with that network), class accuracy, precision/recall, class counts of generated digits
    spread.py         how evenly samples cover the classes (KL to uniform, chi-square, rarest/commonest class)
    variants.py       the compared variants: one `ProjectorConfig` each (SiT, ReDi, CoReDi, ablations, RG)
    groups.py         the study's groups: setting (conditional or not), model size, variants, seeds, paired tests
    cache.py          the per-run cache (runs/), restored from results.json when runs/ is missing
    runner.py         one (variant, seed) run in-process; the study over worker processes; timing
    estimate.py       the wall time of the runs still to do, printed before a session starts
    report.py         the original study's tables, paired tests across seeds, the equal-compute view, plots
    report_groups.py  every other group's tables and plots, and the comparisons across groups
    cli.py            `python scripts/digits_study.py` / `python -m coredi_fast.study`
"""
from .classifier import DigitsCNN, DigitsCNNConfig, load_digits_classifier
from .groups import GROUP_NAMES, GROUPS, Group, get_group
from .judge import ClassifierJudge, JudgeScores
from .runner import StudyConfig, StudyData, StudyPlan, run_one, run_study, time_variants
from .spread import class_counts, class_spread
from .variants import MAIN_VARIANT_NAMES, VARIANT_NAMES, VARIANTS, Variant, get_variants

__all__ = [
    "DigitsCNN", "DigitsCNNConfig", "load_digits_classifier",
    "GROUP_NAMES", "GROUPS", "Group", "get_group",
    "ClassifierJudge", "JudgeScores",
    "StudyConfig", "StudyData", "StudyPlan", "run_one", "run_study", "time_variants",
    "class_counts", "class_spread",
    "MAIN_VARIANT_NAMES", "VARIANT_NAMES", "VARIANTS", "Variant", "get_variants",
]
