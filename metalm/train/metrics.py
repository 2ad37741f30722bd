"""Metrics: a local metrics.jsonl, optional Weights & Biases, and a human progress line.

Only rank 0 writes. Values arrive as Python numbers, already reduced across ranks by the loop at log
intervals: nothing here forces a device sync.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from metalm.config import Config, to_dict


def _git_commit() -> Optional[str]:
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


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class MetricsLogger:
    def __init__(self, cfg: Config, run_dir: Path, rank: int, resumed_step: int = 0):
        self.cfg, self.rank = cfg, rank
        self.enabled = rank == 0
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        self.t0 = time.time()
        self.start_step = resumed_step
        self.write_failed = False
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if resumed_step:
            self._truncate_after(resumed_step)
        if cfg.logging.wandb:
            self._init_wandb(run_dir)

    def _truncate_after(self, step: int) -> None:
        """After a resume, drop lines logged past the checkpoint: they are about to be re-done."""
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

    def _init_wandb(self, run_dir: Path) -> None:
        lg = self.cfg.logging
        mode = lg.mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        try:
            import wandb
        except ImportError:
            print("metalm: wandb is not installed; logging to metrics.jsonl only", file=sys.stderr)
            return
        config = to_dict(self.cfg)
        config["_meta"] = {"git_commit": _git_commit(), "hardware": hardware_summary()}
        self.wandb = wandb.init(project=lg.project, entity=lg.entity, name=lg.run_name or run_dir.name,
                                tags=list(lg.tags), config=config, dir=str(run_dir), mode=mode,
                                resume="allow", id=self._run_id(run_dir))

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
                print(f"metalm: warning: cannot append to {self.path} ({e}); metrics records are lost until "
                      f"it works again", file=sys.stderr, flush=True)
            self.write_failed = True
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def progress(self, step: int, max_steps: int, record: dict) -> None:
        if not self.enabled or not self.cfg.logging.progress:
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
        parts.append(f"elapsed {_fmt_time(elapsed)} eta {_fmt_time(eta)}")
        print(" | ".join(parts), flush=True)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
