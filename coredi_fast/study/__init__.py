"""A CPU study of the paper's claim (a learned, coevolving projection converges faster than ReDi's fixed PCA) on
the digits demo, judged by an independent classifier.

    classifier.py  the judge's network: a small CNN trained on the held-out split (`scripts/train_digits_classifier.py`)
    judge.py       FD_cls (FID with that network), class accuracy, precision/recall of generated digits
    variants.py    the compared variants: one `ProjectorConfig` each (SiT, ReDi, CoReDi, ablations)
    runner.py      one (variant, seed) run in-process; the study over worker processes, cached per run; timing
    report.py      tables, paired tests across seeds, the equal-compute view, the convergence plot
    cli.py         `python scripts/digits_study.py` / `python -m coredi_fast.study`
"""
from .classifier import DigitsCNN, DigitsCNNConfig, load_digits_classifier
from .judge import ClassifierJudge, JudgeScores
from .runner import StudyConfig, StudyData, StudyPlan, run_one, run_study, time_variants
from .variants import VARIANT_NAMES, VARIANTS, Variant, get_variants

__all__ = [
    "DigitsCNN", "DigitsCNNConfig", "load_digits_classifier",
    "ClassifierJudge", "JudgeScores",
    "StudyConfig", "StudyData", "StudyPlan", "run_one", "run_study", "time_variants",
    "VARIANT_NAMES", "VARIANTS", "Variant", "get_variants",
]
