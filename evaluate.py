"""Evaluate samples: `python evaluate.py SAMPLES REFERENCE [...]` (see `python evaluate.py --help`).

FID, sFID, Inception Score, precision and recall following OpenAI's ADM evaluator, with a TorchScript InceptionV3
(`python scripts/fetch_inception.py` fetches one). Under `torchrun --nproc_per_node N` the ranks share the feature
extraction. The implementation is `coredi_fast.evaluation.cli`.
"""
import sys

from coredi_fast.evaluation.cli import main

if __name__ == "__main__":
    main(sys.argv[1:])
