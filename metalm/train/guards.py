"""Run-time guards of a training run: non-finite losses, dead weights, loss spikes, stop signals.

Everything here is decided identically on every rank: the loop all-reduces the inputs (one small
all-reduce per optimizer step) before calling `StepGuards.before_update`, so a rank never skips, stops or
saves alone (ZeRO would hang or silently mix parameters from different updates otherwise).
"""
from __future__ import annotations

import math
import os
import signal
import time
from collections import deque

from metalm.config import TrainConfig
from metalm.train.errors import TrainingError


class NonFiniteGuard:
    """train.nonfinite_policy: what a step with a non-finite loss (on any rank) does.

    skip: the step's update is not applied (counted as `nonfinite_skipped`). The run stops at
    `max_in_row` such steps in a row, or at `max_in_window` of them among the last `window` steps: a run
    whose meta steps all go non-finite while its AR steps stay finite never has many in a row, but is dead.
    stop: the first one stops the run. Stopping raises TrainingError naming the step(s).
    """

    def __init__(self, policy: str, max_in_row: int, max_in_window: int, window: int):
        self.policy, self.max_in_row = policy, max_in_row
        self.max_in_window, self.window = max_in_window, window
        self.in_row = 0
        self.total = 0
        self.recent: deque = deque(maxlen=window)  # the step numbers of the non-finite steps among the last `window`

    def check(self, step: int, nonfinite_ranks: int, world_size: int) -> bool:
        """`step` is the 1-based number of the step just computed. True: skip its update."""
        while self.recent and self.recent[0] <= step - self.window:
            self.recent.popleft()
        if nonfinite_ranks <= 0:
            self.in_row = 0
            return False
        self.total += 1
        self.in_row += 1
        self.recent.append(step)
        where = f"on {nonfinite_ranks} of {world_size} rank(s)"
        advice = "the last checkpoint is intact, lower optim.lr or raise optim.warmup_steps and rerun"
        if self.policy == "stop":
            raise TrainingError(f"non-finite loss at step {step} {where} (train.nonfinite_policy=stop); {advice}")
        if self.in_row >= self.max_in_row:
            raise TrainingError(f"non-finite loss at {self.in_row} steps in a row (steps {step - self.in_row + 1}"
                                f"..{step}, train.max_nonfinite_in_row={self.max_in_row}); stopping: {advice}")
        if len(self.recent) >= self.max_in_window:
            raise TrainingError(f"non-finite loss at {len(self.recent)} of the last {self.window} steps (steps "
                                f"{', '.join(map(str, self.recent))}; train.max_nonfinite_in_window="
                                f"{self.max_in_window}, train.nonfinite_window={self.window}); stopping: {advice}")
        return True

    def state_dict(self) -> dict:
        return {"in_row": self.in_row, "total": self.total, "recent": list(self.recent)}

    def load_state_dict(self, state: dict) -> None:
        self.in_row, self.total = int(state.get("in_row", 0)), int(state.get("total", 0))
        self.recent = deque((int(s) for s in state.get("recent", [])), maxlen=self.window)


# ------------------------------------------------------------------------------------------ dead weights


class DeadLossDetector:
    """A loss of one kind ("ar", "meta") that is exactly the same number at `repeats` of its steps in a row:
    the model's output no longer depends on its input (dead weights; typically the AR loss pinned at ln(vocab),
    a uniform prediction, while the optimizer drops every update as an overflow). Different batches never give
    a live model bit-identical mean losses, so this does not fire on a run that learns, however slowly."""

    REPEATS = 8

    def __init__(self, repeats: int = REPEATS):
        self.repeats = repeats
        self.last: dict[str, tuple[float, int, int]] = {}  # kind -> (value, times in a row, first step)

    def update(self, step: int, kind: str, value: float) -> None:
        """Record the finite step loss `value`; raises TrainingError when the model is dead."""
        prev, times, since = self.last.get(kind, (None, 0, step))
        times, since = (times + 1, since) if value == prev else (1, step)
        self.last[kind] = (value, times, since)
        if times >= self.repeats:
            raise TrainingError(f"the {kind} loss was exactly {value:.6f} at {times} {kind} steps in a row (steps "
                                f"{since}..{step}): the model's output no longer depends on its input (dead "
                                f"weights, e.g. from too high a learning rate); stopping: the last checkpoint "
                                f"may hold the dead weights too, resume from an earlier one with a lower optim.lr")

    def state_dict(self) -> dict:
        return {k: list(v) for k, v in self.last.items()}

    def load_state_dict(self, state: dict) -> None:
        self.last = {k: (float(v[0]), int(v[1]), int(v[2])) for k, v in state.items()}


# ---------------------------------------------------------------------------------------------- loss spikes


