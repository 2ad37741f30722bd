"""Run-time guards of a training run: output-directory preflight, non-finite losses, loss spikes, stop signals.

Everything here is decided identically on every rank: the loop all-reduces the inputs (one small
all-reduce per optimizer step) before calling into these classes, so a rank never skips, stops or saves
alone (ZeRO would hang or silently mix parameters from different updates otherwise).
"""
from __future__ import annotations

import math
import os
import shutil
import signal
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

NONFINITE_POLICIES = ("skip", "stop")

_CKPT_OVERHEAD = 1 << 20  # config, tokenizer, trainer and per-rank state, pickling overhead


class TrainingError(RuntimeError):
    """A condition that stops training: non-finite losses, repeated checkpoint failures, an unusable run
    directory. The message names the step or the path (and errno)."""


# ------------------------------------------------------------------------------------------------ preflight


def checkpoint_bytes(n_params: int, precision: str, zero_stage: int) -> int:
    """An estimate of one checkpoint's size on disk, for `n_params` trained parameters (meta head included):
    the DeepSpeed module state (2 or 4 bytes per parameter), the optimizer state (AdamW's two fp32 moments,
    plus the fp32 master copy that ZeRO 1-3 and 16-bit training keep) and the consolidated fp32 safetensors
    the evaluator reads."""
    module = 4 if precision == "fp32" else 2
    optimizer = 8 if precision == "fp32" and zero_stage == 0 else 12
    return n_params * (module + optimizer + 4) + _CKPT_OVERHEAD


def _existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Free bytes (for an unprivileged writer) on the filesystem that holds, or will hold, `path`."""
    return shutil.disk_usage(_existing_ancestor(path)).free


def probe_writable(directory: Path, tag: str) -> None:
    """Create `directory`, then write, fsync and remove a small file in it; OSError when that fails."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".metalm-probe-{tag}-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"metalm write probe\n" * 64)
            f.flush()
            os.fsync(f.fileno())
    finally:
        try:
            probe.unlink()
        except FileNotFoundError:
            pass


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def probe_dirs(run_dir: Path, ckpt_root: Path, tag: str) -> None:
    """The run directory and the checkpoint directory take writes: TrainingError naming the directory and the
    errno otherwise (a read-only or full filesystem, a path through a file, no permission)."""
    for key, d in (("train.run_dir", run_dir), ("checkpoint directory", ckpt_root)):
        try:
            probe_writable(d, tag)
        except OSError as e:
            raise TrainingError(f"{key} {d}: cannot write there ({describe_error(e)}); make it writable or "
                                f"choose another train.run_dir") from None


def check_free_space(ckpt_root: Path, need_bytes: int, keep_last_k: int) -> list[str]:
    """TrainingError when the checkpoint directory's filesystem cannot hold one checkpoint of about
    `need_bytes`; a warning (returned) when it holds fewer than keep_last_k + 1 (the disk fills up mid-run)."""
    free = free_bytes(ckpt_root)
    if free < need_bytes:
        raise TrainingError(f"not enough free space for a checkpoint in {ckpt_root}: {_gib(free)} free, one "
                            f"checkpoint needs about {_gib(need_bytes)}; free some space, move train.run_dir, "
                            f"or set checkpoint.check_free_space=false if the filesystem misreports")
    want = need_bytes * (keep_last_k + 1)
    if free < want:
        return [f"{ckpt_root}: {_gib(free)} free holds fewer than checkpoint.keep_last_k + 1 = {keep_last_k + 1} "
                f"checkpoints of about {_gib(need_bytes)}; saves will fail once the disk is full"]
    return []


def _oserror(e: OSError) -> str:
    import errno as _errno

    name = _errno.errorcode.get(e.errno or 0, "")
    return f"{name + ' ' if name else ''}[Errno {e.errno}] {e.strerror or e}" + (f": '{e.filename}'" if e.filename else "")


