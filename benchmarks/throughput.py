"""Training throughput and MFU of AR and meta steps through the real DeepSpeed engine (one process).

    python benchmarks/throughput.py                       # CPU: cpu-tiny, ZeRO 0/1/2, torch kernels
    python benchmarks/throughput.py --configs 11m,570m --zero 2 --kernels torch,triton --compile off,on  # GPU

Each row runs `--warmup` untimed optimizer steps, then times `--steps` AR steps and `--steps` meta steps
on the same batches (one micro-batch per step), both through the training step that ships
(metalm.train.step.HybridStep with the config's meta settings: with meta.objective=add a meta micro-batch
holds the AR loss too, and the meta-gradient budget's two backward passes). Tokens are drawn from a Zipf(1.1)
distribution over the vocabulary so that meta episodes find repeated token types as in real text. FLOPs are
the step's own (`metalm.train.step.micro_batch_flops`, the formula the trainer logs), against the device's
dense bf16 peak for MFU. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def zipf_batch(gen, batch: int, seq: int, vocab: int, reserved: int):
    import torch

    ranks = torch.arange(1, vocab - reserved + 1, dtype=torch.float64)
    probs = ranks.pow(-1.1)
    ids = torch.multinomial(probs / probs.sum(), batch * (seq + 1), replacement=True, generator=gen)
    return ids.view(batch, seq + 1)


def pct(mfu) -> str:
    """MFU as a percentage; a dash where the device's peak is unknown (CPUs)."""
    return f"{100 * mfu:5.1f}%" if mfu is not None else "    – "


def bench_one(name: str, zero: int, kernels: str, compile_: bool, args, dist) -> dict:
    import torch

    from metalm.config import load_config
    from metalm.meta.step import MetaStep
    from metalm.model import num_params
    from metalm.train.dist import Collectives
    from metalm.train.engine import Engine
    from metalm.train.loop import peak_flops
    from metalm.train.module import PretrainModule
    from metalm.train.step import HybridStep

    overrides = [f"train.zero_stage={zero}", f"model.kernels={kernels}", f"train.compile={str(compile_).lower()}",
                 "meta.enabled=true", "meta.hybrid_ratio=1.0", "train.grad_accum=1", f"train.device={dist.device.type}"]
    if args.seq_len:
        overrides += [f"train.seq_len={args.seq_len}"]
    if args.micro_batch:
        overrides += [f"train.micro_batch={args.micro_batch}"]
    cfg = load_config(REPO / "configs" / f"{name}.yaml", overrides)
    cfg.train.global_batch = cfg.train.micro_batch  # one process, one micro-batch per step
    if dist.device.type == "cpu" and cfg.train.precision != "fp32":
        cfg.train.precision = "fp32"
    torch.manual_seed(0)
    module = PretrainModule.from_config(cfg)
    engine = Engine(module, cfg.optim, cfg.train, dist)
    gen = torch.Generator().manual_seed(0)
    B, T, V = cfg.train.micro_batch, cfg.train.seq_len, cfg.model.vocab_size
    batches = [zipf_batch(gen, B, T, V, reserved=64) for _ in range(4)]
    comm = Collectives(dist)
    # the training step that ships: AR micro-batches (no meta step) and meta micro-batches (every step meta, with
    # the config's meta settings: readout, windows, objective, budget), episodes sampled by its MetaStep
    steps = {"ar": HybridStep(cfg, engine, comm, None, 1),
             "meta": HybridStep(cfg, engine, comm, MetaStep(cfg.meta, 0, {"mask": V - 1}, V), 1)}
    dev = dist.device

    def timed(kind: str) -> float:
        step = steps[kind]
        for i in range(args.warmup):
            step(iter([batches[i % 4]]), i)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(args.steps):
            out = step(iter([batches[i % 4]]), args.warmup + i)
        float(out.totals.sums["ar_loss"])  # waits for the device
        assert kind == "ar" or out.totals.meta_n == 1, "the meta step fell back to AR: no episode in the batch"
        return (time.perf_counter() - t0) / args.steps

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_ar, t_meta = timed("ar"), timed("meta")
    tokens = B * T
    peak = peak_flops(dev)
    fl_ar, fl_meta = steps["meta"].ar_flops, steps["meta"].meta_flops
    row = {
        "config": name, "params_M": round(num_params(cfg.model) / 1e6, 2), "zero": zero, "kernels": kernels,
        "compile": compile_, "precision": cfg.train.precision, "micro_batch": B, "seq_len": T,
        "meta_objective": cfg.meta.objective, "meta_grad_ratio": cfg.meta.grad_ratio,
        "ar_ms": 1e3 * t_ar, "meta_ms": 1e3 * t_meta, "meta_over_ar": t_meta / t_ar,
        "ar_tokens_per_s": tokens / t_ar, "meta_tokens_per_s": tokens / t_meta,
        "ar_mfu": fl_ar / t_ar / peak if peak else None, "meta_mfu": fl_meta / t_meta / peak if peak else None,
        "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
    }
    engine.destroy()
    del engine, module
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=None, help="comma list (default: cpu-tiny on CPU, 11m,65m,181m,570m on GPU)")
    p.add_argument("--zero", default=None, help="comma list of ZeRO stages (default 0,1,2 on CPU, 2 on GPU)")
    p.add_argument("--kernels", default=None, help="comma list of torch,triton (default torch on CPU)")
    p.add_argument("--compile", default="off", help="comma list of off,on")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=0)
    p.add_argument("--micro-batch", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/throughput-<device>.json)")
    args = p.parse_args(argv)

    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch

    from metalm.config import load_config
    from metalm.train.engine import init_distributed

    gpu = torch.cuda.is_available()
    configs = (args.configs or ("11m,65m,181m,570m" if gpu else "cpu-tiny")).split(",")
    zeros = [int(z) for z in (args.zero or ("2" if gpu else "0,1,2")).split(",")]
    kernel_opts = (args.kernels or ("torch,triton" if gpu else "torch")).split(",")
    compiles = [c == "on" for c in args.compile.split(",")]
    dist = init_distributed(load_config(REPO / "configs" / f"{configs[0]}.yaml",
                                        [f"train.device={'cuda' if gpu else 'cpu'}"]).train)
    rows = []
    for name, zero, kern, comp in itertools.product(configs, zeros, kernel_opts, compiles):
        rows.append(bench_one(name, zero, kern, comp, args, dist))
        r = rows[-1]
        print(f"{name:>8} zero{zero} {kern:>6} compile={'on' if comp else 'off':3} | AR {r['ar_ms']:8.1f} ms "
              f"{r['ar_tokens_per_s']:>10,.0f} tok/s MFU {pct(r['ar_mfu'])} | meta {r['meta_ms']:8.1f} ms "
              f"MFU {pct(r['meta_mfu'])} | meta/AR {r['meta_over_ar']:.2f}", flush=True)
    device = torch.cuda.get_device_name(0) if gpu else f"cpu ({platform.processor() or platform.machine()}, "\
                                                       f"{torch.get_num_threads()} threads)"
    out = Path(args.out or REPO / "benchmarks" / "results" / f"throughput-{'cuda' if gpu else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": rows,
                               "gpu_numbers": "measured" if gpu else "pending: no GPU on this machine"}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
