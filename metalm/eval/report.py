"""Plots and a Markdown summary comparing runs.

    metalm-report runs/tiny-maml runs/tiny-vanilla --out reports/tiny [--smooth 10]

Reads each RUN/metrics.jsonl (training log: "step", "tokens" and some of "ar_loss", "meta_loss", "val_loss": the
trainer's periodic validation loss, token-weighted like the evaluator's) and RUN/eval/eval.jsonl (the evaluator's
results), and writes into --out:
    loss.png     loss curves of all runs on shared axes, against steps and against tokens
    rank.png     effective rank per layer over steps (attention weights, and activations when measured)
    entropy.png  normalised attention entropy, a layer x step heat map per run
    ner.png      NER test F1 over steps
    downstream.png  downstream benchmarks over steps: the mean bits-per-byte and each task's acc_per_char
    layers.png   per layer over steps: CKA to the previous checkpoint, weight condition number and Hoyer
                 sparsity, activation Gini sparsity (the evaluator's `cka` and `stats`), gradient norm (training)
    equal_loss.png  every headline evaluator number (see `headline_keys`) against the checkpoint's validation loss
    report.md    summary table, "run B reaches run A's final loss N x sooner" (steps and tokens), the last
                 checkpoint's downstream scores, and the comparison at equal validation loss

Speed-up: for each ordered pair (A, B) the loss is val_loss when both runs log it, else ar_loss. Training
losses are smoothed with a trailing mean over the last `--smooth` logged values (default 10) logged after half of
the current step (so the first losses, about ln(vocabulary), do not lift later points; val_loss, already an
average over many batches, is not smoothed). The target is A's final smoothed loss; B "reaches" it at its first
logged step whose smoothed loss is <= the target. N = A's final step / B's reaching step (and the same with
tokens); N > 1 means B got there sooner.

Equal loss: at equal steps a run that learns less per step is a less-trained model, so checkpoints are also
compared at equal validation loss. A checkpoint's validation loss is the evaluator's `val_loss` when it measured
it, else the trainer's `val_loss` logged at that step (metrics.jsonl); its FLOPs are the trainer's at that step.
Each checkpoint of a run is matched with the checkpoint of the first run whose value on the axis (val_loss, step,
tokens or flops) is nearest (`match_at`; a tie goes to the earlier checkpoint).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence

from metalm.console import console_handler

log = logging.getLogger("metalm.eval.report")

LOSS_KEYS = ("ar_loss", "meta_loss", "val_loss")
MATCH_AXES = ("val_loss", "step", "tokens", "flops")
NOT_HEADLINE = {"step", "tokens", "flops", "seconds", "evaluated_at", "checkpoint", "cka/prev_step",
                "val_loss_trainer", "val_batches", "val_tokens"}
_PER_PART = re.compile(r"(^|/)[LH]\d+(/|$)")  # a per-layer or per-head key


def read_jsonl(path: Path) -> list[dict]:
    """JSON objects of a .jsonl file; a torn last line or a non-JSON line is skipped with a warning."""
    if not path.is_file():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: not JSON, skipped", path, i)
            continue
        if isinstance(obj, dict):
            rows.append(obj)
    return rows


def _num(v) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


@dataclass
class Series:
    steps: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.steps)


def series(rows: Sequence[dict], key: str) -> Series:
    """The rows that carry a finite `key` and a step, sorted by step (a later duplicate step wins)."""
    by_step: dict[int, tuple[int, float]] = {}
    for r in rows:
        v, s = _num(r.get(key)), _num(r.get("step"))
        if v is None or s is None:
            continue
        by_step[int(s)] = (int(_num(r.get("tokens")) or 0), v)
    out = Series()
    for s in sorted(by_step):
        out.steps.append(s)
        out.tokens.append(by_step[s][0])
        out.values.append(by_step[s][1])
    return out


def smooth(values: Sequence[float], window: int, steps: Sequence[int] | None = None) -> list[float]:
    """Trailing mean over the last `window` values: out[i] = mean(values[max(0, i-window+1) : i+1]). With `steps`
    (the step of each value), only values logged after half of step i count, so the early losses of a run (about
    ln(vocabulary) at step 1) never weigh on a point far from them: with losses logged every 10 steps, the
    point at step 100 is the mean of steps 60-100, not of steps 10-100."""
    if window <= 1:
        return list(values)
    out = []
    for i in range(len(values)):
        lo = max(0, i - window + 1)
        if steps is not None:
            while lo < i and steps[lo] <= steps[i] / 2:
                lo += 1
        out.append(sum(values[lo:i + 1]) / (i + 1 - lo))
    return out


def first_reach(s: Series, values: Sequence[float], target: float) -> tuple[int, int] | None:
    for st, tok, v in zip(s.steps, s.tokens, values):
        if v <= target:
            return st, tok
    return None


@dataclass
class Run:
    path: Path
    name: str
    metrics: list[dict]
    evals: list[dict]

    def loss(self, key: str, window: int) -> tuple[Series, list[float]]:
        s = series(self.metrics, key)
        return s, (s.values if key == "val_loss" else smooth(s.values, window, s.steps))


def load_run(path: str | Path) -> Run:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: not a run directory")
    return Run(p, p.name, read_jsonl(p / "metrics.jsonl"), read_jsonl(p / "eval" / "eval.jsonl"))


def speedups(runs: Sequence[Run], window: int) -> list[dict]:
    rows = []
    for a in runs:
        for b in runs:
            if a is b:
                continue
            key = "val_loss" if series(a.metrics, "val_loss") and series(b.metrics, "val_loss") else "ar_loss"
            sa, va = a.loss(key, window)
            sb, vb = b.loss(key, window)
            row = {"a": a.name, "b": b.name, "key": key}
            if not sa or not sb:
                row["note"] = f"no {key} in one of the runs"
                rows.append(row)
                continue
            target = va[-1]
            row.update(target=target, a_step=sa.steps[-1], a_tokens=sa.tokens[-1])
            hit = first_reach(sb, vb, target)
            if hit is None:
                row["note"] = f"{b.name} never reaches {target:.4f} (its best: {min(vb):.4f})"
            else:
                row.update(b_step=hit[0], b_tokens=hit[1])
                row["x_steps"] = sa.steps[-1] / hit[0] if hit[0] > 0 else math.inf
                row["x_tokens"] = sa.tokens[-1] / hit[1] if hit[1] > 0 else math.inf
            rows.append(row)
    return rows


def checkpoint_rows(r: Run) -> list[dict]:
    """One dict per evaluated checkpoint, in step order: the evaluator's numeric keys, `flops` from the trainer's
    record at that step, and `val_loss` from the trainer's at that step when the evaluator did not measure it
    (also kept as `val_loss_trainer`)."""
    flops: dict[int, float] = {}
    trainer_val: dict[int, float] = {}
    for m in r.metrics:
        s = _num(m.get("step"))
        if s is None:
            continue
        if _num(m.get("flops")) is not None:
            flops[int(s)] = float(m["flops"])
        if _num(m.get("val_loss")) is not None:
            trainer_val[int(s)] = float(m["val_loss"])
    rows: dict[int, dict] = {}
    for e in r.evals:
        s = _num(e.get("step"))
        if s is None:
            continue
        row = {k: float(v) for k, v in e.items() if _num(v) is not None}
        row["step"] = int(s)
        if int(s) in flops:
            row.setdefault("flops", flops[int(s)])
        if int(s) in trainer_val:
            row["val_loss_trainer"] = trainer_val[int(s)]
            row.setdefault("val_loss", trainer_val[int(s)])
        rows[int(s)] = row  # a later duplicate step wins
    return [rows[s] for s in sorted(rows)]


def headline_keys(rows: Sequence[dict]) -> list[str]:
    """The numeric keys of the checkpoints' rows that are one number per checkpoint (no per-layer `L<i>` or per-
    head `H<i>` part, no bookkeeping such as step or seconds): whatever the evaluator recorded, `downstream/...`
    included."""
    keys = {k for r in rows for k, v in r.items() if _num(v) is not None}
    return sorted(k for k in keys if k not in NOT_HEADLINE and not _PER_PART.search(k))


def nearest(rows: Sequence[dict], axis: str, value: float) -> dict | None:
    """The row whose `axis` value is nearest `value` (the first such row in order on a tie), or None."""
    best = None
    for r in rows:
        v = _num(r.get(axis))
        if v is not None and (best is None or abs(v - value) < abs(best[axis] - value)):
            best = r
    return best


def match_at(ref: Sequence[dict], other: Sequence[dict], axis: str) -> list[tuple[dict, dict]]:
    """For each row of `other` that has `axis`, (the row of `ref` nearest it on `axis`, that row)."""
    pairs = []
    for r in other:
        v = _num(r.get(axis))
        m = nearest(ref, axis, v) if v is not None else None
        if m is not None:
            pairs.append((m, r))
    return pairs


# ----------------------------------------------------------------------------------------------- plots


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Lay out, write and close a figure; returns `path`."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def plot_losses(runs: Sequence[Run], window: int, out: Path) -> Path | None:
    have = [r for r in runs if any(series(r.metrics, k) for k in LOSS_KEYS)]
    if not have:
        return None
    plt = pyplot()
    with_meta = any(series(r.metrics, "meta_loss") for r in have)
    ncols = 3 if with_meta else 2
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(have):
        c = colors[i % len(colors)]
        for ax, xkey in ((axes[0], "steps"), (axes[1], "tokens")):
            s, v = r.loss("ar_loss", window)
            if s:
                ax.plot(getattr(s, xkey), v, color=c, lw=1.5, label=f"{r.name} ar_loss (smoothed {window})")
            s, v = r.loss("val_loss", window)
            if s:
                ax.plot(getattr(s, xkey), v, color=c, ls="--", marker="o", ms=3, label=f"{r.name} val_loss")
        if with_meta:
            s, v = r.loss("meta_loss", window)
            if s:
                axes[2].plot(s.steps, v, color=c, lw=1.5, label=f"{r.name} meta_loss")
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("tokens")
    for ax in axes[:2]:
        ax.set_ylabel("loss (nats)")
        ax.set_title("language-model loss")
    if with_meta:
        axes[2].set_xlabel("step")
        axes[2].set_title("meta (query) loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    return save_figure(fig, out / "loss.png")


def _layer_series(evals: Sequence[dict], pattern: str) -> dict[int, Series]:
    """{layer: series} for eval keys matching `pattern` (a regex with one group: the layer index)."""
    rx = re.compile(pattern)
    keys: dict[int, str] = {}
    for e in evals:
        for k in e:
            m = rx.fullmatch(k)
            if m:
                keys[int(m.group(1))] = k
    return {layer: series(evals, k) for layer, k in sorted(keys.items())}


def _draw_layers(ax, layers: dict[int, Series], title: str, cmap, marker: str | None = "o") -> None:
    """One panel of a per-layer plot: a line per layer coloured by depth, or "not measured"."""
    for layer, s in layers.items():
        ax.plot(s.steps, s.values, marker=marker, ms=3, color=cmap(layer / max(1, len(layers) - 1)),
                label=f"L{layer}")
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if layers:
        ax.legend(fontsize=6, ncol=2)
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)


def plot_rank(runs: Sequence[Run], out: Path) -> Path | None:
    panels = [("weights: mean ER of q/k/v/o", r"rank/weight/L(\d+)/attn_mean_er"),
              ("activations: ER of the residual stream", r"rank/act/L(\d+)/er")]
    have = [r for r in runs if _layer_series(r.evals, panels[0][1])]
    if not have:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(len(have), 2, figsize=(12, 3.8 * len(have)), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for row, r in enumerate(have):
        for col, (title, pat) in enumerate(panels):
            _draw_layers(axes[row][col], _layer_series(r.evals, pat), f"{r.name} — {title}", cmap)
            axes[row][col].set_ylabel("effective rank")
    return save_figure(fig, out / "rank.png")


def plot_entropy(runs: Sequence[Run], out: Path) -> Path | None:
    have = [(r, _layer_series(r.evals, r"entropy/L(\d+)/norm_mean")) for r in runs]
    have = [(r, ls) for r, ls in have if ls]
    if not have:
        return None
    plt = pyplot()
    # one colour scale for every run (comparable panels), from the smallest value seen up to 1 (uniform)
    lo = min(v for _, layers in have for ser in layers.values() for v in ser.values)
    vmin = max(0.0, min(0.9, math.floor(lo * 20) / 20))
    fig, axes = plt.subplots(1, len(have), figsize=(6 * len(have), 4), squeeze=False)
    for ax, (r, layers) in zip(axes[0], have):
        steps = sorted({s for ser in layers.values() for s in ser.steps})
        grid = [[math.nan] * len(steps) for _ in layers]
        for li, ser in enumerate(layers.values()):
            for st, v in zip(ser.steps, ser.values):
                grid[li][steps.index(st)] = v
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="magma", vmin=vmin, vmax=1.0,
                       interpolation="nearest")
        ax.set_yticks(range(len(layers)), [f"L{k}" for k in layers])
        idx = list(range(len(steps)))
        stride = max(1, len(steps) // 10)
        ax.set_xticks(idx[::stride], [str(steps[i]) for i in idx[::stride]], rotation=45, fontsize=7)
        ax.set_xlabel("step")
        ax.set_title(f"{r.name} — attention entropy / log(#keys)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    return save_figure(fig, out / "entropy.png")


def plot_ner(runs: Sequence[Run], out: Path) -> Path | None:
    have = [(r, series(r.evals, "ner/f1"), series(r.evals, "ner/avg_f1")) for r in runs]
    have = [h for h in have if h[1] or h[2]]
    if not have:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r, f1, avg in have:
        if f1:
            ax.plot(f1.steps, f1.values, marker="o", ms=3, label=f"{r.name} test F1")
        if avg:
            ax.plot(avg.steps, avg.values, marker="s", ms=3, ls="--", label=f"{r.name} mean F1 over languages")
    ax.set_xlabel("step")
    ax.set_ylabel("span micro F1 (seqeval)")
    ax.set_title("NER fine-tuning F1 per checkpoint")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, out / "ner.png")


def plot_layers(runs: Sequence[Run], out: Path) -> Path | None:
    """Per layer over steps: the evaluator's CKA and matrix statistics, the trainer's gradient norms."""
    panels = [("evals", "CKA to the previous checkpoint", r"cka/L(\d+)"),
              ("evals", "weight condition number (mean over matrices)", r"stats/weight/L(\d+)/cond"),
              ("evals", "weight Hoyer sparsity (mean over matrices)", r"stats/weight/L(\d+)/hoyer"),
              ("evals", "activation Gini sparsity", r"stats/act/L(\d+)/gini"),
              ("metrics", "gradient norm (training)", r"grad_norm/L(\d+)")]
    panels = [p for p in panels if any(_layer_series(getattr(r, p[0]), p[2]) for r in runs)]
    have = [r for r in runs if any(_layer_series(getattr(r, src), pat) for src, _, pat in panels)]
    if not have:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(len(have), len(panels), figsize=(4.5 * len(panels), 3.6 * len(have)), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for row, r in enumerate(have):
        for col, (src, title, pat) in enumerate(panels):
            layers = _layer_series(getattr(r, src), pat)
            _draw_layers(axes[row][col], layers, f"{r.name} — {title}", cmap, "o" if src == "evals" else None)
            if layers and "cond" in pat:
                axes[row][col].set_yscale("log")  # condition numbers span orders of magnitude
    return save_figure(fig, out / "layers.png")


def plot_against(rows_by_label: dict[str, Sequence[dict]], keys: Sequence[str], x: str, path: Path,
                 colors: dict[str, str] | None = None, title: str = "") -> Path | None:
    """One panel per key: each labelled series of checkpoint rows, the key against `x` (e.g. val_loss or step)."""
    keys = [k for k in keys if any(_num(r.get(k)) is not None and _num(r.get(x)) is not None
                                   for rows in rows_by_label.values() for r in rows)]
    if not keys:
        return None
    plt = pyplot()
    ncols = min(4, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for label, rows in rows_by_label.items():
            pts = sorted((r[x], r[key]) for r in rows if _num(r.get(x)) is not None and _num(r.get(key)) is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, alpha=0.8, label=label,
                        color=(colors or {}).get(label.split(" ")[0]))
        ax.set_title(key, fontsize=8)
        ax.set_xlabel("validation loss" if x == "val_loss" else x, fontsize=8)
        if x == "val_loss":
            ax.invert_xaxis()  # training goes left to right
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_equal_loss(runs: Sequence[Run], out: Path) -> Path | None:
    rows = {r.name: checkpoint_rows(r) for r in runs}
    keys = headline_keys([x for rs in rows.values() for x in rs])
    return plot_against(rows, [k for k in keys if k != "val_loss"], "val_loss", out / "equal_loss.png",
                        title="evaluator numbers against validation loss")
def _downstream_tasks(evals: Sequence[dict]) -> list[str]:
    rx = re.compile(r"downstream/([^/]+)/bpb")
    return sorted({m.group(1) for e in evals for k in e for m in [rx.fullmatch(k)] if m})


def plot_downstream(runs: Sequence[Run], out: Path) -> Path | None:
    have = [r for r in runs if series(r.evals, "downstream/bpb")]
    if not have:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for i, r in enumerate(have):
        s = series(r.evals, "downstream/bpb")
        axes[0].plot(s.steps, s.values, marker="o", ms=3, color=colors[i % len(colors)], label=r.name)
        for j, task in enumerate(_downstream_tasks(r.evals)):
            s = series(r.evals, f"downstream/{task}/acc_per_char")
            axes[1].plot(s.steps, s.values, marker="o", ms=3, color=colors[j % len(colors)],
                         ls=styles[i % len(styles)], label=f"{r.name} {task}")
    axes[0].set_ylabel("bits per byte of the gold answer (mean over tasks)")
    axes[0].set_title("downstream bpb (lower is better)")
    axes[1].set_ylabel("accuracy (length-normalised per character)")
    axes[1].set_title("downstream acc_per_char")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, out / "downstream.png")


# ----------------------------------------------------------------------------------------------- markdown


def _fmt(v, nd=4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _last_loss(r: Run, key: str, window: int):
    """The last value of `key`'s trailing mean over `window` logged values, or None if it was never logged."""
    s, v = r.loss(key, window)
    return v[-1] if s else None


