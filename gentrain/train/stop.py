"""Stop on a signal: SIGUSR1 (SLURM's `--signal` warning before the time limit) or SIGTERM
(preemption, `scancel`, the launcher shutting its workers down).

While `Trainer.train` runs, these signals only record that a stop was asked for. At the next step
boundary the ranks agree (a stop asked on any rank stops all of them at the same step), the loop
leaves through the path `--stop-at` uses (save a checkpoint, end the trackers), the main rank prints
one line and `gentrain train` exits with EXIT_STOPPED. A signal that arrives before `train` starts
keeps its default action (the process ends; the previous checkpoint is what a resume takes).
"""
from __future__ import annotations

import functools
import signal
import threading
from pathlib import Path
from typing import Callable

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

# EX_TEMPFAIL of sysexits.h ("temporary failure; the user is invited to retry"): the run stopped
# cleanly with a checkpoint but is not finished. Not 0, so `gentrain train ... && next` and retry
# loops never take a stopped run for a finished one; distinct from 1 (crash), 2 (user error),
# 130 (Ctrl-C) and 128+N (killed by signal N before it could save).
EXIT_STOPPED = 75


class StopSignals:
    """Records the first of STOP_SIGNALS received while installed (main thread only)."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _record(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum

    def install(self) -> None:
        # signal.signal works only in the main thread; elsewhere (a Trainer driven from a thread)
        # the signals keep their current handlers and the run simply does not stop on them.
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._record) for s in STOP_SIGNALS}

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def stop_on_signals(train: Callable) -> Callable:
    """Decorate `Trainer.train`: trainer.stop_signals listens for STOP_SIGNALS while it runs."""

    @functools.wraps(train)
    def wrapper(trainer, *args, **kwargs):
        trainer.stop_signals.install()
        try:
            return train(trainer, *args, **kwargs)
        finally:
            trainer.stop_signals.restore()

    return wrapper


def stop_message(signum: int, step: int, checkpoint: Path) -> str:
    return (f"gentrain: stopped by signal {signal.Signals(signum).name} at step {step}; checkpoint saved: "
            f"{checkpoint}; continue with --resume auto")
