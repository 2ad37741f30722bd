"""What a meta step costs, against an AR step and against the paper code's design, on the same batch.

    python benchmarks/meta_cost.py [--shapes cpu-tiny 11m] [--repeats 5] [--threads 1] [--literal cpu-tiny]

Per shape, median wall time of:
  ar         forward + backward of the next-token loss over the full vocabulary, as the AR step computes
             it (kernels.linear_cross_entropy: on CPU the chunked fused LM head + CE of kernels.cpu);
  meta       our step: metalm.meta.meta_loss (support features once, no grad; functional inner loop on the
             class rows) + backward, with the paper's episode (readout at the mask, raw features);
  shipped    the same step with the shipped meta defaults of configs/cpu-tiny.yaml (readout, windows,
             feature normalisation, head initialisation, inner learning rate), on an episode from the same batch;
  hybrid_ar / hybrid_meta   an AR and a meta micro-batch through the hybrid step that ships
             (metalm.train.step.HybridStep with configs/cpu-tiny.yaml's meta settings, the budget included, on a
             plain-autograd engine): the meta micro-batch of meta.objective=add holds the AR loss too, so its
             extra cost over an AR micro-batch is (hybrid_meta - hybrid_ar) / hybrid_ar;
  reference  the paper code's design: the head snapshotted, then every inner step re-runs the backbone on
             the support batch (backbone frozen), projects onto the full vocabulary and slices the class
             columns, backward, SGD step on the head; then the query loss with the adapted head, backward,
             head restored. This version applies the head only at the support/query positions, which is
             kinder to it than the paper code (that projects every position); --literal SHAPE... also times that one.
The same episode (smlmt sampler) is used by meta and reference, and their gradients are compared.
Batches are real text (English Wikipedia leads from ../shared/data, OLMo/GPT-NeoX tokenizer) when
available, else Zipf-distributed synthetic ids. Results: benchmarks/results/meta_cost-cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import kernels  # noqa: E402
from metalm.config import MetaConfig, MetaHeadConfig, ModelConfig  # noqa: E402
from metalm.config import load_config  # noqa: E402
from metalm.meta.fomaml import meta_loss  # noqa: E402
from metalm.meta.step import meta_step_loss  # noqa: E402
from metalm.meta.head import build_head  # noqa: E402
from metalm.meta.tasks import sample_episode  # noqa: E402
from metalm.model.llama import Transformer  # noqa: E402

DATA = REPO.parent / "shared" / "data"
VOCAB = 50304
EOS, PAD, MASK = 50279, 1, 50280  # GPT-NeoX ids; the mask token is the first id after the tokenizer's 50,280

# name: (model shape, batch, seq, meta settings). cpu-tiny-like uses configs/cpu-tiny.yaml's meta settings
# (16-way 2-shot, head hidden 64) at d_model 64; 11m is the paper's tiny model with its 32-way 4-shot episodes
# and 4-layer/128 head, at seq 512 (the paper's training length) and micro-batch 8.
SHAPES = {
    "cpu-tiny": (dict(d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=256), 8, 128,
                 dict(n_way=16, k_shot=2, q_queries=2, hidden=64)),
    "11m": (dict(d_model=96, n_layers=12, n_heads=12, n_kv_heads=4, ffn_hidden=384), 8, 512,
            dict(n_way=32, k_shot=4, q_queries=4, hidden=128)),
}
INNER_STEPS, INNER_LR = 10, 0.01


def real_batch(B: int, T: int) -> tuple[torch.Tensor, str] | None:
    tok_path = DATA / "tokenizers" / "olmo-gpt-neox-dolma-v1_5.json"
    corpus = DATA / "corpus" / "wiki-vital-en-fr-es.jsonl"
    try:
        import tokenizers
    except ImportError:
        return None
    if not (tok_path.is_file() and corpus.is_file()):
        return None
    tok = tokenizers.Tokenizer.from_file(str(tok_path))
    ids: list[int] = []
    with corpus.open() as f:
        for line in f:
            doc = json.loads(line)
            if doc["lang"] != "en":
                continue
            ids += tok.encode(doc["text"]).ids + [EOS]
            if len(ids) >= B * (T + 1):
                break
    return torch.tensor(ids[: B * (T + 1)]).view(B, T + 1), "wiki-vital-en (OLMo tokenizer)"


def synthetic_batch(B: int, T: int) -> tuple[torch.Tensor, str]:
    g = torch.Generator().manual_seed(0)
    p = 1.0 / torch.arange(1, 50000, dtype=torch.float64) ** 1.1
    return torch.multinomial(p / p.sum(), B * (T + 1), replacement=True, generator=g).view(B, T + 1) + 2, "zipf-1.1"


def ar_step(model: Transformer, batch: torch.Tensor) -> None:
    """The AR step as cpu-tiny trains it (PretrainModule.ar_loss with model.fused_linear_ce): the chunked
    LM head + cross-entropy of kernels.cpu, never the full logits."""
    h = model.hidden_states(batch[:, :-1])
    kernels.linear_cross_entropy(h, model.lm_head.weight, batch[:, 1:]).backward()


def meta_step(model, head, ep) -> None:
    meta_loss(model.hidden_states, head, ep, inner_steps=INNER_STEPS, inner_lr=INNER_LR).backward()


def reference_step(model, head, ep, literal: bool = False) -> dict[str, torch.Tensor]:
    """The paper code's meta step (see the module docstring). Returns the head gradients it produced."""
    snapshot = {k: v.clone() for k, v in head.state_dict().items()}
    inner = torch.optim.SGD(head.parameters(), lr=INNER_LR)
    si, qi, cls = ep.support_index, ep.query_index, ep.classes

    def logits_at(ids, index):
        h = model.hidden_states(ids)
        if literal:  # head over every position, then pick the masked ones
            return head(h)[index[:, 0], index[:, 1]][:, cls]
        return head(h[index[:, 0], index[:, 1]])[:, cls]

    for p in model.parameters():
        p.requires_grad_(False)
    for _ in range(INNER_STEPS):
        inner.zero_grad()
        F.cross_entropy(logits_at(ep.support_ids, si), ep.support_labels).backward()
        inner.step()
    for p in model.parameters():
        p.requires_grad_(True)
    inner.zero_grad()
    F.cross_entropy(logits_at(ep.query_ids, qi), ep.query_labels).backward()
    grads = {n: p.grad for n, p in head.named_parameters()}
    head.load_state_dict(snapshot)
    return grads


