"""Vanilla vs hybrid (AR + FOMAML) pretraining: the paper's headline comparison, made fair.

    python benchmarks/reproduce.py                                   # cpu-tiny, seeds 0,1,2, 300 steps
    python benchmarks/reproduce.py --variants vanilla,paper-code,shipped --nproc 2
    python benchmarks/reproduce.py --config configs/11m.yaml --nproc 8 --steps 6000 --seeds 0   # on GPUs

Variants: `vanilla` (meta.enabled=false), `paper-code` (the paper code's meta step: its sampler and per-micro-
batch branch draw, the readout at the mask, raw features, a persistent head, inner lr 0.01, no head dropout),
`shipped` (the config's own meta settings, i.e. the shipped defaults) and `replace` / `add` (the shipped
settings with meta.objective forced), and the meta-gradient budget's variants of benchmarks/tradeoff.py. For
every seed, all variants train with the same config, seed and data order (a meta micro-batch consumes the same
stream batch an AR one would); only the meta settings differ. They are compared on held-out AR validation loss
(never a blended train loss) at equal optimizer steps, equal data tokens and
equal model FLOPs (the meta step's support forward, query forward/backward and the head's inner loop
included): "hybrid reaches vanilla's final validation loss N x sooner" (N < 1: later; "not reached").
Checkpoints are then evaluated (effective rank, attention entropy; NER F1 head-only and full on the
final checkpoints when --ner-train/--ner-test are given). Re-running skips finished runs and
evaluations. Writes RESULTS/results.json, RESULTS/*.png and RESULTS/results.md, RESULTS being --out (default
runs/reproduce/results; `--out docs/results` replaces the committed results).
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
VARIANTS = {
    "vanilla": ["meta.enabled=false"],
    "paper-code": ["meta.sampler=reference", "meta.branch=per_microbatch", "meta.readout=mask",
                   "meta.feature_norm=none", "meta.head_init=persistent", "meta.inner_lr=0.01",
                   "meta.objective=replace", "meta.classes=any", "meta.feature_grad_clip=0", "meta.head.dropout=0.0",
                   "meta.grad_ratio=0"],
    "shipped": [],
    "replace": ["meta.objective=replace", "meta.grad_ratio=0"],
    "add": ["meta.objective=add"],
    # the meta-gradient budget and its alternatives (benchmarks/tradeoff.py)
    "weighted-clip": ["meta.grad_ratio=0", "meta.feature_grad_clip=0.1"],  # the shipped defaults before the budget
    "budget-0.03": ["meta.grad_ratio=0.03"],
    "budget-0.1": ["meta.grad_ratio=0.1"],
    "budget-0.3": ["meta.grad_ratio=0.3"],
    "budget-1.0": ["meta.grad_ratio=1.0"],
    "project-0.3": ["meta.grad_ratio=0.3", "meta.project=true"],
    "schedule-0.3": ["meta.grad_ratio=0.3", "meta.grad_ratio_start=30", "meta.grad_ratio_warmup=60",
                     "meta.grad_ratio_final=0.0"],
    "vanilla-lr-half": ["meta.enabled=false", "optim.lr=1.5e-3"],  # the AdamW hypothesis's control
}
COLORS = {"vanilla": "tab:blue", "paper-code": "tab:orange", "shipped": "tab:green", "replace": "tab:red",
          "add": "tab:purple", "weighted-clip": "tab:brown", "budget-0.03": "tab:olive", "budget-0.1": "tab:green",
          "budget-0.3": "tab:cyan", "budget-1.0": "tab:pink", "project-0.3": "tab:gray", "schedule-0.3": "gold",
          "vanilla-lr-half": "navy"}


def run_dir(args, variant: str, seed: int) -> Path:
    return Path(args.runs) / f"{variant}-s{seed}"


def train(args, variant: str, seed: int) -> Path:
    from metalm.checkpoint import find_latest, read_state

    rd = run_dir(args, variant, seed)
    latest = find_latest(rd / "checkpoints")
    if latest is not None and read_state(latest).step >= args.steps:
        print(f"[{variant} seed {seed}] already trained: {latest}", flush=True)
        return rd
    overrides = [f"train.seed={seed}", *VARIANTS[variant],
                 f"meta.hybrid_ratio={args.ratio}", f"train.run_dir={rd}", f"train.max_steps={args.steps}",
                 f"train.val_every={args.val_every}", f"train.val_batches={args.val_batches}",
                 f"checkpoint.every={max(1, args.steps // args.checkpoints)}", "checkpoint.keep_last_k=1000",
                 "logging.wandb=false", *args.overrides]
    if args.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}"]
    else:
        cmd = [sys.executable]
    cmd += [str(REPO / "launchers" / "pretrain.py"), "--config", args.config, *overrides]
    print(f"[{variant} seed {seed}] {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env=dict(os.environ, WANDB_MODE="disabled"))
    return rd


def evaluate(args, rd: Path) -> None:
    """Rank and entropy on every checkpoint (the watcher skips evaluated ones); NER on the final one."""
    from metalm.checkpoint import find_latest

    evaluator = [sys.executable, str(REPO / "launchers" / "evaluate.py"), "--no-wandb", "--log-level", "WARNING"]
    subprocess.run(evaluator + ["--watch", str(rd), "--once", "--config", "eval.metrics=[rank,entropy]"],
                   check=True, cwd=REPO)
    if not (args.ner_train and args.ner_test):
        return
    final = find_latest(rd / "checkpoints")
    for mode in ("head", "full"):
        subprocess.run(evaluator + ["--checkpoint", str(final), "--results", str(rd / f"eval-ner-{mode}"),
                                    "--config", "eval.metrics=[ner]", f"eval.ner.train={args.ner_train}",
                                    f"eval.ner.test={args.ner_test}", f"eval.ner.mode={mode}",
                                    f"eval.ner.lr={args.ner_lr[mode]}", f"eval.ner.epochs={args.ner_epochs}",
                                    f"eval.ner.word_sep={args.ner_word_sep}"], check=True, cwd=REPO)


def val_curve(rd: Path) -> list[dict]:
    from metalm.eval.report import read_jsonl

    return [r for r in read_jsonl(rd / "metrics.jsonl") if r.get("val_loss") is not None]


def first_reach(curve: list[dict], axis: str, target: float) -> float | None:
    """The `axis` value where the validation curve first reaches `target`, linearly interpolated."""
    prev = None
    for r in curve:
        if r["val_loss"] <= target:
            if prev is None:
                return float(r[axis])
            x0, y0, x1, y1 = prev[axis], prev["val_loss"], r[axis], r["val_loss"]
            return float(x0 + (x1 - x0) * (y0 - target) / (y0 - y1))
        prev = r
    return None


def compare(van: list[dict], hyb: list[dict]) -> dict:
    """A hybrid variant's validation curve against vanilla's: final losses, how much sooner (in steps, data
    tokens and FLOPs) it reaches vanilla's final loss, and its loss gap at equal steps."""
    target = van[-1]["val_loss"]
    out = {"vanilla_final_val": target, "hybrid_final_val": hyb[-1]["val_loss"]}
    for axis in ("step", "tokens", "flops"):
        reach = first_reach(hyb, axis, target)
        out[f"speedup_{axis}"] = (van[-1][axis] / reach) if reach else None
    same_step = {r["step"]: r["val_loss"] for r in hyb}
    out["val_gap_at_equal_steps"] = [(r["step"], same_step[r["step"]] - r["val_loss"]) for r in van
                                     if r["step"] in same_step]
    return out


