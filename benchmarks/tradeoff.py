"""The meta-gradient trade-off map: what each meta setting costs the language model, and what it adds.

    python benchmarks/tradeoff.py                              # cpu-tiny, 300 steps, the default variant set
    python benchmarks/tradeoff.py --jobs 2 --variants vanilla:0,1,2,budget-0.1:0,1,2 --steps 300
    python benchmarks/tradeoff.py --analyze-only               # tables and plots from the runs already there

Every run trains with the same config, seed and data order as vanilla (benchmarks/reproduce.py's `train`, one
process each, `--jobs` at a time; re-running resumes or skips finished runs). Per run and seed, against the
same-seed vanilla run:
  * held-out AR validation loss at the last step (equal optimizer steps = equal data tokens), its gap to vanilla,
    and the gap at equal model FLOPs (both curves interpolated at the smaller of the two runs' final FLOPs);
  * the meta objective's query accuracy over the last third of the run and over the middle third (rising?);
  * the budget's achieved meta/AR gradient ratio next to its target (the mean of the per-record values);
  * the few-shot gain at matched validation loss (benchmarks/fewshot.py: the run's last checkpoint against the
    vanilla checkpoint of nearest validation loss; inner-loop reader and linear probe).
Writes OUT/tradeoff.json, OUT/tradeoff.md and OUT/tradeoff.png (loss gap against query accuracy and few-shot
gain, one point per run, means per variant). Rows already in OUT/tradeoff.json for the same config and step count
are kept for runs whose directories are no longer under --runs (marked "stored"), so a map can grow seed by seed
across machines; a run present under --runs is always re-analyzed and replaces its stored row.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import reproduce  # noqa: E402

DEFAULT_VARIANTS = ("vanilla:0,budget-0.1:0,budget-0.03:0,budget-0.3:0,weighted-clip:0,paper-code:0,"
                    "vanilla-lr-half:0,project-0.3:0,schedule-0.3:0,budget-1.0:0,vanilla:1,budget-0.1:1,vanilla:2,"
                    "budget-0.1:2,budget-0.03:1,budget-0.3:1,budget-0.03:2,budget-0.3:2,paper-code:1,paper-code:2")


def parse_variants(text: str) -> list[tuple[str, int]]:
    """"a:0,1,b:0" -> [(a, 0), (a, 1), (b, 0)], trained in that order."""
    pairs, name = [], None
    for part in text.split(","):
        if ":" in part:
            name, part = part.split(":")
        if name not in reproduce.VARIANTS:
            raise SystemExit(f"--variants: unknown variant {name!r}; expected one of {', '.join(reproduce.VARIANTS)}")
        pairs.append((name, int(part)))
    return pairs


def train_all(args, pairs: list[tuple[str, int]]) -> None:
    from metalm.config import load_config
    from metalm.data import ensure_prepared

    cfg = load_config(args.config, args.overrides)
    ensure_prepared(cfg.data, seq_len=cfg.train.seq_len, vocab_size=cfg.model.vocab_size, seed=cfg.train.seed,
                    progress=False)  # once, before runs that would each prepare the same shards
    rargs = types.SimpleNamespace(runs=args.runs, steps=args.steps, ratio=args.ratio, val_every=args.val_every,
                                  val_batches=args.val_batches, checkpoints=args.checkpoints, nproc=1,
                                  config=args.config, overrides=args.overrides)
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda p: reproduce.train(rargs, *p), pairs))


def metrics(rd: Path) -> list[dict]:
    from metalm.eval.report import read_jsonl

    return read_jsonl(rd / "metrics.jsonl")


def mean_of(rows: list[dict], key: str, lo: float, hi: float) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None and lo < r["step"] <= hi]
    return statistics.fmean(vals) if vals else None


def at_flops(curve: list[dict], flops: float) -> float | None:
    """Vanilla's validation loss at `flops` model FLOPs, linearly interpolated (None past its end)."""
    for a, b in itertools.pairwise(curve):
        if a["flops"] <= flops <= b["flops"]:
            w = (flops - a["flops"]) / max(b["flops"] - a["flops"], 1e-30)
            return a["val_loss"] + w * (b["val_loss"] - a["val_loss"])
    return curve[-1]["val_loss"] if curve and abs(curve[-1]["flops"] - flops) < 1e-9 * flops else None


