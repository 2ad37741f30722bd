"""benchmarks/eval_cost.py's FLOP counts, which its 570M estimate rests on, against the model's own layers."""
import importlib.util
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
    assert {"val_loss", "rank", "entropy", "ner", "downstream"} <= set(EVAL_METRICS)
    for metric in ("val_loss", "rank", "entropy", "ner", "downstream"):
        fl = cost.metric_flops(metric, cfg, counts)
        assert fl and fl["matmul"] > 0, metric
    assert cost.svd_flops(3, 5) == cost.svd_flops(5, 3) == 4 * 5 * 3 * 3
