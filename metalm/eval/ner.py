"""NER fine-tuning of a decoder checkpoint (token classification) and span-level F1.

Protocol (PAPER.md §3 "NER", with the fixes of §5 item 11 as options):
- words are encoded one by one (`word_sep + word` for every word but the first, so the sub-tokens are those of
  the running text; word_sep is " " by default, "" for ja/zh); the FIRST sub-token of each word carries the
  word's label (the paper's protocol), the others are ignored (-100). `label_token: last` labels the last
  sub-token instead, which a causal decoder sees only after the whole word. Inputs are truncated to `max_len`
  tokens. A word cut off by truncation gets no prediction and is scored as `O` against its gold tag (so
  truncation can only lower F1).
- a linear head (or linear head + linear-chain CRF) on the decoder's final-norm hidden state; the decoder is
  causal, so each word sees only its left context.
- mode `head`: the backbone is frozen. Its features do not change during training, so they are computed once
  (eval mode, no_grad) and the head trains on the cached features: the same numbers, 10x less compute.
  mode `full`: a copy of the backbone trains with the head (the caller's model is never modified).
- AdamW (torch defaults, weight decay `weight_decay`), linear decay to 0 over all epochs, no warm-up, batch
  `batch_size`, `epochs`, seeded shuffling and head initialisation (`seed`).
- the training loss is logged every `log_every` steps as the mean over those steps (HF Trainer's convention);
  t90 / AUC / initial slope of that curve measure fine-tuning speed (PAPER.md §3).
- dev F1 after each epoch when a dev set is given; with `early_stopping` the best-dev-F1 state is restored at
  the end and training stops after `patience` epochs without improvement; without it the final weights are used.
- metric: seqeval's default (non-strict, conlleval-compatible) micro precision/recall/F1, plus per-type F1.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from metalm.checkpoint import TOKENIZER_FILE
from metalm.data.errors import DataError
from metalm.eval.crf import LinearChainCRF
from metalm.eval.iob2 import Sentence, read_iob2
from metalm.eval.ner_metrics import initial_slope, loss_auc, span_metrics, t90

log = logging.getLogger("metalm.eval.ner")

WordEncoder = Callable[[str, int], list]  # (word, index in sentence) -> sub-token ids


# ----------------------------------------------------------------------------------------------- tokenizers


def word_encoder(tokenizer, word_sep: str = " ") -> WordEncoder:
    """Adapt a tokenizer (`tokenizers.Tokenizer` or anything with `.encode(text) -> list[int]`) to words:
    word i > 0 is encoded as `word_sep + word`, so its sub-tokens are those of the running text. Use
    word_sep="" for scripts written without spaces (Japanese, Chinese): with a byte-level BPE, " 日本" starts
    with a lone space token, which would then carry the label."""
    from tokenizers import Tokenizer as HFTokenizer

    if isinstance(tokenizer, HFTokenizer):
        def enc(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False).ids
    elif hasattr(tokenizer, "encode"):
        def enc(text: str) -> list[int]:
            out = tokenizer.encode(text)
            return list(out.ids) if hasattr(out, "ids") else list(out)
    else:
        raise TypeError(f"cannot encode text with {type(tokenizer).__name__}")
    cache: dict[tuple[str, bool], list[int]] = {}

    def encode_word(word: str, index: int) -> list[int]:
        key = (word, index == 0)
        if key not in cache:
            cache[key] = enc(word if index == 0 else word_sep + word)
        return cache[key]

    return encode_word


def load_tokenizer_for(ckpt_dir: Path | None, cfg) -> object:
    """The tokenizer a run trained with: the checkpoint's tokenizer.json, else the config's `data.tokenizer`."""
    if ckpt_dir is not None and (Path(ckpt_dir) / TOKENIZER_FILE).is_file():
        from tokenizers import Tokenizer

        path = Path(ckpt_dir) / TOKENIZER_FILE
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 (the Rust side raises a plain Exception for a malformed file)
            raise DataError(f"{path}: not a valid tokenizers JSON ({e})") from None
    from metalm.data.tokenizer import load_tokenizer

    return load_tokenizer(cfg.data.tokenizer)


# ----------------------------------------------------------------------------------------------- encoding


@dataclass
class Example:
    input_ids: list[int]
    word_pos: list[int]  # position of each kept word's labelled sub-token (words cut by truncation are absent)
    labels: list[int]  # label id of each kept word
    n_words: int


def encode_sentence(words: Sequence[str], encode_word: WordEncoder, max_len: int,
                    label_token: str = "first") -> tuple[list[int], list[int]]:
    """(input_ids truncated to max_len, position of the labelled sub-token of every word that survives).

    label_token "first": a word survives if its first sub-token fits; "last": if its last sub-token fits."""
    ids: list[int] = []
    pos: list[int] = []
    for i, w in enumerate(words):
        sub = encode_word(w, i)
        if not sub:
            raise ValueError(f"word {w!r} encodes to no tokens")
        p = len(ids) if label_token == "first" else len(ids) + len(sub) - 1
        if p >= max_len:
            break
        pos.append(p)
        ids.extend(sub)
    return ids[:max_len], pos


def build_label_list(*sentence_sets: Sequence[Sentence]) -> list[str]:
    """'O' first, then B-/I- of every type seen, sorted by type then B before I."""
    types = sorted({t[2:] for ss in sentence_sets for s in ss for t in s.tags if t != "O"})
    return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]


def encode_dataset(sentences: Sequence[Sentence], encode_word: WordEncoder, label2id: dict[str, int],
                   max_len: int, vocab_size: int, label_token: str = "first") -> list[Example]:
    out = []
    for s in sentences:
        ids, pos = encode_sentence(s.tokens, encode_word, max_len, label_token)
        bad = [i for i in ids if i >= vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} >= model.vocab_size={vocab_size}: the tokenizer does not match "
                             "the model")
        labels = [label2id.get(t, 0) for t in s.tags[: len(pos)]]  # tags unseen in training -> O
        out.append(Example(ids, pos, labels, len(s.tokens)))
    return out


# ----------------------------------------------------------------------------------------------- model


class TokenClassifier(nn.Module):
    """Linear (optionally + CRF) head on the backbone's final-norm hidden states at word positions."""

    def __init__(self, backbone: nn.Module, num_labels: int, crf: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.cfg.d_model, num_labels)
        self.crf = LinearChainCRF(num_labels) if crf else None

    def word_features(self, input_ids: torch.Tensor, word_pos: torch.Tensor) -> torch.Tensor:
        """(B,T) ids, (B,W) positions (padded with 0) -> (B,W,d)."""
        h = self.backbone.hidden_states(input_ids)
        return h.gather(1, word_pos.unsqueeze(-1).expand(-1, -1, h.shape[-1]))

    def loss(self, emissions: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.crf is not None:
            return self.crf.nll(emissions.float(), labels, mask)
        return F.cross_entropy(emissions.float()[mask], labels[mask])

    def decode(self, emissions: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        if self.crf is not None:
            return self.crf.decode(emissions.float(), mask)
        best = emissions.argmax(-1)
        return [best[b, : int(mask[b].sum())].tolist() for b in range(best.shape[0])]


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    n = max(1, max(len(s) for s in seqs))
    return torch.tensor([s + [value] * (n - len(s)) for s in seqs], dtype=torch.long)


def _collate(batch: list[Example]):
    ids = _pad([e.input_ids for e in batch], 0)  # right padding: causal attention never sees it
    pos = _pad([e.word_pos for e in batch], 0)
    labels = _pad([e.labels for e in batch], 0)
    mask = _pad([[1] * len(e.word_pos) for e in batch], 0).bool()
    return ids, pos, labels, mask


# ----------------------------------------------------------------------------------------------- training


@dataclass
class FinetuneResult:
    model: TokenClassifier
    labels: list[str]
    loss_steps: list[int] = field(default_factory=list)
    loss_values: list[float] = field(default_factory=list)
    dev_f1: list[float] = field(default_factory=list)
    best_epoch: int | None = None  # 1-based; None without dev set
    epochs_run: int = 0
    steps: int = 0
    seconds: float = 0.0

    def speed(self) -> dict:
        return {"t90": t90(self.loss_steps, self.loss_values), "auc": loss_auc(self.loss_steps, self.loss_values),
                "initial_slope": initial_slope(self.loss_steps, self.loss_values)}


class _eval_mode:
    """Put every submodule in eval mode and restore each one's own flag afterwards."""

    def __init__(self, module: nn.Module):
        self.flags = [(m, m.training) for m in module.modules()]

    def __enter__(self):
        for m, _ in self.flags:
            m.training = False

    def __exit__(self, *exc):
        for m, f in self.flags:
            m.training = f


def _head_mode_cache(model: TokenClassifier, examples: list[Example], device, batch_size: int) -> list[torch.Tensor]:
    """Frozen-backbone word features of every example, (n_words_kept, d) each."""
    feats = []
    with _eval_mode(model.backbone), torch.no_grad():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i: i + batch_size]
            ids, pos, _, _ = _collate(chunk)
            f = model.word_features(ids.to(device), pos.to(device)).float()
            for b, e in enumerate(chunk):
                feats.append(f[b, : len(e.word_pos)].cpu())
    return feats


def _emissions(model: TokenClassifier, batch: list[Example], idx: list[int], cache, device):
    if cache is not None:
        W = max(1, max(len(batch[j].word_pos) for j in range(len(batch))))
        d = model.head.in_features
        feats = torch.zeros(len(batch), W, d)
        for j, i in enumerate(idx):
            feats[j, : cache[i].shape[0]] = cache[i]
        feats = feats.to(device)
        _, _, labels, mask = _collate(batch)
    else:
        ids, pos, labels, mask = _collate(batch)
        feats = model.word_features(ids.to(device), pos.to(device))
    return model.head(feats), labels.to(device), mask.to(device)


def predict(model: TokenClassifier, examples: list[Example], labels: list[str], device="cpu",
            batch_size: int = 32, cache: list[torch.Tensor] | None = None) -> list[list[str]]:
    """Predicted tag strings per sentence; words cut off by truncation are predicted 'O'."""
    out = [["O"] * e.n_words for e in examples]
    keep = [i for i, e in enumerate(examples) if e.word_pos]  # a sentence can lose every word to truncation
    with _eval_mode(model), torch.no_grad():
        for b0 in range(0, len(keep), batch_size):
            idx = keep[b0: b0 + batch_size]
            em, _, mask = _emissions(model, [examples[i] for i in idx], idx, cache, device)
            for i, tags in zip(idx, model.decode(em, mask)):
                out[i] = [labels[t] for t in tags] + ["O"] * (examples[i].n_words - len(tags))
    return out


def finetune(backbone: nn.Module, encode_word: WordEncoder, train: Sequence[Sentence], cfg,
             dev: Sequence[Sentence] | None = None, device="cpu", labels: list[str] | None = None,
             progress: Callable[[str], None] | None = None) -> FinetuneResult:
    """Fine-tune a token classifier on `train` per NerConfig `cfg` (see the module docstring)."""
    t0 = time.time()
    labels = labels or build_label_list(train)
    label2id = {t: i for i, t in enumerate(labels)}
    vocab = backbone.cfg.vocab_size
    max_len = min(cfg.max_len, backbone.cfg.max_seq_len)
    lt = cfg.label_token
    train_ex = [e for e in encode_dataset(train, encode_word, label2id, max_len, vocab, lt) if e.word_pos]
    dev_ex = encode_dataset(dev, encode_word, label2id, max_len, vocab, lt) if dev else None
    if not train_ex:
        raise ValueError("no training sentences")

    head_only = cfg.mode == "head"
    if not head_only:
        backbone = copy.deepcopy(backbone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = TokenClassifier(backbone, len(labels), crf=cfg.crf)
    if head_only:
        # the caller's backbone is only read (features under no_grad); just the head moves to `device`
        model.head.to(device)
        if model.crf is not None:
            model.crf.to(device)
        cache = _head_mode_cache(model, train_ex, device, max(cfg.batch_size, 32))
        dev_cache = _head_mode_cache(model, dev_ex, device, max(cfg.batch_size, 32)) if dev_ex else None
        trainable = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    else:
        model.to(device)
        cache = dev_cache = None
        trainable = [p for p in model.parameters() if p.requires_grad]

    steps_per_epoch = math.ceil(len(train_ex) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    try:  # the fused kernel is several times faster (CPU and CUDA); same update rule
        opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, ValueError):
        opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (total - s) / total))
    gen = torch.Generator().manual_seed(cfg.seed)

    res = FinetuneResult(model, labels)
    best_f1, best_state, bad_epochs = -1.0, None, 0
    step, window = 0, []
    for epoch in range(1, cfg.epochs + 1):
        epoch_first_step, epoch_first_log = step, len(res.loss_values)
        if head_only:
            model.head.train()
        else:
            model.train()
        order = torch.randperm(len(train_ex), generator=gen).tolist()
        for b0 in range(0, len(order), cfg.batch_size):
            idx = order[b0: b0 + cfg.batch_size]
            em, y, mask = _emissions(model, [train_ex[i] for i in idx], idx, cache, device)
            loss = model.loss(em, y, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            window.append(float(loss.detach()))
            if step % cfg.log_every == 0 or step == total:
                res.loss_steps.append(step)
                res.loss_values.append(sum(window) / len(window))
                window = []
        if dev_ex is not None:
            dev_pred = predict(model, dev_ex, labels, device, cache=dev_cache)
            f1 = span_metrics([s.tags for s in dev], dev_pred, per_type=False)["f1"]
            res.dev_f1.append(f1)
            if f1 > best_f1:
                best_f1, res.best_epoch, bad_epochs = f1, epoch, 0
                if cfg.early_stopping:
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()
                                  if not (head_only and k.startswith("backbone."))}
            else:
                bad_epochs += 1
        res.epochs_run = epoch
        if progress:
            dev_txt = f", dev F1 {res.dev_f1[-1]:.3f}" if res.dev_f1 else ""
            if len(res.loss_values) > epoch_first_log:  # the last loss logged in this epoch
                loss_txt = f"loss {res.loss_values[-1]:.4f}"
            else:  # fewer steps so far than eval.ner.log_every: no value to show (never a stale one or a nan)
                loss_txt = (f"{step - epoch_first_step} steps, no loss logged in this epoch "
                            f"(eval.ner.log_every={cfg.log_every})")
            progress(f"ner epoch {epoch}/{cfg.epochs}: {loss_txt}{dev_txt}")
        if cfg.early_stopping and dev_ex is not None and bad_epochs >= cfg.patience:
            break
    if window:  # an early stop can leave a partial logging window
        res.loss_steps.append(step)
        res.loss_values.append(sum(window) / len(window))
    if cfg.early_stopping and best_state is not None:
        model.load_state_dict(best_state, strict=False)
    res.steps = step
    res.seconds = time.time() - t0
    return res


