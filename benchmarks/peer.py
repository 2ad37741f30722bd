"""metalm's CPU AR training step against its peer, Hugging Face's LlamaForCausalLM, and against the machine.

    python benchmarks/peer.py [--shapes cpu-tiny 11m] [--repeats 7] [--threads 1]

Per shape, in one process, on the same weights and the same batch, steps interleaved (each repeat runs every
variant once, so load changes on a shared machine hit them alike), median wall ms of one optimizer step
(forward, backward, AdamW step, zero_grad):
  fused       metalm's real step, PretrainModule.from_config(cfg).ar_loss with model.kernels=auto and
              model.fused_linear_ce=true (on CPU: kernels.cpu.linear_cross_entropy, no full logits), AdamW
              over metalm's parameter groups as the engine builds it;
  unfused     the same with model.fused_linear_ce=false (logits, then kernels.cpu.masked_cross_entropy);
  reference   the same with model.kernels=torch (the plain references: what CPU runs used before issue #17);
  model_F     metalm's model, then F.cross_entropy on its logits;
  hf          LlamaForCausalLM (SDPA attention) built from our export config (metalm.export.hf) and loaded
              with our weights (logits checked equal), then F.cross_entropy, the same AdamW.
The step the shape's config ships with (its model.fused_linear_ce) is marked "*", and is "metalm" in the JSON's
summary. "x HF" is a variant's time over hf's. The roofline is the machine's own single-thread sgemm rate (median
GFLOP/s of a 2048^3 fp32 matmul, measured here, interleaved with the steps) over the step's model FLOPs
per token (metalm.model.flops_per_token: 6N + 12 L d T, LM head included). Shapes: cpu-tiny is
configs/cpu-tiny.yaml at micro-batch 8 x 128; 11m is configs/11m.yaml (fp32 on CPU) at 4 x 256. Batches are
real text (the shared Wikipedia corpus, OLMo tokenizer) when available, else Zipf-distributed ids.
Results: benchmarks/results/peer-cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from metalm.config import load_config  # noqa: E402
from metalm.export.hf import hf_model  # noqa: E402
from metalm.model import flops_per_token  # noqa: E402
from metalm.train.engine import param_groups  # noqa: E402
from metalm.train.module import PretrainModule  # noqa: E402

DATA = REPO.parent / "shared" / "data"
# name: (config file, micro-batch, sequence length)
SHAPES = {"cpu-tiny": ("cpu-tiny.yaml", 8, 128), "11m": ("11m.yaml", 4, 256)}
VARIANTS = ("fused", "unfused", "reference", "model_F", "hf")
GEMM_N = 2048


def batch_for(B: int, T: int, vocab: int) -> tuple[torch.Tensor, str]:
    tok_path = DATA / "tokenizers" / "olmo-gpt-neox-dolma-v1_5.json"
    corpus = DATA / "corpus" / "wiki-vital-en-fr-es.jsonl"
    try:
        import tokenizers
    except ImportError:
        tokenizers = None
    if tokenizers is not None and tok_path.is_file() and corpus.is_file():
        tok = tokenizers.Tokenizer.from_file(str(tok_path))
        ids: list[int] = []
        with corpus.open() as f:
            for line in f:
                ids += tok.encode(json.loads(line)["text"]).ids
                if len(ids) >= B * (T + 1):
                    return torch.tensor(ids[: B * (T + 1)]).view(B, T + 1), "wiki-vital (OLMo tokenizer)"
    g = torch.Generator().manual_seed(0)
    p = 1.0 / torch.arange(1, vocab - 64, dtype=torch.float64) ** 1.1
    ids = torch.multinomial(p / p.sum(), B * (T + 1), replacement=True, generator=g)
    return ids.view(B, T + 1) + 2, "zipf-1.1"


def adamw(module: torch.nn.Module, optim) -> torch.optim.Optimizer:
    """The optimizer metalm's engine builds on CPU (metalm.train.engine.Engine)."""
    return torch.optim.AdamW(param_groups(module, optim.weight_decay), lr=optim.lr, betas=tuple(optim.betas),
                             eps=optim.eps, fused=None)


