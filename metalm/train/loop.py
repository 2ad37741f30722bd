"""The hybrid AR / meta training loop.

Each optimizer step runs `grad_accum` micro-batches; a seeded, stateless schedule (identical on every
rank) decides whether a micro-batch is an AR step or a FOMAML meta step. Losses are accumulated on the
device; once per optimizer step, before the update, one small all-reduce tells every rank whether any rank
saw a non-finite loss (the update is then skipped or the run stopped, on all ranks alike), whether a stop
signal arrived anywhere, and the step's mean losses for loss-spike detection. The per-interval metrics are
reduced only every `log_every` steps.

Failures are collective decisions too: a checkpoint save that fails on any rank is discarded on every rank
(`latest` keeps naming the previous complete checkpoint), and then retried at the next interval, up to
checkpoint.max_failed_saves consecutive failures, after which the run stops with exit status 1.
"""
from __future__ import annotations

import logging
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as tdist

from metalm.config import Config, grad_accum
from metalm.model import flops_per_token, num_params
from metalm.train import checkpoint as ckpt
from metalm.train.engine import Dist, build_engine
from metalm.train.guards import (NonFiniteGuard, SpikeDetector, StopRequest, TrainingError, check_free_space,
                                 checkpoint_bytes, probe_dirs, update_suppressed)
from metalm.train.metrics import MetricsLogger
from metalm.train.module import PretrainModule
from metalm.train.saving import CheckpointSaving

log = logging.getLogger("metalm.loop")

# Dense bf16 peak FLOP/s by device name, for MFU. Unknown devices (and CPUs) report no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}

STAT_KEYS = ("support_acc_before", "support_acc_after", "query_acc", "inner_grad_norm")


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def meta_head_flops(cfg: Config) -> float:
    """FLOPs of one episode's head work on one rank: T inner SGD steps over the support positions plus the
    query forward/backward, each 6 x (active head params) per position; the output layer is N rows."""
    m, B = cfg.meta, cfg.train.micro_batch
    dims = [cfg.model.d_model] + [m.head.hidden] * (m.head.layers - 1)
    active = sum(a * b for a, b in zip(dims[:-1], dims[1:])) + dims[-1] * m.n_way
    n_support = m.n_way * m.k_shot if m.sampler == "smlmt" else B * m.k_shot
    n_query = m.n_way * m.q_queries if m.sampler == "smlmt" else B
    return 6.0 * active * (m.inner_steps * n_support + n_query)


