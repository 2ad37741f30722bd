"""metalm-report: smoothing, the "N x sooner" table against hand-computed numbers, and the PNG plots."""
import json
import math
from pathlib import Path

import pytest

from metalm.eval import report


def write_run(root: Path, name: str, loss_per_step: float, tokens_per_step: int, val=None, meta=False, evals=True):
    d = root / name
    (d / "eval").mkdir(parents=True)
    rows = []
    for s in range(10, 1001, 10):
        rows.append({"step": s, "tokens": s * tokens_per_step, "ar_loss": 10 - s * loss_per_step})
        if meta and s % 20 == 0:
            rows.append({"step": s, "tokens": s * tokens_per_step, "meta_loss": 3 - s / 1000})
        if val and s % 100 == 0:
            rows.append({"step": s, "tokens": s * tokens_per_step, "val_loss": 8 - s * val})
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 1010, "ar_lo'  # torn last line
    (d / "metrics.jsonl").write_text(text)
    if evals:
        ev = []
        for i, s in enumerate(range(0, 1001, 200)):
            r = {"checkpoint": f"step_{s:08d}", "step": s, "tokens": s * tokens_per_step,
                 "rank/weight/attn_mean_er": 20 + i, "entropy/norm_mean": 0.9 - 0.05 * i,
                 "ner/f1": 0.1 + 0.04 * i + loss_per_step}
            for layer in range(4):
                r[f"rank/weight/L{layer}/attn_mean_er"] = 20 + i * (layer + 1) - (i ** 2) * 0.3 * layer
                r[f"rank/act/L{layer}/er"] = 10 + layer + math.sin(i + layer)
                r[f"entropy/L{layer}/norm_mean"] = 0.95 - 0.08 * i * (layer + 1) / 4 + 0.05 * (i > 3)
            ev.append(r)
        (d / "eval" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ev))
    return d


def test_smooth_trailing_mean():
    assert report.smooth([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
    assert report.smooth([4, 2, 6], 5) == [4, 3, 4]
    assert report.smooth([1, 2], 1) == [1, 2]


def test_smoothing_does_not_reach_back_to_the_first_losses(tmp_path):
    """Losses logged at step 1 and every 10 steps (cpu-tiny): with window 10 the point at step 100 used to be the
    mean of steps 10-100 (5.35 here, ~1 nat above the loss around step 100); now of steps 60-100."""
    steps = [1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    losses = [10.8, 8, 7, 6, 5.5, 5, 4.8, 4.6, 4.4, 4.2, 4.0]
    out = report.smooth(losses, 10, steps)
    assert out[0] == 10.8 and out[1] == 8  # step 10: step 1 is not after half of it
    assert out[2] == 7  # step 20: step 10 is half of it, not after it
    assert out[-1] == pytest.approx((4.8 + 4.6 + 4.4 + 4.2 + 4.0) / 5)  # step 100: steps 60-100
    assert out[6] == pytest.approx((5.5 + 5 + 4.8) / 3)  # step 60: steps 40 to 60
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "tokens": s, "ar_loss": v}) + "\n"
                                             for s, v in zip(steps, losses)))
    _, smoothed = report.load_run(d).loss("ar_loss", 10)
    assert smoothed == out


def test_speedup_hand_computed(tmp_path):
    a = report.load_run(write_run(tmp_path, "A", 1 / 200, 100))  # ar_loss 10 - s/200: 5.0 at step 1000
    b = report.load_run(write_run(tmp_path, "B", 1 / 100, 50, meta=True))  # 10 - s/100: reaches 5.0 at step 500
    rows = {(r["a"], r["b"]): r for r in report.speedups([a, b], window=1)}
    ab = rows[("A", "B")]
    assert ab["key"] == "ar_loss" and ab["target"] == pytest.approx(5.0)
    assert (ab["b_step"], ab["b_tokens"]) == (500, 25_000)
    assert ab["x_steps"] == pytest.approx(2.0) and ab["x_tokens"] == pytest.approx(100_000 / 25_000)
    assert "never reaches" in rows[("B", "A")]["note"]
    # window 3: trailing means lag one logged step: A ends at 10 - 990/200 = 5.05; B first <= 5.05 at step 510
    ab3 = {(r["a"], r["b"]): r for r in report.speedups([a, b], window=3)}[("A", "B")]
    assert ab3["target"] == pytest.approx(5.05) and ab3["b_step"] == 510
    assert ab3["x_steps"] == pytest.approx(1000 / 510)


