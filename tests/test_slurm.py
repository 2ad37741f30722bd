"""The shipped Slurm scripts under a real Slurm (slurm-wlm on localhost, tests/slurm_cluster.py): pretrain.sbatch
trains on CPU with 2 tasks, `scancel --signal=TERM` makes it checkpoint and exit, `scontrol requeue` resumes it
to the end; evaluate.sbatch evaluates the run's checkpoints. The CPU variants are the documented ones
(launchers/slurm/README.md): no GPUs asked for, DS_ACCELERATOR=cpu in the submitting environment.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from procs import cpu_run_env, no_launcher_env
from slurm_cluster import SlurmCluster, missing

from metalm import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "launchers" / "slurm"
MAX_STEPS = 30
TRAIN_ARGS = [
    "--config", "configs/cpu-tiny.yaml",
    "train.seq_len=64", "model.max_seq_len=64", "train.micro_batch=4", "train.global_batch=8", "model.n_layers=2",
    f"train.max_steps={MAX_STEPS}", "train.log_every=1", "train.val_every=0", "optim.warmup_steps=3",
    "checkpoint.every=1000", "logging.wandb=false", "logging.progress=false", "data.prepare_if_missing=false",
    "meta.enabled=false",
]
CPU_VARIANT = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = missing()
    if why is not None:  # CI installs slurm-wlm (.ci/run), so there this never skips
        pytest.fail(f"Slurm test cluster: {why}")
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


def job_env() -> dict:
    """The submitting shell's environment: the CPU variant's DS_ACCELERATOR=cpu, the interpreter as PYTHON, no
    launcher or Slurm variables of the test's own."""
    env = no_launcher_env(PYTHON=sys.executable)
    env.update({k: v for k, v in cpu_run_env().items() if k not in env})
    return env


def steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "lr" in row:
            out.append(row["step"])
    return out


def test_pretrain_sbatch_stops_on_sigterm_and_a_requeue_resumes_then_evaluate_sbatch(cluster, tmp_path, shards):
    run_dir, log = tmp_path / "run", tmp_path / "train-%j.out"
    job = cluster.sbatch([*CPU_VARIANT, f"--output={log}", str(SLURM / "pretrain.sbatch"), *TRAIN_ARGS,
                          f"data.shards={shards}", f"train.run_dir={run_dir}"], cwd=REPO, env=job_env())
    out = Path(str(log).replace("%j", str(job)))
    end = time.monotonic() + 240
    while max(steps(run_dir), default=0) < 3:
        state = cluster.state(job)
        assert state in {"PENDING", "CONFIGURING", "RUNNING"}, f"job {state}:\n{out.read_text()[-3000:]}"
        assert time.monotonic() < end, f"no step 3 after 240 s:\n{out.read_text()[-3000:]}\n{cluster.logs()}"
        time.sleep(0.1)
    cluster.scancel("--signal=TERM", str(job))
    cluster.wait(job, {"COMPLETED"}, timeout=120)
    first = out.read_text()
    assert "metalm: stopped by SIGTERM at step" in first, first[-3000:]
    stopped_at = int(first.split("metalm: stopped by SIGTERM at step ")[1].split(";")[0])
    assert stopped_at < MAX_STEPS
    latest = ckpt.find_latest(run_dir / "checkpoints")
    assert latest is not None and ckpt.read_state(latest).step == stopped_at
    assert ckpt.checkpoint_problem(latest, checksums=True) is None
    assert "2 process(es) on cpu" in first  # both Slurm tasks were ranks of one run

    # allowed by the script's own --requeue (the test cluster has JobRequeue=0); it starts again once the old
    # credential has expired (cred_expire=10)
    cluster.scontrol("requeue", str(job))
    deadline = time.monotonic() + 240
    while cluster.job(job).get("Restarts") != "1" or cluster.state(job) != "COMPLETED":
        assert time.monotonic() < deadline, f"the requeued job did not complete:\n{cluster.job(job)}"
        assert cluster.state(job) not in {"FAILED", "CANCELLED", "TIMEOUT"}, out.read_text()[-3000:]
        time.sleep(0.5)
    second = out.read_text()
    assert second.startswith(first), "the requeued job's log replaced the first attempt's (--open-mode=append)"
    assert f"resumed from {latest}" in second[len(first):], second[-3000:]
    assert f"metalm: done, {MAX_STEPS} steps" in second
    logged = steps(run_dir)
    assert sorted(set(logged)) == list(range(1, MAX_STEPS + 1))
    assert ckpt.read_state(ckpt.find_latest(run_dir / "checkpoints")).step == MAX_STEPS

    elog = tmp_path / "eval-%j.out"
    ejob = cluster.sbatch(["--gpus=0", "--cpus-per-task=1", f"--output={elog}", str(SLURM / "evaluate.sbatch"),
                           str(run_dir), "--device", "cpu", "--no-wandb", "--config", "eval.metrics=[val_loss]",
                           "eval.val_batches=2", "eval.batch_size=4", "eval.seq_len=64"], cwd=REPO, env=job_env())
    cluster.wait(ejob, {"COMPLETED"}, timeout=240)
    for step in (stopped_at, MAX_STEPS):
        result = json.loads((run_dir / "eval" / f"step_{step:08d}.json").read_text())
        assert result["step"] == step and result["metrics"]["val_loss"] > 0, result
