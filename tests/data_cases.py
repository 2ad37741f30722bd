"""Helpers of the data tests: ensure_prepared called on a whole config's sections (as the trainer calls it), and an
edit of a prepared directory's manifest."""
from __future__ import annotations

import json
from pathlib import Path

from metalm.data import ensure_prepared


def ensure(cfg, **kw):
    return ensure_prepared(cfg.data, seq_len=cfg.train.seq_len, vocab_size=cfg.model.vocab_size, seed=cfg.train.seed,
                           **kw)


def rewrite_manifest(shards_dir: Path, fn) -> None:
    """Load shards_dir/manifest.json, let `fn` change it in place, write it back."""
    path = shards_dir / "manifest.json"
    man = json.loads(path.read_text())
    fn(man)
    path.write_text(json.dumps(man))
