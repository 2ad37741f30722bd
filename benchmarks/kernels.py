"""Benchmark metalm's kernels: forward+backward time and peak memory against torch eager (the references),
torch.compile of the references, and Liger-Kernel where it is importable.

    python benchmarks/kernels.py            # CUDA: our shapes (hidden 96-1536, 8k-64k tokens, vocab 50,304)
    python benchmarks/kernels.py --quick    # small shapes; on a machine without CUDA only this runs

On CUDA, times are the median of CUDA-event-timed repetitions after warm-up, and peak memory is the
allocator's peak during one forward+backward minus what was allocated before it (inputs included in the
baseline, so it is the extra memory the op needs). Without CUDA only the references and kernels.cpu (the
CPU production path of the cross-entropies; "cpu" rows) run (the Triton interpreter's timings say nothing
about GPU speed; the full-size CPU comparison is benchmarks/peer.py), peak memory is not measured, and the output says
that GPU numbers are pending. Results go to benchmarks/results/kernels-<device>.json.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

# This file is itself called kernels.py: run as a script, its folder would come first on sys.path and
# `import kernels` would import this file. Put the repository root first instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402

import kernels  # noqa: E402
from kernels import reference as ref  # noqa: E402

VOCAB = 50304
EPS = 1e-6


def _liger():
    try:
        from liger_kernel.transformers import functional as lf
    except Exception:  # noqa: BLE001 (not installed, or installed but broken against this torch/triton)
        return None
    return lf


# ------------------------------------------------------------------------------------ the workloads
# Each op returns {impl name: fn(*inputs) -> output}, and a maker of (inputs, upstream grad). `compile_backend`
# is torch.compile's backend for the "compile" baseline (benchmarks/gpu_check.py --dry-run uses "eager").


def rmsnorm_impls(backends, compile_backend="inductor"):
    impls = {"torch": lambda x, w: ref.rmsnorm(x, w, EPS)}
    if "compile" in backends:
        compiled = torch.compile(ref.rmsnorm, backend=compile_backend)
        impls["compile"] = lambda x, w: compiled(x, w, EPS)
    if "triton" in backends:
        impls["triton"] = lambda x, w: kernels.rmsnorm(x, w, EPS, backend="triton")
    lf = _liger() if "liger" in backends else None
    if lf is not None:  # "gemma" casting = all statistics and the weight product in fp32, like ours
        impls["liger"] = lambda x, w: lf.liger_rms_norm(x, w, EPS, casting_mode="gemma", in_place=False)
    return impls


def rmsnorm_inputs(tokens, hidden, device, dtype):
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype).requires_grad_()
    return [x, w]


def ce_impls(backends, compile_backend="inductor"):
    impls = {"torch": lambda z, t: ref.masked_cross_entropy(z, t)}
    if "compile" in backends:
        compiled = torch.compile(ref.masked_cross_entropy, backend=compile_backend)
        impls["compile"] = lambda z, t: compiled(z, t)
    if "triton" in backends:
        impls["triton"] = lambda z, t: kernels.masked_cross_entropy(z, t, backend="triton")
    if "cpu" in backends:
        impls["cpu"] = lambda z, t: kernels.cpu.masked_cross_entropy(z, t)
    lf = _liger() if "liger" in backends else None
    if lf is not None:  # note: Liger writes the gradient into the logits buffer in place
        impls["liger"] = lambda z, t: lf.liger_cross_entropy(z, t, ignore_index=-100, reduction="mean")
    return impls


def _targets(tokens, vocab, device):
    t = torch.randint(0, vocab, (tokens,), device=device)
    t[torch.rand(tokens, device=device) < 0.1] = -100  # some padding, as in real batches
    return t


def ce_inputs(tokens, vocab, device, dtype):
    z = (2 * torch.randn(tokens, vocab, device=device)).to(dtype).requires_grad_()
    return [z, _targets(tokens, vocab, device)]


def lce_impls(backends, compile_backend="inductor"):
    impls = {"torch": lambda h, w, t: ref.linear_cross_entropy(h, w, t)}
    if "compile" in backends:
        compiled = torch.compile(ref.linear_cross_entropy, backend=compile_backend)
        impls["compile"] = lambda h, w, t: compiled(h, w, t)
    if "triton" in backends:
        impls["triton"] = lambda h, w, t: kernels.linear_cross_entropy(h, w, t, backend="triton")
    if "cpu" in backends:
        impls["cpu"] = lambda h, w, t: kernels.cpu.linear_cross_entropy(h, w, t)
    lf = _liger() if "liger" in backends else None
    if lf is not None:
        impls["liger"] = lambda h, w, t: lf.liger_fused_linear_cross_entropy(h, w, t, ignore_index=-100)
    return impls


def lce_inputs(tokens, hidden, vocab, device, dtype):
    h = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=device) * hidden ** -0.5).to(dtype).requires_grad_()
    return [h, w, _targets(tokens, vocab, device)]


def shapes(quick: bool, cuda: bool):
    """(op, shape dict) pairs. Full = the model sizes we train; quick = a few seconds' worth."""
    if quick and not cuda:
        return ([("rmsnorm", {"tokens": t, "hidden": h}) for h in (96, 384) for t in (256, 2048)]
                + [("masked_ce", {"tokens": t, "vocab": v}) for t, v in ((256, 1000), (256, 8192))]
                + [("linear_ce", {"tokens": 256, "hidden": h, "vocab": 8192}) for h in (96, 384)])
    if quick:
        return ([("rmsnorm", {"tokens": 8192, "hidden": h}) for h in (96, 768)]
                + [("masked_ce", {"tokens": 8192, "vocab": VOCAB})]
                + [("linear_ce", {"tokens": 8192, "hidden": 768, "vocab": VOCAB})])
    return ([("rmsnorm", {"tokens": t, "hidden": h}) for h in (96, 384, 768, 1536) for t in (8192, 65536)]
            + [("masked_ce", {"tokens": t, "vocab": VOCAB}) for t in (8192, 32768, 65536)]
            + [("linear_ce", {"tokens": t, "hidden": h, "vocab": VOCAB})
               for h in (96, 384, 768, 1536) for t in (8192, 65536)])


