"""Helpers of the evaluator tests: tiny checkpoints written as the trainer writes them (with their own toy tokenizer
and a probe text), the evaluator's jsonl results read back, and a plain numpy effective rank to check against."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from metalm.checkpoint import MARKER, save_weights
from metalm.config import load_config, to_yaml
from metalm.model import build_model

TEXT = ["the quick brown fox jumps over the lazy dog", "Ann met Bob in New York", "Paris is in France",
        "Tokyo and Kyoto are cities in Japan", "Marie Curie worked in Paris"]
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=48",
        "model.vocab_size=320", "model.max_seq_len=64", "train.seq_len=32", "eval.seq_len=24",
        "eval.batch_size=2", "eval.metrics=[val_loss,rank,entropy]", "logging.wandb=false"]


def toy_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT * 10, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok


def write_assets(d: Path) -> Path:
    """d/tokenizer.json (the toy tokenizer) and d/probe.txt (TEXT repeated), what make_ckpt needs."""
    toy_tokenizer().save(str(d / "tokenizer.json"))
    (d / "probe.txt").write_text("\n\n".join(TEXT * 6))
    return d


def make_ckpt(root: Path, step: int, assets: Path, complete=True, extra=()):
    cfg = load_config(None, TINY + [f"data.shards={root}/no-shards", f"eval.probe_text={assets / 'probe.txt'}",
                                    *extra])
    torch.manual_seed(step)
    d = root / "checkpoints" / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(to_yaml(cfg))
    save_weights(build_model(cfg.model), d / "model.safetensors")
    (d / "tokenizer.json").write_bytes((assets / "tokenizer.json").read_bytes())
    (d / "trainer_state.json").write_text(json.dumps({"step": step, "tokens": step * 64}))
    if complete:
        (d / MARKER).write_text("ok\n")
    return d


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def np_er(m) -> float:
    """Plain reference effective rank: exp(-Σ p ln p), p = σ / Σσ, skipping exact zeros."""
    s = np.linalg.svd(np.asarray(m, dtype=np.float64), compute_uv=False)
    p = s / s.sum()
    return float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()))
