"""The training loop: `Trainer(cfg, dist)` builds the run's components from their config sections; `run()`
sequences them. Each optimizer step is one call of the hybrid step (metalm.train.step: branch, episode, forward,
backward, sums, FLOPs, diagnostics, update); the guards decide through its `before_update` hook whether an update
is skipped or the run stops (one small all-reduce per step carries non-finite counts, the stop flag and the
step's losses for spike detection); metrics are reduced every `log_every` steps; the checkpointer decides when
to save.
"""
from __future__ import annotations

import time

import torch

from metalm.checkpoint import TrainerState
from metalm.clock import hms
from metalm.data.manifest import check_validation_split
from metalm.console import warn
from metalm.config import Config, grad_accum, run_locations, to_dict, to_yaml
from metalm.meta.step import MetaStep, inert_warnings, word_start_ids
from metalm.model import num_params
from metalm.storage import absolute
from metalm.train.checkpointer import Checkpointer
from metalm.train.dist import Collectives, Dist
from metalm.train.engine import Engine
from metalm.train.errors import TrainingError
from metalm.train.guards import StepGuards, StopRequest
from metalm.train.interval import Interval, StepTotals
from metalm.train.grad_stats import GradStats
from metalm.train.step import HybridStep
from metalm.train.metrics import MetricsLogger
from metalm.train.module import PretrainModule
from metalm.train.preflight import (RunLock, check_step_memory, checkpoint_bytes, probe_dirs, step_memory_bytes)

PREPARE_WAIT_S = 7 * 24 * 3600.0  # how long the other ranks wait for rank 0 to prepare the shards

