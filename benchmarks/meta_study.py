"""Does the meta objective learn? Meta-step variants on the real corpus, measured over one training run each.

    python benchmarks/meta_study.py                          # cpu-tiny, 300 steps, the variants below, 2 procs
    python benchmarks/meta_study.py --variants paper,after-std --steps 300 --seed 1

For every variant (meta.* overrides on configs/cpu-tiny.yaml) one hybrid run trains; the table reports, over
the last third of the run: support accuracy before and after the inner loop, query accuracy (and its change
against the middle third: "rising"), the head-input collapse (mean pairwise cosine of the support features the
head sees, and of the raw states), the meta / AR backbone gradient norm ratio, their cosine and the share of
the meta embedding gradient on the mask row (from the diagnostics every meta.diag_every steps); and the
final validation loss. Chance is 1/meta.n_way. Re-running skips finished runs. Writes
benchmarks/results/meta_study-cpu.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PAPER = ["meta.readout=mask", "meta.feature_norm=none", "meta.head_init=persistent", "meta.inner_lr=0.01",
         "meta.objective=replace", "meta.feature_grad_clip=0"]
VARIANTS = {
    "paper": PAPER,
    "mask-std-proto": [*PAPER, "meta.feature_norm=standardize", "meta.head_init=prototype", "meta.inner_lr=0.1"],
    "mask-std": [*PAPER, "meta.feature_norm=standardize", "meta.head_init=zero", "meta.inner_lr=0.5"],
    "prev-std": [*PAPER, "meta.readout=prev", "meta.feature_norm=standardize", "meta.head_init=zero",
                 "meta.inner_lr=0.5"],
    "after-std": [*PAPER, "meta.readout=after", "meta.feature_norm=standardize", "meta.head_init=zero",
                  "meta.inner_lr=0.5"],
    "after-std-clip": [*PAPER, "meta.readout=after", "meta.feature_norm=standardize", "meta.head_init=zero",
                       "meta.inner_lr=0.5", "meta.feature_grad_clip=0.1"],
    "prev-std-clip": [*PAPER, "meta.readout=prev", "meta.feature_norm=standardize", "meta.head_init=zero",
                      "meta.inner_lr=0.5", "meta.feature_grad_clip=0.1"],
    "prev-std-clip-add": [*PAPER, "meta.readout=prev", "meta.feature_norm=standardize", "meta.head_init=zero",
                          "meta.inner_lr=0.5", "meta.feature_grad_clip=0.1", "meta.objective=add"],
    "vanilla": ["meta.enabled=false"],
    "after-std-add": [*PAPER, "meta.readout=after", "meta.feature_norm=standardize", "meta.head_init=zero",
                      "meta.inner_lr=0.5", "meta.objective=add"],
    "after-ln": [*PAPER, "meta.readout=after", "meta.feature_norm=layernorm", "meta.head_init=zero",
                 "meta.inner_lr=0.5"],
}


def train(args, name: str, overrides: list[str]) -> Path:
    from metalm.checkpoint import find_latest, read_state

    rd = Path(args.runs) / f"{name}-s{args.seed}"
    latest = find_latest(rd / "checkpoints")
    if latest is not None and read_state(latest).step >= args.steps:
        print(f"[{name}] already trained: {latest}", flush=True)
        return rd
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
           str(REPO / "launchers" / "pretrain.py"), "--config", str(REPO / "configs" / "cpu-tiny.yaml"),
           f"train.run_dir={rd}", f"train.max_steps={args.steps}", f"train.seed={args.seed}", "logging.wandb=false",
           f"meta.diag_every={args.diag_every}", "logging.progress=false", *overrides, *args.overrides]
    print(f"[{name}] {' '.join(cmd[4:])}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="disabled")
    subprocess.run(cmd, check=True, cwd=REPO, env=env)
    return rd


def _mean(rows: list[dict], key: str):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def summarize(rd: Path, steps: int, n_way: int) -> dict:
    rows = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = [r for r in rows if r["step"] > 2 * steps // 3]
    middle = [r for r in rows if steps // 3 < r["step"] <= 2 * steps // 3]
    out = {k: _mean(last, f"meta/{k}") for k in ("support_acc_before", "support_acc_after", "query_acc",
                                                  "support_cos", "support_cos_raw")}
    out["query_acc_middle"] = _mean(middle, "meta/query_acc")
    for k in ("grad_ratio", "grad_cos", "emb_mask_share", "feature_grad_norm"):
        out[k] = _mean(last, f"meta/diag/{k}")
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    out["final_val_loss"] = vals[-1] if vals else None
    out["chance"] = 1 / n_way
    b, a, q = out["support_acc_before"], out["support_acc_after"], out["query_acc"]
    out["targets"] = {
        "support_after_2x_before": bool(a and b and a >= 2 * b),
        "support_after_3x_chance": bool(a and a >= 3 / n_way),
        "query_2x_chance": bool(q and q >= 2 / n_way),
        "query_rising": bool(q and out["query_acc_middle"] and q > out["query_acc_middle"]),
        "meta_grad_25pct_of_ar": bool(out["grad_ratio"] and out["grad_ratio"] >= 0.25),
        "mask_row_at_most_half": bool(out["emb_mask_share"] is not None and out["emb_mask_share"] <= 0.5),
    }
    return out


def fmt(v, digits=3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--diag-every", type=int, default=10)
    p.add_argument("--runs", default=str(REPO / "runs" / "meta-study"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "meta_study-cpu.json"))
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every variant")
    args = p.parse_args(argv)
    from metalm.config import load_config

    n_way = load_config(REPO / "configs" / "cpu-tiny.yaml", args.overrides).meta.n_way
    results = {}
    for name in args.variants.split(","):
        rd = train(args, name, VARIANTS[name])
        results[name] = {"overrides": VARIANTS[name], **summarize(rd, args.steps, n_way)}
    cols = ("support_acc_before", "support_acc_after", "query_acc_middle", "query_acc", "support_cos",
            "support_cos_raw", "grad_ratio", "grad_cos", "emb_mask_share", "feature_grad_norm", "final_val_loss")
    print(f"last third of {args.steps} steps, seed {args.seed}, chance {1 / n_way:.4f}")
    print("| variant | " + " | ".join(cols) + " | targets met |")
    print("|---" * (len(cols) + 2) + "|")
    for name, r in results.items():
        met = sum(r["targets"].values())
        print(f"| {name} | " + " | ".join(fmt(r[c]) for c in cols) + f" | {met}/{len(r['targets'])} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"steps": args.steps, "seed": args.seed, "n_way": n_way,
                                          "machine": os.uname().machine, "cores": os.cpu_count(),
                                          "results": results}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
