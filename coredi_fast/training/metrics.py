"""Where a run's numbers go: `metrics.jsonl` (one JSON object per logged step), TensorBoard when installed, and the
progress bar. Only rank 0 writes."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, Optional


class MetricsLogger:
    def __init__(self, out_dir: str | Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        if not enabled:
            return
        self._file = open(self.path, "a", buffering=1)  # line-buffered: a crash loses at most the current line
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self._tb = None

    @property
    def tensorboard_dir(self) -> Optional[Path]:
        return Path(self._tb.log_dir) if self._tb is not None else None

    def log(self, step: int, values: Dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in values.items()}
        self._file.write(json.dumps({"step": step, **clean}) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if math.isfinite(float(value)):
                    self._tb.add_scalar(key, float(value), step)

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint's step (they will be logged again)."""
        if not self.enabled or not self.path.exists():
            return
        self._file.close()
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", buffering=1)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