def make_steps(name: str) -> tuple[dict, dict]:
    cfg_file, B, T = SHAPES[name]
    base = [f"train.seq_len={T}", f"model.max_seq_len={max(T, 128)}", f"train.micro_batch={B}",
            f"train.global_batch={B}", "train.precision=fp32", "train.device=cpu", "meta.enabled=false",
            "model.kernels=auto", "train.compile=false", "model.activation_checkpointing=false"]
    shipped = load_config(REPO / "configs" / cfg_file, base)
    variant_overrides = {"fused": ["model.fused_linear_ce=true"], "unfused": ["model.fused_linear_ce=false"],
                         "reference": ["model.fused_linear_ce=false", "model.kernels=torch"],
                         "model_F": [], "hf": []}
    cfgs = {v: load_config(REPO / "configs" / cfg_file, base + o) for v, o in variant_overrides.items()}
    torch.manual_seed(0)
    template = PretrainModule.from_config(shipped)
    batch, source = batch_for(B, T, shipped.model.vocab_size)
    inputs, targets = batch[:, :-1], batch[:, 1:]

    steps, modules = {}, {}
    for v in VARIANTS:
        if v == "hf":
            mod = hf_model(template.lm).train()
        else:
            mod = PretrainModule.from_config(cfgs[v])
            mod.load_state_dict(template.state_dict())
        modules[v] = mod
    # same weights, same function: metalm's and HF's logits agree before any step
    with torch.no_grad():
        ours = template.lm(inputs)
        theirs = modules["hf"](input_ids=inputs).logits
    logits_diff = (ours - theirs).abs().max().item()
    with torch.no_grad():
        losses = {v: float(modules[v].ar_loss(batch)) for v in ("fused", "unfused", "reference")}
    losses["F"] = float(F.cross_entropy(ours.reshape(-1, ours.shape[-1]), targets.reshape(-1)))

    def stepper(v):
        mod, opt = modules[v], adamw(modules[v], shipped.optim)

        def step():
            if v == "hf":
                logits = mod(input_ids=inputs).logits
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            elif v == "model_F":
                logits = mod.lm(inputs)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            else:
                loss = mod.ar_loss(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    for v in VARIANTS:
        steps[v] = stepper(v)
    m = shipped.model
    info = {
        "shipped_step": "fused" if m.fused_linear_ce else "unfused",
        "config": f"configs/{cfg_file}", "batch": B, "seq_len": T, "tokens_per_step": B * T, "data": source,
        "model": {k: getattr(m, k) for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden",
                                             "vocab_size", "tie_embeddings", "fused_linear_ce")},
        "hf_attn_implementation": getattr(modules["hf"].config, "_attn_implementation", None),
        "max_abs_logits_diff_metalm_vs_hf": logits_diff,
        "initial_loss": losses,
        "flops_per_token": flops_per_token(m, T),
    }
    return steps, info


def gemm_step():
    a, b = torch.randn(GEMM_N, GEMM_N), torch.randn(GEMM_N, GEMM_N)
    out = torch.empty(GEMM_N, GEMM_N)
    return lambda: torch.mm(a, b, out=out)


def timed(fns: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def run_shape(name: str, repeats: int, warmup: int) -> dict:
    steps, info = make_steps(name)
    times = timed({**steps, "sgemm": gemm_step()}, repeats, warmup)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    gflops = 2 * GEMM_N ** 3 / (ms.pop("sgemm") / 1e3) / 1e9
    roofline = gflops * 1e9 / info["flops_per_token"]
    tokens = info["tokens_per_step"]
    rows = {}
    for v in VARIANTS:
        tps = tokens / (ms[v] / 1e3)
        rows[v] = {"ms": ms[v], "x_hf": ms[v] / ms["hf"], "tokens_per_s": tps, "roofline_pct": 100 * tps / roofline,
                   "ms_all": [1e3 * t for t in times[v]]}
    ours = rows[info["shipped_step"]]
    summary = {"metalm": {k: ours[k] for k in ("ms", "x_hf", "tokens_per_s", "roofline_pct")},
               "hf": {k: rows["hf"][k] for k in ("ms", "tokens_per_s", "roofline_pct")}}
    return {**info, "sgemm_gflops": gflops, "roofline_tokens_per_s": roofline, "summary": summary, "steps": rows}


LABELS = {"fused": "metalm, fused CE", "unfused": "metalm, CE", "reference": "metalm, ref. CE",
          "model_F": "model + F.ce", "hf": "HF Llama + F.ce"}


def print_shape(name: str, r: dict) -> None:
    print(f"\n{name}: {r['batch']} x {r['seq_len']} tokens, {r['flops_per_token'] / 1e6:.1f} MFLOP/token, "
          f"sgemm {r['sgemm_gflops']:.1f} GFLOP/s -> roofline {r['roofline_tokens_per_s']:,.0f} tokens/s; "
          f"|logits diff| vs HF {r['max_abs_logits_diff_metalm_vs_hf']:.1e}")
    print(f"{'':<19}{'ms':>9}{'x HF':>7}{'tokens/s':>10}{'% roofline':>12}")
    for v in VARIANTS:
        s = r["steps"][v]
        mark = "*" if v == r["shipped_step"] else " "
        print(f"{LABELS[v]:<18}{mark}{s['ms']:>9.1f}{s['x_hf']:>7.2f}{s['tokens_per_s']:>10,.0f}"
              f"{s['roofline_pct']:>11.1f}%")
    print(f"  * the step {r['config']} ships with (model.fused_linear_ce={r['model']['fused_linear_ce']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "peer-cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for name in args.shapes:
        results[name] = run_shape(name, args.repeats, args.warmup)
        print_shape(name, results[name])
    try:
        import transformers
        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    doc = {
        "device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": args.threads,
        "torch": torch.__version__, "transformers": hf_version, "repeats": args.repeats, "warmup": args.warmup,
        "statistic": "median wall ms per optimizer step (forward + backward + AdamW), variants interleaved",
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
