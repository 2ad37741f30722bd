"""The hybrid AR / meta training loop.

Each optimizer step runs `grad_accum` micro-batches; a seeded, stateless schedule (identical on every
rank) decides whether a micro-batch is an AR step or a FOMAML meta step. Losses are accumulated on the
device and reduced across ranks only every `log_every` steps, so the hot loop never waits on the host.
"""
from __future__ import annotations

import json
import logging
import shutil
import signal
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as tdist

from metalm.config import Config, grad_accum, to_yaml
from metalm.model import flops_per_token, num_params
from metalm.train import checkpoint as ckpt
from metalm.train.engine import Dist, build_engine
from metalm.train.metrics import MetricsLogger
from metalm.train.module import PretrainModule

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


class StopRequest:
    """SIGTERM/SIGINT: finish the current step, checkpoint, exit. A second signal exits at once."""

    def __init__(self) -> None:
        self.requested = False
        self.signame = ""

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            import os

            print(f"metalm: second {signal.Signals(signum).name}: exiting now; the last complete checkpoint "
                  "is intact", flush=True)
            os._exit(128 + signum)
        self.requested = True
        self.signame = signal.Signals(signum).name
        print(f"metalm: {self.signame} received: checkpointing at the end of this step, then exiting "
              "(send it again to exit immediately)", flush=True)