def analyze_run(args, variant: str, seed: int) -> dict | None:
    rd, vd = Path(args.runs) / f"{variant}-s{seed}", Path(args.runs) / f"vanilla-s{seed}"
    rows = metrics(rd) if (rd / "metrics.jsonl").exists() else []
    val = [r for r in rows if r.get("val_loss") is not None]
    if not val or val[-1]["step"] < args.steps:
        return None
    van = reproduce.val_curve(vd) if (vd / "metrics.jsonl").exists() else []
    out = {"variant": variant, "seed": seed, "final_val": val[-1]["val_loss"], "flops": val[-1]["flops"],
           "tokens": val[-1]["tokens"]}
    if van and van[-1]["step"] >= args.steps:
        out["gap_equal_steps"] = val[-1]["val_loss"] - van[-1]["val_loss"]
        budget = min(val[-1]["flops"], van[-1]["flops"])  # the smaller of the two runs' budgets
        out["gap_equal_flops"] = at_flops(val, budget) - at_flops(van, budget)
        out["flops_over_vanilla"] = val[-1]["flops"] / van[-1]["flops"]
    third = args.steps / 3
    out["query_acc_last_third"] = mean_of(rows, "meta/query_acc", 2 * third, args.steps)
    out["query_acc_middle_third"] = mean_of(rows, "meta/query_acc", third, 2 * third)
    out["grad_ratio_achieved"] = mean_of(rows, "meta/grad_ratio", 0, args.steps)
    out["grad_ratio_target"] = mean_of(rows, "meta/grad_ratio_target", 0, args.steps)
    out["grad_ratio_raw"] = mean_of(rows, "meta/grad_ratio_raw", 0, args.steps)
    out["grad_cos"] = mean_of(rows, "meta/grad_cos", 0, args.steps)
    diag = [r for r in rows if r.get("meta/diag/grad_ratio") is not None]
    out["diag_grad_ratio_raw"] = statistics.fmean(r["meta/diag/grad_ratio"] for r in diag) if diag else None
    fs = rd / "fewshot.json"
    if fs.exists():
        out["fewshot"] = json.loads(fs.read_text())
    return out


def fewshot_all(args, pairs: list[tuple[str, int]]) -> None:
    import fewshot

    for variant, seed in pairs:
        rd = Path(args.runs) / f"{variant}-s{seed}"
        if variant.startswith("vanilla") or (rd / "fewshot.json").exists():
            continue
        if not (rd / "metrics.jsonl").exists():
            continue
        result = fewshot.compare_runs(Path(args.runs) / f"vanilla-s{seed}", rd, episodes=args.episodes,
                                      shapes=fewshot.parse_shapes(args.shapes))
        (rd / "fewshot.json").write_text(json.dumps(result, indent=1))


def merge_stored(stored: dict | None, fresh: list[dict], steps: int, config: str) -> list[dict]:
    """The fresh rows, then every stored row of the same config and step count that no fresh row replaces (each
    marked "stored": True), in the stored order. A stored map of another config or step count is not mixed in."""
    if not stored or stored.get("steps") != steps or stored.get("config") != config:
        return list(fresh)
    have = {(r["variant"], r["seed"]) for r in fresh}
    kept = [{**r, "stored": True} for r in stored.get("runs", []) if (r["variant"], r["seed"]) not in have]
    return list(fresh) + kept


