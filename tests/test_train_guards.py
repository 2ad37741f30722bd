"""The run-time guards (metalm.train.guards): non-finite losses, loss spikes, the per-step verdict, stop signals."""
from __future__ import annotations

import json
import signal

import pytest

from metalm.config import load_config
from metalm.train import guards
from metalm.train.guards import DeadLossDetector, NonFiniteGuard, SpikeDetector, StepGuards, TrainingError

def test_nonfinite_guard_skips_resets_and_stops():
    g = NonFiniteGuard("skip", max_in_row=3, max_in_window=10, window=100)
    assert [g.check(s, b, 2) for s, b in ((1, 0), (2, 1), (3, 2), (4, 0), (5, 1), (6, 1))] == \
        [False, True, True, False, True, True]
    with pytest.raises(TrainingError, match=r"3 steps in a row \(steps 5\.\.7"):
        g.check(7, 1, 2)
    with pytest.raises(TrainingError, match="non-finite loss at step 9 on 1 of 2 rank"):
        NonFiniteGuard("stop", 3, 10, 100).check(9, 1, 2)
    h = NonFiniteGuard("skip", 3, 10, 100)
    h.load_state_dict(json.loads(json.dumps(NonFiniteGuard("skip", 3, 10, 100).state_dict() | {"in_row": 2})))
    with pytest.raises(TrainingError):
        h.check(10, 1, 1)  # the count in a row survives a resume


def test_nonfinite_steps_between_finite_ones_stop_the_run_within_the_window():
    """Every other step non-finite (dead meta steps between finite AR ones) never makes 2 in a row; the 4th
    within 10 steps stops the run. Steps that left the window no longer count."""
    g = NonFiniteGuard("skip", max_in_row=2, max_in_window=4, window=10)
    assert [g.check(s, s % 2, 1) for s in range(1, 7)] == [True, False, True, False, True, False]
    with pytest.raises(TrainingError, match=r"at 4 of the last 10 steps \(steps 1, 3, 5, 7;"):
        g.check(7, 1, 1)
    h = NonFiniteGuard("skip", max_in_row=2, max_in_window=4, window=10)
    bad = {1, 4, 8, 11}
    assert [h.check(s, int(s in bad), 1) for s in range(1, 12)] == [s in bad for s in range(1, 12)]
    # step 11 made four, but step 1 is out of its window (steps 2..11): three
    restored = NonFiniteGuard("skip", 2, 4, 10)
    restored.load_state_dict(json.loads(json.dumps(h.state_dict())))
    assert not restored.check(12, 0, 1)
    with pytest.raises(TrainingError, match="at 4 of the last 10"):
        restored.check(13, 1, 1)  # the window survives a resume


def test_a_loss_pinned_at_one_value_stops_the_run_a_learning_one_does_not():
    d = DeadLossDetector(repeats=3)
    for step, value in enumerate([10.9, 10.8, 10.8, 10.7], start=1):
        d.update(step, "ar", value)  # equal twice in a row at most
    d.update(5, "meta", 10.7)  # kinds are counted apart
    d.update(6, "ar", 10.7)
    with pytest.raises(TrainingError, match=r"ar loss was exactly 10\.700000 at 3 ar steps in a row \(steps 4\.\.7\)"):
        d.update(7, "ar", 10.7)
    again = DeadLossDetector(repeats=3)
    again.load_state_dict(json.loads(json.dumps({"ar": [2.5, 2, 4]})))
    with pytest.raises(TrainingError, match="steps 4..9"):
        again.update(9, "ar", 2.5)


def test_spike_detector_flags_a_jump_only_with_enough_history():
    d = SpikeDetector(window=20, sigma=4.0, min_history=5)
    assert d.update("ar", 50.0) is None  # no history yet
    base = [3.0, 3.1, 2.9, 3.05, 2.95, 3.0, 3.02]
    d2 = SpikeDetector(window=20, sigma=4.0, min_history=5)
    assert [d2.update("ar", v) for v in base] == [None] * len(base)
    spike = d2.update("ar", 4.0)
    assert spike["loss_spike"] == "ar" and spike["sigma"] > 4
    assert d2.update("meta", 4.0) is None  # kinds keep separate windows
    assert d2.update("ar", float("nan")) is None
    restored = SpikeDetector(window=20, sigma=4.0, min_history=5)
    restored.load_state_dict(json.loads(json.dumps(d2.state_dict())))
    assert restored.update("ar", 9.0) == d2.update("ar", 9.0)  # a resumed run decides the same
    assert SpikeDetector(window=0, sigma=1.0).update("ar", 1e9) is None


