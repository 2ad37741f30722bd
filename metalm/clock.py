"""Durations as a person reads them in progress lines: "m:ss", or "h:mm:ss" from an hour on."""
from __future__ import annotations


def hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
