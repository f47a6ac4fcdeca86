"""SIGTERM and SIGINT end a run with a checkpoint: the step under way finishes, every rank saves its part, and the
process exits with a message and status 128 + the signal number (143 for SIGTERM, 130 for Ctrl-C). A second signal
exits at once (a SIGTERM repeated within REPEAT_WINDOW_S counts as the first: see there).

Schedulers (SLURM, Kubernetes) send SIGTERM some seconds before they kill; without this, up to `run.ckpt_every`
steps were lost. The handler only sets a flag (a signal can arrive in the middle of a collective or a CUDA call);
the training loop reads it once per step and, with several processes, all ranks agree on it in the all-reduce the
step already makes, so they stop after the same step. Data-loader workers ignore both signals (data/torch_loader.py):
the launcher sends them to the whole process group, and a worker that died of one would fail the batch the final
step still needs (the loader ends its workers itself).
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A SIGTERM this soon after the first is the same request arriving twice: schedulers signal every process of the
# job and launchers (torchrun, deepspeed) forward what they get to their workers. A later one, or Ctrl-C again,
# is a second request: exit at once.
REPEAT_WINDOW_S = 5.0


class TrainingStopped(Exception):
    """Raised by the training loop after it saved the checkpoint a stop signal asked for."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}; checkpoint {checkpoint}. Continue with the same "
                         f"command (run.resume=auto)")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopRequest:
    """Installs the handlers (main thread only) and remembers the first signal."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._first_at = 0.0
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> "StopRequest":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set there; the run then stops the default way
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum is not None and signum == signal.SIGTERM and now - self._first_at < REPEAT_WINDOW_S:
            return  # the same request delivered twice: by the scheduler to every process and by the launcher
        if self.signum is not None:  # the second one: now
            self.restore()
            print(f"\n{signal.Signals(signum).name} again: exiting without a checkpoint", file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        self.signum, self._first_at = signum, now
        print(f"\n{signal.Signals(signum).name}: finishing this step and writing a checkpoint (send it again to exit "
              f"at once)", file=sys.stderr, flush=True)
