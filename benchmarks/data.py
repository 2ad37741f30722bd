"""Data pipeline throughput on CPU: `prepare` (docs/s, tokens/s) and the shard loader (samples/s).

    python benchmarks/data.py            # the whole wiki corpus (26,227 docs), seq 2048 and 128
    python benchmarks/data.py --quick    # the first 4,000 documents, shorter loader timings

Prepare runs on the real corpus (../shared/data/corpus/wiki-vital-en-fr-es.jsonl, or --source) with the
OLMo/GPT-NeoX tokenizer, once per --num-proc value, into a temporary directory. The loader is timed on
those shards for each --workers value (micro-batch 8, one rank, shuffling on), counting (B, T+1) rows
handed to the caller after a warm-up batch. The table ends with the rate one H100 needs to stay busy on
the 570M model: 6 x N + 12 x layers x d_model x seq FLOPs per token (N = 570M; layers and d_model from
configs/570m.yaml) at 45% MFU of 989 TFLOP/s dense bf16, in tokens/s and seq-2048 samples/s.
Writes JSON to benchmarks/results/data-cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"

H100_BF16_PEAK = 989e12
MFU = 0.45
PARAMS_570M = 570e6


def h100_need(seq_len: int = 2048) -> dict:
    layers, d_model = 12, 1536
    cfg_path = REPO / "configs" / "570m.yaml"
    if cfg_path.is_file():
        import yaml

        model = (yaml.safe_load(cfg_path.read_text()) or {}).get("model", {})
        layers, d_model = int(model.get("n_layers", layers)), int(model.get("d_model", d_model))
    flops_per_token = 6 * PARAMS_570M + 12 * layers * d_model * seq_len
    tokens_per_s = MFU * H100_BF16_PEAK / flops_per_token
    return {"params": PARAMS_570M, "n_layers": layers, "d_model": d_model, "seq_len": seq_len, "mfu": MFU,
            "peak_flops": H100_BF16_PEAK, "flops_per_token": flops_per_token, "tokens_per_s": tokens_per_s,
            "samples_per_s": tokens_per_s / seq_len}


def bench_prepare(source: str, tokenizer: str, out: Path, seq_len: int, num_proc: int, max_docs: int | None) -> dict:
    from metalm.data import prepare

    t0 = time.perf_counter()
    per_shard = 256 if seq_len >= 1024 else 4096
    man = prepare(source, tokenizer, out, seq_len, val_fraction=0.01, samples_per_shard=per_shard, num_proc=num_proc,
                  max_docs=max_docs, progress=False)
    wall = time.perf_counter() - t0
    run = man["last_run"]
    return {"seq_len": seq_len, "num_proc": num_proc, "docs": run["tokenized_docs"], "tokens": run["tokenized_tokens"],
            "seconds": round(wall, 3), "docs_per_s": run["tokenized_docs"] / wall,
            "tokens_per_s": run["tokenized_tokens"] / wall,
            "train_samples": man["splits"]["train"]["samples"], "train_shards": len(man["splits"]["train"]["shards"])}


def bench_loader(shards: Path, seq_len: int, workers: int, seconds: float, micro_batch: int = 8) -> dict:
    from metalm.data import ShardLoader

    ld = ShardLoader(shards, split="train", seq_len=seq_len, micro_batch=micro_batch, seed=0, num_workers=workers)
    it = iter(ld)
    next(it)  # warm-up: worker start-up and the first shard
    rows = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        rows += len(next(it))
    wall = time.perf_counter() - t0
    it.close()
    return {"seq_len": seq_len, "num_workers": workers, "micro_batch": micro_batch, "samples": rows,
            "seconds": round(wall, 3), "samples_per_s": rows / wall, "tokens_per_s": rows * seq_len / wall,
            "epochs_seen": ld.epoch}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default=str(SHARED / "corpus" / "wiki-vital-en-fr-es.jsonl"))
    p.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "olmo-gpt-neox-dolma-v1_5.json"))
    p.add_argument("--max-docs", type=int, default=None, help="first N documents (default: all; --quick: 4000)")
    p.add_argument("--num-proc", default=None, help="comma list of tokenizer process counts (default 1,<cores>)")
    p.add_argument("--workers", default="0,2", help="comma list of loader num_workers")
    p.add_argument("--seq-lens", default="2048,128")
    p.add_argument("--seconds", type=float, default=None, help="loader timing per row (default 8, --quick 3)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data-cpu.json"))
    args = p.parse_args(argv)
    if not Path(args.source).exists() and args.source != "builtin":
        print(f"benchmarks/data.py: source {args.source} not found (the shared data folder is expected at "
              f"{SHARED}); pass --source", file=sys.stderr)
        return 2
    max_docs = args.max_docs or (4000 if args.quick else None)
    seconds = args.seconds or (3.0 if args.quick else 8.0)
    from metalm.data.prepare import default_num_proc

    cores = default_num_proc()
    num_procs = [int(x) for x in (args.num_proc or ",".join(sorted({"1", str(cores)}))).split(",")]
    seq_lens = [int(x) for x in args.seq_lens.split(",")]
    workers = [int(x) for x in args.workers.split(",")]
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    prep_rows, load_rows = [], []
    with tempfile.TemporaryDirectory(prefix="metalm-bench-") as tmp:
        for seq in seq_lens:
            for i, n in enumerate(num_procs):
                out = Path(tmp) / f"s{seq}-p{n}"
                row = bench_prepare(args.source, args.tokenizer, out, seq, n, max_docs)
                prep_rows.append(row)
                print(f"prepare seq {seq:5d} num_proc {n:2d}: {row['docs_per_s']:9,.0f} docs/s "
                      f"{row['tokens_per_s']:11,.0f} tokens/s ({row['docs']} docs, {row['seconds']:.1f} s)", flush=True)
            shards = Path(tmp) / f"s{seq}-p{num_procs[0]}"
            for w in workers:
                row = bench_loader(shards, seq, w, seconds)
                load_rows.append(row)
                print(f"loader  seq {seq:5d} workers  {w:2d}: {row['samples_per_s']:9,.0f} samples/s "
                      f"{row['tokens_per_s']:11,.0f} tokens/s", flush=True)
    need = h100_need(2048)
    best_2048 = max((r["samples_per_s"] for r in load_rows if r["seq_len"] == 2048), default=None)

    print()
    print(f"{'stage':8} {'seq':>5} {'procs':>5} {'docs/s':>10} {'samples/s':>10} {'tokens/s':>12}")
    for r in prep_rows:
        print(f"{'prepare':8} {r['seq_len']:5d} {r['num_proc']:5d} {r['docs_per_s']:10,.0f} {'':>10} "
              f"{r['tokens_per_s']:12,.0f}")
    for r in load_rows:
        print(f"{'loader':8} {r['seq_len']:5d} {r['num_workers']:5d} {'':>10} {r['samples_per_s']:10,.0f} "
              f"{r['tokens_per_s']:12,.0f}")
    print(f"{'H100 570M':8} {2048:5d} {'':>5} {'':>10} {need['samples_per_s']:10,.1f} {need['tokens_per_s']:12,.0f}"
          f"   (needed per GPU: {need['flops_per_token'] / 1e9:.2f} GFLOP/token at {MFU:.0%} MFU of 989 TFLOP/s)")
    if best_2048:
        print(f"loader headroom at seq 2048: {best_2048 / need['samples_per_s']:.0f}x one H100's need "
              f"(one rank's loader on this CPU)")

    result = {
        "benchmark": "data", "device": "cpu", "host": platform.node(), "cpus_available": cores,
        "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": args.source, "max_docs": max_docs, "quick": args.quick,
        "prepare": prep_rows, "loader": load_rows, "h100_570m_need": need,
        "loader_headroom_2048": (best_2048 / need["samples_per_s"]) if best_2048 else None,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp_out, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
