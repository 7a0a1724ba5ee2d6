"""Stop signals, remembered instead of fatal, so that a job stops where it loses nothing.

    with StopSignals(("SIGTERM", "SIGINT", "SIGUSR1")) as stop:
        for unit in work:
            if parallel.any_rank(stop.received is not None):   # every rank stops at the same unit
                raise Stopped(stop.received)
            do(unit)

SIGTERM is what Slurm sends on preemption and scancel, SIGUSR1 what `--signal=B:USR1@N` turns into
near a time limit (launch/slurm.sbatch passes it on), SIGINT a Ctrl-C. `train` saves at the end of its
step; `eval` stops at the next (run, length) or batch, keeping every result already written.

A process stopped this way exits with 128 + the signal's number, the status a shell gives a process
that signal ended (`megarope demo` and `megarope eval`); launch/slurm.sbatch tells such a stop from a
crash by what the ranks left on disk, since torchrun reports neither its workers' statuses nor why.
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


class StopSignals:
    """Remember the first of ``names`` that arrives (its name in ``received``) instead of dying.

    Installed in the main thread only (Python delivers signals there); elsewhere nothing is changed.
    The previous handlers come back on exit.
    """

    def __init__(self, names: tuple[str, ...] = STOP_SIGNALS):
        self.names = names
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for name in self.names:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.received = self.received or signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Stopped(Exception):
    """A stop signal ended the work early; what was finished is kept and a rerun continues from it.

    ``signal``: the signal's name (None on a rank that heard only of another rank's signal).
    ``exit_code``: 128 + its number (SIGTERM's where unknown).
    """

    def __init__(self, signal_name: str | None, message: str = ""):
        self.signal = signal_name
        self.exit_code = 128 + int(getattr(signal, signal_name or "SIGTERM", signal.SIGTERM))
        super().__init__(message or f"stopped by {signal_name or 'a signal on another rank'}")
