"""The one error type of the data pipeline (and its kind for paths that leave their directory), and JSON parsing
that reports through it."""
from __future__ import annotations

import json
from typing import Any


class DataError(ValueError):
    """Bad input data, shards, manifests or tokenizers; the message names the file (and line, shard or key)."""


class UnsafePathError(DataError):
    """A path found in data we were handed (a manifest entry, a tar member name, a symlink's target) that leads
    out of the directory it belongs to. `where` is the file that holds it, `path` the offending path."""

    def __init__(self, message: str, where: str = "", path: str = ""):
        super().__init__(message)
        self.where, self.path = where, path  # restored by pickle from __dict__ (args holds the message only)


def parse_json(text: str | bytes, where: str) -> Any:
    """json.loads, with every way it can fail on bad input as a DataError naming `where` (a path, or path:line)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"column {e.colno}" if e.lineno == 1 else f"line {e.lineno} column {e.colno}"
        raise DataError(f"{where}: invalid JSON ({e.msg} at {at})") from None
    except RecursionError:
        raise DataError(f"{where}: invalid JSON (nested too deeply)") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise DataError(f"{where}: invalid JSON ({e})") from None