def describe_error(e: BaseException) -> str:
    """One line for a failed write: the errno name and number and the path for OSErrors."""
    if isinstance(e, OSError):
        return _oserror(e)
    return f"{type(e).__name__}: {e}"


# ------------------------------------------------------------------------------------------ non-finite loss


@contextmanager
def update_suppressed(optimizer) -> Iterator[None]:
    """Inside this block `optimizer.step()` does nothing.

    Used around DeepSpeed's `engine.step()` at the boundary of a step whose loss was not finite: DeepSpeed's
    wrappers (ZeRO 1/2/3, bf16/fp16) still reduce, clip and clear the gradients and advance their counters,
    but they call the basic optimizer (`engine.basic_optimizer`, our AdamW) to change the fp32 master
    weights, and that call is what is suppressed. So parameters (whose 16-bit copies are re-derived from
    the unchanged masters) and the AdamW state (moments, step count) stay exactly as they were.
    """
    had = "step" in vars(optimizer)  # torch's LR scheduler wraps `step` on the instance: keep its wrapper
    previous = vars(optimizer).get("step")

    def _no_update(*args, **kwargs):
        return None

    optimizer.step = _no_update
    try:
        yield
    finally:
        if had:
            optimizer.step = previous
        else:
            del optimizer.step


class NonFiniteGuard:
    """train.nonfinite_policy: what a step with a non-finite loss (on any rank) does.

    skip: the step's update is not applied (counted as `nonfinite_skipped`); `max_in_row` such steps in a
    row stop the run. stop: the first one stops the run. Stopping raises TrainingError naming the step(s).
    """

    def __init__(self, policy: str, max_in_row: int):
        if policy not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite policy {policy!r}: expected one of {', '.join(NONFINITE_POLICIES)}")
        self.policy, self.max_in_row = policy, max_in_row
        self.in_row = 0
        self.total = 0

    def check(self, step: int, nonfinite_ranks: int, world_size: int) -> bool:
        """`step` is the 1-based number of the step just computed. True: skip its update."""
        if nonfinite_ranks <= 0:
            self.in_row = 0
            return False
        self.total += 1
        self.in_row += 1
        where = f"on {nonfinite_ranks} of {world_size} rank(s)"
        if self.policy == "stop":
            raise TrainingError(f"non-finite loss at step {step} {where} (train.nonfinite_policy=stop); the "
                                f"last checkpoint is intact: lower optim.lr or raise optim.warmup_steps and rerun")
        if self.in_row >= self.max_in_row:
            raise TrainingError(f"non-finite loss at {self.in_row} steps in a row (steps {step - self.in_row + 1}"
                                f"..{step}, train.max_nonfinite_in_row={self.max_in_row}); stopping: the "
                                f"last checkpoint is intact, lower optim.lr or raise optim.warmup_steps and rerun")
        return True

    def state_dict(self) -> dict:
        return {"in_row": self.in_row, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.in_row, self.total = int(state.get("in_row", 0)), int(state.get("total", 0))


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

    def update(self, kind: str, value: float) -> Optional[dict]:
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


# ---------------------------------------------------------------------------------------------- stop signals


class StopRequest:
    """SIGTERM/SIGINT: finish the current step, checkpoint, exit 0. A second signal exits at once.

    A signal arriving within DUPLICATE_S of the first is the same request delivered twice, not a second one:
    Ctrl-C in a terminal reaches the launcher and every rank, and torchrun / the deepspeed launcher forward
    the launcher's copy to the ranks as well, milliseconds later.
    """

    DUPLICATE_S = 0.5

    def __init__(self) -> None:
        self.requested = False
        self.signame = ""
        self.first_at = 0.0

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

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
        self.requested, self.signame, self.first_at = True, name, now
        self._say(f"metalm: {name} received: checkpointing at the end of this step, then exiting "
                  "(send it again to exit immediately)\n")
