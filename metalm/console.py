"""One format for what metalm's programs tell the user on stderr: `PROG: LEVEL: message`, e.g.
`metalm: warning: ...`, `metalm: warning (rank 1): ...` in a multi-process run, `metalm-evaluate: info: ...`.

Modules log on the `metalm.*` loggers (or call `warn`); each entry point installs `console_handler` once, so every
line of a program looks the same whichever module wrote it.
"""
from __future__ import annotations

import logging
import sys
import time

LOGGER = "metalm"


class ConsoleFormatter(logging.Formatter):
    def __init__(self, prog: str = "metalm", rank: int | None = None, timestamps: bool = False):
        super().__init__()
        self.prog, self.rank, self.timestamps = prog, rank, timestamps

    def format(self, record: logging.LogRecord) -> str:
        where = f" (rank {self.rank})" if self.rank is not None else ""
        text = f"{self.prog}: {record.levelname.lower()}{where}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if self.timestamps:
            text = time.strftime("%Y-%m-%d %H:%M:%S ", time.localtime(record.created)) + text
        return text


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is when a record arrives (not the one at creation)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def console_handler(prog: str = "metalm", rank: int | None = None, timestamps: bool = False) -> logging.Handler:
    """A stderr handler with the one format; `rank` goes into every line (set it in multi-process runs)."""
    handler = _StderrHandler()
    handler.setFormatter(ConsoleFormatter(prog, rank, timestamps))
    return handler


def warn(text: str) -> None:
    """A warning for the user, logged on the `metalm` logger (shown by the entry point's console handler)."""
    logging.getLogger(LOGGER).warning(text)
