"""The metrics logger (metalm.train.metrics): metrics.jsonl across restarts, W&B that never stops a run."""
from __future__ import annotations

import json

import pytest

from metalm.config import load_config
from metalm.train.metrics import MetricsLogger
from metalm.wandb_run import wandb_mode


def _logger(tmp_path, *overrides: str) -> MetricsLogger:
    return MetricsLogger(load_config(None, list(overrides)).logging, tmp_path, rank=0, run_config={"x": 1})


def _steps(tmp_path) -> list[int]:
    return [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_a_restart_drops_every_record_after_the_step_it_starts_from(tmp_path):
    first = _logger(tmp_path, "logging.wandb=false")
    first.begin(0)
    for step in (1, 2, 3):
        first.log({"step": step, "ar_loss": 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "ar_lo')  # a line cut by kill -9
    again = _logger(tmp_path, "logging.wandb=false")
    again.begin(0)  # killed before its first checkpoint: the rerun starts from scratch
    assert not (tmp_path / "metrics.jsonl").read_text()
    for step in (1, 2, 3, 4):
        again.log({"step": step})
    resumed = _logger(tmp_path, "logging.wandb=false")
    resumed.begin(2)
    resumed.log({"step": 3})
    assert _steps(tmp_path) == [1, 2, 3]


def test_auto_mode_respects_wandb_mode_from_the_environment(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode("auto") == "offline"
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode("auto") == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    assert wandb_mode("auto") == "offline"
    assert wandb_mode("online") == "online"


def test_wandb_that_cannot_start_or_log_is_one_warning_and_training_logs_on(tmp_path, monkeypatch, console):
    import wandb
    from wandb.errors import CommError

    def unreachable(**kwargs):
        raise CommError("Network error (ConnectionError), entering retry loop.")

    monkeypatch.setattr(wandb, "init", unreachable)
    m = _logger(tmp_path, "logging.wandb=true", "logging.mode=online")
    m.begin(0)
    m.log({"step": 1, "ar_loss": 2.0})
    m.close()
    err = console.readouterr().err
    assert err.count("metalm: warning: W&B could not start (CommError: Network error") == 1
    assert f"logging to {tmp_path / 'metrics.jsonl'} only" in err
    assert _steps(tmp_path) == [1]

    class FailingRun:
        def log(self, *a, **k):
            raise CommError("connection reset")

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kwargs: FailingRun())
    m = _logger(tmp_path, "logging.wandb=true", "logging.mode=online")
    m.begin(1)
    m.log({"step": 2})
    m.log({"step": 3})
    assert console.readouterr().err.count("W&B logging failed (CommError: connection reset)") == 1
    assert _steps(tmp_path) == [1, 2, 3] and m.wandb.run is None


def test_event_records_without_a_step_reach_the_file_and_wandb(tmp_path, monkeypatch):
    """The checkpointer logs upload events ({"checkpoint_uploaded": ...}) that carry no step."""
    import wandb

    logged = []

    class Run:
        def log(self, data, step=None):
            logged.append((data, step))

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kwargs: Run())
    for wandb_on in ("false", "true"):
        run_dir = tmp_path / f"wandb-{wandb_on}"
        m = _logger(run_dir, f"logging.wandb={wandb_on}", "logging.mode=offline")
        m.begin(0)
        m.log({"step": 1, "ar_loss": 2.0})
        m.log({"checkpoint_uploaded": "s3://b/run/checkpoints/step_00000001"})
        m.close()
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert lines == [{"step": 1, "ar_loss": 2.0}, {"checkpoint_uploaded": "s3://b/run/checkpoints/step_00000001"}]
    assert logged == [({"ar_loss": 2.0}, 1), ({"checkpoint_uploaded": "s3://b/run/checkpoints/step_00000001"}, None)]


@pytest.mark.parametrize("rank", [1, 3])
def test_only_rank_zero_writes(tmp_path, rank):
    m = MetricsLogger(load_config(None, ["logging.wandb=false"]).logging, tmp_path, rank=rank, run_config={})
    m.begin(0)
    m.log({"step": 1})
    assert not (tmp_path / "metrics.jsonl").exists()
