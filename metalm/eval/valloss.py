"""Validation loss / perplexity, and the fixed token batch the rank and entropy probes run on.

val_loss is the token-weighted mean next-token cross-entropy (nats) over every target token of the held-out
batches; val_ppl = exp(val_loss). The trainer's periodic val_loss (metalm.train.loop.Trainer.validate) has the
same definition over the batches it reads, so the two are one number whenever they read the same sequences.
The logits are computed a chunk of positions at a time (`nll_sum`), never for a whole batch at once: at a
50k vocabulary a batch of 8 x 2048 tokens would be 3.3 GB of them.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from metalm.storage import is_url
from metalm.data.errors import DataError, parse_json

log = logging.getLogger("metalm.eval.valloss")
LOGIT_ELEMENTS = 1 << 22  # fp32 logits per LM-head chunk (16 MiB): a batch's full logits are never materialised


def as_tokens(item) -> torch.Tensor:
    """A (B, T+1) LongTensor from a loader batch (a (B, T+1) tensor) or one (T+1,) sequence."""
    t = torch.as_tensor(item)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[1] < 2:
        raise ValueError(f"expected a (B, T+1) token batch, got shape {tuple(t.shape)}")
    return t.long()


def nll_sum(model, inp: torch.Tensor, tgt: torch.Tensor, logit_elements: int = LOGIT_ELEMENTS) -> float:
    """Sum over every position of -log p(tgt | inp) (nats): the LM head and the cross-entropy run on chunks of
    positions whose fp32 logits hold at most `logit_elements` numbers (at least one position per chunk)."""
    h = model.hidden_states(inp)
    h = h.reshape(-1, h.shape[-1])
    flat = tgt.reshape(-1)
    rows = max(1, logit_elements // model.cfg.vocab_size)
    total = 0.0
    for start in range(0, h.shape[0], rows):
        logits = model.lm_head(h[start: start + rows]).float()
        total += float(F.cross_entropy(logits, flat[start: start + rows], reduction="sum"))
    return total


@torch.no_grad()
def validation_loss(model, batches: Iterable, max_batches: int | None = None, device="cpu",
                    logit_elements: int = LOGIT_ELEMENTS) -> dict:
    was = model.training
    model.eval()
    total, count, n = 0.0, 0, 0
    try:
        for item in batches:
            if max_batches is not None and n >= max_batches:
                break
            b = as_tokens(item).to(device)
            T = min(b.shape[1] - 1, model.cfg.max_seq_len)
            inp, tgt = b[:, :T], b[:, 1: T + 1]
            total += nll_sum(model, inp, tgt, logit_elements)
            count += tgt.numel()
            n += 1
    finally:
        model.train(was)
    if count == 0:
        raise ValueError("no validation batches")
    loss = total / count
    return {"val_loss": loss, "val_ppl": math.exp(loss) if loss < 700 else float("inf"), "val_tokens": count,
            "val_batches": n}


def val_batches_from_config(cfg, batch_size: int):
    """(iterator of (B, T+1) validation batches, None) from the data loader, or (None, reason) when there is
    no validation data. T is the shards' packed length; the batch size is set to `batch_size`, no shuffling.
    Missing or unreadable shards (DataError, OSError) are a reason; any other exception is a bug and propagates."""
    from metalm.data.loader import build_loader

    shards = cfg.data.shards
    if not is_url(shards) and not (Path(shards) / "manifest.json").is_file():
        return None, f"no data shards at data.shards={shards!r} (manifest.json missing)"
    try:
        loader = build_loader(cfg.data, split="val", seq_len=cfg.train.seq_len, micro_batch=batch_size,
                              seed=cfg.train.seed, shuffle=False)
        return iter(loader), None
    except (DataError, OSError) as e:  # a broken or missing val split (StorageError is an OSError)
        return None, f"cannot build the validation loader: {type(e).__name__}: {e}"


def probe_batch_from_text(path: str, encode, batch_size: int, seq_len: int, text_field: str = "text") -> torch.Tensor:
    """A fixed (B, T+1) batch: the file's documents (txt: blank-line separated; jsonl: `text_field`) tokenized,
    concatenated in file order and cut into B rows of T+1 tokens. Deterministic for a given file. A file that is
    not UTF-8, a jsonl line without a string `text_field`, or too few tokens is a DataError naming the file."""
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if p.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            record = parse_json(line, f"{path}:{n}")
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise DataError(f"{path}:{n}: expected an object with a string {text_field!r} field")
            docs.append(record[text_field])
    else:
        docs = [d for d in raw.split("\n\n") if d.strip()]
    need = batch_size * (seq_len + 1)
    ids: list[int] = []
    for d in docs:
        ids.extend(encode(d))
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise DataError(f"{path}: only {len(ids)} tokens, need {need} for a {batch_size} x {seq_len + 1} batch")
    return torch.tensor(ids[:need], dtype=torch.long).view(batch_size, seq_len + 1)