class Trainer(CheckpointSaving):
    def __init__(self, cfg: Config, dist: Dist):
        self.cfg, self.dist = cfg, dist
        self.run_dir = Path(cfg.train.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.accum = grad_accum(cfg, dist.world_size)
        self.step = 0
        self.tokens = 0
        self.flops = 0.0
        self.stop = StopRequest()
        self.stop_agreed = False  # the all-reduced stop flag: identical on every rank
        t = cfg.train
        self.nonfinite = NonFiniteGuard(t.nonfinite_policy, t.max_nonfinite_in_row)
        self.spikes = SpikeDetector(t.spike_window, t.spike_sigma)
        self.failed_saves = 0
        self.ckpt_bytes: Optional[int] = None  # size of the last checkpoint written (free-space check)

    # ----------------------------------------------------------------- set-up
    def setup(self) -> None:
        from metalm.data import build_loader, ensure_prepared

        cfg, d = self.cfg, self.dist
        # Before any work: every rank can write the run and checkpoint directories (all ranks agree).
        err = None
        try:
            probe_dirs(self.run_dir, self.ckpt_root, f"rank{d.rank}")
        except TrainingError as e:
            err = str(e)
        self._raise_agreed(err, TrainingError)
        if d.rank == 0:
            ckpt.clean_stale_tmp(self.ckpt_root)
            self.manifest = ensure_prepared(cfg)
        tdist.barrier()
        if d.rank != 0:
            self.manifest = ensure_prepared(cfg)
        torch.manual_seed(cfg.train.seed)  # identical initialisation on every rank
        self.module = PretrainModule(cfg)
        self.ckpt_estimate = checkpoint_bytes(sum(p.numel() for p in self.module.parameters()), cfg.train.precision,
                                              cfg.train.zero_stage)
        err = None
        if d.rank == 0 and cfg.checkpoint.check_free_space:  # the checkpoint directory is shared by the ranks
            try:
                for warning in check_free_space(self.ckpt_root, self.ckpt_estimate, cfg.checkpoint.keep_last_k):
                    print(f"metalm: warning: {warning}", file=sys.stderr, flush=True)
            except TrainingError as e:
                err = str(e)
        self._raise_agreed(err, TrainingError)
        self.engine = build_engine(cfg, self.module, d)
        torch.manual_seed(cfg.train.seed + 1000 + d.rank)  # dropout differs per rank, reproducibly
        self.loader = build_loader(cfg, split="train", rank=d.rank, world_size=d.world_size)
        self.special = self.manifest["special_ids"]
        self.schedule = None
        if cfg.meta.enabled:
            from metalm.meta.schedule import MetaSchedule

            self.schedule = MetaSchedule(cfg.train.seed, cfg.meta.hybrid_ratio, cfg.meta.branch)
        self._resume()
        self.metrics = MetricsLogger(cfg, self.run_dir, d.rank, resumed_step=self.step)
        self.peak = peak_flops(d.device)
        self.tok_per_micro = cfg.train.micro_batch * cfg.train.seq_len * d.world_size
        self.fpt = flops_per_token(cfg.model, cfg.train.seq_len)
        body = flops_per_token(cfg.model, cfg.train.seq_len, lm_head=False, backward=False) \
            + flops_per_token(cfg.model, cfg.train.seq_len, lm_head=False)
        self.meta_flops = body * self.tok_per_micro + meta_head_flops(cfg) * d.world_size
        if d.rank == 0:
            n = num_params(cfg.model)
            extra = sum(p.numel() for p in self.module.head.parameters()) if self.module.head is not None else 0
            print(f"metalm: model {n / 1e6:.2f}M parameters (+{extra / 1e6:.2f}M meta head), "
                  f"{d.world_size} process(es) on {d.device.type}, ZeRO-{cfg.train.zero_stage}, "
                  f"{cfg.train.precision}, global batch {cfg.train.global_batch} x {cfg.train.seq_len} "
                  f"(micro {cfg.train.micro_batch} x accum {self.accum} x world {d.world_size}), "
                  f"meta {'on (ratio %.2f, %s)' % (cfg.meta.hybrid_ratio, cfg.meta.sampler) if cfg.meta.enabled else 'off'}",
                  flush=True)

    def _resume(self) -> None:
        """Rank 0 picks (and verifies) the checkpoint and checks that this run can continue it; every rank
        then loads it. Any problem is a CheckpointError on every rank."""
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            return
        choice, err = None, None
        if self.dist.rank == 0:
            try:
                choice = self._pick_checkpoint(mode)
            except ckpt.CheckpointError as e:
                err = str(e)
        if self.dist.world_size > 1:
            box = [choice, err]
            tdist.broadcast_object_list(box, src=0)
            choice, err = box
        if err:
            raise ckpt.CheckpointError(err)
        if choice is None:
            return
        path = Path(choice)
        state = ckpt.read_state(path)
        with ckpt.safe_deepspeed_load(self.engine):
            load_path, _ = self.engine.load_checkpoint(str(path), tag="ds", load_optimizer_states=True,
                                                       load_lr_scheduler_states=True)
        if load_path is None:
            raise ckpt.CheckpointError(f"DeepSpeed could not load {path}/ds")
        rank_state = ckpt.load_rank_state(path, self.dist.rank)
        self.loader.load_state_dict(rank_state["data"])
        ckpt.set_rng_state(rank_state["rng"])
        self.step, self.tokens, self.flops = state["step"], state["tokens"], state.get("flops", 0.0)
        guards = state.get("guards", {})
        self.nonfinite.load_state_dict(guards.get("nonfinite", {}))
        self.spikes.load_state_dict(guards.get("spikes", {}))
        if self.dist.rank == 0:
            print(f"metalm: resumed from {path} at step {self.step}", flush=True)

    def _pick_checkpoint(self, mode: str) -> Optional[str]:
        verify = self.cfg.checkpoint.checksums
        if mode == "auto":
            path = ckpt.find_latest(self.ckpt_root, verify=verify)
            if path is None:
                return None
        else:
            path = Path(mode)
            problem = ckpt.checkpoint_problem(path, checksums=verify) if path.is_dir() else "no such directory"
            if problem:
                raise ckpt.CheckpointError(f"checkpoint.resume={mode}: {path} is not a complete checkpoint: "
                                           f"{problem}")
        t = self.cfg.train
        now = {"world_size": self.dist.world_size, "global_batch": t.global_batch, "micro_batch": t.micro_batch,
               "seq_len": t.seq_len, "tokenizer_hash": self.manifest.get("tokenizer_hash")}
        mismatch = ckpt.resume_mismatch(ckpt.read_state(path), now)
        if mismatch:
            raise ckpt.CheckpointError(f"cannot resume from {path}: {mismatch}")
        return str(path)

    # ------------------------------------------------------------ collectives
    def reduce(self, values: list, op=tdist.ReduceOp.SUM) -> list[float]:
        """All-reduce numbers and 0-d tensors across ranks as one device tensor (the backend's device: NCCL
        reduces no CPU tensors); returns Python floats (one host sync)."""
        dev = self.dist.device
        t = torch.stack([v.detach().float().reshape(()).to(dev) if torch.is_tensor(v)
                         else torch.tensor(float(v), device=dev) for v in values])
        if self.dist.world_size > 1:
            tdist.all_reduce(t, op=op)
        return t.tolist()

    def _raise_agreed(self, msg: Optional[str], error: Callable[[str], Exception]) -> None:
        """Collective: if any rank has an error message, raise `error` with the first rank's message on every
        rank (so no rank goes on alone into a collective the others never reach)."""
        msg = self._agreed_message(msg)
        if msg is not None:
            raise error(msg)

    def _agreed_message(self, msg: Optional[str]) -> Optional[str]:
        if self.dist.world_size == 1:
            return msg
        if self.reduce([1.0 if msg else 0.0], tdist.ReduceOp.MAX)[0] == 0:
            return None
        msgs: list = [None] * self.dist.world_size
        tdist.all_gather_object(msgs, msg)
        return next(m for m in msgs if m)

    # ------------------------------------------------------------ one step
    def _episode(self, batch: torch.Tensor, micro: int):
        from metalm.meta.schedule import episode_generator
        from metalm.meta.tasks import EpisodeError, sample_episode

        m = self.cfg.meta
        gen = episode_generator(self.cfg.train.seed, self.step, micro, self.dist.rank)
        exclude = tuple(int(v) for v in self.special.values() if v is not None)
        try:
            ep = sample_episode(batch[:, :-1], n_way=m.n_way, k_shot=m.k_shot, q_queries=m.q_queries,
                                mask_id=int(self.special["mask"]), sampler=m.sampler, generator=gen,
                                min_freq=m.min_token_freq, max_freq=m.max_token_freq, exclude_ids=exclude,
                                vocab_size=self.loader.vocab_size)
            ok = 1.0
        except EpisodeError as e:
            ep, ok = None, 0.0
            log.warning("rank %d step %d: no episode from this batch (%s); all ranks take an AR micro-batch",
                        self.dist.rank, self.step, e)
        # Every rank must take the same branch (ZeRO reduces gradients in lock-step): if any rank could
        # not build an episode, all fall back to an AR micro-batch, and the fallback is counted.
        if self.reduce([ok], tdist.ReduceOp.MIN)[0] < 1:
            return None
        return ep.to(self.dist.device, non_blocking=True)

    def train_step(self) -> None:
        dev = self.dist.device
        z = lambda: torch.zeros((), device=dev)  # noqa: E731
        step_acc = {"ar_loss": z(), "meta_loss": z(), "nonfinite": z(), **{k: z() for k in STAT_KEYS}}
        ar_n = meta_n = fallback = 0
        for micro in range(self.accum):
            batch = next(self.loader_iter)  # on the host: episodes are sampled there, without device syncs
            meta = self.schedule is not None and self.schedule.is_meta(self.step, micro)
            episode = self._episode(batch, micro) if meta else None
            batch = batch.to(dev, non_blocking=True)
            if meta and episode is None:
                fallback += 1
            loss, stats = self.engine(batch, episode=episode)
            self.engine.backward(loss)
            value = loss.detach().float()
            step_acc["nonfinite"] += (~torch.isfinite(value)).float()
            self.tokens += self.tok_per_micro  # tokens drawn from the data stream, whichever branch; flops: their cost
            if episode is None:
                step_acc["ar_loss"] += value
                ar_n += 1
                self.flops += self.fpt * self.tok_per_micro
            else:
                step_acc["meta_loss"] += value
                meta_n += 1
                for k in STAT_KEYS:
                    step_acc[k] += stats[k].detach().float()
                self.flops += self.meta_flops
            if micro < self.accum - 1:
                self.engine.step()  # not a boundary: DeepSpeed only accumulates
        skip = self._check_step(step_acc, ar_n, meta_n)
        # The boundary: DeepSpeed reduces, clips, updates, clears the gradients and advances its counters.
        # On a skipped step it still does all of that except the update (see guards.update_suppressed).
        sched = self.engine.lr_scheduler
        before = sched.last_epoch if sched is not None else None
        with update_suppressed(self.engine.basic_optimizer) if skip else nullcontext():
            self.engine.step()
        if sched is not None and sched.last_epoch == before:
            sched.step()  # DeepSpeed skipped on its own (gradient overflow): the LR stays a function of the step
        if self.cfg.train.zero_stage == 3:
            # ZeRO-3 keeps every parameter's gradient partition in one flat buffer that it overwrites only for
            # parameters that receive a gradient in the first micro-batch of a step. A parameter without one
            # (the meta head in an AR step, the LM head in a meta step) would be updated with its gradient from
            # an earlier step, and a NaN from a skipped step would stay there. Clear it after every update.
            flat = getattr(self.engine.optimizer, "grad_partitions_flat_buffer", None)
            if flat is not None:
                flat.zero_()
        self.step += 1
        self.acc["meta_fallback"] += fallback
        if skip or not self.engine.was_step_applied():
            self.acc["nonfinite_skipped"] += 1
        if not skip:
            for k in ("ar_loss", "meta_loss", *STAT_KEYS):
                self.acc[k] += step_acc[k]
            self.acc["ar_n"] += ar_n
            self.acc["meta_n"] += meta_n

    def _check_step(self, step_acc: dict, ar_n: int, meta_n: int) -> bool:
        """Collective, once per optimizer step before its update: True when the update is to be skipped.

        One all-reduce carries: how many ranks saw a non-finite loss, the step's loss sums, and the stop flag.
        Raises TrainingError (on every rank) when the non-finite policy says stop."""
        d = self.dist
        bad_ranks, ar_sum, meta_sum, stops = self.reduce([(step_acc["nonfinite"] > 0).float(), step_acc["ar_loss"],
                                                          step_acc["meta_loss"], 1.0 if self.stop.requested else 0.0])
        if stops > 0:
            self.stop_agreed = True
            self.stop.signame = self.stop.signame or "a signal (to another rank)"
        step = self.step + 1
        skip = self.nonfinite.check(step, int(bad_ranks), d.world_size)
        if skip:
            if d.rank == 0:
                print(f"metalm: warning: non-finite loss at step {step} on {int(bad_ranks)} rank(s): its update is "
                      f"skipped ({self.nonfinite.in_row} in a row; train.max_nonfinite_in_row="
                      f"{self.nonfinite.max_in_row})", file=sys.stderr, flush=True)
            return True
        for kind, total, n in (("ar", ar_sum, ar_n), ("meta", meta_sum, meta_n)):
            if not n:
                continue
            spike = self.spikes.update(kind, total / (n * d.world_size))
            if spike is not None:
                self.metrics.log({"step": step, **spike})
                if d.rank == 0:
                    print(f"metalm: warning: {kind} loss spike at step {step}: {spike['loss']:.4f}, window mean "
                          f"{spike['window_mean']:.4f} +- {spike['window_std']:.4f}", file=sys.stderr, flush=True)
        return False

    # ----------------------------------------------------------- reporting
    def _reset_acc(self) -> None:
        z = lambda: torch.zeros((), device=self.dist.device)  # noqa: E731
        self.acc = {"ar_loss": z(), "ar_n": 0, "meta_loss": z(), "meta_n": 0, "meta_fallback": 0,
                    "nonfinite_skipped": 0}
        self.acc.update({k: z() for k in STAT_KEYS})

    def _report(self, t_start: float, tokens_start: int, flops_start: float) -> dict:
        a = self.acc
        vals = self.reduce([a["ar_loss"], a["meta_loss"], *[a[k] for k in STAT_KEYS],
                            a["ar_n"], a["meta_n"], a["meta_fallback"]])
        vals, counts = vals[:-3], vals[-3:]
        ar_n, meta_n = counts[0], counts[1]
        elapsed = max(time.time() - t_start, 1e-9)
        tps = (self.tokens - tokens_start) / elapsed
        flops_s = (self.flops - flops_start) / elapsed
        rec = {
            "step": self.step, "tokens": self.tokens, "flops": self.flops,
            "ar_loss": vals[0] / ar_n if ar_n else None,
            "meta_loss": vals[1] / meta_n if meta_n else None,
            "meta_microbatches": int(meta_n), "ar_microbatches": int(ar_n),
            "meta_fallbacks": int(counts[2]), "nonfinite_skipped": a["nonfinite_skipped"],
            "lr": self.engine.get_lr()[0], "tokens_per_s": tps, "time": time.time(),
            "mfu": flops_s / (self.peak * self.dist.world_size) if self.peak else None,
        }
        if meta_n:
            rec.update({f"meta/{k}": v / meta_n for k, v in zip(STAT_KEYS, vals[2:])})
        return rec

    @torch.no_grad()
    def validate(self) -> float:
        from metalm.data import build_loader

        cfg = self.cfg
        loader = build_loader(cfg, split="val", rank=self.dist.rank, world_size=self.dist.world_size)
        self.engine.eval()
        total, n = torch.zeros((), device=self.dist.device), 0
        for i, batch in enumerate(loader):
            if i >= cfg.train.val_batches:
                break
            loss, _ = self.engine(batch.to(self.dist.device))
            total += loss.detach().float()
            n += 1
        self.engine.train()
        total, n = self.reduce([total, n])
        return total / max(n, 1)

    # ---------------------------------------------------------------- run
    def run(self) -> int:
        cfg, d = self.cfg, self.dist
        if cfg.checkpoint.save_on_signal:
            self.stop.install()
        self.loader_iter = iter(self.loader)
        self._reset_acc()
        t0, tok0, fl0 = time.time(), self.tokens, self.flops
        last_saved = self.step
        while self.step < cfg.train.max_steps:
            self.train_step()
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                rec = self._report(t0, tok0, fl0)
                self.metrics.log(rec)
                self.metrics.progress(self.step, cfg.train.max_steps, rec)
                self._reset_acc()
                t0, tok0, fl0 = time.time(), self.tokens, self.flops
            if cfg.train.val_every and self.step % cfg.train.val_every == 0:
                val = self.validate()
                self.metrics.log({"step": self.step, "tokens": self.tokens, "flops": self.flops, "val_loss": val})
                if d.rank == 0:
                    print(f"metalm: step {self.step} val_loss {val:.4f}", flush=True)
            at_stop = bool(cfg.train.stop_at) and cfg.train.stop_at <= self.step < cfg.train.max_steps
            stopping = self.stop_agreed or at_stop  # identical on every rank (stop_agreed is all-reduced)
            if self.step % cfg.checkpoint.every == 0 or (stopping and last_saved != self.step):
                if self._save(final=stopping):
                    last_saved = self.step
            if stopping:
                if d.rank == 0:
                    by = f"train.stop_at={cfg.train.stop_at}" if at_stop and not self.stop_agreed \
                        else (self.stop.signame or "a signal")
                    print(f"metalm: stopped by {by} at step {self.step}; checkpoint saved; rerun the same command "
                          f"to resume", flush=True)
                self.metrics.close()
                return 0
        if last_saved != self.step:
            self._save(final=True)
        self.metrics.close()
        if d.rank == 0:
            latest = ckpt.find_latest(self.ckpt_root)
            print(f"metalm: done, {self.step} steps, {self.tokens:,} tokens\n"
                  f"  run directory: {self.run_dir.resolve()}\n"
                  f"  checkpoints:   {self.ckpt_root.resolve()} (latest: {latest.name if latest else None})\n"
                  f"  metrics:       {(self.run_dir / 'metrics.jsonl').resolve()}", flush=True)
        return 0
