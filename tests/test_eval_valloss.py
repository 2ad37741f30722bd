"""Validation loss / perplexity against a per-token reference, the trainer's val_loss as the same number, and the
fixed probe batch."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from procs import cpu_run_env

from metalm.config import load_config
from metalm.data import DataError
from metalm.eval.valloss import as_tokens, nll_sum, probe_batch_from_text, val_batches_from_config, validation_loss
from metalm.model import build_model

TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=48",
        "model.vocab_size=97", "model.max_seq_len=32", "train.seq_len=16"]


def test_token_weighted_mean_over_batches():
    torch.manual_seed(0)
    model = build_model(load_config(None, TINY).model)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 97, (3, 9), generator=g), torch.randint(0, 97, (1, 9), generator=g),
               torch.randint(0, 97, (2, 9), generator=g)]
    # reference: every target token's -log p, one sequence at a time, summed in Python
    nll, n = 0.0, 0
    with torch.no_grad():
        for b in batches[:2]:
            for row in b:
                logp = torch.log_softmax(model(row[None, :-1])[0].double(), -1)
                for t in range(8):
                    nll -= float(logp[t, row[t + 1]])
                    n += 1
    r = validation_loss(model, iter([batches[0], batches[1], batches[2]]), max_batches=2)
    assert r["val_tokens"] == n == 32 and r["val_batches"] == 2
    assert r["val_loss"] == pytest.approx(nll / n, rel=1e-5)
    assert r["val_ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_chunked_lm_head_equals_the_full_logits():
    """The LM head in chunks of positions (1, 5 and all 14 rows of a 2 x 7 batch; 5 does not divide 14) gives the
    loss of the whole batch's logits, and validation_loss with tiny chunks the full-logits token-weighted mean."""
    torch.manual_seed(0)
    model = build_model(load_config(None, TINY).model).eval()
    b = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(2))
    inp, tgt = b[:, :-1], b[:, 1:]
    with torch.no_grad():
        logits = model(inp).float()
        full = float(torch.nn.functional.cross_entropy(logits.reshape(-1, 97), tgt.reshape(-1), reduction="sum"))
        for rows in (1, 5, 14):
            assert nll_sum(model, inp, tgt, logit_elements=rows * 97) == pytest.approx(full, rel=1e-6)
        assert nll_sum(model, inp, tgt, logit_elements=1) == pytest.approx(full, rel=1e-6)  # under one row: one row
    r = validation_loss(model, iter([b]), logit_elements=3 * 97)
    assert r["val_loss"] == pytest.approx(full / 14, rel=1e-6) and r["val_tokens"] == 14


def test_as_tokens_shapes():
    assert as_tokens(torch.arange(5)).shape == (1, 5)
    assert as_tokens(torch.zeros(2, 3, dtype=torch.int32)).dtype == torch.long
    with pytest.raises(ValueError):
        as_tokens(torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError):
        as_tokens(torch.zeros(2, 3, 4))


def test_probe_batch_from_text(tmp_path):
    p = tmp_path / "probe.txt"
    p.write_text("ab\n\ncde\n\nfgh ij\n")
    enc = lambda s: [ord(c) for c in s]
    b = probe_batch_from_text(str(p), enc, batch_size=2, seq_len=3)
    assert b.tolist() == [[ord(c) for c in "abcd"], [ord(c) for c in "efgh"]]
    with pytest.raises(ValueError, match="only 12 tokens, need 16"):  # "ab" + "cde" + "fgh ij\n"
        probe_batch_from_text(str(p), enc, batch_size=4, seq_len=3)
    j = tmp_path / "probe.jsonl"
    j.write_text('{"text": "xy"}\n{"text": "zw"}\n')
    assert probe_batch_from_text(str(j), enc, 1, 3).tolist() == [[ord(c) for c in "xyzw"]]


def test_no_shards_gives_a_reason(tmp_path):
    cfg = load_config(None, TINY + [f"data.shards={tmp_path}/none"])
    it, reason = val_batches_from_config(cfg, 4)
    assert it is None and reason


def test_probe_jsonl_without_the_text_field_names_the_line(tmp_path):
    j = tmp_path / "probe.jsonl"
    j.write_text('{"text": "xy"}\n\n{"body": "zw"}\n')
    with pytest.raises(DataError, match=f"^{j}:3: expected an object with a string 'text' field$"):
        probe_batch_from_text(str(j), lambda s: [ord(c) for c in s], 1, 3)


def test_unreadable_shards_are_a_reason_but_a_bug_propagates(tmp_path, monkeypatch):
    import metalm.data.loader as loader_mod

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text("{not json")
    cfg = load_config(None, TINY + [f"data.shards={shards}"])
    it, reason = val_batches_from_config(cfg, 4)
    assert it is None and reason.startswith("cannot build the validation loader: DataError: ")
    assert str(shards / "manifest.json") in reason

    def broken(*args, **kw):
        raise TypeError("a bug in the loader")

    monkeypatch.setattr(loader_mod, "build_loader", broken)
    with pytest.raises(TypeError, match="a bug in the loader"):
        val_batches_from_config(cfg, 4)


@pytest.mark.slow
def test_the_trainer_and_the_evaluator_log_one_val_loss(tmp_path, shards):
    """Both read all 39 validation sequences of the conftest shards, the trainer in 10 batches of 4 (the last of 3),
    the evaluator in 3 batches of 13: one definition (token-weighted) gives one number. The mean of the trainer's
    per-batch means, its old definition, weighed the short last batch as a whole one."""
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["splits"]["val"]["samples"] == 39
    repo = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    cmd = [sys.executable, str(repo / "launchers" / "pretrain.py"), "--config", str(repo / "configs" / "cpu-tiny.yaml"),
           "train.seq_len=64", "model.max_seq_len=64", "model.n_layers=2", "train.micro_batch=4",
           "train.global_batch=4", "train.max_steps=1", "train.val_every=1", "train.val_batches=100",
           "checkpoint.every=1", "meta.enabled=false", "logging.wandb=false", "logging.progress=false",
           "data.prepare_if_missing=false", f"data.shards={shards}", f"train.run_dir={run}"]
    out = subprocess.run(cmd, cwd=tmp_path, env=cpu_run_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    trainer = [r["val_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if "val_loss" in r]
    from metalm.eval.checkpoint_eval import evaluate_checkpoint

    rec = evaluate_checkpoint(run / "checkpoints" / "step_00000001",
                              ["eval.metrics=[val_loss]", "eval.batch_size=13", "eval.val_batches=100"])
    assert rec["metrics"]["val_tokens"] == 39 * 64 and rec["metrics"]["val_batches"] == 3
    assert len(trainer) == 1 and trainer[0] == pytest.approx(rec["metrics"]["val_loss"], rel=2e-6, abs=0)
