"""The pieces of the meta benchmarks that compute numbers (benchmarks/fewshot.py, benchmarks/tradeoff.py), against
hand-computed values: confidence intervals, the linear-probe reader, interpolation at equal FLOPs, the run list."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import fewshot
import tradeoff


def test_ci95_is_the_normal_interval_of_the_mean():
    mean, half = fewshot.ci95([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert half == pytest.approx(1.96 * math.sqrt(5 / 3) / 2)  # sample sd sqrt(5/3), n = 4


def test_probe_reader_separates_separable_classes_and_not_identical_ones():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=gen, dtype=torch.float64) * 5
    y_s, y_q = torch.arange(4).repeat(3), torch.arange(4).repeat(2)
    h_s = centers[y_s] + 0.1 * torch.randn(12, 8, generator=gen, dtype=torch.float64)
    h_q = centers[y_q] + 0.1 * torch.randn(8, 8, generator=gen, dtype=torch.float64)
    assert fewshot.probe_reader(h_s, y_s, h_q, y_q, 4) == 1.0
    same = torch.ones(12, 8, dtype=torch.float64)
    # identical features: one class wins every query, so exactly 1/N of the balanced queries are right
    assert fewshot.probe_reader(same, y_s, torch.ones(8, 8, dtype=torch.float64), y_q, 4) == pytest.approx(0.25)


def test_parse_shapes():
    assert fewshot.parse_shapes("5x1,16X2") == [(5, 1), (16, 2)]


def test_at_flops_interpolates_vanilla_curve():
    curve = [{"flops": 10.0, "val_loss": 8.0}, {"flops": 20.0, "val_loss": 6.0}, {"flops": 40.0, "val_loss": 5.0}]
    assert tradeoff.at_flops(curve, 15.0) == pytest.approx(7.0)
    assert tradeoff.at_flops(curve, 30.0) == pytest.approx(5.5)
    assert tradeoff.at_flops(curve, 50.0) is None  # past vanilla's end: no value made up


def test_variant_list_keeps_its_order_and_refuses_unknown_names():
    assert tradeoff.parse_variants("vanilla:1,budget-0.1:1,vanilla:2") == [("vanilla", 1), ("budget-0.1", 1),
                                                                          ("vanilla", 2)]
    with pytest.raises(SystemExit, match="unknown variant 'nope'"):
        tradeoff.parse_variants("nope:0")


def test_fewshot_gains_of_seeds_combine_as_independent_estimates():
    merged = tradeoff.merge_gains([{"reader": "inner 5x1", "diff": 0.1, "ci95": 0.3},
                                   {"reader": "inner 5x1", "diff": 0.3, "ci95": 0.4}])
    mean, half = merged["inner 5x1"]
    assert mean == pytest.approx(0.2) and half == pytest.approx(0.25)  # sqrt(0.09 + 0.16) / 2


def test_stored_rows_are_kept_only_where_no_fresh_run_replaces_them_and_only_for_the_same_map():
    stored = {"steps": 300, "config": "configs/cpu-tiny.yaml",
              "runs": [{"variant": "vanilla", "seed": 0, "final_val": 6.6},
                       {"variant": "b", "seed": 0, "final_val": 7.0}, {"variant": "b", "seed": 1, "final_val": 7.1}]}
    fresh = [{"variant": "b", "seed": 1, "final_val": 7.2}, {"variant": "b", "seed": 2, "final_val": 7.3}]
    merged = tradeoff.merge_stored(stored, fresh, 300, "configs/cpu-tiny.yaml")
    assert [(r["variant"], r["seed"], r["final_val"], r.get("stored", False)) for r in merged] == [
        ("b", 1, 7.2, False), ("b", 2, 7.3, False), ("vanilla", 0, 6.6, True), ("b", 0, 7.0, True)]
    assert tradeoff.merge_stored(stored, fresh, 1500, "configs/cpu-tiny.yaml") == fresh  # another horizon
    assert tradeoff.merge_stored(stored, fresh, 300, "configs/11m.yaml") == fresh  # another config
    assert tradeoff.merge_stored(None, fresh, 300, "configs/cpu-tiny.yaml") == fresh
