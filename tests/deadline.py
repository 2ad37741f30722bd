"""A time limit for a test body that could hang (a reader looping on hostile input, a loader waiting forever)."""
from __future__ import annotations

import signal
from contextlib import contextmanager


@contextmanager
def deadline(seconds: float):
    """Fail with TimeoutError (instead of hanging the suite) when the body runs longer than `seconds`."""
    def expire(*_):
        raise TimeoutError(f"took longer than {seconds} s (a hang)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