class SpikeDetector:
    """A loss above mean + sigma x std of the last `window` step losses (of the same kind) is a spike.

    One window per kind ("ar", "meta": their scales differ). The test needs at least `min_history` values;
    the spike itself joins the window afterwards (a lasting level change stops being reported once the
    window has absorbed it). window=0 disables detection.
    """

    def __init__(self, window: int, sigma: float, min_history: int = 8):
        self.window, self.sigma = window, sigma
        self.min_history = max(2, min(min_history, window)) if window else 0
        self.history: dict[str, deque] = {}

    def update(self, kind: str, value: float) -> dict | None:
        """Record the step loss `value`; a dict describing the spike when it is one, else None."""
        if not self.window or not math.isfinite(value):
            return None
        hist = self.history.setdefault(kind, deque(maxlen=self.window))
        spike = None
        if len(hist) >= self.min_history:
            n = len(hist)
            mean = sum(hist) / n
            std = math.sqrt(sum((v - mean) ** 2 for v in hist) / (n - 1))
            if value > mean + self.sigma * std and value > mean:
                spike = {"loss_spike": kind, "loss": value, "window_mean": mean, "window_std": std,
                         "sigma": (value - mean) / std if std > 0 else None}
        hist.append(value)
        return spike

    def state_dict(self) -> dict:
        return {k: list(v) for k, v in self.history.items()}

    def load_state_dict(self, state: dict) -> None:
        self.history = {k: deque((float(x) for x in v), maxlen=self.window or None) for k, v in state.items()}


# -------------------------------------------------------------------------------------- once per step


class StepGuards:
    """The guards the loop consults once per optimizer step, after its micro-batches and before its update."""

    def __init__(self, train: TrainConfig, world_size: int):
        self.world_size = world_size
        self.nonfinite = NonFiniteGuard(train.nonfinite_policy, train.max_nonfinite_in_row,
                                        train.max_nonfinite_in_window, train.nonfinite_window)
        self.dead = DeadLossDetector()
        self.spikes = SpikeDetector(train.spike_window, train.spike_sigma)

    def before_update(self, step: int, nonfinite_ranks: int, mean_losses: dict) -> tuple[bool, list[str], list[dict]]:
        """(skip the update, warnings, spike records) for 1-based step `step`, from the all-reduced count of
        ranks with a non-finite loss and the step's mean loss of each kind ("ar", "meta"; None when the step
        had none). Raises TrainingError when the non-finite policy says stop or the model is dead."""
        if self.nonfinite.check(step, nonfinite_ranks, self.world_size):
            return True, [f"non-finite loss at step {step} on {nonfinite_ranks} rank(s): its update is skipped "
                          f"({self.nonfinite.in_row} in a row; train.max_nonfinite_in_row="
                          f"{self.nonfinite.max_in_row})"], []
        warnings, records = [], []
        for kind, value in mean_losses.items():
            if value is None:
                continue
            self.dead.update(step, kind, value)
            spike = self.spikes.update(kind, value)
            if spike is not None:
                records.append({"step": step, **spike})
                warnings.append(f"{kind} loss spike at step {step}: {spike['loss']:.4f}, window mean "
                                f"{spike['window_mean']:.4f} +- {spike['window_std']:.4f}")
        return False, warnings, records

    def state_dict(self) -> dict:
        return {"nonfinite": self.nonfinite.state_dict(), "dead": self.dead.state_dict(),
                "spikes": self.spikes.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.nonfinite.load_state_dict(state.get("nonfinite", {}))
        self.dead.load_state_dict(state.get("dead", {}))
        self.spikes.load_state_dict(state.get("spikes", {}))


# ---------------------------------------------------------------------------------------------- stop signals


class StopRequest:
    """SIGTERM/SIGINT: finish the current step, checkpoint, exit 0. A second signal exits at once.

    A signal arriving within DUPLICATE_S of the first is the same request delivered twice, not a second one:
    Ctrl-C in a terminal reaches the launcher and every rank, and torchrun / the deepspeed launcher forward
    the launcher's copy to the ranks as well, milliseconds later.

    LAUNCHER_GONE (SIGUSR1) is what a rank's own watchdog sends itself when its launcher is gone (the deepspeed
    runner's watcher in metalm/cli/train.py): a stop request like a first SIGTERM, but never a second one, since
    after a Ctrl-C the watchdog notices the runner's death up to a second later, while the rank is still
    checkpointing.
    """

    DUPLICATE_S = 0.5
    LAUNCHER_GONE = signal.SIGUSR1

    def __init__(self) -> None:
        self.requested = False
        self.signame = ""
        self.first_at = 0.0

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        signal.signal(self.LAUNCHER_GONE, self._launcher_gone)

    @staticmethod
    def _say(text: str) -> None:
        os.write(2, text.encode())  # not print(): a handler may interrupt a print in progress

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.requested:
            if now - self.first_at < self.DUPLICATE_S:
                return
            self._say(f"metalm: second {name}: exiting now; the last complete checkpoint is intact\n")
            os._exit(128 + signum)
        self._request(name, now, f"{name} received", " (send it again to exit immediately)")

    def _launcher_gone(self, signum, frame) -> None:
        if self.requested:
            return  # already stopping: the launcher went away because of that same request
        self._request("its launcher's exit", time.monotonic(), "the launcher that started this rank is gone")

    def _request(self, name: str, now: float, why: str, hint: str = "") -> None:
        self.requested, self.signame, self.first_at = True, name, now
        self._say(f"metalm: {why}: checkpointing at the end of this step, then exiting{hint}\n")