def _last_eval(r: Run, key: str):
    s = series(r.evals, key)
    return s.values[-1] if s else None


def downstream_table(runs: Sequence[Run]) -> list[str]:
    """Markdown lines: each run's downstream scores at its last evaluated checkpoint ([] when none has any)."""
    rows = []
    for r in runs:
        s = series(r.evals, "downstream/bpb")
        if not s:
            continue
        last = next(e for e in reversed(r.evals) if _num(e.get("downstream/bpb")) is not None)
        for task in _downstream_tasks([last]):
            rows.append(f"| {r.name} | {s.steps[-1]:,} | {task} | {_fmt(last.get(f'downstream/{task}/acc'), 3)} | "
                        f"{_fmt(last.get(f'downstream/{task}/acc_per_char'), 3)} | "
                        f"{_fmt(last.get(f'downstream/{task}/bpb'), 4)} |")
        rows.append(f"| {r.name} | {s.steps[-1]:,} | mean | | | {_fmt(s.values[-1], 4)} |")
    if not rows:
        return []
    return ["", "## Downstream benchmarks (last evaluated checkpoint)", "",
            "Zero-shot ranked classification on OLMo's in-loop tasks (docs/evaluation.md): acc (raw log-likelihood), "
            "acc_per_char (per character) and bits per byte of the gold answer.", "",
            "| run | step | task | acc | acc_per_char | bpb |", "|---|---|---|---|---|---|", *rows]