def test_val_loss_preferred_when_both_runs_have_it(tmp_path):
    a = report.load_run(write_run(tmp_path, "A", 1 / 200, 100, val=1 / 500))  # val 8 - s/500: 6.0 at 1000
    b = report.load_run(write_run(tmp_path, "B", 1 / 100, 100, val=1 / 250))  # val 8 - s/250: 6.0 at 500
    ab = {(r["a"], r["b"]): r for r in report.speedups([a, b], window=10)}[("A", "B")]
    assert ab["key"] == "val_loss" and ab["target"] == pytest.approx(6.0)  # val_loss is not smoothed
    assert ab["b_step"] == 500 and ab["x_steps"] == pytest.approx(2.0)


def test_report_writes_pngs_and_markdown(tmp_path):
    write_run(tmp_path, "maml", 1 / 100, 50, val=1 / 250, meta=True)
    write_run(tmp_path, "vanilla", 1 / 200, 100, val=1 / 500)
    out = tmp_path / "out"
    assert report.main([str(tmp_path / "vanilla"), str(tmp_path / "maml"), "--out", str(out), "--smooth", "1"]) == 0
    for name in ("loss.png", "rank.png", "entropy.png", "ner.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    md = (out / "report.md").read_text()
    assert "| vanilla | maml | val_loss | 6.0000 | 1,000 / 100,000 | 500 / 25,000 | 2.00× | 4.00× |" in md
    assert ("run maml reaches run vanilla's final val_loss (6.0000) 2.00× sooner in steps and 4.00× sooner in tokens"
            in md)
    assert "![loss](loss.png)" in md


def test_missing_run_dir_is_an_error(tmp_path):
    assert report.main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1


def _hand_run(root: Path, name: str, vals: list[float], evaluator_val: bool = False) -> Path:
    """Checkpoints at steps 100, 200, 300 with the given validation losses (the trainer's, or the evaluator's),
    each with a few evaluator numbers; training logs flops = step x 1e9 and grad norms per layer."""
    d = root / name
    (d / "eval").mkdir(parents=True)
    metrics, evals = [], []
    for i, (s, v) in enumerate(zip((100, 200, 300), vals)):
        metrics.append({"step": s, "tokens": s * 10, "flops": s * 1e9, "ar_loss": v + 0.1})
        metrics.append({"step": s, "grad_norm/L0": 1.0 / (i + 1), "grad_norm/L1": 2.0 / (i + 1),
                        "grad_norm/total": 3.0})
        if not evaluator_val:
            metrics.append({"step": s, "tokens": s * 10, "flops": s * 1e9, "val_loss": v})
        e = {"checkpoint": f"step_{s:08d}", "step": s, "tokens": s * 10, "seconds": 1.5, "cka/prev_step": s - 100,
             "cka/mean": 0.9 + 0.01 * i, "cka/L0": 0.8, "cka/L1": 0.95, "stats/weight/hoyer": 0.1 * (i + 1),
             "stats/weight/L0/cond": 10.0 + i, "stats/weight/L1/cond": 20.0 + i, "stats/weight/L0/hoyer": 0.1,
             "stats/weight/L1/hoyer": 0.2, "stats/act/L0/gini": 0.3, "stats/act/L1/gini": 0.4,
             "downstream/arc_easy/acc": 0.25 + 0.05 * i, "entropy/L0/H1/norm": 0.5}
        if evaluator_val:
            e["val_loss"] = v
        evals.append(e)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    (d / "eval" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    return d


def test_checkpoints_matched_at_equal_loss_by_hand(tmp_path):
    a = report.load_run(_hand_run(tmp_path, "vanilla", [5.0, 4.0, 3.5]))
    b = report.load_run(_hand_run(tmp_path, "hybrid", [4.6, 3.6, 3.0], evaluator_val=True))
    ra, rb = report.checkpoint_rows(a), report.checkpoint_rows(b)
    assert [r["val_loss"] for r in ra] == [5.0, 4.0, 3.5] and ra[1]["flops"] == 2e11
    assert report.headline_keys(ra) == ["cka/mean", "downstream/arc_easy/acc", "stats/weight/hoyer", "val_loss"]
    # 4.6 is nearer 5.0 than 4.0; 3.6 nearer 3.5; 3.0 nearer 3.5 than anything else
    assert [(x["step"], y["step"]) for x, y in report.match_at(ra, rb, "val_loss")] == [(100, 100), (300, 200),
                                                                                          (300, 300)]
    assert [(x["step"], y["step"]) for x, y in report.match_at(ra, rb, "flops")] == [(100, 100), (200, 200),
                                                                                       (300, 300)]
    assert report.nearest(ra, "val_loss", 4.5)["step"] == 100  # a tie: the earlier checkpoint
    assert report.nearest(ra, "nothing", 1.0) is None
    md = "\n".join(report.equal_loss_markdown([a, b]))
    assert "| hybrid vs vanilla | hybrid step 300 | vanilla at equal loss: step 300 | vanilla at equal step: step " \
           "300 |" in md
    assert "| downstream/arc_easy/acc | 0.3500 | 0.3500 | 0.3500 |" in md
    a3 = report.load_run(_hand_run(tmp_path / "3", "vanilla", [5.0, 3.1, 2.0]))
    md = "\n".join(report.equal_loss_markdown([a3, b]))  # hybrid's final 3.0 is nearest vanilla's 3.1, at step 200
    assert "| hybrid vs vanilla | hybrid step 300 | vanilla at equal loss: step 200 | vanilla at equal step: step " \
           "300 |" in md and "| val_loss | 3.0000 | 3.1000 | 2.0000 |" in md
    out = tmp_path / "out"
    made = report.make_report([a.path, b.path], out, window=1)
    for key in ("per-layer dynamics", "at equal validation loss"):
        assert made[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", key
    assert "## At equal validation loss" in (out / "report.md").read_text()
def test_downstream_plot_and_table_show_the_last_checkpoint(tmp_path):
    base = write_run(tmp_path, "base", 1 / 100, 50, evals=False)  # no downstream numbers: no row, no panel line
    down = write_run(tmp_path, "down", 1 / 100, 50, evals=False)
    ev = [{"step": s, "tokens": s * 50, "downstream/bpb": 3.0 - s / 1000,
           "downstream/piqa/acc": 0.5 + s / 10000, "downstream/piqa/acc_per_char": 0.52, "downstream/piqa/bpb": 2.5,
           "downstream/sciq/acc": 0.3, "downstream/sciq/acc_per_char": 0.31 + s / 10000,
           "downstream/sciq/bpb": 3.5 - s / 500} for s in (100, 200)]
    ev.append({"step": 300, "tokens": 15000, "val_loss": 4.0})  # a later result without downstream numbers
    (down / "eval" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ev))
    out = tmp_path / "out"
    assert report.main([str(base), str(down), "--out", str(out)]) == 0
    assert (out / "downstream.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "| down | 200 | piqa | 0.520 | 0.520 | 2.5000 |" in md
    assert "| down | 200 | sciq | 0.300 | 0.330 | 3.1000 |" in md
    assert "| down | 200 | mean | | | 2.8000 |" in md and "| base | " not in md.split("## Downstream")[1]
    assert "![downstream](downstream.png)" in md
    assert report.main([str(base), "--out", str(tmp_path / "none")]) == 0
    assert "## Downstream" not in (tmp_path / "none" / "report.md").read_text()