# Dense bf16 peak FLOP/s by device name, for MFU. Unknown devices (and CPUs) report no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class Trainer:
    def __init__(self, cfg: Config, dist: Dist):
        from metalm.data import build_loader, ensure_prepared

        self.cfg, self.dist, self.comm = cfg, dist, Collectives(dist)
        self.run_dir, self.remote = run_locations(cfg)  # a URL run_dir: a local directory + uploads to the URL
        self.accum = grad_accum(cfg.train, dist.world_size)
        self.step, self.tokens, self.flops = 0, 0, 0.0
        self.lock = RunLock(self.run_dir)
        self._claim_run_dir()
        try:
            self._build(build_loader, ensure_prepared)
        except BaseException:
            self.lock.release()
            raise

    def _build(self, build_loader, ensure_prepared) -> None:
        cfg, t, d = self.cfg, self.cfg.train, self.dist
        self.manifest = self._prepared_data(ensure_prepared)
        check_validation_split(self.manifest, str(cfg.data.shards), t.val_every, d.world_size)  # before step 1
        self.special = self.manifest["special_ids"]
        torch.manual_seed(t.seed)  # identical initialisation on every rank
        self.module = PretrainModule.from_config(cfg)
        self._check_memory()
        self.engine = Engine(self.module, cfg.optim, t, d)
        torch.manual_seed(t.seed + 1000 + d.rank)  # dropout differs per rank, reproducibly
        record = self.run_dir / "samples" / f"rank_{d.rank:05d}.jsonl" if cfg.data.record_samples else None
        self.loader = build_loader(cfg.data, split="train", seq_len=t.seq_len, micro_batch=t.micro_batch,
                                   seed=t.seed, rank=d.rank, world_size=d.world_size, global_batch=t.global_batch,
                                   record=record)
        self.meta = self._meta_step() if cfg.meta.enabled else None
        self.warned_at: dict[str, int] = {}  # inert-meta warning -> step it was last printed
        self.guards = StepGuards(t, d.world_size)
        self.stop = StopRequest()
        self.stop_agreed = False  # the all-reduced stop flag: identical on every rank
        self.metrics = MetricsLogger(cfg.logging, self.run_dir, d.rank, to_dict(cfg))
        self.checkpointer = Checkpointer(
            cfg.checkpoint, self.run_dir / "checkpoints", self.comm, self.engine, dataloader=self.loader,
            config_yaml=to_yaml(cfg), tokenizer_json=self.loader.tokenizer_path, remote=self.remote,
            last_step=min(t.max_steps, t.stop_at) if t.stop_at else t.max_steps,
            estimate_bytes=checkpoint_bytes(sum(p.numel() for p in self.module.parameters()), t.precision,
                                            t.zero_stage),
            log=self.metrics.log)
        self.checkpointer.prepare()
        self._resume()
        self.metrics.begin(self.step)
        self.peak = peak_flops(d.device)
        self.hybrid = HybridStep(cfg, self.engine, self.comm, self.meta, self.accum, before_update=self._before_update,
                                 on_record=self.metrics.log, on_microbatch=self._heartbeat,
                                 on_gradients=GradStats(t.grad_stats_every, self.engine, d.rank, self.metrics.log))
        self.first_step = self.step  # the first step this process runs: its first micro-batch shows the pace
        self.last_beat = self.step_started = 0.0
        self._announce()

    # ----------------------------------------------------------------------------------------- set-up

    def _claim_run_dir(self) -> None:
        """Collective: every rank can write the run and checkpoint directories, and rank 0 holds the run lock."""
        err = None
        try:
            probe_dirs(self.run_dir, self.run_dir / "checkpoints", f"rank{self.dist.rank}")
            if self.dist.rank == 0:
                self.lock.acquire()
        except TrainingError as e:
            err = str(e)
        self.comm.raise_agreed(err, TrainingError)

    def _prepared_data(self, ensure_prepared) -> dict:
        """The shards' manifest; rank 0 prepares them first when allowed, the others wait for it."""
        t = self.cfg.train

        def prepare() -> dict:
            return ensure_prepared(self.cfg.data, seq_len=t.seq_len, vocab_size=self.cfg.model.vocab_size,
                                   seed=t.seed, progress=self.cfg.logging.progress)

        manifest = prepare() if self.dist.rank == 0 else None
        self.comm.wait_for(PREPARE_WAIT_S)  # a first preparation can outlast train.collective_timeout
        return manifest if manifest is not None else prepare()

    def _check_memory(self) -> None:
        t, m = self.cfg.train, self.cfg.model
        if not t.check_memory:
            return
        parts = step_memory_bytes(sum(p.numel() for p in self.module.parameters()), d_model=m.d_model,
                                  n_layers=m.n_layers, ffn_hidden=m.ffn_hidden, vocab_size=m.vocab_size,
                                  micro_batch=t.micro_batch, seq_len=t.seq_len, precision=t.precision,
                                  zero_stage=t.zero_stage, world_size=self.dist.world_size,
                                  fused_linear_ce=m.fused_linear_ce)
        err, warnings = None, []
        try:
            warnings = check_step_memory(parts, self.dist.device.type, self.accum)
        except TrainingError as e:
            err = str(e)
        self.comm.raise_agreed(err, TrainingError)
        if self.dist.rank == 0:
            for w in warnings:
                warn(w)

    def _resume(self) -> None:
        t = self.cfg.train
        now = {"world_size": self.dist.world_size, "global_batch": t.global_batch, "micro_batch": t.micro_batch,
               "seq_len": t.seq_len, "tokenizer_hash": self.manifest.get("tokenizer_hash"), "zero_stage": t.zero_stage}
        state = self.checkpointer.resume(now)
        if state is not None:
            self.step, self.tokens, self.flops = state.step, state.tokens, state.flops
            self.guards.load_state_dict(state.guards)

    def _meta_step(self) -> MetaStep:
        """The meta step, with the word-start classes of the shards' tokenizer for meta.classes=word_start."""
        allowed = None
        if self.cfg.meta.classes == "word_start":
            from metalm.data import load_tokenizer

            tok = load_tokenizer(str(self.loader.tokenizer_path))
            allowed = word_start_ids(tok, self.loader.vocab_size)
        return MetaStep(self.cfg.meta, self.cfg.train.seed, self.special, self.loader.vocab_size, allowed)

    def _announce(self) -> None:
        cfg, d = self.cfg, self.dist
        if d.rank != 0:
            return
        head = self.module.head
        # ZeRO-3 leaves partitions in the module: ds_numel is a parameter's full size
        extra = sum(getattr(p, "ds_numel", p.numel()) for p in head.parameters()) if head is not None else 0
        meta = f"on (ratio {cfg.meta.hybrid_ratio:.2f}, {cfg.meta.sampler})" if cfg.meta.enabled else "off"
        print(f"metalm: model {num_params(cfg.model) / 1e6:.2f}M parameters (+{extra / 1e6:.2f}M meta head), "
              f"{d.world_size} process(es) on {d.device.type}, ZeRO-{cfg.train.zero_stage}, {cfg.train.precision}, "
              f"global batch {cfg.train.global_batch} x {cfg.train.seq_len} (micro {cfg.train.micro_batch} x accum "
              f"{self.accum} x world {d.world_size}), meta {meta}", flush=True)

    def trainer_state(self) -> TrainerState:
        t = self.cfg.train
        return TrainerState(step=self.step, tokens=self.tokens, flops=self.flops, world_size=self.dist.world_size,
                            global_batch=t.global_batch, micro_batch=t.micro_batch, seq_len=t.seq_len,
                            grad_accum=self.accum, tokenizer_hash=self.manifest.get("tokenizer_hash"),
                            special_ids=dict(self.special), data_shards=absolute(self.cfg.data.shards),
                            guards=self.guards.state_dict())

    # ---------------------------------------------------------------------------------------- one step

    def train_step(self) -> StepTotals:
        """One optimizer step (the hybrid step), counted."""
        out = self.hybrid(self.batches, self.step)
        self.step += 1
        self.tokens += out.tokens
        self.flops += out.flops
        self.interval.add(out.totals, skipped=out.skipped, applied=out.applied)
        return out.totals

    def _heartbeat(self, step: int, micro: int, seconds: float) -> None:
        """Rank 0, after each micro-batch: a line after the first micro-batch this process runs (a slow
        configuration shows its pace at once), then every 30 s inside a step that has run for 30 s or more, with
        the estimated time per step and to the end of the run."""
        if self.dist.rank != 0 or not self.cfg.logging.progress:
            return
        now = time.time()
        if micro == 0:
            self.step_started = now - seconds
        first = step == self.first_step and micro == 0
        if not first and (now - self.step_started < 30.0 or now - self.last_beat < 30.0):
            return
        self.last_beat = now
        per_step = (now - self.step_started) / (micro + 1) * self.accum
        left = self.cfg.train.max_steps - step
        print(f"metalm: step {step + 1}: micro-batch {micro + 1}/{self.accum} after {hms(now - self.step_started)}; "
              f"about {hms(per_step)} per step, {hms(per_step * left)} for the {left} steps left", flush=True)

    def _before_update(self, step: int, totals: StepTotals) -> bool:
        """Collective, once per optimizer step: True when its update is to be skipped. One all-reduce carries how
        many ranks saw a non-finite loss, the step's loss sums and the stop flag."""
        world = self.dist.world_size
        bad, ar_sum, meta_sum, stops = self.comm.reduce([(totals.nonfinite > 0).float(), totals.sums["ar_loss"],
                                                         totals.sums["meta_loss"], float(self.stop.requested)])
        if stops > 0:
            self.stop_agreed = True
            self.stop.signame = self.stop.signame or "a signal (to another rank)"
        means = {"ar": ar_sum / (totals.ar_n * world) if totals.ar_n else None,
                 "meta": meta_sum / (totals.meta_n * world) if totals.meta_n else None}
        skip, warnings, spikes = self.guards.before_update(step, int(bad), means)
        for rec in spikes:
            self.metrics.log(rec)
        if self.dist.rank == 0:
            for w in warnings:
                warn(w)
        return skip

    def _new_interval(self) -> None:
        self.interval = Interval(self.dist.device, self.step, self.tokens, self.flops)

    def _report(self) -> None:
        target = self.hybrid.ratio_target(self.step) if self.hybrid.budgeted else None
        rec = self.interval.record(self.comm, self.step, self.tokens, self.flops, self.engine.lr, self.peak, target)
        self.metrics.log(rec)
        self.metrics.progress(self.step, self.cfg.train.max_steps, rec)
        self._new_interval()
        if self.meta is not None and self.dist.rank == 0:
            for kind, w in inert_warnings(rec, self.cfg.meta.n_way):
                if self.step - self.warned_at.get(kind, -10**9) >= 100:  # at most once per 100 steps each
                    self.warned_at[kind] = self.step
                    warn(w)

    def validate(self) -> float:
        """Collective: val_loss over the first train.val_batches batches of each rank's validation stream, with the
        evaluator's definition (metalm.eval.valloss): the token-weighted mean next-token cross-entropy over every
        target token read, on all ranks together (a short last batch weighs by its tokens, not as a whole batch)."""
        from metalm.data import build_loader

        t = self.cfg.train
        loader = build_loader(self.cfg.data, split="val", seq_len=t.seq_len, micro_batch=t.micro_batch,
                              seed=t.seed, rank=self.dist.rank, world_size=self.dist.world_size)
        total, count = torch.zeros((), device=self.dist.device), 0
        with self.engine.evaluating():
            for i, batch in enumerate(loader):
                if i >= t.val_batches:
                    break
                losses, _ = self.engine(batch.to(self.dist.device))
                targets = batch.shape[0] * (batch.shape[1] - 1)  # the AR loss is the mean over these
                total += losses["ar"].detach().float() * targets
                count += targets
        total, count = self.comm.reduce([total, count])
        val = total / max(count, 1)
        self.metrics.log({"step": self.step, "tokens": self.tokens, "flops": self.flops, "val_loss": val})
        if self.dist.rank == 0:
            print(f"metalm: step {self.step} val_loss {val:.4f}", flush=True)
        return val

    # --------------------------------------------------------------------------------------------- run

    def start(self) -> None:
        """Ready to step: the stop-signal handlers (checkpoint.save_on_signal), the batch iterator, the first
        metrics interval. `run()` calls it; so does anything that drives `train_step()` itself (benchmarks)."""
        if self.cfg.checkpoint.save_on_signal:
            self.stop.install()
        self.batches = iter(self.loader)
        self._new_interval()

    def close(self) -> None:
        """The metrics files flushed and closed, the run directory's lock released."""
        self.metrics.close()
        self.lock.release()

    def run(self) -> int:
        t = self.cfg.train
        self.start()
        try:
            while self.step < t.max_steps:
                self.train_step()
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    self._report()
                if t.val_every and self.step % t.val_every == 0:
                    self.validate()
                at_stop = bool(t.stop_at) and t.stop_at <= self.step < t.max_steps
                stopping = self.stop_agreed or at_stop  # identical on every rank (stop_agreed is all-reduced)
                self.checkpointer.after_step(self.step, stopping, self.trainer_state)
                if stopping:
                    self._say_stopped(at_stop)
                    return 0
            self.checkpointer.at_end(self.step, self.trainer_state)
            self._say_done()
            return 0
        finally:
            self.close()

    def _say_stopped(self, at_stop: bool) -> None:
        if self.dist.rank == 0:
            by = f"train.stop_at={self.cfg.train.stop_at}" if at_stop and not self.stop_agreed \
                else (self.stop.signame or "a signal")
            print(f"metalm: stopped by {by} at step {self.step}; checkpoint saved; rerun the same command to "
                  f"resume", flush=True)

    def _say_done(self) -> None:
        if self.dist.rank == 0:
            latest = self.checkpointer.latest()
            print(f"metalm: done, {self.step} steps, {self.tokens:,} tokens\n"
                  f"  run directory: {self.run_dir.resolve()}\n"
                  f"  checkpoints:   {self.checkpointer.root.resolve()} (latest: {latest.name if latest else None})\n"
                  f"  metrics:       {(self.run_dir / 'metrics.jsonl').resolve()}", flush=True)
