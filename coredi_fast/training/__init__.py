"""The training system: config, single-process / DDP / DeepSpeed engines, EMA, checkpoints, metrics, pictures, and
the loop (`coredi_fast.training.loop.run`, called by `train.py`). Import submodules directly; this package imports
nothing heavy at import time."""
