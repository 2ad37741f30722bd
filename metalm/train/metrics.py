"""Metrics: a local metrics.jsonl, optional Weights & Biases, and a human progress line.

Only rank 0 writes. Values arrive as Python numbers, already reduced across ranks by the loop at log
intervals: nothing here forces a device sync.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from metalm.clock import hms
from metalm.config import LoggingConfig
from metalm.console import warn
from metalm.wandb_run import WandbRun, wandb_mode


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def hardware_summary() -> dict:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


class MetricsLogger:
    """`begin(step)` once the run knows the step it starts from; then `log` records and `progress` lines."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, rank: int, run_config: dict):
        self.cfg, self.rank, self.run_dir, self.run_config = cfg, rank, Path(run_dir), run_config
        self.enabled = rank == 0
        self.path = self.run_dir / "metrics.jsonl"
        self.wandb = WandbRun(f"logging to {self.path} only (set WANDB_MODE=offline to keep a local W&B run, or "
                              f"logging.wandb=false)")
        self.t0 = time.time()
        self.start_step = 0
        self.write_failed = False

    def begin(self, step: int) -> None:
        """Start logging at `step` (0 for a fresh run): records past it, left by a run that died after logging
        them (before a checkpoint, or after the one resumed from), are dropped, since they are about to be
        re-done; then W&B starts, when enabled."""
        self.start_step, self.t0 = step, time.time()
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(step)
        if self.cfg.wandb:
            self._init_wandb()

    def _truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, self.path)

    def _init_wandb(self) -> None:
        lg = self.cfg
        config = dict(self.run_config)
        config["_meta"] = {"git_commit": _git_commit(), "hardware": hardware_summary()}
        self.wandb.start(project=lg.project, entity=lg.entity, name=lg.run_name or self.run_dir.name,
                         tags=list(lg.tags), config=config, dir=str(self.run_dir), mode=wandb_mode(lg.mode),
                         resume="allow", id=self._run_id(self.run_dir))

    @staticmethod
    def _run_id(run_dir: Path) -> str:
        """A stable W&B run id per run directory, so a resumed run continues the same W&B run."""
        path = run_dir / "wandb_run_id"
        if path.is_file():
            return path.read_text().strip()
        import secrets

        run_id = secrets.token_hex(8)
        path.write_text(run_id + "\n")
        return run_id

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: v for k, v in record.items() if v is not None}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.write_failed = False
        except OSError as e:  # a full disk must not stop training: the checkpoints are what matter
            if not self.write_failed:
                warn(f"cannot append to {self.path} ({e}); metrics records are lost until it works again")
            self.write_failed = True
        # upload events (checkpoint_uploaded, ...) carry no step: W&B puts them at its current one
        self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record.get("step"))

    def progress(self, step: int, max_steps: int, record: dict) -> None:
        if not self.enabled or not self.cfg.progress:
            return
        elapsed = time.time() - self.t0
        done = step - self.start_step
        eta = elapsed / done * (max_steps - step) if done > 0 else 0.0
        parts = [f"step {step}/{max_steps}"]
        if record.get("ar_loss") is not None:
            parts.append(f"ar_loss {record['ar_loss']:.4f}")
        if record.get("meta_loss") is not None:
            parts.append(f"meta_loss {record['meta_loss']:.4f} q_acc {record.get('meta/query_acc', 0):.3f}")
        if record.get("val_loss") is not None:
            parts.append(f"val_loss {record['val_loss']:.4f}")
        parts.append(f"lr {record.get('lr', 0):.2e}")
        parts.append(f"tok/s {record.get('tokens_per_s', 0):,.0f}")
        if record.get("mfu") is not None:
            parts.append(f"mfu {100 * record['mfu']:.1f}%")
        parts.append(f"elapsed {hms(elapsed)} eta {hms(eta)}")
        print(" | ".join(parts), flush=True)

    def close(self) -> None:
        self.wandb.finish()
