"""Data pipeline throughput on CPU: `prepare` (docs/s, tokens/s) and the shard loader (samples/s).

    python benchmarks/data.py            # the whole wiki corpus (26,227 docs), seq 2048 and 128
    python benchmarks/data.py --quick    # the first 4,000 documents, shorter loader timings
    python benchmarks/data.py --quick --s3-only   # only the bucket rows (prepare to S3, stream from it)

Prepare runs on the real corpus (../shared/data/corpus/wiki-vital-en-fr-es.jsonl, or --source) with the
OLMo/GPT-NeoX tokenizer, once per --num-proc value, into a temporary directory. The loader is timed on
those shards for each --workers value (micro-batch 8, one rank, shuffling on), counting (B, T+1) rows
handed to the caller after a warm-up batch. The table ends with the rate one H100 needs to stay busy on
the 570M model: 6 x N + 12 x layers x d_model x seq FLOPs per token (N = 570M; layers and d_model from
configs/570m.yaml) at 45% MFU of 989 TFLOP/s dense bf16, in tokens/s and seq-2048 samples/s.

Buckets (unless --no-s3): a local S3-compatible server (moto's standalone server, from the test extra) is started
on 127.0.0.1; the seq-2048 shards are prepared straight into it (`prepare --out s3://...`), and the loader streams
them back (no cache directory, the default read-ahead) for each --workers value: samples/s per rank, against the
rate one H100 needs, and the headroom. The server is a single Python process on the same cores, so these are
lower bounds of what a real object store gives; the shard format's bytes per token are reported too.
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


def bench_prepare(source: str, tokenizer: str, out: Path | str, seq_len: int, num_proc: int, max_docs: int | None,
                  per_shard: int | None = None) -> dict:
    from metalm.data import prepare

    t0 = time.perf_counter()
    per_shard = per_shard or (256 if seq_len >= 1024 else 4096)
    man = prepare(source, tokenizer, out, seq_len, val_fraction=0.01, samples_per_shard=per_shard, num_proc=num_proc,
                  max_docs=max_docs, progress=False)
    wall = time.perf_counter() - t0
    run = man["last_run"]
    return {"seq_len": seq_len, "num_proc": num_proc, "docs": run["tokenized_docs"], "tokens": run["tokenized_tokens"],
            "seconds": round(wall, 3), "docs_per_s": run["tokenized_docs"] / wall,
            "tokens_per_s": run["tokenized_tokens"] / wall,
            "train_samples": man["splits"]["train"]["samples"], "train_shards": len(man["splits"]["train"]["shards"])}


def bench_loader(shards: Path | str, seq_len: int, workers: int, seconds: float, micro_batch: int = 8) -> dict:
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


class LocalS3:
    """moto's S3-compatible server on 127.0.0.1 for the duration of a `with` block (fake keys in the env)."""

    def __enter__(self):
        import socket
        import subprocess

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the moto server did not start (pip install 'moto[server]' s3fs)") from None
                time.sleep(0.2)
        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        import fsspec

        fsspec.filesystem("s3").mkdir("metalm-bench")
        return "s3://metalm-bench"

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait()


def bench_s3(source: str, tokenizer: str, seq_len: int, workers: list[int], seconds: float, max_docs: int | None,
             num_proc: int) -> tuple[dict, list[dict]]:
    with LocalS3() as bucket:
        url = f"{bucket}/shards-{seq_len}"
        # small shards (64 samples, 0.5 MB at seq 2048): many per epoch and slot, so that the rate measured is
        # the download's and not the reader's one-shard cache
        prep = bench_prepare(source, tokenizer, url, seq_len, num_proc, max_docs, per_shard=64)
        from metalm.data import load_manifest

        man = load_manifest(url)
        shard_bytes = sum(r["bytes"] for r in man["splits"]["train"]["shards"])
        token_bytes = man["splits"]["train"]["samples"] * man["sample_len"] * (2 if man["dtype"] == "uint16" else 4)
        prep.update(where=url, bytes_per_token_byte=shard_bytes / token_bytes, samples_per_shard=64)
        rows = []
        for w in workers:
            row = bench_loader(url, seq_len, w, seconds)
            row.update(where="s3 (local moto server)", shard_bytes=shard_bytes // len(man["splits"]["train"]["shards"]),
                       download_mb_per_s=row["samples_per_s"] / 64 * shard_bytes / len(man["splits"]["train"]["shards"])
                       / 1e6)
            rows.append(row)
    return prep, rows


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
    p.add_argument("--no-s3", action="store_true", help="skip the bucket rows (local S3-compatible server)")
    p.add_argument("--s3-only", action="store_true", help="only the bucket rows")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/data-cpu.json; with --s3-only "
                   "data-s3-cpu.json)")
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

    prep_rows, load_rows, s3_prep, s3_rows = [], [], None, []
    with tempfile.TemporaryDirectory(prefix="metalm-bench-") as tmp:
        for seq in ([] if args.s3_only else seq_lens):
            for n in num_procs:
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
    if not args.no_s3:
        s3_prep, s3_rows = bench_s3(args.source, args.tokenizer, 2048, workers, seconds, max_docs, num_procs[-1])
        print(f"prepare seq  2048 num_proc {num_procs[-1]:2d} to s3: {s3_prep['docs_per_s']:9,.0f} docs/s "
              f"{s3_prep['tokens_per_s']:11,.0f} tokens/s; "
              f"shard bytes / token bytes {s3_prep['bytes_per_token_byte']:.4f}", flush=True)
        for row in s3_rows:
            print(f"loader  seq  2048 workers  {row['num_workers']:2d} from s3: {row['samples_per_s']:9,.0f} samples/s "
                  f"{row['tokens_per_s']:11,.0f} tokens/s ({row['download_mb_per_s']:,.0f} MB/s of shards downloaded)",
                  flush=True)
    need = h100_need(2048)
    best_2048 = max((r["samples_per_s"] for r in load_rows if r["seq_len"] == 2048), default=None)
    best_s3 = max((r["samples_per_s"] for r in s3_rows), default=None)

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
    for r in s3_rows:
        print(f"{'from s3':8} {r['seq_len']:5d} {r['num_workers']:5d} {'':>10} {r['samples_per_s']:10,.0f} "
              f"{r['tokens_per_s']:12,.0f}")
    if best_2048:
        print(f"loader headroom at seq 2048: {best_2048 / need['samples_per_s']:.0f}x one H100's need "
              f"(one rank's loader on this CPU)")
    if best_s3:
        print(f"streaming headroom at seq 2048 from the local S3 server: {best_s3 / need['samples_per_s']:.1f}x one "
              f"H100's need of {need['samples_per_s']:.1f} samples/s per rank")

    result = {
        "benchmark": "data", "device": "cpu", "host": platform.node(), "cpus_available": cores,
        "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": args.source, "max_docs": max_docs, "quick": args.quick,
        "prepare": prep_rows, "loader": load_rows, "h100_570m_need": need,
        "loader_headroom_2048": (best_2048 / need["samples_per_s"]) if best_2048 else None,
        "s3_prepare": s3_prep, "s3_loader": s3_rows,
        "s3_streaming_headroom_2048": (best_s3 / need["samples_per_s"]) if best_s3 else None,
    }
    out = Path(args.out or REPO / "benchmarks" / "results" / ("data-s3-cpu.json" if args.s3_only else "data-cpu.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp_out, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
