"""`python -m coredi_fast.study --out docs/study` (same as `python scripts/digits_study.py`)."""
from .cli import main

if __name__ == "__main__":
    main()
