"""The one error type of the data pipeline."""
from __future__ import annotations


class DataError(ValueError):
    """Bad input data, shards, manifests or tokenizers; the message names the file (and line, shard or key)."""