def markdown(runs: Sequence[Run], window: int, plots: dict[str, Path | None]) -> str:
    lines = ["# metalm report", "", f"Runs: {', '.join(f'`{r.path}`' for r in runs)}", "",
             "## Runs", "",
             "| run | last step | tokens | ar_loss (smoothed) | val_loss | meta_loss (smoothed) | attn ER | "
             "entropy (norm.) | NER F1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        steps = [x for x in (_num(m.get("step")) for m in r.metrics) if x is not None]
        toks = [x for x in (_num(m.get("tokens")) for m in r.metrics) if x is not None]
        lines.append(
            f"| {r.name} | {_fmt(int(max(steps)) if steps else None)} | {_fmt(int(max(toks)) if toks else None)} | "
            f"{_fmt(_last_loss(r, 'ar_loss', window))} | {_fmt(_last_loss(r, 'val_loss', 1))} | "
            f"{_fmt(_last_loss(r, 'meta_loss', window))} | "
            f"{_fmt(_last_eval(r, 'rank/weight/attn_mean_er'), 2)} | {_fmt(_last_eval(r, 'entropy/norm_mean'), 3)} | "
            f"{_fmt(_last_eval(r, 'ner/f1'), 3)} |")
    lines += ["", "## Time to reach another run's final loss", "",
              f"Loss: val_loss when both runs log it, else ar_loss (trailing mean over {window} logged values). "
              "N = A's final step (tokens) / the first step (tokens) at which B's loss is <= A's final loss.", "",
              "| A | B | loss | A's final loss | A: steps / tokens | B reaches it at steps / tokens | "
              "B is N× sooner (steps) | N× sooner (tokens) |",
              "|---|---|---|---|---|---|---|---|"]
    sentences = []
    for row in speedups(runs, window):
        if "x_steps" in row:
            lines.append(
                f"| {row['a']} | {row['b']} | {row['key']} | {row['target']:.4f} | {row['a_step']:,} / "
                f"{row['a_tokens']:,} | {row['b_step']:,} / {row['b_tokens']:,} | {row['x_steps']:.2f}× | "
                f"{row['x_tokens']:.2f}× |")
            sentences.append(f"- run {row['b']} reaches run {row['a']}'s final {row['key']} ({row['target']:.4f}) "
                             f"{row['x_steps']:.2f}× sooner in steps and {row['x_tokens']:.2f}× sooner in tokens.")
        else:
            a_pos = f"{row['a_step']:,} / {row['a_tokens']:,}" if "a_step" in row else "–"
            lines.append(f"| {row['a']} | {row['b']} | {row['key']} | {_fmt(row.get('target'))} | {a_pos} | – | "
                         f"– ({row['note']}) | – |")
            sentences.append(f"- run {row['b']} vs run {row['a']}: {row['note']}.")
    lines += [""] + sentences + downstream_table(runs) + [""] + equal_loss_markdown(runs) + ["## Plots", ""]
    for title, p in plots.items():
        lines.append(f"![{title}]({p.name})" if p else f"- {title}: no data")
    return "\n".join(lines) + "\n"


def equal_loss_markdown(runs: Sequence[Run]) -> list[str]:
    """For every run after the first: its last evaluated checkpoint beside the first run's checkpoint nearest it in
    validation loss and the first run's checkpoint at the same step, on every headline number."""
    if len(runs) < 2:
        return []
    ref = runs[0]
    ref_rows = checkpoint_rows(ref)
    lines = ["## At equal validation loss", "",
             f"Each run's last evaluated checkpoint beside {ref.name}'s checkpoint nearest it in validation loss and "
             f"{ref.name}'s checkpoint nearest its step (validation loss: the evaluator's, else the trainer's at that "
             "step).", ""]
    for r in runs[1:]:
        rows = [x for x in checkpoint_rows(r) if _num(x.get("val_loss")) is not None]
        if not rows or not any(_num(x.get("val_loss")) is not None for x in ref_rows):
            lines += [f"- {r.name} vs {ref.name}: no checkpoint with a validation loss in one of them.", ""]
            continue
        last = rows[-1]
        at_loss, at_step = nearest(ref_rows, "val_loss", last["val_loss"]), nearest(ref_rows, "step", last["step"])
        lines += [f"| {r.name} vs {ref.name} | {r.name} step {last['step']:,} | {ref.name} at equal loss: step "
                  f"{at_loss['step']:,} | {ref.name} at equal step: step {at_step['step']:,} |",
                  "|---|---|---|---|"]
        for key in ["val_loss"] + [k for k in headline_keys([last, at_loss, at_step]) if k != "val_loss"]:
            lines.append(f"| {key} | {_fmt(last.get(key))} | {_fmt(at_loss.get(key))} | {_fmt(at_step.get(key))} |")
        lines.append("")
    return lines


def make_report(run_paths: Sequence[str | Path], out: str | Path, window: int = 10) -> dict[str, Path | None]:
    runs = [load_run(p) for p in run_paths]
    names = [r.name for r in runs]
    for r in runs:  # same directory names under different parents: disambiguate
        if names.count(r.name) > 1:
            r.name = f"{r.path.parent.name}/{r.name}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = {"loss": plot_losses(runs, window, out), "effective rank": plot_rank(runs, out),
             "attention entropy": plot_entropy(runs, out), "NER F1": plot_ner(runs, out),
             "downstream": plot_downstream(runs, out), "per-layer dynamics": plot_layers(runs, out),
             "at equal validation loss": plot_equal_loss(runs, out)}
    md = out / "report.md"
    md.write_text(markdown(runs, window, plots))
    return {**plots, "report": md}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="metalm run report: plots + Markdown comparison table")
    p.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl and optionally eval/)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--smooth", type=int, default=10, help="trailing-mean window over logged training losses")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, handlers=[console_handler("metalm-report")])
    if args.smooth < 1:
        p.error("--smooth must be >= 1")
    try:
        made = make_report(args.runs, args.out, args.smooth)
    except FileNotFoundError as e:
        print(f"metalm-report: {e}", file=sys.stderr)
        return 1
    for k, v in made.items():
        print(f"{k}: {v if v else 'no data'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
