"""The GPU check: one command that turns a lent accelerator's minutes into every GPU number at once.

    python benchmarks/gpu_check.py --out gpu-check                      # a CUDA machine, 480 s in all
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu-check       # CPU: the same code at tiny shapes

Sections, in priority order, each written to OUT as soon as it has a result (and again after every row):

1. 1-kernel-correctness.json: the Triton kernels against kernels.reference at real shapes (RMSNorm at widths
   96-1536 over 8,192 rows; masked CE and the chunked linear+CE at 8 x 2048 rows and 50,304 classes), value and
   every gradient, bf16 and fp32, with the test suite's tolerances (kernels/tolerance.py); then the suite's
   CUDA tests (tests/test_kernels.py, which runs on the GPU when TRITON_INTERPRET is not 1).
2. 2-kernel-speed.json: forward+backward time and peak memory of the kernels against torch eager (the
   references), torch.compile of the references and Liger-Kernel (recorded as unavailable when not importable),
   through benchmarks/kernels.py's measurement.
3. 3-throughput.json: training steps through the real trainer (metalm.train.loop.Trainer: DeepSpeed ZeRO-2, one
   device, bf16, seq 2048) for 11m, 65m, 181m and 570m, train.compile off then on: the largest micro-batch that
   fits (halving from --micro-batch-start on out-of-memory), AR step time (meta.enabled=false) and meta step
   time (meta.hybrid_ratio=1.0: every step a meta step) and their ratio, tokens/s, MFU, and peak memory against
   the estimate `metalm-train --dry-run` prints (metalm.train.preflight.step_memory_bytes).
4. 4-vanilla-vs-hybrid.json: if time remains, 11m vanilla (meta.enabled=false) and hybrid (the config's
   meta.hybrid_ratio) trained step for step, interleaved, on the built-in corpus, then their validation loss.

Also environment.json (GPU, driver, CUDA, torch, Triton, DeepSpeed, Liger versions) and summary.md: at most
eight files in all, as the device tool brings back.

The budget (--budget-s) is the script's own: a section or a step of one that would not fit in what is left is
recorded as skipped with the reason, and a timer interrupts whatever is running when the budget is spent (that
section is then "partial", with every row done so far). --dry-run runs every section on CPU at tiny shapes: the
kernels under the Triton interpreter, a cpu-tiny-sized model through the same trainer, torch.compile's "eager"
backend for the compile baseline and train.compile off (--compile off,on adds inductor, about a minute on CPU).

Exit status: 0 when every kernel matched its reference and no section failed, 1 otherwise, 2 on bad arguments.
Carrying what the device needs (wheels, prepared shards): benchmarks/gpu_pack.sh; docs/gpu-check.md.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "benchmarks"
# Run as a script, this folder would come first on sys.path and benchmarks/kernels.py would shadow the
# `kernels` package: put the repository root first instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(REPO))

VOCAB = 50304
SECTIONS = {1: "kernel-correctness", 2: "kernel-speed", 3: "throughput", 4: "vanilla-vs-hybrid"}
ROWS_FULL = 8 * 2048  # tokens of one 8 x 2048 micro-batch


class BudgetExhausted(BaseException):
    """The time budget ran out: raised by the budget's timer into whatever is running (a BaseException, so the
    `except Exception` of a measurement that records its own errors does not swallow it)."""


class Budget:
    """Seconds left of --budget-s, counted from the script's start, and a timer that interrupts at the end."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def fits(self, need_s: float) -> bool:
        return self.left() >= need_s

    @contextlib.contextmanager
    def armed(self):
        """Within this block, BudgetExhausted is raised when the budget runs out."""
        left = self.left()
        if left <= 0:
            raise BudgetExhausted()

        def ring(signum, frame):
            raise BudgetExhausted()

        previous = signal.signal(signal.SIGALRM, ring)
        signal.setitimer(signal.ITIMER_REAL, left)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def _write_json(path: Path, obj) -> None:
    """Atomically (a temporary file, then a rename), with the budget's timer held off until the file is in place,
    so a cut-off never leaves a half-written or stray file."""
    text = json.dumps(obj, indent=2, default=str) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


class Section:
    """One section's JSON file: its rows, rewritten after each one, and its final status."""

    def __init__(self, out: Path, number: int, dry_run: bool):
        self.number, self.name = number, SECTIONS[number]
        self.path = out / f"{number}-{self.name}.json"
        self.t0 = time.monotonic()
        self.data = {"section": self.name, "number": number, "status": "running", "reason": None, "seconds": 0.0,
                     "dry_run": dry_run, "rows": []}

    def add(self, row: dict) -> dict:
        self.data["rows"].append(row)
        self.write()
        return row

    def set(self, **kv) -> None:
        self.data.update(kv)
        self.write()

    def finish(self, status: str, reason: str | None = None) -> None:
        self.set(status=status, reason=reason)

    def write(self) -> None:
        self.data["seconds"] = round(time.monotonic() - self.t0, 2)
        _write_json(self.path, self.data)


