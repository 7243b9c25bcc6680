"""The cluster's requeue signals, in every process of a job step. Standard library only, on purpose.

Slurm signals *every* process of a job step (``--signal=USR1@N``, ``scancel -s``, the time
limit's TERM, preemption, an outside ``scontrol requeue``): each rank's main process and each of
its DataLoader workers. The design:

* **Main processes** note the signal and nothing else (:func:`install_signal_handlers`, called
  by ``launch.py fit`` before torch and Lightning are imported, so a signal during start-up is
  not fatal). ``trainer.callbacks.requeue.RequeueOnSignal`` reads the flag at the next safe
  point, checkpoints there (outside any handler: saving inside one can stall or corrupt the
  file, Lightning#21406) and requeues the job once.
* **DataLoader workers** leave the cluster's USR1/TERM to their main process. PyTorch installs
  its own SIGTERM handler in each worker, which kills the worker when the TERM does not come
  from its parent; the main process then fails mid-step ("DataLoader worker (pid N) is killed
  by signal: Terminated") before any checkpoint. :func:`shield_loader_kwargs` gives a loader a
  ``worker_init_fn`` that blocks USR1/TERM in the worker and consumes them in a small thread
  (``sigwaitinfo``): a TERM sent by the worker's parent (the DataLoader shutting a stuck worker
  down, ``multiprocessing`` at exit) still ends the worker, as PyTorch's handler does; anything
  else is dropped. Its ``multiprocessing_context`` blocks the two signals in the parent while
  it starts a worker, so a worker is covered from its first instruction (signal masks are
  inherited through fork and exec), not only from its ``worker_init_fn`` on.

Covered: the ``fork`` and ``spawn`` start methods (Linux defaults up to Python 3.13). Under
``forkserver`` a worker is forked by the server process, whose mask this code does not set.
"""
from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.context as mp_context
import os
import signal
import threading
from contextlib import contextmanager
from types import FrameType
from typing import Callable, Iterator

#: the signals that mean "save and requeue": SLURM's --signal=USR1@N and preemption/time-limit TERM
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_received: list[int] = []
_installed: list[int] = []


# ============================================================================ main processes
def _note_signal(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)


def install_signal_handlers(signals=REQUEUE_SIGNALS, handler=_note_signal) -> None:
    """Install the flag-only handler (or ``handler``) for ``signals`` (idempotent; main thread
    only), and ignore them once the process is exiting (see :func:`_ignore_while_exiting`)."""
    for sig in signals:
        signal.signal(sig, handler)
        if sig not in _installed:
            _installed.append(sig)
    if not _exit_hook:
        _exit_hook.append(atexit.register(_ignore_while_exiting))


_exit_hook: list[Callable[[], None]] = []


def _ignore_while_exiting() -> None:
    # Python puts the default handlers back while it shuts down, and a signal's default action
    # is to end the process: a warning signal arriving after the work is done (a pipeline's
    # report written, a run's last step taken) would turn a finished job into a FAILED one with
    # exit 128+signum (seen on the local cluster). Nothing is left to save by then.
    for sig in _installed:
        signal.signal(sig, signal.SIG_IGN)


def installed() -> tuple[int, ...]:
    """The signals whose handler this process installed (empty: requeue is inactive)."""
    return tuple(_installed)


def received() -> int | None:
    """The first requeue signal this process received, if any."""
    return _received[0] if _received else None


def received_term() -> bool:
    """True once a SIGTERM arrived (the job ends after KillWait; USR1 leaves ``--signal-lead``)."""
    return signal.SIGTERM in _received


def signal_name(signum: int | None) -> str:
    try:
        return signal.Signals(signum).name
    except (ValueError, TypeError):
        return str(signum)


def under_slurm_job() -> bool:
    """Inside a SLURM batch job or step (not an interactive shell)."""
    return "SLURM_JOB_ID" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def slurm_job_id() -> str | None:
    """``SLURM_JOB_ID``, or ``<array job>_<task>`` for an array task."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")


def ignore_requeue_signals() -> None:
    """``preexec_fn`` for helper commands a job runs (exports in a pipeline): they finish their
    work and leave the decision to the process that started them (SIG_IGN survives exec)."""
    for sig in REQUEUE_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


# ============================================================================ DataLoader workers
@contextmanager
def requeue_signals_blocked() -> Iterator[None]:
    """Block USR1/TERM in this thread for the ``with`` body; pending ones arrive after it."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, REQUEUE_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def shield_worker() -> None:
    """In a DataLoader worker: block USR1/TERM and consume them in a daemon thread.

    A TERM whose sender is this worker's parent ends the worker at once (exit status 0, as
    PyTorch's own handler does when its DataLoader terminates it); every other USR1/TERM is
    dropped, so the worker keeps serving batches until its main process stops it.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, REQUEUE_SIGNALS)
    parent = os.getppid()
    threading.Thread(target=_consume_signals, args=(parent,), name="requeue-signal-shield", daemon=True).start()


def _consume_signals(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo(REQUEUE_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)


class ShieldedWorkerInit:
    """``worker_init_fn`` that runs :func:`shield_worker`, then the loader's own init function.

    A module-level class, so the ``spawn`` start method can pickle it.
    """

    def __init__(self, then: Callable[[int], None] | None = None):
        self.then = then

    def __call__(self, worker_id: int) -> None:
        shield_worker()
        if self.then is not None:
            self.then(worker_id)


class _BlockWhileStarting:
    def start(self) -> None:
        # the child inherits this thread's mask: blocked from its first instruction until the
        # shield's thread takes the signals over
        with requeue_signals_blocked():
            super().start()


class _ForkProcess(_BlockWhileStarting, mp_context.ForkProcess):
    pass


class _SpawnProcess(_BlockWhileStarting, mp_context.SpawnProcess):
    pass


class _ShieldedFork(mp_context.ForkContext):
    Process = _ForkProcess


class _ShieldedSpawn(mp_context.SpawnContext):
    Process = _SpawnProcess


def shielded_context(method: str | None = None) -> multiprocessing.context.BaseContext:
    """A multiprocessing context for DataLoader workers (``method``: default start method)."""
    # (get_start_method() without allow_none would fix the process-wide default as a side effect)
    method = method or multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    if method == "fork":
        return _ShieldedFork()
    if method == "spawn":
        return _ShieldedSpawn()
    return multiprocessing.get_context(method)  # forkserver: see the module docstring


def shield_loader_kwargs(num_workers: int, worker_init_fn: Callable[[int], None] | None = None) -> dict:
    """``DataLoader`` keyword arguments that shield its workers (empty without workers)."""
    if num_workers <= 0:
        return {"worker_init_fn": worker_init_fn} if worker_init_fn is not None else {}
    return {"worker_init_fn": ShieldedWorkerInit(worker_init_fn), "multiprocessing_context": shielded_context()}


def loader_is_shielded(loader) -> bool:
    """False for a loader whose workers would die on the cluster's TERM (for a warning)."""
    if getattr(loader, "num_workers", 0) <= 0:
        return True
    return isinstance(getattr(loader, "worker_init_fn", None), ShieldedWorkerInit)