def evaluate(result: FinetuneResult, encode_word: WordEncoder, sentences: Sequence[Sentence], cfg,
             device="cpu") -> dict:
    model = result.model
    label2id = {t: i for i, t in enumerate(result.labels)}
    max_len = min(cfg.max_len, model.backbone.cfg.max_seq_len)
    ex = encode_dataset(sentences, encode_word, label2id, max_len, model.backbone.cfg.vocab_size, cfg.label_token)
    cache = _head_mode_cache(model, ex, device, 32) if cfg.mode == "head" else None
    pred = predict(model, ex, result.labels, device, cache=cache)
    out = span_metrics([s.tags for s in sentences], pred)
    out["n_sentences"] = len(sentences)
    out["n_truncated_words"] = sum(e.n_words - len(e.word_pos) for e in ex)
    return out


# ----------------------------------------------------------------------------------------------- runs


def _read(path: str, cfg) -> list[Sentence]:
    sents = read_iob2(path, token_col=cfg.token_col, tag_col=cfg.tag_col)
    if cfg.max_sentences:
        sents = sents[: cfg.max_sentences]
    return sents


def _summary(res: FinetuneResult) -> dict:
    out = {"loss_curve": {"steps": res.loss_steps, "loss": res.loss_values}, "dev_f1": res.dev_f1,
           "best_epoch": res.best_epoch, "epochs_run": res.epochs_run, "steps": res.steps,
           "seconds": round(res.seconds, 3)}
    out.update(res.speed())
    return out


