"""NER scores: span-level precision/recall/F1 (seqeval's default, conlleval-compatible mode) and the
fine-tuning-speed summaries of a logged loss curve (t90, area under the curve, initial slope; PAPER.md §3)."""
from __future__ import annotations

import warnings
from collections.abc import Sequence


def span_metrics(gold: list[list[str]], pred: list[list[str]], per_type: bool = True) -> dict:
    """seqeval default-mode (conlleval) micro precision/recall/F1 and, with per_type, per-type scores."""
    from seqeval.metrics import classification_report, f1_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seqeval warns when a set has no predicted/gold entities
        if not per_type:
            return {"f1": float(f1_score(gold, pred, zero_division=0))}
        report = classification_report(gold, pred, output_dict=True, zero_division=0)
    micro = report["micro avg"]
    out = {"f1": float(micro["f1-score"]), "precision": float(micro["precision"]), "recall": float(micro["recall"])}
    out["per_type"] = {
        k: {"f1": float(v["f1-score"]), "precision": float(v["precision"]), "recall": float(v["recall"]),
            "support": int(v["support"])}
        for k, v in report.items() if not k.endswith(" avg")
    }
    return out


def t90(steps: Sequence[int], losses: Sequence[float], frac: float = 0.9) -> int | None:
    """First logged step whose loss <= L0 - frac (L0 - L_final) (L0, L_final: first and last logged losses)."""
    if not steps:
        return None
    target = losses[0] - frac * (losses[0] - losses[-1])
    for s, v in zip(steps, losses):
        if v <= target:
            return int(s)
    return int(steps[-1])  # unreachable: the last point always satisfies v <= target when frac <= 1


def loss_auc(steps: Sequence[int], losses: Sequence[float]) -> float | None:
    """Trapezoid area under the logged loss curve divided by its step span (a mean loss over training)."""
    if not steps:
        return None
    if len(steps) == 1:
        return float(losses[0])
    area = sum((steps[i + 1] - steps[i]) * (losses[i] + losses[i + 1]) / 2 for i in range(len(steps) - 1))
    return float(area / (steps[-1] - steps[0]))


def initial_slope(steps: Sequence[int], losses: Sequence[float], frac: float = 0.1) -> float | None:
    """Least-squares slope of loss vs step over the first `frac` of the step span (at least 2 points)."""
    if len(steps) < 2:
        return None
    limit = steps[0] + frac * (steps[-1] - steps[0])
    n = max(2, sum(1 for s in steps if s <= limit))
    xs, ys = steps[:n], losses[:n]
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return float(sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var) if var > 0 else None
