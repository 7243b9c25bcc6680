"""The flag-only handler for SLURM's requeue signals. Standard library only, on purpose.

``launch.py fit`` installs it before torch and Lightning are imported (which takes seconds to
tens of seconds), so a USR1/TERM that arrives during start-up is noted instead of killing the
job. The handler does nothing else: saving a checkpoint inside a signal handler can stall or
corrupt it (Lightning#21406). ``trainer.callbacks.requeue.RequeueOnSignal`` reads the flag at
safe points and does the work.
"""
from __future__ import annotations

import os
import signal
from types import FrameType

#: the signals that mean "save and requeue": SLURM's --signal=USR1@N and preemption/time-limit TERM
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_received: list[int] = []
_installed: list[int] = []


def _note_signal(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)


def install_signal_handlers(signals=REQUEUE_SIGNALS) -> None:
    """Install the flag-only handler for ``signals`` (idempotent; main thread only)."""
    for sig in signals:
        signal.signal(sig, _note_signal)
        if sig not in _installed:
            _installed.append(sig)


def installed() -> tuple[int, ...]:
    """The signals whose handler this process installed (empty: requeue is inactive)."""
    return tuple(_installed)


def received() -> int | None:
    """The first requeue signal this process received, if any."""
    return _received[0] if _received else None


def under_slurm_job() -> bool:
    """Inside a SLURM batch job or step (not an interactive shell)."""
    return "SLURM_JOB_ID" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def slurm_job_id() -> str | None:
    """``SLURM_JOB_ID``, or ``<array job>_<task>`` for an array task."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")