class Trainer:
    def __init__(self, cfg: Config, dist: Dist):
        self.cfg, self.dist = cfg, dist
        self.run_dir = Path(cfg.train.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.accum = grad_accum(cfg, dist.world_size)
        self.step = 0
        self.tokens = 0
        self.flops = 0.0
        self.stop = StopRequest()

    # ----------------------------------------------------------------- set-up
    def setup(self) -> None:
        from metalm.data import build_loader, ensure_prepared

        cfg, d = self.cfg, self.dist
        if d.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.clean_stale_tmp(self.ckpt_root)
            self.manifest = ensure_prepared(cfg)
        tdist.barrier()
        if d.rank != 0:
            self.manifest = ensure_prepared(cfg)
        torch.manual_seed(cfg.train.seed)  # identical initialisation on every rank
        self.module = PretrainModule(cfg)
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
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            return
        path = Path(mode) if mode != "auto" else ckpt.find_latest(self.ckpt_root)
        if path is None:
            return
        if not ckpt.is_complete(path):
            raise ckpt.CheckpointError(f"checkpoint.resume={mode}: {path} is not a complete checkpoint")
        state = ckpt.read_state(path)
        t = self.cfg.train
        saved = (state.get("world_size"), state.get("global_batch"), state.get("micro_batch"), state.get("seq_len"))
        now = (self.dist.world_size, t.global_batch, t.micro_batch, t.seq_len)
        if saved != now:
            raise ckpt.CheckpointError(
                f"cannot resume from {path}: it was written with world_size, global_batch, micro_batch, seq_len = "
                f"{saved}, this run has {now}; start a new train.run_dir or match the original geometry")
        load_path, _ = self.engine.load_checkpoint(str(path), tag="ds", load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise ckpt.CheckpointError(f"DeepSpeed could not load {path}/ds")
        rank_state = ckpt.load_rank_state(path, self.dist.rank)
        self.loader.load_state_dict(rank_state["data"])
        ckpt.set_rng_state(rank_state["rng"])
        self.step, self.tokens, self.flops = state["step"], state["tokens"], state.get("flops", 0.0)
        if self.dist.rank == 0:
            print(f"metalm: resumed from {path} at step {self.step}", flush=True)

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
        for micro in range(self.accum):
            batch = next(self.loader_iter)  # on the host: episodes are sampled there, without device syncs
            meta = self.schedule is not None and self.schedule.is_meta(self.step, micro)
            episode = self._episode(batch, micro) if meta else None
            batch = batch.to(dev, non_blocking=True)
            if meta and episode is None:
                self.acc["meta_fallback"] += 1
            loss, stats = self.engine(batch, episode=episode)
            self.engine.backward(loss)
            self.engine.step()
            if episode is None:
                self.acc["ar_loss"] += loss.detach().float()
                self.acc["ar_n"] += 1
                self.tokens += self.tok_per_micro
                self.flops += self.fpt * self.tok_per_micro
            else:
                self.acc["meta_loss"] += loss.detach().float()
                self.acc["meta_n"] += 1
                for k in STAT_KEYS:
                    self.acc[k] += stats[k].detach().float()
                # `tokens` counts tokens drawn from the data stream; `flops` the compute they cost
                self.tokens += self.tok_per_micro
                self.flops += self.meta_flops
        self.step += 1

    # ----------------------------------------------------------- reporting
    def _reset_acc(self) -> None:
        z = lambda: torch.zeros((), device=self.dist.device)  # noqa: E731
        self.acc = {"ar_loss": z(), "ar_n": 0, "meta_loss": z(), "meta_n": 0, "meta_fallback": 0}
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
            "meta_fallbacks": int(counts[2]),
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

    # --------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        cfg, d = self.cfg, self.dist
        name = ckpt.step_dir_name(self.step)
        tmp = self.ckpt_root / f".tmp-{name}"
        if d.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        tdist.barrier()
        self.engine.save_checkpoint(str(tmp), tag="ds", client_state={"step": self.step}, save_latest=False)
        ckpt.save_rank_state(tmp, d.rank, self.loader.state_dict())
        if cfg.checkpoint.export_weights:
            self._export_weights(tmp)
        if d.rank == 0:
            (tmp / "config.yaml").write_text(to_yaml(cfg))
            state = {"step": self.step, "tokens": self.tokens, "flops": self.flops, "world_size": d.world_size,
                     "global_batch": cfg.train.global_batch, "micro_batch": cfg.train.micro_batch,
                     "seq_len": cfg.train.seq_len, "grad_accum": self.accum,
                     "tokenizer_hash": self.manifest.get("tokenizer_hash")}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
            tok = Path(cfg.data.shards) / "tokenizer.json"
            if tok.is_file():
                shutil.copyfile(tok, tmp / "tokenizer.json")
        tdist.barrier()
        final = self.ckpt_root / name
        if d.rank == 0:
            ckpt.finalize(tmp, final, self.ckpt_root, cfg.checkpoint.keep_last_k)
        tdist.barrier()
        return final

    def _export_weights(self, tmp: Path) -> None:
        module = self.engine.module
        if self.cfg.train.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                if self.dist.rank == 0:
                    self._write_weights(module, tmp)
        elif self.dist.rank == 0:
            self._write_weights(module, tmp)

    @staticmethod
    def _write_weights(module: PretrainModule, tmp: Path) -> None:
        ckpt.save_weights(module.lm, tmp / "model.safetensors")
        if module.head is not None:
            ckpt.save_weights(module.head, tmp / "meta_head.safetensors")

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
            if self.step % cfg.checkpoint.every == 0:
                self.save_checkpoint()
                last_saved = self.step
            if cfg.train.stop_at and self.step >= cfg.train.stop_at and self.step < cfg.train.max_steps:
                self.stop.requested, self.stop.signame = True, f"train.stop_at={cfg.train.stop_at}"
            if self._stop_requested():
                if last_saved != self.step:
                    self.save_checkpoint()
                if d.rank == 0:
                    print(f"metalm: stopped by {self.stop.signame or 'a signal'} at step {self.step}; "
                          f"checkpoint saved; rerun the same command to resume", flush=True)
                self.metrics.close()
                return 0
        if last_saved != self.step:
            self.save_checkpoint()
        self.metrics.close()
        if d.rank == 0:
            print(f"metalm: done, {self.step} steps, {self.tokens:,} tokens\n"
                  f"  run directory: {self.run_dir.resolve()}\n"
                  f"  checkpoints:   {self.ckpt_root.resolve()} (latest: {ckpt.find_latest(self.ckpt_root)})\n"
                  f"  metrics:       {(self.run_dir / 'metrics.jsonl').resolve()}", flush=True)
        return 0

    def reduce(self, values: list, op=tdist.ReduceOp.SUM) -> list[float]:
        """All-reduce numbers and 0-dim tensors across ranks in one collective; one host sync.

        The buffer lives on the training device, since NCCL reduces CUDA tensors only."""
        dev = self.dist.device
        buf = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=dev).reshape(()) for v in values])
        if self.dist.world_size > 1:
            tdist.all_reduce(buf, op=op)
        return buf.tolist()

    def _stop_requested(self) -> bool:
        flag = self.reduce([1.0 if self.stop.requested else 0.0], tdist.ReduceOp.MAX)[0]
        if flag > 0 and not self.stop.requested:
            self.stop.requested = True
        return self.stop.requested
