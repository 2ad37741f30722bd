"""The learning-rate schedules, against multipliers computed by hand."""
import math

import pytest

from metalm.config import ConfigError, OptimConfig, load_config
from metalm.train.lr_schedule import lr_lambda, wsd_decay_start


def wsd(warmup=10, fraction=0.2, low=0.1, max_steps=110):
    return lr_lambda(OptimConfig(schedule="wsd", warmup_steps=warmup, decay_fraction=fraction, min_lr_ratio=low),
                     max_steps)


def test_wsd_warmup_stable_decay_by_hand():
    # 10 warm-up steps, 100 after them, the last 20% of those (20 steps, 90..110) decay linearly 1.0 -> 0.1
    f = wsd()
    expected = {
        0: 0.1, 4: 0.5, 9: 1.0,  # warm-up: (step + 1) / 10
        10: 1.0, 50: 1.0, 89: 1.0,  # stable
        90: 1.0,  # the decay starts here: progress 0
        95: 1.0 - 0.9 * 5 / 20,  # 0.775
        100: 0.1 + 0.9 * 0.5,  # the middle of the decay: 0.55
        109: 0.1 + 0.9 * 1 / 20,  # the last step trained: 0.145
        110: 0.1, 500: 0.1,  # the end, and past it
    }
    got = {s: f(s) for s in expected}
    assert got == pytest.approx(expected, abs=1e-12)
    assert wsd_decay_start(OptimConfig(warmup_steps=10, decay_fraction=0.2), 110) == 90


def test_wsd_edge_fractions():
    f = wsd(fraction=0.0)  # no decay: stable to the end
    assert f(10) == f(109) == 1.0 and f(110) == pytest.approx(0.1)
    f = wsd(fraction=1.0, low=0.0)  # all of it decays: the linear schedule
    lin = lr_lambda(OptimConfig(schedule="linear", warmup_steps=10, min_lr_ratio=0.0), 110)
    assert [f(s) for s in range(0, 111, 7)] == pytest.approx([lin(s) for s in range(0, 111, 7)])
    f = wsd(warmup=0, fraction=0.25, low=0.5, max_steps=40)  # no warm-up: stable 0..29, decay 30..40
    assert f(0) == 1.0 and f(29) == 1.0 and f(30) == 1.0 and f(35) == pytest.approx(0.75) and f(40) == 0.5


def test_cosine_and_linear_unchanged():
    o = OptimConfig(schedule="cosine", warmup_steps=2, min_lr_ratio=0.0)
    f = lr_lambda(o, 12)
    assert f(0) == 0.5 and f(2) == 1.0 and f(7) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5))) and f(12) == 0.0
    g = lr_lambda(OptimConfig(schedule="linear", warmup_steps=0, min_lr_ratio=0.2), 10)
    assert g(5) == pytest.approx(0.6) and g(10) == pytest.approx(0.2)


def test_wsd_is_a_config_value_with_a_validated_fraction():
    cfg = load_config(None, ["optim.schedule=wsd", "optim.decay_fraction=0.3"])
    assert cfg.optim.schedule == "wsd" and cfg.optim.decay_fraction == 0.3
    assert load_config(None, []).optim.decay_fraction == 0.1
    with pytest.raises(ConfigError, match=r"optim\.decay_fraction=1\.5"):
        load_config(None, ["optim.schedule=wsd", "optim.decay_fraction=1.5"])
    with pytest.raises(ConfigError, match="optim.schedule"):
        load_config(None, ["optim.schedule=warmup-stable-decay"])
