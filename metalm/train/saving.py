"""Checkpoint saving of the training loop, as a mixin of `Trainer`: collective, atomic, and failure-tolerant.

Every rank writes its part into `.tmp-step_N/`; the files are fsynced and recorded (size, sha256) in the
COMPLETE marker; rank 0 renames the directory into place and moves `latest` (see metalm.train.checkpoint).
A write that fails on any rank is discarded on every rank and retried at the next interval, up to
checkpoint.max_failed_saves consecutive failures, after which the run stops with exit status 1.
"""
from __future__ import annotations

import errno
import json
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch.distributed as tdist

from metalm.config import to_yaml
from metalm.fsutil import write_atomic
from metalm.train import checkpoint as ckpt
from metalm.train.guards import TrainingError, describe_error, free_bytes
from metalm.train.module import PretrainModule

class SaveFailed(Exception):
    """A checkpoint save failed on at least one rank (raised on every rank alike, with the same message)."""




class CheckpointSaving:
    """Saving for `Trainer` (which provides cfg, dist, engine, loader, manifest, metrics, step, the guards
    and `_agreed_message`)."""

    def save_checkpoint(self) -> Path:
        """Collective. Every rank writes its part into `.tmp-step_N/`; the files are fsynced and recorded
        (size, sha256) in the COMPLETE marker; rank 0 renames the directory into place and moves `latest`.

        A write that fails on any rank (full disk, I/O error) raises SaveFailed on every rank after all of
        them went through the same collectives; the partial directory is removed and `latest` still names the
        previous complete checkpoint."""
        cfg, d = self.cfg, self.dist
        name = ckpt.step_dir_name(self.step)
        tmp, final = self.ckpt_root / f".tmp-{name}", self.ckpt_root / name
        errors: list = []

        def attempt(fn: Callable, *args) -> None:
            if not errors:
                try:
                    fn(*args)
                except Exception as e:  # noqa: BLE001 - recorded, then agreed on by all ranks
                    errors.append(e)

        if d.rank == 0:
            attempt(self._fresh_tmp, tmp)
        self._check_save(errors, tmp)
        with ckpt.deferred_io_errors(self.engine, errors):
            self.engine.save_checkpoint(str(tmp), tag="ds", client_state={"step": self.step}, save_latest=False)
        attempt(ckpt.save_rank_state, tmp, d.rank, self.loader.state_dict())
        if cfg.checkpoint.export_weights:
            self._export_weights(tmp, attempt)
        if d.rank == 0:
            attempt(self._write_run_files, tmp)
        self._check_save(errors, tmp)
        files = self._record_files(tmp, attempt)
        self._check_save(errors, tmp)
        if d.rank == 0:
            attempt(ckpt.finalize, tmp, final, self.ckpt_root, cfg.checkpoint.keep_last_k, files, self.step)
        self._check_save(errors, tmp)
        self.ckpt_bytes = sum(r["bytes"] for r in files.values())
        return final

    def _fresh_tmp(self, tmp: Path) -> None:
        if self.cfg.checkpoint.check_free_space:
            need = self.ckpt_bytes or self.ckpt_estimate
            free = free_bytes(self.ckpt_root)
            if free < need:
                raise OSError(errno.ENOSPC, f"no room for a checkpoint: {free:,} bytes free, the last one took "
                                            f"{need:,} (checked before writing)", str(self.ckpt_root))
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)

    def _write_run_files(self, tmp: Path) -> None:
        cfg, d = self.cfg, self.dist
        write_atomic(tmp / "config.yaml", to_yaml(cfg).encode())
        state = {"step": self.step, "tokens": self.tokens, "flops": self.flops, "world_size": d.world_size,
                 "global_batch": cfg.train.global_batch, "micro_batch": cfg.train.micro_batch,
                 "seq_len": cfg.train.seq_len, "grad_accum": self.accum,
                 "tokenizer_hash": self.manifest.get("tokenizer_hash"),
                 "guards": {"nonfinite": self.nonfinite.state_dict(), "spikes": self.spikes.state_dict()}}
        write_atomic(tmp / "trainer_state.json", json.dumps(state, indent=2).encode())
        tok = Path(cfg.data.shards) / "tokenizer.json"
        if tok.is_file():
            shutil.copyfile(tok, tmp / "tokenizer.json")

    def _record_files(self, tmp: Path, attempt: Callable) -> dict:
        """fsync, size and sha256 of every file, the files split over the ranks; the merged records on all."""
        d = self.dist
        box: list = [ckpt.checkpoint_files(tmp) if d.rank == 0 else None]
        if d.world_size > 1:
            tdist.broadcast_object_list(box, src=0)
        share = box[0][d.rank::d.world_size]
        mine: dict = {}
        attempt(lambda: mine.update(ckpt.record_files(tmp, share, self.cfg.checkpoint.checksums)))
        if d.world_size == 1:
            return mine
        parts: list = [None] * d.world_size
        tdist.all_gather_object(parts, mine)
        return {k: v for part in parts for k, v in part.items()}

    def _check_save(self, errors: list, tmp: Path) -> None:
        """Collective: all ranks learn whether any rank's write failed; if so the partial checkpoint goes and
        SaveFailed is raised everywhere with the first failing rank's message."""
        msg = None
        if errors:
            e = errors[0]
            msg = f"rank {self.dist.rank}: {describe_error(e)}"
            if not isinstance(e, OSError):  # torch's zip writer reports a full disk without an errno
                free = free_bytes(self.ckpt_root)
                if free < (1 << 20):
                    msg = (f"rank {self.dist.rank}: ENOSPC [Errno 28] No space left on device: {self.ckpt_root} "
                           f"has {free:,} bytes free (the writer reported {describe_error(e)})")
        msg = self._agreed_message(msg)
        if msg is None:
            return
        if self.dist.rank == 0 and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise SaveFailed(f"checkpoint of step {self.step} in {tmp} failed: {msg}")

    def _save(self, final: bool) -> bool:
        """save_checkpoint with the failure policy: True when saved. A failed save is logged, training goes on
        and the save is retried at the next interval; more than checkpoint.max_failed_saves failures in a row,
        or a failed final save, stop the run (TrainingError on every rank)."""
        try:
            self.save_checkpoint()
        except SaveFailed as e:
            self.failed_saves += 1
            limit = self.cfg.checkpoint.max_failed_saves
            latest = ckpt.find_latest(self.ckpt_root)
            self.metrics.log({"step": self.step, "checkpoint_failed": str(e)})
            if final or self.failed_saves > limit:
                why = "the final save" if final else f"{self.failed_saves} failed saves in a row " \
                                                       f"(checkpoint.max_failed_saves={limit})"
                raise TrainingError(f"{e}; stopping after {why}; the last complete checkpoint is {latest}, "
                                    f"rerun the same command to resume from it") from None
            if self.dist.rank == 0:
                print(f"metalm: warning: {e}; training goes on and retries at the next checkpoint "
                      f"({self.failed_saves} of {limit} tolerated failure(s)); the last complete checkpoint "
                      f"is {latest}", file=sys.stderr, flush=True)
            return False
        self.failed_saves = 0
        return True

    def _export_weights(self, tmp: Path, attempt: Callable) -> None:
        module = self.engine.module
        if self.cfg.train.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):  # collective
                if self.dist.rank == 0:
                    attempt(self._write_weights, module, tmp)
        elif self.dist.rank == 0:
            attempt(self._write_weights, module, tmp)

    @staticmethod
    def _write_weights(module: PretrainModule, tmp: Path) -> None:
        ckpt.save_weights(module.lm, tmp / "model.safetensors")
        if module.head is not None:
            ckpt.save_weights(module.head, tmp / "meta_head.safetensors")