def test_step_guards_skip_without_touching_the_spike_windows_and_restore_their_state():
    train = load_config(None, ["train.spike_window=10", "train.spike_sigma=3", "train.max_nonfinite_in_row=2"]).train
    g = StepGuards(train, world_size=2)
    for step, loss in enumerate([3.0, 3.1, 2.9, 3.0, 3.05, 2.95, 3.0, 3.02], start=1):
        assert g.before_update(step, 0, {"ar": loss, "meta": None}) == (False, [], [])
    skip, warnings, records = g.before_update(9, 1, {"ar": float("nan"), "meta": None})
    assert skip and records == [] and "non-finite loss at step 9 on 1 rank(s)" in warnings[0]
    assert len(g.spikes.history["ar"]) == 8  # a skipped step's loss never joins the window
    skip, warnings, records = g.before_update(10, 0, {"ar": 9.0, "meta": 1.0})
    assert not skip and records[0]["step"] == 10 and records[0]["loss_spike"] == "ar"
    assert "ar loss spike at step 10: 9.0000" in warnings[0]
    again = StepGuards(train, world_size=2)
    again.load_state_dict(json.loads(json.dumps(g.state_dict())))
    assert again.before_update(11, 0, {"ar": 9.5, "meta": None}) == g.before_update(11, 0, {"ar": 9.5, "meta": None})
    g.before_update(12, 1, {"ar": None, "meta": None})
    with pytest.raises(TrainingError, match="2 steps in a row"):
        g.before_update(13, 2, {"ar": None, "meta": None})


def test_step_guards_stop_on_a_dead_model():
    g = StepGuards(load_config(None, []).train, world_size=1)
    ln_v = 10.82583999633789  # ln(50304): the AR loss of a uniform prediction
    for step in range(1, DeadLossDetector.REPEATS):
        assert g.before_update(step, 0, {"ar": ln_v, "meta": None})[0] is False
    with pytest.raises(TrainingError, match=f"exactly {ln_v:.6f} at {DeadLossDetector.REPEATS} ar steps"):
        g.before_update(DeadLossDetector.REPEATS, 0, {"ar": ln_v, "meta": None})


# ------------------------------------------------------------------------------------------------ signals


@pytest.fixture
def stop_clock(monkeypatch):
    """StopRequest on a hand-driven clock, with its exits recorded instead of taken and its messages silenced:
    ({"t": seconds}, [exit codes])."""
    clock = {"t": 100.0}
    exits = []
    monkeypatch.setattr(guards.time, "monotonic", lambda: clock["t"])
    monkeypatch.setattr(guards.os, "_exit", lambda code: exits.append(code))
    monkeypatch.setattr(guards.StopRequest, "_say", staticmethod(lambda text: None))
    return clock, exits


def test_duplicate_delivery_is_one_request_a_later_signal_exits_at_once(stop_clock):
    clock, exits = stop_clock
    stop = guards.StopRequest()
    stop._handle(signal.SIGINT, None)
    assert stop.requested and stop.signame == "SIGINT" and not exits
    clock["t"] += 0.01
    stop._handle(signal.SIGTERM, None)  # the launcher forwarding the same Ctrl-C
    assert not exits
    clock["t"] += 1.0
    stop._handle(signal.SIGTERM, None)
    assert exits == [128 + signal.SIGTERM]


def test_the_launcher_watchdog_is_a_stop_request_never_a_second_signal(stop_clock):
    """After a Ctrl-C the deepspeed runner dies at once, and a rank's watcher notices up to a second later, while
    the rank is still checkpointing: that notice must not count as the second signal that exits at once."""
    clock, exits = stop_clock
    stop = guards.StopRequest()
    stop._handle(signal.SIGINT, None)
    clock["t"] += 1.0
    stop._launcher_gone(guards.StopRequest.LAUNCHER_GONE, None)
    assert not exits and stop.signame == "SIGINT"
    alone = guards.StopRequest()  # the runner killed by itself: the watcher's notice is the request
    alone._launcher_gone(guards.StopRequest.LAUNCHER_GONE, None)
    assert alone.requested and alone.signame == "its launcher's exit" and not exits
    clock["t"] += 5.0
    alone._handle(signal.SIGTERM, None)  # a real signal after it still exits at once
    assert exits == [128 + signal.SIGTERM]


def test_installed_handlers_route_the_launcher_signal_to_the_watchdog_path():
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, guards.StopRequest.LAUNCHER_GONE)}
    stop = guards.StopRequest()
    try:
        stop.install()
        assert signal.getsignal(guards.StopRequest.LAUNCHER_GONE) == stop._launcher_gone
        assert signal.getsignal(signal.SIGTERM) == stop._handle
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