@dataclass
class Plan:
    """What the run measures: real shapes on CUDA, tiny ones with --dry-run."""

    dry_run: bool
    device: str
    dtypes: tuple
    rms_rows: int
    rms_widths: tuple
    ce_rows: int
    vocab: int
    lce_widths: tuple
    pytest_k: str | None  # -k expression for the suite's tests (None: all of tests/test_kernels.py)
    speed_dtype: str
    speed_reps: int
    speed_warmup: int
    compile_backend: str
    sizes: dict  # name -> (config file, overrides)
    section_floor_s: dict  # the least time a section needs to be worth starting
    unit_floor_s: dict  # train.compile off/on -> the least time one throughput measurement needs
    model_overrides: list = field(default_factory=list)


TINY = {"tiny-a": ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
                   "model.ffn_hidden=64"],
        "tiny-b": ["model.d_model=48", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
                   "model.ffn_hidden=96"]}
TINY_SEQ = 64
TINY_META = ["meta.n_way=4", "meta.k_shot=1", "meta.q_queries=1", "meta.inner_steps=2", "train.val_batches=2"]


def make_plan(args) -> Plan:
    if args.dry_run:
        sizes = {name: (REPO / "configs" / "cpu-tiny.yaml", TINY[name] + [f"model.max_seq_len={TINY_SEQ}",
                                                                           f"train.seq_len={TINY_SEQ}"] + TINY_META)
                 for name in TINY}
        return Plan(True, "cpu", ("float32", "bfloat16"), 64, (96, 384), 32, 1000, (96,),
                    "test_rmsnorm_zero_rows_and_bad_weight or test_dispatch_rejects_unknown_backend", "float32", 2, 1,
                    "eager", sizes, {1: 1, 2: 1, 3: 3, 4: 3}, {False: 3, True: 60})
    sizes = {name: (REPO / "configs" / f"{name}.yaml", []) for name in args.sizes.split(",")}
    return Plan(False, "cuda", ("bfloat16", "float32"), 8192, (96, 384, 768, 1536), ROWS_FULL, VOCAB,
                (96, 384, 768, 1536), None, "bfloat16", 10, 3, "inductor", sizes, {1: 20, 2: 30, 3: 20, 4: 30},
                {False: 15, True: 60})


# ------------------------------------------------------------------------------------------- environment


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvidia_smi(query: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(args, plan: Plan) -> dict:
    import torch

    from metalm.train.loop import peak_flops

    env = {"dry_run": plan.dry_run, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "budget_s": args.budget_s, "argv": sys.argv[1:], "python": platform.python_version(),
           "platform": platform.platform(), "cpu_count": os.cpu_count(), "metalm_commit": _git_commit(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "triton": _version("triton"),
           "deepspeed": _version("deepspeed"), "liger_kernel": _version("liger-kernel"),
           "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")}
    if plan.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update({"gpu": props.name, "gpu_memory_GiB": round(props.total_memory / 2**30, 2),
                    "compute_capability": f"{props.major}.{props.minor}",
                    "multiprocessors": props.multi_processor_count,
                    "driver": _nvidia_smi("driver_version"), "cudnn": torch.backends.cudnn.version(),
                    "peak_bf16_flops": peak_flops(torch.device("cuda", 0))})
    else:
        env.update({"gpu": None, "driver": None, "processor": platform.processor() or platform.machine()})
    return env


# ------------------------------------------------------------------------------- 1. kernel correctness


def _randn(shape, dtype, device, scale=1.0, seed=0):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(shape, generator=g, device=device) * scale).to(dtype)


def _targets(rows, vocab, device, ignore_frac=0.1, seed=0):
    import torch

    g = torch.Generator(device=device).manual_seed(seed + 1)
    t = torch.randint(0, vocab, (rows,), generator=g, device=device)
    t[torch.rand(rows, generator=g, device=device) < ignore_frac] = -100
    return t


def _value_and_grads(fn, inputs, grad_seed=0):
    """fn's output and its gradients wrt every floating input, under one random upstream gradient."""
    import torch

    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out = fn(*leaves)
    g = _randn(out.shape, torch.float32, out.device, seed=grad_seed + 7).to(out.dtype)
    grads = torch.autograd.grad(out, [x for x in leaves if x.requires_grad], g)
    return out.detach(), grads


