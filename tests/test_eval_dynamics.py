"""The evaluator's dynamics metrics: matrix statistics (condition number, Frobenius and nuclear norms, Gini and
Hoyer sparsity) and linear CKA between consecutive checkpoints, each against a closed form or a hand value, and
CKA's saved activations giving the same numbers when the evaluator runs again."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from eval_cases import TINY, make_ckpt
from metalm.config import load_config
from metalm.eval import cka, matrix_stats
from metalm.model import build_model


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q


def test_hoyer_closed_forms():
    assert matrix_stats.hoyer(torch.tensor([0.0, 0.0, 5.0, 0.0])) == pytest.approx(1.0)
    assert matrix_stats.hoyer(torch.full((3, 7), -2.5)) == pytest.approx(0.0, abs=1e-12)
    # (sqrt(2) - |3|+|4| / 5) / (sqrt(2) - 1), by hand
    assert matrix_stats.hoyer(torch.tensor([3.0, -4.0])) == pytest.approx((math.sqrt(2) - 1.4) / (math.sqrt(2) - 1))
    assert matrix_stats.hoyer(torch.zeros(5)) == 0.0


def test_gini_closed_forms_and_mean_difference_reference():
    assert matrix_stats.gini(torch.full((4, 4), 3.0)) == pytest.approx(0.0, abs=1e-12)
    assert matrix_stats.gini(torch.tensor([0.0, 0.0, 0.0, 7.0])) == pytest.approx(0.75)  # one-hot: 1 - 1/N
    assert matrix_stats.gini(torch.tensor([4.0, -1.0, 3.0, 2.0])) == pytest.approx(0.25)  # by hand, signs ignored
    # the classic definition: mean absolute difference over all pairs / (2 x mean)
    x = np.abs(np.random.default_rng(0).standard_normal(37))
    ref = np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean())
    assert matrix_stats.gini(torch.from_numpy(x).reshape(1, -1)) == pytest.approx(ref, rel=1e-10)
    assert matrix_stats.gini(torch.zeros(3)) == 0.0
    with pytest.raises(ValueError, match="non-finite"):
        matrix_stats.gini(torch.tensor([1.0, math.nan]))


def test_condition_number_and_norms_of_a_known_spectrum():
    m = _orthogonal(4, 1)[:, :3] @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ _orthogonal(3, 2)
    s = matrix_stats.matrix_stats(m)
    assert s["cond"] == pytest.approx(3.0) and s["nuc"] == pytest.approx(6.0)
    assert s["fro"] == pytest.approx(math.sqrt(14.0))
    assert math.isinf(matrix_stats.matrix_stats(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))["cond"])
    assert math.isnan(matrix_stats.matrix_stats(torch.zeros(2, 3))["cond"])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(load_config(None, TINY).model).eval()


def test_weight_and_activation_stats_per_layer_match_numpy(model):
    w = matrix_stats.weight_stats(model)
    q = model.model.layers[1].self_attn.q_proj.weight.detach().double().numpy()
    got = w["layers"][1]["q_proj"]
    assert got["cond"] == pytest.approx(np.linalg.cond(q), rel=1e-8)
    assert got["nuc"] == pytest.approx(np.linalg.norm(q, "nuc"), rel=1e-10)
    assert got["fro"] == pytest.approx(np.linalg.norm(q, "fro"), rel=1e-10)
    assert w["layers"][1]["mean"]["hoyer"] == pytest.approx(np.mean([w["layers"][1][k]["hoyer"] for k in
                                                                      matrix_stats.KINDS]))
    flat = matrix_stats.flatten("stats/weight", w)
    assert flat["stats/weight/L1/q_proj/cond"] == got["cond"] and "stats/weight/L0/gini" in flat
    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(3))
    outs = []
    hooks = [b.register_forward_hook(lambda mod, args, out: outs.append(out)) for b in model.model.layers]
    try:
        a = matrix_stats.activation_stats(model, ids)
    finally:
        for h in hooks:
            h.remove()
    h1 = outs[1].reshape(-1, outs[1].shape[-1]).double().numpy()
    assert a["layers"][1]["cond"] == pytest.approx(np.linalg.cond(h1), rel=1e-6)
    assert a["layers"][1]["nuc"] == pytest.approx(np.linalg.norm(h1, "nuc"), rel=1e-6)


def _hsic_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Reference: CKA through Gram matrices and the centring matrix H, HSIC(K, L) = tr(KHLH)."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, lm = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h)

    return hsic(k, lm) / math.sqrt(hsic(k, k) * hsic(lm, lm))


def test_linear_cka_invariances_and_hand_value():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(20, 6, generator=g, dtype=torch.float64)
    assert cka.linear_cka(x, x @ _orthogonal(6, 7)) == pytest.approx(1.0)
    assert cka.linear_cka(x, 2.5 * x + 3.0) == pytest.approx(1.0)  # isotropic scaling, and a shift (centring)
    # by hand: centred x = (1, 0, -1), y = (1, -1, 0): (yᵀx)² / (xᵀx · yᵀy) = 1 / 4
    assert cka.linear_cka(torch.tensor([[2.0], [1.0], [0.0]]), torch.tensor([[1.0], [-1.0], [0.0]])) == \
        pytest.approx(0.25)
    y = torch.randn(20, 4, generator=g, dtype=torch.float64)
    assert cka.linear_cka(x, y) == pytest.approx(_hsic_cka(x.numpy(), y.numpy()), rel=1e-10)
    with pytest.raises(ValueError, match="same rows"):
        cka.linear_cka(x, y[:5])


def test_metric_names_and_cka_tokens_are_validated():
    from metalm.config import ConfigError

    assert load_config(None, ["eval.metrics=[stats,cka]"]).eval.metrics == ["stats", "cka"]
    with pytest.raises(ConfigError, match=r"eval.cka_tokens=0: expected a positive integer"):
        load_config(None, ["eval.cka_tokens=0"])


def test_row_subset_spreads_evenly():
    assert cka.row_subset(10, 4).tolist() == [0, 2, 5, 7]
    assert cka.row_subset(3, 8).tolist() == [0, 1, 2]


def _reference_cka(run, step, prev, n_rows, rows=48) -> list[float]:
    """CKA per layer recomputed from the two checkpoints' weights: block outputs through forward hooks on the
    probe batch, the rows i·48 // n, and the HSIC form."""
    from safetensors.torch import load_file

    from metalm.eval.ner import load_tokenizer_for, word_encoder
    from metalm.eval.valloss import probe_batch_from_text

    ckpt = run / "checkpoints" / f"step_{step:08d}"
    cfg = load_config(ckpt / "config.yaml")
    enc = word_encoder(load_tokenizer_for(ckpt, cfg))
    probe = probe_batch_from_text(cfg.eval.probe_text, lambda t: enc(t, 0), 2, 24)[:, :-1]
    sel = [i * rows // n_rows for i in range(n_rows)]
    acts = []
    for s in (step, prev):
        m = build_model(cfg.model)
        m.load_state_dict(load_file(str(run / "checkpoints" / f"step_{s:08d}" / "model.safetensors")))
        outs: list[torch.Tensor] = []
        hooks = [b.register_forward_hook(lambda mod, args, out, outs=outs: outs.append(out)) for b in m.model.layers]
        with torch.no_grad():
            m.eval()(probe)
        for h in hooks:
            h.remove()
        acts.append([o.reshape(-1, o.shape[-1])[sel].double().numpy() for o in outs])
    return [_hsic_cka(a, b) for a, b in zip(*acts)]


def test_cka_between_consecutive_checkpoints_is_the_same_on_a_rerun(tmp_path, assets):
    from metalm.eval import watcher as W

    run = tmp_path / "run"
    for s in (10, 20):
        make_ckpt(run, s, assets)
    over = ["eval.metrics=[stats,cka]", "eval.cka_tokens=20"]
    W.Watcher(str(run), overrides=over, wandb=False, device="cpu").run(once=True)
    make_ckpt(run, 30, assets)  # arrives later: evaluated in a second pass, by another watcher
    W.Watcher(str(run), overrides=over, wandb=False, device="cpu").run(once=True)
    ev = run / "eval"

    def rec(step, where=ev):
        return json.loads((where / f"step_{step:08d}.json").read_text())

    first, second, third = rec(10), rec(20), rec(30)
    assert "cka" in first["skipped"] and "first one evaluated" in first["skipped"]["cka"]
    assert first["metrics"]["stats/weight/L0/q_proj/cond"] > 1 and "stats/act/L1/hoyer" in first["metrics"]
    assert second["metrics"]["cka/prev_step"] == 10 and third["metrics"]["cka/prev_step"] == 20
    for r, (step, prev) in ((second, (20, 10)), (third, (30, 20))):
        ref = _reference_cka(run, step, prev, 20)
        assert [r["metrics"][f"cka/L{i}"] for i in range(2)] == pytest.approx(ref, rel=1e-5)
        assert r["metrics"]["cka/mean"] == pytest.approx(np.mean(ref), rel=1e-5)
    # evaluated again (a crash before the result, or --force): the same numbers
    for s in (20, 30):
        (ev / f"step_{s:08d}.json").unlink()
    W.Watcher(str(run), overrides=over, wandb=False, device="cpu").run(once=True)
    for old, s in ((second, 20), (third, 30)):
        assert {k: v for k, v in rec(s)["metrics"].items() if k.startswith("cka/")} == \
            {k: v for k, v in old["metrics"].items() if k.startswith("cka/")}
    # pruned by hand to the newest two files (docs/evaluation.md): the newest's re-run is the same, the older one's
    # skips cka saying why
    cka.activation_path(ev, 10).unlink()
    for s in (20, 30):
        (ev / f"step_{s:08d}.json").unlink()
    W.Watcher(str(run), overrides=["eval.metrics=[cka]", "eval.cka_tokens=20"], wandb=False,
              device="cpu").run(once=True)
    assert rec(30)["metrics"]["cka/mean"] == third["metrics"]["cka/mean"]
    assert "the earlier files were deleted" in rec(20)["skipped"]["cka"]
    # eval.cka_tokens chooses the rows compared: all 48 here, another number
    other = tmp_path / "all-rows"
    W.Watcher(str(run), results=str(other), overrides=["eval.metrics=[cka]", "eval.cka_tokens=100"], wandb=False,
              device="cpu").run(once=True)
    assert cka.load_activations(cka.activation_path(other, 20))[0][0].shape == (48, 32)
    assert rec(20, other)["metrics"]["cka/L1"] == pytest.approx(_reference_cka(run, 20, 10, 48)[1], rel=1e-5)
    assert rec(20, other)["metrics"]["cka/L1"] != pytest.approx(second["metrics"]["cka/L1"], rel=1e-3)
    # a previous checkpoint's activations on another probe batch are not compared
    shutil.rmtree(other)
    W.Watcher(str(run), results=str(other), overrides=["eval.metrics=[cka]", "eval.seq_len=16"], wandb=False,
              device="cpu").run(once=True)
    (other / "step_00000030.json").unlink()
    W.Watcher(str(run), results=str(other), overrides=["eval.metrics=[cka]"], wandb=False, device="cpu").run(once=True)
    assert "another probe batch" in rec(30, other)["skipped"]["cka"]


def test_scheduled_pull_fetches_the_newest_activations_only(tmp_path):
    """The eval_sync program of the scheduled launchers (a fresh machine per pass): the result files and the
    last evaluated checkpoint's activations, which CKA compares the next checkpoint with."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[1]
    docs = list(yaml.safe_load_all((repo / "launchers" / "k8s" / "evaluate-cronjob.yaml").read_text()))
    program = tmp_path / "eval_sync.py"
    program.write_text(next(d for d in docs if d and d["kind"] == "ConfigMap")["data"]["eval_sync.py"])
    bucket = tmp_path / "bucket"
    (bucket / "activations").mkdir(parents=True)
    for s in (100, 200, 300):
        (bucket / f"step_{s:08d}.json").write_text("{}")
    for s in (100, 200):
        (bucket / "activations" / f"step_{s:08d}.safetensors").write_bytes(b"x" * s)
    local = tmp_path / "local"
    proc = subprocess.run([sys.executable, str(program), "pull", str(local), f"local://{bucket}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert got == ["activations/step_00000200.safetensors", "step_00000100.json", "step_00000200.json",
                   "step_00000300.json"]