def run_single(backbone, encode_word, cfg, device="cpu", progress=None) -> dict:
    """Train on cfg.train (dev cfg.dev), test on cfg.test."""
    train = _read(cfg.train, cfg)
    dev = _read(cfg.dev, cfg) if cfg.dev else None
    test = _read(cfg.test, cfg)
    res = finetune(backbone, encode_word, train, cfg, dev=dev, device=device,
                   labels=build_label_list(train, dev or [], test), progress=progress)
    out = _summary(res)
    out["test"] = evaluate(res, encode_word, test, cfg, device)
    return out


def run_multilingual(backbone, encode_word, cfg, device="cpu", progress=None) -> dict:
    """cfg.langs = [{lang, train, test, dev?}, ...]: in-language F1 per language and their average; with
    cfg.crosslingual, each model is also tested on every language's test set (a train x test F1 matrix)."""
    data = {}
    for entry in cfg.langs:
        data[entry["lang"]] = {
            "train": _read(entry["train"], cfg), "test": _read(entry["test"], cfg),
            "dev": _read(entry["dev"], cfg) if entry.get("dev") else None,
        }
    all_sets = [s for d in data.values() for k in ("train", "dev", "test") if d[k] for s in [d[k]]]
    labels = build_label_list(*all_sets)  # one label space, so every model can be tested on every language
    out: dict = {"langs": {}}
    for lang, d in data.items():
        if progress:
            progress(f"ner [{lang}] fine-tuning on {len(d['train'])} sentences")
        res = finetune(backbone, encode_word, d["train"], cfg, dev=d["dev"], device=device, labels=labels,
                       progress=progress)
        r = _summary(res)
        r["test"] = evaluate(res, encode_word, d["test"], cfg, device)
        if cfg.crosslingual:
            r["cross"] = {other: (r["test"] if other == lang else evaluate(res, encode_word, od["test"], cfg, device))
                          for other, od in data.items()}
        out["langs"][lang] = r
    f1s = [r["test"]["f1"] for r in out["langs"].values()]
    out["average_f1"] = sum(f1s) / len(f1s)
    if cfg.crosslingual:
        out["cross_f1"] = {a: {b: r["cross"][b]["f1"] for b in r["cross"]} for a, r in out["langs"].items()}
        out["cross_average_f1"] = {a: sum(row.values()) / len(row) for a, row in out["cross_f1"].items()}
    return out


