"""The error that stops a training run, and the one-line description of a failed write used in its messages."""
from __future__ import annotations

import errno


class TrainingError(RuntimeError):
    """A condition that stops training: non-finite losses, repeated checkpoint failures, an unusable run
    directory, a run directory in use. The message names the step or the path (and errno)."""


def describe_error(e: BaseException) -> str:
    """One line for a failed write: the errno name and number and the path for OSErrors."""
    if isinstance(e, OSError):
        name = errno.errorcode.get(e.errno or 0, "")
        return (f"{name + ' ' if name else ''}[Errno {e.errno}] {e.strerror or e}"
                + (f": '{e.filename}'" if e.filename else ""))
    return f"{type(e).__name__}: {e}"
