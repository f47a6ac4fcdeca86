"""A run folder belongs to one run: a lock while it trains, and a fresh run never mixes with (or deletes) another's.

    folder = RunFolder("runs/x")
    folder.lock()                     # RunFolderBusy naming the holder (pid, host) if a live run has it
    folder.prepare(resume="none", overwrite=False)   # RunFolderInUse if it holds a run and nothing says what to do
    ...
    folder.unlock()

The lock is an `fcntl.flock` on `<out>/run.lock`, held by the rank-0 process for the whole run: the kernel drops it
when that process dies, however it dies, so a lock left by a killed run is taken over (with a message naming the
dead holder) while a live run, or a killed launcher's orphaned rank 0, keeps it. flock is per host and may not
work on some network file systems; the holder's host is written in the file so a message can say where it runs.

A folder "holds a run" when it has checkpoints. Starting a new run there (`run.resume=none`) is refused unless
`run.overwrite=true`, which moves the previous run's files (checkpoints, metrics, samples, pictures, TensorBoard
logs, its config) into `<out>/replaced/<UTC time>/`: nothing is deleted, and the new run's pruning then only ever
sees its own checkpoints. The feature-statistics cache stays: it belongs to the data and encoder, not to a run.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Optional

from .checkpoint import checkpoint_steps

LOCK_NAME = "run.lock"
REPLACED_DIR = "replaced"
# What a run writes into its folder (moved together by `overwrite`); feature_stats.pt is a cache and stays.
RUN_FILES = ("checkpoints", "samples", "tensorboard", "metrics.jsonl", "config.yaml", "outputs.json",
             "loss_curves.png", "feature_evolution.png")


class RunSetupError(RuntimeError):
    """The run cannot start as configured (its folder is in use, a checkpoint to resume does not load, ...): one
    line for the user, no traceback (train.py exits with status 2)."""


class RunFolderBusy(RunSetupError):
    """Another live process holds the folder's lock."""


class RunFolderInUse(RunSetupError):
    """The folder holds a run and the config does not say whether to continue it or replace it."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


class RunFolder:
    def __init__(self, out_dir: str | Path):
        self.out = Path(out_dir)
        self._lock_file = None

    # ------------------------------------------------------------------ the lock

    @property
    def lock_path(self) -> Path:
        return self.out / LOCK_NAME

    def _holder(self) -> dict:
        try:
            return json.loads(self.lock_path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            return {}

    def lock(self) -> Optional[str]:
        """Take the folder's lock for this process; returns a message when a dead run's lock was taken over.
        Raises RunFolderBusy (naming pid, host and start time) when a live process holds it."""
        self.out.mkdir(parents=True, exist_ok=True)
        previous = self._holder()
        handle = open(self.lock_path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            handle.close()
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            who = self._holder() or previous
            raise RunFolderBusy(
                f"{self.out} is in use by another run: pid {who.get('pid', '?')} on {who.get('host', '?')}, started "
                f"{who.get('started', '?')} (lock {self.lock_path}). Wait for it to end, stop it, or choose another "
                f"run.out_dir") from None
        handle.seek(0)
        handle.truncate()
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}))
        handle.flush()
        self._lock_file = handle
        if previous.get("pid") and not (previous.get("host") == socket.gethostname() and _pid_alive(previous["pid"])):
            return (f"took over the lock of a run that ended without releasing it (pid {previous['pid']} on "
                    f"{previous.get('host', '?')}, started {previous.get('started', '?')})")
        return None

    def unlock(self) -> None:
        if self._lock_file is None:
            return
        self._lock_file.seek(0)
        self._lock_file.truncate()  # an empty lock file: released cleanly
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()
        self._lock_file = None

    # ------------------------------------------------------------------ whose files

    def prepare(self, resume: str, overwrite: bool) -> Optional[str]:
        """Make the folder ready for a run that resumes as `resume` says; returns a message when files were moved.

        resume="none", or a checkpoint path from elsewhere, in a folder that holds a run: RunFolderInUse unless
        overwrite, which moves the previous run's files to replaced/<time>/. resume="auto" (or one of the folder's
        own checkpoints) continues what is there."""
        steps = checkpoint_steps(self.out)
        if resume == "auto" or not steps:
            return None
        if resume == "none":
            what = "run.resume=none starts a new one"
        elif Path(resume).resolve().parent == (self.out / "checkpoints").resolve():
            return None  # one of its own checkpoints: the same run
        else:
            what = f"run.resume={resume} continues another run's checkpoint"
        if not overwrite:
            raise RunFolderInUse(
                f"{self.out} holds a run (checkpoints up to step {steps[-1]}) and {what} there. Continue it with "
                f"run.resume=auto, start elsewhere with another run.out_dir, or pass run.overwrite=true to move its "
                f"files to {self.out / REPLACED_DIR}/<time>/ first")
        return self.move_previous_run()

    def move_previous_run(self) -> Optional[str]:
        """Move the files a run writes into replaced/<UTC time>/; returns what was moved, or None."""
        present = [name for name in RUN_FILES if (self.out / name).exists()]
        if not present:
            return None
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        target = self.out / REPLACED_DIR / stamp
        suffix = 1
        while target.exists():
            target = self.out / REPLACED_DIR / f"{stamp}-{suffix}"
            suffix += 1
        target.mkdir(parents=True)
        for name in present:
            os.replace(self.out / name, target / name)
        return f"run.overwrite=true: moved the previous run's {', '.join(present)} to {target}"