def correctness_cases(plan: Plan):
    """(name, shape dict, dtype name, kernel fn, reference fn, inputs maker, tolerance dtype per output)."""
    import functools

    import torch

    import kernels
    from kernels import reference as ref

    dev = plan.device
    cases = []
    for dt in plan.dtypes:
        dtype = getattr(torch, dt)
        tol = (dtype, dtype, dtype)  # y, dx, dweight: x and the weight share the dtype here
        for width in plan.rms_widths:
            make = functools.partial(lambda n, dtype=dtype, w=width: [_randn((n, w), dtype, dev, 2.0),
                                                                      1.0 + _randn((w,), dtype, dev, 0.2, 1)],
                                     plan.rms_rows)
            cases.append(("rmsnorm", {"rows": plan.rms_rows, "hidden": width}, dt,
                          functools.partial(kernels.rmsnorm, backend="triton"), ref.rmsnorm, make, tol))
    loss_tol = {"float32": torch.float32}
    for dt in plan.dtypes:
        dtype = getattr(torch, dt)
        ltol = loss_tol.get(dt, torch.bfloat16)
        for extra in ({}, {"label_smoothing": 0.1, "z_loss": 1e-4}):
            make = functools.partial(lambda n, v, dtype=dtype: [_randn((n, v), dtype, dev, 3.0), _targets(n, v, dev)],
                                     plan.ce_rows, plan.vocab)
            cases.append(("masked_ce", {"rows": plan.ce_rows, "vocab": plan.vocab, **extra}, dt,
                          functools.partial(kernels.masked_cross_entropy, backend="triton", **extra),
                          functools.partial(ref.masked_cross_entropy, **extra), make, (ltol, dtype)))
        for width in plan.lce_widths:
            make = functools.partial(
                lambda n, v, w, dtype=dtype: [_randn((n, w), dtype, dev), _randn((v, w), dtype, dev, 2 * w ** -0.5, 1),
                                              _targets(n, v, dev)], plan.ce_rows, plan.vocab, width)
            cases.append(("linear_ce", {"rows": plan.ce_rows, "hidden": width, "vocab": plan.vocab}, dt,
                          functools.partial(kernels.linear_cross_entropy, backend="triton"), ref.linear_cross_entropy,
                          make, (ltol, dtype, dtype)))
    return cases


def check_case(case) -> dict:
    import torch

    from kernels.tolerance import closeness

    op, shape, dt, fn_kernel, fn_ref, make, tol = case
    row = {"op": op, **shape, "dtype": dt}
    inputs = []
    try:
        inputs = make()
        (out, grads), (out_ref, grads_ref) = (_value_and_grads(f, inputs) for f in (fn_kernel, fn_ref))
        names = ["value"] + [f"grad_{i}" for i in range(len(grads))]
        checks = {n: closeness(a, e, t) for n, a, e, t in zip(names, (out, *grads), (out_ref, *grads_ref), tol)}
        row.update(checks=checks, ok=all(c["ok"] for c in checks.values()))
    except torch.cuda.OutOfMemoryError:
        row.update(ok=None, error="out of memory")
    finally:
        del inputs
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return row


