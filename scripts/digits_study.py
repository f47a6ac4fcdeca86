"""The CPU study of the paper's claim on the digits demo: SiT vs ReDi vs CoReDi and CoReDi's ablations, class-
conditional and unconditional, with Representation Guidance, at SiT-Micro/2 and SiT-Tiny/2.

    python scripts/digits_study.py --out docs/study                  # every group, ~2.7 h from scratch on 2 idle cores
    python scripts/digits_study.py --out docs/study --groups uncond  # one group; the report shows all of them
    python scripts/digits_study.py --out docs/study --estimate-only  # how long the runs still to do will take
    python scripts/digits_study.py --out /tmp/study --quick          # a smoke run in about a minute

Resumable: each run is cached under <out>/runs/. See docs/study/README.md and `--help`.
"""
from coredi_fast.study.cli import main

if __name__ == "__main__":
    main()
