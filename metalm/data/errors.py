"""The one error type of the data pipeline, and JSON parsing that reports through it."""
from __future__ import annotations

import json
from typing import Any


class DataError(ValueError):
    """Bad input data, shards, manifests or tokenizers; the message names the file (and line, shard or key)."""


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
