"""Weights & Biases, for the trainer's metrics and the evaluator's results: which mode a run uses
(`logging.mode`; with `auto`, a WANDB_MODE the user set, else online with an API key and offline without), and a
run that never stops its program: a failure to import, start, log or finish is one warning, after which W&B
logging stops and the program goes on with its local files."""
from __future__ import annotations

import os

from metalm.console import warn

WANDB_MODES = ("online", "offline", "disabled")


def wandb_mode(configured: str = "auto") -> str:
    """The W&B mode for `logging.mode` = `configured` (auto | online | offline)."""
    if configured != "auto":
        return configured
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in WANDB_MODES:
        return env
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _short(e: Exception) -> str:
    first = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {first}"


class WandbRun:
    """One W&B run. `fallback` ends the failure warning: what the program goes on writing instead (e.g.
    "logging to RUN/metrics.jsonl only"). After a failure `run` is None and `start` does not try again."""

    def __init__(self, fallback: str):
        self.fallback = fallback
        self.run = None
        self.gave_up = False

    def start(self, step_metrics: dict[str, str | None] | None = None, **init) -> bool:
        """wandb.init(**init), then define_metric(name, step_metric=...) for each of `step_metrics`. Returns
        whether the run is up."""
        if self.run is not None or self.gave_up:
            return self.run is not None
        try:
            import wandb
        except ImportError:
            self._failed("wandb is not installed")
            return False
        try:
            self.run = wandb.init(**init)
            for name, step in (step_metrics or {}).items():
                self.run.define_metric(name, step_metric=step)
        except Exception as e:  # noqa: BLE001 (wandb raises CommError, UsageError, timeouts, ...: none stops us)
            self._failed(f"W&B could not start ({_short(e)})")
        return self.run is not None

    def log(self, data: dict, step: int | None = None) -> None:
        if self.run is None:
            return
        try:
            if step is None:
                self.run.log(data)
            else:
                self.run.log(data, step=step)
        except Exception as e:  # noqa: BLE001 (a W&B failure never stops the program)
            self._failed(f"W&B logging failed ({_short(e)})")

    def finish(self) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        try:
            run.finish()
        except Exception as e:  # noqa: BLE001 (the program's own results are written already)
            warn(f"W&B did not finish cleanly ({_short(e)})")

    def _failed(self, why: str) -> None:
        self.run, self.gave_up = None, True
        warn(f"{why}; {self.fallback}")
