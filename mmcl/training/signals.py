"""Stopping when asked: SIGTERM (what a cluster scheduler sends before it kills), SIGINT (Ctrl-C) and
SIGUSR1 (SLURM's `--signal=USR1@90`) only set a flag. After the optimizer step in flight every
process agrees (one all-reduce), one checkpoint is written, and the run ends with a `Preempted`
error whose exit status is the signal's (128 + its number), so no step since the last checkpoint is
lost. A signal the process was started ignoring (`nohup`, a shell's background job for SIGINT) stays
ignored. A second Ctrl-C while stopping stops at once; a repeated SIGTERM or SIGUSR1 (a launcher such
as torchrun passes on the one its process group got) changes nothing.
"""

from __future__ import annotations

import signal
import time
from types import FrameType
from typing import Any

import torch

from ..config import StopError

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preempted(StopError):
    """The run was stopped by a signal, after a checkpoint of its last step."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_status = 128 + signum


class StopRequests:
    """Catches the stop signals while a run trains (a context manager) and says when to checkpoint:
    on a signal, and every `every_minutes` minutes (0: never), the same step on every process."""

    def __init__(self, accelerator: Any, every_minutes: float = 0.0) -> None:
        self.accelerator, self.every_s = accelerator, every_minutes * 60
        self.signum = 0
        self.last_checkpoint = time.monotonic()
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequests":
        for sig in SIGNALS:
            if signal.getsignal(sig) is signal.SIG_IGN:  # ignored on purpose by whoever started us
                continue
            try:
                self.previous[sig] = signal.signal(sig, self._caught)
            except ValueError:  # not the main thread (a notebook's worker): the default action stays
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _caught(self, signum: int, frame: FrameType | None) -> None:
        if self.signum and signum == signal.SIGINT:  # Ctrl-C twice: stop now, the default way
            signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.signum = self.signum or signum

    def due(self) -> tuple[int, bool]:
        """(the signal every process saw first, or 0; whether the time-based checkpoint is due), agreed
        by all processes after an optimizer step."""
        timed = bool(self.every_s) and time.monotonic() - self.last_checkpoint >= self.every_s
        if self.accelerator.num_processes == 1:
            return self.signum, timed
        flags = torch.tensor([self.signum, int(timed)], device=self.accelerator.device)
        signum, timed = self.accelerator.reduce(flags, reduction="max").tolist()
        return int(signum), bool(timed)

    def checkpointed(self) -> None:
        self.last_checkpoint = time.monotonic()

    def stop(self, step: int, folder: Any) -> Preempted:
        name = signal.Signals(self.signum).name if self.signum else "a signal"
        return Preempted(f"stopped by {name} at step {step}; the checkpoint is {folder}; resume with "
                         "--train.resume=latest", self.signum)
