"""The hybrid AR / meta training loop.

`Trainer(cfg, dist)` builds the run's components from their config sections; `run()` is the loop. Each
optimizer step runs `grad_accum` micro-batches; the meta step's seeded schedule (identical on every rank)
decides whether a micro-batch is an AR step or a FOMAML meta step. Losses are summed on the device; once per
optimizer step, before the update, one small all-reduce tells every rank whether any rank saw a non-finite
loss (the guards then skip the update or stop the run, on all ranks alike), whether a stop signal arrived
anywhere, and the step's mean losses for loss-spike detection. Metrics are reduced every `log_every` steps.
"""
from __future__ import annotations

import sys

import torch

from metalm.checkpoint import TrainerState
from metalm.config import Config, deepspeed_config, grad_accum, run_locations, to_dict, to_yaml
from metalm.meta.step import MetaStep, backbone_tokens, gradient_diagnostics, head_flops, inert_warnings, word_start_ids
from metalm.model import flops_per_token, num_params
from metalm.storage import absolute
from metalm.train.checkpointer import Checkpointer
from metalm.train.dist import Collectives, Dist
from metalm.train.engine import Engine
from metalm.train.errors import TrainingError
from metalm.train.guards import StepGuards, StopRequest
from metalm.train.interval import Interval, StepTotals
from metalm.train.metrics import MetricsLogger
from metalm.train.module import PretrainModule
from metalm.train.preflight import (RunLock, check_step_memory, checkpoint_bytes, probe_dirs, step_memory_bytes)

# Dense bf16 peak FLOP/s by device name, for MFU. Unknown devices (and CPUs) report no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def _warn(text: str) -> None:
    print(f"metalm: warning: {text}", file=sys.stderr, flush=True)