def timed(fns: dict, repeats: int, zero) -> dict[str, float]:
    """Median wall ms of each step. The steps are interleaved within each repeat, so a shared machine's load
    changes hit all of them alike and the ratios stay meaningful."""
    for fn in fns.values():  # warm-up (allocator, RoPE tables)
        fn()
        zero()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
            zero()
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def shipped_step(name: str, batch: torch.Tensor):
    """(HybridStep, episode, module): the shipped step (configs/cpu-tiny.yaml's meta settings at this shape's
    width and episode size) on a plain-autograd engine, and the episode its MetaStep samples from `batch`."""
    from metalm.meta.step import MetaStep
    from metalm.train.dist import Collectives, Dist
    from metalm.train.module import PretrainModule
    from metalm.train.step import EagerEngine, HybridStep

    shape, B, T, m = SHAPES[name]
    cfg = load_config(REPO / "configs" / "cpu-tiny.yaml", [
        *(f"model.{k}={v}" for k, v in shape.items()), f"model.max_seq_len={T}", f"train.seq_len={T}",
        f"train.micro_batch={B}", f"train.global_batch={B}", f"meta.n_way={m['n_way']}", f"meta.k_shot={m['k_shot']}",
        f"meta.q_queries={m['q_queries']}", f"meta.head.hidden={m['hidden']}", "meta.hybrid_ratio=1.0"])
    torch.manual_seed(0)
    module = PretrainModule.from_config(cfg)
    meta = MetaStep(cfg.meta, 0, {"mask": MASK, "eos": EOS, "pad": PAD}, VOCAB)
    comm = Collectives(Dist(0, 1, 0, torch.device("cpu")))  # one process: no process group needed
    return HybridStep(cfg, EagerEngine(module), comm, meta, 1), meta.episode(batch, 0, 0, 0), module