def eval_series(rd: Path) -> dict:
    """{step: flat metrics} from the evaluator's eval.jsonl (one line per evaluated checkpoint)."""
    from metalm.eval.report import load_run

    return {int(r["step"]): r for r in load_run(rd).evals if "step" in r}


def ner_scores(rd: Path) -> dict:
    """{mode: test micro F1} of the final checkpoint's NER fine-tunes."""
    from metalm.eval.report import read_jsonl

    scores = {}
    for mode in ("head", "full"):
        rows = [r for r in read_jsonl(rd / f"eval-ner-{mode}" / "eval.jsonl") if "ner/f1" in r]
        if rows:
            scores[mode] = rows[-1]["ner/f1"]
    return scores


def plot(results: dict, runs: dict, out: Path) -> list[str]:
    from metalm.eval.report import pyplot, save_figure

    plt = pyplot()
    files = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colors = COLORS
    for (variant, seed), rd in runs.items():
        curve = val_curve(rd)
        for ax, axis in zip(axes, ("step", "tokens", "flops")):
            ax.plot([r[axis] for r in curve], [r["val_loss"] for r in curve], color=colors[variant], alpha=0.7,
                    label=f"{variant} (seed {seed})" if axis == "step" else None)
    for ax, axis in zip(axes, ("optimizer steps", "data tokens", "model FLOPs")):
        ax.set_xlabel(axis)
        ax.set_ylabel("validation loss (AR, held out)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("vanilla vs hybrid variants: held-out validation loss")
    save_figure(fig, out / "val_loss.png", dpi=120)
    files.append("val_loss.png")

    keys = [("rank/weight/attn_mean_er", "effective rank, attention weights (mean q/k/v/o)"),
            ("rank/act/mean_er", "effective rank, hidden states (mean over layers)"),
            ("entropy/norm_mean", "attention entropy / log(keys), mean over heads")]
    fig, axes = plt.subplots(1, len(keys), figsize=(16, 4))
    for (variant, seed), rd in runs.items():
        series = eval_series(rd)
        for ax, (key, _) in zip(axes, keys):
            pts = sorted((s, m[key]) for s, m in series.items() if key in m)
            if pts:
                ax.plot(*zip(*pts), marker="o", color=colors[variant], alpha=0.7,
                        label=f"{variant} (seed {seed})")
    for ax, (_, title) in zip(axes, keys):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    save_figure(fig, out / "dynamics.png", dpi=120)
    files.append("dynamics.png")
    return files


def fmt(v, spec=".3f") -> str:
    return "not reached" if v is None else format(v, spec)


def write_markdown(args, results: dict, files: list[str], out: Path) -> None:
    lines = [f"# Vanilla vs hybrid pretraining: `{shown(args.config)}`, {args.steps} steps, seeds {args.seeds}", "",
             f"Command: `python benchmarks/reproduce.py {' '.join(shown(a) for a in sys.argv[1:])}`", "",
             "| seed | variant | vanilla final val loss | variant final val loss | reaches vanilla's final loss: "
             "x sooner (steps / tokens / FLOPs) | NER F1 head vanilla / variant | NER F1 full vanilla / variant |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for seed, r in results["per_seed"].items():
        nv = r["ner"].get("vanilla", {})
        for variant, c in r["compare"].items():
            nh = r["ner"].get(variant, {})
            lines.append(f"| {seed} | {variant} | {c['vanilla_final_val']:.4f} | {c['hybrid_final_val']:.4f} | "
                         f"{fmt(c['speedup_step'], '.2f')} / {fmt(c['speedup_tokens'], '.2f')} / "
                         f"{fmt(c['speedup_flops'], '.2f')} | {fmt(nv.get('head'))} / {fmt(nh.get('head'))} | "
                         f"{fmt(nv.get('full'))} / {fmt(nh.get('full'))} |")
    lines += ["", *[f"![{f}]({f})" for f in files], ""]
    (out / "results.md").write_text("\n".join(lines))


def shown(arg: str) -> str:
    """A path inside the repository (or beside it, ../shared) as a relative path, so results read the same on
    every machine; anything else unchanged."""
    if os.path.isabs(arg) and os.path.exists(arg):
        rel = os.path.relpath(arg, REPO)
        if not rel.startswith("../../"):
            return rel
    return arg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "cpu-tiny.yaml"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default="vanilla,shipped", help=f"comma list of {', '.join(VARIANTS)} (vanilla "
                   "is always run: the others are compared with it)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--ratio", type=float, default=0.5, help="meta.hybrid_ratio of the hybrid runs")
    p.add_argument("--val-every", type=int, default=25)
    p.add_argument("--val-batches", type=int, default=16)
    p.add_argument("--checkpoints", type=int, default=4, help="checkpoints per run (rank/entropy curve points)")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--runs", default=str(REPO / "runs" / "reproduce"))
    p.add_argument("--out", default=None, help="where results.json, results.md and the plots go (default: "
                   "RUNS/results, beside the runs); --out docs/results replaces the committed results")
    p.add_argument("--ner-train", default=None)
    p.add_argument("--ner-test", default=None)
    p.add_argument("--ner-epochs", type=int, default=10)
    # The paper's 3e-5 leaves a tiny model's NER tagger at all-O (F1 0) after 10 epochs on 400 sentences;
    # at cpu-tiny full fine-tuning needs ~1e-3. Pass the paper's values explicitly for paper-size models.
    p.add_argument("--ner-lr-head", type=float, default=1e-2)
    p.add_argument("--ner-lr-full", type=float, default=1e-3)
    p.add_argument("--ner-word-sep", default="", help="eval.ner.word_sep: '' for ja/zh files (default), ' ' else")
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("overrides", nargs="*", help="extra key=value config overrides for every run")
    args = p.parse_args(argv)
    args.ner_lr = {"head": args.ner_lr_head, "full": args.ner_lr_full}
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = ["vanilla", *[v for v in args.variants.split(",") if v != "vanilla"]]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; expected some of {', '.join(VARIANTS)}")
    out = Path(args.out) if args.out else Path(args.runs) / "results"
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for seed in seeds:
        for variant in variants:
            runs[(variant, seed)] = train(args, variant, seed)
            if not args.skip_eval:
                evaluate(args, runs[(variant, seed)])
    results = {"config": shown(args.config), "steps": args.steps, "ratio": args.ratio, "per_seed": {},
               "variants": {v: VARIANTS[v] for v in variants}}
    for seed in seeds:
        curves = {v: val_curve(runs[(v, seed)]) for v in variants}
        results["per_seed"][seed] = {
            "compare": {v: compare(curves["vanilla"], curves[v]) for v in variants if v != "vanilla"},
            "ner": {v: ner_scores(runs[(v, seed)]) for v in variants},
            "curves": curves,
        }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    files = plot(results, runs, out)
    write_markdown(args, results, files, out)
    for seed, r in results["per_seed"].items():
        for variant, c in r["compare"].items():
            print(f"seed {seed} {variant}: vanilla {c['vanilla_final_val']:.4f} {variant} "
                  f"{c['hybrid_final_val']:.4f} speed-up steps {fmt(c['speedup_step'], '.2f')} tokens "
                  f"{fmt(c['speedup_tokens'], '.2f')} flops {fmt(c['speedup_flops'], '.2f')}")
    print(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
