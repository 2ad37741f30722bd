"""Evaluate one checkpoint: every metric its config's `eval.metrics` asks for (validation loss, effective rank,
attention entropy, NER), returned as a result record that the watcher writes (metalm/eval/watcher.py).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger("metalm.eval.checkpoint_eval")

RESULT_VERSION = 1


def pick_device(spec: str) -> str:
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec


def _probe_batch(cfg, model, ckpt_dir: Path, encode_text: Callable[[], Callable]) -> tuple:
    """The fixed (B, T+1) batch for rank/entropy: first validation batch, else eval.probe_text."""
    from metalm.eval.valloss import as_tokens, probe_batch_from_text, val_batches_from_config

    B = cfg.eval.batch_size
    T = min(cfg.eval.seq_len, model.cfg.max_seq_len)
    it, reason = val_batches_from_config(cfg, B)
    if it is not None:
        try:
            b = as_tokens(next(it))
            return b[:B, : T + 1], "val"
        except StopIteration:
            reason = "the validation split is empty"
    if cfg.eval.probe_text:
        return probe_batch_from_text(cfg.eval.probe_text, encode_text(), B, T, cfg.data.text_field), "probe_text"
    return None, f"no probe batch: {reason}; set eval.probe_text to a text/jsonl file"


def evaluate_checkpoint(ckpt_dir: Path, overrides: list[str] | None = None, device: str = "cpu",
                        progress: Callable[[str], None] = lambda s: None) -> dict:
    """Every metric in the checkpoint's `eval.metrics` (after overrides), plus `ner` whenever eval.ner.train and
    eval.ner.test (or eval.ner.langs) are set. A metric that cannot run (no validation shards, no probe batch, no
    NER data) is listed under "skipped" with the reason. Returns the result record."""
    import torch

    from metalm.config import load_config
    from metalm.checkpoint import load_model, read_state

    t_start = time.time()
    ckpt_dir = Path(ckpt_dir)
    state = read_state(ckpt_dir)
    cfg = load_config(ckpt_dir / "config.yaml", overrides or [])
    model, _ = load_model(ckpt_dir, device)
    model.eval()
    metrics: dict[str, float] = {}
    skipped: dict[str, str] = {}
    details: dict = {}
    timing: dict[str, float] = {}
    tok_cache: list = []

    def tokenizer():
        if not tok_cache:
            from metalm.eval.ner import load_tokenizer_for

            tok_cache.append(load_tokenizer_for(ckpt_dir, cfg))
        return tok_cache[0]

    def text_encoder():
        from metalm.eval.ner import word_encoder

        enc = word_encoder(tokenizer())
        return lambda text: enc(text, 0)

    wanted = list(cfg.eval.metrics)
    nc = cfg.eval.ner
    if "ner" not in wanted and ((nc.train and nc.test) or nc.langs):
        wanted.append("ner")  # NER data configured: evaluate it (set eval.ner.train=null to turn it off)
    probe = None
    if "rank" in wanted or "entropy" in wanted:
        try:
            probe, src = _probe_batch(cfg, model, ckpt_dir, text_encoder)
        except Exception as e:  # noqa: BLE001
            probe, src = None, f"no probe batch: {type(e).__name__}: {e}"
        if probe is not None:
            probe = probe.to(device)
            details["probe"] = {"source": src, "shape": list(probe.shape)}
        else:
            details["probe"] = {"source": None, "reason": src}

    for name in wanted:
        t0 = time.time()
        if name == "val_loss":
            from metalm.eval.valloss import val_batches_from_config, validation_loss

            it, reason = val_batches_from_config(cfg, cfg.eval.batch_size)
            if it is None:
                skipped["val_loss"] = reason
                log.info("val_loss skipped: %s", reason)
                continue
            r = validation_loss(model, it, cfg.eval.val_batches, device)
            metrics.update({k: float(v) for k, v in r.items()})
            progress(f"val_loss {r['val_loss']:.4f}")
        elif name == "rank":
            from metalm.eval import rank

            r = rank.weight_ranks(model)
            details["rank_weight"] = r
            metrics.update(rank.flatten("rank/weight", r))
            if probe is None:
                skipped["rank_activations"] = skipped["rank_gradients"] = details["probe"]["reason"]
            else:
                ra = rank.activation_ranks(model, probe[:, :-1])
                rg = rank.gradient_ranks(model, probe)
                details["rank_activations"], details["rank_gradients"] = ra, rg
                metrics.update(rank.flatten("rank/act", ra))
                metrics.update(rank.flatten("rank/grad", rg))
            progress(f"rank: attention ER {r['attn_mean_er']:.2f} (PER {r['attn_mean_per']:.3f})")
        elif name == "entropy":
            from metalm.eval import entropy

            if probe is None:
                skipped["entropy"] = details["probe"]["reason"]
                continue
            r = entropy.attention_entropy(model, probe[:, :-1])
            details["entropy"] = r
            metrics.update(entropy.flatten("entropy", r))
            progress(f"entropy: normalised {r['norm_mean']:.3f}")
        elif name == "ner":
            from metalm.eval import ner

            if not ((nc.train and nc.test) or nc.langs):
                skipped["ner"] = "eval.ner.train/test (or eval.ner.langs) not set"
                log.info("ner skipped: %s", skipped["ner"])
                continue
            try:
                enc = ner.word_encoder(tokenizer(), nc.word_sep)
            except Exception as e:  # noqa: BLE001
                skipped["ner"] = f"no tokenizer: {e}"
                continue
            r = ner.run_ner(model, enc, nc, device, progress)
            details["ner"] = r
            metrics.update(ner.flatten("ner", r))
            if "test" in r:
                progress(f"ner: test F1 {r['test']['f1']:.4f}")
        timing[name] = round(time.time() - t0, 3)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {
        "version": RESULT_VERSION, "checkpoint": ckpt_dir.name, "step": state.step,
        "tokens": state.tokens, "metrics": metrics, "skipped": skipped, "timing": timing,
        "seconds": round(time.time() - t_start, 3), "device": device, "details": details,
        "run": {"wandb": bool(cfg.logging.wandb), "project": cfg.logging.project, "entity": cfg.logging.entity,
                "name": cfg.logging.run_name},
    }
