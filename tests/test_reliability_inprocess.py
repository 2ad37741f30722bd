"""Faults injected inside the real training loop (Trainer + DeepSpeed, one CPU process): non-finite losses
under ZeRO 0-3, loss spikes, a full disk during a save, an unusable run directory.

Faults come from test-only wrappers in a worker process (`python tests/test_reliability_inprocess.py WORKER
...`): `PretrainModule.forward` returns NaN (or a scaled loss) for chosen micro-batches, `save_weights` raises
ENOSPC for one checkpoint; nothing in metalm knows about them. For non-finite losses the worker drives
`Trainer.train_step` itself, snapshots the fp32 master parameters, the parameters the forward sees and AdamW's
state right before the poisoned step, and reports what changed; the tests assert on that report.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "cpu-tiny.yaml"
OVERRIDES = [
    "train.seq_len=64", "model.max_seq_len=64", "model.n_layers=2", "train.micro_batch=4", "train.global_batch=8",
    "train.log_every=1", "train.val_every=0", "optim.warmup_steps=2", "checkpoint.every=1000",
    "logging.wandb=false", "logging.progress=false", "data.prepare_if_missing=false", "meta.n_way=4",
    "meta.k_shot=2", "meta.q_queries=2", "meta.inner_steps=2", "meta.hybrid_ratio=0.5", "train.max_steps=50",
    "meta.grad_ratio=0",  # the weighted objective: the meta-gradient budget needs whole parameters (not ZeRO-3)
]
CASES = [(0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32"), (0, "bf16"), (2, "bf16")]


# ------------------------------------------------------------------------------------------ worker (test-only)

POISON: dict = {"micro": set()}  # micro-batch indices of the next step whose loss becomes NaN
SCALE: dict = {"factor": 1.0}  # multiplies the next step's losses (a finite spike)
_PROCESS: dict = {}


def _install_injection() -> None:
    from metalm.train.module import PretrainModule

    original = PretrainModule.forward
    calls = {"n": 0}

    def forward(self, batch, episode=None):
        losses, stats = original(self, batch, episode=episode)
        micro = calls["n"]
        calls["n"] += 1
        poison = float("nan") if micro in POISON["micro"] else 1.0
        return {k: v * poison * SCALE["factor"] for k, v in losses.items()}, stats

    def reset() -> None:
        calls["n"] = 0

    PretrainModule.forward = forward
    POISON["reset"] = reset


def _snapshot(trainer) -> list:
    import deepspeed
    import torch

    engine = trainer.engine.ds  # the DeepSpeed engine behind the adapter: the test inspects its internals
    opt = engine.basic_optimizer
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            out.append(p.detach().clone())  # what AdamW updates: the (flat, fp32) master partitions
            for _, v in sorted(opt.state.get(p, {}).items()):
                out.append(torch.as_tensor(v).detach().clone())  # exp_avg, exp_avg_sq, step
    params = list(engine.module.parameters())
    if trainer.cfg.train.zero_stage == 3:
        with deepspeed.zero.GatheredParameters(params):
            out += [p.detach().clone() for p in params]
    else:
        out += [p.detach().clone() for p in params]  # the copies the forward uses (16-bit for bf16)
    return out


def _same(a: list, b: list) -> bool:
    import torch

    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


def _step(trainer, poison=(), scale: float = 1.0) -> float:
    """One optimizer step; returns its summed (AR + meta) loss as the loop accumulated it (0 when skipped)."""
    POISON["reset"]()
    POISON["micro"], SCALE["factor"] = set(poison), scale
    sums = lambda: float(trainer.interval.sums["ar_loss"] + trainer.interval.sums["meta_loss"])
    before = sums()
    try:
        trainer.train_step()
    finally:
        POISON["micro"], SCALE["factor"] = set(), 1.0
    return sums() - before


def _trainer(run_dir: Path, shards: str, *extra: str):
    from metalm.config import load_config
    from metalm.train.engine import init_distributed
    from metalm.train.loop import Trainer

    cfg = load_config(CONFIG, OVERRIDES + [f"data.shards={shards}", f"train.run_dir={run_dir}", *extra], world_size=1)
    if "dist" not in _PROCESS:
        _PROCESS["dist"] = init_distributed(cfg.train)  # once per process: one process group of one
    trainer = Trainer(cfg, _PROCESS["dist"])
    trainer.start()  # what run() sets up before its loop
    return trainer


def worker(shards: str, out_dir: str, tiny_fs: str) -> None:
    from metalm import checkpoint as ckpt
    from metalm.train.errors import TrainingError

    _install_injection()
    out = Path(out_dir)
    report: dict = {}
    for zero, precision in CASES:
        t = _trainer(out / f"z{zero}-{precision}", shards, f"train.zero_stage={zero}", f"train.precision={precision}")
        losses = [_step(t), _step(t)]
        before, lr_epoch = _snapshot(t), t.engine.ds.lr_scheduler.last_epoch
        losses.append(_step(t, poison={1}))  # the second micro-batch of the step (accumulation 2): NaN
        after_skip = _snapshot(t)
        skipped = t.interval.skipped
        losses.append(_step(t))
        after_next = _snapshot(t)
        counters = (t.engine.ds.lr_scheduler.last_epoch - lr_epoch, t.step, t.engine.ds.global_steps)
        losses += [_step(t), _step(t)]  # steps 4 (AR) and 5, 6 (meta): the head idles in step 4
        report[f"{zero}-{precision}"] = {
            "losses": losses,
            "unchanged_after_skip": _same(before, after_skip),
            "changed_after_next": not _same(after_skip, after_next),
            "finite_after_next": all(bool(x.float().isfinite().all()) for x in after_next),
            "skipped_counted": skipped,
            "lr_epoch_advance": counters[0],
            "step": counters[1],
            "ds_global_steps": counters[2],
        }
    # policies, on ZeRO-2
    t = _trainer(out / "stop", shards, "train.nonfinite_policy=stop")
    _step(t)
    try:
        _step(t, poison={0})
        report["stop"] = None
    except TrainingError as e:
        report["stop"] = str(e)
    t = _trainer(out / "inrow", shards, "train.max_nonfinite_in_row=3")
    msgs = []
    for poison in ({0}, {1}, (), {0}, {0, 1}, {1}):  # 2 in a row, a good step, then 3 in a row
        try:
            _step(t, poison=poison)
            msgs.append(None)
        except TrainingError as e:
            msgs.append(str(e))
            break
    report["in_row"] = msgs
    # a finite loss spike: a metrics record and a warning, training goes on
    t = _trainer(out / "spike", shards, "meta.enabled=false", "train.spike_window=6", "train.spike_sigma=4")
    for i in range(10):
        _step(t, scale=30.0 if i == 8 else 1.0)
        t._report()
    t.metrics.close()
    # a full disk while writing step 4's checkpoint (checkpoint.max_failed_saves=0: stop at once)
    save_weights = ckpt.save_weights

    def full_disk(module, path):
        if "step_00000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save_weights(module, path)

    ckpt.save_weights = full_disk
    t = _trainer(out / "enospc", shards, "checkpoint.every=2", "checkpoint.max_failed_saves=0", "train.max_steps=6")
    try:
        t.run()
        report["enospc"] = None
    except TrainingError as e:
        report["enospc"] = str(e)
    ckpt.save_weights = save_weights
    # the run directory is unusable: before any data, model or engine work
    (out / "a-file").write_text("not a directory")
    for name, run_dir in (("through_file", out / "a-file" / "run"), ("tiny_fs", Path(tiny_fs) / "run")):
        if name == "tiny_fs" and tiny_fs == "-":
            continue
        try:
            _trainer(run_dir, shards)
            report[name] = None
        except TrainingError as e:
            report[name] = str(e)
    (out / "report.json").write_text(json.dumps(report, indent=1))


# ------------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def report(shards, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("inprocess")
    tiny = out / "tiny-fs"
    tiny.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(tiny)],
                             capture_output=True).returncode == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    try:
        res = subprocess.run([sys.executable, __file__, "WORKER", str(shards), str(out), str(tiny) if mounted else "-"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(tiny)], capture_output=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-4000:]
    rep = json.loads((out / "report.json").read_text())
    rep["_stderr"] = res.stderr
    rep["_out"] = out
    rep["_metrics"] = [json.loads(x) for x in (out / "spike" / "metrics.jsonl").read_text().splitlines()]
    return rep


@pytest.mark.slow
@pytest.mark.parametrize("zero,precision", CASES)
def test_skipped_step_leaves_parameters_and_adamw_state_untouched(report, zero, precision):
    r = report[f"{zero}-{precision}"]
    assert r["unchanged_after_skip"], "a step with a NaN loss changed parameters or AdamW state"
    assert r["changed_after_next"] and r["finite_after_next"], "training did not go on normally after the skip"
    assert r["skipped_counted"] == 1
    # every step advances the LR schedule and DeepSpeed's counters, skipped or not: no drift after a skip
    assert r["lr_epoch_advance"] == 2 and r["step"] == 4 and r["ds_global_steps"] == 4


@pytest.mark.slow
def test_stop_policy_exits_naming_the_step(report):
    assert report["stop"] is not None and "non-finite loss at step 2" in report["stop"]
    assert "train.nonfinite_policy=stop" in report["stop"]


@pytest.mark.slow
def test_skip_policy_stops_after_max_in_row(report):
    msgs = report["in_row"]
    assert msgs[:5] == [None] * 5, msgs  # 2 in a row, a good step resets the count, 2 more
    assert len(msgs) == 6 and "3 steps in a row" in msgs[5] and "steps 4..6" in msgs[5], msgs
    assert "non-finite loss at step 1 " in report["_stderr"] and "its update is skipped" in report["_stderr"]


@pytest.mark.slow
def test_loss_spike_is_logged_and_training_goes_on(report):
    spikes = [r for r in report["_metrics"] if "loss_spike" in r]
    assert [(r["step"], r["loss_spike"]) for r in spikes] == [(9, "ar")]
    assert spikes[0]["loss"] > spikes[0]["window_mean"] + 4 * spikes[0]["window_std"]
    steps = [r["step"] for r in report["_metrics"] if "lr" in r]
    assert steps == list(range(1, 11))
    assert "ar loss spike at step 9" in report["_stderr"]


@pytest.mark.slow
def test_zero_stages_train_the_same_model(report):
    """fp32 ZeRO 0-3 agree step for step through a hybrid schedule with a skipped step: in particular ZeRO-3
    no longer re-applies a parameter's stale gradient in a step where it gets none (the meta head in AR steps)."""
    ref = report["0-fp32"]["losses"]
    for zero in (1, 2, 3):
        assert report[f"{zero}-fp32"]["losses"] == pytest.approx(ref, rel=1e-5, abs=1e-6), zero


@pytest.mark.slow
def test_full_disk_during_a_save_stops_naming_path_and_errno(report):
    from metalm import checkpoint as ckpt

    msg = report["enospc"]
    assert msg is not None and "checkpoint of step 4" in msg, msg
    assert "ENOSPC [Errno 28] No space left on device" in msg and ".tmp-step_00000004/model.safetensors" in msg
    root = report["_out"] / "enospc" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert ckpt.checkpoint_problem(root / "step_00000002", checksums=True) is None
    assert not list(root.glob(".tmp-*")) and not (root / "step_00000004").exists()
    rows = [json.loads(x) for x in (report["_out"] / "enospc" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "checkpoint_failed" in r] == [4]


@pytest.mark.slow
def test_unusable_run_directory_is_refused_before_any_work(report):
    assert "cannot write there" in report["through_file"] and "Errno" in report["through_file"]
    if "tiny_fs" not in report:
        pytest.skip("cannot mount a tmpfs here")
    assert "not enough free space for a checkpoint" in report["tiny_fs"], report["tiny_fs"]


if __name__ == "__main__" and sys.argv[1:2] == ["WORKER"]:
    worker(sys.argv[2], sys.argv[3], sys.argv[4])
