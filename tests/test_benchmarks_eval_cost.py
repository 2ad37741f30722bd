"""benchmarks/eval_cost.py's FLOP counts, which its 570M estimate rests on, against the model's own layers."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from metalm.config import EVAL_METRICS, load_config
from metalm.model import build_model

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("metalm_eval_cost", REPO / "benchmarks" / "eval_cost.py")
cost = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cost)


@pytest.mark.parametrize("preset", ["cpu-tiny", "11m"])
def test_forward_flops_and_weight_shapes_match_the_models_linear_layers(preset):
    cfg = load_config(REPO / "configs" / f"{preset}.yaml")
    with torch.device("meta"):
        model = build_model(cfg.model)
    linears = [m.weight.shape for m in model.modules() if isinstance(m, torch.nn.Linear)]
    # every Linear is one matmul of 2 * in * out FLOPs per token; attention adds 2 * layers * ctx * d_model
    per_token = sum(2 * out * inp for out, inp in linears)
    assert cost.forward_flops_per_token(cfg.model, 100) == per_token + 2 * cfg.model.n_layers * 100 * cfg.model.d_model
    blocks = [tuple(s) for s in linears if tuple(s) != (cfg.model.vocab_size, cfg.model.d_model)]
    assert sorted(cost.weight_shapes(cfg.model)) == sorted(blocks)


def test_the_metrics_of_this_round_have_a_flop_model():
    """(A metric added to the registry later is timed on CPU at once; its 570M line says it has no FLOP model.)"""
    cfg = load_config(REPO / "configs" / "570m.yaml")
    counts = {"ner_tokens": 1000, "downstream_tokens": 1000, "downstream_ctx": 100}
    assert {"val_loss", "rank", "entropy", "ner", "downstream", "stats", "cka"} <= set(EVAL_METRICS)
    for metric in ("val_loss", "rank", "entropy", "ner", "downstream", "stats", "cka"):
        fl = cost.metric_flops(metric, cfg, counts)
        assert fl and fl["matmul"] > 0, metric
    assert cost.svd_flops(3, 5) == cost.svd_flops(5, 3) == 4 * 5 * 3 * 3


def test_stats_and_cka_flops_by_hand_at_cpu_tiny():
    """cpu-tiny (d 48, 4 layers, kv width 24, ffn 192, max_seq_len 128; probe 8 x 128 = 1024 tokens). The blocks
    per token: 2 * 4 * (48 * (96 + 48) + 3 * 48 * 192) + attention 2 * 4 * 128 * 48 = 325,632 FLOPs."""
    cfg = load_config(REPO / "configs" / "cpu-tiny.yaml")
    body = 1024 * 325_632
    # singular values, 4 m n^2 per matrix: q, o 4*48*48^2; k, v 4*48*24^2; gate, up, down 4*192*48^2, per layer;
    # each layer's 1024 x 48 activations 4*1024*48^2
    weights = 4 * (2 * 442_368 + 2 * 110_592 + 3 * 1_769_472)
    assert cost.metric_flops("stats", cfg, {}) == {"matmul": body, "svd": weights + 4 * 9_437_184}
    # cka: X^T X, Y^T Y, Y^T X of 1024 x 48 rows per layer, 2 * 1024 * 48^2 each
    assert cost.metric_flops("cka", cfg, {}) == {"matmul": body + 4 * 3 * 4_718_592, "svd": 0.0}


def test_cka_gram_flops_are_what_linear_cka_multiplies():
    """The cka count's per-layer term against torch's own FLOP counter over metalm.eval.cka.linear_cka."""
    from torch.utils.flop_counter import FlopCounterMode

    from metalm.eval.cka import linear_cka

    cfg = load_config(REPO / "configs" / "cpu-tiny.yaml", ["eval.cka_tokens=300"])
    m = cfg.model
    x, y = torch.randn(300, m.d_model), torch.randn(300, m.d_model)
    with FlopCounterMode(display=False) as counter:
        linear_cka(x, y)
    body = 1024 * cost.forward_flops_per_token(m, 128, head=False)
    assert cost.metric_flops("cka", cfg, {})["matmul"] - body == m.n_layers * counter.get_total_flops()


def test_reestimate_recomputes_the_570m_seconds_from_the_recorded_flops(tmp_path):
    """A file recorded at other assumptions (150 TFLOP/s matmuls, 2 GB/s loads) is re-estimated from its FLOP counts
    at the file's current ones, by hand: seconds = matmul TFLOP / MATMUL_TFLOPS + svd TFLOP / SVD_TFLOPS."""
    recorded = {"presets": {"11m": {"metrics": {"rank": {"seconds": 2.7}}}}, "estimate_570m_gpu": {
        "assumptions": {"matmul_tflops": 150.0, "svd_tflops": 1.0, "load_gb_per_s": 2.0, "token_counts": {"x": 1}},
        "load_seconds": 1.2, "default_set_seconds": 0.0,
        "metrics": {"val_loss": {"matmul_tflop": 300.0, "svd_tflop": 0.0, "seconds": 2.0},
                    "rank": {"matmul_tflop": 8.0, "svd_tflop": 5.0, "seconds": 5.05},
                    "entropy": {"matmul_tflop": 2.0, "svd_tflop": 0.0, "seconds": 0.01},
                    "downstream": {"matmul_tflop": 400.0, "svd_tflop": 0.0, "seconds": 2.67},
                    "later": {"note": "no FLOP model"}}}}
    path, out = tmp_path / "old.json", tmp_path / "new.json"
    path.write_text(json.dumps(recorded))
    assert cost.main(["--reestimate", str(path), "--out", str(out)]) == 0
    new = json.loads(out.read_text())
    assert new["presets"] == recorded["presets"]  # the CPU timings are not touched
    est = new["estimate_570m_gpu"]
    mm, svd = cost.MATMUL_TFLOPS, cost.SVD_TFLOPS
    assert est["assumptions"]["matmul_tflops"] == mm and est["assumptions"]["token_counts"] == {"x": 1}
    assert est["metrics"]["val_loss"]["seconds"] == pytest.approx(300 / mm, abs=0.005)
    assert est["metrics"]["rank"]["seconds"] == pytest.approx(8 / mm + 5 / svd, abs=0.005)
    assert est["metrics"]["later"] == {"note": "no FLOP model"}
    load = 1.2 * 2.0 / cost.LOAD_GBPS  # the same bytes at the assumed read speed
    assert est["load_seconds"] == pytest.approx(load, abs=0.05)
    # configs/570m.yaml's default eval.metrics: val_loss, rank, entropy
    assert est["default_set_seconds"] == pytest.approx(load + 300 / mm + 8 / mm + 5 / svd + 2 / mm, abs=0.1)