class Trainer:
    def __init__(self, cfg: Config, dist: Dist):
        from metalm.data import build_loader, ensure_prepared

        t, d = cfg.train, dist
        self.cfg, self.dist, self.comm = cfg, dist, Collectives(dist)
        self.run_dir, self.remote = run_locations(cfg)  # a URL run_dir: a local directory + uploads to the URL
        self.accum = grad_accum(cfg, dist.world_size)
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
        self.special = self.manifest["special_ids"]
        torch.manual_seed(t.seed)  # identical initialisation on every rank
        self.module = PretrainModule(cfg)
        self._check_memory()
        self.engine = Engine(self.module, cfg.optim, t, deepspeed_config(cfg, d.world_size), d)
        torch.manual_seed(t.seed + 1000 + d.rank)  # dropout differs per rank, reproducibly
        self.loader = build_loader(cfg.data, split="train", seq_len=t.seq_len, micro_batch=t.micro_batch,
                                   seed=t.seed, rank=d.rank, world_size=d.world_size)
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
        self.tok_per_micro = t.micro_batch * t.seq_len * d.world_size
        self.ar_flops = flops_per_token(cfg.model, t.seq_len) * self.tok_per_micro
        self.meta_flops = self._meta_flops()
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
        self.comm.barrier()
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
                _warn(w)

    def _resume(self) -> None:
        t = self.cfg.train
        now = {"world_size": self.dist.world_size, "global_batch": t.global_batch, "micro_batch": t.micro_batch,
               "seq_len": t.seq_len, "tokenizer_hash": self.manifest.get("tokenizer_hash")}
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

    def _meta_flops(self) -> float:
        """FLOPs of one meta micro-batch over all ranks: the backbone's support forward (no backward) and query
        forward + backward on the episode's tokens, the head's inner and outer loop, and with meta.objective=add
        the AR step as well."""
        cfg, t, world = self.cfg, self.cfg.train, self.dist.world_size
        seq = t.seq_len if cfg.meta.readout == "mask" else min(cfg.meta.window, t.seq_len)
        s_tok, q_tok = backbone_tokens(cfg.meta, t.micro_batch, t.seq_len)
        body = flops_per_token(cfg.model, seq, lm_head=False, backward=False) * s_tok \
            + flops_per_token(cfg.model, seq, lm_head=False) * q_tok
        total = (body + head_flops(cfg.meta, cfg.model.d_model, t.micro_batch)) * world
        return total + (self.ar_flops if cfg.meta.objective == "add" else 0.0)

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

    def _episode(self, batch: torch.Tensor, micro: int):
        """This micro-batch's episode, or None when any rank could not build one: every rank must take the same
        branch (ZeRO reduces gradients in lock-step), so then all fall back to an AR micro-batch."""
        ep = self.meta.episode(batch, self.step, micro, self.dist.rank)
        if not self.comm.all_true(ep is not None):
            return None
        return ep.to(self.dist.device, non_blocking=True)

    def train_step(self) -> StepTotals:
        """One optimizer step: its micro-batches, the guards' verdict, the update."""
        totals = StepTotals(self.dist.device)
        for micro in range(self.accum):
            batch = next(self.batches)  # on the host: episodes are sampled there, without device syncs
            meta = self.meta is not None and self.meta.is_meta(self.step, micro)
            episode = self._episode(batch, micro) if meta else None
            totals.fallback += int(meta and episode is None)
            batch = batch.to(self.dist.device, non_blocking=True)
            if episode is not None and micro == 0 and self.meta.diagnose(self.step + 1):
                self._diagnose(batch, episode)
            loss, stats = self.engine(batch, episode=episode)
            self.engine.backward(loss)
            totals.add(loss, stats, meta=episode is not None)
            self.tokens += self.tok_per_micro  # tokens drawn from the data stream, whichever branch
            self.flops += self.meta_flops if episode is not None else self.ar_flops
        skip = self._before_update(totals)
        applied = self.engine.step(skip)
        self.step += 1
        self.interval.add(totals, skipped=skip, applied=applied)
        return totals

    def _diagnose(self, batch: torch.Tensor, episode) -> None:
        """Rank 0: the meta vs AR gradient diagnostics on this micro-batch, logged with the step. The RNG state
        is restored afterwards, so the diagnostics change nothing in training. (Not under ZeRO-3, whose
        parameters are partitions.)"""
        if self.dist.rank != 0 or self.cfg.train.zero_stage == 3:
            return
        devices = [self.dist.device] if self.dist.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            diag = gradient_diagnostics(self.engine.module, batch, episode, self.meta.mask_id)
        self.metrics.log({"step": self.step + 1, **diag})

    def _before_update(self, totals: StepTotals) -> bool:
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
        skip, warnings, spikes = self.guards.before_update(self.step + 1, int(bad), means)
        for rec in spikes:
            self.metrics.log(rec)
        if self.dist.rank == 0:
            for w in warnings:
                _warn(w)
        return skip

    def _new_interval(self) -> None:
        self.interval = Interval(self.dist.device, self.step, self.tokens, self.flops)

    def _report(self) -> None:
        rec = self.interval.record(self.comm, self.step, self.tokens, self.flops, self.engine.lr, self.peak)
        self.metrics.log(rec)
        self.metrics.progress(self.step, self.cfg.train.max_steps, rec)
        self._new_interval()
        if self.meta is not None and self.dist.rank == 0:
            for kind, w in inert_warnings(rec, self.cfg.meta.n_way):
                if self.step - self.warned_at.get(kind, -10**9) >= 100:  # at most once per 100 steps each
                    self.warned_at[kind] = self.step
                    _warn(w)

    def validate(self) -> float:
        """Collective: the mean AR loss over train.val_batches batches of the validation split."""
        from metalm.data import build_loader

        t = self.cfg.train
        loader = build_loader(self.cfg.data, split="val", seq_len=t.seq_len, micro_batch=t.micro_batch,
                              seed=t.seed, rank=self.dist.rank, world_size=self.dist.world_size)
        total, n = torch.zeros((), device=self.dist.device), 0
        with self.engine.evaluating():
            for i, batch in enumerate(loader):
                if i >= t.val_batches:
                    break
                loss, _ = self.engine(batch.to(self.dist.device))
                total += loss.detach().float()
                n += 1
        total, n = self.comm.reduce([total, n])
        val = total / max(n, 1)
        self.metrics.log({"step": self.step, "tokens": self.tokens, "flops": self.flops, "val_loss": val})
        if self.dist.rank == 0:
            print(f"metalm: step {self.step} val_loss {val:.4f}", flush=True)
        return val

    # --------------------------------------------------------------------------------------------- run

    def run(self) -> int:
        t, ck = self.cfg.train, self.cfg.checkpoint
        if ck.save_on_signal:
            self.stop.install()
        self.batches = iter(self.loader)
        self._new_interval()
        last_saved = self.step
        try:
            while self.step < t.max_steps:
                self.train_step()
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    self._report()
                if t.val_every and self.step % t.val_every == 0:
                    self.validate()
                at_stop = bool(t.stop_at) and t.stop_at <= self.step < t.max_steps
                stopping = self.stop_agreed or at_stop  # identical on every rank (stop_agreed is all-reduced)
                if self.step % ck.every == 0 or (stopping and last_saved != self.step):
                    if self.checkpointer.save(self.trainer_state(), final=stopping):
                        last_saved = self.step
                if stopping:
                    self._say_stopped(at_stop)
                    return 0
            if last_saved != self.step:
                self.checkpointer.save(self.trainer_state(), final=True)
            self._say_done()
            return 0
        finally:
            self.metrics.close()
            self.lock.release()

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