def run_shape(name: str, repeats: int, literal: bool) -> dict:
    shape, B, T, m = SHAPES[name]
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=VOCAB, max_seq_len=T, kernels="torch", **shape))
    head = build_head(MetaConfig(head=MetaHeadConfig(layers=4, hidden=m["hidden"], dropout=0.0)), shape["d_model"],
                      VOCAB)
    batch, source = real_batch(B, T) or synthetic_batch(B, T)
    shipped = load_config(REPO / "configs" / "cpu-tiny.yaml", [f"meta.n_way={m['n_way']}", f"meta.k_shot={m['k_shot']}",
                                                               f"meta.q_queries={m['q_queries']}"]).meta
    shipped_head = build_head(shipped, shape["d_model"], VOCAB)
    ep_shipped = sample_episode(batch[:, :-1], n_way=m["n_way"], k_shot=m["k_shot"], q_queries=m["q_queries"],
                                mask_id=MASK, sampler="smlmt", generator=torch.Generator().manual_seed(0),
                                exclude_ids=(EOS, PAD), readout=shipped.readout, readout_offset=shipped.readout_offset,
                                window=shipped.window)
    ep = sample_episode(batch[:, :-1], n_way=m["n_way"], k_shot=m["k_shot"], q_queries=m["q_queries"], mask_id=MASK,
                        sampler="smlmt", generator=torch.Generator().manual_seed(0), exclude_ids=(EOS, PAD))

    def zero():
        model.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        shipped_head.zero_grad(set_to_none=True)

    # same gradients: ours vs the reference design (fp32)
    meta_step(model, head, ep)
    ours_bb = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    ours_head = {n: p.grad.clone() for n, p in head.named_parameters()}
    zero()
    ref_head = reference_step(model, head, ep)
    err = max([rel(ours_bb[n], model.get_parameter(n).grad) for n in ours_bb]
              + [rel(ours_head[n], ref_head[n]) for n in ours_head])
    zero()

    res = {
        "shape": {**shape, "vocab_size": VOCAB, "batch": B, "seq_len": T},
        "meta": {**m, "head_layers": 4, "inner_steps": INNER_STEPS, "inner_lr": INNER_LR, "sampler": "smlmt"},
        "data": source,
        "max_rel_grad_diff_meta_vs_reference": err,
    }
    steps = {
        "ar": lambda: ar_step(model, batch),
        "meta": lambda: meta_step(model, head, ep),
        "shipped": lambda: meta_step_loss(shipped, model.hidden_states, shipped_head, ep_shipped)[0].backward(),
        "reference": lambda: reference_step(model, head, ep),
    }
    if literal:
        steps["reference_literal"] = lambda: reference_step(model, head, ep, literal=True)
    hybrid, hybrid_ep, module = shipped_step(name, batch)
    steps["hybrid_ar"] = lambda: hybrid._loss(batch, None, 0)[0].backward()
    steps["hybrid_meta"] = lambda: hybrid._loss(batch, hybrid_ep, 0)[0].backward()
    res["ms"] = timed(steps, repeats, lambda: (zero(), module.zero_grad(set_to_none=True)))
    ms = res["ms"]
    res["ratios"] = {"meta/ar": ms["meta"] / ms["ar"], "shipped/ar": ms["shipped"] / ms["ar"],
                     "hybrid_meta_extra/hybrid_ar": (ms["hybrid_meta"] - ms["hybrid_ar"]) / ms["hybrid_ar"],
                     "reference/meta": ms["reference"] / ms["meta"]}
    res["shipped_meta"] = {k: shipped[k] for k in ("readout", "readout_offset", "window", "feature_norm", "head_init",
                                                   "inner_lr", "inner_steps")}
    if literal:
        res["ratios"]["reference_literal/meta"] = ms["reference_literal"] / ms["meta"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["cpu-tiny", "11m"], choices=sorted(SHAPES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--literal", nargs="*", default=["cpu-tiny"], choices=sorted(SHAPES),
                    help="shapes at which to also time the paper code's head-over-all-positions order (slow)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "meta_cost-cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    results = {}
    print(f"{'shape':<10}{'AR ms':>10}{'meta ms':>10}{'shipped':>10}{'ref ms':>10}{'meta/AR':>9}{'ship/AR':>9}"
          f"{'ref/meta':>10}{'grad diff':>11}")
    for name in args.shapes:
        r = run_shape(name, args.repeats, name in args.literal)
        results[name] = r
        ms, ra = r["ms"], r["ratios"]
        print(f"{name:<10}{ms['ar']:>10.1f}{ms['meta']:>10.1f}{ms['shipped']:>10.1f}{ms['reference']:>10.1f}"
              f"{ra['meta/ar']:>9.2f}{ra['shipped/ar']:>9.2f}{ra['reference/meta']:>10.2f}"
              f"{r['max_rel_grad_diff_meta_vs_reference']:>11.1e}", flush=True)
        if "reference_literal" in ms:
            print(f"{'':<10}reference with the head over all positions: {ms['reference_literal']:.1f} ms "
                  f"({ra['reference_literal/meta']:.2f}x ours)", flush=True)
        print(f"{'':<10}the shipped hybrid step: AR micro-batch {ms['hybrid_ar']:.1f} ms, meta micro-batch (AR + meta, "
              f"budget) {ms['hybrid_meta']:.1f} ms: the meta part costs "
              f"{ra['hybrid_meta_extra/hybrid_ar']:.2f}x an AR micro-batch", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "repeats": args.repeats,
        "statistic": "median wall ms per step (forward + backward), steps interleaved, after one warm-up each",
        "results": results,
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
