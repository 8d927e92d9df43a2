"""Stopping on Ctrl-C (SIGINT) and SIGTERM, in every phase of a run.

The signal handler raises KeyboardInterrupt in the main thread, which unwinds through the
staged run directory (removed, or kept with its checkpoints for --resume). Two things could keep
a run going regardless, so the handler also sets a flag that the training loop checks between
steps and micro-batches and the example threads check before each example:
- an exception raised while the main thread happens to run a finaliser (`__del__`, a weakref
  callback) is printed as "Exception ignored" and dropped by Python;
- a library that catches BaseException around a callback would drop it too.

The handler is installed for SIGINT explicitly: a process started in the background by a
non-interactive shell (`cmd &` in a script, some CI runners) inherits SIGINT as *ignored*, and
Python then keeps it ignored instead of installing its KeyboardInterrupt handler, so Ctrl-C (or
`kill -INT`) would do nothing at all. That, not a race, is how a run kept training after SIGINT.
"""
from __future__ import annotations

import signal
import threading

_STOP = threading.Event()


def _handler(signum, frame):
    _STOP.set()
    raise KeyboardInterrupt(signal.Signals(signum).name)


def install() -> None:
    """Stop on SIGINT and SIGTERM (main thread only: that is where Python runs handlers)."""
    _STOP.clear()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _handler)


def clear() -> None:
    """The stop was handled (the command returned): a caller that goes on may train again."""
    _STOP.clear()


def requested() -> bool:
    return _STOP.is_set()


def check() -> None:
    """Raise KeyboardInterrupt if a stop signal arrived (even if its exception was lost)."""
    if _STOP.is_set():
        raise KeyboardInterrupt("stop requested")
