"""benchmarks/reproduce.py on runs that already exist (--skip-train): vanilla and hybrid checkpoints matched by
validation loss, steps, tokens and FLOPs on hand-made records, every evaluator number picked up, and results
evaluated before without one of its metrics evaluated again."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mod():
    spec = importlib.util.spec_from_file_location("metalm_reproduce_eq", REPO / "benchmarks" / "reproduce.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def _run(root: Path, name: str, tokens_per_step: int, flops_per_step: float, vals: dict[int, float]) -> Path:
    """A run whose trainer logged val_loss at steps 100..400 and whose evaluator recorded checkpoints 100..400
    (a made-up downstream score = 10 - val_loss, and a CKA)."""
    d = root / name
    (d / "eval").mkdir(parents=True)
    rows = [{"step": s, "tokens": s * tokens_per_step, "flops": s * flops_per_step, "val_loss": v}
            for s, v in vals.items()]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev = [{"checkpoint": f"step_{s:08d}", "step": s, "tokens": s * tokens_per_step, "downstream/piqa/acc": 10 - v,
           "cka/mean": 0.5, "cka/L0": 0.4} for s, v in vals.items()]
    (d / "eval" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ev))
    return d


def test_skip_train_matches_checkpoints_at_equal_loss_steps_tokens_and_flops(tmp_path, mod):
    runs = tmp_path / "runs"
    _run(runs, "vanilla-s0", 100, 1e9, {100: 6.0, 200: 5.0, 300: 4.5, 400: 4.2})
    # the hybrid: the same tokens per step, 1.5x the FLOPs per step, a slower loss
    _run(runs, "shipped-s0", 100, 1.5e9, {100: 6.5, 200: 5.6, 300: 5.1, 400: 4.6})
    out = tmp_path / "out"
    assert mod.main(["--runs", str(runs), "--seeds", "0", "--skip-train", "--skip-eval", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    m = res["per_seed"]["0"]["matched"]["shipped"]

    def pairs(axis):
        return [(p["hybrid"]["step"], p["vanilla"]["step"]) for p in m[axis]]

    # by hand: 6.5 -> 6.0 (step 100); 5.6 -> 6.0 (0.4 away; 5.0 is 0.6); 5.1 -> 5.0 (200); 4.6 -> 4.5 (300)
    assert pairs("val_loss") == [(100, 100), (200, 100), (300, 200), (400, 300)]
    assert pairs("step") == pairs("tokens") == [(100, 100), (200, 200), (300, 300), (400, 400)]
    # FLOPs: hybrid 1.5e11, 3e11, 4.5e11, 6e11 against vanilla 1e11..4e11 (1.5e11 is a tie: the earlier)
    assert pairs("flops") == [(100, 100), (200, 300), (300, 400), (400, 400)]
    last = m["val_loss"][-1]
    assert last["hybrid"]["downstream/piqa/acc"] == pytest.approx(5.4) and last["vanilla"]["val_loss"] == 4.5
    assert "cka/L0" not in last["hybrid"]  # per-layer numbers stay in the evaluator's records
    md = (out / "results.md").read_text()
    assert ("| seed 0 | shipped (step 400) | vanilla at equal val_loss (step 300) | vanilla at equal step (step 400) "
            "| vanilla at equal tokens (step 400) | vanilla at equal flops (step 400) |") in md
    assert "| downstream/piqa/acc | 5.4 | 5.5 | 5.8 | 5.8 | 5.8 |" in md
    for name in ("dynamics.png", "dynamics_at_equal_loss.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"![{name}]({name})" in md
    with pytest.raises(SystemExit):
        mod.main(["--runs", str(runs), "--seeds", "0,1", "--skip-train", "--skip-eval", "--out", str(out)])


def test_results_without_a_metric_are_evaluated_again(tmp_path, mod):
    ev = tmp_path / "eval"
    ev.mkdir()
    full = {"metrics": {"val_loss": 5.0, "rank/weight/attn_mean_er": 3.0, "entropy/norm_mean": 0.9,
                        "stats/weight/cond": 4.0, "downstream/bpb": 2.0},
            "skipped": {"cka": "the first one evaluated"}, "failed": {}}
    old = {"metrics": {"rank/weight/attn_mean_er": 3.0, "entropy/norm_mean": 0.9}, "skipped": {}, "failed": {}}
    assert mod.lacks_metrics(full) == [] and mod.lacks_metrics(old) == ["val_loss", "stats", "cka", "downstream"]
    (ev / "step_00000100.json").write_text(json.dumps(full))
    (ev / "step_00000200.json").write_text(json.dumps(old))
    (ev / "step_00000300.error.json").write_text(json.dumps({"error": "x"}))
    assert mod.drop_stale_results(ev) == ["step_00000200"]
    assert sorted(p.name for p in ev.iterdir()) == ["step_00000100.json", "step_00000300.error.json"]


def _checkpoints(rd: Path, steps) -> None:
    from metalm.checkpoint import MARKER, step_dir_name

    for s in steps:
        d = rd / "checkpoints" / step_dir_name(s)
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text(json.dumps({"step": s, "tokens": s * 100}))
        (d / MARKER).write_text("ok\n")


def test_downstream_evaluated_and_ner_at_equal_loss(tmp_path, mod, monkeypatch):
    """Without --skip-eval: the watcher asked for downstream with --downstream-limit; NER on each run's final
    checkpoint and on the vanilla checkpoint matched to the hybrid's final one by validation loss (4.6 -> 4.5, step
    300), shown side by side. The evaluator is replaced by a stand-in that records a made-up F1 per checkpoint."""
    runs = tmp_path / "runs"
    van = _run(runs, "vanilla-s0", 100, 1e9, {100: 6.0, 200: 5.0, 300: 4.5, 400: 4.2})
    hyb = _run(runs, "shipped-s0", 100, 1.5e9, {100: 6.5, 200: 5.6, 300: 5.1, 400: 4.6})
    _checkpoints(van, (100, 200, 300, 400))
    _checkpoints(hyb, (100, 200, 300, 400))
    f1 = {("vanilla-s0", 400): 0.5, ("vanilla-s0", 300): 0.4, ("shipped-s0", 400): 0.45}
    calls = []

    def evaluator(cmd, **kw):
        calls.append(cmd)
        if "--checkpoint" in cmd:
            ck = Path(cmd[cmd.index("--checkpoint") + 1])
            res = Path(cmd[cmd.index("--results") + 1])
            step = int(ck.name.split("_")[1])
            full = "eval.ner.mode=full" in cmd
            res.mkdir(parents=True, exist_ok=True)
            with open(res / "eval.jsonl", "a") as f:
                f.write(json.dumps({"checkpoint": ck.name, "step": step,
                                    "ner/f1": f1[(ck.parents[1].name, step)] + 0.1 * full}) + "\n")

    monkeypatch.setattr(mod.subprocess, "run", evaluator)
    out = tmp_path / "out"
    assert mod.main(["--runs", str(runs), "--seeds", "0", "--skip-train", "--out", str(out), "--ner-train", "a.iob2",
                     "--ner-test", "b.iob2", "--downstream-limit", "7"]) == 0
    watch = [c for c in calls if "--watch" in c]
    assert len(watch) == 2 and all("eval.metrics=[val_loss,rank,entropy,stats,cka,downstream]" in c
                                   and "eval.downstream_limit=7" in c for c in watch)
    ner = sorted((Path(c[c.index("--checkpoint") + 1]).relative_to(runs).as_posix(), c[c.index("--results") + 1])
                 for c in calls if "--checkpoint" in c and "eval.ner.mode=head" in c)
    assert ner == [("shipped-s0/checkpoints/step_00000400", str(hyb / "eval-ner-head")),
                   ("vanilla-s0/checkpoints/step_00000300", str(van / "eval-ner-head")),
                   ("vanilla-s0/checkpoints/step_00000400", str(van / "eval-ner-head"))]
    res = json.loads((out / "results.json").read_text())["per_seed"]["0"]
    assert res["ner"]["vanilla"] == {"step": 400, "head": 0.5, "full": pytest.approx(0.6)}
    m = res["ner_equal_loss"]["shipped"]
    assert m["vanilla"] == {"step": 300, "head": 0.4, "full": pytest.approx(0.5)} and m["vanilla_val_loss"] == 4.5
    md = (out / "results.md").read_text()
    assert "| 0 | shipped (step 400, 4.6000) | step 300, 4.5000 | 0.45 / 0.4 | 0.55 / 0.5 |" in md
    assert "| 0 | shipped | 4.2000 | 4.6000 |" in md and "| 0.500 / 0.450 | 0.600 / 0.550 |" in md
    with pytest.raises(SystemExit):
        mod.main(["--runs", str(runs), "--seeds", "0", "--skip-train", "--downstream-limit", "-1"])
