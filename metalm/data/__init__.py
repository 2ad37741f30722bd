"""Data pipeline: document sources -> tokenizer -> packed WebDataset shards -> resumable training stream.

    prepare(source, tokenizer_spec, out_dir, seq_len, ...) -> manifest      (CLI: metalm-prepare)
    ensure_prepared(cfg.data, seq_len=..., vocab_size=..., seed=...) -> manifest         (trainer)
    build_loader(cfg.data, split=..., seq_len=..., micro_batch=..., seed=...) -> loader  (trainer / evaluator)

The loader names (torch) are imported lazily: `metalm-prepare` and its tokenizer processes never import torch.
"""
from __future__ import annotations

import warnings

from metalm.data.errors import DataError
from metalm.data.manifest import load_manifest, validate_manifest
from metalm.data.prepare import ensure_prepared, prepare
from metalm.data.sources import iter_documents
from metalm.data.tokenizer import Tokenizer, load_tokenizer, train_bpe

# `python -m metalm.data.prepare` imports this package (hence the submodule) before running it as __main__;
# runpy then warns although nothing is wrong (the module holds no state that the second copy would miss).
warnings.filterwarnings("ignore", message=r"'metalm\.data\.prepare' found in sys\.modules", category=RuntimeWarning)

_LAZY = {"ShardLoader", "build_loader"}

__all__ = [
    "DataError",
    "ShardLoader",
    "Tokenizer",
    "build_loader",
    "ensure_prepared",
    "iter_documents",
    "load_manifest",
    "load_tokenizer",
    "prepare",
    "train_bpe",
    "validate_manifest",
]


def __getattr__(name: str):
    if name in _LAZY:
        from metalm.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'metalm.data' has no attribute {name!r}")