def summarize(runs: list[dict]) -> dict:
    by = {}
    for r in runs:
        by.setdefault(r["variant"], []).append(r)
    table = {}
    for variant, rs in by.items():
        row = {"seeds": [r["seed"] for r in rs]}
        for key in ("final_val", "gap_equal_steps", "gap_equal_flops", "flops_over_vanilla", "query_acc_last_third",
                    "query_acc_middle_third", "grad_ratio_achieved", "grad_ratio_target", "grad_ratio_raw",
                    "grad_cos"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            row[key] = statistics.fmean(vals) if vals else None
            if key.startswith("gap") and vals:
                row[key + "_max"] = max(vals)
        gains = [g for r in rs for g in fewshot_gains(r)]
        row["fewshot"] = merge_gains(gains)
        table[variant] = row
    return table


def fewshot_gains(run: dict) -> list[dict]:
    fs = run.get("fewshot") or {}
    return [{"reader": k, **v} for k, v in fs.get("gains", {}).items()]


def merge_gains(gains: list[dict]) -> dict:
    """{reader and shape: [mean difference over seeds, its 95% half-width]}: each seed's mean over its episodes
    with its own interval, combined as independent estimates (the half-widths add in quadrature, / seeds)."""
    out: dict[str, list] = {}
    for g in gains:
        out.setdefault(g["reader"], []).append((g["diff"], g["ci95"]))
    return {k: [statistics.fmean(d for d, _ in v), math.sqrt(sum(c * c for _, c in v)) / len(v)]
            for k, v in out.items()}


def fmt(v, spec="+.3f") -> str:
    return "–" if v is None else format(v, spec)


def write_outputs(args, runs: list[dict], table: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "tradeoff.json").write_text(json.dumps({"steps": args.steps, "config": reproduce.shown(args.config),
                                                   "runs": runs, "variants": table}, indent=1))
    lines = [f"# Meta-gradient trade-off map: `{reproduce.shown(args.config)}`, {args.steps} steps", "",
             "| variant | seeds | val loss | gap to vanilla, equal steps (mean / worst) | gap, equal FLOPs | "
             "FLOPs / vanilla | query acc, middle → last third | meta/AR grad ratio: target / achieved (raw) | "
             "cos(meta, AR) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for variant, r in table.items():
        lines.append(
            f"| {variant} | {','.join(map(str, r['seeds']))} | {fmt(r['final_val'], '.4f')} | "
            f"{fmt(r['gap_equal_steps'])} / {fmt(r.get('gap_equal_steps_max'))} | {fmt(r['gap_equal_flops'])} | "
            f"{fmt(r['flops_over_vanilla'], '.2f')} | "
            f"{fmt(r['query_acc_middle_third'], '.3f')} → {fmt(r['query_acc_last_third'], '.3f')} | "
            f"{fmt(r['grad_ratio_target'], '.3f')} / {fmt(r['grad_ratio_achieved'], '.3f')} "
            f"({fmt(r['grad_ratio_raw'], '.2f')}) | {fmt(r['grad_cos'], '+.3f')} |")
    fs_rows = [(v, r["fewshot"]) for v, r in table.items() if r["fewshot"]]
    if fs_rows:
        lines += ["", "Few-shot gain at matched validation loss (hybrid − vanilla query accuracy on the same "
                      "episodes, mean over seeds ± 95% interval; per seed in each run's fewshot.json):", "",
                  "| variant | " + " | ".join(fs_rows[0][1]) + " |", "| --- |" + " --- |" * len(fs_rows[0][1])]
        for v, g in fs_rows:
            lines.append(f"| {v} | " + " | ".join(f"{d:+.3f} ± {c:.3f}" for d, c in g.values()) + " |")
    lines += ["", "![trade-off](tradeoff.png)", ""]
    (out / "tradeoff.md").write_text("\n".join(lines))
    plot(table, runs, out)


def plot(table: dict, runs: list[dict], out: Path) -> None:
    from metalm.eval.report import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        if r.get("gap_equal_steps") is None or r["variant"].startswith("vanilla-lr") is None:
            continue
        color = reproduce.COLORS.get(r["variant"], "black")
        if r.get("query_acc_last_third") is not None:
            axes[0].scatter(r["gap_equal_steps"], r["query_acc_last_third"], color=color, alpha=0.5)
        gains = fewshot_gains(r)
        if gains:
            axes[1].scatter(r["gap_equal_steps"], statistics.fmean(g["diff"] for g in gains), color=color, alpha=0.5)
    for variant, t in table.items():
        color = reproduce.COLORS.get(variant, "black")
        if t["gap_equal_steps"] is None:
            continue
        if t["query_acc_last_third"] is not None:
            axes[0].scatter(t["gap_equal_steps"], t["query_acc_last_third"], color=color, marker="*", s=160,
                            label=variant)
        if t["fewshot"]:
            axes[1].scatter(t["gap_equal_steps"], statistics.fmean(d for d, _ in t["fewshot"].values()), color=color,
                            marker="*",
                            s=160, label=variant)
    axes[0].set_ylabel("meta query accuracy, last third")
    axes[1].set_ylabel("few-shot gain at matched loss (mean over readers, N, K)")
    for ax in axes:
        ax.set_xlabel("held-out AR loss − vanilla's, equal steps (nats)")
        ax.axvline(0, color="k", lw=0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("what the meta objective costs the language model, against what it adds")
    save_figure(fig, out / "tradeoff.png", dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "cpu-tiny.yaml"))
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help="variant:seed,seed,... (variants of "
                                                                 "benchmarks/reproduce.py)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--ratio", type=float, default=0.5, help="meta.hybrid_ratio of the hybrid runs")
    p.add_argument("--val-every", type=int, default=25)
    p.add_argument("--val-batches", type=int, default=16)
    p.add_argument("--checkpoints", type=int, default=12, help="checkpoints per run (for matching by loss)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one process each)")
    p.add_argument("--episodes", type=int, default=200, help="few-shot episodes per (N, K)")
    p.add_argument("--shapes", default="5x1,5x5,16x2", help="few-shot (N)x(K) list")
    p.add_argument("--runs", default=str(REPO / "runs" / "tradeoff"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "tradeoff-cpu"))
    p.add_argument("--skip-fewshot", action="store_true")
    p.add_argument("--analyze-only", action="store_true")
    p.add_argument("overrides", nargs="*", help="extra key=value config overrides for every run")
    args = p.parse_args(argv)
    pairs = parse_variants(args.variants)
    if not args.analyze_only:
        train_all(args, pairs)
    if not args.skip_fewshot:
        fewshot_all(args, pairs)
    runs = [r for r in (analyze_run(args, v, s) for v, s in pairs) if r is not None]
    stored = Path(args.out) / "tradeoff.json"
    runs = merge_stored(json.loads(stored.read_text()) if stored.exists() else None, runs, args.steps,
                        reproduce.shown(args.config))
    runs.sort(key=lambda r: (r["variant"] != "vanilla", r["variant"], r["seed"]))
    table = summarize(runs)
    write_outputs(args, runs, table, Path(args.out))
    print((Path(args.out) / "tradeoff.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
