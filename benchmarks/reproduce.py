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
Checkpoints are then evaluated (validation loss, effective rank, attention entropy, matrix statistics, CKA to
the previous checkpoint, downstream benchmarks on the first --downstream-limit documents of each task; NER F1
head-only and full when --ner-train/--ner-test are given, on every run's final checkpoint and on the vanilla
checkpoint matched to each hybrid's final one by validation loss). Re-running skips finished runs and
evaluations; a checkpoint evaluated before without one of these metrics is evaluated again. `--skip-train`
analyses runs that already exist without training anything.

At equal steps a hybrid run is a less-trained model (part of its steps went to the meta objective), so every
evaluated hybrid checkpoint is also matched with the vanilla checkpoint nearest it in validation loss, as well
as in steps, tokens and FLOPs (metalm.eval.report.match_at), and every number the evaluator recorded for a
checkpoint (dynamics, downstream scores, whatever it has: metalm.eval.report.headline_keys) is plotted against
steps and against validation loss. Writes RESULTS/results.json, RESULTS/*.png and RESULTS/results.md, RESULTS
being --out (default runs/reproduce/results; `--out docs/results` replaces the committed results).
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


EVAL_METRICS = ("val_loss", "rank", "entropy", "stats", "cka", "downstream")


def lacks_metrics(result: dict, wanted=EVAL_METRICS) -> list[str]:
    """The metrics of `wanted` that an evaluator result record (RESULTS/step_X.json) neither has a number of nor
    says why it skipped."""
    keys = result.get("metrics", {})
    said = set(result.get("skipped", {})) | set(result.get("failed", {}))
    return [m for m in wanted if m not in said and not any(k == m or k.startswith(f"{m}/") for k in keys)]


def drop_stale_results(results: Path) -> list[str]:
    """Delete the results evaluated without one of EVAL_METRICS (an older evaluation), so the next pass evaluates
    those checkpoints again, in step order (CKA compares each with the one before). Returns their names."""
    dropped = []
    for p in sorted(results.glob("step_*.json")):
        if p.name.endswith(".error.json"):
            continue
        if lacks_metrics(json.loads(p.read_text())):
            p.unlink()
            dropped.append(p.stem)
    return dropped


EVALUATOR = [sys.executable, str(REPO / "launchers" / "evaluate.py"), "--no-wandb", "--log-level", "WARNING"]


def evaluate(args, rd: Path) -> None:
    """EVAL_METRICS on every checkpoint (the watcher skips evaluated ones); NER on the final one."""
    from metalm.checkpoint import find_latest

    dropped = drop_stale_results(rd / "eval")
    if dropped:
        print(f"[{rd.name}] evaluating {len(dropped)} checkpoint(s) again for {', '.join(EVAL_METRICS)}", flush=True)
    subprocess.run(EVALUATOR + ["--watch", str(rd), "--once", "--config", f"eval.metrics=[{','.join(EVAL_METRICS)}]",
                                f"eval.downstream_limit={args.downstream_limit}"], check=True, cwd=REPO)
    if args.ner_train and args.ner_test:
        fine_tune_ner(args, rd, find_latest(rd / "checkpoints"))


def fine_tune_ner(args, rd: Path, ckpt: Path) -> None:
    """NER F1, head-only and full, of checkpoint `ckpt` of run `rd` (results in RUN/eval-ner-MODE; a checkpoint
    fine-tuned there before is skipped)."""
    for mode in ("head", "full"):
        subprocess.run(EVALUATOR + ["--checkpoint", str(ckpt), "--results", str(rd / f"eval-ner-{mode}"),
                                    "--config", "eval.metrics=[ner]", f"eval.ner.train={args.ner_train}",
                                    f"eval.ner.test={args.ner_test}", f"eval.ner.mode={mode}",
                                    f"eval.ner.lr={args.ner_lr[mode]}", f"eval.ner.epochs={args.ner_epochs}",
                                    f"eval.ner.word_sep={args.ner_word_sep}"], check=True, cwd=REPO)


def vanilla_at_equal_loss(van: list[dict], hyb: list[dict], step: int) -> dict | None:
    """The vanilla checkpoint nearest in validation loss to the hybrid's evaluated checkpoint at `step`, or None
    when that checkpoint has no validation loss."""
    from metalm.eval.report import match_at

    pairs = match_at(van, [r for r in hyb if r["step"] == step], "val_loss")
    return pairs[-1][0] if pairs else None


def ner_at_equal_loss(args, van_rd: Path, hyb_rd: Path) -> None:
    """NER of the vanilla checkpoint matched by validation loss to the hybrid run's final checkpoint."""
    from metalm.checkpoint import find_latest, read_state, step_dir_name

    final = find_latest(hyb_rd / "checkpoints")
    match = vanilla_at_equal_loss(checkpoints(van_rd), checkpoints(hyb_rd), read_state(final).step) if final else None
    if match is None:
        print(f"[{hyb_rd.name}] no evaluated final checkpoint with a validation loss: no NER at equal loss", flush=True)
        return
    fine_tune_ner(args, van_rd, van_rd / "checkpoints" / step_dir_name(match["step"]))


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


def checkpoints(rd: Path) -> list[dict]:
    """The run's evaluated checkpoints in step order, each with every number the evaluator recorded, its
    validation loss and its FLOPs (metalm.eval.report.checkpoint_rows)."""
    from metalm.eval.report import checkpoint_rows, load_run

    return checkpoint_rows(load_run(rd)) if rd.is_dir() else []


MATCH_AXES = ("val_loss", "step", "tokens", "flops")


def matched(van: list[dict], hyb: list[dict]) -> dict:
    """{axis: [{"hybrid": checkpoint, "vanilla": the vanilla checkpoint nearest it on axis}, ...]} for the
    axes val_loss, step, tokens and FLOPs; each checkpoint with its position and its headline numbers only."""
    from metalm.eval.report import headline_keys, match_at

    def brief(row: dict) -> dict:
        return {k: row[k] for k in (*MATCH_AXES, *headline_keys([row])) if k in row}

    return {axis: [{"hybrid": brief(h), "vanilla": brief(v)} for v, h in match_at(van, hyb, axis)]
            for axis in MATCH_AXES}


def ner_scores(rd: Path, step: int | None = None) -> dict:
    """{mode: test micro F1} of the NER fine-tunes of the checkpoint at `step` (default: the latest one
    fine-tuned, the final checkpoint), and its "step"."""
    from metalm.eval.report import read_jsonl

    rows = {mode: [r for r in read_jsonl(rd / f"eval-ner-{mode}" / "eval.jsonl") if "ner/f1" in r]
            for mode in ("head", "full")}
    if step is None:
        step = max((r["step"] for rs in rows.values() for r in rs), default=None)
    scores: dict = {"step": step}
    for mode, rs in rows.items():
        at = [r for r in rs if r["step"] == step]
        if at:
            scores[mode] = at[-1]["ner/f1"]
    return scores


def ner_matched(van_rd: Path, hyb_rd: Path, van: list[dict], hyb: list[dict]) -> dict | None:
    """The hybrid's final NER scores beside those of the vanilla checkpoint matched to it by validation loss:
    {"hybrid": scores, "vanilla": scores, "hybrid_val_loss", "vanilla_val_loss"}, or None when the hybrid has no
    NER or its fine-tuned checkpoint no validation loss."""
    hyb_ner = ner_scores(hyb_rd)
    match = vanilla_at_equal_loss(van, hyb, hyb_ner["step"]) if hyb_ner.get("step") is not None else None
    if match is None:
        return None
    return {"hybrid": hyb_ner, "vanilla": ner_scores(van_rd, match["step"]),
            "hybrid_val_loss": next(r["val_loss"] for r in hyb if r["step"] == hyb_ner["step"]),
            "vanilla_val_loss": match["val_loss"]}


def plot(results: dict, runs: dict, out: Path) -> list[str]:
    from metalm.eval.report import headline_keys, plot_against, pyplot, save_figure

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

    rows = {f"{variant} (seed {seed})": checkpoints(rd) for (variant, seed), rd in runs.items()}
    keys = [k for k in headline_keys([r for rs in rows.values() for r in rs]) if k != "val_loss"]
    for x, name, title in (("step", "dynamics.png", "evaluator numbers per checkpoint against optimizer steps"),
                           ("val_loss", "dynamics_at_equal_loss.png",
                            "evaluator numbers per checkpoint against validation loss (equal loss)")):
        if plot_against(rows, keys, x, out / name, colors, title):
            files.append(name)
    return files


def fmt(v, spec=".3f") -> str:
    return "not reached" if v is None else format(v, spec)


def cell(v) -> str:
    """A number of the equal-loss tables: 4 significant digits, or – when the checkpoint has none."""
    return "–" if v is None else format(v, ".4g")


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
    lines += ner_equal_loss_lines(results)
    lines += equal_loss_lines(results)
    lines += ["", *[f"![{f}]({f})" for f in files], ""]
    (out / "results.md").write_text("\n".join(lines))


def ner_equal_loss_lines(results: dict) -> list[str]:
    """NER F1 of each variant's final checkpoint beside the vanilla checkpoint matched to it by validation loss."""
    rows = [(seed, v, m) for seed, r in results["per_seed"].items() for v, m in r.get("ner_equal_loss", {}).items()
            if m is not None]
    if not rows:
        return []
    lines = ["", "## NER at equal validation loss", "",
             "Each variant's final checkpoint beside the vanilla checkpoint nearest it in validation loss.", "",
             "| seed | variant (step, val loss) | vanilla at equal loss (step, val loss) "
             "| NER F1 head variant / vanilla | NER F1 full variant / vanilla |", "| --- | --- | --- | --- | --- |"]
    for seed, variant, m in rows:
        h, v = m["hybrid"], m["vanilla"]
        lines.append(f"| {seed} | {variant} (step {h['step']:,}, {m['hybrid_val_loss']:.4f}) | step {v['step']:,}, "
                     f"{m['vanilla_val_loss']:.4f} | {cell(h.get('head'))} / {cell(v.get('head'))} | "
                     f"{cell(h.get('full'))} / {cell(v.get('full'))} |")
    return lines


def equal_loss_lines(results: dict) -> list[str]:
    """Per seed and variant: its last evaluated checkpoint beside the vanilla checkpoint matched to it on each axis
    (validation loss, steps, tokens, FLOPs), on every number the evaluator recorded for both."""
    from metalm.eval.report import headline_keys

    lines = ["", "## At equal validation loss, steps, tokens and FLOPs", "",
             "Each variant's last evaluated checkpoint beside the vanilla checkpoint nearest it in validation loss, "
             "steps, tokens and FLOPs (at equal steps a hybrid run is a less-trained model).", ""]
    for seed, r in results["per_seed"].items():
        for variant, by_axis in r.get("matched", {}).items():
            pairs = {axis: ps[-1] for axis, ps in by_axis.items() if ps}
            if "val_loss" not in pairs:
                lines += [f"- seed {seed} {variant}: no evaluated checkpoint with a validation loss", ""]
                continue
            last = pairs["val_loss"]["hybrid"]
            axes = [a for a in MATCH_AXES if a in pairs]
            lines += [f"| seed {seed} | {variant} (step {last['step']:,}) | " + " | ".join(
                          f"vanilla at equal {a} (step {pairs[a]['vanilla']['step']:,})" for a in axes) + " |",
                      "| --- | --- |" + " --- |" * len(axes)]
            keys = ["val_loss"] + [k for k in headline_keys([last, *(p["vanilla"] for p in pairs.values())])
                                   if k != "val_loss"]
            for key in keys:
                lines.append(f"| {key} | {cell(last.get(key))} | " + " | ".join(
                    cell(pairs[a]["vanilla"].get(key)) for a in axes) + " |")
            lines.append("")
    return lines


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
    p.add_argument("--downstream-limit", type=int, default=200, help="eval.downstream_limit: the first N documents "
                   "of each downstream task (default 200; 0: all)")
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--skip-train", action="store_true", help="train nothing: analyse the runs already in --runs "
                   "(evaluating what is not evaluated yet unless --skip-eval)")
    p.add_argument("overrides", nargs="*", help="extra key=value config overrides for every run")
    args = p.parse_args(argv)
    args.ner_lr = {"head": args.ner_lr_head, "full": args.ner_lr_full}
    if args.downstream_limit < 0:
        p.error(f"--downstream-limit: expected >= 0 documents per task (0: all), got {args.downstream_limit}")
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = ["vanilla", *[v for v in args.variants.split(",") if v != "vanilla"]]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; expected some of {', '.join(VARIANTS)}")
    out = Path(args.out) if args.out else Path(args.runs) / "results"
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    if args.skip_train:
        missing = [str(run_dir(args, v, s)) for s in seeds for v in variants if not val_curve(run_dir(args, v, s))]
        if missing:
            p.error(f"--skip-train: no validation curve (metrics.jsonl with val_loss) in {', '.join(missing)}; "
                    f"train them first (without --skip-train) or point --runs at the runs' parent directory")
    for seed in seeds:
        for variant in variants:
            runs[(variant, seed)] = run_dir(args, variant, seed) if args.skip_train else train(args, variant, seed)
            if not args.skip_eval:
                evaluate(args, runs[(variant, seed)])
        if not args.skip_eval and args.ner_train and args.ner_test:
            for variant in variants[1:]:
                ner_at_equal_loss(args, runs[("vanilla", seed)], runs[(variant, seed)])
    results = {"config": shown(args.config), "steps": args.steps, "ratio": args.ratio, "per_seed": {},
               "variants": {v: VARIANTS[v] for v in variants}}
    for seed in seeds:
        curves = {v: val_curve(runs[(v, seed)]) for v in variants}
        ckpts = {v: checkpoints(runs[(v, seed)]) for v in variants}
        results["per_seed"][seed] = {
            "compare": {v: compare(curves["vanilla"], curves[v]) for v in variants if v != "vanilla"},
            "matched": {v: matched(ckpts["vanilla"], ckpts[v]) for v in variants if v != "vanilla"},
            "ner": {v: ner_scores(runs[(v, seed)]) for v in variants},
            "ner_equal_loss": {v: ner_matched(runs[("vanilla", seed)], runs[(v, seed)], ckpts["vanilla"], ckpts[v])
                               for v in variants if v != "vanilla"},
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