def run_ner(backbone, encode_word, cfg, device="cpu", progress=None) -> dict:
    """Everything NerConfig `cfg` asks for: the single train/test pair and/or the multilingual list."""
    out: dict = {"mode": cfg.mode, "crf": cfg.crf, "early_stopping": cfg.early_stopping}
    if cfg.train and cfg.test:
        out.update(run_single(backbone, encode_word, cfg, device, progress))
    if cfg.langs:
        out["multilingual"] = run_multilingual(backbone, encode_word, cfg, device, progress)
    return out


def flatten(prefix: str, result: dict) -> dict[str, float]:
    flat: dict[str, float] = {}

    def add_test(p: str, t: dict) -> None:
        flat[f"{p}/f1"], flat[f"{p}/precision"], flat[f"{p}/recall"] = t["f1"], t["precision"], t["recall"]
        for typ, v in t["per_type"].items():
            flat[f"{p}/{typ}/f1"] = v["f1"]

    def add_speed(p: str, r: dict) -> None:
        for k in ("t90", "auc", "initial_slope"):
            if r.get(k) is not None:
                flat[f"{p}/{k}"] = float(r[k])
        if r.get("dev_f1"):
            flat[f"{p}/dev_f1_best"] = max(r["dev_f1"])

    if "test" in result:
        add_test(prefix, result["test"])
        add_speed(prefix, result)
    multi = result.get("multilingual")
    if multi:
        flat[f"{prefix}/avg_f1"] = multi["average_f1"]
        for lang, r in multi["langs"].items():
            add_test(f"{prefix}/{lang}", r["test"])
            add_speed(f"{prefix}/{lang}", r)
        for a, row in multi.get("cross_f1", {}).items():
            for b, v in row.items():
                flat[f"{prefix}/cross/{a}->{b}/f1"] = v
    return flat