OPS = {"rmsnorm": (rmsnorm_impls, rmsnorm_inputs), "masked_ce": (ce_impls, ce_inputs),
       "linear_ce": (lce_impls, lce_inputs)}


# ------------------------------------------------------------------------------------- measurement


def _step(fn, inputs):
    for x in inputs:
        x.grad = None
    out = fn(*inputs)
    out.backward(torch.ones_like(out))
    return out


def _time_ms(fn, inputs, reps, cuda):
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            _step(fn, inputs)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            _step(fn, inputs)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak_mib(fn, inputs, cuda):
    if not cuda:
        return None
    for x in inputs:
        x.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _step(fn, inputs)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_one(op, shape, impl, fn, device, dtype, reps, warmup, reference_out):
    make = OPS[op][1]
    row = {"op": op, "impl": impl, **shape, "dtype": str(dtype).replace("torch.", "")}
    torch.manual_seed(0)  # every impl sees the same inputs
    inputs = make(**shape, device=device, dtype=dtype)
    try:
        for _ in range(warmup):
            out = _step(fn, inputs)
        row["ms"] = _time_ms(fn, inputs, reps, device == "cuda")
        row["peak_mib"] = _peak_mib(fn, inputs, device == "cuda")
        out = _step(fn, inputs).detach().float()
        if reference_out is not None:  # a sanity check that every impl computes the same thing
            row["max_abs_diff_vs_torch"] = (out - reference_out).abs().max().item()
        return row, out
    except torch.cuda.OutOfMemoryError:
        row["error"] = "OOM"
    except Exception as e:  # noqa: BLE001 (a compile failure or a Liger API mismatch is this row's result)
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    finally:
        del inputs
        if device == "cuda":
            torch.cuda.empty_cache()
    return row, None


def _fmt_shape(row):
    return " ".join(f"{k[0]}={row[k]}" for k in ("tokens", "hidden", "vocab") if k in row)


def print_table(rows):
    header = f"{'op':<10} {'shape':<22} {'impl':<8} {'fwd+bwd ms':>11} {'x torch':>8} {'peak MiB':>9} {'|diff|':>9}"
    print(header)
    print("-" * len(header))
    torch_ms = {(r["op"], _fmt_shape(r)): r.get("ms") for r in rows if r["impl"] == "torch"}
    for r in rows:
        if "error" in r:
            print(f"{r['op']:<10} {_fmt_shape(r):<22} {r['impl']:<8} {r['error']}")
            continue
        base = torch_ms.get((r["op"], _fmt_shape(r)))
        speed = f"{base / r['ms']:.2f}" if base else "-"
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a"
        diff = f"{r['max_abs_diff_vs_torch']:.1e}" if "max_abs_diff_vs_torch" in r else "-"
        print(f"{r['op']:<10} {_fmt_shape(r):<22} {r['impl']:<8} {r['ms']:>11.3f} {speed:>8} {peak:>9} {diff:>9}")


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(cuda: bool) -> str:
    if not cuda:
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes (implied without CUDA)")
    p.add_argument("--ops", default="rmsnorm,masked_ce,linear_ce", help="comma-separated subset")
    p.add_argument("--impls", default=None,
                   help="comma-separated subset of torch,cpu,compile,triton,liger (default: all but cpu on "
                        "CUDA, torch,cpu without CUDA; e.g. TRITON_INTERPRET=1 --impls torch,triton smoke-tests the "
                        "harness on CPU)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 10 CUDA, 3 CPU)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    quick = args.quick or not cuda
    # Off-GPU the references and the CPU production path (kernels.cpu) are what we choose between; the
    # Triton interpreter and CPU inductor are not.
    default_impls = "torch,compile,triton,liger" if cuda else "torch,cpu"
    backends = set((args.impls or default_impls).split(","))
    dtype = torch.bfloat16 if cuda else torch.float32
    reps = args.reps or (10 if cuda else 3)
    warmup = 3 if cuda else 1
    ops = set(args.ops.split(","))

    rows = []
    for op, shape in shapes(quick, cuda):
        if op not in ops:
            continue
        impls = OPS[op][0](backends)
        reference_out = None
        for impl, fn in impls.items():
            row, out = bench_one(op, shape, impl, fn, device, dtype, reps, warmup, reference_out)
            if impl == "torch":
                reference_out = out
            rows.append(row)
            status = row["error"] if "error" in row else f"{row['ms']:.3f} ms"
            print(f"  {op} {_fmt_shape(row)} {impl}: {status}", file=sys.stderr, flush=True)

    print()
    print_table(rows)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    result = {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
        "liger_kernel": _dist_version("liger-kernel") if _liger() else None,
        "dtype": str(dtype).replace("torch.", ""), "quick": quick, "reps": reps, "warmup": warmup,
        "shapes": [{"op": op, **shape} for op, shape in shapes(quick, cuda) if op in ops],
        "results": rows,
    }
    if not cuda:
        result["note"] = ("GPU numbers pending: no CUDA device; small CPU shapes, timings say nothing about "
                          "GPU speed (Triton would run under its interpreter)")
        print("\nGPU numbers pending: no CUDA device here; small CPU shapes (the PyTorch references and "
              "kernels.cpu unless --impls says otherwise), which say nothing about GPU speed.")
    out = args.out or _HERE / "results" / f"kernels-{device_name(cuda)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
