"""The CPU study of the paper's claim on the digits demo: SiT vs ReDi vs CoReDi and CoReDi's ablations.

    python scripts/digits_study.py --out docs/study            # the full table and plot, ~half an hour on 2 cores
    python scripts/digits_study.py --out /tmp/study --quick    # a smoke run in seconds

Resumable: each (variant, seed) run is cached under <out>/runs/. See docs/study/README.md and `--help`.
"""
from coredi_fast.study.cli import main

if __name__ == "__main__":
    main()