def _junit_summary(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            failed.append({"test": f"{case.get('classname')}::{case.get('name')}",
                           "message": (bad.get("message") or "").splitlines()[0][:300] if bad.get("message") else ""})
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": failed[:30]}


def run_suite(plan: Plan, budget: Budget, max_s: float) -> dict:
    """tests/test_kernels.py in a subprocess: on the GPU (TRITON_INTERPRET=0) every test, including the slow
    sm_90 compile; with --dry-run under the interpreter, the quick tests selected by plan.pytest_k."""
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py"]
        if plan.pytest_k:
            cmd += ["-k", plan.pytest_k]
        elif importlib.util.find_spec("xdist") is not None:
            cmd += ["-n", "8"]  # Triton compiles each test's kernels: in parallel, the suite takes a fraction
        shown = " ".join(cmd[2:])
        cmd.append(f"--junitxml={junit}")
        env = {**os.environ, "TRITON_INTERPRET": "1" if plan.dry_run else "0", "OMP_NUM_THREADS": "1"}
        timeout = max(1.0, min(max_s, budget.left()))
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            tail = (e.stdout or b"")[-2000:]
            return {"command": shown, "status": "timed out", "seconds": round(time.monotonic() - t0, 1),
                    "output_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
        result = {"command": shown, "returncode": proc.returncode,
                  "seconds": round(time.monotonic() - t0, 1), "output_tail": (proc.stdout + proc.stderr)[-2000:]}
        if junit.is_file():
            result.update(_junit_summary(junit))
        result["status"] = "passed" if proc.returncode == 0 else "failed"
        return result


def section_correctness(sec: Section, plan: Plan, budget: Budget, args) -> bool:
    ok = True
    for case in correctness_cases(plan):
        row = sec.add(check_case(case))
        ok = ok and row.get("ok") is not False
        print(f"  correctness {row['op']} {row['dtype']} "
              f"{ {k: v for k, v in row.items() if k in ('rows', 'hidden', 'vocab')} }: "
              f"{'ok' if row.get('ok') else row.get('error') or 'MISMATCH'}", flush=True)
    suite = run_suite(plan, budget, args.pytest_max_s)
    sec.set(suite=suite)
    print(f"  suite: {suite['status']} ({suite.get('passed', '?')} passed, {suite.get('failures', '?')} failed)",
          flush=True)
    return ok and suite["status"] == "passed"


# ------------------------------------------------------------------------------------- 2. kernel speed


def _bench_module():
    """benchmarks/kernels.py (its name clashes with the kernels package, so it is loaded from its path)."""
    spec = importlib.util.spec_from_file_location("metalm_benchmarks_kernels", HERE / "kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def speed_shapes(plan: Plan) -> list[tuple[str, dict]]:
    return ([("rmsnorm", {"tokens": plan.rms_rows * 2, "hidden": h}) for h in plan.rms_widths]
            + [("masked_ce", {"tokens": plan.ce_rows, "vocab": plan.vocab})]
            + [("linear_ce", {"tokens": plan.ce_rows, "hidden": h, "vocab": plan.vocab}) for h in plan.lce_widths])


def section_speed(sec: Section, plan: Plan, budget: Budget, args) -> bool:
    import torch

    bk = _bench_module()
    impls = {"torch", "compile", "triton", "liger"} | ({"cpu"} if plan.dry_run else set())
    liger = bk._liger()
    sec.set(liger_kernel=_version("liger-kernel") if liger else None, compile_backend=plan.compile_backend,
            dtype=plan.speed_dtype, reps=plan.speed_reps, warmup=plan.speed_warmup,
            timing="CUDA events, median of reps" if plan.device == "cuda" else "wall clock, median of reps")
    dtype = getattr(torch, plan.speed_dtype)
    for op, shape in speed_shapes(plan):
        fns = bk.OPS[op][0](impls, compile_backend=plan.compile_backend)
        reference_out = None
        for impl, fn in fns.items():
            row, out = bk.bench_one(op, shape, impl, fn, plan.device, dtype, plan.speed_reps, plan.speed_warmup,
                                    reference_out)
            if impl == "torch":
                reference_out = out
            sec.add(row)
            took = row["error"] if "error" in row else f"{row['ms']:.3f} ms"
            print(f"  speed {op} {shape} {impl}: {took}", flush=True)
        if liger is None:
            sec.add({"op": op, **shape, "impl": "liger", "unavailable": "liger_kernel is not importable here"})
    return True


# --------------------------------------------------------------------------------------- 3. throughput


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _overrides(plan: Plan, name: str, run_dir: Path, shards: Path, mb: int, compile_: bool, meta: str) -> list:
    """meta: "off" (AR steps only), "all" (every step a meta step) or "config" (the config's hybrid ratio)."""
    ov = list(plan.sizes[name][1]) + [
        f"train.run_dir={run_dir}", f"data.shards={shards}", "data.prepare_if_missing=false",
        "logging.wandb=false", "logging.progress=false", "checkpoint.resume=never", f"train.device={plan.device}",
        "train.zero_stage=2", f"train.micro_batch={mb}", f"train.global_batch={mb}",
        f"train.compile={str(compile_).lower()}", "train.check_memory=false",
        # nothing is saved: a small /tmp must not stop the 570m rows, nor a signal wait for a checkpoint
        "checkpoint.check_free_space=false", "checkpoint.save_on_signal=false"]
    if meta == "off":
        ov.append("meta.enabled=false")
    elif meta == "all":
        ov += ["meta.enabled=true", "meta.hybrid_ratio=1.0"]
    return ov


def memory_estimate(cfg, world: int = 1) -> dict:
    """What `metalm-train --dry-run` prints for this config: one step's estimated peak memory per rank, by part."""
    import torch

    from metalm.train.module import PretrainModule
    from metalm.train.preflight import step_memory_bytes

    m, t = cfg.model, cfg.train
    with torch.device("meta"):
        module = PretrainModule.from_config(cfg)
    n = sum(p.numel() for p in module.parameters())
    return step_memory_bytes(n, d_model=m.d_model, n_layers=m.n_layers, ffn_hidden=m.ffn_hidden,
                             vocab_size=m.vocab_size, micro_batch=t.micro_batch, seq_len=t.seq_len,
                             precision=t.precision, zero_stage=t.zero_stage, world_size=world,
                             fused_linear_ce=m.fused_linear_ce)


def _free() -> None:
    """Give back what a finished or failed measurement held: Python garbage, compiled graphs, cached GPU memory."""
    import torch

    gc.collect()
    torch.compiler.reset()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _close(trainer) -> None:
    if trainer is not None:
        trainer.engine.destroy()
        trainer.close()
    _free()


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def measure(cfg, dist, plan: Plan, steps: int, warmup: int) -> dict:
    """Build the trainer for `cfg`, run `warmup` then `steps` optimizer steps (one micro-batch each) and time
    them; the trainer's own token and FLOP counters give tokens/s and MFU."""
    import torch

    from metalm.train.loop import Trainer, peak_flops

    t0 = time.monotonic()
    trainer = None
    try:
        trainer = Trainer(cfg, dist)
        built = time.monotonic()
        trainer.start()
        for _ in range(warmup):
            trainer.train_step()
        _sync(plan.device)
        warmed = time.monotonic()
        if plan.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        tokens0, flops0, times, ar_n, meta_n, fallback = trainer.tokens, trainer.flops, [], 0, 0, 0
        for _ in range(steps):
            s = time.monotonic()
            totals = trainer.train_step()
            _sync(plan.device)
            times.append(time.monotonic() - s)
            ar_n, meta_n, fallback = ar_n + totals.ar_n, meta_n + totals.meta_n, fallback + totals.fallback
        elapsed = sum(times)
        peak = peak_flops(dist.device)
        flops_s = (trainer.flops - flops0) / elapsed
        return {"build_s": round(built - t0, 2), "warmup_s": round(warmed - built, 2),
                "step_ms_median": 1e3 * statistics.median(times), "step_ms_mean": 1e3 * elapsed / steps,
                "tokens_per_s": (trainer.tokens - tokens0) / elapsed, "model_flops_per_s": flops_s,
                "mfu": flops_s / peak if peak else None, "micro_batches": {"ar": ar_n, "meta": meta_n},
                "meta_fallbacks": fallback,
                "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30 if plan.device == "cuda" else None}
    finally:
        _close(trainer)


def largest_fitting(plan: Plan, name: str, compile_: bool, meta: str, start: int, total_mem: float | None,
                    runs: Path, shards: Path, dist, args) -> tuple[dict, list]:
    """Measure at the largest micro-batch that fits: from `start` halving on out-of-memory. A size whose
    --dry-run estimate exceeds twice the device's memory is not tried (recorded as such)."""
    from metalm.config import load_config

    tried, mb = [], start
    while mb >= 1:
        _free()  # an out-of-memory's traceback held the last attempt's tensors until now
        run_dir = runs / f"{name}-{meta}-compile{int(compile_)}-mb{mb}"
        cfg = load_config(plan.sizes[name][0], _overrides(plan, name, run_dir, shards, mb, compile_, meta))
        est = memory_estimate(cfg)
        row = {"micro_batch": mb, "seq_len": cfg.train.seq_len, "precision": cfg.train.precision,
               "fused_linear_ce": cfg.model.fused_linear_ce, "meta_objective": cfg.meta.objective,
               "estimate_GiB": sum(est.values()) / 2**30, "estimate_parts_GiB": {k: v / 2**30 for k, v in est.items()}}
        if total_mem is not None and sum(est.values()) > 2 * total_mem:
            tried.append({"micro_batch": mb, "result": "not tried: estimate over twice the device memory"})
            mb //= 2
            continue
        try:
            row.update(measure(cfg, dist, plan, args.steps or (3 if plan.dry_run else 10),
                               args.warmup if args.warmup is not None else (1 if plan.dry_run else 3)))
        except BudgetExhausted:
            raise
        except Exception as e:  # an out-of-memory halves; anything else is this row's error
            if not _is_oom(e):
                raise
            tried.append({"micro_batch": mb, "result": "out of memory"})
            mb //= 2
            continue
        if row["peak_mem_GiB"] is not None:
            row["peak_over_estimate"] = row["peak_mem_GiB"] / row["estimate_GiB"]
        tried.append({"micro_batch": mb, "result": "fits"})
        return row, tried
    raise RuntimeError(f"{name}: out of memory even at micro-batch 1")


def _shards(plan: Plan, args, scratch: Path) -> tuple[Path | None, str | None]:
    """The prepared shards sections 3 and 4 read, or (None, why not)."""
    from metalm.data.errors import DataError
    from metalm.data.prepare import prepare

    if plan.dry_run and not args.shards:
        out = scratch / "shards"
        prepare("builtin", "builtin:olmo", str(out), TINY_SEQ, val_fraction=0.05, samples_per_shard=256, num_proc=1,
                max_docs=300, progress=False)
        return out, None
    path = Path(args.shards or REPO / "data" / "wiki-vital-2048" / "shards")
    if (path / "manifest.json").is_file():
        return path, None
    try:
        prepare("builtin", "builtin:olmo", str(path), 2048, progress=False)
    except DataError as e:
        return None, (f"no prepared shards at {path} and they cannot be prepared here ({e}); run "
                      f"benchmarks/gpu_pack.sh first and carry data/wiki-vital-2048/shards")
    return path, None


@dataclass
class Context:
    """What sections 3 and 4 share: the process group, the shards, a scratch run folder, the measured rows."""

    dist: object = None
    shards: Path | None = None
    no_shards: str | None = None
    runs: Path | None = None
    throughput: list = field(default_factory=list)


def _train_context(ctx: Context, plan: Plan, args, scratch: Path) -> None:
    from metalm.config import load_config
    from metalm.train.engine import init_distributed

    if ctx.runs is None:
        ctx.runs = scratch / "runs"
        ctx.shards, ctx.no_shards = _shards(plan, args, scratch)
    if ctx.dist is None and ctx.shards is not None:
        name = next(iter(plan.sizes))
        ctx.dist = init_distributed(load_config(plan.sizes[name][0], [f"train.device={plan.device}"]).train)


def section_throughput(sec: Section, plan: Plan, budget: Budget, args, ctx: Context, scratch: Path) -> bool:
    import torch

    _train_context(ctx, plan, args, scratch)
    if ctx.shards is None:
        sec.finish("skipped", ctx.no_shards)
        return True
    total_mem = torch.cuda.get_device_properties(0).total_memory if plan.device == "cuda" else None
    compiles = [c == "on" for c in args.compile.split(",")] if args.compile else ([False] if plan.dry_run
                                                                                 else [False, True])
    start = args.micro_batch_start or (2 if plan.dry_run else 64)
    last_s: dict[bool, float] = {}
    best_mb: dict[str, int] = {}  # compile on starts from what fitted with compile off
    ok = True
    for compile_ in compiles:
        for name in plan.sizes:
            found_mb = best_mb.get(name, start)
            ar_row = None
            for meta in ("off", "all"):
                need = max(plan.unit_floor_s[compile_], last_s.get(compile_, 0.0))
                head = {"size": name, "compile": compile_, "steps": "ar" if meta == "off" else "meta"}
                if not budget.fits(need):
                    sec.add({**head, "skipped": f"needs about {need:.0f} s, {max(budget.left(), 0):.0f} s left"})
                    continue
                t0 = time.monotonic()
                try:
                    row, tried = largest_fitting(plan, name, compile_, meta, found_mb, total_mem, ctx.runs,
                                                 ctx.shards, ctx.dist, args)
                except BudgetExhausted:
                    sec.add({**head, "error": "cut off by the time budget"})
                    raise
                except Exception as e:  # noqa: BLE001 - one size failing must not hide the others
                    ok = False
                    sec.add({**head, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"})
                    continue
                last_s[compile_] = time.monotonic() - t0
                row = {**head, **row, "tried": tried, "seconds": round(last_s[compile_], 1)}
                if meta == "off":
                    ar_row, found_mb = row, row["micro_batch"]
                    best_mb.setdefault(name, found_mb)
                elif row["meta_fallbacks"]:
                    row["note"] = (f"{row['meta_fallbacks']} meta step(s) found no episode in their batch and ran "
                                   f"as AR steps: no meta/AR ratio from this row")
                elif ar_row is not None:
                    # per token, so that a meta run at a smaller micro-batch still compares
                    row["meta_over_ar"] = ar_row["tokens_per_s"] / row["tokens_per_s"]
                sec.add(row)
                ctx.throughput.append(row)
                mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "-"
                print(f"  throughput {name} compile={compile_} {head['steps']}: mb {row['micro_batch']} "
                      f"{row['step_ms_median']:.1f} ms/step {row['tokens_per_s']:,.0f} tok/s MFU {mfu}", flush=True)
    return ok


# ------------------------------------------------------------------------------- 4. vanilla vs hybrid


def section_pair(sec: Section, plan: Plan, budget: Budget, args, ctx: Context, scratch: Path) -> bool:
    """11m vanilla and hybrid, one optimizer step of each in turn (so a cut-off leaves both at the same step),
    then both validation losses."""
    from metalm.config import load_config
    from metalm.train.loop import Trainer

    _train_context(ctx, plan, args, scratch)
    if ctx.shards is None:
        sec.finish("skipped", ctx.no_shards)
        return True
    name = "tiny-a" if plan.dry_run else "11m"
    if name not in plan.sizes:
        plan.sizes[name] = (REPO / "configs" / f"{name}.yaml", [])
    measured = [r for r in ctx.throughput if r["size"] == name and r["steps"] == "meta" and "micro_batch" in r]
    mb = measured[0]["micro_batch"] if measured else (2 if plan.dry_run else 8)
    steps = args.pair_steps or (3 if plan.dry_run else 300)
    warm = max(1, steps // 10)
    trainers = {}
    sec.set(size=name, micro_batch=mb, planned_steps=steps, warmup_steps=warm, losses=[])
    try:
        for kind, meta in (("vanilla", "off"), ("hybrid", "config")):
            cfg = load_config(plan.sizes[name][0], _overrides(plan, name, ctx.runs / f"pair-{kind}", ctx.shards, mb,
                                                              False, meta)
                              + [f"train.max_steps={steps}", f"optim.warmup_steps={warm}"])
            trainers[kind] = Trainer(cfg, ctx.dist)
            trainers[kind].start()
        sec.set(hybrid_ratio=trainers["hybrid"].cfg.meta.hybrid_ratio)
        t0, losses, step_s = time.monotonic(), [], 0.0
        for step in range(1, steps + 1):
            # leave room for the two validations (about ten steps' worth each) and the files
            if step > 1 and not budget.fits(20 * step_s + 5):
                sec.set(stopped_early=f"at step {step - 1} of {steps}: the time budget")
                break
            s = time.monotonic()
            rec = {"step": step}
            for kind, tr in trainers.items():
                totals = tr.train_step()
                rec[kind] = {k: float(totals.sums[f"{k}_loss"]) / n for k, n in
                             (("ar", totals.ar_n), ("meta", totals.meta_n)) if n}
            losses.append(rec)
            step_s = (time.monotonic() - s)
            if step % 10 == 0 or step == steps:
                sec.set(losses=losses, steps_done=step, train_s=round(time.monotonic() - t0, 1))
        sec.set(losses=losses, steps_done=len(losses), train_s=round(time.monotonic() - t0, 1))
        val = {kind: float(tr.validate()) for kind, tr in trainers.items()}
        sec.set(val_loss=val, tokens={k: tr.tokens for k, tr in trainers.items()},
                flops={k: tr.flops for k, tr in trainers.items()})
    finally:
        for tr in trainers.values():
            _close(tr)
    return True


# ------------------------------------------------------------------------------------------- summary


def _fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec)


def summary(out: Path, env: dict, results: dict) -> str:
    lines = [f"# GPU check{' (dry run on CPU: tiny shapes, no GPU numbers)' if env['dry_run'] else ''}", "",
             f"{env.get('gpu') or env.get('processor')}, driver {env.get('driver')}, CUDA {env.get('cuda')}, torch "
             f"{env['torch']}, Triton {env['triton']}, DeepSpeed {env['deepspeed']}, Liger-Kernel "
             f"{env['liger_kernel']}; budget {env['budget_s']} s; started {env['started_utc']}", ""]
    lines += ["| section | status | seconds | note |", "| --- | --- | --- | --- |"]
    for n, name in SECTIONS.items():
        d = results.get(n)
        if d:
            lines.append(f"| {n}. {name} | {d['status']} | {d['seconds']} | {d.get('reason') or ''} |")
    s1 = results.get(1)
    if s1 and s1["rows"]:
        lines += ["", "## 1. Kernel correctness (largest error / tolerance; <= 1 passes)", "",
                  "| op | shape | dtype | ok | worst err/tol |", "| --- | --- | --- | --- | --- |"]
        for r in s1["rows"]:
            shape = " ".join(f"{k}={r[k]}" for k in ("rows", "hidden", "vocab", "label_smoothing", "z_loss") if k in r)
            worst = max((c.get("max_err_over_tol", float("inf")) for c in r.get("checks", {}).values()), default=None)
            lines.append(f"| {r['op']} | {shape} | {r['dtype']} | {r.get('ok')} | {_fmt(worst)} |")
        suite = s1.get("suite")
        if suite:
            lines += ["", f"Suite (`{suite['command']}`): {suite['status']}, {suite.get('passed', '?')} passed, "
                          f"{suite.get('failures', '?')} failed, {suite.get('errors', '?')} errors, "
                          f"{suite.get('skipped', '?')} skipped, {suite['seconds']} s."]
    s2 = results.get(2)
    if s2 and s2["rows"]:
        lines += ["", "## 2. Kernel speed, forward+backward", "",
                  "| op | shape | impl | ms | x torch | peak MiB |", "| --- | --- | --- | --- | --- | --- |"]
        base = {}
        for r in s2["rows"]:
            shape = " ".join(f"{k}={r[k]}" for k in ("tokens", "hidden", "vocab") if k in r)
            if r["impl"] == "torch" and "ms" in r:
                base[(r["op"], shape)] = r["ms"]
            if "ms" not in r:
                lines.append(f"| {r['op']} | {shape} | {r['impl']} | {r.get('error') or r.get('unavailable')} | | |")
                continue
            b = base.get((r["op"], shape))
            lines.append(f"| {r['op']} | {shape} | {r['impl']} | {r['ms']:.3f} | {_fmt(b / r['ms'] if b else None)} "
                         f"| {_fmt(r.get('peak_mib'), '.0f')} |")
    s3 = results.get(3)
    if s3 and s3["rows"]:
        lines += ["", "## 3. Training throughput (one device, ZeRO-2)", "",
                  "| size | compile | steps | micro-batch | ms/step | tokens/s | MFU | peak GiB | estimate GiB "
                  "| meta/AR |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in s3["rows"]:
            if "step_ms_median" not in r:
                lines.append(f"| {r['size']} | {r['compile']} | {r['steps']} | {r.get('skipped') or r.get('error')} "
                             f"| | | | | | |")
                continue
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            lines.append(f"| {r['size']} | {r['compile']} | {r['steps']} | {r['micro_batch']} | "
                         f"{r['step_ms_median']:.1f} | {r['tokens_per_s']:,.0f} | {mfu} | {_fmt(r['peak_mem_GiB'])} | "
                         f"{r['estimate_GiB']:.3g} | {_fmt(r.get('meta_over_ar'))} |")
    s4 = results.get(4)
    if s4 and s4.get("val_loss"):
        lines += ["", f"## 4. Vanilla vs hybrid ({s4['size']}, {s4['steps_done']} steps, micro-batch "
                      f"{s4['micro_batch']})", "",
                  f"Validation loss: vanilla {s4['val_loss']['vanilla']:.4f}, hybrid {s4['val_loss']['hybrid']:.4f} "
                  f"(hybrid ratio {s4.get('hybrid_ratio')}; a short run: a smoke test of the pair, not a result)."]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Sections, files and budget: see the module docstring and docs/gpu-check.md.")
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON files and summary.md")
    p.add_argument("--budget-s", type=float, default=480.0, help="the whole run's time budget in seconds (480)")
    p.add_argument("--dry-run", action="store_true", help="on CPU, tiny shapes: proves the script and its output")
    p.add_argument("--sections", default="1,2,3,4", help="comma list of section numbers to run (1,2,3,4)")
    p.add_argument("--sizes", default="11m,65m,181m,570m", help="section 3's configs (configs/NAME.yaml)")
    p.add_argument("--compile", default=None, help="section 3's train.compile settings: off,on (default; off with "
                                                   "--dry-run)")
    p.add_argument("--micro-batch-start", type=int, default=0, help="section 3 halves from here on OOM (64; 2 "
                                                                    "with --dry-run)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per measurement (10; 3 with --dry-run)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (3; 1 with --dry-run)")
    p.add_argument("--pair-steps", type=int, default=0, help="section 4's steps per model (300; 3 with --dry-run)")
    p.add_argument("--shards", default=None, help="prepared shards for sections 3-4 (default "
                                                  "data/wiki-vital-2048/shards; --dry-run prepares a small slice)")
    p.add_argument("--pytest-max-s", type=float, default=120.0,
                   help="most seconds section 1 gives the test suite (120)")
    args = p.parse_args(argv)
    try:
        args.sections = sorted({int(s) for s in args.sections.split(",")})
    except ValueError:
        p.error(f"--sections {args.sections!r}: expected a comma list of 1, 2, 3, 4")
    if not set(args.sections) <= set(SECTIONS):
        p.error(f"--sections {args.sections}: expected numbers among 1, 2, 3, 4")
    if args.compile is not None and not set(args.compile.split(",")) <= {"off", "on"}:
        p.error(f"--compile {args.compile!r}: expected off, on or off,on")
    if args.budget_s <= 0:
        p.error(f"--budget-s {args.budget_s}: expected a positive number of seconds")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any Triton module is imported
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    elif os.environ.get("TRITON_INTERPRET") == "1":
        print("gpu_check: TRITON_INTERPRET=1 would time the interpreter, not the GPU; unset it or use --dry-run",
              file=sys.stderr)
        return 2
    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device is visible (torch {torch.__version__}); run with --dry-run on a machine "
              f"without a GPU", file=sys.stderr)
        return 2
    plan = make_plan(args)
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment(args, plan)
    _write_json(args.out / "environment.json", env)
    print(f"gpu_check: {env.get('gpu') or 'CPU (dry run)'}, budget {args.budget_s:.0f} s, out {args.out}", flush=True)
    results, ok, ctx = {}, True, Context()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        scratch = Path(tmp)
        runners = {1: lambda s: section_correctness(s, plan, budget, args),
                   2: lambda s: section_speed(s, plan, budget, args),
                   3: lambda s: section_throughput(s, plan, budget, args, ctx, scratch),
                   4: lambda s: section_pair(s, plan, budget, args, ctx, scratch)}
        for n in SECTIONS:
            sec = Section(args.out, n, plan.dry_run)
            if n not in args.sections:
                sec.finish("skipped", f"not requested (--sections {','.join(map(str, args.sections))})")
            elif not budget.fits(plan.section_floor_s[n]):
                sec.finish("skipped", f"the time budget: needs at least {plan.section_floor_s[n]} s, "
                                      f"{max(budget.left(), 0):.0f} s left")
            else:
                print(f"section {n}: {sec.name}", flush=True)
                try:
                    with budget.armed():
                        passed = runners[n](sec)
                    if sec.data["status"] == "running":
                        sec.finish("done" if passed else "failed",
                                   None if passed else "a check failed or a measurement raised: see the rows")
                    ok = ok and passed
                except BudgetExhausted:
                    sec.finish("partial", "cut off by the time budget; the rows are what finished")
                except Exception as e:  # noqa: BLE001 - a broken section must not cost the later ones
                    ok = False
                    sec.finish("failed", f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            results[n] = sec.data
            summary(args.out, env, results)
    print(summary(args.out, env, results), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
